// The one Python module of moe_ep's CUDA side. Each kernel family registers its launchers here.
#include <torch/extension.h>

#include "runtime.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_ep CUDA kernels";
  m.def("is_sm90_compiled", &moe_ep::is_sm90_compiled, "Whether Hopper-only code paths were compiled");
  m.def("num_sms_of_device", &moe_ep::num_sms_of_device, "Multiprocessor count of a CUDA device");
  // Kernel families present in this build; the Buffer picks the cuda backend only for those.
  m.attr("kernel_families") = pybind11::make_tuple();
}
