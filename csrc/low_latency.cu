// Kernel family "low_latency" (see low_latency.h for the buffer layout and the guarantees).
//
//   dispatch send   block b owns a contiguous range of tokens. Every block histograms topk_idx in
//                   shared memory, so it knows each of its pairs' slot (the pair's position among
//                   this rank's pairs for that expert) and each expert's total without waiting for
//                   another block. Each token is read and cast to FP8 once (a half-warp per
//                   128-column group), then stored ONCE per destination rank into its token
//                   area [this rank][token], and the token's index into each expert's slot
//                   [l][this rank][j] (NVLink carries a token once per rank, not once per expert). The block that counts an expert's last pair publishes the
//                   count with a release store. Nothing waits: the hook's "send" half.
//   dispatch recv   every block waits (bounded) for every (expert, source) count, so it knows
//                   where each row goes; rows are packed in source-rank order into recv_x, in
//                   pieces spread over every warp of the grid; src_info, layout_range, recv_count
//                   and the statistics are written once; the last block past the waits resets the
//                   flags.
//   combine send    as a source, each rank stores its tokens' top-k weights into their expert
//                   ranks (4 bytes per row) and raises a weight flag there; as an expert rank, once
//                   every source's weights are in, it sums weight x output over each (source,
//                   token)'s rows here in k order, in float32, and stores that one partial row into
//                   the source: a token crosses back once per rank, not once per expert. The last
//                   block to finish publishes one flag per source.
//   combine recv    waits for every rank's flag, then one warp per (token, 256 hidden columns)
//                   sums the partial rows of the token's ranks in rank order and casts; the last
//                   block resets the flags.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "bounded_wait.cuh"
#include "device_copy.cuh"
#include "low_latency.h"
#include "runtime.h"

namespace moe_ep {
namespace low_latency {
namespace {

using copy::align16;
using copy::warp_copy;
using intranode::Peers;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;  // moe_ep.comm.fp8.FP8_AMAX_FLOOR

__device__ __forceinline__ uint8_t* buffer_of(const Peers& peers, int rank, int64_t offset) {
  return static_cast<uint8_t*>(peers.bases[rank]) + peers.region_offset + offset;
}

__device__ __forceinline__ void st_release_sys(int* ptr, int value) {
  asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ void st_release_gpu(int* ptr, int value) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// A flag that orders no data before it (a count of zero rows): no fence needed.
__device__ __forceinline__ void st_relaxed_sys(int* ptr, int value) {
  asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Every thread fences its own stores (system scope), then the block meets: whatever one thread
// does next (count, publish a flag) comes after every thread's stores.
__device__ __forceinline__ void block_fence_system() {
  __threadfence_system();
  __syncthreads();
}

// Bad input found on the device (the host does not read topk_idx: no synchronisation): print one
// line naming the call, the entry and the bound, then trap (the host raises MoeEpTimeoutError, whose
// text points at this line). Only the first thread to find one prints.
__device__ int bad_input_reported = 0;
__device__ __noinline__ void bad_topk_entry(const char* call, int rank, int64_t pair, int num_topk, long long value,
                                            int num_experts) {
  if (atomicCAS(&bad_input_reported, 0, 1) == 0) {
    printf("moe_ep: %s on rank %d: topk_idx[%lld][%d] = %lld is outside [-1, %d] (num_experts = %d)\n", call, rank,
           static_cast<long long>(pair / num_topk), static_cast<int>(pair % num_topk), value, num_experts - 1,
           num_experts);
  }
  __threadfence_system();
  asm volatile("trap;");
}

__device__ __forceinline__ bool is_masked(const int* mask, int rank) { return mask != nullptr && mask[rank] != 0; }

// A masked (failed) rank neither sends to nor waits for anyone, and nobody sends to or waits for
// it: the pair (me, peer) is cut when either side is masked. Every rank holds the same mask.
__device__ __forceinline__ bool cut(const int* mask, int me, int peer) {
  return is_masked(mask, me) || is_masked(mask, peer);
}

// Smallest power of two >= s (s > 0, finite): exact, unlike exp2(ceil(log2(s))) in float.
__device__ __forceinline__ float pow2_ceil(float s) {
  const unsigned bits = __float_as_uint(s);
  const unsigned exponent = (bits >> 23) & 0xFF;
  const unsigned mantissa = bits & 0x7FFFFF;
  return __uint_as_float((exponent + (mantissa != 0 ? 1u : 0u)) << 23);
}

// Phase boundaries of the trace (low_latency.h): event e of kernel k is stored at trace[k][block][e].
enum TraceKernel { kTraceDispatchSend = 0, kTraceDispatchRecv = 1, kTraceCombineSend = 2, kTraceCombineRecv = 3 };
// dispatch send: 0 start, 1 pair positions known, 2 tokens stored, 3 counts published
// dispatch recv: 0 start, 1 counts in, 2 layout written, 3 rows copied
// combine send:  0 start, 1 weights stored (block 0's phase 1), 2 every source's weights in, 3 partial
//                sums stored, 4 flags published
// combine recv:  0 start, 1 every rank's flag in, 2 tokens written
__device__ __forceinline__ void trace_mark(unsigned long long* trace, int kernel, int event) {
  if (trace == nullptr || threadIdx.x != 0 || blockIdx.x >= kTraceBlocks) return;
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  trace[(static_cast<int64_t>(kernel) * kTraceBlocks + blockIdx.x) * kTraceEvents + event] = now;
}

// ----------------------------------------------------------------------------- dispatch send
// Slot of pair (token, k) = its position among this rank's pairs for the same expert, in (token, k)
// order: the pairs before it with that expert. Every block histograms topk_idx in shared memory
// (all pairs per expert, and those before its own tokens), so no block waits for another.
__device__ __forceinline__ bool valid_expert(int64_t e, int num_experts) { return e >= 0 && e < num_experts; }

// Block b owns tokens [t0, t1): it reads and casts each of them once, and stores the message to
// every destination of its top-k. The last block to count an expert's pairs publishes its count.
__device__ __forceinline__ void dispatch_send(const DispatchArgs& a) {
  const LLLayout& L = a.layout;
  trace_mark(a.trace, kTraceDispatchSend, 0);
  __shared__ int total[kMaxExperts];   // this rank's pairs per expert
  __shared__ int before[kMaxExperts];  // ... among the pairs before this block's tokens
  __shared__ uint8_t* dst[kMaxTopk];   // the current token's messages, one per rank (null: none)
  __shared__ int dst_rank[kMaxTopk];   // the rank entry k sends to (-1: nothing)
  __shared__ int dst_expert[kMaxTopk]; // its local expert there
  __shared__ int dst_slot[kMaxTopk];   // and its slot (position among this rank's rows for it)
  extern __shared__ uint4 stage[];     // staged send (FP8): the current token's payload and scales
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int me = a.peers.rank;
  const int K = L.num_topk;
  const int E = L.num_experts;
  const int t0 = static_cast<int>(static_cast<int64_t>(a.num_tokens) * blockIdx.x / gridDim.x);
  const int t1 = static_cast<int>(static_cast<int64_t>(a.num_tokens) * (blockIdx.x + 1) / gridDim.x);
  const int p0 = t0 * K;
  const int p1 = t1 * K;
  const int pairs = a.num_tokens * K;
  for (int e = tid; e < E; e += kThreads) total[e] = before[e] = 0;
  // The receive of this dispatch counts its owners from zero (it waits for owners_ready: in a fused
  // launch its blocks may get there before block 0 has run), and reads (as the combine does) the
  // mask this send used, whatever the live one becomes meanwhile.
  if (blockIdx.x == 0 && tid == 0) {
    a.routing[L.ws_num_owners] = 0;
    st_release_gpu(a.routing + L.ws_owners_ready, 1);
  }
  if (blockIdx.x == 0 && a.mask_snapshot != nullptr && tid < L.num_ranks) {
    a.mask_snapshot[tid] = a.mask != nullptr ? a.mask[tid] : 0;
  }
  __syncthreads();
  for (int p = tid; p < pairs; p += kThreads) {
    const int64_t e = __ldg(a.topk_idx + p);
    if (e < -1 || e >= E) bad_topk_entry("low_latency_dispatch", me, p, K, e, E);
    if (e < 0) continue;  // -1: no expert
    atomicAdd(&total[e], 1);
    if (p < p0) atomicAdd(&before[e], 1);
  }
  __syncthreads();
  // Statistics, and the flags of experts this rank sends nothing to (nothing to wait for).
  for (int e = blockIdx.x * kThreads + tid; e < E; e += gridDim.x * kThreads) {
    const int d = e / L.num_local;
    const bool masked = cut(a.mask, me, d);
    a.counts_e[e] = masked ? 0 : min(total[e], L.m);
    if (!masked && total[e] == 0) {
      int* flag = reinterpret_cast<int*>(buffer_of(a.peers, d, a.flags_offset) + L.off_dflags) +
                  (e % L.num_local) * L.num_ranks + me;
      st_relaxed_sys(flag, 1);
    }
  }
  for (int p = p0 + tid; p < p1; p += kThreads) {
    const int64_t e = __ldg(a.topk_idx + p);
    if (!valid_expert(e, E)) continue;
    int pos = before[e];
    for (int q = p0; q < p; ++q) pos += __ldg(a.topk_idx + q) == e ? 1 : 0;
    a.pair_pos[p] = pos;
  }
  __syncthreads();  // this block's pair positions are visible to the whole block
  trace_mark(a.trace, kTraceDispatchSend, 1);

  const int groups = L.hidden / kGroup;
  for (int t = t0; t < t1; ++t) {
    if (tid < K) {
      const int p = t * K + tid;
      const int64_t e = __ldg(a.topk_idx + p);
      int rank = -1;
      if (valid_expert(e, E)) {
        const int d = static_cast<int>(e / L.num_local);
        const int j = a.pair_pos[p];
        if (!cut(a.mask, me, d) && j < L.m) {  // beyond M rows of one source for one expert: dropped (see header)
          // The expert's slot j names the token; the token's message goes to its rank once.
          int* index = reinterpret_cast<int*>(buffer_of(a.peers, d, a.data_offset) + L.off_dindex);
          index[(static_cast<int64_t>(e % L.num_local) * L.num_ranks + me) * L.m + j] = t;
          rank = d;
          dst_expert[tid] = static_cast<int>(e % L.num_local);
          dst_slot[tid] = j;
        }
      }
      dst_rank[tid] = rank;
    }
    __syncthreads();
    if (tid < K) {
      const int d = dst_rank[tid];
      bool first = d >= 0;
      for (int k = 0; k < tid && first; ++k) first = dst_rank[k] != d;
      uint8_t* msg = nullptr;
      if (first) {
        msg = buffer_of(a.peers, d, a.data_offset) + L.off_dtokens + (static_cast<int64_t>(me) * L.m + t) * L.msg_bytes;
        // Meta: the token, then its (local expert, slot) pairs on d in k order (the combine's list).
        int* meta = reinterpret_cast<int*>(msg + L.off_src);
        int n = 0;
        for (int k = tid; k < K; ++k) {
          if (dst_rank[k] != d) continue;
          meta[2 + 2 * n] = dst_expert[k];
          meta[3 + 2 * n] = dst_slot[k];
          ++n;
        }
        meta[0] = t;
        meta[1] = n;
      }
      dst[tid] = msg;
    }
    __syncthreads();
    const __nv_bfloat16* row = static_cast<const __nv_bfloat16*>(a.x) + static_cast<int64_t>(t) * L.hidden;
    if (L.use_fp8) {
      // A half-warp casts one 128-column group (8 columns per lane), once for all destinations.
      const int half = lane / 16;
      const int hl = lane % 16;
      for (int gbase = warp * 2; gbase < groups; gbase += kWarps * 2) {
        const int g = gbase + half;
        const bool active = g < groups;
        float f[8];
        float amax = 0.0f;
        if (active) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + g * kGroup) + hl);
          const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            f[i] = __bfloat162float(v[i]);
            amax = fmaxf(amax, fabsf(f[i]));
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) f[i] = 0.0f;
        }
#pragma unroll
        for (int offset = 8; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullWarp, amax, offset));
        // amax / 448, floored, optionally rounded up to a power of two: moe_ep.comm.fp8's quantizer.
        float scale = fmaxf(amax, kAmaxFloor) / kFp8Max;
        if (a.round_scale) scale = pow2_ceil(scale);
        uint2 packed = make_uint2(0u, 0u);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float q = fminf(fmaxf(f[i] / scale, -kFp8Max), kFp8Max);
          const unsigned b = __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
          if (i < 4) packed.x |= b << (8 * i); else packed.y |= b << (8 * (i - 4));
        }
        if (!active) continue;
        if (a.staged_send) {
          uint8_t* staged = reinterpret_cast<uint8_t*>(stage);
          reinterpret_cast<uint2*>(staged + g * kGroup)[hl] = packed;
          if (hl == 0) reinterpret_cast<float*>(staged + L.off_scales)[g] = scale;
          continue;
        }
        for (int k = 0; k < K; ++k) {
          uint8_t* msg = dst[k];
          if (msg == nullptr) continue;
          reinterpret_cast<uint2*>(msg + g * kGroup)[hl] = packed;
          if (hl == 0) reinterpret_cast<float*>(msg + L.off_scales)[g] = scale;
        }
      }
      if (a.staged_send) {
        // Every thread stores 16-byte vectors of the staged message, all destinations at once.
        __syncthreads();
        const int vectors = static_cast<int>(L.off_src / 16);  // payload + scales (off_src is 16-aligned)
        for (int i = tid; i < K * vectors; i += kThreads) {
          uint8_t* msg = dst[i / vectors];
          if (msg != nullptr) reinterpret_cast<uint4*>(msg)[i % vectors] = stage[i % vectors];
        }
      }
    } else {
      const int64_t vectors = L.x_bytes / 16;  // hidden % 8 == 0 (make_layout)
      const uint4* src = reinterpret_cast<const uint4*>(row);
      for (int64_t v = tid; v < vectors; v += kThreads) {
        const uint4 value = __ldg(src + v);
        for (int k = 0; k < K; ++k) {
          if (dst[k] != nullptr) reinterpret_cast<uint4*>(dst[k])[v] = value;
        }
      }
    }
    __syncthreads();  // dst[] is rewritten for the next token
  }
  trace_mark(a.trace, kTraceDispatchSend, 2);

  // Publish: the block's stores are fenced; then each pair counts once, and the pair that completes
  // its expert's total releases the count (the expert's rows from every block before it).
  block_fence_system();
  for (int p = p0 + tid; p < p1; p += kThreads) {
    const int64_t e = __ldg(a.topk_idx + p);
    if (!valid_expert(e, E)) continue;
    const int d = static_cast<int>(e / L.num_local);
    if (cut(a.mask, me, d)) continue;
    if (atomicAdd(a.send_done + e, 1) + 1 == total[e]) {
      __threadfence_system();
      a.send_done[e] = 0;  // every pair of e has counted: ready for the next dispatch
      int* flag = reinterpret_cast<int*>(buffer_of(a.peers, d, a.flags_offset) + L.off_dflags) +
                  (e % L.num_local) * L.num_ranks + me;
      st_relaxed_sys(flag, min(total[e], L.m) + 1);  // after the fence above: a release
    }
  }
  __syncthreads();
  trace_mark(a.trace, kTraceDispatchSend, 3);
}

// Exclusive prefix sum of n <= 2 * kThreads ints, in place in shared memory (the whole block calls it).
__device__ void block_exclusive_scan(int* data, int n) {
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int a0 = 2 * tid < n ? data[2 * tid] : 0;
  const int a1 = 2 * tid + 1 < n ? data[2 * tid + 1] : 0;
  int inclusive = a0 + a1;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(kFullWarp, w, offset);
      if (lane >= offset) w += up;
    }
    if (lane < kWarps) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int exclusive = inclusive - (a0 + a1) + (warp > 0 ? warp_sums[warp - 1] : 0);
  if (2 * tid < n) data[2 * tid] = exclusive;
  if (2 * tid + 1 < n) data[2 * tid + 1] = exclusive + a0;
  __syncthreads();
}

constexpr int64_t kPieceBytes = 4096;
// Combine: a warp item covers kSlices x 256 columns of one token; the send keeps kRowBatch of its
// rows in flight per lane (kRowBatch x kSlices 16-byte loads), the receive every rank's partial sum.
constexpr int kSlices = 4;
constexpr int kRowBatch = 3;  // rows are copied in pieces of about this size, one per warp

// The largest i in [0, n) with prefix[i] <= value (prefix non-decreasing, prefix[0] <= value): the
// entry whose rows hold row `value` (entries without rows share their prefix with the next one).
__device__ __forceinline__ int find_entry(const int* prefix, int n, int value) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= value) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ----------------------------------------------------------------------------- dispatch recv
// Every block waits for all (expert, source) counts (polling its own memory), so each knows where
// every row goes; the rows of all experts are then spread, in pieces, over every warp of the grid.
// The last block past the waits resets the flags.
__device__ __forceinline__ void dispatch_recv(const DispatchArgs& a) {
  const LLLayout& L = a.layout;
  trace_mark(a.trace, kTraceDispatchRecv, 0);
  __shared__ int counts[kMaxExperts];  // [l][s]: rows of source s for local expert l
  __shared__ int first[kMaxExperts];   // [l][s]: their first row among all received rows ([l][s] order)
  __shared__ bool last;
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int E = L.num_experts;  // = num_local x R entries
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int64_t slots = static_cast<int64_t>(R) * L.m;
  uint8_t* own = buffer_of(a.peers, me, a.data_offset);
  uint8_t* own_flags = buffer_of(a.peers, me, a.flags_offset);
  int* flags = reinterpret_cast<int*>(own_flags + L.off_dflags);
  for (int i = tid; i < E; i += kThreads) {
    const int s = i % R;
    int count = 0;
    if (!cut(a.mask, me, s)) {
      const wait::WaitSite site{"low_latency_dispatch_recv", "dispatch_flag[expert][src]", me, s, a.timeout_ns};
      count = wait::wait_value<wait::Scope::kSys>(static_cast<const int*>(flags + i), 0, wait::Cmp::kNe, site) - 1;
      count = min(max(count, 0), L.m);  // a sender never publishes more than M
    }
    counts[i] = count;
    first[i] = count;
  }
  if (tid == kThreads - 1) {  // num_owners is zero (the send's block 0) before any owner is appended
    const wait::WaitSite site{"low_latency_dispatch_recv", "owners_ready", me, me, a.timeout_ns};
    wait::wait_value<wait::Scope::kGpu>(static_cast<const int*>(a.routing + L.ws_owners_ready), 0, wait::Cmp::kNe, site);
  }
  __syncthreads();
  trace_mark(a.trace, kTraceDispatchRecv, 1);
  if (tid == 0) {
    int* done = reinterpret_cast<int*>(own_flags + L.off_done) + 2;
    last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
  }
  const int last_count = counts[E - 1];
  block_exclusive_scan(first, E);  // syncs first: `last` is set
  if (last) {  // every block has read every flag: ready for this buffer's next dispatch
    for (int i = tid; i < E; i += kThreads) reinterpret_cast<volatile int*>(flags)[i] = 0;
    if (tid == 0) {
      reinterpret_cast<volatile int*>(own_flags + L.off_done)[2] = 0;
      reinterpret_cast<volatile int*>(a.routing)[L.ws_owners_ready] = 0;
    }
  }
  const int rows = first[E - 1] + last_count;
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  // layout_range, recv_count and statistics: entry i = (l, s) belongs to one thread of the grid.
  for (int64_t i = gtid; i < E; i += grid_threads) {
    const int l = static_cast<int>(i / R);
    const int s = static_cast<int>(i % R);
    const int expert_first = first[l * R];
    a.layout_range[i] = (static_cast<int64_t>(first[i] - expert_first) << 32) | counts[i];
    if (s == 0) {
      const int expert_end = l + 1 < L.num_local ? first[(l + 1) * R] : rows;
      a.recv_count[l] = expert_end - expert_first;
      if (a.cumulative_stats != nullptr) a.cumulative_stats[l] += expert_end - expert_first;
    }
  }
  // Slots past an expert's rows: src_info -1.
  for (int64_t q = gtid; q < static_cast<int64_t>(L.num_local) * slots; q += grid_threads) {
    const int l = static_cast<int>(q / slots);
    const int expert_end = l + 1 < L.num_local ? first[(l + 1) * R] : rows;
    if (q % slots >= expert_end - first[l * R]) a.src_info[q] = -1;
  }
  trace_mark(a.trace, kTraceDispatchRecv, 2);
  const int groups = L.hidden / kGroup;
  const int64_t pieces = (L.x_bytes + kPieceBytes - 1) / kPieceBytes;
  const int64_t piece_bytes = align16((L.x_bytes + pieces - 1) / pieces);
  const int64_t warp = gtid / 32;
  const int64_t num_warps = grid_threads / 32;
  for (int64_t item = warp; item < rows * pieces; item += num_warps) {
    const int r = static_cast<int>(item / pieces);
    const int64_t piece = item % pieces;
    const int i = find_entry(first, E, r);
    const int l = i / R;
    const int s = i % R;
    const int j = r - first[i];
    const int idx = r - first[l * R];
    const int token = __ldcg(reinterpret_cast<const int*>(own + L.off_dindex) + (static_cast<int64_t>(l) * R + s) * L.m + j);
    const uint8_t* msg = own + L.off_dtokens + (static_cast<int64_t>(s) * L.m + token) * L.msg_bytes;
    if (piece == 0) {
      // This row's place q in its token's list here: the list (rows in k order), and the owners.
      const int* meta = reinterpret_cast<const int*>(msg + L.off_src);
      const int n = __ldcg(meta + 1);
      const bool match = lane < n && __ldcg(meta + 2 + 2 * lane) == l && __ldcg(meta + 3 + 2 * lane) == j;
      const unsigned hits = __ballot_sync(kFullWarp, match);
      if (lane == 0 && hits != 0) {
        const int q = __ffs(hits) - 1;
        const int64_t pair = static_cast<int64_t>(s) * L.m + token;
        a.routing[L.ws_token_rows + pair * L.num_topk + q] = static_cast<int>(static_cast<int64_t>(l) * slots + idx);
        // Where the source stores this row's weight at combine ((l, s, j), as the combine's phase 1).
        a.routing[L.ws_token_wslots + pair * L.num_topk + q] = (l * R + s) * L.m + j;
        if (q == 0) {
          a.routing[L.ws_token_count + pair] = n;
          a.routing[L.ws_owners + atomicAdd(a.routing + L.ws_num_owners, 1)] = static_cast<int>(pair);
        }
      }
    }
    const int64_t row = static_cast<int64_t>(l) * slots + idx;
    const int64_t begin = piece * piece_bytes;
    warp_copy(static_cast<uint8_t*>(a.recv_x) + row * L.x_bytes + begin, msg + begin,
              min(piece_bytes, L.x_bytes - begin), lane);
    if (piece != 0) continue;
    if (L.use_fp8) {
      const float* scales = reinterpret_cast<const float*>(msg + L.off_scales);
      if (a.use_ue8m0) {
        // Scales [L, G/4, slots] int32: group 4w+i's exponent byte in byte i of word w.
        for (int w = lane; w < groups / 4; w += 32) {
          unsigned word = 0;
          for (int b = 0; b < 4; ++b) word |= ((__float_as_uint(scales[4 * w + b]) >> 23) & 0xFFu) << (8 * b);
          static_cast<int*>(a.recv_scales)[(static_cast<int64_t>(l) * (groups / 4) + w) * slots + idx] =
              static_cast<int>(word);
        }
      } else {
        for (int g = lane; g < groups; g += 32) {
          static_cast<float*>(a.recv_scales)[(static_cast<int64_t>(l) * groups + g) * slots + idx] = scales[g];
        }
      }
    }
    if (lane == 0) a.src_info[row] = token;
  }
  __syncthreads();
  trace_mark(a.trace, kTraceDispatchRecv, 3);
}

__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(DispatchArgs a) { dispatch_send(a); }
__global__ void __launch_bounds__(kThreads) dispatch_recv_kernel(DispatchArgs a) { dispatch_recv(a); }
// Both halves in one launch: the receive half reads the live mask, which is the one the send half used.
__global__ void __launch_bounds__(kThreads) dispatch_kernel(DispatchArgs a) {
  dispatch_send(a);
  dispatch_recv(a);
}

// ------------------------------------------------------------------------------ combine send
// A pair (t, k) of this rank's tokens, as the combine sees it: the rank d its expert lives on, or
// -1 when it has no row (id -1, a cut rank, or dropped at dispatch). A bad id traps with a message.
__device__ __forceinline__ int pair_rank(const CombineArgs& a, int64_t p, int me) {
  const LLLayout& L = a.layout;
  const int64_t e = a.topk_idx[p];
  if (e < -1 || e >= L.num_experts) bad_topk_entry("low_latency_combine", me, p, L.num_topk, e, L.num_experts);
  if (e < 0) return -1;
  const int d = static_cast<int>(e / L.num_local);
  if (cut(a.mask, me, d) || a.pair_pos[p] >= L.m) return -1;
  return d;
}

// Two phases. As a source, this rank stores its tokens' top-k weights into every expert rank's
// weight area (4 bytes per row) and raises a weight flag there (block 0). As an expert rank,
// once every source's weights are in, one warp per (owner, kSlices x 256 columns) sums weight x expert output
// over the owner's rows here in k order, in float32, and stores that partial sum into the owner's
// source at [this rank][token]: a token crosses back once per rank, not once per expert. The last
// block to finish publishes "all partial sums are back" to every source.
__device__ __forceinline__ void combine_send(const CombineArgs& a) {
  const LLLayout& L = a.layout;
  trace_mark(a.trace, kTraceCombineSend, 0);
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int K = L.num_topk;
  const int M = L.m;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int64_t slots = static_cast<int64_t>(R) * M;
  uint8_t* own = buffer_of(a.peers, me, a.data_offset);
  uint8_t* own_flags = buffer_of(a.peers, me, a.flags_offset);
  int* done = reinterpret_cast<int*>(own_flags + L.off_done);
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * kThreads + tid;

  // Phase 1, block 0 alone (T x K 4-byte stores; no other block has to finish first, so a grid
  // that is not all resident at once still progresses): the weights of this rank's rows, into
  // their expert ranks, then a weight flag at each.
  __shared__ bool last;
  if (blockIdx.x == 0) {
    for (int64_t p = tid; p < static_cast<int64_t>(a.num_tokens) * K; p += kThreads) {
      const int d = pair_rank(a, p, me);
      if (d < 0) continue;
      const int64_t e = a.topk_idx[p];
      float* weights = reinterpret_cast<float*>(buffer_of(a.peers, d, a.data_offset) + L.off_cweights);
      weights[((e % L.num_local) * R + me) * M + a.pair_pos[p]] = a.topk_weights[p];
    }
    block_fence_system();
    if (tid < R && !cut(a.mask, me, tid)) {
      st_release_sys(reinterpret_cast<int*>(buffer_of(a.peers, tid, a.flags_offset) + L.off_wflags) + me, 1);
    }
  }
  trace_mark(a.trace, kTraceCombineSend, 1);

  // Phase 2: every source's weights are here, then the partial sums go back.
  if (tid < R && !cut(a.mask, me, tid)) {
    const wait::WaitSite site{"low_latency_combine_send", "weight_flag[src]", me, tid, a.timeout_ns};
    wait::wait_value<wait::Scope::kSys>(reinterpret_cast<const int*>(own_flags + L.off_wflags) + tid, 0,
                                        wait::Cmp::kNe, site);
  }
  __syncthreads();
  trace_mark(a.trace, kTraceCombineSend, 2);
  const int num_owners = *reinterpret_cast<const volatile int*>(a.routing + L.ws_num_owners);
  // An item is (owner, kSlices x 256 columns): the owner's rows and weights are looked up once per
  // item (lane q holds row q), then kRowBatch rows x kSlices vectors per lane are in flight at once.
  const int slices = (L.hidden + 255) / 256;  // 32 lanes x 8 columns
  const int groups = (slices + kSlices - 1) / kSlices;
  const int64_t items = static_cast<int64_t>(num_owners) * groups;
  const int64_t warp = gtid / 32;
  const int64_t num_warps = grid_threads / 32;
  const auto* weights = reinterpret_cast<const float*>(own + L.off_cweights);
  const auto* x = static_cast<const __nv_bfloat16*>(a.x);
  for (int64_t item = warp; item < items; item += num_warps) {
    const int owner = a.routing[L.ws_owners + item / groups];
    const int64_t col0 = (item % groups) * kSlices * 256 + lane * 8;
    const int s = owner / M;
    const int t = owner % M;
    const int n = a.routing[L.ws_token_count + owner];
    // Lane q < K: the owner's row q here and where its weight is (entries past n are stale).
    int my_row = 0;
    int my_wslot = 0;
    if (lane < K) {
      my_row = a.routing[L.ws_token_rows + static_cast<int64_t>(owner) * K + lane];
      my_wslot = a.routing[L.ws_token_wslots + static_cast<int64_t>(owner) * K + lane];
    }
    const float my_w = lane < n ? __ldcg(weights + my_wslot) : 0.0f;
    float acc[kSlices][8];
#pragma unroll
    for (int v = 0; v < kSlices; ++v) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[v][i] = 0.0f;
    }
    for (int q0 = 0; q0 < n; q0 += kRowBatch) {  // n <= K <= 32; the sum keeps the k order
      uint4 raw[kRowBatch][kSlices];
      float w[kRowBatch];
#pragma unroll
      for (int u = 0; u < kRowBatch; ++u) {
        const int q = q0 + u;
        const int row = __shfl_sync(kFullWarp, my_row, q & 31);
        w[u] = __shfl_sync(kFullWarp, my_w, q & 31);
#pragma unroll
        for (int v = 0; v < kSlices; ++v) {
          const int64_t col = col0 + v * 256;
          raw[u][v] = q < n && col < L.hidden
                          ? *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row) * L.hidden + col)
                          : make_uint4(0u, 0u, 0u, 0u);
        }
      }
#pragma unroll
      for (int u = 0; u < kRowBatch; ++u) {
        if (q0 + u >= n) break;
#pragma unroll
        for (int v = 0; v < kSlices; ++v) {
          const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw[u][v]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[v][i] += w[u] * __bfloat162float(h[i]);
        }
      }
    }
    float* dst_row = reinterpret_cast<float*>(buffer_of(a.peers, s, a.data_offset) + L.off_carea) +
                     (static_cast<int64_t>(me) * M + t) * L.hidden;
#pragma unroll
    for (int v = 0; v < kSlices; ++v) {
      const int64_t col = col0 + v * 256;
      if (col >= L.hidden) break;  // hidden % 8 == 0: a lane's 8 columns are all in or all out
      float4* dst = reinterpret_cast<float4*>(dst_row + col);
      dst[0] = make_float4(acc[v][0], acc[v][1], acc[v][2], acc[v][3]);
      dst[1] = make_float4(acc[v][4], acc[v][5], acc[v][6], acc[v][7]);
    }
  }
  // The last block to finish publishes "all partial sums are back" to every source, and clears
  // the weight flags every block has waited for.
  __syncthreads();
  trace_mark(a.trace, kTraceCombineSend, 3);
  block_fence_system();
  if (tid == 0) last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (last && tid < R) {
    const int src = tid;
    reinterpret_cast<volatile int*>(own_flags + L.off_wflags)[src] = 0;
    __threadfence_system();
    if (!cut(a.mask, me, src)) {
      int* flag = reinterpret_cast<int*>(buffer_of(a.peers, src, a.flags_offset) + L.off_cflags) + me;
      st_release_sys(flag, 1);
    }
  }
  if (last && tid == 0) done[0] = 0;
  __syncthreads();
  trace_mark(a.trace, kTraceCombineSend, 4);
}

// ------------------------------------------------------------------------------ combine recv
// Waits for every rank's flag, then one warp per (token, kSlices x 256 columns) sums the partial
// sums of the ranks the token went to, in rank order, in float32, and casts; the last block resets
// the flags.
__device__ __forceinline__ void combine_recv(const CombineArgs& a) {
  const LLLayout& L = a.layout;
  trace_mark(a.trace, kTraceCombineRecv, 0);
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int K = L.num_topk;
  const int lane = threadIdx.x % 32;
  uint8_t* own = buffer_of(a.peers, me, a.data_offset);
  uint8_t* own_flags = buffer_of(a.peers, me, a.flags_offset);
  if (threadIdx.x < R && !cut(a.mask, me, threadIdx.x)) {
    const int d = threadIdx.x;
    const wait::WaitSite site{"low_latency_combine_recv", "combine_flag[src]", me, d, a.timeout_ns};
    wait::wait_value<wait::Scope::kSys>(reinterpret_cast<const int*>(own_flags + L.off_cflags) + d, 0, wait::Cmp::kNe,
                                        site);
  }
  __syncthreads();
  trace_mark(a.trace, kTraceCombineRecv, 1);
  const int slices = (L.hidden + 255) / 256;
  const int groups = (slices + kSlices - 1) / kSlices;
  const int64_t items = static_cast<int64_t>(a.num_tokens) * groups;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const auto* area = reinterpret_cast<const float*>(own + L.off_carea);
  auto* out = static_cast<__nv_bfloat16*>(a.out);
  for (int64_t item = warp; item < items; item += num_warps) {
    const int64_t t = item / groups;
    const int64_t col0 = (item % groups) * kSlices * 256 + lane * 8;
    // The ranks this token has rows on (lane k looks at entry k), as a bit mask: two warp OR
    // reductions (ranks 0-31, 32-63) per 32 entries.
    unsigned long long ranks = 0;
    for (int k0 = 0; k0 < K; k0 += 32) {
      const int d = k0 + lane < K ? pair_rank(a, t * K + k0 + lane, me) : -1;
      const unsigned long long bit = d >= 0 ? 1ull << d : 0ull;
      const unsigned lo = __reduce_or_sync(kFullWarp, static_cast<unsigned>(bit));
      const unsigned hi = __reduce_or_sync(kFullWarp, static_cast<unsigned>(bit >> 32));
      ranks |= (static_cast<unsigned long long>(hi) << 32) | lo;
    }
    float acc[kSlices][8];
#pragma unroll
    for (int v = 0; v < kSlices; ++v) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[v][i] = 0.0f;
    }
    for (unsigned long long m = ranks; m != 0; m &= m - 1) {  // ranks in order
      const int d = __ffsll(static_cast<long long>(m)) - 1;
      const float* src = area + (static_cast<int64_t>(d) * L.m + t) * L.hidden;
      float4 part[kSlices][2];
#pragma unroll
      for (int v = 0; v < kSlices; ++v) {
        const int64_t col = col0 + v * 256;
        const bool in = col < L.hidden;
        part[v][0] = in ? __ldcg(reinterpret_cast<const float4*>(src + col)) : make_float4(0.f, 0.f, 0.f, 0.f);
        part[v][1] = in ? __ldcg(reinterpret_cast<const float4*>(src + col) + 1) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int v = 0; v < kSlices; ++v) {
        acc[v][0] += part[v][0].x; acc[v][1] += part[v][0].y; acc[v][2] += part[v][0].z; acc[v][3] += part[v][0].w;
        acc[v][4] += part[v][1].x; acc[v][5] += part[v][1].y; acc[v][6] += part[v][1].z; acc[v][7] += part[v][1].w;
      }
    }
#pragma unroll
    for (int v = 0; v < kSlices; ++v) {
      const int64_t col = col0 + v * 256;
      if (col >= L.hidden) break;  // hidden % 8 == 0: a lane's 8 columns are all in or all out
      uint4 packed;
      __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = __float2bfloat16_rn(acc[v][i]);
      *reinterpret_cast<uint4*>(out + t * L.hidden + col) = packed;
    }
  }
  // The last block resets the flags every block has waited for.
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    int* done = reinterpret_cast<int*>(own_flags + L.off_done) + 1;
    last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (last && threadIdx.x < R) reinterpret_cast<volatile int*>(own_flags + L.off_cflags)[threadIdx.x] = 0;
  if (last && threadIdx.x == 0) reinterpret_cast<int*>(own_flags + L.off_done)[1] = 0;
  trace_mark(a.trace, kTraceCombineRecv, 2);
}

__global__ void __launch_bounds__(kThreads) combine_send_kernel(CombineArgs a) { combine_send(a); }
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(CombineArgs a) { combine_recv(a); }
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs a) {
  combine_send(a);
  combine_recv(a);
}

int grid_for(int work, int per_block, int num_sms) {
  int blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  return blocks < num_sms ? blocks : (num_sms < 1 ? 1 : num_sms);
}

void check_layout(const LLLayout& layout, const Peers& peers) {
  if (peers.bases == nullptr) throw std::invalid_argument("moe_ep low_latency: the buffer's peers are not open");
  if (layout.num_ranks != peers.num_ranks) throw std::invalid_argument("moe_ep low_latency: layout and peers disagree");
}

}  // namespace

LLLayout make_layout(int num_ranks, int num_experts, int m, int hidden, int num_topk, bool use_fp8) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::invalid_argument("moe_ep low_latency: num_ranks must be in [1, 64], got " + std::to_string(num_ranks));
  }
  if (num_experts < num_ranks || num_experts % num_ranks != 0 || num_experts > kMaxExperts) {
    throw std::invalid_argument("moe_ep low_latency: num_experts must be a multiple of num_ranks, at most " +
                                std::to_string(kMaxExperts) + ", got " + std::to_string(num_experts));
  }
  if (m < 1 || hidden < 1) throw std::invalid_argument("moe_ep low_latency: M and hidden must be >= 1");
  if (num_topk < 1 || num_topk > kMaxTopk) {
    throw std::invalid_argument("moe_ep low_latency: top-k (topk_idx.size(1)) must be in [1, " + std::to_string(kMaxTopk) +
                                "], got " + std::to_string(num_topk));
  }
  if (hidden % 8 != 0) throw std::invalid_argument("moe_ep low_latency: hidden must be a multiple of 8, got " + std::to_string(hidden));
  if (use_fp8 && hidden % kGroup != 0) {
    throw std::invalid_argument("moe_ep low_latency: hidden must be a multiple of 128 for FP8, got " + std::to_string(hidden));
  }
  LLLayout l;
  l.num_ranks = num_ranks;
  l.num_experts = num_experts;
  l.num_local = num_experts / num_ranks;
  l.m = m;
  l.hidden = hidden;
  l.num_topk = num_topk;
  l.use_fp8 = use_fp8;
  l.x_bytes = use_fp8 ? hidden : static_cast<int64_t>(hidden) * 2;
  l.off_scales = align16(l.x_bytes);
  l.off_src = l.off_scales + (use_fp8 ? align16(static_cast<int64_t>(hidden / kGroup) * 4) : 0);
  l.msg_bytes = l.off_src + align16((2 + 2 * static_cast<int64_t>(num_topk)) * 4);
  // Flags sit at offsets that do not depend on the sizes (see the header), data after them.
  l.off_dflags = 0;
  l.off_cflags = static_cast<int64_t>(kMaxExperts) * 4;
  l.off_wflags = l.off_cflags + static_cast<int64_t>(kMaxRanks) * 4;
  l.off_done = l.off_wflags + static_cast<int64_t>(kMaxRanks) * 4;
  l.off_dindex = 0;
  const int64_t dindex = static_cast<int64_t>(l.num_local) * num_ranks * m * 4;
  l.off_dtokens = (dindex + 127) / 128 * 128;
  const int64_t dtokens = static_cast<int64_t>(num_ranks) * m * l.msg_bytes;
  l.off_cweights = (l.off_dtokens + dtokens + 127) / 128 * 128;
  const int64_t cweights = static_cast<int64_t>(l.num_local) * num_ranks * m * 4;
  l.off_carea = (l.off_cweights + cweights + 127) / 128 * 128;
  const int64_t carea = static_cast<int64_t>(num_ranks) * m * hidden * 4;
  l.buffer_bytes = (l.off_carea + carea + 127) / 128 * 128;
  const int64_t slots = static_cast<int64_t>(num_ranks) * m;
  l.ws_token_rows = 0;
  l.ws_token_wslots = l.ws_token_rows + slots * num_topk;
  l.ws_token_count = l.ws_token_wslots + slots * num_topk;
  l.ws_owners = l.ws_token_count + slots;
  l.ws_num_owners = l.ws_owners + slots;
  l.ws_owners_ready = l.ws_num_owners + 1;
  l.ws_ints = l.ws_owners_ready + 1;
  return l;
}

uint64_t timeout_ns_from_env() { return wait::timeout_ns_from_env(); }

// MOE_EP_LL_SEND = "direct" (default: each half-warp stores its 8 FP8 bytes to every destination)
// or "staged" (the token is cast into shared memory, then every thread stores 16-byte vectors),
// read at every launch so a benchmark can compare them. BF16 rows always go as 16-byte vectors.
bool staged_send_from_env() {
  const char* raw = std::getenv("MOE_EP_LL_SEND");
  if (raw == nullptr || *raw == '\0' || std::string(raw) == "direct") return false;
  if (std::string(raw) == "staged") return true;
  throw std::invalid_argument(std::string("moe_ep: MOE_EP_LL_SEND must be 'direct' or 'staged', got '") + raw + "'");
}

// With the send's 8 KB of histograms and the receive's 8 KB of counts (a fused launch has both): under
// the 48 KB of static + dynamic shared memory a launch gets without opting in.
constexpr int64_t kMaxStageBytes = 24 << 10;

// The send's token check and its staged-send choice (both launches that run the send half).
DispatchArgs checked_send_args(const DispatchArgs& args, size_t* stage_bytes) {
  check_layout(args.layout, args.peers);
  if (args.num_tokens < 0 || args.num_tokens > args.layout.m) {  // a token's message slot is its index
    throw std::invalid_argument("moe_ep low_latency: x has " + std::to_string(args.num_tokens) +
                                " tokens, more than num_max_dispatch_tokens_per_rank=" + std::to_string(args.layout.m));
  }
  DispatchArgs a = args;
  a.staged_send = args.layout.use_fp8 && args.layout.off_src <= kMaxStageBytes && staged_send_from_env();
  *stage_bytes = a.staged_send ? static_cast<size_t>(args.layout.off_src) : 0;
  return a;
}

int grid_of(int num_sms) { return num_sms < 1 ? 1 : num_sms; }

void launch_dispatch_send(const DispatchArgs& args, int num_sms, cudaStream_t stream) {
  size_t stage_bytes = 0;
  const DispatchArgs a = checked_send_args(args, &stage_bytes);
  dispatch_send_kernel<<<grid_for(args.num_tokens, 1, num_sms), kThreads, stage_bytes, stream>>>(a);
  cuda_check(cudaGetLastError(), "low_latency dispatch_send_kernel launch");
}

void launch_dispatch_recv(const DispatchArgs& recv_args, int num_sms, cudaStream_t stream) {
  check_layout(recv_args.layout, recv_args.peers);
  // Where the rows go is known on the device only: every SM takes a share.
  dispatch_recv_kernel<<<grid_of(num_sms), kThreads, 0, stream>>>(recv_args);
  cuda_check(cudaGetLastError(), "low_latency dispatch_recv_kernel launch");
}

void launch_dispatch(const DispatchArgs& args, int num_sms, cudaStream_t stream) {
  size_t stage_bytes = 0;
  const DispatchArgs a = checked_send_args(args, &stage_bytes);
  dispatch_kernel<<<grid_of(num_sms), kThreads, stage_bytes, stream>>>(a);
  cuda_check(cudaGetLastError(), "low_latency dispatch_kernel launch");
}

void launch_combine_send(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  // The rows each expert received are known on the device only: every SM takes a share.
  combine_send_kernel<<<grid_of(num_sms), kThreads, 0, stream>>>(args);
  cuda_check(cudaGetLastError(), "low_latency combine_send_kernel launch");
}

void launch_combine_recv(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  const int slices = (args.layout.hidden + 255) / 256;
  const int groups = (slices + kSlices - 1) / kSlices;
  combine_recv_kernel<<<grid_for(args.num_tokens * groups, kWarps, num_sms), kThreads, 0, stream>>>(args);
  cuda_check(cudaGetLastError(), "low_latency combine_recv_kernel launch");
}

void launch_combine(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  combine_kernel<<<grid_of(num_sms), kThreads, 0, stream>>>(args);
  cuda_check(cudaGetLastError(), "low_latency combine_kernel launch");
}

}  // namespace low_latency
}  // namespace moe_ep
