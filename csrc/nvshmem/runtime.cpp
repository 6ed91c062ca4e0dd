// moe_ep._nvshmem: the NVSHMEM runtime the low-latency kernels can take their memory from, and
// those kernels built with NVSHMEM's device library (csrc/ll_bindings.cpp, csrc/low_latency.cu
// compiled with MOE_EP_NVSHMEM_DEVICE), whose put path reaches peers that nvshmem_ptr cannot map.
// A separate module so that moe_ep._C imports where NVSHMEM is not installed. Bootstrap: a unique
// id made on one rank and broadcast over torch.distributed (moe_ep/comm/nvshmem.py), then
// nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID), which also sets up the device library's state
// in this module.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <pybind11/pybind11.h>

#include "../ll_bindings.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace {

bool g_initialized = false;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("moe_ep._nvshmem: ") + what + ": " + cudaGetErrorString(err));
}

pybind11::bytes unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) throw std::runtime_error("moe_ep._nvshmem: nvshmemx_get_uniqueid failed");
  return pybind11::bytes(reinterpret_cast<const char*>(&id), sizeof(id));
}

void init(int rank, int num_ranks, const std::string& id_bytes) {
  if (g_initialized) throw std::runtime_error("moe_ep._nvshmem: NVSHMEM is already initialized in this process");
  if (id_bytes.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw std::invalid_argument("moe_ep._nvshmem: the unique id must be " + std::to_string(sizeof(nvshmemx_uniqueid_t)) +
                                " bytes, got " + std::to_string(id_bytes.size()));
  }
  if (num_ranks < 1 || rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument("moe_ep._nvshmem: rank must be in [0, num_ranks), got rank=" + std::to_string(rank) +
                                " num_ranks=" + std::to_string(num_ranks));
  }
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, id_bytes.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) != 0) {
    throw std::runtime_error("moe_ep._nvshmem: nvshmemx_set_attr_uniqueid_args failed");
  }
  // The full init (host library and this module's device state): the put path calls the device API.
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0) {
    throw std::runtime_error("moe_ep._nvshmem: nvshmemx_init_attr (unique id bootstrap) failed");
  }
  g_initialized = true;
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
    throw std::runtime_error("moe_ep._nvshmem: NVSHMEM's PE numbering differs from the group's ranks");
  }
}

// Collective (every PE, the same size): zeroed symmetric memory; returns its address here.
uintptr_t symmetric_zeros(int64_t num_bytes) {
  if (!g_initialized) throw std::runtime_error("moe_ep._nvshmem: call init first");
  if (num_bytes <= 0) throw std::invalid_argument("moe_ep._nvshmem: num_bytes must be positive");
  void* ptr = nvshmem_malloc(static_cast<size_t>(num_bytes));
  if (ptr == nullptr) throw std::runtime_error("moe_ep._nvshmem: nvshmem_malloc of " + std::to_string(num_bytes) + " bytes failed");
  check_cuda(cudaMemset(ptr, 0, static_cast<size_t>(num_bytes)), "cudaMemset(symmetric)");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize(symmetric zeroing)");
  nvshmem_barrier_all();  // every PE's zeroing is done before any PE may write into it
  return reinterpret_cast<uintptr_t>(ptr);
}

// The address of `addr`'s symmetric counterpart on `pe` in this process, or 0 when that PE is not
// reachable by loads and stores (no NVLink / P2P path: only NVSHMEM's RDMA puts would reach it).
uintptr_t peer_pointer(uintptr_t addr, int pe) {
  return reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<void*>(addr), pe));
}

void free_symmetric(uintptr_t addr) { nvshmem_free(reinterpret_cast<void*>(addr)); }

void barrier_all() {
  if (!g_initialized) throw std::runtime_error("moe_ep._nvshmem: call init first");
  nvshmem_barrier_all();
}

void finalize() {
  if (g_initialized) nvshmem_finalize();
  g_initialized = false;
}

}  // namespace

PYBIND11_MODULE(_nvshmem, m) {
  m.doc() = "moe_ep's NVSHMEM host runtime (unique-id bootstrap, symmetric memory, peer pointers)";
  m.def("unique_id", &unique_id, "A new NVSHMEM unique id (bytes), made on one rank and broadcast");
  m.def("init", &init, pybind11::arg("rank"), pybind11::arg("num_ranks"), pybind11::arg("unique_id"),
        "Initialize NVSHMEM with the unique-id bootstrap (once per process; set the CUDA device first)");
  m.def("initialized", [] { return g_initialized; });
  m.def("symmetric_zeros", &symmetric_zeros, pybind11::arg("num_bytes"),
        "Collective: nvshmem_malloc num_bytes, zeroed, after a barrier; returns the address");
  m.def("peer_pointer", &peer_pointer, pybind11::arg("addr"), pybind11::arg("pe"),
        "nvshmem_ptr(addr, pe) as an int (0: not reachable by loads/stores)");
  m.def("free", &free_symmetric, pybind11::arg("addr"));
  m.def("barrier_all", &barrier_all, "Collective: NVSHMEM's barrier over every PE (mapped or not)");
  m.def("finalize", &finalize);
  // The low-latency launchers, with puts (the same signatures as moe_ep._C's).
  moe_ep::bind_low_latency(m);
}
