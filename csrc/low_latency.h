#pragma once
// Kernel family "low_latency": decode-time dispatch and combine with fixed-size buffers, no host
// synchronisation (CUDA-graph capturable) and a send/receive split for the receive hook.
// Torch-free: raw pointers + cudaStream_t; moe_ep/comm/backends/low_latency.py owns the policy.
//
// Transport: every rank's buffer region is reachable through a table of peer pointers (the
// CUDA-IPC buffers of csrc/ipc_buffer.h, or an NVSHMEM heap through nvshmem_ptr for the peers
// reachable over NVLink). Kernels store straight into peers' memory and publish with release
// stores at system scope; receivers acquire with bounded waits.
// Puts (put_mask bit d set; only in the build that links NVSHMEM's device library, the module
// moe_ep._nvshmem): rank d is reached through NVSHMEM's portable device API instead, the path for
// peers nvshmem_ptr cannot map (RDMA, IBGDA across nodes). Rows are written into this rank's
// outbox (a third data area, after the two buffers: the same layout with the rank index meaning
// "destination"), then put whole (nvshmemx_putmem_nbi_warp); 4-byte index entries and weights go
// as single-element puts; every thread that put quiets before its block counts or publishes, and
// counts and flags go as puts / atomic adds after that. The receive side is the same either way:
// it reads its own memory.
//
// A rank's region: first the flags of both buffers, at offsets that never depend on the sizes
// (so a call with other sizes can never read a stale flag from bytes that used to hold data; every
// flag is reset by its reader), then the two buffers' data. Dispatches alternate between the
// buffers' dispatch areas, combines between their combine areas (independently, chosen by the
// host), so at most two calls of a kind may be outstanding.
//   flags of buffer b, at b * kFlagsPerBuffer:
//     dispatch flags [L][R] int32  source s's count for local expert l, plus one (0: not yet);
//                                  reset to 0 by the receiver once read
//     combine flags  [R] int32     rank d's blocks' shares (one add each as its partial sums are
//                                  out): complete at kCombineDone (low_latency.cu), whatever d's
//                                  grid size; reset by the receiver
//     weight counts  [R] int32     weights source s has stored here for this combine (release adds,
//                                  one per source block); complete when they reach the rows s
//                                  sent at the dispatch; reset by this rank's combine receive
//                                  (every rank's combine flag complete: every add has landed)
//     done counters  [3] int32     last-block detection inside this rank's own kernels ([0]
//                                  unused since the combine send publishes per block; [1] combine
//                                  recv, [2] dispatch recv)
//   data of buffer b, at kFlagsBytes + b * buffer_bytes:
//     dispatch index [L][R][M] int32: the source token of expert l's j-th row from source s
//     dispatch tokens [R][M] messages: source s's token t (payload: bf16 row, or fp8 row + float32
//                                  scales, then the token index, int32), sent once per rank
//                                  however many of the rank's experts it goes to
//     combine weights [L][R][M] float32: source s's weight of its j-th row for local expert l
//     combine area   [R][M] float32 rows: rank d's partial sum for this rank's token t, i.e. the
//                                  float32 sum, in k order, of weight x expert output over the
//                                  token's experts on d (a token crosses back once per rank, in
//                                  float32 so the only rounding is the final cast, as the
//                                  reference's)
//
// Layout guarantees (equal to the reference backend): in recv_x[l], sources appear in rank order,
// each source's rows in its (token, k) order; layout_range[l][s] = begin << 32 | count. A source
// may send at most M rows to one expert (duplicate experts in one token's top-k beyond that are
// dropped). The combine sums in float32 per rank, then over ranks in rank order: equal to the
// reference's k-order sum up to float32 association (within bf16 rounding of the result).
//
// Routing workspace (an int32 tensor per dispatch result, written by the dispatch receive, read by
// the combine that takes its handle): for each (source, token) the rows of its experts here in k
// order (as l * R * M + idx) and their count; the (source, token) pairs with rows here ("owners",
// as source * M + token, in no particular order: each is summed on its own), and their number.
#include <cuda_runtime.h>

#include <cstdint>

#include "intranode.h"  // Peers

namespace moe_ep {
namespace low_latency {

constexpr int kMaxRanks = 64;
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopk = 32;
constexpr int kGroup = 128;  // FP8 scale group
constexpr int64_t kFlagsPerBuffer = 8192;  // kMaxExperts + 2 kMaxRanks int32 flags, 3 done counters
constexpr int64_t kFlagsBytes = 2 * kFlagsPerBuffer;

// Diagnostic phase trace (the loopback benchmark's --trace; off when the args' trace is null):
// thread 0 of block b < kTraceBlocks stores %globaltimer (ns) at each phase boundary of each kernel
// into trace[kernel][b][event]; a fused launch writes both halves' rows. Which events each kernel
// records: see TraceEvent in low_latency.cu. Costs one predicated branch per boundary when off.
constexpr int kTraceKernels = 4;  // dispatch send, dispatch recv, combine send, combine recv
constexpr int kTraceBlocks = 160;
constexpr int kTraceEvents = 5;
constexpr int64_t kTraceInts = static_cast<int64_t>(kTraceKernels) * kTraceBlocks * kTraceEvents;  // int64 entries
static_assert((kMaxExperts + 2 * kMaxRanks + 3) * 4 <= kFlagsPerBuffer, "the flags must fit their region");

struct LLLayout {
  int num_ranks = 0;
  int num_experts = 0;
  int num_local = 0;
  int m = 0;        // num_max_dispatch_tokens_per_rank
  int hidden = 0;
  int num_topk = 0;
  bool use_fp8 = false;
  int tag = 0;      // 14 bits hashed from (num_ranks, M, hidden, num_experts, num_topk, use_fp8): see kTagShift
  int64_t x_bytes = 0;      // payload bytes of a message row
  int64_t msg_bytes = 0;    // message stride
  int64_t off_scales = 0;   // inside a message
  int64_t off_src = 0;      // inside a message: token index, count n, then n (local expert, slot) pairs
  int64_t off_dflags = 0;   // from the buffer's flags
  int64_t off_cflags = 0;
  int64_t off_wflags = 0;
  int64_t off_done = 0;
  int64_t off_dindex = 0;   // from the buffer's data
  int64_t off_dtokens = 0;
  int64_t off_cweights = 0;
  int64_t off_carea = 0;
  // Routing workspace (int32 elements): token_rows [R * M * K], token_wslots [R * M * K] (where
  // each of those rows' weight lands in the weight area), token_count [R * M], owners [R * M],
  // num_owners [1], owners_ready [1] (1 once the dispatch send has zeroed num_owners: in a fused
  // launch the receive half of another block may append owners before block 0 has run),
  // src_rows [R] (rows received from each source: the weights it stores here at combine).
  int64_t ws_token_rows = 0;
  int64_t ws_token_wslots = 0;
  int64_t ws_token_count = 0;
  int64_t ws_owners = 0;
  int64_t ws_num_owners = 0;
  int64_t ws_owners_ready = 0;
  int64_t ws_src_rows = 0;
  int64_t ws_ints = 0;
  int64_t buffer_bytes = 0;  // data of one of the two buffers
};
LLLayout make_layout(int num_ranks, int num_experts, int m, int hidden, int num_topk, bool use_fp8);

struct DispatchArgs {
  intranode::Peers peers;
  LLLayout layout;
  int64_t flags_offset;           // region offsets of the buffer in use: its flags
  int64_t data_offset;            // and its data
  const void* x;                  // [T, H] bf16
  const int64_t* topk_idx;        // [T, K]
  int num_tokens;
  const int* mask;                // [R] int32, 1 = masked rank (may be null); the same on every rank
  int* mask_snapshot;             // send: where block 0 copies `mask` for the recv and the combine
                                  // (null: none); the recv reads the snapshot, not the live mask
  bool round_scale;
  bool use_ue8m0;
  int* counts_e;                  // [E] this rank's rows per global expert (statistics, tests)
  int* pair_pos;                  // [T*K] the pair's row among this rank's rows for its expert
  int* send_done;                 // [E] int32 workspace, zero before the first dispatch; each
                                  // expert's counter returns to zero once its count is published
  // receive side outputs
  void* recv_x;                   // [L, R*M, H] bf16 or fp8
  void* recv_scales;              // fp8: float32 [L, G, R*M] or int32 [L, G/4, R*M] (ue8m0); else null
  int* recv_count;                // [L]
  int* src_info;                  // [L, R*M]
  int64_t* layout_range;          // [L, R]
  int* cumulative_stats;          // [L] or null
  int* routing;                   // the routing workspace (layout.ws_ints int32)
  uint64_t timeout_ns;
  uint64_t put_mask = 0;          // bit d: rank d is reached by NVSHMEM puts (see the header)
  int64_t outbox_offset = 0;      // region offset of the outbox (puts only)
  bool staged_send = false;       // set by the launchers (MOE_EP_LL_SEND), not by callers
  bool layout_first = true;       // fused kernel: receive layout before the send's publish
                                  // (MOE_EP_LL_FUSED_ORDER; set by the launchers)
  unsigned long long* trace = nullptr;  // [kTraceKernels][kTraceBlocks][kTraceEvents] ns, or null
  long long* wait_stats = nullptr;      // [R] ns: this rank's row of dispatch_wait_recv_cost_stats, or null
};

// MOE_EP_TIMEOUT_S (default 100 s) in nanoseconds, for the args' timeout_ns (csrc/bounded_wait.cuh).
uint64_t timeout_ns_from_env();

void launch_dispatch_send(const DispatchArgs& args, int num_sms, cudaStream_t stream);
// `recv_args` is `args` with the mask the send snapshotted (see DispatchArgs::mask_snapshot).
void launch_dispatch_recv(const DispatchArgs& recv_args, int num_sms, cudaStream_t stream);
// Send and receive in ONE launch (no hook): every block sends its tokens, then takes its share of
// the receive. Saves a kernel boundary; the blocks of the grid must be co-resident (grid <= num_sms,
// one block per SM), as for every kernel here that waits for another block.
void launch_dispatch(const DispatchArgs& args, int num_sms, cudaStream_t stream);

struct CombineArgs {
  intranode::Peers peers;
  LLLayout layout;
  int64_t flags_offset;
  int64_t data_offset;
  const void* x;                  // [L, R*M, H] bf16 (the experts' outputs in recv_x's layout)
  const int64_t* layout_range;    // [L, R] from the dispatch
  const int64_t* topk_idx;        // [T, K]
  const float* topk_weights;      // [T, K]
  int num_tokens;
  const int* mask;                // the mask the dispatch used (its pair positions depend on it)
  const int* pair_pos;
  const int* src_info;            // [L, R*M] from the dispatch
  const int* routing;             // the dispatch's routing workspace
  void* out;                      // [T, H] bf16
  uint64_t timeout_ns;
  uint64_t put_mask = 0;          // as DispatchArgs
  int64_t outbox_offset = 0;
  unsigned long long* trace = nullptr;  // as DispatchArgs::trace
  // The partial sums crossing back: float32 (exact up to float32 association, the default) or
  // bfloat16 (half the bytes over the link; one more rounding per rank's partial). Every rank
  // of the group must use the same (the sender writes what the receiver reads).
  bool bf16_partials = false;
  long long* wait_stats = nullptr;      // [R] ns: this rank's row of combine_wait_recv_cost_stats, or null
};

void launch_combine_send(const CombineArgs& args, int num_sms, cudaStream_t stream);
void launch_combine_recv(const CombineArgs& args, int num_sms, cudaStream_t stream);
// Send and receive in one launch (no hook), as launch_dispatch.
void launch_combine(const CombineArgs& args, int num_sms, cudaStream_t stream);

// clean_low_latency_buffer zeroes [0, kFlagsBytes) of the own region (every flag and counter); the
// host does it with a memset, so no kernel is needed.
// Region bytes the two buffers need; with puts, the outbox after them.
inline int64_t region_bytes(const LLLayout& layout) { return kFlagsBytes + 2 * layout.buffer_bytes; }
inline int64_t outbox_offset(const LLLayout& layout) { return region_bytes(layout); }
inline int64_t region_bytes_with_outbox(const LLLayout& layout) { return region_bytes(layout) + layout.buffer_bytes; }
// Whether this build can put (it links NVSHMEM's device library: moe_ep._nvshmem, not moe_ep._C).
bool puts_compiled();
// Region offsets of buffer `index` (0 or 1): its flags, and its data.
inline int64_t flags_offset(int64_t index) { return index * kFlagsPerBuffer; }
inline int64_t data_offset(const LLLayout& layout, int64_t index) { return kFlagsBytes + index * layout.buffer_bytes; }

}  // namespace low_latency
}  // namespace moe_ep
