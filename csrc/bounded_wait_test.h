#pragma once
// Test hook (not a kernel family) of csrc/bounded_wait.cuh (torch-free: raw pointers + a stream).
#include <cuda_runtime.h>

namespace moe_ep {
namespace wait {

// Launches one kernel ("wait_test", one thread) on `stream` that waits, with the bounded wait of
// bounded_wait.cuh (acquire loads at system scope), until *flag_device_ptr == expected, then
// returns. Nothing is written. If the flag does not arrive within the timeout, the kernel prints
// its timeout line (kernel=wait_test, rank, channel, counter=flag, last and expected values) and
// traps, which makes the CUDA context unusable.
//   timeout_s > 0: that many seconds; timeout_s <= 0: MOE_EP_TIMEOUT_S (default 100 s).
// Throws std::invalid_argument for a null pointer, a NaN/inf timeout or a bad MOE_EP_TIMEOUT_S,
// and std::runtime_error (moe_ep::cuda_check) if the launch fails.
void launch_wait_test(int* flag_device_ptr, int expected, double timeout_s, int rank, int channel,
                      cudaStream_t stream);

}  // namespace wait
}  // namespace moe_ep
