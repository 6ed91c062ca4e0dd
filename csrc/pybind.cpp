// The one Python module of moe_ep's CUDA side, and the only file that includes torch: each kernel
// family keeps a torch-free launcher (raw pointers + cudaStream_t) and registers a wrapper here.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <algorithm>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "binding_checks.h"
#include "bounded_wait_test.h"
#include "intranode.h"
#include "ipc_buffer.h"
#include "layout.h"
#include "ll_bindings.h"
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

// combine_sizes (hidden, x element bytes, top-k weight columns): the barrier before a combine
// compares them across ranks (moe_ep::ipc::combine_call_word); without, a plain barrier.
void ipc_barrier(IpcBuffer& buffer, const std::optional<std::tuple<int64_t, int64_t, int64_t>>& combine_sizes) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(buffer.device()));
  const uint64_t word = combine_sizes.has_value()
                            ? moe_ep::ipc::combine_call_word(std::get<0>(*combine_sizes), std::get<1>(*combine_sizes),
                                                             std::get<2>(*combine_sizes))
                            : 0;
  buffer.barrier(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(buffer.device())).stream(), word);
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

// Family "intranode" (csrc/intranode.h). Python (moe_ep/comm/backends/intranode.py) allocates the
// outputs and orders the steps; these wrappers check tensors and launch on the current stream.
namespace in = moe_ep::intranode;

in::Peers peers_of(const IpcBuffer& buffer) {
  TORCH_CHECK(buffer.peers_open(), "the IpcBuffer's peers are not open (use moe_ep.comm.ipc.open_intranode_buffer)");
  return in::Peers{buffer.device_peer_table(), moe_ep::ipc::kHeaderBytes, buffer.rank(), buffer.num_ranks()};
}

cudaStream_t stream_of(const IpcBuffer& buffer) { return moe_ep::current_stream_of(buffer.device()); }

void check_on_buffer(const at::Tensor& t, const IpcBuffer& buffer, const char* name) {
  moe_ep::check_on_device(t, buffer.device(), name);
}

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t, const IpcBuffer& buffer, const char* name) {
  return moe_ep::ptr_or_null<T>(t, buffer.device(), name);
}

// Bytes of one row (every dimension after the first), also for tensors with 0 rows.
int64_t row_bytes_of(const at::Tensor& t) {
  if (t.dim() < 2) return 0;
  int64_t elements = 1;
  for (int64_t d = 1; d < t.dim(); ++d) elements *= t.size(d);
  return elements * t.element_size();
}

// (unroll, chunk_rows, send_warps, combine_send_warps, combine_staged_vectors, direct_send_warps), as
// moe_ep.comm.backends.intranode.IntranodeKnobs.launch_tuple().
in::Knobs knobs_of(const std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>& knobs) {
  return in::Knobs{static_cast<int>(std::get<0>(knobs)), static_cast<int>(std::get<1>(knobs)),
                   static_cast<int>(std::get<2>(knobs)), static_cast<int>(std::get<3>(knobs)),
                   static_cast<int>(std::get<4>(knobs)), static_cast<int>(std::get<5>(knobs))};
}

// A dispatch's notify. With is_token_in_rank (a routed dispatch) the kernel also routes the tokens
// into send_slot / send_lists and finds topk_idx's range; without, it is the cached dispatch's barrier.
// sizes: this rank's CallSizes (csrc/intranode.h, kCallSizes entries in that order).
void intranode_notify(IpcBuffer& buffer, in::HostRecord& record, const std::vector<int64_t>& sizes,
                      const std::optional<at::Tensor>& is_token_in_rank,
                      const std::optional<at::Tensor>& expert_counts, const std::optional<at::Tensor>& topk_idx,
                      int64_t num_tokens, int64_t expert_alignment, int64_t num_worst_tokens,
                      const std::optional<at::Tensor>& send_slot, const std::optional<at::Tensor>& send_lists,
                      const std::optional<at::Tensor>& rank_prefix_matrix, int64_t epoch) {
  const bool with_counts = is_token_in_rank.has_value();
  const int64_t R = buffer.num_ranks();
  TORCH_CHECK_VALUE(sizes.size() == in::kCallSizes, "sizes must have ", in::kCallSizes, " entries, got ", sizes.size());
  in::CallSizes call_sizes{};
  std::copy(sizes.begin(), sizes.end(), call_sizes.v);
  for (const auto* t : {&expert_counts, &send_slot, &send_lists, &rank_prefix_matrix}) {
    if (t->has_value()) TORCH_CHECK_TYPE((*t)->scalar_type() == at::kInt, "notify's index tensors must be int32");
  }
  if (with_counts) {
    TORCH_CHECK_TYPE(is_token_in_rank->scalar_type() == at::kBool, "is_token_in_rank must be bool");
    TORCH_CHECK_VALUE(is_token_in_rank->dim() == 2 && is_token_in_rank->size(0) == num_tokens &&
                      is_token_in_rank->size(1) == R, "is_token_in_rank must be [num_tokens, num_ranks]");
    TORCH_CHECK_VALUE(send_slot.has_value() && send_slot->numel() == num_tokens * R, "send_slot must have T * R entries");
    TORCH_CHECK_VALUE(send_lists.has_value() && send_lists->numel() == num_tokens * R,
                      "send_lists must have R * T entries");
    TORCH_CHECK_VALUE(rank_prefix_matrix.has_value() && rank_prefix_matrix->numel() == R * R,
                      "rank_prefix_matrix must have R * R entries");
  }
  int num_topk = 0;
  if (topk_idx.has_value()) {
    TORCH_CHECK_TYPE(topk_idx->scalar_type() == at::kLong, "topk_idx must be int64");
    TORCH_CHECK_VALUE(topk_idx->dim() == 2 && topk_idx->size(0) == num_tokens, "topk_idx must be [num_tokens, K]");
    num_topk = static_cast<int>(topk_idx->size(1));
  }
  const int num_experts = expert_counts.has_value() ? static_cast<int>(expert_counts->numel()) : 0;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(buffer.device()));
  in::launch_notify(peers_of(buffer), call_sizes, with_counts, num_tokens,
                    ptr_or_null<const bool>(is_token_in_rank, buffer, "is_token_in_rank"),
                    ptr_or_null<const int64_t>(topk_idx, buffer, "topk_idx"), num_topk,
                    ptr_or_null<const int>(expert_counts, buffer, "expert_counts"), num_experts,
                    static_cast<int>(expert_alignment), static_cast<int>(num_worst_tokens),
                    ptr_or_null<int>(send_slot, buffer, "send_slot"), ptr_or_null<int>(send_lists, buffer, "send_lists"),
                    ptr_or_null<int>(rank_prefix_matrix, buffer, "rank_prefix_matrix"), record.device_view(), epoch,
                    stream_of(buffer));
}

// The record's sizes once it reaches epoch: None on timeout; ("sizes differ", every rank's
// CallSizes as lists) when the ranks passed other sizes; else the tuple of IntranodeHostRecord.wait.
pybind11::object host_record_wait(const in::HostRecord& record, int64_t epoch, double timeout_s, int64_t num_local,
                                  int64_t num_ranks) {
  bool ok = false;
  {
    pybind11::gil_scoped_release release;
    ok = record.wait(epoch, timeout_s);
  }
  if (!ok) return pybind11::none();
  const auto& view = record.host_view();
  if (view.sizes_differ != 0) {
    pybind11::list every;
    for (int64_t r = 0; r < num_ranks; ++r) {
      every.append(std::vector<long long>(view.sizes[r].v, view.sizes[r].v + in::kCallSizes));
    }
    return pybind11::make_tuple("sizes differ", every);
  }
  // Built in place (no append per entry): this runs after the host wait, while the GPU idles.
  pybind11::list counts(num_local);
  for (int64_t e = 0; e < num_local; ++e) {
    counts[static_cast<size_t>(e)] = pybind11::reinterpret_steal<pybind11::object>(PyLong_FromLong(view.counts[e]));
  }
  return pybind11::make_tuple(view.num_recv, view.max_tokens, counts, view.max_buffer_rows, view.max_buffer_rank,
                              view.id_min, view.id_max);
}

// Uninitialised tensors on `device` (its current stream, and the caller's receive pool when one is
// selected), one per spec (shape, dtype); None stays None. Python decides every shape and dtype;
// this only spares the interpreter a torch.empty per tensor (a few µs each), which matters for the
// dispatch's outputs: they are allocated after its host wait, while the GPU idles.
pybind11::list empty_tensors(const std::vector<std::optional<std::tuple<std::vector<int64_t>, at::ScalarType>>>& specs,
                             int64_t device) {
  const auto options = at::TensorOptions().device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  pybind11::list out(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!specs[i].has_value()) {
      out[i] = pybind11::none();
      continue;
    }
    const auto& [shape, dtype] = *specs[i];
    for (const int64_t n : shape) TORCH_CHECK_VALUE(n >= 0, "empty_tensors: a negative size");
    out[i] = pybind11::cast(at::empty(shape, options.dtype(dtype)));
  }
  return out;
}

// Where a tensor in the receive pool (the buffer's region from byte pool_offset on) is, as the
// offset from the allocation base that peers add to their peer-table entry; it must lie there
// whole, 16-byte aligned.
long long pool_offset_of(const IpcBuffer& buffer, int64_t pool_offset, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(pool_offset >= 0 && pool_offset < buffer.num_bytes(), "pool_offset must be inside the buffer's region");
  const auto* base = static_cast<const char*>(buffer.local_data()) - moe_ep::ipc::kHeaderBytes;
  const auto* begin = static_cast<const char*>(buffer.local_data()) + pool_offset;
  const auto* end = static_cast<const char*>(buffer.local_data()) + buffer.num_bytes();
  const auto* p = static_cast<const char*>(t.data_ptr());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  TORCH_CHECK_VALUE(t.is_contiguous() && p >= begin && p + bytes <= end && reinterpret_cast<uintptr_t>(p) % 16 == 0,
                    name, " is not a contiguous, 16-byte aligned tensor inside the receive pool (allocate it from "
                    "the engine's pool)");
  return static_cast<long long>(p - base);
}

// The direct-receive part of a transfer: with pool_offset >= 0 the outputs live in the receive
// pool and their offsets are published; every output must lie there whole.
in::DirectReceive direct_receive_of(const IpcBuffer& buffer, bool enabled, int64_t pool_offset, bool cached,
                                    const at::Tensor& recv_x, const std::optional<at::Tensor>& recv_scales,
                                    const std::optional<at::Tensor>& recv_topk_idx,
                                    const std::optional<at::Tensor>& recv_topk_weights,
                                    const at::Tensor& recv_src_idx) {
  in::DirectReceive direct;
  direct.enabled = enabled;
  if (!enabled || pool_offset < 0 || recv_x.size(0) == 0) return direct;
  auto offset_of = [&](const at::Tensor& t, const char* name) { return pool_offset_of(buffer, pool_offset, t, name); };
  direct.own.x = offset_of(recv_x, "recv_x");
  if (recv_scales.has_value()) direct.own.scales = offset_of(*recv_scales, "recv_scales");
  if (recv_topk_idx.has_value()) direct.own.idx = offset_of(*recv_topk_idx, "recv_topk_idx");
  if (recv_topk_weights.has_value()) direct.own.weights = offset_of(*recv_topk_weights, "recv_topk_weights");
  if (!cached) direct.own.src = offset_of(recv_src_idx, "recv_src_idx");
  return direct;
}

void intranode_transfer(IpcBuffer& buffer, const at::Tensor& x, const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                        const at::Tensor& send_lists, const at::Tensor& rank_prefix_matrix, int64_t max_pair_rows,
                        bool cached, const at::Tensor& recv_src_idx, const at::Tensor& recv_x,
                        const std::optional<at::Tensor>& recv_scales, const std::optional<at::Tensor>& recv_topk_idx,
                        const std::optional<at::Tensor>& recv_topk_weights, int64_t num_local_experts,
                        const std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>& knobs, int64_t num_sms,
                        bool skip_peer_copy, bool direct_receive, int64_t pool_offset) {
  check_on_buffer(x, buffer, "x");
  check_on_buffer(recv_x, buffer, "recv_x");
  check_on_buffer(recv_src_idx, buffer, "recv_src_idx");
  check_on_buffer(send_lists, buffer, "send_lists");
  check_on_buffer(rank_prefix_matrix, buffer, "rank_prefix_matrix");
  TORCH_CHECK_VALUE(x.dim() == 2 && recv_x.dim() == 2, "x and recv_x must be 2-D");
  TORCH_CHECK_TYPE(send_lists.scalar_type() == at::kInt && rank_prefix_matrix.scalar_type() == at::kInt &&
                       recv_src_idx.scalar_type() == at::kInt,
                   "send_lists, rank_prefix_matrix and recv_src_idx must be int32");
  const int num_topk = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
  const auto layout = in::make_row_layout(x.size(1) * x.element_size(),
                                          scales.has_value() ? row_bytes_of(*scales) : 0, num_topk);
  const in::DirectReceive direct = direct_receive_of(buffer, direct_receive, pool_offset, cached, recv_x, recv_scales,
                                                    recv_topk_idx, recv_topk_weights, recv_src_idx);
  const c10::cuda::CUDAGuard guard(x.device());
  in::launch_transfer(peers_of(buffer), layout, x.size(0), x.data_ptr(), ptr_or_null<const void>(scales, buffer, "scales"),
                      ptr_or_null<const int64_t>(topk_idx, buffer, "topk_idx"),
                      ptr_or_null<const float>(topk_weights, buffer, "topk_weights"), send_lists.data_ptr<int>(),
                      rank_prefix_matrix.data_ptr<int>(), max_pair_rows, cached, recv_src_idx.data_ptr<int>(),
                      recv_x.data_ptr(), ptr_or_null<void>(recv_scales, buffer, "recv_scales"),
                      ptr_or_null<int64_t>(recv_topk_idx, buffer, "recv_topk_idx"),
                      ptr_or_null<float>(recv_topk_weights, buffer, "recv_topk_weights"), recv_x.size(0),
                      static_cast<int>(num_local_experts), knobs_of(knobs), direct, static_cast<int>(num_sms),
                      stream_of(buffer), skip_peer_copy);
}

void intranode_combine(IpcBuffer& buffer, const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
                       const at::Tensor& is_token_in_rank, const at::Tensor& send_slot,
                       const at::Tensor& rank_prefix_matrix, int64_t stride_rows, int64_t num_topk,
                       const std::optional<at::Tensor>& bias0, const std::optional<at::Tensor>& bias1,
                       const at::Tensor& out, const std::optional<at::Tensor>& out_weights,
                       const std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>& knobs, int64_t num_sms,
                       bool pull, int64_t pool_offset) {
  check_on_buffer(x, buffer, "x");
  check_on_buffer(out, buffer, "out");
  check_on_buffer(is_token_in_rank, buffer, "is_token_in_rank");
  check_on_buffer(send_slot, buffer, "send_slot");
  check_on_buffer(rank_prefix_matrix, buffer, "rank_prefix_matrix");
  TORCH_CHECK_TYPE(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat, "out must be bfloat16 or float32");
  TORCH_CHECK_TYPE(x.scalar_type() == out.scalar_type(), "x and out must have one dtype");
  TORCH_CHECK_TYPE(send_slot.scalar_type() == at::kInt && rank_prefix_matrix.scalar_type() == at::kInt,
                   "send_slot and rank_prefix_matrix must be int32");
  TORCH_CHECK_VALUE(x.dim() == 2 && out.dim() == 2 && x.size(1) == out.size(1), "x and out must be [*, hidden]");
  auto is_bf16 = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->scalar_type() == at::kBFloat16; };
  const auto* epoch = reinterpret_cast<const long long*>(static_cast<const char*>(buffer.local_data()) -
                                                         moe_ep::ipc::kHeaderBytes) + moe_ep::ipc::kEpochSlot;
  // Pull protocol: with pool_offset >= 0 this rank's x (and weights) are read by its peers in place.
  in::CombinePull combine_pull;
  combine_pull.enabled = pull;
  if (pull && pool_offset >= 0 && x.numel() > 0) {
    combine_pull.x = pool_offset_of(buffer, pool_offset, x, "x");
    if (num_topk > 0) {
      TORCH_CHECK_VALUE(topk_weights.has_value(), "topk_weights are needed with num_topk > 0");
      combine_pull.weights = pool_offset_of(buffer, pool_offset, *topk_weights, "topk_weights");
    }
  }
  const c10::cuda::CUDAGuard guard(out.device());
  in::launch_combine(peers_of(buffer), epoch, out.size(0), out.size(1), out.scalar_type() == at::kBFloat16,
                     x.data_ptr(), ptr_or_null<const float>(topk_weights, buffer, "topk_weights"),
                     static_cast<int>(num_topk), is_token_in_rank.data_ptr<bool>(), send_slot.data_ptr<int>(),
                     rank_prefix_matrix.data_ptr<int>(), stride_rows, ptr_or_null<const void>(bias0, buffer, "bias0"),
                     is_bf16(bias0), ptr_or_null<const void>(bias1, buffer, "bias1"), is_bf16(bias1), out.data_ptr(),
                     ptr_or_null<float>(out_weights, buffer, "out_weights"), knobs_of(knobs), combine_pull,
                     static_cast<int>(num_sms), stream_of(buffer));
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
      .def_static("adopt",
                  [](const std::vector<uintptr_t>& bases, int64_t rank, int64_t num_bytes) {
                    TORCH_CHECK_VALUE(rank >= 0 && rank < static_cast<int64_t>(bases.size()),
                                      "rank must be in [0, len(bases))");
                    return IpcBuffer::adopt(bases, static_cast<int>(rank), num_bytes);
                  },
                  pybind11::arg("bases"), pybind11::arg("rank"), pybind11::arg("num_bytes"),
                  "Wrap memory every rank already reaches (bases[i]: rank i's allocation of header + num_bytes, "
                  "zeroed, as addresses in this process, e.g. from nvshmem_ptr); nothing is allocated or freed")
      .def("ipc_handle", [](const IpcBuffer& b) { return pybind11::bytes(b.ipc_handle()); },
           "This rank's cudaIpcMemHandle_t as bytes")
      .def("open_peers", &IpcBuffer::open_peers, pybind11::arg("handles"),
           "Open every rank's handle (list of bytes in rank order, own included); once")
      .def("barrier", &ipc_barrier, pybind11::arg("combine_sizes") = std::nullopt,
           "Enqueue a barrier over all ranks on the current CUDA stream (bounded by MOE_EP_TIMEOUT_S); with "
           "combine_sizes (hidden, x element bytes, top-k weight columns) a rank whose peer passed others traps "
           "with a message naming both")
      .def("peer_copy", &ipc_peer_copy, pybind11::arg("dst_rank"), pybind11::arg("offset"), pybind11::arg("src"),
           "Enqueue a copy of src's bytes (contiguous CUDA tensor) into rank dst_rank's buffer at byte offset, "
           "on the current CUDA stream; visible there after a barrier")
      .def("local_view", &ipc_local_view, pybind11::keep_alive<0, 1>(),
           "This rank's region as a uint8 CUDA tensor of num_bytes (keeps the buffer alive)")
      .def("data_ptr", [](const IpcBuffer& b) { return reinterpret_cast<uintptr_t>(b.local_data()); })
      .def("ll_view",
           [](const IpcBuffer& b) {
             TORCH_CHECK(b.peers_open(), "the IpcBuffer's peers are not open");
             return pybind11::make_tuple(reinterpret_cast<uintptr_t>(b.device_peer_table()), moe_ep::ipc::kHeaderBytes,
                                         b.rank(), b.num_ranks(), b.num_bytes(), b.device());
           },
           "What the low-latency launchers (moe_ep._C's or moe_ep._nvshmem's) need of this buffer: (device peer "
           "table address, region offset, rank, num_ranks, num_bytes, device); valid while the buffer lives")
      .def_property_readonly("num_bytes", &IpcBuffer::num_bytes)
      .def_property_readonly("rank", &IpcBuffer::rank)
      .def_property_readonly("num_ranks", &IpcBuffer::num_ranks)
      .def_property_readonly("device", &IpcBuffer::device)
      .def_property_readonly("epoch", &IpcBuffer::epoch, "Barriers enqueued so far")
      .def_property_readonly("peers_open", &IpcBuffer::peers_open);
  m.attr("ipc_max_ranks") = moe_ep::ipc::kMaxRanks;
  m.attr("ipc_header_bytes") = moe_ep::ipc::kHeaderBytes;

  pybind11::class_<in::HostRecord>(m, "IntranodeHostRecord",
                                   "Mapped pinned host memory where a dispatch's notify step publishes receive sizes")
      .def(pybind11::init<>())
      .def("wait", &host_record_wait, pybind11::arg("epoch"), pybind11::arg("timeout_s"), pybind11::arg("num_local_experts"),
           pybind11::arg("num_ranks"),
           "Wait (GIL released) until the record reaches epoch: (num_recv, max_tokens, counts, max_buffer_rows, "
           "max_buffer_rank, id_min, id_max), or ('sizes differ', [each rank's call sizes]), or None on timeout");
  m.def("intranode_notify", &intranode_notify, pybind11::arg("buffer"), pybind11::arg("record"), pybind11::arg("sizes"),
        pybind11::arg("is_token_in_rank"), pybind11::arg("expert_counts"), pybind11::arg("topk_idx"),
        pybind11::arg("num_tokens"), pybind11::arg("expert_alignment"), pybind11::arg("num_worst_tokens"),
        pybind11::arg("send_slot"), pybind11::arg("send_lists"), pybind11::arg("rank_prefix_matrix"),
        pybind11::arg("epoch"));
  m.def("intranode_transfer", &intranode_transfer, pybind11::arg("buffer"), pybind11::arg("x"), pybind11::arg("scales"),
        pybind11::arg("topk_idx"), pybind11::arg("topk_weights"), pybind11::arg("send_lists"),
        pybind11::arg("rank_prefix_matrix"), pybind11::arg("max_pair_rows"), pybind11::arg("cached"),
        pybind11::arg("recv_src_idx"), pybind11::arg("recv_x"), pybind11::arg("recv_scales"),
        pybind11::arg("recv_topk_idx"), pybind11::arg("recv_topk_weights"), pybind11::arg("num_local_experts"),
        pybind11::arg("knobs"), pybind11::arg("num_sms"), pybind11::arg("skip_peer_copy") = false,
        pybind11::arg("direct_receive") = false, pybind11::arg("pool_offset") = -1,
        "skip_peer_copy: a diagnostic (the loopback benchmark's --isolate): peer rows are waited for, not copied. "
        "direct_receive: the group's direct-receive protocol (every rank alike); pool_offset >= 0: this rank's "
        "outputs are in its receive pool, which starts that many bytes into the region");
  m.def("intranode_combine", &intranode_combine, pybind11::arg("buffer"), pybind11::arg("x"),
        pybind11::arg("topk_weights"), pybind11::arg("is_token_in_rank"), pybind11::arg("send_slot"),
        pybind11::arg("rank_prefix_matrix"), pybind11::arg("stride_rows"), pybind11::arg("num_topk"),
        pybind11::arg("bias0"), pybind11::arg("bias1"), pybind11::arg("out"), pybind11::arg("out_weights"),
        pybind11::arg("knobs"), pybind11::arg("num_sms"), pybind11::arg("pull") = false,
        pybind11::arg("pool_offset") = -1,
        "pull: the group's pull protocol (every rank alike); pool_offset >= 0: this rank's x and topk_weights are in "
        "its receive pool (which starts that many bytes into the region) and its peers read them in place");
  m.def("intranode_dispatch_bytes", [](int64_t buffer_rows, int64_t x_bytes, int64_t scale_bytes, int64_t num_topk) {
    return in::dispatch_bytes_needed(buffer_rows, in::make_row_layout(x_bytes, scale_bytes, static_cast<int>(num_topk)));
  }, pybind11::arg("buffer_rows"), pybind11::arg("x_bytes"), pybind11::arg("scale_bytes"), pybind11::arg("num_topk"),
     "Bytes of num_nvl_bytes a dispatch needs on a rank whose buffer receives buffer_rows rows from its peers");
  m.def("intranode_combine_bytes", [](int64_t stride_rows, int64_t x_bytes, int64_t num_topk_weights, int64_t num_ranks) {
    return in::combine_bytes_needed(stride_rows, in::combine_row_bytes(x_bytes, static_cast<int>(num_topk_weights)),
                                    static_cast<int>(num_ranks));
  }, pybind11::arg("stride_rows"), pybind11::arg("x_bytes"), pybind11::arg("num_topk_weights"), pybind11::arg("num_ranks"));
  m.def("empty_tensors", &empty_tensors, pybind11::arg("specs"), pybind11::arg("device"),
        "Uninitialised CUDA tensors on device (an index), one per (shape, dtype) spec, None for None: "
        "torch.empty of each, in one call");
  m.attr("intranode_max_experts") = in::kMaxExperts;
  m.attr("intranode_max_ranks") = in::kMaxRanks;

  moe_ep::bind_low_latency(m);

  // Kernel families present in this build; the Buffer runs kernels only for their calls.
  m.attr("kernel_families") = pybind11::make_tuple("layout", "intranode", "low_latency");
}
