#pragma once
// Kernel family "layout": get_dispatch_layout on the device (torch-free: raw pointers + a stream).
#include <cuda_runtime.h>

#include <cstdint>

namespace moe_ep {
namespace layout {

// A token's destination ranks are kept as one 64-bit mask, so a group may have at most 64 ranks.
constexpr int64_t kMaxRanks = 64;
// Per-block expert histograms live in shared memory (4 bytes per expert).
constexpr int64_t kMaxExperts = 8192;

// Throws std::invalid_argument naming the offending argument unless
// num_tokens >= 0, num_topk >= 0, num_tokens * num_topk < 2^31,
// 1 <= num_ranks <= kMaxRanks, 1 <= num_experts <= kMaxExperts and num_experts % num_ranks == 0.
void check_dispatch_layout_args(int64_t num_tokens, int64_t num_topk, int64_t num_experts, int64_t num_ranks);

// topk_idx: [num_tokens, num_topk] int64, row-major, ids in [-1, num_experts) (-1: no expert).
// Outputs (all written on `stream`, no host synchronisation; the counts are zeroed here first):
//   num_tokens_per_rank   [num_ranks]   tokens with at least one expert on rank r
//                                       (expert e lives on rank e / (num_experts / num_ranks))
//   num_tokens_per_expert [num_experts] (token, k) entries equal to e
//   is_token_in_rank      [num_tokens, num_ranks] row-major
// Ids outside [-1, num_experts) are the caller's error (moe_ep.comm.Buffer checks them); the
// kernel skips them instead of writing out of bounds.
// Throws std::invalid_argument on bad arguments (see above; pointers may be null only where
// their array is empty) and std::runtime_error (moe_ep::cuda_check) if a launch fails.
void get_dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int64_t num_topk, int64_t num_experts,
                         int64_t num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                         bool* is_token_in_rank, cudaStream_t stream);

}  // namespace layout
}  // namespace moe_ep
