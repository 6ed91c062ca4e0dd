#pragma once
// Kernel family "intranode": normal (throughput) dispatch and combine among the GPUs of one node,
// through the CUDA-IPC buffers of csrc/ipc_buffer.h. Torch-free: raw pointers + cudaStream_t;
// moe_ep/comm/backends/intranode.py owns the policy (allocation, the order of the steps).
//
// Design: the fewest passes over the payload.
//   dispatch = barrier | stage | barrier | notify | (host wait) | pull
//     stage   each rank copies its OWN tokens once into its buffer (packed rows: x, scales, top-k
//             ids and weights), writes its send lists (for each destination, its token indices in
//             order) and its control block (token count, per-destination and per-expert counts);
//     notify  one block reads every rank's control block: rank_prefix_matrix, the peers' token
//             counts, and, unless num_worst_tokens is set, writes the receive sizes to mapped
//             pinned host memory that the host polls (one host wait, no device-wide sync);
//     pull    every receiver reads, over NVLink, exactly the rows it receives from each source's
//             buffer straight into its output tensors (source-rank order, then token order).
//   combine = barrier | push | barrier | reduce
//     push    every rank writes each received row back into the source rank's buffer, at
//             [this rank][the row's index among the rows the source sent here];
//     reduce  each source sums, per token, its rows in rank order in float32 (then the biases).
// Each step starts with a barrier that all ranks pass only once every rank has finished its
// previous step, so every call may reuse the whole buffer region.
//
// Layout of a rank's buffer region (IpcBuffer::local_data(), offsets in bytes):
//   [0, kControlBytes)             control block (struct below)
//   [kControlBytes, ...)           dispatch: staged rows [T][row stride], then the send lists
//                                  [R][T] int32; combine: rows [R][stride_rows][combine row]
#include <cuda_runtime.h>

#include <cstdint>

namespace moe_ep {
namespace intranode {

constexpr int kMaxRanks = 64;
constexpr int kMaxExperts = 8192;
constexpr int64_t kControlBytes = 64 * 1024;

struct Control {
  int num_tokens;
  int pad;
  long long overflow;  // > 0: this rank's dispatch needs that many bytes, more than its buffer has
  int send_counts[kMaxRanks];
  int expert_counts[kMaxExperts];
};
static_assert(sizeof(Control) <= kControlBytes, "the control block must fit its region");

// One staged (dispatch) row: [x bytes | scale bytes | top-k ids int64 | top-k weights float32],
// each part starting 16-byte aligned, the row padded to 16 bytes.
struct RowLayout {
  int64_t x_bytes = 0;
  int64_t scale_bytes = 0;
  int num_topk = 0;
  int64_t off_scales = 0;
  int64_t off_idx = 0;
  int64_t off_weights = 0;
  int64_t stride = 0;
};
RowLayout make_row_layout(int64_t x_bytes, int64_t scale_bytes, int num_topk);

// Bytes of the buffer region a dispatch of num_tokens rows (on this rank) needs.
int64_t dispatch_bytes_needed(int64_t num_tokens, const RowLayout& layout, int num_ranks);
// A combine row: x bytes padded to 16, then num_topk float32 weights (if any), padded to 16.
int64_t combine_row_bytes(int64_t x_bytes, int num_topk_weights);
int64_t combine_bytes_needed(int64_t stride_rows, int64_t row_bytes, int num_ranks);

// Receive sizes a notify step publishes to the host (mapped pinned memory).
struct HostRecordView {
  long long epoch;
  long long overflow_bytes;  // the largest overflow of any rank (0: every rank's dispatch fits)
  int overflow_rank;         // a rank with that overflow
  int num_recv;
  int max_tokens;
  int counts[kMaxExperts];  // per local expert, rounded up to expert_alignment
};

// Pinned, device-mapped host memory for one HostRecordView, and the host-side wait on it.
class HostRecord {
 public:
  HostRecord();
  ~HostRecord();
  HostRecord(const HostRecord&) = delete;
  HostRecord& operator=(const HostRecord&) = delete;
  HostRecordView* device_view() const { return device_; }
  // Spins (bounded by timeout_s) until the record's epoch reaches `epoch`; returns false on timeout.
  bool wait(long long epoch, double timeout_s) const;
  const HostRecordView& host_view() const { return *host_; }

 private:
  HostRecordView* host_ = nullptr;
  HostRecordView* device_ = nullptr;
};

// Each peer table entry is the base of a rank's IPC allocation; regions start `region_offset`
// bytes later (ipc::kHeaderBytes).
struct Peers {
  void* const* bases;  // device array [num_ranks]
  int64_t region_offset;
  int rank;
  int num_ranks;
};

// stage: copies rows [0, num_tokens) of x (x_bytes each), scales (scale_bytes each, may be null
// when 0), topk_idx/topk_weights ([T, K], null when K == 0) into this rank's region; with
// write_routing (every non-cached dispatch, even of 0 tokens: the peers read the counts) also
// writes the send lists from send_slot ([T, R] int32: the token's index among those sent to rank
// r, or -1) and the control block (send_counts [R], expert_counts [E] int32). Pointers of empty
// arrays may be null (torch gives empty tensors no storage), so flags, not pointers, decide.
// overflow > 0 (the bytes this dispatch needs, beyond the buffer): nothing is staged, the control
// block says so, and notify tells every rank (so all raise the same error instead of one waiting).
void launch_stage(const Peers& peers, const RowLayout& layout, int64_t num_tokens, const void* x, const void* scales,
                  const int64_t* topk_idx, const float* topk_weights, bool write_routing, const int* send_slot,
                  const int* send_counts, const int* expert_counts, int num_experts, int64_t overflow,
                  int num_blocks, cudaStream_t stream);

// notify: reads every rank's control block. Writes rank_prefix_matrix [R, R] int32 and
// peer_tokens [R] int32 (device). With num_worst_tokens == 0 publishes the record (epoch last),
// overflow included; else traps, with a message, if this rank receives more than
// num_worst_tokens rows or a rank's buffer overflowed.
void launch_notify(const Peers& peers, int num_experts, int expert_alignment, int num_worst_tokens,
                   int* rank_prefix_matrix, int* peer_tokens, HostRecordView* record, long long epoch,
                   uint64_t timeout_ns, cudaStream_t stream);

// pull: fills num_rows output rows (num_rows = received rows, or num_worst_tokens with padding
// after them). recv_src_idx is read (cached: given) or written (else, from the peers' send lists,
// which need peer_tokens). recv_scales/recv_topk_* may be null when the layout has none.
void launch_pull(const Peers& peers, const RowLayout& layout, const int* rank_prefix_matrix, const int* peer_tokens,
                 bool cached, int* recv_src_idx, void* recv_x, void* recv_scales, int64_t* recv_topk_idx,
                 float* recv_topk_weights, int64_t num_rows, int num_local_experts, int num_blocks,
                 cudaStream_t stream);

// push: rows [0, received) of x (x_bytes each) and topk_weights ([N, K] float32; num_topk = 0: none)
// go to their source rank's region at [this rank][row - first row from that source].
void launch_push(const Peers& peers, const int* rank_prefix_matrix, const void* x, int64_t x_bytes,
                 const float* topk_weights, int num_topk, int64_t stride_rows, int num_blocks, cudaStream_t stream);

// reduce: out[t] = cast(sum over ranks r in order with is_token_in_rank[t, r] of row(r, send_slot[t, r])
// + bias0[t] + bias1[t]); out_weights[t] likewise without biases (num_topk > 0; 0: no weights).
// x_is_bf16: rows and out are bf16 (else float32); bias*_is_bf16 likewise per bias (null: none).
void launch_reduce(const Peers& peers, int64_t num_tokens, int64_t hidden, bool x_is_bf16, const bool* is_token_in_rank,
                   const int* send_slot, int64_t stride_rows, int num_topk, const void* bias0, bool bias0_is_bf16,
                   const void* bias1, bool bias1_is_bf16, void* out, float* out_weights, int num_blocks,
                   cudaStream_t stream);

}  // namespace intranode
}  // namespace moe_ep
