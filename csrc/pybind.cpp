// The one Python module of moe_ep's CUDA side, and the only file that includes torch: each kernel
// family keeps a torch-free launcher (raw pointers + cudaStream_t) and registers a wrapper here.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <memory>
#include <tuple>

#include "bounded_wait_test.h"
#include "ipc_buffer.h"
#include "layout.h"
#include "runtime.h"

namespace {

// Family "layout". Returns (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
// is_token_in_rank [T, R] bool), allocated and computed on the current stream of topk_idx's device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> get_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts,
                                                                   int64_t num_ranks) {
  TORCH_CHECK_VALUE(topk_idx.is_cuda(), "topk_idx must be a CUDA tensor, got one on ", topk_idx.device());
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, "topk_idx must have dtype torch.int64, got ",
                   topk_idx.scalar_type());
  // A literal message on purpose: on the GPU image (torch 2.11, /opt/gcc g++ with -std=c++17) a
  // TORCH_CHECK whose message streamed an integer (dim() or sizes()) segfaulted when it fired,
  // while messages built from strings, ScalarType and Device raised cleanly. Numbers in the size
  // messages are formatted in the torch-free layer (layout.cu), which raised cleanly there.
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, "topk_idx must be 2-D [num_tokens, num_topk]");
  TORCH_CHECK_VALUE(topk_idx.is_contiguous(), "topk_idx must be contiguous (call .contiguous() first)");
  const int64_t num_tokens = topk_idx.size(0);
  // Checked before allocating, so bad sizes raise ValueError naming the argument.
  moe_ep::layout::check_dispatch_layout_args(num_tokens, topk_idx.size(1), num_experts, num_ranks);

  const c10::cuda::CUDAGuard guard(topk_idx.device());
  const auto int_options = topk_idx.options().dtype(at::kInt);
  at::Tensor num_tokens_per_rank = at::empty({num_ranks}, int_options);
  at::Tensor num_tokens_per_expert = at::empty({num_experts}, int_options);
  at::Tensor is_token_in_rank = at::empty({num_tokens, num_ranks}, topk_idx.options().dtype(at::kBool));
  moe_ep::layout::get_dispatch_layout(topk_idx.data_ptr<int64_t>(), num_tokens, topk_idx.size(1), num_experts,
                                      num_ranks, num_tokens_per_rank.data_ptr<int>(),
                                      num_tokens_per_expert.data_ptr<int>(), is_token_in_rank.data_ptr<bool>(),
                                      c10::cuda::getCurrentCUDAStream().stream());
  return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

// Test hook of csrc/bounded_wait.cuh: launches, on the current stream of flag's device, a kernel
// whose one thread waits until flag[0] == expected (timeout_s > 0: that many seconds; <= 0:
// MOE_EP_TIMEOUT_S, default 100 s), or prints its timeout line and traps. Returns at once.
void wait_test(const at::Tensor& flag, int64_t expected, double timeout_s, int64_t rank, int64_t channel) {
  TORCH_CHECK_VALUE(flag.is_cuda(), "flag must be a CUDA tensor");
  TORCH_CHECK_TYPE(flag.scalar_type() == at::kInt, "flag must have dtype torch.int32");
  TORCH_CHECK_VALUE(flag.numel() >= 1, "flag must have at least one element");
  TORCH_CHECK_VALUE(expected >= INT32_MIN && expected <= INT32_MAX, "expected must fit in int32");
  TORCH_CHECK_VALUE(rank >= INT32_MIN && rank <= INT32_MAX, "rank must fit in int32");
  TORCH_CHECK_VALUE(channel >= INT32_MIN && channel <= INT32_MAX, "channel must fit in int32");
  const c10::cuda::CUDAGuard guard(flag.device());
  moe_ep::wait::launch_wait_test(flag.data_ptr<int>(), static_cast<int>(expected), timeout_s, static_cast<int>(rank),
                                 static_cast<int>(channel), c10::cuda::getCurrentCUDAStream().stream());
}

// Intranode buffer runtime (csrc/ipc_buffer.h). Kernels run on the current stream of the
// buffer's device. Messages are plain text (see get_dispatch_layout); numbers in argument errors
// come from the torch-free layer.
using moe_ep::ipc::IpcBuffer;

std::unique_ptr<IpcBuffer> make_ipc_buffer(int64_t num_bytes, int64_t rank, int64_t num_ranks) {
  TORCH_CHECK_VALUE(num_ranks >= 1 && num_ranks <= moe_ep::ipc::kMaxRanks, "num_ranks must be in [1, 64]");
  TORCH_CHECK_VALUE(rank >= 0 && rank < num_ranks, "rank must be in [0, num_ranks)");
  return std::make_unique<IpcBuffer>(num_bytes, static_cast<int>(rank), static_cast<int>(num_ranks));
}

void ipc_barrier(IpcBuffer& buffer) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(buffer.device()));
  buffer.barrier(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(buffer.device())).stream());
}

void ipc_peer_copy(IpcBuffer& buffer, int64_t dst_rank, int64_t offset, const at::Tensor& src) {
  TORCH_CHECK_VALUE(src.is_cuda(), "src must be a CUDA tensor");
  TORCH_CHECK_VALUE(src.get_device() == buffer.device(), "src must be on the buffer's CUDA device");
  TORCH_CHECK_VALUE(src.is_contiguous(), "src must be contiguous (call .contiguous() first)");
  TORCH_CHECK_VALUE(dst_rank >= 0 && dst_rank < buffer.num_ranks(), "dst_rank must be in [0, num_ranks)");
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t num_bytes = src.numel() * static_cast<int64_t>(src.element_size());
  buffer.peer_copy(static_cast<int>(dst_rank), offset, src.data_ptr(), num_bytes,
                   c10::cuda::getCurrentCUDAStream(src.get_device()).stream());
}

at::Tensor ipc_local_view(IpcBuffer& buffer) {
  const auto options = at::TensorOptions()
                           .dtype(at::kByte)
                           .device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(buffer.device())));
  // No deleter: the memory belongs to the IpcBuffer, which the binding keeps alive (keep_alive).
  return torch::from_blob(buffer.local_data(), {buffer.num_bytes()}, options);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_ep CUDA kernels";
  m.def("is_sm90_compiled", &moe_ep::is_sm90_compiled, "Whether Hopper-only code paths were compiled");
  m.def("num_sms_of_device", &moe_ep::num_sms_of_device, "Multiprocessor count of a CUDA device");

  m.def("get_dispatch_layout", &get_dispatch_layout, pybind11::arg("topk_idx"), pybind11::arg("num_experts"),
        pybind11::arg("num_ranks"),
        "Layout of a dispatch: (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, "
        "is_token_in_rank [T, R] bool) of topk_idx [T, K] int64, on the current CUDA stream");
  m.attr("layout_max_ranks") = moe_ep::layout::kMaxRanks;
  m.attr("layout_max_experts") = moe_ep::layout::kMaxExperts;

  m.def("_wait_test", &wait_test, pybind11::arg("flag"), pybind11::arg("expected"), pybind11::arg("timeout_s"),
        pybind11::arg("rank"), pybind11::arg("channel"),
        "Test hook of the bounded device wait: on the current CUDA stream, wait until flag[0] == expected "
        "(flag: int32 CUDA tensor; timeout_s <= 0 means MOE_EP_TIMEOUT_S, default 100 s), else print the "
        "timeout line and trap (the CUDA context is then unusable)");

  pybind11::class_<IpcBuffer>(m, "IpcBuffer",
                              "A device buffer of this rank shared with the ranks of its node by CUDA IPC "
                              "(moe_ep.comm.ipc.open_intranode_buffer builds one collectively)")
      .def(pybind11::init(&make_ipc_buffer), pybind11::arg("num_bytes"), pybind11::arg("rank"),
           pybind11::arg("num_ranks"), "Allocate and zero num_bytes (plus a header) on the current CUDA device")
      .def("ipc_handle", [](const IpcBuffer& b) { return pybind11::bytes(b.ipc_handle()); },
           "This rank's cudaIpcMemHandle_t as bytes")
      .def("open_peers", &IpcBuffer::open_peers, pybind11::arg("handles"),
           "Open every rank's handle (list of bytes in rank order, own included); once")
      .def("barrier", &ipc_barrier,
           "Enqueue a barrier over all ranks on the current CUDA stream (bounded by MOE_EP_TIMEOUT_S)")
      .def("peer_copy", &ipc_peer_copy, pybind11::arg("dst_rank"), pybind11::arg("offset"), pybind11::arg("src"),
           "Enqueue a copy of src's bytes (contiguous CUDA tensor) into rank dst_rank's buffer at byte offset, "
           "on the current CUDA stream; visible there after a barrier")
      .def("local_view", &ipc_local_view, pybind11::keep_alive<0, 1>(),
           "This rank's region as a uint8 CUDA tensor of num_bytes (keeps the buffer alive)")
      .def("data_ptr", [](const IpcBuffer& b) { return reinterpret_cast<uintptr_t>(b.local_data()); })
      .def_property_readonly("num_bytes", &IpcBuffer::num_bytes)
      .def_property_readonly("rank", &IpcBuffer::rank)
      .def_property_readonly("num_ranks", &IpcBuffer::num_ranks)
      .def_property_readonly("device", &IpcBuffer::device)
      .def_property_readonly("epoch", &IpcBuffer::epoch, "Barriers enqueued so far")
      .def_property_readonly("peers_open", &IpcBuffer::peers_open);
  m.attr("ipc_max_ranks") = moe_ep::ipc::kMaxRanks;
  m.attr("ipc_header_bytes") = moe_ep::ipc::kHeaderBytes;

  // Kernel families present in this build; the Buffer runs kernels only for their calls.
  m.attr("kernel_families") = pybind11::make_tuple("layout");
}
