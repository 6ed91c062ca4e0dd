// Kernel family "intranode": normal dispatch and combine over NVLink (see intranode.h for the
// design and the buffer layout). Every copy loop is warp-cooperative: a warp owns a row and its
// lanes move 16-byte vectors (narrower ones when a row is not 16-byte aligned), several vectors in
// flight per lane, so a few SMs keep enough bytes in flight to fill the links.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "bounded_wait.cuh"
#include "device_copy.cuh"
#include "intranode.h"
#include "runtime.h"

namespace moe_ep {
namespace intranode {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kNotifyThreads = 512;
constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ uint8_t* region_of(const Peers& peers, int rank) {
  return static_cast<uint8_t*>(peers.bases[rank]) + peers.region_offset;
}

using copy::align16;
using copy::warp_copy;
using copy::warp_zero;

// The rows a rank receives, grouped by source rank, cut into chunks of `rows` (<= 32: a lane per
// row looks up its token) rows, one chunk per warp step. Smaller chunks spread a call over more
// warps (32-row chunks leave warps idle when rows / 32 < the warps of the grid).
struct ChunkMap {
  int start[kMaxRanks];
  int count[kMaxRanks];
  int chunk_begin[kMaxRanks + 1];
  int rows;
};

__device__ __forceinline__ void build_chunk_map(ChunkMap& map, const int* rank_prefix_matrix, int rank, int num_ranks,
                                                int chunk_rows) {
  if (threadIdx.x == 0) {
    int chunks = 0;
    map.rows = chunk_rows;
    for (int s = 0; s < num_ranks; ++s) {
      const int begin = s == 0 ? 0 : rank_prefix_matrix[(s - 1) * num_ranks + rank];
      const int end = rank_prefix_matrix[s * num_ranks + rank];
      map.start[s] = begin;
      map.count[s] = end - begin;
      map.chunk_begin[s] = chunks;
      chunks += (end - begin + chunk_rows - 1) / chunk_rows;
    }
    map.chunk_begin[num_ranks] = chunks;
  }
  __syncthreads();
}

__device__ __forceinline__ int chunk_source(const ChunkMap& map, int chunk, int num_ranks) {
  int s = 0;
  while (s + 1 < num_ranks && map.chunk_begin[s + 1] <= chunk) ++s;
  return s;
}

// ------------------------------------------------------------------------------------- stage
__global__ void __launch_bounds__(kThreads)
stage_kernel(Peers peers, RowLayout layout, int64_t num_tokens, const uint8_t* __restrict__ x,
             const uint8_t* __restrict__ scales, const int64_t* __restrict__ topk_idx,
             const float* __restrict__ topk_weights, bool write_routing, const int* __restrict__ send_slot,
             const int* __restrict__ send_counts, const int* __restrict__ expert_counts, int num_experts,
             long long overflow) {
  uint8_t* region = region_of(peers, peers.rank);
  uint8_t* rows = region + kControlBytes;
  int* lists = reinterpret_cast<int*>(rows + align16(num_tokens * layout.stride));
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int K = layout.num_topk;
  for (int64_t t = warp; t < num_tokens && overflow == 0; t += num_warps) {
    uint8_t* row = rows + t * layout.stride;
    warp_copy(row, x + t * layout.x_bytes, layout.x_bytes, lane);
    if (layout.scale_bytes > 0) warp_copy(row + layout.off_scales, scales + t * layout.scale_bytes, layout.scale_bytes, lane);
    for (int k = lane; k < K; k += 32) {
      reinterpret_cast<int64_t*>(row + layout.off_idx)[k] = topk_idx[t * K + k];
      reinterpret_cast<float*>(row + layout.off_weights)[k] = topk_weights[t * K + k];
    }
    if (write_routing) {
      for (int r = lane; r < peers.num_ranks; r += 32) {
        const int slot = send_slot[t * peers.num_ranks + r];
        if (slot >= 0) lists[static_cast<int64_t>(r) * num_tokens + slot] = static_cast<int>(t);
      }
    }
  }
  if (write_routing && blockIdx.x == 0) {
    auto* control = reinterpret_cast<Control*>(region);
    if (threadIdx.x == 0) {
      control->num_tokens = static_cast<int>(num_tokens);
      control->overflow = overflow;
    }
    for (int r = threadIdx.x; r < peers.num_ranks; r += kThreads) control->send_counts[r] = send_counts[r];
    for (int e = threadIdx.x; e < num_experts; e += kThreads) control->expert_counts[e] = expert_counts[e];
  }
}

// ------------------------------------------------------------------------------------ notify
__global__ void __launch_bounds__(kNotifyThreads)
notify_kernel(Peers peers, int num_experts, int expert_alignment, int num_worst_tokens, int* rank_prefix_matrix,
              int* peer_tokens, HostRecordView* record, long long epoch) {
  __shared__ int matrix[kMaxRanks * kMaxRanks];
  __shared__ int tokens[kMaxRanks];
  const int R = peers.num_ranks;
  const int me = peers.rank;
  for (int i = threadIdx.x; i < R * R; i += kNotifyThreads) {
    const auto* control = reinterpret_cast<const Control*>(region_of(peers, i / R));
    matrix[i] = __ldcg(&control->send_counts[i % R]);
  }
  __shared__ long long overflow[kMaxRanks];
  for (int s = threadIdx.x; s < R; s += kNotifyThreads) {
    const auto* control = reinterpret_cast<const Control*>(region_of(peers, s));
    tokens[s] = __ldcg(&control->num_tokens);
    overflow[s] = __ldcg(&control->overflow);
  }
  __syncthreads();
  long long worst_overflow = 0;
  int overflow_rank = -1;
  for (int s = 0; s < R; ++s) {
    if (overflow[s] > worst_overflow) {
      worst_overflow = overflow[s];
      overflow_rank = s;
    }
  }
  for (int d = threadIdx.x; d < R; d += kNotifyThreads) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      acc += matrix[s * R + d];
      rank_prefix_matrix[s * R + d] = acc;
    }
  }
  for (int s = threadIdx.x; s < R; s += kNotifyThreads) peer_tokens[s] = tokens[s];
  int num_recv = 0;
  for (int s = 0; s < R; ++s) num_recv += matrix[s * R + me];
  if (num_worst_tokens > 0) {
    if (worst_overflow > 0 && threadIdx.x == 0) {
      printf("moe_ep intranode dispatch: rank %d's dispatch needs %lld bytes of num_nvl_bytes, more than its buffer "
             "holds; raise num_nvl_bytes (rank %d stops here)\n", overflow_rank, worst_overflow, me);
      __trap();
    }
    if (num_recv > num_worst_tokens && threadIdx.x == 0) {
      printf("moe_ep intranode dispatch: rank %d receives %d tokens but num_worst_tokens=%d; raise num_worst_tokens\n",
             me, num_recv, num_worst_tokens);
      __trap();
    }
    return;
  }
  const int local = num_experts / R;
  for (int e = threadIdx.x; e < local; e += kNotifyThreads) {
    int sum = 0;
    for (int s = 0; s < R; ++s) {
      sum += __ldcg(&reinterpret_cast<const Control*>(region_of(peers, s))->expert_counts[me * local + e]);
    }
    record->counts[e] = (sum + expert_alignment - 1) / expert_alignment * expert_alignment;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int max_tokens = 0;
    for (int s = 0; s < R; ++s) max_tokens = max(max_tokens, tokens[s]);
    record->num_recv = num_recv;
    record->max_tokens = max_tokens;
    record->overflow_bytes = worst_overflow;
    record->overflow_rank = overflow_rank;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // every field above before the epoch the host polls
    *reinterpret_cast<volatile long long*>(&record->epoch) = epoch;
    __threadfence_system();
  }
}

// -------------------------------------------------------------------------------------- pull
template <int U>
__global__ void __launch_bounds__(kThreads)
pull_kernel(Peers peers, RowLayout layout, const int* __restrict__ rank_prefix_matrix,
            const int* __restrict__ peer_tokens, bool cached, int* recv_src_idx, uint8_t* __restrict__ recv_x,
            uint8_t* __restrict__ recv_scales, int64_t* __restrict__ recv_topk_idx,
            float* __restrict__ recv_topk_weights, int64_t num_rows, int num_local_experts, int chunk_rows) {
  __shared__ ChunkMap map;
  const int R = peers.num_ranks;
  const int me = peers.rank;
  build_chunk_map(map, rank_prefix_matrix, me, R, chunk_rows);
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  const int K = layout.num_topk;
  const int64_t first_expert = static_cast<int64_t>(me) * num_local_experts;
  const int total_chunks = map.chunk_begin[R];
  for (int c = warp; c < total_chunks; c += num_warps) {
    const int s = chunk_source(map, c, R);
    const int j0 = (c - map.chunk_begin[s]) * map.rows;
    const int n = min(map.rows, map.count[s] - j0);
    const int64_t row0 = map.start[s] + j0;
    const uint8_t* src_region = region_of(peers, s);
    const uint8_t* src_rows = src_region + kControlBytes;
    int token = 0;
    if (lane < n) {
      if (cached) {
        token = recv_src_idx[row0 + lane];
      } else {
        const int64_t src_tokens = peer_tokens[s];
        const int* lists = reinterpret_cast<const int*>(src_rows + align16(src_tokens * layout.stride));
        token = __ldcg(lists + static_cast<int64_t>(me) * src_tokens + j0 + lane);
        recv_src_idx[row0 + lane] = token;
      }
    }
    for (int i = 0; i < n; ++i) {
      const int t = __shfl_sync(kFullWarp, token, i);
      const int64_t row = row0 + i;
      const uint8_t* src = src_rows + static_cast<int64_t>(t) * layout.stride;
      // The first 32 top-k entries are loaded before the row, so their latency hides behind it.
      int64_t id0 = 0;
      float w0 = 0.0f;
      if (lane < K) {
        id0 = __ldcg(reinterpret_cast<const long long*>(src + layout.off_idx) + lane);
        w0 = __ldcg(reinterpret_cast<const float*>(src + layout.off_weights) + lane);
      }
      warp_copy<U>(recv_x + row * layout.x_bytes, src, layout.x_bytes, lane);
      if (layout.scale_bytes > 0) {
        warp_copy<U>(recv_scales + row * layout.scale_bytes, src + layout.off_scales, layout.scale_bytes, lane);
      }
      for (int k = lane; k < K; k += 32) {
        const int64_t id = k < 32 ? id0 : __ldcg(reinterpret_cast<const long long*>(src + layout.off_idx) + k);
        const float w = k < 32 ? w0 : __ldcg(reinterpret_cast<const float*>(src + layout.off_weights) + k);
        const bool mine = id >= first_expert && id < first_expert + num_local_experts;
        recv_topk_idx[row * K + k] = mine ? id - first_expert : -1;
        recv_topk_weights[row * K + k] = mine ? w : 0.0f;
      }
    }
  }
  // num_worst_tokens mode: rows past the received ones are padding (zeros, ids -1, source 0).
  const int64_t num_recv = rank_prefix_matrix[(R - 1) * R + me];
  for (int64_t row = num_recv + warp; row < num_rows; row += num_warps) {
    warp_zero(recv_x + row * layout.x_bytes, layout.x_bytes, lane);
    if (layout.scale_bytes > 0) warp_zero(recv_scales + row * layout.scale_bytes, layout.scale_bytes, lane);
    for (int k = lane; k < K; k += 32) {
      recv_topk_idx[row * K + k] = -1;
      recv_topk_weights[row * K + k] = 0.0f;
    }
    if (!cached && lane == 0) recv_src_idx[row] = 0;
  }
}

// -------------------------------------------------------------------------------------- push
template <int U>
__global__ void __launch_bounds__(kThreads)
push_kernel(Peers peers, const int* __restrict__ rank_prefix_matrix, const uint8_t* __restrict__ x, int64_t x_bytes,
            const float* __restrict__ topk_weights, int num_topk, int64_t stride_rows, int64_t row_bytes,
            int chunk_rows) {
  __shared__ ChunkMap map;
  const int R = peers.num_ranks;
  const int me = peers.rank;
  build_chunk_map(map, rank_prefix_matrix, me, R, chunk_rows);
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  const int total_chunks = map.chunk_begin[R];
  const int64_t weights_offset = align16(x_bytes);
  for (int c = warp; c < total_chunks; c += num_warps) {
    const int s = chunk_source(map, c, R);
    const int j0 = (c - map.chunk_begin[s]) * map.rows;
    const int n = min(map.rows, map.count[s] - j0);
    uint8_t* dst_rows = region_of(peers, s) + kControlBytes + (static_cast<int64_t>(me) * stride_rows + j0) * row_bytes;
    for (int i = 0; i < n; ++i) {
      const int64_t row = map.start[s] + j0 + i;
      uint8_t* dst = dst_rows + static_cast<int64_t>(i) * row_bytes;
      warp_copy<U>(dst, x + row * x_bytes, x_bytes, lane);
      if (num_topk > 0) {
        for (int k = lane; k < num_topk; k += 32) {
          reinterpret_cast<float*>(dst + weights_offset)[k] = topk_weights[row * num_topk + k];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------ reduce
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

// A lane sums kReduceSteps vectors of a row at once: their loads are in flight together (one
// vector per step made the reduce wait on one load latency per rank and step).
constexpr int kReduceSteps = 4;

template <typename T, int V>
__device__ __forceinline__ void reduce_token(const uint8_t* area, int64_t stride_rows, int64_t row_bytes,
                                             unsigned long long mask, int slot_lo, int slot_hi, int64_t hidden,
                                             const void* bias0, bool bias0_bf16, const void* bias1, bool bias1_bf16,
                                             int64_t t, T* out, int lane) {
  constexpr int U = kReduceSteps;
  const int64_t steps = hidden / V;
  // The loop bounds are uniform across the warp (the slot broadcasts need every lane).
  for (int64_t base = 0; base < steps; base += 32 * U) {
    float acc[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int v = 0; v < V; ++v) acc[u][v] = 0.0f;
    }
    for (unsigned long long m = mask; m != 0; m &= m - 1) {  // ranks in increasing order, as before
      const int r = __ffsll(static_cast<long long>(m)) - 1;
      const int slot = __shfl_sync(kFullWarp, r < 32 ? slot_lo : slot_hi, r % 32);
      const auto* row =
          reinterpret_cast<const Pack<T, V>*>(area + (static_cast<int64_t>(r) * stride_rows + slot) * row_bytes);
      Pack<T, V> p[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < steps) p[u] = row[i];
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < steps) {
#pragma unroll
          for (int v = 0; v < V; ++v) acc[u][v] += to_float<T>(p[u].v[v]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i >= steps) continue;
      Pack<T, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t index = t * hidden + i * V + v;
        float value = acc[u][v];
        if (bias0 != nullptr) value += bias_at(bias0, bias0_bf16, index);
        if (bias1 != nullptr) value += bias_at(bias1, bias1_bf16, index);
        o.v[v] = from_float<T>(value);
      }
      reinterpret_cast<Pack<T, V>*>(out + t * hidden)[i] = o;
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
reduce_kernel(Peers peers, int64_t num_tokens, int64_t hidden, const bool* __restrict__ is_token_in_rank,
              const int* __restrict__ send_slot, int64_t stride_rows, int64_t row_bytes, int num_topk,
              const void* bias0, bool bias0_bf16, const void* bias1, bool bias1_bf16, T* __restrict__ out,
              float* __restrict__ out_weights) {
  const uint8_t* area = region_of(peers, peers.rank) + kControlBytes;
  const int R = peers.num_ranks;
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t weights_offset = align16(hidden * static_cast<int64_t>(sizeof(T)));
  for (int64_t t = warp; t < num_tokens; t += num_warps) {
    const bool in_lo = lane < R && is_token_in_rank[t * R + lane];
    const bool in_hi = lane + 32 < R && is_token_in_rank[t * R + lane + 32];
    const int slot_lo = in_lo ? send_slot[t * R + lane] : 0;
    const int slot_hi = in_hi ? send_slot[t * R + lane + 32] : 0;
    const unsigned long long mask = static_cast<unsigned long long>(__ballot_sync(kFullWarp, in_lo)) |
                                     (static_cast<unsigned long long>(__ballot_sync(kFullWarp, in_hi)) << 32);
    reduce_token<T, V>(area, stride_rows, row_bytes, mask, slot_lo, slot_hi, hidden, bias0, bias0_bf16, bias1,
                       bias1_bf16, t, out, lane);
    if (num_topk > 0) {
      // Lanes k < K sum weight k; the slots are broadcast by every lane, so all lanes loop alike.
      for (int k0 = 0; k0 < num_topk; k0 += 32) {
        const int k = k0 + lane;
        float acc = 0.0f;
        for (unsigned long long m = mask; m != 0; m &= m - 1) {
          const int r = __ffsll(static_cast<long long>(m)) - 1;
          const int slot = __shfl_sync(kFullWarp, r < 32 ? slot_lo : slot_hi, r % 32);
          const auto* w = reinterpret_cast<const float*>(area + (static_cast<int64_t>(r) * stride_rows + slot) * row_bytes +
                                                         weights_offset);
          if (k < num_topk) acc += w[k];
        }
        if (k < num_topk) out_weights[t * num_topk + k] = acc;
      }
    }
  }
}

// 16-byte vectors in flight per lane in the NVLink copies (pull, push): MOE_EP_INTRANODE_UNROLL =
// 4, 8 (default) or 16, read at every launch, so a benchmark can compare them without a rebuild.
int unroll_from_env() {
  const char* raw = std::getenv("MOE_EP_INTRANODE_UNROLL");
  if (raw == nullptr || *raw == '\0') return 8;
  const std::string value(raw);
  if (value == "4") return 4;
  if (value == "8") return 8;
  if (value == "16") return 16;
  throw std::invalid_argument("moe_ep: MOE_EP_INTRANODE_UNROLL must be 4, 8 or 16, got '" + value + "'");
}

// Rows per warp step in pull and push: MOE_EP_INTRANODE_CHUNK_ROWS = 4, 8, 16 or 32 (default),
// read at every launch, like the unroll, so a benchmark can compare them without a rebuild.
int chunk_rows_from_env() {
  const char* raw = std::getenv("MOE_EP_INTRANODE_CHUNK_ROWS");
  if (raw == nullptr || *raw == '\0') return 32;
  const std::string value(raw);
  if (value == "4") return 4;
  if (value == "8") return 8;
  if (value == "16") return 16;
  if (value == "32") return 32;
  throw std::invalid_argument("moe_ep: MOE_EP_INTRANODE_CHUNK_ROWS must be 4, 8, 16 or 32, got '" + value + "'");
}

int clamp_blocks(int num_blocks, int64_t work_items, int items_per_block) {
  int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  if (needed < 1) needed = 1;
  if (num_blocks < 1) num_blocks = 1;
  return static_cast<int>(needed < num_blocks ? needed : num_blocks);
}

void check_peers(const Peers& peers) {
  if (peers.num_ranks < 1 || peers.num_ranks > kMaxRanks) {
    throw std::invalid_argument("moe_ep intranode: num_ranks must be in [1, 64], got " + std::to_string(peers.num_ranks));
  }
  if (peers.bases == nullptr) throw std::invalid_argument("moe_ep intranode: the IPC buffer's peers are not open");
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
  layout.stride = layout.off_weights + align16(static_cast<int64_t>(num_topk) * 4);
  return layout;
}

int64_t dispatch_bytes_needed(int64_t num_tokens, const RowLayout& layout, int num_ranks) {
  return kControlBytes + align16(num_tokens * layout.stride) + align16(static_cast<int64_t>(num_ranks) * num_tokens * 4);
}

int64_t combine_row_bytes(int64_t x_bytes, int num_topk_weights) {
  return align16(x_bytes) + align16(static_cast<int64_t>(num_topk_weights) * 4);
}

int64_t combine_bytes_needed(int64_t stride_rows, int64_t row_bytes, int num_ranks) {
  return kControlBytes + static_cast<int64_t>(num_ranks) * stride_rows * row_bytes;
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

void launch_stage(const Peers& peers, const RowLayout& layout, int64_t num_tokens, const void* x, const void* scales,
                  const int64_t* topk_idx, const float* topk_weights, bool write_routing, const int* send_slot,
                  const int* send_counts, const int* expert_counts, int num_experts, int64_t overflow,
                  int num_blocks, cudaStream_t stream) {
  check_peers(peers);
  if (write_routing && (send_counts == nullptr || (num_experts > 0 && expert_counts == nullptr) ||
                        (num_tokens > 0 && send_slot == nullptr))) {
    throw std::invalid_argument("moe_ep intranode: stage with routing needs send_slot, send_counts and expert_counts");
  }
  if (num_experts < 0 || num_experts > kMaxExperts) {
    throw std::invalid_argument("moe_ep intranode: num_experts must be in [0, " + std::to_string(kMaxExperts) +
                                "], got " + std::to_string(num_experts));
  }
  const int blocks = clamp_blocks(num_blocks, num_tokens, kWarps);
  stage_kernel<<<blocks, kThreads, 0, stream>>>(peers, layout, num_tokens, static_cast<const uint8_t*>(x),
                                                static_cast<const uint8_t*>(scales), topk_idx, topk_weights, write_routing,
                                                send_slot, send_counts, expert_counts, num_experts, overflow);
  cuda_check(cudaGetLastError(), "intranode stage_kernel launch");
}

void launch_notify(const Peers& peers, int num_experts, int expert_alignment, int num_worst_tokens,
                   int* rank_prefix_matrix, int* peer_tokens, HostRecordView* record, long long epoch,
                   uint64_t /*timeout_ns*/, cudaStream_t stream) {
  check_peers(peers);
  if (expert_alignment < 1) throw std::invalid_argument("moe_ep intranode: expert_alignment must be >= 1");
  if (num_experts % peers.num_ranks != 0 || num_experts / peers.num_ranks > kMaxExperts) {
    throw std::invalid_argument("moe_ep intranode: num_experts must be a multiple of num_ranks, at most " +
                                std::to_string(kMaxExperts));
  }
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(peers, num_experts, expert_alignment, num_worst_tokens,
                                                  rank_prefix_matrix, peer_tokens, record, epoch);
  cuda_check(cudaGetLastError(), "intranode notify_kernel launch");
}

void launch_pull(const Peers& peers, const RowLayout& layout, const int* rank_prefix_matrix, const int* peer_tokens,
                 bool cached, int* recv_src_idx, void* recv_x, void* recv_scales, int64_t* recv_topk_idx,
                 float* recv_topk_weights, int64_t num_rows, int num_local_experts, int num_blocks,
                 cudaStream_t stream) {
  check_peers(peers);
  if (num_rows > INT32_MAX) throw std::invalid_argument("moe_ep intranode: too many received rows");
  if (num_rows > 0 && layout.num_topk > 0 && (recv_topk_idx == nullptr || recv_topk_weights == nullptr)) {
    throw std::invalid_argument("moe_ep intranode: top-k outputs missing");
  }
  const int chunk_rows = chunk_rows_from_env();
  // Chunks: at most one per warp of a block step, plus one per source for the partial ones.
  const int blocks = clamp_blocks(num_blocks, (num_rows + chunk_rows - 1) / chunk_rows + peers.num_ranks, kWarps);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(peers, layout, rank_prefix_matrix, peer_tokens, cached, recv_src_idx,
                                            static_cast<uint8_t*>(recv_x), static_cast<uint8_t*>(recv_scales),
                                            recv_topk_idx, recv_topk_weights, num_rows, num_local_experts, chunk_rows);
  };
  switch (unroll_from_env()) {
    case 4: launch(pull_kernel<4>); break;
    case 16: launch(pull_kernel<16>); break;
    default: launch(pull_kernel<8>); break;
  }
  cuda_check(cudaGetLastError(), "intranode pull_kernel launch");
}

void launch_push(const Peers& peers, const int* rank_prefix_matrix, const void* x, int64_t x_bytes,
                 const float* topk_weights, int num_topk, int64_t stride_rows, int num_blocks, cudaStream_t stream) {
  check_peers(peers);
  // num_topk (0: no weights), not the pointer, sizes the rows: a rank that received no rows has
  // an empty (null) weights tensor, and every rank must agree on the row size.
  const int64_t row_bytes = combine_row_bytes(x_bytes, num_topk);
  const int chunk_rows = chunk_rows_from_env();
  auto launch = [&](auto kernel) {
    kernel<<<clamp_blocks(num_blocks, 1 << 30, 1), kThreads, 0, stream>>>(
        peers, rank_prefix_matrix, static_cast<const uint8_t*>(x), x_bytes, topk_weights, num_topk, stride_rows,
        row_bytes, chunk_rows);
  };
  switch (unroll_from_env()) {
    case 4: launch(push_kernel<4>); break;
    case 16: launch(push_kernel<16>); break;
    default: launch(push_kernel<8>); break;
  }
  cuda_check(cudaGetLastError(), "intranode push_kernel launch");
}

void launch_reduce(const Peers& peers, int64_t num_tokens, int64_t hidden, bool x_is_bf16, const bool* is_token_in_rank,
                   const int* send_slot, int64_t stride_rows, int num_topk, const void* bias0, bool bias0_is_bf16,
                   const void* bias1, bool bias1_is_bf16, void* out, float* out_weights, int num_blocks,
                   cudaStream_t stream) {
  check_peers(peers);
  if (num_tokens == 0) return;
  const int64_t elem = x_is_bf16 ? 2 : 4;
  const int64_t row_bytes = combine_row_bytes(hidden * elem, num_topk);
  const int blocks = clamp_blocks(num_blocks, num_tokens, kWarps);
  // 16-byte packs need every row start (out, biases: t * hidden elements) 16-byte aligned.
  const int vec = static_cast<int>(16 / elem);
  const bool aligned = hidden % vec == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(bias0) % 16 == 0 && reinterpret_cast<uintptr_t>(bias1) % 16 == 0;
  if (x_is_bf16) {
    auto* o = static_cast<__nv_bfloat16*>(out);
    if (aligned) {
      reduce_kernel<__nv_bfloat16, 8><<<blocks, kThreads, 0, stream>>>(peers, num_tokens, hidden, is_token_in_rank,
                                                                       send_slot, stride_rows, row_bytes, num_topk, bias0,
                                                                       bias0_is_bf16, bias1, bias1_is_bf16, o, out_weights);
    } else {
      reduce_kernel<__nv_bfloat16, 1><<<blocks, kThreads, 0, stream>>>(peers, num_tokens, hidden, is_token_in_rank,
                                                                       send_slot, stride_rows, row_bytes, num_topk, bias0,
                                                                       bias0_is_bf16, bias1, bias1_is_bf16, o, out_weights);
    }
  } else {
    auto* o = static_cast<float*>(out);
    if (aligned) {
      reduce_kernel<float, 4><<<blocks, kThreads, 0, stream>>>(peers, num_tokens, hidden, is_token_in_rank, send_slot,
                                                               stride_rows, row_bytes, num_topk, bias0, bias0_is_bf16,
                                                               bias1, bias1_is_bf16, o, out_weights);
    } else {
      reduce_kernel<float, 1><<<blocks, kThreads, 0, stream>>>(peers, num_tokens, hidden, is_token_in_rank, send_slot,
                                                               stride_rows, row_bytes, num_topk, bias0, bias0_is_bf16,
                                                               bias1, bias1_is_bf16, o, out_weights);
    }
  }
  cuda_check(cudaGetLastError(), "intranode reduce_kernel launch");
}

}  // namespace intranode
}  // namespace moe_ep
