#pragma once
// Bad input found on the device, where the host does not read it (reading it would synchronise):
// print one line naming the call, the entry and the bound, then trap. The host then raises
// (moe_ep/comm/errors.py turns the trapped context into an exception whose text points at the
// line). Only the first thread of the process's kernels of this file to find one prints.
#include <cstdint>
#include <cstdio>

namespace moe_ep {
namespace {  // one copy per translation unit: no symbol clashes between the kernel files

__device__ int bad_input_reported = 0;

// Entry `pair` (token pair / num_topk, column pair % num_topk) of topk_idx holds `value`, outside
// [-1, num_experts). rank < 0: the call does not know its rank (the layout kernel).
__device__ __noinline__ void bad_topk_entry(const char* call, int rank, int64_t pair, int num_topk, long long value,
                                            int num_experts) {
  if (atomicCAS(&bad_input_reported, 0, 1) == 0) {
    const long long token = static_cast<long long>(pair / num_topk);
    const int k = static_cast<int>(pair % num_topk);
    if (rank >= 0) {
      printf("moe_ep: %s on rank %d: topk_idx[%lld][%d] = %lld is outside [-1, %d] (num_experts = %d)\n", call, rank,
             token, k, value, num_experts - 1, num_experts);
    } else {
      printf("moe_ep: %s: topk_idx[%lld][%d] = %lld is outside [-1, %d] (num_experts = %d)\n", call, token, k, value,
             num_experts - 1, num_experts);
    }
  }
  __threadfence_system();
  asm volatile("trap;");
}

}  // namespace
}  // namespace moe_ep
