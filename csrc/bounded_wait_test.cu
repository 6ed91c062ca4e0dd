// Test hook for csrc/bounded_wait.cuh: one thread waits on a flag another stream, kernel or the
// host sets (tests/test_bounded_wait.py), or times out, prints its line and traps.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "bounded_wait.cuh"
#include "bounded_wait_test.h"
#include "runtime.h"

namespace moe_ep {
namespace wait {
namespace {

__global__ void wait_test_kernel(const int* flag, int expected, int rank, int channel, uint64_t timeout_ns) {
  const WaitSite site{"wait_test", "flag", rank, channel, timeout_ns};
  wait_value<Scope::kSys>(flag, expected, Cmp::kEq, site);
}

}  // namespace

void launch_wait_test(int* flag_device_ptr, int expected, double timeout_s, int rank, int channel,
                      cudaStream_t stream) {
  if (flag_device_ptr == nullptr) throw std::invalid_argument("moe_ep wait_test: flag is a null pointer");
  if (std::isnan(timeout_s) || std::isinf(timeout_s)) {
    throw std::invalid_argument("moe_ep wait_test: timeout_s must be a finite number of seconds");
  }
  const uint64_t timeout_ns = timeout_s > 0.0 ? timeout_ns_from_seconds(timeout_s) : timeout_ns_from_env();
  wait_test_kernel<<<1, 1, 0, stream>>>(flag_device_ptr, expected, rank, channel, timeout_ns);
  cuda_check(cudaGetLastError(), "wait_test_kernel launch");
}

}  // namespace wait
}  // namespace moe_ep
