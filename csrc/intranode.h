#pragma once
// Kernel family "intranode": normal (throughput) dispatch and combine among the GPUs of one node,
// through the CUDA-IPC buffers of csrc/ipc_buffer.h. Torch-free: raw pointers + cudaStream_t;
// moe_ep/comm/backends/intranode.py owns the policy (allocation, the order of the steps).
//
// Design: NVLink carries stores (loads only in the combine's pull protocol, below), and every
// byte crosses it once; the receiver's copy out of its buffer overlaps the peers' stores into it.
//   dispatch = notify | (host wait) | transfer
//     notify    each rank stores its counts (tokens, per-destination and per-local-expert counts)
//               into every rank's control block, raises its "arrived" flag there, and waits for
//               every rank's flag: a barrier that also hands every rank the whole count matrix.
//               It writes rank_prefix_matrix and, unless num_worst_tokens is set, the receive
//               sizes to mapped pinned host memory (one host wait, no device-wide sync). Before
//               the barrier it routes the rank's tokens (is_token_in_rank -> each token's slot per
//               destination and the send lists) and finds the expert ids' range, so the host
//               launches nothing else before it.
//     transfer  one kernel, two kinds of warps. Senders store each row bound to another rank
//               straight from x into that rank's buffer (x, scales, top-k ids already local to the
//               receiver, weights, source index), a chunk of rows at a time, then raise the
//               chunk's flag there. Receivers copy their own rank's rows from x into the outputs,
//               then each peer's chunks from their buffer as the flags arrive. With a receive
//               pool (direct receive) a receiver's outputs are in memory its peers have mapped:
//               senders store rows straight into them and the receiver only waits for the flags,
//               so a peer row crosses an SM twice (sender load and store) instead of four times.
//   combine = barrier | combine
//     combine   one kernel: senders store each received row (and its top-k weights) back into
//               its source rank's buffer, chunk by chunk, raising flags; reducers sum, per token,
//               the rows of every rank in rank order in float32 (their own rank's rows straight
//               from x), each as soon as its chunks' flags are up, then add the biases.
//               Pull (a receive pool on every rank): a rank whose input x (and weights) lie in its
//               pool publishes where they are and sends nothing; the reducers of every other rank
//               load its rows in place over NVLink (1.5 crossings of an SM per byte, not 2.5). It
//               keeps its kernel running until every reader has said it is done, so x outlives
//               the reads (torch may reuse it as soon as the kernel ends). Ranks whose x is not
//               in their pool push as above; both kinds mix in one call.
// Flags hold sequence numbers that only grow (notify's own count for dispatch, the barrier epoch
// for combine), so nothing is ever reset. notify acts as the dispatch's barrier: a rank stores into
// a peer's buffer only after that peer raised its flag, i.e. finished every earlier step. The
// control blocks alternate by the parity of the sequence number, so a fast rank's next notify
// never overwrites counts a slow rank is still reading.
//
// Layout of a rank's buffer region (IpcBuffer::local_data(), offsets in bytes):
//   [0, kStateBytes)                 State: this rank's notify sequence number (only it writes it),
//                                    the combine's pull sources and done flags (written by peers)
//   [kControlOffset, +2 * kControlStride)   Control[2], written by every rank (parity of the seq)
//   [kFlagsOffset, +kFlagsBytes)     dispatch chunk flags [R][F], then combine chunk flags [R][F]
//   [kRowsOffset, ...)               dispatch: the rows from peers, in output order without this
//                                    rank's own rows; combine: [R - 1][stride_rows] rows, one block
//                                    per other rank (in rank order, this rank skipped)
//   after the region's num_nvl_bytes     the receive pool's arena, when the engine has one
//                                        (moe_ep/comm/recv_pool.py; torch allocates outputs there)
#include <cuda_runtime.h>

#include <cstdint>

namespace moe_ep {
namespace intranode {

constexpr int kMaxRanks = 64;
constexpr int kMaxExperts = 8192;

// Where a rank's combine input is, for the pull protocol: offsets from its allocation base (the
// peer table's entry) of x and topk_weights, x < 0 when it pushes its rows instead; seq = the
// combine's barrier epoch once published. The barrier before every combine means a slot is never
// republished while a reader may still look at it.
struct PullSource {
  long long x;
  long long weights;
  long long seq;
  long long reserved;
};

struct State {
  long long notify_seq;                 // written by this rank only
  unsigned long long pull_blocks_done;  // this rank's combine blocks done reading (the last resets it)
  PullSource pull_sources[kMaxRanks];   // [src]: written by src
  long long pull_done[kMaxRanks];       // [reader] = epoch once reader stopped reading this rank's x
};

// Where a receiver's dispatch outputs are, as byte offsets from its allocation base (the peer
// table's entry), when they live in its receive pool (moe_ep/comm/recv_pool.py): peers then store
// rows straight into them. x < 0: not in a pool, peers store into the buffer's rows area. A part
// the call has no (scales, top-k, or the source index of a cached dispatch) is -1.
struct DirectOutputs {
  long long x = -1;
  long long scales = -1;
  long long idx = -1;
  long long weights = -1;
  long long src = -1;
};

// The direct-receive protocol of a transfer (every rank of a group agrees on `enabled`, the engine
// checks): each receiver publishes its DirectOutputs to every peer at the start of the kernel and
// senders wait for them. `own` are this rank's outputs (x < 0 when they are not in its pool).
struct DirectReceive {
  bool enabled = false;
  DirectOutputs own;
};

// The sizes of a dispatch that every rank of the group must pass alike: they fix where rows lie in
// the peers' buffers and which steps the notify runs (a rank with another hidden size would read
// its peers' rows at wrong offsets). notify hands every rank every rank's CallSizes and compares
// them: a dispatch with a host wait raises on every rank (the record carries each rank's sizes),
// the others (cached, num_worst_tokens) trap with a message naming the other rank. In this order
// (moe_ep.comm.backends.intranode.DISPATCH_SIZE_NAMES; notify_kernel's message): hidden, FP8 (x as
// a tuple), x element bytes, scale columns, top-k columns, num_experts, cached (a handle given),
// num_worst_tokens (0: counted; the engine compares each new value once on the host, this catches
// ranks that pass two values both seen before).
constexpr int kCallSizes = 8;
struct CallSizes {
  long long v[kCallSizes];
};

struct Control {
  long long arrived[kMaxRanks];           // arrived[src] = src's notify sequence number
  int tokens[kMaxRanks];                  // tokens[src]: src's num_tokens
  int matrix[kMaxRanks * kMaxRanks];      // [src][dst]: tokens src sends dst
  int expert_counts[kMaxExperts];         // [src][local expert of this rank]: src's tokens per expert
  DirectOutputs outputs[kMaxRanks];       // outputs[dst]: where dst's outputs are (direct receive)
  long long outputs_seq[kMaxRanks];       // outputs_seq[dst] = dst's notify sequence number once published
  CallSizes sizes[kMaxRanks];             // sizes[src]: what src passed to this dispatch
};

constexpr int64_t kStateBytes = 4096;
constexpr int64_t kControlStride = 64 * 1024;
constexpr int64_t kControlOffset = kStateBytes;
static_assert(sizeof(Control) <= kControlStride, "the control block must fit its region");
static_assert(sizeof(State) <= kStateBytes, "the state block must fit its region");
// Chunk flags per (kind, source): kFlagSlots / R each, so a pair's rows fit in F chunks.
constexpr int kFlagSlots = 32768;
constexpr int64_t kFlagsOffset = kControlOffset + 2 * kControlStride;
constexpr int64_t kFlagsBytes = 2 * static_cast<int64_t>(kFlagSlots) * 8;
constexpr int64_t kRowsOffset = kFlagsOffset + kFlagsBytes;

// One dispatch row in a receiver's buffer: [x bytes | scale bytes | top-k ids int64 (already
// local to the receiver, -1 elsewhere) | top-k weights float32 (0 where the id is -1) | source
// token index int32], each part starting 16-byte aligned, the row padded to 16 bytes.
struct RowLayout {
  int64_t x_bytes = 0;
  int64_t scale_bytes = 0;
  int num_topk = 0;
  int64_t off_scales = 0;
  int64_t off_idx = 0;
  int64_t off_weights = 0;
  int64_t off_src = 0;
  int64_t stride = 0;
};
RowLayout make_row_layout(int64_t x_bytes, int64_t scale_bytes, int num_topk);

// Bytes of the buffer region a dispatch needs on a rank whose buffer receives `buffer_rows` rows
// (its received rows minus its own).
int64_t dispatch_bytes_needed(int64_t buffer_rows, const RowLayout& layout);
// A combine row: x bytes padded to 16, then num_topk float32 weights (if any), padded to 16.
int64_t combine_row_bytes(int64_t x_bytes, int num_topk_weights);
int64_t combine_bytes_needed(int64_t stride_rows, int64_t row_bytes, int num_ranks);
// Rows per flag: chunk_rows, or more when a pair of up to max_pair_rows rows would need more than
// the F = kFlagSlots / num_ranks flags a source has.
int flag_rows_for(int64_t max_pair_rows, int chunk_rows, int num_ranks);

// Receive sizes a notify step publishes to the host (mapped pinned memory).
struct HostRecordView {
  long long epoch;
  int num_recv;
  int max_tokens;
  int max_buffer_rows;   // the most rows any rank's buffer receives (received rows minus own)
  int max_buffer_rank;   // a rank with that many
  long long id_min;      // the smallest and largest expert id of the rank's topk_idx (-1: none)
  long long id_max;
  int counts[kMaxExperts];  // per local expert, rounded up to expert_alignment
  int sizes_differ;         // 1: some rank passed other CallSizes (the fields above are not set), 0: all alike
  CallSizes sizes[kMaxRanks];  // with sizes_differ: every rank's
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

// Tuning knobs of transfer and combine. chunk_rows (rows per flag: 4, 8, 16, 32, 64) is part of
// the protocol and must be the same on every rank; unroll (16-byte vectors in flight per lane in
// the copies: 4, 8, 16), send_warps (transfer) and combine_send_warps (combine; of each block's 16
// warps: 2, 4, 6, 8, 12) are local; so is combine_staged_vectors (0: the combine's copies and reduce
// hold their loads in registers; 16, 24: with 16-byte packs they load with cp.async into a per-warp
// shared-memory ring of that many vectors per lane, 128 or 192 KB per block); direct_send_warps
// replaces send_warps in a transfer with the direct-receive protocol (receivers then copy only
// their own rows, so more warps send). The Python side (IntranodeKnobs) owns the defaults.
struct Knobs {
  int unroll = 8;
  int chunk_rows = 4;
  int send_warps = 6;
  int combine_send_warps = 4;
  int combine_staged_vectors = 16;
  int direct_send_warps = 8;
};

// notify: one block. With counts (every non-cached dispatch, even of 0 tokens) it first routes
// this rank's tokens from is_token_in_rank [T, R] bool: writes send_slot [T, R] int32 (the token's
// index among those sent to rank r, or -1) and send_lists [R, T] int32 (for each destination, its
// tokens in order), and with topk_idx [T, K] int64 finds the ids' range for the record (or, with
// num_worst_tokens, traps with a message at an id outside [-1, num_experts)). Then it publishes
// the per-destination counts and expert_counts [E] int32 to every rank (the barrier), writes
// rank_prefix_matrix [R, R] int32 (cumulative over sources) and with num_worst_tokens == 0 the
// record (epoch last), else traps, with a message, on every rank if any rank receives more than
// num_worst_tokens rows. Without counts (cached dispatch) it is only the barrier. Every call
// compares the ranks' CallSizes (`sizes`, this rank's) as described at CallSizes.
void launch_notify(const Peers& peers, const CallSizes& sizes, bool with_counts, int64_t num_tokens,
                   const bool* is_token_in_rank,
                   const int64_t* topk_idx, int num_topk, const int* expert_counts, int num_experts,
                   int expert_alignment, int num_worst_tokens, int* send_slot, int* send_lists,
                   int* rank_prefix_matrix, HostRecordView* record, long long epoch, cudaStream_t stream);

// transfer: fills num_rows output rows (num_rows = received rows, or num_worst_tokens with
// padding after them: zeros, ids -1, source 0). x, scales ([T] rows), topk_idx / topk_weights
// ([T, K], null when the layout has K = 0) are this rank's inputs; send_lists [R, T] from notify
// (or the cached handle). recv_src_idx is read (cached: given, only padding untouched) or written.
// With direct.enabled every rank publishes where its outputs are; a peer whose outputs live in its
// receive pool (direct.own.x >= 0 there) gets its rows stored straight into them, the others into
// their buffer, from which they copy them out.
// skip_peer_copy is a diagnostic, never set by a Buffer: receivers wait for every peer chunk but do
// not copy it out, so the outputs' peer rows are left unwritten; the loopback benchmark's
// --isolate rows use it to measure what the copy-out pass costs.
void launch_transfer(const Peers& peers, const RowLayout& layout, int64_t num_tokens, const void* x,
                     const void* scales, const int64_t* topk_idx, const float* topk_weights, const int* send_lists,
                     const int* rank_prefix_matrix, int64_t max_pair_rows, bool cached, int* recv_src_idx,
                     void* recv_x, void* recv_scales, int64_t* recv_topk_idx, float* recv_topk_weights,
                     int64_t num_rows, int num_local_experts, const Knobs& knobs, const DirectReceive& direct,
                     int num_blocks, cudaStream_t stream, bool skip_peer_copy = false);

// The pull protocol of a combine (see the design above). enabled: the group runs it (every rank
// has a receive pool; the engine checks they agree); x / weights: this rank's input and its top-k
// weights as offsets from its allocation base when they lie in its pool (weights -1 without
// weights), x = -1 when this rank pushes its rows.
struct CombinePull {
  bool enabled = false;
  long long x = -1;
  long long weights = -1;
};

// combine: out[t] = cast(sum over ranks r in order with is_token_in_rank[t, r] of the row rank r
// received as (this rank, send_slot[t, r]) + bias0[t] + bias1[t]); out_weights[t] likewise
// without biases (num_topk > 0; 0: no weights). x ([N, H], bf16 or float32) and topk_weights
// ([N, K] float32) are this rank's received rows (dispatch order). barrier_epoch: this rank's
// barrier epoch in device memory (the barrier just before this call raised it). With pull.x >= 0
// this rank's x is read by its peers in place (it sends nothing; x must be 16-byte aligned).
void launch_combine(const Peers& peers, const long long* barrier_epoch, int64_t num_tokens, int64_t hidden,
                    bool x_is_bf16, const void* x, const float* topk_weights, int num_topk,
                    const bool* is_token_in_rank, const int* send_slot, const int* rank_prefix_matrix,
                    int64_t stride_rows, const void* bias0, bool bias0_is_bf16, const void* bias1,
                    bool bias1_is_bf16, void* out, float* out_weights, const Knobs& knobs, const CombinePull& pull,
                    int num_blocks, cudaStream_t stream);

}  // namespace intranode
}  // namespace moe_ep
