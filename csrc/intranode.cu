// Kernel family "intranode": normal dispatch and combine over NVLink (see intranode.h for the
// design and the buffer layout). Every copy loop is warp-cooperative: a warp owns a row and its
// lanes move 16-byte vectors (narrower ones when a row is not 16-byte aligned), several vectors in
// flight per lane, so a few SMs keep enough bytes in flight to fill the links.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <initializer_list>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>

#include "bad_input.cuh"
#include "bounded_wait.cuh"
#include "device_copy.cuh"
#include "intranode.h"
#include "runtime.h"

namespace moe_ep {
namespace intranode {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kNotifyThreads = 1024;  // notify is one block: its routing pass uses them all
constexpr unsigned kFullWarp = 0xffffffffu;

using copy::align16;
using copy::warp_copy;
using copy::warp_zero;

__device__ __forceinline__ uint8_t* region_of(const Peers& peers, int rank) {
  return static_cast<uint8_t*>(peers.bases[rank]) + peers.region_offset;
}
__device__ __forceinline__ State* state_of(const Peers& peers, int rank) {
  return reinterpret_cast<State*>(region_of(peers, rank));
}
__device__ __forceinline__ Control* control_of(const Peers& peers, int rank, int parity) {
  return reinterpret_cast<Control*>(region_of(peers, rank) + kControlOffset + parity * kControlStride);
}
// Chunk flags of `region`: dispatch ones first, then combine ones; [source][chunk], F per source.
__device__ __forceinline__ long long* flags_of(uint8_t* region, bool combine) {
  return reinterpret_cast<long long*>(region + kFlagsOffset) + (combine ? kFlagSlots : 0);
}

// A pointer held by lane src_lane, for the whole warp.
template <typename P>
__device__ __forceinline__ P* shfl_ptr(P* ptr, int src_lane) {
  return reinterpret_cast<P*>(__shfl_sync(kFullWarp, reinterpret_cast<unsigned long long>(ptr), src_lane));
}

__device__ __forceinline__ void store_release_sys(long long* ptr, long long value) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
#else
  __threadfence_system();
  *reinterpret_cast<volatile long long*>(ptr) = value;
#endif
}

// A warp's stores into a peer's buffer become visible before its flag: every lane fences its own
// stores (system scope), the warp meets, then lane 0 publishes `value` with a release store.
__device__ __forceinline__ void warp_raise_flag(long long* flag, long long value, int lane) {
  __threadfence_system();
  __syncwarp();
  if (lane == 0) store_release_sys(flag, value);
}

// Lane 0 waits (bounded) until a chunk flag reaches `value`; then the whole warp may read what the
// chunk's sender stored before raising it.
__device__ __forceinline__ void warp_wait_flag(const long long* flag, long long value, const wait::WaitSite& site,
                                               int lane) {
  if (lane == 0) wait::wait_value<wait::Scope::kSys>(flag, value, wait::Cmp::kGe, site);
  __syncwarp();
}

// Per block: how many of its 16 warps send (the rest receive or reduce), and this warp's place.
struct WarpRole {
  bool sender;
  int id;     // among the grid's warps of its kind
  int count;  // warps of its kind in the grid
};

__device__ __forceinline__ WarpRole warp_role(int send_warps) {
  const int w = static_cast<int>(threadIdx.x) / 32;
  if (w < send_warps) return {true, static_cast<int>(blockIdx.x) * send_warps + w, static_cast<int>(gridDim.x) * send_warps};
  const int others = kWarps - send_warps;
  return {false, static_cast<int>(blockIdx.x) * others + (w - send_warps), static_cast<int>(gridDim.x) * others};
}

// Chunks of G rows of the pairs a warp kind walks, in rotated rank order (starting at `first`),
// so each rank's warps start on different peers and a receiver starts with its own rows.
struct ChunkPlan {
  int begin[kMaxRanks + 1];  // first chunk of the i-th rank in the order
  int first;                 // rank of position 0
  int count;                 // ranks in the order
  int total;                 // chunks in all
};

__device__ __forceinline__ void plan_chunks(ChunkPlan& plan, const int* rows, int first, int count, int num_ranks,
                                            int G) {
  int chunks = 0;
  plan.first = first;
  plan.count = count;
  for (int i = 0; i < count; ++i) {
    plan.begin[i] = chunks;
    chunks += (rows[(first + i) % num_ranks] + G - 1) / G;
  }
  plan.begin[count] = chunks;
  plan.total = chunks;
}

// Chunk c (< plan.total) of a plan over rows[rank]: its rank, its index among that rank's chunks
// (the flag it raises or waits for), its first row and its rows.
struct Chunk {
  int rank;
  int index;
  int first_row;
  int rows;
};

__device__ __forceinline__ Chunk chunk_at(const ChunkPlan& plan, const int* rows, int c, int num_ranks, int G) {
  int i = 0;
  while (i + 1 < plan.count && plan.begin[i + 1] <= c) ++i;
  Chunk chunk;
  chunk.rank = (plan.first + i) % num_ranks;
  chunk.index = c - plan.begin[i];
  chunk.first_row = chunk.index * G;
  chunk.rows = min(G, rows[chunk.rank] - chunk.first_row);
  return chunk;
}

__device__ __forceinline__ int prefix_at(const int* rank_prefix_matrix, int src, int dst, int num_ranks) {
  return src < 0 ? 0 : rank_prefix_matrix[src * num_ranks + dst];
}

// ------------------------------------------------------------------------------------ notify
constexpr int kNotifyWarps = kNotifyThreads / 32;
constexpr int kRouteTokensPerThread = 4;  // tokens a thread counts per tile of the routing pass

// Inclusive sum of `value` over the lanes up to this one.
__device__ __forceinline__ int warp_inclusive_sum(int value, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(kFullWarp, value, d);
    if (lane >= d) value += other;
  }
  return value;
}

// The routing pass of a dispatch, by the notify's one block, in the kernel that needs its result
// (so a dispatch launches no torch ops for it): each token's place among this rank's tokens bound
// for rank r, send_slot[t][r] (-1: not sent there), the send lists, lists[r][slot] = t, and the
// counts, sent[r]. Places follow token order, as the reference's. Tiles of kNotifyThreads *
// kRouteTokensPerThread tokens: a thread loads its tokens' rows of is_token_in_rank once, as bit
// masks; per destination the warps scan their threads' counts, one thread per destination scans
// the warps' totals on top of the running count, then every thread writes its tokens' places.
// warp_base is shared scratch, [kNotifyWarps][kMaxRanks].
__device__ void route_tokens(const bool* __restrict__ in_rank, int64_t num_tokens, int R, int* __restrict__ send_slot,
                             int* __restrict__ send_lists, int* sent, int (*warp_base)[kMaxRanks]) {
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  for (int r = threadIdx.x; r < R; r += kNotifyThreads) sent[r] = 0;
  constexpr int64_t kTile = static_cast<int64_t>(kNotifyThreads) * kRouteTokensPerThread;
  for (int64_t tile = 0; tile < num_tokens; tile += kTile) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kRouteTokensPerThread;
    uint64_t masks[kRouteTokensPerThread];  // bit r: the token goes to rank r (R <= kMaxRanks = 64)
#pragma unroll
    for (int p = 0; p < kRouteTokensPerThread; ++p) {
      uint64_t mask = 0;
      if (first + p < num_tokens) {
        const bool* row = in_rank + (first + p) * R;
        for (int r = 0; r < R; ++r) mask |= static_cast<uint64_t>(row[r]) << r;
      }
      masks[p] = mask;
    }
    for (int r = 0; r < R; ++r) {
      int count = 0;
#pragma unroll
      for (int p = 0; p < kRouteTokensPerThread; ++p) count += static_cast<int>((masks[p] >> r) & 1);
      const int inclusive = warp_inclusive_sum(count, lane);
      if (lane == 31) warp_base[warp][r] = inclusive;  // the warp's total, until the scan below
    }
    __syncthreads();
    for (int r = threadIdx.x; r < R; r += kNotifyThreads) {
      int running = sent[r];
      for (int w = 0; w < kNotifyWarps; ++w) {
        const int total = warp_base[w][r];
        warp_base[w][r] = running;
        running += total;
      }
      sent[r] = running;
    }
    __syncthreads();
    for (int r = 0; r < R; ++r) {
      int count = 0;
#pragma unroll
      for (int p = 0; p < kRouteTokensPerThread; ++p) count += static_cast<int>((masks[p] >> r) & 1);
      int slot = warp_base[warp][r] + warp_inclusive_sum(count, lane) - count;
#pragma unroll
      for (int p = 0; p < kRouteTokensPerThread; ++p) {
        if (first + p >= num_tokens) break;
        const bool sent_there = (masks[p] >> r) & 1;
        send_slot[(first + p) * R + r] = sent_there ? slot : -1;
        if (sent_there) send_lists[static_cast<int64_t>(r) * num_tokens + slot++] = static_cast<int>(first + p);
      }
    }
    __syncthreads();  // warp_base is rewritten by the next tile
  }
}

// The smallest and largest id in topk_idx (n = T * K entries) into bounds[0], bounds[1] (shared),
// for the host to check after its wait: 16-byte loads, several in flight, nothing else in the
// loop. With trap_bad_ids (num_worst_tokens: no host wait to raise from) an id outside
// [-1, num_experts) then traps with a line naming the entry (a second pass finds it).
__device__ void expert_id_bounds(const int64_t* __restrict__ ids, int64_t n, int num_topk, int num_experts,
                                 bool trap_bad_ids, int rank, long long* bounds) {
  __shared__ long long warp_low[kNotifyWarps], warp_high[kNotifyWarps];
  const auto* values = reinterpret_cast<const long long*>(ids);
  long long low = LLONG_MAX, high = LLONG_MIN;
  const int64_t pairs = reinterpret_cast<uintptr_t>(ids) % 16 == 0 ? n / 2 : 0;
#pragma unroll 8
  for (int64_t i = threadIdx.x; i < pairs; i += kNotifyThreads) {
    const longlong2 two = __ldg(reinterpret_cast<const longlong2*>(values) + i);
    low = min(low, min(two.x, two.y));
    high = max(high, max(two.x, two.y));
  }
  for (int64_t i = 2 * pairs + threadIdx.x; i < n; i += kNotifyThreads) {
    const long long id = __ldg(values + i);
    low = min(low, id);
    high = max(high, id);
  }
  for (int d = 16; d > 0; d >>= 1) {
    low = min(low, __shfl_xor_sync(kFullWarp, low, d));
    high = max(high, __shfl_xor_sync(kFullWarp, high, d));
  }
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  if (lane == 0) {
    warp_low[warp] = low;
    warp_high[warp] = high;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kNotifyWarps; ++w) {
      low = min(low, warp_low[w]);
      high = max(high, warp_high[w]);
    }
    bounds[0] = low;
    bounds[1] = high;
  }
  __syncthreads();
  if (trap_bad_ids && (bounds[0] < -1 || bounds[1] >= num_experts)) {
    for (int64_t i = threadIdx.x; i < n; i += kNotifyThreads) {
      const long long id = __ldg(values + i);
      if (id < -1 || id >= num_experts) bad_topk_entry("dispatch", rank, i, num_topk, id, num_experts);
    }
  }
}

// Every thread's record fields before the epoch the host polls (the block's threads all call this).
__device__ __forceinline__ void publish_record_epoch(HostRecordView* record, long long epoch) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    *reinterpret_cast<volatile long long*>(&record->epoch) = epoch;
    __threadfence_system();
  }
}

// One block. With counts: the routing pass (route_tokens), the ids' range, then the barrier that
// hands every rank the count matrix. Without (a cached dispatch): the barrier only.
__global__ void __launch_bounds__(kNotifyThreads)
notify_kernel(Peers peers, CallSizes sizes, bool with_counts, int64_t num_tokens, const bool* __restrict__ in_rank,
              const int64_t* __restrict__ topk_idx, int num_topk, const int* __restrict__ expert_counts,
              int num_experts, int expert_alignment, int num_worst_tokens, int* __restrict__ send_slot,
              int* __restrict__ send_lists, int* rank_prefix_matrix, HostRecordView* record, long long epoch,
              uint64_t timeout_ns) {
  const int R = peers.num_ranks;
  const int me = peers.rank;
  __shared__ int sent[kMaxRanks];
  __shared__ long long id_bounds[2];
  if (with_counts) {
    __shared__ int warp_base[kNotifyWarps][kMaxRanks];
    route_tokens(in_rank, num_tokens, R, send_slot, send_lists, sent, warp_base);
    if (topk_idx != nullptr && num_tokens > 0 && num_topk > 0) {
      expert_id_bounds(topk_idx, num_tokens * num_topk, num_topk, num_experts, num_worst_tokens > 0, me, id_bounds);
    } else if (threadIdx.x == 0) {
      id_bounds[0] = id_bounds[1] = -1;
    }
  }

  __shared__ long long seq;
  if (threadIdx.x == 0) {
    auto* state = reinterpret_cast<volatile State*>(region_of(peers, me));
    seq = state->notify_seq + 1;
    state->notify_seq = seq;
  }
  __syncthreads();
  const int parity = static_cast<int>(seq & 1);
  const int L = with_counts ? num_experts / R : 0;
  for (int i = threadIdx.x; i < R * kCallSizes; i += kNotifyThreads) {
    control_of(peers, i / kCallSizes, parity)->sizes[me].v[i % kCallSizes] = sizes.v[i % kCallSizes];
  }
  if (with_counts) {
    for (int d = 0; d < R; ++d) {
      Control* c = control_of(peers, d, parity);
      for (int i = threadIdx.x; i < R; i += kNotifyThreads) c->matrix[me * R + i] = sent[i];
      for (int e = threadIdx.x; e < L; e += kNotifyThreads) c->expert_counts[me * L + e] = expert_counts[d * L + e];
      if (threadIdx.x == 0) c->tokens[me] = static_cast<int>(num_tokens);
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < R) store_release_sys(&control_of(peers, threadIdx.x, parity)->arrived[me], seq);
  const Control* own = control_of(peers, me, parity);
  if (threadIdx.x < R) {
    const wait::WaitSite site{"intranode_notify", "arrived[src]", me, static_cast<int>(threadIdx.x), timeout_ns};
    wait::wait_value<wait::Scope::kSys>(&own->arrived[threadIdx.x], seq, wait::Cmp::kGe, site);
  }
  __shared__ int differ;  // the lowest rank whose sizes are not this rank's (R: none)
  if (threadIdx.x == 0) differ = R;
  __syncthreads();
  if (threadIdx.x < R) {
    bool same = true;
    for (int i = 0; i < kCallSizes; ++i) same = same && __ldcg(&own->sizes[threadIdx.x].v[i]) == sizes.v[i];
    if (!same) atomicMin(&differ, static_cast<int>(threadIdx.x));
  }
  __syncthreads();
  if (differ < R) {
    if (with_counts && num_worst_tokens == 0) {  // the host raises, naming every rank's sizes
      for (int i = threadIdx.x; i < R * kCallSizes; i += kNotifyThreads) {
        record->sizes[i / kCallSizes].v[i % kCallSizes] = __ldcg(&own->sizes[i / kCallSizes].v[i % kCallSizes]);
      }
      if (threadIdx.x == 0) record->sizes_differ = 1;
      publish_record_epoch(record, epoch);
      return;
    }
    if (threadIdx.x == 0) {  // no host wait to raise from (every rank stops here: each compares all)
      const long long* t = own->sizes[differ].v;
      const long long* h = sizes.v;
      printf("moe_ep: intranode dispatch on rank %d: rank %d called with other sizes than this rank (hidden=%lld, "
             "fp8=%lld, x element bytes=%lld, scale columns=%lld, top-k columns=%lld, num_experts=%lld, cached=%lld, "
             "num_worst_tokens=%lld there; hidden=%lld, fp8=%lld, x element bytes=%lld, scale columns=%lld, top-k "
             "columns=%lld, num_experts=%lld, cached=%lld, num_worst_tokens=%lld here): every rank must pass the "
             "same\n",
             me, differ, __ldcg(t), __ldcg(t + 1), __ldcg(t + 2), __ldcg(t + 3), __ldcg(t + 4), __ldcg(t + 5),
             __ldcg(t + 6), __ldcg(t + 7), h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
      __trap();
    }
    __syncthreads();
    return;
  }
  if (!with_counts) return;

  __shared__ int matrix[kMaxRanks * kMaxRanks];
  __shared__ int recv[kMaxRanks];
  __shared__ int buffer_rows[kMaxRanks];
  for (int i = threadIdx.x; i < R * R; i += kNotifyThreads) matrix[i] = __ldcg(&own->matrix[i]);
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += kNotifyThreads) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      acc += matrix[s * R + d];
      rank_prefix_matrix[s * R + d] = acc;
    }
    recv[d] = acc;
    buffer_rows[d] = acc - matrix[d * R + d];
  }
  __syncthreads();
  if (num_worst_tokens > 0) {
    // Every rank checks every rank, so all of them stop here together instead of some waiting.
    if (threadIdx.x == 0) {
      for (int d = 0; d < R; ++d) {
        if (recv[d] > num_worst_tokens) {
          printf("moe_ep intranode dispatch: rank %d receives %d tokens but num_worst_tokens=%d; raise "
                 "num_worst_tokens (rank %d stops here)\n", d, recv[d], num_worst_tokens, me);
          __trap();
        }
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < L; e += kNotifyThreads) {
    int sum = 0;
    for (int s = 0; s < R; ++s) sum += __ldcg(&own->expert_counts[s * L + e]);
    record->counts[e] = (sum + expert_alignment - 1) / expert_alignment * expert_alignment;
  }
  if (threadIdx.x == 0) {
    int max_tokens = 0, max_rows = -1, max_rank = 0;
    for (int s = 0; s < R; ++s) {
      max_tokens = max(max_tokens, __ldcg(&own->tokens[s]));
      if (buffer_rows[s] > max_rows) {
        max_rows = buffer_rows[s];
        max_rank = s;
      }
    }
    record->num_recv = recv[me];
    record->id_min = id_bounds[0];
    record->id_max = id_bounds[1];
    record->max_tokens = max_tokens;
    record->max_buffer_rows = max_rows;
    record->max_buffer_rank = max_rank;
    record->sizes_differ = 0;
  }
  publish_record_epoch(record, epoch);
}

// ---------------------------------------------------------------------------------- transfer
// Top-k ids as the receiver `dst_rank` sees them: local ids of its experts, -1 (weight 0) elsewhere.
__device__ __forceinline__ void localize_topk(const int64_t* idx, const float* weights, int K, int64_t first_expert,
                                              int num_local, int64_t* out_idx, float* out_weights, int lane) {
  for (int k = lane; k < K; k += 32) {
    const int64_t id = idx[k];
    const bool mine = id >= first_expert && id < first_expert + num_local;
    out_idx[k] = mine ? id - first_expert : -1;
    out_weights[k] = mine ? weights[k] : 0.0f;
  }
}

// The small parts of a dispatch row (its scales, top-k ids and weights), loaded before the row's
// payload and stored after it, so their load latency hides behind the payload's instead of adding
// a round trip each. Lane l holds scale vector l (when the scales go as 16-byte vectors, at most 32
// of them) and top-k entry l (l < K; entries from 32 on take the slow path of localize_topk).
struct RowExtras {
  uint4 scale;
  int64_t id;
  float weight;
};

__device__ __forceinline__ RowExtras load_extras(const uint8_t* scale_src, int64_t scale_bytes, bool scale_vectors,
                                                 const int64_t* idx, const float* weights, int K, int lane,
                                                 bool cache_coherent) {
  RowExtras e{make_uint4(0, 0, 0, 0), -1, 0.0f};
  if (scale_vectors && lane * 16 < scale_bytes) {
    const uint4* src = reinterpret_cast<const uint4*>(scale_src) + lane;
    e.scale = cache_coherent ? __ldcg(src) : __ldg(src);
  }
  if (lane < K) {
    e.id = cache_coherent ? __ldcg(reinterpret_cast<const long long*>(idx) + lane) : __ldg(idx + lane);
    e.weight = cache_coherent ? __ldcg(weights + lane) : __ldg(weights + lane);
  }
  return e;
}

// Stores what load_extras loaded; with `localize` an input id becomes the receiver's local id, or
// -1 with weight 0 (the sender's and the own-row paths; the peer-row path stores what the sender
// localized).
__device__ __forceinline__ void store_extras(const RowExtras& e, uint8_t* scale_dst, int64_t scale_bytes,
                                             bool scale_vectors, int64_t* out_idx, float* out_weights, int K,
                                             bool localize, int64_t first_expert, int num_local, int lane) {
  if (scale_vectors && lane * 16 < scale_bytes) reinterpret_cast<uint4*>(scale_dst)[lane] = e.scale;
  if (lane < K) {
    const bool mine = !localize || (e.id >= first_expert && e.id < first_expert + num_local);
    out_idx[lane] = mine ? e.id - (localize ? first_expert : 0) : -1;
    out_weights[lane] = mine ? e.weight : 0.0f;
  }
}

// Where a run of rows goes: part p of row r at base_p + r * stride_p bytes. A buffer row packs the
// parts (the layout's offsets, one stride); outputs are separate arrays (this rank's own, or a
// peer's in its receive pool). src == nullptr: the source index is not written (a cached dispatch
// already has it).
struct RowTargets {
  uint8_t* x;
  uint8_t* scales;
  uint8_t* idx;
  uint8_t* weights;
  uint8_t* src;
  // Bytes from one row to the next: layout.stride for every part of a packed row; else x_bytes,
  // scale_bytes, 8 K, 4 K and 4.
  int64_t x_stride;
  int64_t scale_stride;
  int64_t idx_stride;
  int64_t weights_stride;
  int64_t src_stride;
  int64_t first_expert;  // the receiving rank's first expert: top-k ids become local to it
};

__device__ __forceinline__ RowTargets buffer_targets(uint8_t* rows, const RowLayout& layout, int64_t first_expert) {
  const int64_t st = layout.stride;
  return {rows, rows + layout.off_scales, rows + layout.off_idx, rows + layout.off_weights, rows + layout.off_src,
          st, st, st, st, st, first_expert};
}

__device__ __forceinline__ RowTargets output_targets(uint8_t* recv_x, uint8_t* recv_scales, void* recv_topk_idx,
                                                     void* recv_topk_weights, void* recv_src_idx, int64_t row0,
                                                     const RowLayout& layout, int64_t first_expert) {
  auto at = [&](void* base, int64_t bytes) -> uint8_t* {
    return base == nullptr ? nullptr : static_cast<uint8_t*>(base) + row0 * bytes;
  };
  const int K = layout.num_topk;
  return {at(recv_x, layout.x_bytes), at(recv_scales, layout.scale_bytes), at(recv_topk_idx, 8 * K),
          at(recv_topk_weights, 4 * K), at(recv_src_idx, 4), layout.x_bytes, layout.scale_bytes, 8 * K, 4 * K, 4,
          first_expert};
}

// A shared-memory field read where it is used (volatile: never hoisted into a register). The row
// loop reads its targets, and the kernel its loop strides, this way so that none of them is held
// across a copy, which keeps U vectors per lane in flight: registers are what that loop is short of
// (held, they spilled; a CPU test asserts the transfer kernel has no spills).
template <typename T>
__device__ __forceinline__ T read_shared(const T& field) {
  return *const_cast<const volatile T*>(&field);
}

// Copies n rows, the tokens listed at `tokens`, from this rank's inputs to rows row0.. of `*to` (a
// destination's entry of the block's table in shared memory), top-k ids localized to its experts:
// a sender's rows into a peer's buffer or (receive pool) straight into its outputs, and a
// receiver's own rows into its outputs.
template <int U>
__device__ __forceinline__ void copy_rows(const RowTargets* to, int64_t row0, const RowLayout& layout,
                                          const uint8_t* x, const uint8_t* scales, const int64_t* topk_idx,
                                          const float* topk_weights, const int* tokens, int n, bool scale_vectors,
                                          int num_local, int lane) {
  const int K = layout.num_topk;
  const int64_t x_bytes = layout.x_bytes;
  const int64_t scale_bytes = layout.scale_bytes;
  for (int sub = 0; sub < n; sub += 32) {
    const int m = min(32, n - sub);
    const int token = lane < m ? __ldg(tokens + sub + lane) : 0;
    for (int i = 0; i < m; ++i) {
      const int t = __shfl_sync(kFullWarp, token, i);
      const int64_t r = row0 + sub + i;
      const int64_t* idx = topk_idx + static_cast<int64_t>(t) * K;
      const float* weights = topk_weights + static_cast<int64_t>(t) * K;
      const RowExtras extras = load_extras(scales + t * scale_bytes, scale_bytes, scale_vectors, idx, weights, K,
                                           lane, false);
      warp_copy<U>(read_shared(to->x) + r * read_shared(to->x_stride), x + t * x_bytes, x_bytes, lane);
      uint8_t* dst_scales = read_shared(to->scales) + r * read_shared(to->scale_stride);
      auto* dst_idx = reinterpret_cast<int64_t*>(read_shared(to->idx) + r * read_shared(to->idx_stride));
      auto* dst_weights = reinterpret_cast<float*>(read_shared(to->weights) + r * read_shared(to->weights_stride));
      const int64_t first_expert = read_shared(to->first_expert);
      store_extras(extras, dst_scales, scale_bytes, scale_vectors, dst_idx, dst_weights, K, true, first_expert,
                   num_local, lane);
      if (!scale_vectors && scale_bytes > 0) warp_copy<U>(dst_scales, scales + t * scale_bytes, scale_bytes, lane);
      if (K > 32) {
        localize_topk(idx + 32, weights + 32, K - 32, first_expert, num_local, dst_idx + 32, dst_weights + 32, lane);
      }
      uint8_t* dst_src = read_shared(to->src);
      if (dst_src != nullptr && lane == 0) *reinterpret_cast<int*>(dst_src + r * read_shared(to->src_stride)) = t;
    }
  }
}

// A named barrier of the block's first `threads` threads (the sender warps come first).
__device__ __forceinline__ void sync_first_threads(int threads) {
  asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}

// kDirect: the group runs the direct-receive protocol (a receive pool); its code is compiled only
// into that instantiation, so the plain kernel keeps its registers.
template <int U, bool kDirect>
__global__ void __launch_bounds__(kThreads)
transfer_kernel(Peers peers, RowLayout layout, int64_t num_tokens, const uint8_t* __restrict__ x,
                const uint8_t* __restrict__ scales, const int64_t* __restrict__ topk_idx,
                const float* __restrict__ topk_weights, const int* __restrict__ send_lists,
                const int* __restrict__ rank_prefix_matrix, int G, bool cached, int* recv_src_idx,
                uint8_t* __restrict__ recv_x, uint8_t* __restrict__ recv_scales, int64_t* __restrict__ recv_topk_idx,
                float* __restrict__ recv_topk_weights, int64_t num_rows, int num_local, int send_warps,
                DirectReceive direct, bool skip_peer_copy, uint64_t timeout_ns) {
  const int R = peers.num_ranks;
  const int me = peers.rank;
  const int K = layout.num_topk;
  __shared__ int recv_rows[kMaxRanks];   // rows source s sends here
  __shared__ int recv_start[kMaxRanks];  // output row of s's first row here
  __shared__ int send_rows[kMaxRanks];   // rows this rank sends d
  __shared__ int send_start[kMaxRanks];  // buffer row at d of this rank's first row there
  __shared__ ChunkPlan recv_plan, send_plan;
  __shared__ long long seq;
  // Where each rank's rows go from this rank, by copy_rows: a peer's buffer (or, with the direct
  // protocol, its outputs) and this rank's own outputs; rows of d go to rows 0.. of entry d.
  __shared__ RowTargets targets[kMaxRanks];
  for (int r = threadIdx.x; r < R; r += kThreads) {
    recv_rows[r] = prefix_at(rank_prefix_matrix, r, me, R) - prefix_at(rank_prefix_matrix, r - 1, me, R);
    recv_start[r] = prefix_at(rank_prefix_matrix, r - 1, me, R);
    send_rows[r] = prefix_at(rank_prefix_matrix, me, r, R) - prefix_at(rank_prefix_matrix, me - 1, r, R);
    const int own_at_r = prefix_at(rank_prefix_matrix, r, r, R) - prefix_at(rank_prefix_matrix, r - 1, r, R);
    send_start[r] = prefix_at(rank_prefix_matrix, me - 1, r, R) - (me > r ? own_at_r : 0);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    seq = reinterpret_cast<volatile State*>(region_of(peers, me))->notify_seq;
    plan_chunks(recv_plan, recv_rows, me, R, R, G);
    plan_chunks(send_plan, send_rows, (me + 1) % R, R - 1, R, G);
  }
  for (int r = threadIdx.x; r < R; r += kThreads) {
    const int64_t first_expert = static_cast<int64_t>(r) * num_local;
    targets[r] = r == me ? output_targets(recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
                                          cached ? nullptr : recv_src_idx, recv_start[me], layout, first_expert)
                         : buffer_targets(region_of(peers, r) + kRowsOffset + send_start[r] * layout.stride, layout,
                                          first_expert);
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const WarpRole role = warp_role(R > 1 ? send_warps : 0);
  // Each kind's loop stride (role.count) and the flags per source, read from shared memory where
  // they are used: held in registers through the copies, they spilled.
  __shared__ int stride_of_kind[2];  // senders, receivers
  __shared__ int F;                  // flags per source (kFlagSlots / R), likewise
  if (threadIdx.x == 0) {
    F = kFlagSlots / R;
    const int senders = R > 1 ? send_warps : 0;
    stride_of_kind[0] = static_cast<int>(gridDim.x) * senders;
    stride_of_kind[1] = static_cast<int>(gridDim.x) * (kWarps - senders);
  }
  __syncthreads();
  const int64_t x_bytes = layout.x_bytes;
  const int64_t scale_bytes = layout.scale_bytes;
  // Scales go as 16-byte vectors, one per lane, with the row's other small parts, when every scale
  // row is 16-byte aligned and at most 32 vectors; otherwise by warp_copy after the payload.
  const bool scale_vectors = scale_bytes > 0 && scale_bytes % 16 == 0 && scale_bytes <= 32 * 16 &&
                             reinterpret_cast<uintptr_t>(scales) % 16 == 0 &&
                             reinterpret_cast<uintptr_t>(recv_scales) % 16 == 0;

  const int parity = static_cast<int>(seq & 1);
  if (kDirect && !role.sender && role.id == 0) {
    // Publish where this rank's outputs are to every peer (its senders wait for it, below).
    for (int p = lane; p < R; p += 32) {
      if (p != me) control_of(peers, p, parity)->outputs[me] = direct.own;
    }
    __threadfence_system();
    __syncwarp();
    for (int p = lane; p < R; p += 32) {
      if (p != me) store_release_sys(&control_of(peers, p, parity)->outputs_seq[me], seq);
    }
  }

  if (role.sender) {
    if (kDirect && send_plan.total > 0) {
      // The block's first warp waits until every rank it sends to has published where its outputs
      // are, and points those in a receive pool at them; the other sender warps wait for it.
      if (threadIdx.x < 32) {
        const Control* own_control = control_of(peers, me, parity);
        for (int d = lane; d < R; d += 32) {
          if (d == me || send_rows[d] == 0) continue;
          const wait::WaitSite site{"intranode_dispatch", "outputs_seq[dst]", me, d, timeout_ns};
          wait::wait_value<wait::Scope::kSys>(&own_control->outputs_seq[d], seq, wait::Cmp::kGe, site);
          const DirectOutputs* where = &own_control->outputs[d];
          if (__ldcg(&where->x) < 0) continue;  // d's outputs are not in its pool: its buffer, as set
          auto* peer_base = static_cast<uint8_t*>(peers.bases[d]);
          auto at = [&](const long long* field) -> uint8_t* {
            const long long offset = __ldcg(field);
            return offset < 0 ? nullptr : peer_base + offset;
          };
          targets[d] = output_targets(at(&where->x), at(&where->scales), at(&where->idx), at(&where->weights),
                                      at(&where->src), prefix_at(rank_prefix_matrix, me - 1, d, R), layout,
                                      static_cast<int64_t>(d) * num_local);
        }
      }
      sync_first_threads(send_warps * 32);
    }
    for (int c = role.id; c < send_plan.total; c += read_shared(stride_of_kind[0])) {
      const Chunk chunk = chunk_at(send_plan, send_rows, c, R, G);
      const int d = chunk.rank, k = chunk.index, j0 = chunk.first_row, n = chunk.rows;
      copy_rows<U>(&targets[d], j0, layout, x, scales, topk_idx, topk_weights,
                   send_lists + static_cast<int64_t>(d) * num_tokens + j0, n, scale_vectors, num_local, lane);
      warp_raise_flag(flags_of(region_of(peers, d), false) + static_cast<int64_t>(me) * read_shared(F) + k, seq, lane);
    }
    return;
  }

  uint8_t* own_region = region_of(peers, me);
  const uint8_t* own_rows = own_region + kRowsOffset;
  const long long* own_flags = flags_of(own_region, false);
  for (int c = role.id; c < recv_plan.total; c += read_shared(stride_of_kind[1])) {
    const Chunk chunk = chunk_at(recv_plan, recv_rows, c, R, G);
    const int s = chunk.rank, k = chunk.index, j0 = chunk.first_row, n = chunk.rows;
    const int64_t row0 = recv_start[s] + j0;
    if (s == me) {  // this rank's own rows: straight from x
      copy_rows<U>(&targets[me], j0, layout, x, scales, topk_idx, topk_weights,
                   send_lists + static_cast<int64_t>(me) * num_tokens + j0, n, scale_vectors, num_local, lane);
      continue;
    }
    const wait::WaitSite site{"intranode_dispatch", "chunk_flag[src]", me, s, timeout_ns};
    warp_wait_flag(own_flags + static_cast<int64_t>(s) * read_shared(F) + k, seq, site, lane);
    // Direct receive: the peer stored its rows into the outputs. skip_peer_copy: a diagnostic (see
    // launch_transfer), the peer's rows stay unwritten.
    if ((kDirect && direct.own.x >= 0) || skip_peer_copy) continue;
    const int64_t buffer_row0 = row0 - (s > me ? recv_rows[me] : 0);
    for (int i = 0; i < n; ++i) {
      const int64_t row = row0 + i;
      const uint8_t* src = own_rows + (buffer_row0 + i) * layout.stride;
      const auto* src_idx = reinterpret_cast<const int64_t*>(src + layout.off_idx);
      const auto* src_weights = reinterpret_cast<const float*>(src + layout.off_weights);
      // Peers wrote these rows during this kernel: L2 loads only (no stale L1 lines).
      const RowExtras extras = load_extras(src + layout.off_scales, scale_bytes, scale_vectors, src_idx, src_weights,
                                           K, lane, true);
      const int src_token = lane == 0 && !cached ? __ldcg(reinterpret_cast<const int*>(src + layout.off_src)) : 0;
      warp_copy<U>(recv_x + row * x_bytes, src, x_bytes, lane);
      store_extras(extras, recv_scales + row * scale_bytes, scale_bytes, scale_vectors, recv_topk_idx + row * K,
                   recv_topk_weights + row * K, K, false, 0, 0, lane);
      if (!scale_vectors && scale_bytes > 0) {
        warp_copy<U>(recv_scales + row * scale_bytes, src + layout.off_scales, scale_bytes, lane);
      }
      for (int kk = 32 + lane; kk < K; kk += 32) {
        recv_topk_idx[row * K + kk] = __ldcg(reinterpret_cast<const long long*>(src_idx) + kk);
        recv_topk_weights[row * K + kk] = __ldcg(src_weights + kk);
      }
      if (!cached && lane == 0) recv_src_idx[row] = src_token;
    }
  }
  // num_worst_tokens mode: rows past the received ones are padding (zeros, ids -1, source 0).
  for (int64_t row = prefix_at(rank_prefix_matrix, R - 1, me, R) + role.id; row < num_rows;
       row += read_shared(stride_of_kind[1])) {
    warp_zero(recv_x + row * x_bytes, x_bytes, lane);
    if (scale_bytes > 0) warp_zero(recv_scales + row * scale_bytes, scale_bytes, lane);
    for (int kk = lane; kk < K; kk += 32) {
      recv_topk_idx[row * K + kk] = -1;
      recv_topk_weights[row * K + kk] = 0.0f;
    }
    if (!cached && lane == 0) recv_src_idx[row] = 0;
  }
}

// ----------------------------------------------------------------------------------- combine
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float bias_at(const void* bias, bool is_bf16, int64_t index) {
  return is_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[index])
                 : static_cast<const float*>(bias)[index];
}

// V elements of T per step: 16-byte vectors when every row is 16-byte aligned, else one element.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// An L2-only load of a pack (rows arrive from other GPUs during the kernel; L1 is not coherent).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const Pack<T, V>* ptr) {
  static_assert(sizeof(Pack<T, V>) == 16 || sizeof(Pack<T, V>) == 4 || sizeof(Pack<T, V>) == 2, "pack size");
  Pack<T, V> p;
  if constexpr (sizeof(Pack<T, V>) == 16) {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(ptr));
    memcpy(&p, &raw, 16);
  } else if constexpr (sizeof(Pack<T, V>) == 4) {
    const unsigned int raw = __ldcg(reinterpret_cast<const unsigned int*>(ptr));
    memcpy(&p, &raw, 4);
  } else {
    const unsigned short raw = __ldcg(reinterpret_cast<const unsigned short*>(ptr));
    memcpy(&p, &raw, 2);
  }
  return p;
}

// Stores pack i of token t's output: the summed values plus the biases, converted to T.
template <typename T, int V>
__device__ __forceinline__ void store_sum(const float (&acc)[V], int64_t i, int64_t hidden, const void* bias0,
                                          bool bias0_bf16, const void* bias1, bool bias1_bf16, int64_t t, T* out) {
  Pack<T, V> o;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t index = t * hidden + i * V + v;
    float value = acc[v];
    if (bias0 != nullptr) value += bias_at(bias0, bias0_bf16, index);
    if (bias1 != nullptr) value += bias_at(bias1, bias1_bf16, index);
    o.v[v] = from_float<T>(value);
  }
  reinterpret_cast<Pack<T, V>*>(out + t * hidden)[i] = o;
}

// A lane keeps kReduceSteps vectors of kReduceRanks ranks' rows in flight at once, then sums them
// in rank order: the reduce is bound by load latency, so the loads of every rank go out together.
constexpr int kReduceSteps = 4;
constexpr int kReduceRanks = 2;

// rows_lo / rows_hi: lane l holds the row pointer of rank l / l + 32 (where the mask has it).
template <typename T, int V>
__device__ __forceinline__ void reduce_token(unsigned long long mask, const uint8_t* rows_lo, const uint8_t* rows_hi,
                                             int64_t hidden, const void* bias0, bool bias0_bf16, const void* bias1,
                                             bool bias1_bf16, int64_t t, T* out, int lane) {
  constexpr int U = kReduceSteps;
  const int64_t steps = hidden / V;
  // The loop bounds and the mask are uniform across the warp (the pointer broadcasts need every lane).
  for (int64_t base = 0; base < steps; base += 32 * U) {
    float acc[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int v = 0; v < V; ++v) acc[u][v] = 0.0f;
    }
    for (unsigned long long m = mask; m != 0;) {  // ranks in increasing order, as the reference
      const Pack<T, V>* rows[kReduceRanks];
#pragma unroll
      for (int q = 0; q < kReduceRanks; ++q) {
        rows[q] = nullptr;
        if (m != 0) {
          const int r = __ffsll(static_cast<long long>(m)) - 1;
          rows[q] = reinterpret_cast<const Pack<T, V>*>(shfl_ptr(r < 32 ? rows_lo : rows_hi, r % 32));
          m &= m - 1;
        }
      }
      Pack<T, V> p[kReduceRanks][U];
#pragma unroll
      for (int q = 0; q < kReduceRanks; ++q) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t i = base + u * 32 + lane;
          if (rows[q] != nullptr && i < steps) p[q][u] = load_pack(rows[q] + i);
        }
      }
#pragma unroll
      for (int q = 0; q < kReduceRanks; ++q) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t i = base + u * 32 + lane;
          if (rows[q] != nullptr && i < steps) {
#pragma unroll
            for (int v = 0; v < V; ++v) acc[u][v] += to_float<T>(p[q][u].v[v]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < steps) store_sum<T, V>(acc[u], i, hidden, bias0, bias0_bf16, bias1, bias1_bf16, t, out);
    }
  }
}

// reduce_token with staged loads: pieces of 32 x S vectors, (column round, rank) in that order, stream
// through the warp's cp.async ring, so up to kStageRing pieces of every rank's rows are in flight and
// no load is held in registers. Sums in the same order as reduce_token (ranks increasing), so the
// results are the same bits. A token no rank holds (mask 0) takes reduce_token (bias or zeros).
template <typename T, int V, int S>
__device__ __forceinline__ void reduce_token_staged(unsigned long long mask, const uint8_t* rows_lo,
                                                    const uint8_t* rows_hi, int64_t hidden, const void* bias0,
                                                    bool bias0_bf16, const void* bias1, bool bias1_bf16, int64_t t,
                                                    T* out, uint4* ring, int lane) {
  static_assert(sizeof(Pack<T, V>) == 16, "staged reduce takes 16-byte packs");
  if (mask == 0) {
    reduce_token<T, V>(mask, rows_lo, rows_hi, hidden, bias0, bias0_bf16, bias1, bias1_bf16, t, out, lane);
    return;
  }
  const int nr = __popcll(mask);
  const int steps = static_cast<int>(hidden / V);  // the launcher stages rows of under 2^30 columns only
  constexpr int kPiece = 32 * S;
  const int rounds = (steps + kPiece - 1) / kPiece;
  float acc[S][V];
  auto rank_row = [&](int q) {  // the q-th rank of the mask (every lane alike)
    unsigned long long m = mask;
    for (int i = 0; i < q; ++i) m &= m - 1;
    const int r = __ffsll(static_cast<long long>(m)) - 1;
    return reinterpret_cast<const uint4*>(shfl_ptr(r < 32 ? rows_lo : rows_hi, r % 32));
  };
  auto load = [&](int p, uint4* slot) {
    const int round = p / nr;
    const uint4* src = rank_row(p - round * nr) + round * kPiece;
    const int m = steps - round * kPiece;
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int i = u * 32 + lane;
      if (i < m) copy::cp_async16(slot + i, src + i);
    }
  };
  auto use = [&](int p, const uint4* slot) {
    const int round = p / nr;
    const int q = p - round * nr;
    const int m = steps - round * kPiece;
    if (q == 0) {
#pragma unroll
      for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[u][v] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int i = u * 32 + lane;
      if (i < m) {
        Pack<T, V> pk;
        memcpy(&pk, slot + i, 16);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[u][v] += to_float<T>(pk.v[v]);
      }
    }
    if (q == nr - 1) {
#pragma unroll
      for (int u = 0; u < S; ++u) {
        const int64_t i = static_cast<int64_t>(round) * kPiece + u * 32 + lane;
        if (i < steps) store_sum<T, V>(acc[u], i, hidden, bias0, bias0_bf16, bias1, bias1_bf16, t, out);
      }
    }
  };
  copy::warp_stage_pieces<S>(rounds * nr, ring, load, use);
}

// A staged combine sender loads this many of its chunk's weights per lane ahead of the rows (a
// chunk of 4 rows of top-8 needs one).
constexpr int kAheadWeights = 4;

// The block of rank r's rows in rank s's combine area (s's own rank has none).
__device__ __forceinline__ int combine_block(int r, int s) { return r < s ? r : r - 1; }

// Where a reducer finds rank r's row for token slot `slot` and its top-k weights: rows +
// slot * row_stride and weights + slot * weight_stride (bytes). pushed: the rows arrive in this
// rank's buffer during the kernel (wait for the chunk's flag first); otherwise they are there
// already (this rank's own x, or a peer's x read in place). A per-block table in shared memory,
// read where it is used, so the reduce loop holds none of it in registers.
struct RowSource {
  const uint8_t* rows;
  const uint8_t* weights;
  long long row_stride;
  long long weight_stride;
  int pushed;
};

// The table for a combine without reads in place: own rows from x, the peers' from the buffer.
__device__ __forceinline__ void plan_row_sources(const Peers& peers, const uint8_t* x, const float* topk_weights,
                                                 int K, const int* rank_prefix_matrix, int64_t x_bytes,
                                                 int64_t stride_rows, int64_t row_bytes, RowSource* sources) {
  const int R = peers.num_ranks, me = peers.rank;
  const uint8_t* area = region_of(peers, me) + kRowsOffset;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    RowSource& source = sources[r];
    if (r == me) {
      const int64_t row0 = prefix_at(rank_prefix_matrix, me - 1, me, R);
      source.rows = x + row0 * x_bytes;
      source.weights = reinterpret_cast<const uint8_t*>(topk_weights + row0 * K);
      source.row_stride = x_bytes;
      source.weight_stride = static_cast<long long>(K) * 4;
      source.pushed = 0;
    } else {
      source.rows = area + combine_block(r, me) * stride_rows * row_bytes;
      source.weights = source.rows + align16(x_bytes);
      source.row_stride = row_bytes;
      source.weight_stride = row_bytes;
      source.pushed = 1;
    }
  }
}

// Pull protocol, at the start of a combine (after plan_row_sources, same threads): block 0
// publishes where this rank's input is to every peer; every block waits until each peer has
// published, and points the table at the inputs of those read in place.
__device__ __forceinline__ void open_pull_sources(const Peers& peers, const CombinePull& pull, long long epoch,
                                                  const int* rank_prefix_matrix, int64_t x_bytes, int K,
                                                  RowSource* sources, uint64_t timeout_ns) {
  const int R = peers.num_ranks, me = peers.rank;
  if (blockIdx.x == 0) {
    for (int p = threadIdx.x; p < R; p += blockDim.x) {
      if (p == me) continue;
      PullSource* slot = &state_of(peers, p)->pull_sources[me];
      slot->x = pull.x;
      slot->weights = pull.weights;
      store_release_sys(&slot->seq, epoch);  // orders this thread's two stores before it
    }
  }
  const State* own = state_of(peers, me);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (r == me) continue;
    const PullSource* published = &own->pull_sources[r];
    const wait::WaitSite site{"intranode_combine", "pull_source[src]", me, r, timeout_ns};
    wait::wait_value<wait::Scope::kSys>(&published->seq, epoch, wait::Cmp::kGe, site);
    const long long x_offset = __ldcg(&published->x);
    if (x_offset < 0) continue;  // r pushes its rows
    const auto* base = static_cast<const uint8_t*>(peers.bases[r]);
    const int64_t row0 = prefix_at(rank_prefix_matrix, me - 1, r, R);  // r's first row from this rank
    const long long w_offset = __ldcg(&published->weights);
    RowSource& source = sources[r];
    source.rows = base + x_offset + row0 * x_bytes;
    source.weights = w_offset < 0 ? nullptr : base + w_offset + row0 * K * 4;
    source.row_stride = x_bytes;
    source.weight_stride = static_cast<long long>(K) * 4;
    source.pushed = 0;
  }
}

// Pull protocol, at the end of a combine (one thread of each block, once the block's reducers are
// done): the grid's last block tells every peer it read from that it is done, then, if peers read
// this rank's x, waits until each of them has said so, so x outlives their reads.
__device__ __forceinline__ void close_pull_sources(const Peers& peers, const CombinePull& pull, long long epoch,
                                                   const RowSource* sources, uint64_t timeout_ns) {
  const int R = peers.num_ranks, me = peers.rank;
  State* own = state_of(peers, me);
  __threadfence();  // the block's reads are complete (their values are summed and stored)
  if (atomicAdd(&own->pull_blocks_done, 1ull) + 1 != gridDim.x) return;
  own->pull_blocks_done = 0;  // the next combine is stream-ordered after this kernel
  for (int r = 0; r < R; ++r) {
    if (r != me && read_shared(sources[r].pushed) == 0) store_release_sys(&state_of(peers, r)->pull_done[me], epoch);
  }
  if (pull.x < 0) return;
  for (int s = 0; s < R; ++s) {
    if (s == me) continue;
    const wait::WaitSite site{"intranode_combine", "pull_done[reader]", me, s, timeout_ns};
    wait::wait_value<wait::Scope::kSys>(&own->pull_done[s], epoch, wait::Cmp::kGe, site);
  }
}

// A named barrier of the block's last `threads` threads (the reducer warps come last).
__device__ __forceinline__ void sync_reducers(int threads) {
  asm volatile("bar.sync 2, %0;" ::"r"(threads) : "memory");
}

// U: vectors per lane of the register copies; S > 0 (16-byte packs only): the senders' copies and the
// reduce are staged (cp.async into the warp's ring), S vectors per lane per piece. Staging measured
// faster for the combine only (its reduce reads two ranks' rows per token); the dispatch's copies
// measured slower staged, with cp.async and with TMA bulk loads alike (benchmarks/RESULTS.md).
template <typename T, int V, int U, int S>
__global__ void __launch_bounds__(kThreads)
combine_kernel(Peers peers, const long long* barrier_epoch, int64_t num_tokens, int64_t hidden,
               const uint8_t* __restrict__ x, const float* __restrict__ topk_weights, int K,
               const bool* __restrict__ is_token_in_rank, const int* __restrict__ send_slot,
               const int* __restrict__ rank_prefix_matrix, int64_t stride_rows, int64_t row_bytes, int G,
               const void* bias0, bool bias0_bf16, const void* bias1, bool bias1_bf16, T* __restrict__ out,
               float* __restrict__ out_weights, int send_warps, CombinePull pull, uint64_t timeout_ns) {
  const int R = peers.num_ranks;
  const int me = peers.rank;
  const int F = kFlagSlots / R;
  const int64_t x_bytes = hidden * static_cast<int64_t>(sizeof(T));
  const int64_t weights_offset = align16(x_bytes);
  __shared__ int back_rows[kMaxRanks];   // rows this rank received from s, going back to s
  __shared__ ChunkPlan plan;
  __shared__ long long epoch;
  for (int r = threadIdx.x; r < R; r += kThreads) {
    back_rows[r] = prefix_at(rank_prefix_matrix, r, me, R) - prefix_at(rank_prefix_matrix, r - 1, me, R);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    epoch = *reinterpret_cast<const volatile long long*>(barrier_epoch);
    plan_chunks(plan, back_rows, (me + 1) % R, R - 1, R, G);
  }
  __syncthreads();
  // Where each rank's rows for this rank's tokens are (pull protocol: peers' inputs read in place).
  __shared__ RowSource sources[kMaxRanks];
  plan_row_sources(peers, x, topk_weights, K, rank_prefix_matrix, x_bytes, stride_rows, row_bytes, sources);
  if (pull.enabled) open_pull_sources(peers, pull, epoch, rank_prefix_matrix, x_bytes, K, sources, timeout_ns);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const WarpRole role = warp_role(R > 1 ? send_warps : 0);
  extern __shared__ uint4 stage_smem[];
  uint4* ring = stage_smem + (threadIdx.x / 32) * (copy::kStageRing * 32 * (S > 0 ? S : 1));

  if (role.sender) {
    for (int c = role.id; c < plan.total; c += role.count) {
      const Chunk chunk = chunk_at(plan, back_rows, c, R, G);
      const int s = chunk.rank, k = chunk.index, j0 = chunk.first_row, n = chunk.rows;
      uint8_t* dst_region = region_of(peers, s);
      uint8_t* dst_rows = dst_region + kRowsOffset + (combine_block(me, s) * stride_rows + j0) * row_bytes;
      const int64_t row0 = prefix_at(rank_prefix_matrix, s - 1, me, R) + j0;
      if constexpr (S > 0) {
        // The weights of the chunk's rows (lane j: weight j % K of row j / K) are loaded before the
        // rows' payload stream and stored after it; what one round does not cover goes after.
        float w[kAheadWeights];
#pragma unroll
        for (int q = 0; q < kAheadWeights; ++q) {
          const int j = q * 32 + lane;
          w[q] = j < n * K ? __ldg(topk_weights + row0 * K + j) : 0.0f;
        }
        copy::warp_stream_rows<S>(
            n, x_bytes / 16, [&](int r) { return reinterpret_cast<const uint4*>(x + (row0 + r) * x_bytes); },
            [&](int r) { return reinterpret_cast<uint4*>(dst_rows + static_cast<int64_t>(r) * row_bytes); }, ring, lane);
        auto weight_at = [&](int j) {
          return reinterpret_cast<float*>(dst_rows + static_cast<int64_t>(j / K) * row_bytes + weights_offset) + j % K;
        };
#pragma unroll
        for (int q = 0; q < kAheadWeights; ++q) {
          const int j = q * 32 + lane;
          if (j < n * K) *weight_at(j) = w[q];
        }
        for (int j = kAheadWeights * 32 + lane; j < n * K; j += 32) *weight_at(j) = __ldg(topk_weights + row0 * K + j);
        warp_raise_flag(flags_of(dst_region, true) + static_cast<int64_t>(me) * F + k, epoch, lane);
        continue;
      }
      for (int i = 0; i < n; ++i) {
        uint8_t* dst = dst_rows + static_cast<int64_t>(i) * row_bytes;
        // The weights are loaded before the row, so their latency hides behind it.
        const float w0 = lane < K ? __ldg(topk_weights + (row0 + i) * K + lane) : 0.0f;
        warp_copy<U>(dst, x + (row0 + i) * x_bytes, x_bytes, lane);
        for (int kk = lane; kk < K; kk += 32) {
          reinterpret_cast<float*>(dst + weights_offset)[kk] = kk < 32 ? w0 : __ldg(topk_weights + (row0 + i) * K + kk);
        }
      }
      warp_raise_flag(flags_of(dst_region, true) + static_cast<int64_t>(me) * F + k, epoch, lane);
    }
    return;
  }

  const long long* own_flags = flags_of(region_of(peers, me), true);
  // Lane l looks after rank l (and l + 32): whether the token went there (slot >= 0: the token's
  // index among those sent there), and where its row is. The next token's routing is loaded before
  // this token's rows are summed, so its latency hides behind them.
  auto routing = [&](int64_t t, int r) -> int {
    if (t >= num_tokens || r >= R) return -1;
    return is_token_in_rank[t * R + r] ? send_slot[t * R + r] : -1;
  };
  auto locate = [&](int r, int slot, const uint8_t*& row, const float*& weights) -> bool {
    if (slot < 0) return false;
    const RowSource& source = sources[r];
    if (read_shared(source.pushed)) {
      const wait::WaitSite site{"intranode_combine", "chunk_flag[src]", me, r, timeout_ns};
      wait::wait_value<wait::Scope::kSys>(own_flags + static_cast<int64_t>(r) * F + slot / G, epoch, wait::Cmp::kGe,
                                          site);
    }
    row = read_shared(source.rows) + slot * read_shared(source.row_stride);
    weights = reinterpret_cast<const float*>(read_shared(source.weights) + slot * read_shared(source.weight_stride));
    return true;
  };
  int slot_lo = routing(role.id, lane);
  int slot_hi = routing(role.id, lane + 32);
  for (int64_t t = role.id; t < num_tokens; t += role.count) {
    const uint8_t* row_lo = nullptr;
    const uint8_t* row_hi = nullptr;
    const float* w_lo = nullptr;
    const float* w_hi = nullptr;
    const bool in_lo = locate(lane, slot_lo, row_lo, w_lo);
    const bool in_hi = locate(lane + 32, slot_hi, row_hi, w_hi);
    __syncwarp();  // orders every lane's flag acquire before any lane's loads of that rank's row
    slot_lo = routing(t + role.count, lane);
    slot_hi = routing(t + role.count, lane + 32);
    const unsigned long long mask = static_cast<unsigned long long>(__ballot_sync(kFullWarp, in_lo)) |
                                    (static_cast<unsigned long long>(__ballot_sync(kFullWarp, in_hi)) << 32);
    if constexpr (S > 0) {
      reduce_token_staged<T, V, S>(mask, row_lo, row_hi, hidden, bias0, bias0_bf16, bias1, bias1_bf16, t, out, ring,
                                   lane);
    } else {
      reduce_token<T, V>(mask, row_lo, row_hi, hidden, bias0, bias0_bf16, bias1, bias1_bf16, t, out, lane);
    }
    if (K > 0) {
      // Lanes k < K sum weight k; the pointers are broadcast by every lane, so all lanes loop alike.
      for (int k0 = 0; k0 < K; k0 += 32) {
        const int k = k0 + lane;
        float acc = 0.0f;
        for (unsigned long long m = mask; m != 0; m &= m - 1) {
          const int r = __ffsll(static_cast<long long>(m)) - 1;
          const float* w = shfl_ptr(r < 32 ? w_lo : w_hi, r % 32);
          if (k < K) acc += __ldcg(w + k);
        }
        if (k < K) out_weights[t * K + k] = acc;
      }
    }
  }
  if (pull.enabled) {
    sync_reducers(kThreads - (R > 1 ? send_warps : 0) * 32);
    if (threadIdx.x == kThreads - 32) close_pull_sources(peers, pull, epoch, sources, timeout_ns);
  }
}

// The tuning knobs (moe_ep/comm/backends/intranode.py IntranodeKnobs owns their defaults and
// checks every rank uses the same ones: chunk_rows is part of the protocol, the chunk a flag
// covers). Checked again here so a bad value is an error, not a wrong kernel.
void check_knob(const char* name, int value, std::initializer_list<int> allowed) {
  for (int v : allowed) {
    if (v == value) return;
  }
  std::string list;
  for (int v : allowed) list += (list.empty() ? "" : ", ") + std::to_string(v);
  throw std::invalid_argument(std::string("moe_ep intranode: ") + name + " must be one of " + list + ", got " +
                              std::to_string(value));
}

void check_knobs(const Knobs& knobs) {
  check_knob("unroll", knobs.unroll, {4, 8, 16});
  check_knob("chunk_rows", knobs.chunk_rows, {4, 8, 16, 32, 64});
  check_knob("send_warps", knobs.send_warps, {2, 4, 6, 8, 12});
  check_knob("combine_send_warps", knobs.combine_send_warps, {2, 4, 6, 8, 12});
  check_knob("combine_staged_vectors", knobs.combine_staged_vectors, {0, 16, 24});
  check_knob("direct_send_warps", knobs.direct_send_warps, {2, 4, 6, 8, 12});
}

void check_peers(const Peers& peers) {
  if (peers.num_ranks < 1 || peers.num_ranks > kMaxRanks) {
    throw std::invalid_argument("moe_ep intranode: num_ranks must be in [1, 64], got " + std::to_string(peers.num_ranks));
  }
  if (peers.bases == nullptr) throw std::invalid_argument("moe_ep intranode: the IPC buffer's peers are not open");
}

int check_blocks(int num_blocks) {
  if (num_blocks < 1) throw std::invalid_argument("moe_ep intranode: num_sms must be >= 1, got " + std::to_string(num_blocks));
  return num_blocks;
}

// Calls launch(std::integral_constant<int, V>{}) for the V among Others equal to `value`, else for
// Default (the knobs are checked before): a runtime knob picks its compiled kernel.
template <int Default, int... Others, typename Launch>
void with_constant(int value, Launch launch) {
  const bool matched = ((value == Others ? (launch(std::integral_constant<int, Others>{}), true) : false) || ...);
  if (!matched) launch(std::integral_constant<int, Default>{});
}

// Dynamic shared memory of a block with staged copies of S vectors per lane per piece (0 for S = 0),
// opted into once per kernel; a device that cannot give it is an error naming the knob.
template <typename Kernel>
int stage_smem_for(Kernel kernel, int S) {
  if (S == 0) return 0;
  const int bytes = static_cast<int>(kWarps * copy::stage_bytes_per_warp(S));
  int device = 0, limit = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  // Checked and opted into once per (kernel, device, size): the attribute queries cost the host
  // several µs on every combine otherwise.
  static std::mutex opted_mutex;
  static std::set<std::tuple<const void*, int, int>> opted;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, bytes);
  const std::lock_guard<std::mutex> lock(opted_mutex);
  if (opted.count(key) != 0) return bytes;
  cuda_check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(max shared memory per block)");
  cudaFuncAttributes attrs{};
  cuda_check(cudaFuncGetAttributes(&attrs, kernel), "cudaFuncGetAttributes");
  if (bytes + static_cast<int>(attrs.sharedSizeBytes) > limit) {
    throw std::invalid_argument("moe_ep intranode: combine_staged_vectors=" + std::to_string(S * copy::kStageRing) +
                                " needs " + std::to_string(bytes + attrs.sharedSizeBytes) +
                                " bytes of shared memory per block, this GPU gives " + std::to_string(limit) +
                                "; set MOE_EP_INTRANODE_COMBINE_STAGED_VECTORS lower (0: no staging)");
  }
  if (attrs.maxDynamicSharedSizeBytes < bytes) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute(max dynamic shared memory)");
  }
  opted.insert(key);
  return bytes;
}

}  // namespace

RowLayout make_row_layout(int64_t x_bytes, int64_t scale_bytes, int num_topk) {
  if (x_bytes <= 0) throw std::invalid_argument("moe_ep intranode: x must have a positive row size, got " + std::to_string(x_bytes));
  if (scale_bytes < 0 || num_topk < 0) throw std::invalid_argument("moe_ep intranode: negative scale or top-k size");
  RowLayout layout;
  layout.x_bytes = x_bytes;
  layout.scale_bytes = scale_bytes;
  layout.num_topk = num_topk;
  layout.off_scales = align16(x_bytes);
  layout.off_idx = layout.off_scales + align16(scale_bytes);
  layout.off_weights = layout.off_idx + align16(static_cast<int64_t>(num_topk) * 8);
  layout.off_src = layout.off_weights + align16(static_cast<int64_t>(num_topk) * 4);
  layout.stride = layout.off_src + 16;
  return layout;
}

int64_t dispatch_bytes_needed(int64_t buffer_rows, const RowLayout& layout) {
  return kRowsOffset + buffer_rows * layout.stride;
}

int64_t combine_row_bytes(int64_t x_bytes, int num_topk_weights) {
  return align16(x_bytes) + align16(static_cast<int64_t>(num_topk_weights) * 4);
}

int64_t combine_bytes_needed(int64_t stride_rows, int64_t row_bytes, int num_ranks) {
  return kRowsOffset + static_cast<int64_t>(num_ranks - 1) * stride_rows * row_bytes;
}

int flag_rows_for(int64_t max_pair_rows, int chunk_rows, int num_ranks) {
  const int64_t flags = kFlagSlots / num_ranks;
  const int64_t needed = (max_pair_rows + flags - 1) / flags;
  return static_cast<int>(needed > chunk_rows ? needed : chunk_rows);
}

HostRecord::HostRecord() {
  cuda_check(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(HostRecordView), cudaHostAllocMapped),
             "cudaHostAlloc(intranode host record)");
  std::memset(host_, 0, sizeof(HostRecordView));
  cuda_check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0), "cudaHostGetDevicePointer");
}

HostRecord::~HostRecord() {
  if (host_ != nullptr) (void)cudaFreeHost(host_);
}

bool HostRecord::wait(long long epoch, double timeout_s) const {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  const volatile long long* flag = &host_->epoch;
  int spins = 0;
  while (*flag < epoch) {
    if (++spins % 1024 == 0) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::yield();
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  return true;
}

void launch_notify(const Peers& peers, const CallSizes& sizes, bool with_counts, int64_t num_tokens,
                   const bool* is_token_in_rank,
                   const int64_t* topk_idx, int num_topk, const int* expert_counts, int num_experts,
                   int expert_alignment, int num_worst_tokens, int* send_slot, int* send_lists,
                   int* rank_prefix_matrix, HostRecordView* record, long long epoch, cudaStream_t stream) {
  check_peers(peers);
  if (with_counts) {
    if ((num_experts > 0 && expert_counts == nullptr) ||
        (num_tokens > 0 && (is_token_in_rank == nullptr || send_slot == nullptr || send_lists == nullptr)) ||
        rank_prefix_matrix == nullptr) {
      throw std::invalid_argument("moe_ep intranode: notify with counts needs is_token_in_rank, expert_counts, "
                                  "send_slot, send_lists and rank_prefix_matrix");
    }
    if (topk_idx != nullptr && num_topk < 1) throw std::invalid_argument("moe_ep intranode: topk_idx needs num_topk >= 1");
    if (expert_alignment < 1) throw std::invalid_argument("moe_ep intranode: expert_alignment must be >= 1");
    if (num_experts % peers.num_ranks != 0 || num_experts > kMaxExperts) {
      throw std::invalid_argument("moe_ep intranode: num_experts must be a multiple of num_ranks, at most " +
                                  std::to_string(kMaxExperts) + ", got " + std::to_string(num_experts));
    }
    if (num_tokens > INT32_MAX / kMaxRanks) throw std::invalid_argument("moe_ep intranode: too many tokens");
  }
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(peers, sizes, with_counts, num_tokens, is_token_in_rank, topk_idx,
                                                  num_topk, expert_counts, num_experts, expert_alignment, num_worst_tokens,
                                                  send_slot, send_lists, rank_prefix_matrix, record, epoch,
                                                  wait::timeout_ns_from_env());
  cuda_check(cudaGetLastError(), "intranode notify_kernel launch");
}

void launch_transfer(const Peers& peers, const RowLayout& layout, int64_t num_tokens, const void* x,
                     const void* scales, const int64_t* topk_idx, const float* topk_weights, const int* send_lists,
                     const int* rank_prefix_matrix, int64_t max_pair_rows, bool cached, int* recv_src_idx,
                     void* recv_x, void* recv_scales, int64_t* recv_topk_idx, float* recv_topk_weights,
                     int64_t num_rows, int num_local_experts, const Knobs& knobs, const DirectReceive& direct,
                     int num_blocks, cudaStream_t stream, bool skip_peer_copy) {
  check_peers(peers);
  check_knobs(knobs);
  if (num_rows > INT32_MAX) throw std::invalid_argument("moe_ep intranode: too many received rows");
  if (layout.num_topk > 0 && ((num_tokens > 0 && (topk_idx == nullptr || topk_weights == nullptr)) ||
                              (num_rows > 0 && (recv_topk_idx == nullptr || recv_topk_weights == nullptr)))) {
    throw std::invalid_argument("moe_ep intranode: top-k inputs or outputs missing");
  }
  const int G = flag_rows_for(max_pair_rows, knobs.chunk_rows, peers.num_ranks);
  const int send_warps = direct.enabled ? knobs.direct_send_warps : knobs.send_warps;
  const uint64_t timeout_ns = wait::timeout_ns_from_env();
  const int blocks = check_blocks(num_blocks);
  auto run = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(
        peers, layout, num_tokens, static_cast<const uint8_t*>(x), static_cast<const uint8_t*>(scales), topk_idx,
        topk_weights, send_lists, rank_prefix_matrix, G, cached, recv_src_idx, static_cast<uint8_t*>(recv_x),
        static_cast<uint8_t*>(recv_scales), recv_topk_idx, recv_topk_weights, num_rows, num_local_experts, send_warps,
        direct, skip_peer_copy, timeout_ns);
  };
  with_constant<8, 4, 16>(knobs.unroll, [&](auto unroll) {
    constexpr int U = decltype(unroll)::value;
    if (direct.enabled) {
      run(transfer_kernel<U, true>);
    } else {
      run(transfer_kernel<U, false>);
    }
  });
  cuda_check(cudaGetLastError(), "intranode transfer_kernel launch");
}

void launch_combine(const Peers& peers, const long long* barrier_epoch, int64_t num_tokens, int64_t hidden,
                    bool x_is_bf16, const void* x, const float* topk_weights, int num_topk,
                    const bool* is_token_in_rank, const int* send_slot, const int* rank_prefix_matrix,
                    int64_t stride_rows, const void* bias0, bool bias0_is_bf16, const void* bias1,
                    bool bias1_is_bf16, void* out, float* out_weights, const Knobs& knobs, const CombinePull& pull,
                    int num_blocks, cudaStream_t stream) {
  check_peers(peers);
  check_knobs(knobs);
  const int64_t elem = x_is_bf16 ? 2 : 4;
  if (pull.x >= 0 && (!pull.enabled || reinterpret_cast<uintptr_t>(x) % 16 != 0 || (num_topk > 0) != (pull.weights >= 0))) {
    throw std::invalid_argument("moe_ep intranode: a combine input read in place needs the pull protocol, x 16-byte "
                                "aligned and its weights with it");
  }
  // num_topk (0: no weights), not the pointer, sizes the rows: a rank that received no rows has
  // an empty (null) weights tensor, and every rank must agree on the row size.
  const int64_t row_bytes = combine_row_bytes(hidden * elem, num_topk);
  const int G = flag_rows_for(stride_rows, knobs.chunk_rows, peers.num_ranks);
  // A rank whose x is read in place sends nothing: every warp reduces.
  const int send_warps = pull.x >= 0 ? 0 : knobs.combine_send_warps;
  const uint64_t timeout_ns = wait::timeout_ns_from_env();
  const int blocks = check_blocks(num_blocks);
  // 16-byte packs need every row start (x, out, biases: multiples of hidden elements) 16-byte aligned.
  const int vec = static_cast<int>(16 / elem);
  const bool aligned = hidden % vec == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(bias0) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(bias1) % 16 == 0;
  auto run = [&](auto kernel, auto* typed_out, int S) {
    const int smem = stage_smem_for(kernel, S);
    kernel<<<blocks, kThreads, smem, stream>>>(peers, barrier_epoch, num_tokens, hidden, static_cast<const uint8_t*>(x),
                                               topk_weights, num_topk, is_token_in_rank, send_slot, rank_prefix_matrix,
                                               stride_rows, row_bytes, G, bias0, bias0_is_bf16, bias1, bias1_is_bf16,
                                               typed_out, out_weights, send_warps, pull, timeout_ns);
  };
  // Staged: 16-byte packs only, and rows of under 2^30 columns (its piece arithmetic is 32-bit).
  if (aligned && knobs.combine_staged_vectors > 0 && hidden < (int64_t{1} << 30)) {
    with_constant<0, 16, 24>(knobs.combine_staged_vectors, [&](auto vectors) {
      constexpr int S = decltype(vectors)::value / copy::kStageRing;  // vectors per lane per piece
      if (x_is_bf16) {
        run(combine_kernel<__nv_bfloat16, 8, 8, S>, static_cast<__nv_bfloat16*>(out), S);
      } else {
        run(combine_kernel<float, 4, 8, S>, static_cast<float*>(out), S);
      }
    });
    cuda_check(cudaGetLastError(), "intranode combine_kernel launch");
    return;
  }
  with_constant<8, 4, 16>(knobs.unroll, [&](auto unroll) {
    constexpr int U = decltype(unroll)::value;
    if (x_is_bf16) {
      auto* o = static_cast<__nv_bfloat16*>(out);
      if (aligned) run(combine_kernel<__nv_bfloat16, 8, U, 0>, o, 0); else run(combine_kernel<__nv_bfloat16, 1, U, 0>, o, 0);
    } else {
      auto* o = static_cast<float*>(out);
      if (aligned) run(combine_kernel<float, 4, U, 0>, o, 0); else run(combine_kernel<float, 1, U, 0>, o, 0);
    }
  });
  cuda_check(cudaGetLastError(), "intranode combine_kernel launch");
}

}  // namespace intranode
}  // namespace moe_ep
