// Kernel family "layout": where each token goes (Buffer.get_dispatch_layout).
//
// One kernel launch (after a memset of the two count arrays), no host synchronisation:
//   * each block owns tiles of kThreads tokens (grid-stride when there are more tiles than
//     blocks), one thread per token;
//   * a thread reads its token's K ids, builds the token's destination-rank mask (64 bits) in a
//     register and adds its ids to a block-wide expert histogram in shared memory; lanes of a warp
//     holding the same expert are merged first (__match_any_sync), so skewed routing (every token
//     to one expert) costs one shared atomic per warp instead of 32 conflicting ones;
//   * per-rank token counts come from warp ballots over the ranks present in the warp;
//   * the tile's rows of is_token_in_rank are written from the masks staged in shared memory,
//     cooperatively and 4 bytes at a time, so the stores are coalesced whatever num_ranks is;
//   * at the end each block adds its non-zero histogram bins to the global counts with one
//     atomicAdd per bin. Integer atomics: the result does not depend on scheduling;
//   * an id outside [-1, num_experts) prints the entry and traps (csrc/bad_input.cuh): the host
//     never reads topk_idx, so checking it costs no synchronisation.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bad_input.cuh"
#include "layout.h"
#include "runtime.h"

namespace moe_ep {
namespace layout {
namespace {

constexpr int kThreads = 256;    // threads per block = tokens per tile
constexpr int kMaxBlocks = 128;  // enough blocks to saturate memory; fewer means fewer global atomics
constexpr unsigned kFullWarp = 0xffffffffu;

__global__ void __launch_bounds__(kThreads)
dispatch_layout_kernel(const int64_t* __restrict__ topk_idx, int64_t num_tokens, int num_topk, int num_experts,
                       int num_ranks, int experts_per_rank, int* __restrict__ num_tokens_per_rank,
                       int* __restrict__ num_tokens_per_expert, uint8_t* __restrict__ is_token_in_rank) {
  extern __shared__ int histograms[];  // [num_experts] experts, then [num_ranks] ranks
  __shared__ unsigned long long tile_masks[kThreads];
  int* expert_hist = histograms;
  int* rank_hist = histograms + num_experts;
  const int lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < num_experts + num_ranks; i += kThreads) histograms[i] = 0;
  __syncthreads();

  // The tile loop, the k loop and the rank loop below are uniform across each warp, as the
  // *_sync intrinsics require: tokens past the end take part with no experts.
  for (int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kThreads; tile_begin < num_tokens;
       tile_begin += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t token = tile_begin + threadIdx.x;
    const bool active = token < num_tokens;
    const int64_t* row = topk_idx + (active ? token : 0) * num_topk;
    unsigned long long mask = 0;
    for (int k = 0; k < num_topk; ++k) {
      int expert = -1;
      if (active) {
        const int64_t id = __ldg(row + k);
        if (id >= 0 && id < num_experts) {
          expert = static_cast<int>(id);
        } else if (id != -1) {  // checked here, so the Buffer does not read topk_idx on the host
          bad_topk_entry("get_dispatch_layout", -1, token * num_topk + k, num_topk, id, num_experts);
        }
      }
      const unsigned same = __match_any_sync(kFullWarp, expert);
      if (expert >= 0) {
        mask |= 1ull << (expert / experts_per_rank);
        if (lane == __ffs(same) - 1) atomicAdd(&expert_hist[expert], __popc(same));
      }
    }
    tile_masks[threadIdx.x] = mask;

    unsigned long long warp_ranks = mask;
    for (int offset = 16; offset > 0; offset /= 2) warp_ranks |= __shfl_xor_sync(kFullWarp, warp_ranks, offset);
    while (warp_ranks != 0) {
      const int rank = __ffsll(static_cast<long long>(warp_ranks)) - 1;
      warp_ranks &= warp_ranks - 1;
      const unsigned votes = __ballot_sync(kFullWarp, (mask >> rank) & 1ull);
      if (lane == 0) atomicAdd(&rank_hist[rank], __popc(votes));
    }
    __syncthreads();

    // Rows [tile_begin, tile_begin + n) of is_token_in_rank are one contiguous run of at most
    // kThreads * kMaxRanks bytes, so 32-bit offsets suffice inside the tile.
    const int n = static_cast<int>(min(static_cast<int64_t>(kThreads), num_tokens - tile_begin));
    const int num_bytes = n * num_ranks;
    uint8_t* out = is_token_in_rank + tile_begin * num_ranks;
    const bool aligned = (reinterpret_cast<uintptr_t>(out) % 4) == 0;
    for (int j = threadIdx.x * 4; j < num_bytes; j += kThreads * 4) {
      const int count = min(4, num_bytes - j);
      uint32_t word = 0;
      for (int b = 0; b < count; ++b) {
        const int t = (j + b) / num_ranks;
        const int r = (j + b) - t * num_ranks;
        word |= static_cast<uint32_t>((tile_masks[t] >> r) & 1ull) << (8 * b);
      }
      if (aligned && count == 4) {
        *reinterpret_cast<uint32_t*>(out + j) = word;
      } else {
        for (int b = 0; b < count; ++b) out[j + b] = static_cast<uint8_t>(word >> (8 * b));
      }
    }
    __syncthreads();  // tile_masks is rewritten by the next tile
  }
  __syncthreads();

  for (int i = threadIdx.x; i < num_experts; i += kThreads) {
    if (expert_hist[i] != 0) atomicAdd(num_tokens_per_expert + i, expert_hist[i]);
  }
  for (int i = threadIdx.x; i < num_ranks; i += kThreads) {
    if (rank_hist[i] != 0) atomicAdd(num_tokens_per_rank + i, rank_hist[i]);
  }
}

[[noreturn]] void bad_argument(const std::string& message) {
  throw std::invalid_argument("moe_ep get_dispatch_layout: " + message);
}

}  // namespace

void check_dispatch_layout_args(int64_t num_tokens, int64_t num_topk, int64_t num_experts, int64_t num_ranks) {
  if (num_tokens < 0 || num_tokens > INT32_MAX) {
    bad_argument("num_tokens (topk_idx.shape[0]) must be in [0, 2^31), got " + std::to_string(num_tokens));
  }
  if (num_topk < 0) bad_argument("num_topk (topk_idx.shape[1]) must be >= 0, got " + std::to_string(num_topk));
  if (num_topk > 0 && num_tokens > INT32_MAX / num_topk) {
    bad_argument("topk_idx has " + std::to_string(num_tokens) + " x " + std::to_string(num_topk) +
                 " entries; counts are int32, so at most 2^31 - 1 are supported");
  }
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    bad_argument("num_ranks must be in [1, " + std::to_string(kMaxRanks) + "], got " + std::to_string(num_ranks));
  }
  if (num_experts < 1 || num_experts > kMaxExperts) {
    bad_argument("num_experts must be in [1, " + std::to_string(kMaxExperts) + "], got " +
                 std::to_string(num_experts));
  }
  if (num_experts % num_ranks != 0) {
    bad_argument("num_experts=" + std::to_string(num_experts) + " must be divisible by num_ranks=" +
                 std::to_string(num_ranks));
  }
}

void get_dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int64_t num_topk, int64_t num_experts,
                         int64_t num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                         bool* is_token_in_rank, cudaStream_t stream) {
  check_dispatch_layout_args(num_tokens, num_topk, num_experts, num_ranks);
  if (topk_idx == nullptr && num_tokens * num_topk > 0) bad_argument("topk_idx is a null pointer");
  if (num_tokens_per_rank == nullptr) bad_argument("num_tokens_per_rank is a null pointer");
  if (num_tokens_per_expert == nullptr) bad_argument("num_tokens_per_expert is a null pointer");
  if (is_token_in_rank == nullptr && num_tokens > 0) bad_argument("is_token_in_rank is a null pointer");

  cuda_check(cudaMemsetAsync(num_tokens_per_rank, 0, sizeof(int) * num_ranks, stream),
             "cudaMemsetAsync(num_tokens_per_rank)");
  cuda_check(cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int) * num_experts, stream),
             "cudaMemsetAsync(num_tokens_per_expert)");
  if (num_tokens == 0) return;

  const int64_t num_tiles = (num_tokens + kThreads - 1) / kThreads;
  const int num_blocks = static_cast<int>(num_tiles < kMaxBlocks ? num_tiles : kMaxBlocks);
  const size_t shared_bytes = sizeof(int) * static_cast<size_t>(num_experts + num_ranks);
  dispatch_layout_kernel<<<num_blocks, kThreads, shared_bytes, stream>>>(
      topk_idx, num_tokens, static_cast<int>(num_topk), static_cast<int>(num_experts), static_cast<int>(num_ranks),
      static_cast<int>(num_experts / num_ranks), num_tokens_per_rank, num_tokens_per_expert,
      reinterpret_cast<uint8_t*>(is_token_in_rank));
  cuda_check(cudaGetLastError(), "dispatch_layout_kernel launch");
}

}  // namespace layout
}  // namespace moe_ep
