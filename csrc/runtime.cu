// Device queries shared by every kernel family: the backend asks these before choosing sizes.
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

#include "runtime.h"

namespace moe_ep {

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("moe_ep CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

int num_sms_of_device(int device) {
  int count = 0;
  cuda_check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}

bool is_sm90_compiled() {
#ifdef MOE_EP_DISABLE_SM90_FEATURES
  return false;
#else
  return true;
#endif
}

}  // namespace moe_ep
