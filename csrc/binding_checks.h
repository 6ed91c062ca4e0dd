#pragma once
// Tensor checks shared by the pybind11 wrappers of both modules (moe_ep._C and moe_ep._nvshmem):
// plain-text messages naming the argument, raised as Python ValueError / TypeError.
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

namespace moe_ep {

inline void check_on_device(const at::Tensor& t, int device, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.get_device() == device, name, " must be on the buffer's CUDA device");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t, int device, const char* name) {
  if (!t.has_value()) return nullptr;
  check_on_device(*t, device, name);
  return static_cast<T*>(t->data_ptr());
}

inline cudaStream_t current_stream_of(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

}  // namespace moe_ep
