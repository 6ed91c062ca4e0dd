// pybind11 wrappers of the kernel family "low_latency" (csrc/low_latency.h), compiled into both
// modules: moe_ep._C (stores into mapped peers only) and moe_ep._nvshmem (the same kernels built
// with NVSHMEM's device library, so a put_mask may name ranks reached by puts). A buffer comes as
// its ll_view() tuple, so neither module needs the other's classes.
#include "ll_bindings.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "binding_checks.h"
#include "intranode.h"
#include "low_latency.h"

namespace moe_ep {
namespace {

namespace ll = moe_ep::low_latency;

// IpcBuffer.ll_view(): (device peer table, region offset, rank, num_ranks, num_bytes, device).
using ViewTuple = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct BufferView {
  explicit BufferView(const ViewTuple& t)
      : table(reinterpret_cast<void* const*>(std::get<0>(t))), region_offset(std::get<1>(t)),
        rank_(static_cast<int>(std::get<2>(t))), ranks_(static_cast<int>(std::get<3>(t))), bytes_(std::get<4>(t)),
        device_(static_cast<int>(std::get<5>(t))) {
    TORCH_CHECK_VALUE(table != nullptr, "view: the buffer's peer table is null");
    TORCH_CHECK_VALUE(ranks_ >= 1 && ranks_ <= ll::kMaxRanks && rank_ >= 0 && rank_ < ranks_,
                      "view: rank must be in [0, num_ranks) and num_ranks in [1, 64]");
  }
  int num_ranks() const { return ranks_; }
  int64_t num_bytes() const { return bytes_; }
  int device() const { return device_; }
  void* const* table;
  int64_t region_offset;
  int rank_, ranks_;
  int64_t bytes_;
  int device_;
};

intranode::Peers peers_of(const BufferView& buffer) {
  return intranode::Peers{buffer.table, buffer.region_offset, buffer.rank_, buffer.ranks_};
}
cudaStream_t stream_of(const BufferView& buffer) { return current_stream_of(buffer.device()); }
void check_on_buffer(const at::Tensor& t, const BufferView& buffer, const char* name) {
  check_on_device(t, buffer.device(), name);
}
template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t, const BufferView& buffer, const char* name) {
  return moe_ep::ptr_or_null<T>(t, buffer.device(), name);
}

// Wait-time statistics (*_wait_recv_cost_stats): this rank's row, [R] int64 (the Buffer passes
// row `rank` of an [R, R] tensor), or null.
long long* wait_stats_row(const std::optional<at::Tensor>& stats, const BufferView& buffer, const char* name) {
  if (!stats.has_value()) return nullptr;
  const int64_t r = buffer.num_ranks();
  TORCH_CHECK_TYPE(stats->scalar_type() == at::kLong, name, " must be int64");
  TORCH_CHECK_VALUE(stats->dim() == 1 && stats->size(0) == r && stats->is_contiguous(), name,
                    " must be a contiguous [", r, "] tensor (this rank's row)");
  return ptr_or_null<long long>(stats, buffer, name);
}

// Family "low_latency" (csrc/low_latency.h): Python (moe_ep/comm/backends/low_latency.py) owns the
// buffers and the double-buffer index; these wrappers check sizes and launch on the current stream.

ll::LLLayout ll_layout_for(const BufferView& buffer, int64_t num_experts, int64_t m, int64_t hidden, int64_t num_topk,
                           bool use_fp8, int64_t buffer_index, bool puts) {
  const auto layout = ll::make_layout(buffer.num_ranks(), static_cast<int>(num_experts), static_cast<int>(m),
                                      static_cast<int>(hidden), static_cast<int>(num_topk), use_fp8);
  TORCH_CHECK_VALUE(buffer_index == 0 || buffer_index == 1, "buffer_index must be 0 or 1");
  TORCH_CHECK_VALUE((puts ? ll::region_bytes_with_outbox(layout) : ll::region_bytes(layout)) <= buffer.num_bytes(),
                    "the low-latency buffer is too small for these sizes (see moe_ep.comm.backends.low_latency.ll_size_hint)");
  return layout;
}

// The dispatch result's routing workspace (int32, at least layout.ws_ints elements).
void check_routing(const at::Tensor& routing, const ll::LLLayout& layout, const BufferView& buffer) {
  check_on_buffer(routing, buffer, "routing");
  TORCH_CHECK_VALUE(routing.scalar_type() == at::kInt && routing.numel() >= layout.ws_ints,
                    "routing must be int32 with at least ", layout.ws_ints, " elements (ll_layout_info's routing_ints)");
}

// The diagnostic trace (csrc/low_latency.h): int64 with ll_trace_ints elements, or None.
unsigned long long* ll_trace_of(const std::optional<at::Tensor>& trace, const BufferView& buffer) {
  if (!trace.has_value()) return nullptr;
  check_on_buffer(*trace, buffer, "trace");
  TORCH_CHECK_VALUE(trace->scalar_type() == at::kLong && trace->is_contiguous() && trace->numel() >= ll::kTraceInts,
                    "trace must be a contiguous int64 tensor of at least ", ll::kTraceInts, " elements");
  return reinterpret_cast<unsigned long long*>(trace->data_ptr<int64_t>());
}

// What every low-latency launch carries besides its tensors (DispatchArgs and CombineArgs alike):
// the peers, the layout and the areas of the buffer in use, the bounded waits' timeout, the put
// mask and outbox, the diagnostic trace.
template <typename Args>
void set_launch_fields(Args& a, const ll::LLLayout& layout, int64_t buffer_index, uint64_t put_mask,
                       const std::optional<at::Tensor>& trace, const BufferView& buffer) {
  a.peers = peers_of(buffer);
  a.layout = layout;
  a.flags_offset = ll::flags_offset(buffer_index);
  a.data_offset = ll::data_offset(layout, buffer_index);
  a.timeout_ns = ll::timeout_ns_from_env();
  a.put_mask = put_mask;
  a.outbox_offset = ll::outbox_offset(layout);
  a.trace = ll_trace_of(trace, buffer);
}

void ll_dispatch(const ViewTuple& view, bool send, bool recv, int64_t num_experts, int64_t m, int64_t buffer_index,
                 const at::Tensor& x, const at::Tensor& topk_idx, const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& mask_snapshot, bool use_fp8,
                 bool round_scale, bool use_ue8m0, const at::Tensor& counts_e, const at::Tensor& pair_pos,
                 const at::Tensor& send_done, const at::Tensor& recv_x, const std::optional<at::Tensor>& recv_scales, const at::Tensor& recv_count,
                 const at::Tensor& src_info, const at::Tensor& layout_range, const std::optional<at::Tensor>& stats,
                 const at::Tensor& routing, int64_t num_sms, bool fused, const std::optional<at::Tensor>& trace,
                 uint64_t put_mask, const std::optional<at::Tensor>& wait_stats) {
  const BufferView buffer(view);
  check_on_buffer(x, buffer, "x");
  check_on_buffer(topk_idx, buffer, "topk_idx");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "x must be bfloat16");
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, "topk_idx must be int64");
  const auto layout =
      ll_layout_for(buffer, num_experts, m, x.size(1), topk_idx.size(1), use_fp8, buffer_index, put_mask != 0);
  ll::DispatchArgs a;
  a.x = x.data_ptr();
  a.topk_idx = topk_idx.data_ptr<int64_t>();
  a.num_tokens = static_cast<int>(x.size(0));
  a.mask = ptr_or_null<const int>(mask, buffer, "mask");
  a.mask_snapshot = ptr_or_null<int>(mask_snapshot, buffer, "mask_snapshot");
  if (mask.has_value() && mask_snapshot.has_value()) {
    TORCH_CHECK_VALUE(mask->numel() == mask_snapshot->numel() && mask_snapshot->scalar_type() == at::kInt,
                      "mask_snapshot must be int32 with as many elements as mask");
  }
  a.round_scale = round_scale;
  a.use_ue8m0 = use_ue8m0;
  a.counts_e = static_cast<int*>(counts_e.data_ptr());
  a.pair_pos = static_cast<int*>(pair_pos.data_ptr());
  check_on_buffer(send_done, buffer, "send_done");
  TORCH_CHECK_VALUE(send_done.scalar_type() == at::kInt && send_done.numel() >= num_experts,
                    "send_done must be int32 with at least num_experts elements");
  a.send_done = static_cast<int*>(send_done.data_ptr());
  a.recv_x = recv_x.data_ptr();
  a.recv_scales = ptr_or_null<void>(recv_scales, buffer, "recv_scales");
  a.recv_count = static_cast<int*>(recv_count.data_ptr());
  a.src_info = static_cast<int*>(src_info.data_ptr());
  a.layout_range = static_cast<int64_t*>(layout_range.data_ptr());
  a.cumulative_stats = ptr_or_null<int>(stats, buffer, "cumulative_local_expert_recv_stats");
  a.wait_stats = wait_stats_row(wait_stats, buffer, "dispatch_wait_recv_cost_stats");
  check_routing(routing, layout, buffer);
  a.routing = routing.data_ptr<int>();
  set_launch_fields(a, layout, buffer_index, put_mask, trace, buffer);
  const c10::cuda::CUDAGuard guard(x.device());
  const int sms = static_cast<int>(num_sms);
  // Wait-time statistics are kept by the split kernels only (the fused ones stay as they are without).
  if (send && recv && fused && a.wait_stats == nullptr) {
    ll::launch_dispatch(a, sms, stream_of(buffer));
    return;
  }
  if (send) ll::launch_dispatch_send(a, sms, stream_of(buffer));
  if (recv) {
    ll::DispatchArgs r = a;  // the receive reads the mask the send used
    if (a.mask_snapshot != nullptr) r.mask = a.mask_snapshot;
    r.mask_snapshot = nullptr;
    ll::launch_dispatch_recv(r, sms, stream_of(buffer));
  }
}

void ll_combine(const ViewTuple& view, bool send, bool recv, int64_t num_experts, int64_t m, int64_t buffer_index,
                bool dispatch_used_fp8, const at::Tensor& x, const at::Tensor& layout_range, const at::Tensor& topk_idx,
                const at::Tensor& topk_weights, const std::optional<at::Tensor>& mask, const at::Tensor& pair_pos,
                const at::Tensor& src_info, const at::Tensor& routing, const at::Tensor& out, int64_t num_sms,
                bool fused, const std::optional<at::Tensor>& trace, uint64_t put_mask, bool bf16_partials,
                const std::optional<at::Tensor>& wait_stats) {
  const BufferView buffer(view);
  check_on_buffer(x, buffer, "x");
  check_on_buffer(out, buffer, "out");
  check_on_buffer(topk_weights, buffer, "topk_weights");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16, "x and out must be bfloat16");
  TORCH_CHECK_TYPE(topk_weights.scalar_type() == at::kFloat, "topk_weights must be float32");
  const auto layout =
      ll_layout_for(buffer, num_experts, m, x.size(2), topk_idx.size(1), dispatch_used_fp8, buffer_index, put_mask != 0);
  ll::CombineArgs a;
  a.x = x.data_ptr();
  a.layout_range = static_cast<const int64_t*>(layout_range.data_ptr());
  a.topk_idx = topk_idx.data_ptr<int64_t>();
  a.topk_weights = topk_weights.data_ptr<float>();
  a.num_tokens = static_cast<int>(topk_idx.size(0));
  a.mask = ptr_or_null<const int>(mask, buffer, "mask");
  a.pair_pos = static_cast<const int*>(pair_pos.data_ptr());
  check_on_buffer(src_info, buffer, "src_info");
  a.src_info = src_info.data_ptr<int>();
  check_routing(routing, layout, buffer);
  a.routing = routing.data_ptr<int>();
  a.out = out.data_ptr();
  a.bf16_partials = bf16_partials;
  a.wait_stats = wait_stats_row(wait_stats, buffer, "combine_wait_recv_cost_stats");
  set_launch_fields(a, layout, buffer_index, put_mask, trace, buffer);
  const c10::cuda::CUDAGuard guard(x.device());
  const int sms = static_cast<int>(num_sms);
  if (send && recv && fused && a.wait_stats == nullptr) {  // statistics: split kernels, as the dispatch
    ll::launch_combine(a, sms, stream_of(buffer));
    return;
  }
  if (send) ll::launch_combine_send(a, sms, stream_of(buffer));
  if (recv) ll::launch_combine_recv(a, sms, stream_of(buffer));
}

pybind11::dict ll_layout_info(int64_t num_ranks, int64_t num_experts, int64_t m, int64_t hidden, int64_t num_topk,
                              bool use_fp8) {
  const auto l = ll::make_layout(static_cast<int>(num_ranks), static_cast<int>(num_experts), static_cast<int>(m),
                                 static_cast<int>(hidden), static_cast<int>(num_topk), use_fp8);
  pybind11::dict d;
  d["buffer_bytes"] = l.buffer_bytes;
  d["flags_bytes"] = ll::kFlagsBytes;
  d["region_bytes"] = ll::region_bytes(l);
  d["region_bytes_with_outbox"] = ll::region_bytes_with_outbox(l);
  d["msg_bytes"] = l.msg_bytes;
  d["routing_ints"] = l.ws_ints;
  return d;
}

}  // namespace

void bind_low_latency(pybind11::module_& m) {
  m.def("ll_dispatch", &ll_dispatch, pybind11::arg("view"), pybind11::arg("send"), pybind11::arg("recv"),
        pybind11::arg("num_experts"), pybind11::arg("m"), pybind11::arg("buffer_index"), pybind11::arg("x"),
        pybind11::arg("topk_idx"), pybind11::arg("mask"), pybind11::arg("mask_snapshot"), pybind11::arg("use_fp8"),
        pybind11::arg("round_scale"),
        pybind11::arg("use_ue8m0"), pybind11::arg("counts_e"), pybind11::arg("pair_pos"),
        pybind11::arg("send_done"), pybind11::arg("recv_x"),
        pybind11::arg("recv_scales"), pybind11::arg("recv_count"), pybind11::arg("src_info"),
        pybind11::arg("layout_range"), pybind11::arg("stats"), pybind11::arg("routing"), pybind11::arg("num_sms"),
        pybind11::arg("fused") = true, pybind11::arg("trace") = pybind11::none(), pybind11::arg("put_mask") = 0,
        pybind11::arg("wait_stats") = pybind11::none());
  m.def("ll_combine", &ll_combine, pybind11::arg("view"), pybind11::arg("send"), pybind11::arg("recv"),
        pybind11::arg("num_experts"), pybind11::arg("m"), pybind11::arg("buffer_index"),
        pybind11::arg("dispatch_used_fp8"), pybind11::arg("x"), pybind11::arg("layout_range"),
        pybind11::arg("topk_idx"), pybind11::arg("topk_weights"), pybind11::arg("mask"), pybind11::arg("pair_pos"),
        pybind11::arg("src_info"), pybind11::arg("routing"), pybind11::arg("out"), pybind11::arg("num_sms"),
        pybind11::arg("fused") = true, pybind11::arg("trace") = pybind11::none(), pybind11::arg("put_mask") = 0,
        pybind11::arg("bf16_partials") = false, pybind11::arg("wait_stats") = pybind11::none());
  m.def("ll_layout_info", &ll_layout_info, pybind11::arg("num_ranks"), pybind11::arg("num_experts"), pybind11::arg("m"),
        pybind11::arg("hidden"), pybind11::arg("num_topk"), pybind11::arg("use_fp8"),
        "Sizes of the low-latency region: {region_bytes (all), region_bytes_with_outbox (with puts), flags_bytes (both buffers' flags, first), "
        "buffer_bytes (one buffer's data), msg_bytes, routing_ints (a dispatch result's routing workspace)}");
  m.attr("ll_max_experts") = ll::kMaxExperts;
  m.attr("ll_flags_bytes") = ll::kFlagsBytes;
  m.attr("ll_puts_compiled") = ll::puts_compiled();
  m.attr("ll_trace_shape") = pybind11::make_tuple(ll::kTraceKernels, ll::kTraceBlocks, ll::kTraceEvents);

}

}  // namespace moe_ep
