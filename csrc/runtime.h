#pragma once
#include <cuda_runtime.h>

namespace moe_ep {
// Throws std::runtime_error (a Python RuntimeError through pybind11) naming the failed call.
void cuda_check(cudaError_t err, const char* what);
int num_sms_of_device(int device);
bool is_sm90_compiled();
}  // namespace moe_ep
