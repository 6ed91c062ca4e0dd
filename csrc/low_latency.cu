// Kernel family "low_latency" (see low_latency.h for the buffer layout and the guarantees).
//
//   dispatch send   one warp per global expert e: finds this rank's (token, k) pairs for e in
//                   order (warp ballots over topk_idx), writes each token (cast to FP8 in the warp
//                   when asked) into the slot [l][this rank][j] of e's rank, then publishes the
//                   count with a release store. Nothing waits: the hook's "send" half.
//   dispatch recv   one block per local expert: waits (bounded) for every source's count, packs
//                   the rows in source-rank order into recv_x, writes src_info, layout_range,
//                   recv_count and the statistics, and resets the flags it read.
//   combine send    one block per local expert: each received row goes back to its source, into
//                   the source's combine area at [global expert][j];
//                   the last block to finish publishes one flag per source.
//   combine recv    waits for every rank's flag, then one warp per (token, 256 hidden columns)
//                   sums weight x row over k in float32 and casts; the last block resets flags.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
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

// The warp casts one bf16 row to FP8 with one float32 scale per 128 columns (amax / 448, floored,
// optionally rounded up to a power of two), as moe_ep.comm.fp8.per_token_group_quant_fp8.
__device__ __forceinline__ void warp_cast_fp8(uint8_t* dst, float* dst_scales, const __nv_bfloat16* src, int hidden,
                                              bool round_scale, int lane) {
  for (int g = 0; g < hidden / kGroup; ++g) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(src + g * kGroup) + lane);  // 4 bf16 per lane
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
    float f[4];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[i] = __bfloat162float(v[i]);
      amax = fmaxf(amax, fabsf(f[i]));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullWarp, amax, offset));
    float scale = fmaxf(amax, kAmaxFloor) / kFp8Max;
    if (round_scale) scale = pow2_ceil(scale);
    unsigned packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float q = fminf(fmaxf(f[i] / scale, -kFp8Max), kFp8Max);
      const __nv_fp8_storage_t b = __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
      packed |= static_cast<unsigned>(b) << (8 * i);
    }
    reinterpret_cast<unsigned*>(dst + g * kGroup)[lane] = packed;
    if (lane == 0) dst_scales[g] = scale;
  }
}

// ----------------------------------------------------------------------------- dispatch send
__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(DispatchArgs a) {
  const LLLayout& L = a.layout;
  const int lane = threadIdx.x % 32;
  const int me = a.peers.rank;
  const int pairs = a.num_tokens * L.num_topk;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int e = warp; e < L.num_experts; e += num_warps) {
    const int d = e / L.num_local;
    const int l = e % L.num_local;
    const bool masked = cut(a.mask, me, d);
    uint8_t* slots = buffer_of(a.peers, d, a.data_offset) + L.off_darea +
                     (static_cast<int64_t>(l) * L.num_ranks + me) * L.m * L.msg_bytes;
    int count = 0;
    for (int base = 0; base < pairs && !masked; base += 32) {
      const int p = base + lane;
      const bool hit = p < pairs && a.topk_idx[p] == e;
      const unsigned ballot = __ballot_sync(kFullWarp, hit);
      if (hit) a.pair_pos[p] = count + __popc(ballot & ((1u << lane) - 1u));
      for (unsigned bits = ballot; bits != 0; bits &= bits - 1) {
        const int j = count++;
        if (j >= L.m) continue;  // more than M rows of one source for one expert: dropped (see header)
        const int t = (base + __ffs(bits) - 1) / L.num_topk;
        uint8_t* msg = slots + static_cast<int64_t>(j) * L.msg_bytes;
        const auto* row = static_cast<const __nv_bfloat16*>(a.x) + static_cast<int64_t>(t) * L.hidden;
        if (L.use_fp8) {
          warp_cast_fp8(msg, reinterpret_cast<float*>(msg + L.off_scales), row, L.hidden, a.round_scale, lane);
        } else {
          warp_copy(msg, reinterpret_cast<const uint8_t*>(row), L.x_bytes, lane);
        }
        if (lane == 0) *reinterpret_cast<int*>(msg + L.off_src) = t;
      }
    }
    if (count > L.m) count = L.m;
    __syncwarp();
    if (lane == 0) {
      a.counts_e[e] = masked ? 0 : count;
      if (!masked) {
        __threadfence_system();  // the rows above before the count that publishes them
        int* flag = reinterpret_cast<int*>(buffer_of(a.peers, d, a.flags_offset) + L.off_dflags) +
                    l * L.num_ranks + me;
        st_release_sys(flag, count + 1);
      }
    }
  }
}

// ----------------------------------------------------------------------------- dispatch recv
__global__ void __launch_bounds__(kThreads) dispatch_recv_kernel(DispatchArgs a) {
  const LLLayout& L = a.layout;
  __shared__ int counts[kMaxRanks];
  __shared__ int begins[kMaxRanks + 1];
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t slots = static_cast<int64_t>(R) * L.m;
  uint8_t* own = buffer_of(a.peers, me, a.data_offset);
  uint8_t* own_flags = buffer_of(a.peers, me, a.flags_offset);
  const int groups = L.hidden / kGroup;
  for (int l = blockIdx.x; l < L.num_local; l += gridDim.x) {
    if (threadIdx.x < R) {
      const int s = threadIdx.x;
      int count = 0;
      if (!cut(a.mask, me, s)) {
        int* flag = reinterpret_cast<int*>(own_flags + L.off_dflags) + l * R + s;
        const wait::WaitSite site{"low_latency_dispatch_recv", "dispatch_flag[expert][src]", me, s, a.timeout_ns};
        count = wait::wait_value<wait::Scope::kSys>(static_cast<const int*>(flag), 0, wait::Cmp::kNe, site) - 1;
        *reinterpret_cast<volatile int*>(flag) = 0;  // ready for this buffer's next use
        count = min(max(count, 0), L.m);             // a sender never publishes more than M
      }
      counts[s] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int acc = 0;
      for (int s = 0; s < R; ++s) {
        begins[s] = acc;
        a.layout_range[static_cast<int64_t>(l) * R + s] = (static_cast<int64_t>(acc) << 32) | counts[s];
        acc += counts[s];
      }
      begins[R] = acc;
      a.recv_count[l] = acc;
      if (a.cumulative_stats != nullptr) a.cumulative_stats[l] += acc;
    }
    __syncthreads();
    const int total = begins[R];
    for (int idx = warp; idx < total; idx += kWarps) {
      int s = 0;
      while (begins[s + 1] <= idx) ++s;
      const int j = idx - begins[s];
      const uint8_t* msg = own + L.off_darea + ((static_cast<int64_t>(l) * R + s) * L.m + j) * L.msg_bytes;
      const int64_t row = static_cast<int64_t>(l) * slots + idx;
      warp_copy(static_cast<uint8_t*>(a.recv_x) + row * L.x_bytes, msg, L.x_bytes, lane);
      if (L.use_fp8) {
        const float* scales = reinterpret_cast<const float*>(msg + L.off_scales);
        if (a.use_ue8m0) {
          // Scales [L, G/4, slots] int32: group 4w+i's exponent byte in byte i of word w.
          for (int w = lane; w < groups / 4; w += 32) {
            unsigned word = 0;
            for (int i = 0; i < 4; ++i) word |= ((__float_as_uint(scales[4 * w + i]) >> 23) & 0xFFu) << (8 * i);
            static_cast<int*>(a.recv_scales)[(static_cast<int64_t>(l) * (groups / 4) + w) * slots + idx] =
                static_cast<int>(word);
          }
        } else {
          for (int g = lane; g < groups; g += 32) {
            static_cast<float*>(a.recv_scales)[(static_cast<int64_t>(l) * groups + g) * slots + idx] = scales[g];
          }
        }
      }
      if (lane == 0) a.src_info[row] = *reinterpret_cast<const int*>(msg + L.off_src);
    }
    for (int64_t idx = total + threadIdx.x; idx < slots; idx += kThreads) a.src_info[l * slots + idx] = -1;
    __syncthreads();  // the shared counts are reused by this block's next expert
  }
}

// ------------------------------------------------------------------------------ combine send
__global__ void __launch_bounds__(kThreads) combine_send_kernel(CombineArgs a) {
  const LLLayout& L = a.layout;
  __shared__ int begins[kMaxRanks + 1];
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t slots = static_cast<int64_t>(R) * L.m;
  const int64_t row_bytes = static_cast<int64_t>(L.hidden) * 2;
  for (int l = blockIdx.x; l < L.num_local; l += gridDim.x) {
    if (threadIdx.x == 0) {
      for (int s = 0; s < R; ++s) begins[s] = static_cast<int>(a.layout_range[static_cast<int64_t>(l) * R + s] >> 32);
      const int64_t last = a.layout_range[static_cast<int64_t>(l) * R + R - 1];
      begins[R] = static_cast<int>(last >> 32) + static_cast<int>(last & 0xFFFFFFFF);
    }
    __syncthreads();
    const int total = begins[R];
    for (int idx = warp; idx < total; idx += kWarps) {
      int s = 0;
      while (begins[s + 1] <= idx) ++s;
      if (cut(a.mask, me, s)) continue;
      const int j = idx - begins[s];
      // Expert e = me * num_local + l replies into slot [e][j] of the source's combine area.
      uint8_t* dst = buffer_of(a.peers, s, a.data_offset) + L.off_carea +
                     ((static_cast<int64_t>(me) * L.num_local + l) * L.m + j) * row_bytes;
      const uint8_t* src = static_cast<const uint8_t*>(a.x) + (static_cast<int64_t>(l) * slots + idx) * row_bytes;
      warp_copy(dst, src, row_bytes, lane);
    }
    __syncthreads();
  }
  // The last block to finish publishes "all rows are back" to every source. Every thread fences its
  // own stores first, so the flag (released after the count says every block is done) covers them.
  __shared__ bool last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* done = reinterpret_cast<int*>(buffer_of(a.peers, me, a.flags_offset) + L.off_done);
    last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (last && threadIdx.x < R) {
    const int s = threadIdx.x;
    __threadfence_system();
    if (!cut(a.mask, me, s)) {
      int* flag = reinterpret_cast<int*>(buffer_of(a.peers, s, a.flags_offset) + L.off_cflags) + me;
      st_release_sys(flag, 1);
    }
  }
  if (last && threadIdx.x == 0) *reinterpret_cast<int*>(buffer_of(a.peers, me, a.flags_offset) + L.off_done) = 0;
}

// ------------------------------------------------------------------------------ combine recv
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(CombineArgs a) {
  const LLLayout& L = a.layout;
  const int me = a.peers.rank;
  const int R = L.num_ranks;
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
  const int64_t row_elems = L.hidden;
  const int slices = (L.hidden + 255) / 256;  // 32 lanes x 8 columns
  const int64_t items = static_cast<int64_t>(a.num_tokens) * slices;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const auto* area = reinterpret_cast<const __nv_bfloat16*>(own + L.off_carea);
  auto* out = static_cast<__nv_bfloat16*>(a.out);
  for (int64_t item = warp; item < items; item += num_warps) {
    const int64_t t = item / slices;
    const int64_t col = (item % slices) * 256 + lane * 8;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (int k = 0; k < L.num_topk; ++k) {
      const int64_t e = a.topk_idx[t * L.num_topk + k];
      if (e < 0) continue;
      const int d = static_cast<int>(e / L.num_local);
      if (cut(a.mask, me, d)) continue;
      const int pos = a.pair_pos[t * L.num_topk + k];
      if (pos >= L.m) continue;  // dropped at dispatch (see header)
      const float w = a.topk_weights[t * L.num_topk + k];
      const __nv_bfloat16* row = area + (e * L.m + pos) * row_elems;
      if (col + 8 <= row_elems) {
        const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(row + col));
        const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += w * __bfloat162float(v[i]);
      } else {
        for (int i = 0; i < 8 && col + i < row_elems; ++i) acc[i] += w * __bfloat162float(row[col + i]);
      }
    }
    if (col + 8 <= row_elems) {
      uint4 packed;
      __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = __float2bfloat16_rn(acc[i]);
      *reinterpret_cast<uint4*>(out + t * row_elems + col) = packed;
    } else {
      for (int i = 0; i < 8 && col + i < row_elems; ++i) out[t * row_elems + col + i] = __float2bfloat16_rn(acc[i]);
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
  if (m < 1 || hidden < 1 || num_topk < 1) throw std::invalid_argument("moe_ep low_latency: M, hidden and top-k must be >= 1");
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
  l.msg_bytes = l.off_src + 16;
  // Flags sit at offsets that do not depend on the sizes (see the header), data after them.
  l.off_dflags = 0;
  l.off_cflags = static_cast<int64_t>(kMaxExperts) * 4;
  l.off_done = l.off_cflags + static_cast<int64_t>(kMaxRanks) * 4;
  l.off_darea = 0;
  const int64_t darea = static_cast<int64_t>(l.num_local) * num_ranks * m * l.msg_bytes;
  l.off_carea = (l.off_darea + darea + 127) / 128 * 128;
  const int64_t carea = static_cast<int64_t>(num_experts) * m * hidden * 2;
  l.buffer_bytes = (l.off_carea + carea + 127) / 128 * 128;
  return l;
}

uint64_t timeout_ns_from_env() { return wait::timeout_ns_from_env(); }

void launch_dispatch_send(const DispatchArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  dispatch_send_kernel<<<grid_for(args.layout.num_experts, kWarps, num_sms), kThreads, 0, stream>>>(args);
  cuda_check(cudaGetLastError(), "low_latency dispatch_send_kernel launch");
}

void launch_dispatch_recv(const DispatchArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  dispatch_recv_kernel<<<grid_for(args.layout.num_local, 1, num_sms), kThreads, 0, stream>>>(args);
  cuda_check(cudaGetLastError(), "low_latency dispatch_recv_kernel launch");
}

void launch_combine_send(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  combine_send_kernel<<<grid_for(args.layout.num_local, 1, num_sms), kThreads, 0, stream>>>(args);
  cuda_check(cudaGetLastError(), "low_latency combine_send_kernel launch");
}

void launch_combine_recv(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  const int slices = (args.layout.hidden + 255) / 256;
  combine_recv_kernel<<<grid_for(args.num_tokens * slices, kWarps, num_sms), kThreads, 0, stream>>>(args);
  cuda_check(cudaGetLastError(), "low_latency combine_recv_kernel launch");
}

}  // namespace low_latency
}  // namespace moe_ep
