#pragma once
// The low-latency family's Python bindings (csrc/ll_bindings.cpp), defined into a module by both
// moe_ep._C and moe_ep._nvshmem.
#include <pybind11/pybind11.h>

namespace moe_ep {
void bind_low_latency(pybind11::module_& m);
}  // namespace moe_ep
