// Kernel family "low_latency" (see low_latency.h for the buffer layout and the guarantees).
//
//   dispatch send   block b owns a contiguous range of tokens, sent in rounds. Every block
//                   histograms topk_idx in shared memory, so it knows each of its pairs' slot (the
//                   pair's position among this rank's pairs for that expert) and each expert's total
//                   without waiting for another block; a round of up to 32 pairs is routed by one
//                   warp. Each token is read and cast to FP8 once (a half-warp per 128-column
//                   group), then stored ONCE per destination rank into its token area [this rank]
//                   [token], and the token's index into each expert's slot [l][this rank][j] (NVLink
//                   carries a token once per rank, not once per expert). Each expert's count goes
//                   out early (after the histogram, see kLanded); the block that completes an
//                   expert's pairs marks it landed with a release store. Nothing waits: the hook's
//                   "send" half. Without a hook, send and receive run in one kernel (dispatch_kernel).
//   dispatch recv   every block waits (bounded) for every (expert, source) count, so it knows
//                   where each row goes, and writes the layout while the rows are still in flight
//                   (in the fused kernel, before the block's own publish: dispatch_kernel);
//                   then it waits until each has landed. Rows are packed in source-rank order into recv_x, in
//                   pieces spread over every warp of the grid; src_info, layout_range, recv_count
//                   and the statistics are written once; the last block past the waits resets the
//                   flags.
//   combine send    as a source, every block stores a share of its tokens' top-k weights into their
//                   expert ranks (4 bytes per row) and adds the number to a weight counter there; as
//                   an expert rank, each warp loads its first rows, waits until every source's count
//                   is in, sums weight x output over each (source, token)'s rows here in k order, in
//                   float32, and stores that one partial row into the source: a token crosses back
//                   once per rank, not once per expert (as float32, or rounded to bf16 with
//                   CombineArgs::bf16_partials). Each block adds its share to one flag per source
//                   as soon as its own sums are out (the flag is complete once every block's is in).
//   combine recv    waits for every rank's flag, then one warp per (token, 256 hidden columns)
//                   sums the partial rows of the token's ranks in rank order and casts; the last
//                   block resets the flags and the weight counters.
//   puts            a rank in put_mask is reached through NVSHMEM's device API (low_latency.h):
//                   the same kernels, with rows staged in the outbox and put whole, and counts and
//                   flags put after a quiet. Compiled only into moe_ep._nvshmem (MOE_EP_NVSHMEM_DEVICE).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "bad_input.cuh"
#include "bounded_wait.cuh"
#include "device_copy.cuh"
#include "low_latency.h"
#include "runtime.h"

#ifdef MOE_EP_NVSHMEM_DEVICE
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace moe_ep {
namespace low_latency {
namespace {

using copy::align16;
using copy::warp_copy;
using intranode::Peers;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;  // moe_ep.comm.fp8.FP8_AMAX_FLOOR

__device__ __forceinline__ uint8_t* buffer_of(const Peers& peers, int rank, int64_t offset) {
  return static_cast<uint8_t*>(peers.bases[rank]) + peers.region_offset + offset;
}

__device__ __forceinline__ void st_release_gpu(int* ptr, int value) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// A dispatch flag [expert][source] holds the source's row count + 1 (nonzero: the count is in) in
// bits 0-15, the source's layout tag in bits 16-29 and, once the rows and their index entries have
// landed, kLanded (bit 30). The count goes early (after the histogram) so the receiver lays out its
// outputs while the rows are still in flight; the landed value (count + 1 | tag | kLanded) is
// written after a fence. The tag (LLLayout::tag, a hash of the sizes every rank must agree on)
// lets a receiver name a source that called with other sizes, where it would otherwise read rows
// laid out for another M or hidden as garbage; the flags sit at offsets no size changes.
constexpr int kLanded = 1 << 30;
constexpr int kCountMask = 0xFFFF;  // count + 1 <= M + 1 (make_layout bounds M)
constexpr int kTagShift = 16;
__device__ __forceinline__ int dispatch_flag(const LLLayout& L, int count_plus_one) {
  return count_plus_one | (L.tag << kTagShift);
}

// A source's flag carries another tag: it called with other sizes. Print who and what, then trap.
// (Scalars, not the layout: a reference to the kernel's arguments would copy them to local memory.)
__device__ __noinline__ void layout_mismatch(int me, int src, int seen_tag, int tag, int m, int hidden, int num_experts,
                                             int num_topk, int fp8) {
  if (atomicCAS(&bad_input_reported, 0, 1) == 0) {
    printf("moe_ep: low_latency_dispatch on rank %d: rank %d called with other sizes than this rank "
           "(num_max_dispatch_tokens_per_rank=%d, hidden=%d, num_experts=%d, top-k=%d, fp8=%d here; layout tag %d "
           "there, %d here): every rank must pass the same\n",
           me, src, m, hidden, num_experts, num_topk, fp8, seen_tag, tag);
  }
  __threadfence_system();
  asm volatile("trap;");
}

// The owner of expert e's early count: the block whose thread stores it after the histogram. It
// also adds 1 to the expert's send_done at its publish, after its fence, so the block that
// completes the count (and stores the landed value) comes after the early store: the late value
// is never overwritten by the early one. Experts are dealt round-robin (e mod grid), not in runs
// of a block's threads: with E <= 512 the runs gave block 0 every early store (half of them over
// NVLink) and every +1 before its publish: extra work on one block, in a send that ends with its
// slowest block (two H200s, 128 tokens: no change in the kernel's time, benchmarks/RESULTS.md).
__device__ __forceinline__ bool owns_expert_count(int e) {
  return e % static_cast<int>(gridDim.x) == static_cast<int>(blockIdx.x);
}

// Release at system scope: orders this thread's earlier loads and stores (and, after a block
// barrier, the block's) before its later stores, as a release must; the sequential consistency
// of __threadfence_system (fence.sc) is not needed by a flag protocol.
__device__ __forceinline__ void fence_release_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// A flag that orders no data before it (a count of zero rows): no fence needed.
__device__ __forceinline__ void st_relaxed_sys(int* ptr, int value) {
  asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// ---------------------------------------------------------------------------------------- puts
// NVSHMEM's portable device API for the ranks in put_mask (low_latency.h). `sym` is always this
// rank's own address of the symmetric location (NVSHMEM's convention), `pe` the rank it lands on.
// A build without NVSHMEM's device library never gets a put_mask (the launchers refuse one).
__device__ __forceinline__ bool puts_to(uint64_t put_mask, int rank) { return ((put_mask >> rank) & 1ull) != 0; }

#ifdef MOE_EP_NVSHMEM_DEVICE
__device__ __forceinline__ void put_int(int* sym, int value, int pe) { nvshmem_int_p(sym, value, pe); }
__device__ __forceinline__ void put_float(float* sym, float value, int pe) { nvshmem_float_p(sym, value, pe); }
__device__ __forceinline__ void put_add(int* sym, int value, int pe) { nvshmem_int_atomic_add(sym, value, pe); }
// The whole warp calls it (a warp-collective put of `bytes` from this rank's `src`).
__device__ __forceinline__ void warp_put(void* sym, const void* src, size_t bytes, int pe) {
  nvshmemx_putmem_nbi_warp(sym, src, bytes, pe);
}
// Every put this thread issued is complete at its target.
__device__ __forceinline__ void quiet_puts() { nvshmem_quiet(); }
#else
__device__ __forceinline__ void put_int(int*, int, int) { asm volatile("trap;"); }
__device__ __forceinline__ void put_float(float*, float, int) { asm volatile("trap;"); }
__device__ __forceinline__ void put_add(int*, int, int) { asm volatile("trap;"); }
__device__ __forceinline__ void warp_put(void*, const void*, size_t, int) { asm volatile("trap;"); }
__device__ __forceinline__ void quiet_puts() {}
#endif

// A 4-byte store into rank d's memory: a plain store where it is mapped, else a put of the same
// location (`own` is this rank's address of it; `mapped` rank d's, through the peer table).
__device__ __forceinline__ void store_int_to(uint64_t put_mask, int d, int* mapped, int* own, int value) {
  if (puts_to(put_mask, d)) put_int(own, value, d);
  else *mapped = value;
}

// Every thread fences its own stores (system scope), then the block meets: whatever one thread
// does next (count, publish a flag) comes after every thread's stores.
__device__ __forceinline__ void block_fence_system() {
  __threadfence_system();
  __syncthreads();
}

__device__ __forceinline__ bool is_masked(const int* mask, int rank) { return mask != nullptr && mask[rank] != 0; }

// A masked (failed) rank neither sends to nor waits for anyone, and nobody sends to or waits for
// it: the pair (me, peer) is cut when either side is masked. Every rank holds the same mask.
__device__ __forceinline__ bool cut(const int* mask, int me, int peer) {
  return is_masked(mask, me) || is_masked(mask, peer);
}

// Smallest power of two >= s (s > 0, finite): exact, unlike exp2(ceil(log2(s))) in float.
__device__ __forceinline__ float pow2_ceil(float s) {
  const unsigned bits = __float_as_uint(s);
  const unsigned exponent = (bits >> 23) & 0xFF;
  const unsigned mantissa = bits & 0x7FFFFF;
  return __uint_as_float((exponent + (mantissa != 0 ? 1u : 0u)) << 23);
}

// Phase boundaries of the trace (low_latency.h): event e of kernel k is stored at trace[k][block][e].
enum TraceKernel { kTraceDispatchSend = 0, kTraceDispatchRecv = 1, kTraceCombineSend = 2, kTraceCombineRecv = 3 };
// dispatch send: 0 start, 1 histogram done, 2 first round routed (destinations, index entries and
//                meta written; no tokens: as 1), 3 tokens stored, 4 counts published
// dispatch recv: 0 start, 1 counts in, 2 layout written, 3 rows landed and copied
// combine send:  0 start, 1 the block's weights stored, 2 every source's weights in (warp 0, after its
//                first rows are in flight; when it has no item, the end of its loop), 3 partial sums
//                stored, 4 flags published
// combine recv:  0 start, 1 every rank's flag in, 2 tokens written
__device__ __forceinline__ void trace_mark(unsigned long long* trace, int kernel, int event) {
  if (trace == nullptr || threadIdx.x != 0 || blockIdx.x >= kTraceBlocks) return;
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  trace[(static_cast<int64_t>(kernel) * kTraceBlocks + blockIdx.x) * kTraceEvents + event] = now;
}

// ----------------------------------------------------------------------------- dispatch send
// Slot of pair (token, k) = its position among this rank's pairs for the same expert, in (token, k)
// order: the pairs before it with that expert. Every block histograms topk_idx in shared memory
// (all pairs per expert, and those before its own tokens), so no block waits for another.

constexpr int kRoundPairs = 256;
constexpr int kHalfWarps = kThreads / 16;

// What a dispatch message carries, fixed at compile time (each kind is its own kernel: the code a
// block runs per token stays short).
enum Payload : int { kBf16Rows = 0, kFp8Rows = 1, kFp8Staged = 2 };  // kFp8Staged: FP8, cast into shared memory first
constexpr bool is_fp8(int payload) { return payload != kBf16Rows; }
// A send round: up to kRoundPairs (token, k) pairs of consecutive tokens, their rows loaded
// pass_loads(P) vectors per thread at a time (FP8: a half-warp per 128-column group, a 16-byte vector
// per lane and group; BF16: 16-byte vectors). The staged send keeps two (its shared-memory copy
// needs the registers).
constexpr int pass_loads(int payload) { return payload == kFp8Staged ? 2 : 4; }

// Tokens per round: one pass of loads covers the round's rows (at least one token, at most
// kRoundPairs pairs); a staged send stages one token at a time.
template <int P>
__device__ __forceinline__ int round_tokens(const LLLayout& L) {
  if (P == kFp8Staged) return 1;
  const int per_token = is_fp8(P) ? L.hidden / kGroup : static_cast<int>(L.x_bytes / 16);
  const int per_pass = is_fp8(P) ? kHalfWarps * pass_loads(P) : kThreads * pass_loads(P);
  return max(1, min(per_pass / per_token, kRoundPairs / L.num_topk));
}

// The vectors a thread loads in one pass of a round of tokens [r0, r1): pass `base` covers the
// round's vectors [base, base + one pass). FP8: item i = (token, group), half-warp hw takes
// i = base + hw + kHalfWarps x j and lane hl its 16 bytes; BF16: thread tid takes vector
// base + tid + kThreads x j of the round's rows.
template <int N>
struct PassLoads {
  uint4 raw[N];
};
template <int P>
__device__ __forceinline__ PassLoads<pass_loads(P)> load_pass(const DispatchArgs& a, int r0, int r1, int base) {
  constexpr int kPassLoads = pass_loads(P);
  const LLLayout& L = a.layout;
  const auto* x = static_cast<const __nv_bfloat16*>(a.x);
  PassLoads<kPassLoads> out;
  if (is_fp8(P)) {
    const int groups = L.hidden / kGroup;
    const int items = (r1 - r0) * groups;
#pragma unroll
    for (int j = 0; j < kPassLoads; ++j) {
      const int i = base + static_cast<int>(threadIdx.x) / 16 + kHalfWarps * j;
      out.raw[j] = i < items ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(r0 + i / groups) * L.hidden +
                                                                     (i % groups) * kGroup) + threadIdx.x % 16)
                             : make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    const int per_token = static_cast<int>(L.x_bytes / 16);
    const int items = (r1 - r0) * per_token;
#pragma unroll
    for (int j = 0; j < kPassLoads; ++j) {
      const int i = base + static_cast<int>(threadIdx.x) + kThreads * j;
      out.raw[j] = i < items ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(r0 + i / per_token) * L.hidden) +
                                     i % per_token)
                             : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  return out;
}

// Routes a round of rp <= 32 pairs with one warp (lane = pair, in (token, k) order), with warp
// intrinsics in place of the block's loops: each pair's slot (pairs before the round with its
// expert, from `before`, plus earlier lanes with it), its index entry at the destination; each
// token's message per destination rank (the first k for that rank), whose meta every pair of the
// group writes its own entry of; and each token's messages, compacted, into dst / num_dst.
// peer_data[d]: rank d's data area (mapped); peer_tokens[d]: where this rank's messages to d are
// written (d's token area [this rank], or with puts the outbox's [d]).
template <bool kPuts>
__device__ __forceinline__ void route_round_in_warp(const DispatchArgs& a, int r0, int rp, uint8_t* const* peer_data,
                                                   uint8_t* const* peer_tokens, uint8_t* own_data,
                                                   const bool* peer_cut, int* before, uint8_t** dst, int* num_dst) {
  const LLLayout& L = a.layout;
  const uint64_t put_mask = kPuts ? a.put_mask : 0;  // 0: the branches of puts fold away
  const int K = L.num_topk;
  const int me = a.peers.rank;
  const int lane = threadIdx.x % 32;
  const unsigned lower = (1u << lane) - 1u;  // the lanes before this one
  const bool in = lane < rp;
  const int p = r0 * K + lane;
  const int e = in ? static_cast<int>(__ldg(a.topk_idx + p)) : -1;
  const unsigned same_expert = __match_any_sync(kFullWarp, e);
  int j = 0;
  int rank = -1;
  if (e >= 0) {
    j = before[e] + __popc(same_expert & lower);
    a.pair_pos[p] = j;
    const int d = e / L.num_local;
    if (!peer_cut[d] && j < L.m) {  // beyond M rows of one source for one expert: dropped (see header)
      const int64_t at = L.off_dindex + 4 * ((static_cast<int64_t>(e % L.num_local) * L.num_ranks + me) * L.m + j);
      store_int_to(put_mask, d, reinterpret_cast<int*>(peer_data[d] + at), reinterpret_cast<int*>(own_data + at),
                   r0 + lane / K);
      rank = d;
    }
  }
  __syncwarp();  // every lane has read before[]: the last lane of each expert moves it past the round
  if (e >= 0 && (same_expert >> lane) == 1u) before[e] += __popc(same_expert);
  // The token's pairs to one rank share one message: keyed by (token in the round, rank).
  const int tk = lane / K;
  const int key = rank >= 0 ? tk * kMaxRanks + rank : -1 - lane;
  const unsigned same_msg = __match_any_sync(kFullWarp, key);
  const bool first = rank >= 0 && (same_msg & lower) == 0u;
  const unsigned firsts = __ballot_sync(kFullWarp, first);
  const unsigned token_lanes = K == 32 ? kFullWarp : ((1u << K) - 1u) << (tk * K);
  if (rank >= 0) {
    const int t = r0 + tk;
    uint8_t* msg = peer_tokens[rank] + static_cast<int64_t>(t) * L.msg_bytes;
    int* meta = reinterpret_cast<int*>(msg + L.off_src);
    const int q = __popc(same_msg & lower);  // this pair's entry in the message's list (k order)
    meta[2 + 2 * q] = e % L.num_local;
    meta[3 + 2 * q] = j;
    if (first) {
      meta[0] = t;
      meta[1] = __popc(same_msg);
      dst[tk * K + __popc(firsts & token_lanes & lower)] = msg;
    }
  }
  if (in && lane % K == 0) num_dst[tk] = __popc(firsts & token_lanes);
}

// Block b owns tokens [t0, t1), sent in rounds of consecutive tokens: each token is read and cast
// once and its message stored once per destination rank. The first pass's rows are loaded before
// the histogram, so their latency hides behind it. A block publishes, per expert, how many of its
// pairs it sent (one atomic per expert); the block that completes an expert's total releases its count.
// `then(publish)` runs the publish (below): the send kernel calls it at once; the fused kernel
// first lays out its receive (dispatch_kernel).
template <int P, bool kPuts, typename Then>
__device__ __forceinline__ void dispatch_send(const DispatchArgs& a, Then&& then) {
  const LLLayout& L = a.layout;
  const uint64_t put_mask = kPuts ? a.put_mask : 0;  // 0: the branches of puts fold away
  trace_mark(a.trace, kTraceDispatchSend, 0);
  __shared__ int total[kMaxExperts];   // this rank's pairs per expert
  __shared__ int before[kMaxExperts];  // ... among the pairs before the current round
  __shared__ int mine[kMaxExperts];    // ... among this block's pairs
  __shared__ int round_expert[kRoundPairs];  // the round's pairs: expert id (-1: none)
  __shared__ int dst_rank[kRoundPairs];      // the rank pair i sends to (-1: nothing)
  __shared__ int round_slot[kRoundPairs];    // and its slot there (its position among this rank's rows for the expert)
  __shared__ uint8_t* dst[kRoundPairs];      // per token of the round: its messages, one per destination rank, first
  __shared__ int num_dst[kRoundPairs];       // per token of the round: how many
  __shared__ uint8_t* peer_data[kMaxRanks];  // each rank's data area of the buffer in use
  __shared__ uint8_t* peer_tokens[kMaxRanks];  // where this rank's messages to each rank are written
  __shared__ bool peer_cut[kMaxRanks];       // cut(mask, me, rank)
  extern __shared__ uint4 stage[];     // staged send (FP8): the current token's payload and scales
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int me = a.peers.rank;
  const int K = L.num_topk;
  const int E = L.num_experts;
  const int t0 = static_cast<int>(static_cast<int64_t>(a.num_tokens) * blockIdx.x / gridDim.x);
  const int t1 = static_cast<int>(static_cast<int64_t>(a.num_tokens) * (blockIdx.x + 1) / gridDim.x);
  const int p0 = t0 * K;
  const int p1 = t1 * K;
  const int pairs = a.num_tokens * K;
  const int rt = round_tokens<P>(L);
  constexpr int kPassLoads = pass_loads(P);
  PassLoads<kPassLoads> loads = load_pass<P>(a, t0, min(t0 + rt, t1), 0);  // the first pass, in flight from here
  for (int e = tid; e < E; e += kThreads) total[e] = before[e] = mine[e] = 0;
  // The receive of this dispatch counts its owners from zero (it waits for owners_ready: in a fused
  // launch its blocks may get there before block 0 has run), and reads (as the combine does) the
  // mask this send used, whatever the live one becomes meanwhile.
  if (blockIdx.x == 0 && tid == 0) {
    a.routing[L.ws_num_owners] = 0;
    st_release_gpu(a.routing + L.ws_owners_ready, 1);
  }
  if (blockIdx.x == 0 && a.mask_snapshot != nullptr && tid < L.num_ranks) {
    a.mask_snapshot[tid] = a.mask != nullptr ? a.mask[tid] : 0;
  }
  // The peers' addresses and the mask, once per block (a round reads them for every pair).
  uint8_t* own_data = buffer_of(a.peers, me, a.data_offset);
  uint8_t* outbox_tokens = buffer_of(a.peers, me, a.outbox_offset) + L.off_dtokens;
  if (tid < L.num_ranks) {
    peer_data[tid] = buffer_of(a.peers, tid, a.data_offset);
    peer_tokens[tid] = puts_to(put_mask, tid)
                           ? outbox_tokens + static_cast<int64_t>(tid) * L.m * L.msg_bytes
                           : peer_data[tid] + L.off_dtokens + static_cast<int64_t>(me) * L.m * L.msg_bytes;
    peer_cut[tid] = cut(a.mask, me, tid);
  }
  __syncthreads();
  for (int p = tid; p < pairs; p += kThreads) {
    const int64_t e = __ldg(a.topk_idx + p);
    if (e < -1 || e >= E) bad_topk_entry("low_latency_dispatch", me, p, K, e, E);
    if (e < 0) continue;  // -1: no expert
    atomicAdd(&total[e], 1);
    if (p < p0) atomicAdd(&before[e], 1);
    else if (p < p1) atomicAdd(&mine[e], 1);
  }
  __syncthreads();
  // Statistics, and every expert's count, early (the owner of e: see owns_expert_count); an expert
  // this rank sends nothing to is landed at once (nothing to wait for).
  for (int e = blockIdx.x + tid * static_cast<int>(gridDim.x); e < E; e += gridDim.x * kThreads) {
    const int d = e / L.num_local;
    const bool masked = cut(a.mask, me, d);
    a.counts_e[e] = masked ? 0 : min(total[e], L.m);
    if (!masked) {
      const int64_t at = L.off_dflags + 4 * ((e % L.num_local) * L.num_ranks + me);
      const int value = dispatch_flag(L, total[e] == 0 ? 1 | kLanded : min(total[e], L.m) + 1);
      if (puts_to(put_mask, d)) put_int(reinterpret_cast<int*>(buffer_of(a.peers, me, a.flags_offset) + at), value, d);
      else st_relaxed_sys(reinterpret_cast<int*>(buffer_of(a.peers, d, a.flags_offset) + at), value);
    }
  }
  trace_mark(a.trace, kTraceDispatchSend, 1);

  const int groups = L.hidden / kGroup;
  for (int r0 = t0; r0 < t1; r0 += rt) {
    const int r1 = min(r0 + rt, t1);
    const int rp = (r1 - r0) * K;  // <= kRoundPairs
    if (rp <= 32) {
      if (tid < 32) route_round_in_warp<kPuts>(a, r0, rp, peer_data, peer_tokens, own_data, peer_cut, before, dst, num_dst);
      __syncthreads();
    } else {
      // 1. The round's experts; each pair's slot (pairs before it with its expert), its index entry
      //    at the destination, and its destination rank.
      if (tid < rp) {
        const int64_t e = __ldg(a.topk_idx + r0 * K + tid);
        round_expert[tid] = e >= 0 ? static_cast<int>(e) : -1;
      }
      __syncthreads();
      if (tid < rp) {
        const int e = round_expert[tid];
        int rank = -1;
        if (e >= 0) {
          int j = before[e];
          for (int q = 0; q < tid; ++q) j += round_expert[q] == e ? 1 : 0;
          a.pair_pos[r0 * K + tid] = j;
          const int d = e / L.num_local;
          if (!peer_cut[d] && j < L.m) {  // beyond M rows of one source for one expert: dropped (see header)
            const int64_t at =
                L.off_dindex + 4 * ((static_cast<int64_t>(e % L.num_local) * L.num_ranks + me) * L.m + j);
            store_int_to(put_mask, d, reinterpret_cast<int*>(peer_data[d] + at),
                         reinterpret_cast<int*>(own_data + at), r0 + tid / K);
            rank = d;
            round_slot[tid] = j;
          }
        }
        dst_rank[tid] = rank;
      }
      __syncthreads();
      // 2. A token's message goes to each of its ranks once: the first k for that rank writes the meta
      //    (the token, then its (local expert, slot) pairs there in k order: the combine's list).
      if (tid < rp) {
        const int e = round_expert[tid];
        if (e >= 0) atomicAdd(&before[e], 1);  // every pair of the round has read before[]
        const int k = tid % K;
        const int first_k = tid - k;
        const int d = dst_rank[tid];
        bool first = d >= 0;
        for (int q = first_k; q < tid && first; ++q) first = dst_rank[q] != d;
        uint8_t* msg = nullptr;
        if (first) {
          const int t = r0 + tid / K;
          msg = peer_tokens[d] + static_cast<int64_t>(t) * L.msg_bytes;
          int* meta = reinterpret_cast<int*>(msg + L.off_src);
          int n = 0;
          for (int q = tid; q < first_k + K; ++q) {
            if (dst_rank[q] != d) continue;
            const int eq = round_expert[q];
            meta[2 + 2 * n] = eq % L.num_local;
            meta[3 + 2 * n] = round_slot[q];
            ++n;
          }
          meta[0] = t;
          meta[1] = n;
        }
        dst[tid] = msg;
      }
      __syncthreads();
      // Each token's messages, compacted to the front of its K entries (the rows loop over them only).
      if (tid < r1 - r0) {
        int n = 0;
        for (int k = 0; k < K; ++k) {
          uint8_t* msg = dst[tid * K + k];
          if (msg != nullptr) dst[tid * K + n++] = msg;
        }
        num_dst[tid] = n;
      }
      __syncthreads();
    }
    if (r0 == t0) trace_mark(a.trace, kTraceDispatchSend, 2);
    // 3. Rows: cast (FP8) and store to every destination, a pass of loads at a time.
    const int round_items = is_fp8(P) ? (r1 - r0) * groups : (r1 - r0) * static_cast<int>(L.x_bytes / 16);
    const int per_pass = is_fp8(P) ? kHalfWarps * kPassLoads : kThreads * kPassLoads;
    for (int base = 0; base < round_items; base += per_pass) {
      if (base > 0 || r0 > t0) loads = load_pass<P>(a, r0, r1, base);
      if (is_fp8(P)) {
        const int hl = lane % 16;
#pragma unroll
        for (int j = 0; j < kPassLoads; ++j) {
          const int i = base + tid / 16 + kHalfWarps * j;
          if (base + 2 * (tid / 32) + kHalfWarps * j >= round_items) break;  // both half-warps done: the warp leaves together
          const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&loads.raw[j]);
          float f[8];
          float amax = 0.0f;
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            f[c] = __bfloat162float(v[c]);
            amax = fmaxf(amax, fabsf(f[c]));
          }
#pragma unroll
          for (int offset = 8; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullWarp, amax, offset));
          if (i >= round_items) continue;  // after the shuffles: the whole warp takes part in them
          // amax / 448, floored, optionally rounded up to a power of two, and x / scale correctly
          // rounded: moe_ep.comm.fp8's quantizer bit for bit. (A multiplication by the reciprocal
          // moved an FP8 value by one step in rare ties, so the bench's check against the reference
          // failed; the divisions measured no slower: the send is not bound by instructions.)
          float scale = fmaxf(amax, kAmaxFloor) / kFp8Max;
          if (a.round_scale) scale = pow2_ceil(scale);
          uint2 packed = make_uint2(0u, 0u);
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            const float q = fminf(fmaxf(f[c] / scale, -kFp8Max), kFp8Max);
            const unsigned b = __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
            if (c < 4) packed.x |= b << (8 * c); else packed.y |= b << (8 * (c - 4));
          }
          const int tk = i / groups;
          const int g = i % groups;
          if (P == kFp8Staged) {  // one token per round
            uint8_t* staged = reinterpret_cast<uint8_t*>(stage);
            reinterpret_cast<uint2*>(staged + g * kGroup)[hl] = packed;
            if (hl == 0) reinterpret_cast<float*>(staged + L.off_scales)[g] = scale;
            continue;
          }
          for (int m = 0; m < num_dst[tk]; ++m) {
            uint8_t* msg = dst[tk * K + m];
            reinterpret_cast<uint2*>(msg + g * kGroup)[hl] = packed;
            if (hl == 0) reinterpret_cast<float*>(msg + L.off_scales)[g] = scale;
          }
        }
      } else {
        const int per_token = static_cast<int>(L.x_bytes / 16);
#pragma unroll
        for (int j = 0; j < kPassLoads; ++j) {
          const int i = base + tid + kThreads * j;
          if (i >= round_items) continue;
          const int tk = i / per_token;
          const int v = i - tk * per_token;
          const int n = num_dst[tk];
          for (int m = 0; m < n; ++m) reinterpret_cast<uint4*>(dst[tk * K + m])[v] = loads.raw[j];
        }
      }
    }
    if (P == kFp8Staged) {
      // Every thread stores 16-byte vectors of the staged message, all destinations at once.
      __syncthreads();
      const int vectors = static_cast<int>(L.off_src / 16);  // payload + scales (off_src is 16-aligned)
      for (int i = tid; i < num_dst[0] * vectors; i += kThreads) {
        reinterpret_cast<uint4*>(dst[i / vectors])[i % vectors] = stage[i % vectors];
      }
    }
    if (put_mask != 0) {
      // The round's messages in the outbox are whole: a warp puts each into its rank's token area
      // [this rank][token] (non-blocking; the quiet before the counts completes them).
      __syncthreads();
      const int64_t outbox_bytes = static_cast<int64_t>(L.num_ranks) * L.m * L.msg_bytes;
      for (int i = tid / 32; i < (r1 - r0) * K; i += kWarps) {
        if (i % K >= num_dst[i / K]) continue;
        const int64_t off = dst[i] - outbox_tokens;
        if (off < 0 || off >= outbox_bytes) continue;  // a mapped rank's message, stored in place
        const int d = static_cast<int>(off / (static_cast<int64_t>(L.m) * L.msg_bytes));
        const int t = static_cast<int>((off / L.msg_bytes) % L.m);
        warp_put(own_data + L.off_dtokens + (static_cast<int64_t>(me) * L.m + t) * L.msg_bytes, dst[i], L.msg_bytes, d);
      }
    }
    __syncthreads();  // the round's shared arrays are rewritten by the next round
  }
  if (t0 == t1) trace_mark(a.trace, kTraceDispatchSend, 2);
  trace_mark(a.trace, kTraceDispatchSend, 3);

  // Publish: after the block's barrier one fence orders every thread's stores (as a grid barrier
  // does); then per expert one atomic adds this block's pairs (and 1 from the owner of its early
  // count), and the block that completes the expert's total releases it as landed (the expert's
  // rows from every block before it). With puts, every thread first completes what it put
  // (messages, index entries, early counts).
  auto publish = [&]() {
    if (put_mask != 0) quiet_puts();
    if (tid == 0) fence_release_sys();
    __syncthreads();
    for (int e = tid; e < E; e += kThreads) {
      if (total[e] == 0) continue;
      const int add = mine[e] + (owns_expert_count(e) ? 1 : 0);
      if (add == 0) continue;
      const int d = e / L.num_local;
      if (peer_cut[d]) continue;
      if (atomicAdd(a.send_done + e, add) + add == total[e] + 1) {
        fence_release_sys();  // the other blocks' rows, seen through their adds, before the flag
        a.send_done[e] = 0;  // every pair of e has counted: ready for the next dispatch
        const int64_t at = L.off_dflags + 4 * ((e % L.num_local) * L.num_ranks + me);
        const int value = dispatch_flag(L, (min(total[e], L.m) + 1) | kLanded);
        if (puts_to(put_mask, d)) put_int(reinterpret_cast<int*>(buffer_of(a.peers, me, a.flags_offset) + at), value, d);
        else st_relaxed_sys(reinterpret_cast<int*>(buffer_of(a.peers, d, a.flags_offset) + at), value);  // after the fence above: a release
      }
    }
    __syncthreads();
    trace_mark(a.trace, kTraceDispatchSend, 4);
  };
  then(publish);
}

// Exclusive prefix sum of n <= 2 * kThreads ints, in place in shared memory (the whole block calls it).
__device__ void block_exclusive_scan(int* data, int n) {
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int a0 = 2 * tid < n ? data[2 * tid] : 0;
  const int a1 = 2 * tid + 1 < n ? data[2 * tid + 1] : 0;
  int inclusive = a0 + a1;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(kFullWarp, w, offset);
      if (lane >= offset) w += up;
    }
    if (lane < kWarps) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int exclusive = inclusive - (a0 + a1) + (warp > 0 ? warp_sums[warp - 1] : 0);
  if (2 * tid < n) data[2 * tid] = exclusive;
  if (2 * tid + 1 < n) data[2 * tid + 1] = exclusive + a0;
  __syncthreads();
}

constexpr int64_t kPieceBytes = 4096;  // the dispatch receive copies rows in pieces of about this size, one per warp item
// Combine: a receive item covers kSlices x 256 columns of one token (two ranks' partial sums in
// flight); a send item kSendSlices x 256 columns of one owner, with kRowBatch of its rows in flight
// per lane (kRowBatch x kSendSlices 16-byte loads; kFused* in the fused kernel). The split send
// kernel's narrow items: twice the items (at 128 tokens one rank's 128 owners made 896 items of 4
// slices, so only 56 of 132 blocks had work) at the same bytes in flight per warp, 4 rows deep.
constexpr int kSlices = 4;
constexpr int kSendSlices = 2;
constexpr int kRowBatch = 4;
// The fused kernel keeps the wider items: with two ranks' traffic on one HBM (bench loopback, 128
// tokens) they combined in 36.4 µs against 42.7 for the narrow ones, while one rank alone differed
// by 0.3 µs (18.9 / 18.6). The split send kernel takes the narrow items: 11.9 µs against 19.5.
constexpr int kFusedSendSlices = 4;
constexpr int kFusedRowBatch = 2;

// The largest i in [0, n) with prefix[i] <= value (prefix non-decreasing, prefix[0] <= value): the
// entry whose rows hold row `value` (entries without rows share their prefix with the next one).
__device__ __forceinline__ int find_entry(const int* prefix, int n, int value) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= value) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ----------------------------------------------------------------------------- dispatch recv
// Every block waits for all (expert, source) counts (polling its own memory), so each knows where
// every row goes; the rows of all experts are then spread, in pieces, over every warp of the grid.
// The last block past its waits resets the flags.
// kTimed: this receive keeps the wait-time statistics (a.wait_stats): only the split receive kernel
// does (the launchers run split kernels when statistics are asked for), so the fused kernel's code
// is exactly what it is without them.
// When the rows land: the split kernel (run after the sends, usually long after) waits for every
// (expert, source) to be landed before it copies, as the statistics need. The fused kernel reaches
// here while the last send blocks of either rank still publish: there each lane waits only for the
// entry of the item it looks up, so an expert whose few sending blocks are done is copied while
// the others still land (an expert's rows come from a handful of blocks, not from the slowest).
// `before_copy()` runs once the layout is written, before the first wait for a landed row (the
// fused kernel publishes its send there).
template <bool kFp8, bool kTimed, typename BeforeCopy>
__device__ __forceinline__ void dispatch_recv(const DispatchArgs& a, BeforeCopy&& before_copy) {
  const LLLayout& L = a.layout;
  trace_mark(a.trace, kTraceDispatchRecv, 0);
  __shared__ int counts[kMaxExperts];  // [l][s]: rows of source s for local expert l
  __shared__ int first[kMaxExperts];   // [l][s]: their first row among all received rows ([l][s] order)
  __shared__ bool last;
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int E = L.num_experts;  // = num_local x R entries
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int64_t slots = static_cast<int64_t>(R) * L.m;
  uint8_t* own = buffer_of(a.peers, me, a.data_offset);
  uint8_t* own_flags = buffer_of(a.peers, me, a.flags_offset);
  int* flags = reinterpret_cast<int*>(own_flags + L.off_dflags);
  // Wait-time statistics (a.wait_stats): block 0 notes, per source, when the last of its flags
  // that was not there at the first look arrived (a flag found set costs nothing, even when this
  // thread only looked after waiting for another source); every block waits for the same flags,
  // so block 0's view is the rank's.
  __shared__ unsigned long long waited[kTimed ? kMaxRanks : 1];
  const bool timed = kTimed && a.wait_stats != nullptr && blockIdx.x == 0;
  if (timed) {
    for (int s = tid; s < R; s += kThreads) waited[s] = 0;
    __syncthreads();
  }
  const uint64_t wait_start = timed ? wait::global_timer_ns() : 0;
  int other_sizes = -1;  // (source << kTagShift) | its tag, when a source's tag is not ours
  for (int i = tid; i < E; i += kThreads) {
    const int s = i % R;
    int count = 0;
    if (!cut(a.mask, me, s)) {
      const wait::WaitSite site{"low_latency_dispatch_recv", "dispatch_flag[expert][src] (count)", me, s, a.timeout_ns};
      long long spun = 0;
      const int flag = wait::wait_value<wait::Scope::kSys>(static_cast<const int*>(flags + i), 0, wait::Cmp::kNe, site,
                                                           timed ? &spun : nullptr);
      const int tag = (flag & (kLanded - 1)) >> kTagShift;
      if (tag != L.tag) other_sizes = (s << kTagShift) | tag;  // reported after the loop (a call in it spills)
      count = min(max((flag & kCountMask) - 1, 0), L.m);  // a sender never publishes more than M
      if (spun > 0) atomicMax(waited + s, wait::global_timer_ns() - wait_start);
    }
    counts[i] = count;
    first[i] = count;
  }
  if (tid == kThreads - 1) {  // num_owners is zero (the send's block 0) before any owner is appended
    const wait::WaitSite site{"low_latency_dispatch_recv", "owners_ready", me, me, a.timeout_ns};
    wait::wait_value<wait::Scope::kGpu>(static_cast<const int*>(a.routing + L.ws_owners_ready), 0, wait::Cmp::kNe, site);
  }
  if (__syncthreads_or(other_sizes >= 0) && other_sizes >= 0) {
    layout_mismatch(me, other_sizes >> kTagShift, other_sizes & ((1 << kTagShift) - 1), L.tag, L.m, L.hidden,
                    L.num_experts, L.num_topk, static_cast<int>(L.use_fp8));
  }
  trace_mark(a.trace, kTraceDispatchRecv, 1);
  const int last_count = counts[E - 1];
  block_exclusive_scan(first, E);
  const int rows = first[E - 1] + last_count;
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  // Rows from each source (the weights it stores here at combine): block 0, a warp per source.
  if (blockIdx.x == 0) {
    for (int s = tid / 32; s < R; s += kWarps) {
      int total = 0;
      for (int l = lane; l < L.num_local; l += 32) total += counts[l * R + s];
      total = __reduce_add_sync(kFullWarp, total);
      if (lane == 0) a.routing[L.ws_src_rows + s] = total;
    }
  }
  // layout_range, recv_count and statistics: entry i = (l, s) belongs to one thread of the grid.
  for (int64_t i = gtid; i < E; i += grid_threads) {
    const int l = static_cast<int>(i / R);
    const int s = static_cast<int>(i % R);
    const int expert_first = first[l * R];
    a.layout_range[i] = (static_cast<int64_t>(first[i] - expert_first) << 32) | counts[i];
    if (s == 0) {
      const int expert_end = l + 1 < L.num_local ? first[(l + 1) * R] : rows;
      a.recv_count[l] = expert_end - expert_first;
      if (a.cumulative_stats != nullptr) a.cumulative_stats[l] += expert_end - expert_first;
    }
  }
  // Slots past an expert's rows: src_info -1.
  for (int64_t q = gtid; q < static_cast<int64_t>(L.num_local) * slots; q += grid_threads) {
    const int l = static_cast<int>(q / slots);
    const int expert_end = l + 1 < L.num_local ? first[(l + 1) * R] : rows;
    if (q % slots >= expert_end - first[l * R]) a.src_info[q] = -1;
  }
  trace_mark(a.trace, kTraceDispatchRecv, 2);
  before_copy();
  // The layout above needed only the counts; the rows and index entries are read from here on.
  auto wait_landed = [&](int i, long long* spun) {
    const wait::WaitSite site{"low_latency_dispatch_recv", "dispatch_flag[expert][src] (landed)", me, i % R,
                              a.timeout_ns};
    wait::wait_value<wait::Scope::kSys>(static_cast<const int*>(flags + i), kLanded, wait::Cmp::kGe, site, spun);
  };
  int ticket = 0;
  if constexpr (kTimed) {
    for (int i = tid; i < E; i += kThreads) {
      const int s = i % R;
      if (cut(a.mask, me, s) || counts[i] == 0) continue;  // (a source with no rows here is landed at once)
      long long spun = 0;
      wait_landed(i, timed ? &spun : nullptr);
      if (spun > 0) atomicMax(waited + s, wait::global_timer_ns() - wait_start);
    }
    __syncthreads();
    if (timed) {
      for (int s = tid; s < R; s += kThreads) a.wait_stats[s] += static_cast<long long>(waited[s]);
    }
    // This block is past its waits: its ticket says whether it is the last (read at the end, so
    // the atomic's round trip overlaps the copies); that block resets the flags.
    if (tid == 0) ticket = atomicAdd(reinterpret_cast<int*>(own_flags + L.off_done) + 2, 1);
  }
  const int groups = L.hidden / kGroup;
  const int64_t pieces = (L.x_bytes + kPieceBytes - 1) / kPieceBytes;
  const int64_t piece_bytes = align16((L.x_bytes + pieces - 1) / pieces);
  const int64_t warp = gtid / 32;
  const int64_t num_warps = grid_threads / 32;
  const int64_t total_items = rows * pieces;
  const int* dindex = reinterpret_cast<const int*>(own + L.off_dindex);
  // A warp's items are warp + u x num_warps: lane u looks up item u's token (one round trip per 32
  // items, not one per item); on piece 0 the row's meta and scales are loaded before its copy and
  // used after it, so the three loads overlap.
  const bool scales_ahead = a.use_ue8m0 ? groups / 4 <= 32 : groups <= 64;
  for (int64_t batch = warp; batch < total_items; batch += 32 * num_warps) {
    int my_token = 0;
    const int64_t my_item = batch + lane * num_warps;
    if (my_item < total_items) {
      const int r = static_cast<int>(my_item / pieces);
      const int i = find_entry(first, E, r);
      if constexpr (!kTimed) wait_landed(i, nullptr);  // item u's entry: waited by lane u, before its reads
      my_token = __ldcg(dindex + static_cast<int64_t>(i) * L.m + (r - first[i]));  // [l][s] = entry i
    }
    if constexpr (!kTimed) __syncwarp();  // lane u's acquire orders the warp's reads of item u
    for (int u = 0; u < 32; ++u) {
      const int64_t item = batch + u * num_warps;
      if (item >= total_items) break;  // the same for the whole warp
      const int token = __shfl_sync(kFullWarp, my_token, u);
      const int r = static_cast<int>(item / pieces);
      const int64_t piece = item % pieces;
      const int i = find_entry(first, E, r);
      const int l = i / R;
      const int s = i % R;
      const int j = r - first[i];
      const int idx = r - first[l * R];
      const uint8_t* msg = own + L.off_dtokens + (static_cast<int64_t>(s) * L.m + token) * L.msg_bytes;
      const int64_t row = static_cast<int64_t>(l) * slots + idx;
      const int* meta = reinterpret_cast<const int*>(msg + L.off_src);
      const float* scales = reinterpret_cast<const float*>(msg + L.off_scales);
      int n = 0;
      int meta_l = -1;
      int meta_j = -1;
      float4 sc = make_float4(0.f, 0.f, 0.f, 0.f);
      if (piece == 0) {
        n = __ldcg(meta + 1);
        if (lane < L.num_topk) {
          meta_l = __ldcg(meta + 2 + 2 * lane);
          meta_j = __ldcg(meta + 3 + 2 * lane);
        }
        if (kFp8 && scales_ahead) {
          if (a.use_ue8m0) {
            if (lane < groups / 4) sc = __ldcg(reinterpret_cast<const float4*>(scales) + lane);  // 16-byte aligned
          } else {
            if (lane < groups) sc.x = __ldcg(scales + lane);
            if (lane + 32 < groups) sc.y = __ldcg(scales + lane + 32);
          }
        }
      }
      const int64_t begin = piece * piece_bytes;
      warp_copy(static_cast<uint8_t*>(a.recv_x) + row * L.x_bytes + begin, msg + begin,
                min(piece_bytes, L.x_bytes - begin), lane);
      if (piece != 0) continue;
      // This row's place q in its token's list here: the list (rows in k order), and the owners.
      const bool match = lane < n && meta_l == l && meta_j == j;
      const unsigned hits = __ballot_sync(kFullWarp, match);
      if (lane == 0 && hits != 0) {
        const int q = __ffs(hits) - 1;
        const int64_t pair = static_cast<int64_t>(s) * L.m + token;
        a.routing[L.ws_token_rows + pair * L.num_topk + q] = static_cast<int>(row);
        // Where the source stores this row's weight at combine ((l, s, j), as the combine's phase 1).
        a.routing[L.ws_token_wslots + pair * L.num_topk + q] = (l * R + s) * L.m + j;
        if (q == 0) {
          a.routing[L.ws_token_count + pair] = n;
          a.routing[L.ws_owners + atomicAdd(a.routing + L.ws_num_owners, 1)] = static_cast<int>(pair);
        }
      }
      if (kFp8) {
        if (a.use_ue8m0) {
          // Scales [L, G/4, slots] int32: group 4w+i's exponent byte in byte i of word w.
          auto word_of = [](float4 f) {
            return ((__float_as_uint(f.x) >> 23) & 0xFFu) | (((__float_as_uint(f.y) >> 23) & 0xFFu) << 8) |
                   (((__float_as_uint(f.z) >> 23) & 0xFFu) << 16) | (((__float_as_uint(f.w) >> 23) & 0xFFu) << 24);
          };
          for (int w = lane; w < groups / 4; w += 32) {
            const float4 f = scales_ahead ? sc : __ldcg(reinterpret_cast<const float4*>(scales) + w);
            static_cast<int*>(a.recv_scales)[(static_cast<int64_t>(l) * (groups / 4) + w) * slots + idx] =
                static_cast<int>(word_of(f));
          }
        } else {
          for (int g = lane; g < groups; g += 32) {
            const float v = !scales_ahead ? __ldcg(scales + g) : (g == lane ? sc.x : sc.y);
            static_cast<float*>(a.recv_scales)[(static_cast<int64_t>(l) * groups + g) * slots + idx] = v;
          }
        }
      }
      if (lane == 0) a.src_info[row] = token;
    }
  }
  if constexpr (!kTimed) {
    // Past this block's last wait (its copies) only: a block that reset the flags while another
    // still waited for one would leave that block spinning on a cleared flag.
    __syncthreads();
    if (tid == 0) ticket = atomicAdd(reinterpret_cast<int*>(own_flags + L.off_done) + 2, 1);
  }
  if (tid == 0) last = ticket == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (last) {  // every block has read every flag: ready for this buffer's next dispatch
    for (int i = tid; i < E; i += kThreads) reinterpret_cast<volatile int*>(flags)[i] = 0;
    if (tid == 0) {
      reinterpret_cast<volatile int*>(own_flags + L.off_done)[2] = 0;
      reinterpret_cast<volatile int*>(a.routing)[L.ws_owners_ready] = 0;
    }
  }
  trace_mark(a.trace, kTraceDispatchRecv, 3);
}

template <int P, bool kPuts>
__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(DispatchArgs a) {
  dispatch_send<P, kPuts>(a, [](auto&& publish) { publish(); });
}
template <bool kFp8>
__global__ void __launch_bounds__(kThreads) dispatch_recv_kernel(DispatchArgs a) { dispatch_recv<kFp8, true>(a, [] {}); }
// Both halves in one launch: the receive half reads the live mask, which is the one the send half used.
// With a.layout_first (MOE_EP_LL_FUSED_ORDER, default) a block lays out its receive between its
// stores and its publish: the counts went early (after the histogram), so they are in by then,
// and the publish's fence, which waits for the block's NVLink stores to be acknowledged, waits
// while the layout is computed instead of before it. No block waits here for anything a block
// sends after its own waits: the early counts come before any wait, so the order cannot deadlock.
template <int P, bool kPuts>
__global__ void __launch_bounds__(kThreads) dispatch_kernel(DispatchArgs a) {
  dispatch_send<P, kPuts>(a, [&](auto&& publish) {
    if (!a.layout_first) publish();
    dispatch_recv<is_fp8(P), false>(a, [&] {
      if (a.layout_first) publish();
    });
  });
}

// ------------------------------------------------------------------------------ combine send
// A lane's 8 columns of a partial sum, stored as float32 (two 16-byte stores) or rounded to bf16
// (one 16-byte store: CombineArgs::bf16_partials).
__device__ __forceinline__ void store_partial(float* dst, const float (&v)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&pair);
}
__device__ __forceinline__ void store_partial(__nv_bfloat16* dst, const float (&v)[8]) {
  *reinterpret_cast<uint4*>(dst) =
      make_uint4(bf16_pair(v[0], v[1]), bf16_pair(v[2], v[3]), bf16_pair(v[4], v[5]), bf16_pair(v[6], v[7]));
}

// A pair (t, k) of this rank's tokens, as the combine sees it: the rank d its expert lives on, or
// -1 when it has no row (id -1, a cut rank, or dropped at dispatch). A bad id traps with a message.
__device__ __forceinline__ int pair_rank(const CombineArgs& a, int64_t p, int me) {
  const LLLayout& L = a.layout;
  const int64_t e = a.topk_idx[p];
  if (e < -1 || e >= L.num_experts) bad_topk_entry("low_latency_combine", me, p, L.num_topk, e, L.num_experts);
  if (e < 0) return -1;
  const int d = static_cast<int>(e / L.num_local);
  if (cut(a.mask, me, d) || a.pair_pos[p] >= L.m) return -1;
  return d;
}

// A release add at system scope (the counter's readers acquire it; the adds of many writers make one
// release sequence).
__device__ __forceinline__ void red_release_sys_add(int* ptr, int value) {
  asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Rows this rank received from source s at the dispatch (= weights s stores here at combine), for
// lane's sources s = lane and lane + 32; 0 past R.
struct SourceRows {
  int lo = 0;
  int hi = 0;
};
__device__ __forceinline__ SourceRows source_rows(const CombineArgs& a, int lane) {
  const LLLayout& L = a.layout;
  SourceRows rows;
  if (lane < L.num_ranks) rows.lo = __ldcg(a.routing + L.ws_src_rows + lane);
  if (lane + 32 < L.num_ranks) rows.hi = __ldcg(a.routing + L.ws_src_rows + lane + 32);
  return rows;
}

// One warp waits (bounded) until every source's weights for this rank's rows are here: weight
// counter [s] reaches the rows s sent at the dispatch. The warp's later loads see the weights.
// `wait_stats` (non-null for one warp of the grid: the first): lane s adds its wait for source s.
__device__ __forceinline__ void warp_wait_weights(const CombineArgs& a, const int* counters, SourceRows rows, int lane,
                                                  long long* wait_stats) {
  const int me = a.peers.rank;
  for (int half = 0; half < 2; ++half) {
    const int s = lane + 32 * half;
    const int expected = half == 0 ? rows.lo : rows.hi;
    if (s < a.layout.num_ranks && expected > 0) {
      const wait::WaitSite site{"low_latency_combine_send", "weight_count[src]", me, s, a.timeout_ns};
      wait::wait_value<wait::Scope::kSys>(counters + s, expected, wait::Cmp::kGe, site,
                                          wait_stats != nullptr ? wait_stats + s : nullptr);
    }
  }
  __syncwarp();
}

// A combine flag [d] sums one share per block of rank d's combine send grid: block 0's share is
// kCombineDone - (blocks - 1), every other block's 1, so the flag reaches kCombineDone exactly when
// the last of them has published, whatever grid size rank d runs, and stays below it before.
constexpr int kCombineDone = 1 << 20;
__device__ __forceinline__ int combine_done_share(unsigned block, unsigned blocks) {
  return block == 0 ? kCombineDone - static_cast<int>(blocks - 1) : 1;
}

// Two phases. As a source, every block stores its share of this rank's tokens' top-k weights into
// their expert ranks (4 bytes per row) and adds, per rank, how many it stored to that rank's weight
// counter [this rank]. As an expert rank, one warp per (owner, kSendSlices x 256 columns) loads the owner's
// rows here, waits (once per warp, after its first loads are in flight) until every source's weights
// are in, sums weight x expert output over the rows in k order, in float32, and stores that partial
// sum into the owner's source at [this rank][token]: a token crosses back once per rank, not once per
// expert. Each block then adds its share to every source's combine flag (combine_done_share); the
// weight counters are reset by the combine receive, once every rank's flag is complete.
// The combine's topk_idx must be the dispatch's (as the reference backend assumes): the counters
// count the dispatch's rows, so other ids end in the bounded wait's error, not in wrong sums.
// Wait-time statistics (a.wait_stats, kTimed: the split kernels) of a combine, per source s: the
// first warp's wait here for s's weights (the grid's first item is the first warp's) plus the
// receive's wait for s's flag.
template <int kRowBatch, int kSendSlices, bool kPuts, typename Partial, bool kTimed>
__device__ __forceinline__ void combine_send(const CombineArgs& a) {
  const LLLayout& L = a.layout;
  const uint64_t put_mask = kPuts ? a.put_mask : 0;  // 0: the branches of puts fold away
  trace_mark(a.trace, kTraceCombineSend, 0);
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int K = L.num_topk;
  const int M = L.m;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  uint8_t* own = buffer_of(a.peers, me, a.data_offset);
  uint8_t* own_flags = buffer_of(a.peers, me, a.flags_offset);
  int* counters = reinterpret_cast<int*>(own_flags + L.off_wflags);
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  const SourceRows expected = source_rows(a, lane);

  // Phase 1, spread over the grid: this rank's weights into their expert ranks, then per rank one
  // release add of how many this block stored there.
  __shared__ int stored[kMaxRanks];
  for (int r = tid; r < R; r += kThreads) stored[r] = 0;
  __syncthreads();
  for (int64_t p = gtid; p < static_cast<int64_t>(a.num_tokens) * K; p += grid_threads) {
    const int d = pair_rank(a, p, me);
    if (d < 0) continue;
    const int64_t e = a.topk_idx[p];
    const int64_t at = L.off_cweights + 4 * (((e % L.num_local) * R + me) * M + a.pair_pos[p]);
    if (puts_to(put_mask, d)) put_float(reinterpret_cast<float*>(own + at), a.topk_weights[p], d);
    else *reinterpret_cast<float*>(buffer_of(a.peers, d, a.data_offset) + at) = a.topk_weights[p];
    atomicAdd(&stored[d], 1);
  }
  if (put_mask != 0) quiet_puts();  // the weights this thread put are in before the counts
  __syncthreads();
  if (tid < R && stored[tid] > 0) {
    int* own_counter = counters + me;
    if (puts_to(put_mask, tid)) {
      put_add(own_counter, stored[tid], tid);
    } else {
      __threadfence_system();  // after the block's barrier: every thread's weight stores come first
      red_release_sys_add(reinterpret_cast<int*>(buffer_of(a.peers, tid, a.flags_offset) + L.off_wflags) + me,
                          stored[tid]);
    }
  }
  trace_mark(a.trace, kTraceCombineSend, 1);

  // Phase 2: the partial sums go back.
  const int num_owners = *reinterpret_cast<const volatile int*>(a.routing + L.ws_num_owners);
  // An item is (owner, kSendSlices x 256 columns): the owner's rows and weights are looked up once per
  // item (lane q holds row q), then kRowBatch rows x kSendSlices vectors per lane are in flight at once.
  const int slices = (L.hidden + 255) / 256;  // 32 lanes x 8 columns
  const int groups = (slices + kSendSlices - 1) / kSendSlices;
  const int64_t items = static_cast<int64_t>(num_owners) * groups;
  const int64_t warp = gtid / 32;
  const int64_t num_warps = grid_threads / 32;
  const auto* weights = reinterpret_cast<const float*>(own + L.off_cweights);
  const auto* x = static_cast<const __nv_bfloat16*>(a.x);
  bool weights_in = false;
  for (int64_t item = warp; item < items; item += num_warps) {
    const int owner = a.routing[L.ws_owners + item / groups];
    const int64_t col0 = (item % groups) * kSendSlices * 256 + lane * 8;
    const int s = owner / M;
    const int t = owner % M;
    const int n = a.routing[L.ws_token_count + owner];
    // Lane q < K: the owner's row q here and where its weight is (entries past n are stale).
    int my_row = 0;
    int my_wslot = 0;
    if (lane < K) {
      my_row = a.routing[L.ws_token_rows + static_cast<int64_t>(owner) * K + lane];
      my_wslot = a.routing[L.ws_token_wslots + static_cast<int64_t>(owner) * K + lane];
    }
    float my_w = 0.0f;
    float acc[kSendSlices][8];
#pragma unroll
    for (int v = 0; v < kSendSlices; ++v) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[v][i] = 0.0f;
    }
    for (int q0 = 0; q0 < n; q0 += kRowBatch) {  // n <= K <= 32; the sum keeps the k order
      uint4 raw[kRowBatch][kSendSlices];
#pragma unroll
      for (int u = 0; u < kRowBatch; ++u) {
        const int q = q0 + u;
        const int row = __shfl_sync(kFullWarp, my_row, q & 31);
#pragma unroll
        for (int v = 0; v < kSendSlices; ++v) {
          const int64_t col = col0 + v * 256;
          raw[u][v] = q < n && col < L.hidden
                          ? *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row) * L.hidden + col)
                          : make_uint4(0u, 0u, 0u, 0u);
        }
      }
      if (q0 == 0) {  // the first rows are in flight: now the weights
        if (!weights_in) {
          warp_wait_weights(a, counters, expected, lane, kTimed && gtid < 32 ? a.wait_stats : nullptr);
          weights_in = true;
          if (warp % kWarps == 0) trace_mark(a.trace, kTraceCombineSend, 2);
        }
        my_w = lane < n ? __ldcg(weights + my_wslot) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kRowBatch; ++u) {
        if (q0 + u >= n) break;
        const float w = __shfl_sync(kFullWarp, my_w, (q0 + u) & 31);
#pragma unroll
        for (int v = 0; v < kSendSlices; ++v) {
          const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw[u][v]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[v][i] += w * __bfloat162float(h[i]);
        }
      }
    }
    // Rank s's row [this rank][t], or with puts the outbox's [s][t] (put once written).
    const bool put = puts_to(put_mask, s);
    Partial* dst_row = put ? reinterpret_cast<Partial*>(buffer_of(a.peers, me, a.outbox_offset) + L.off_carea) +
                                 (static_cast<int64_t>(s) * M + t) * L.hidden
                           : reinterpret_cast<Partial*>(buffer_of(a.peers, s, a.data_offset) + L.off_carea) +
                                 (static_cast<int64_t>(me) * M + t) * L.hidden;
#pragma unroll
    for (int v = 0; v < kSendSlices; ++v) {
      const int64_t col = col0 + v * 256;
      if (col >= L.hidden) break;  // hidden % 8 == 0: a lane's 8 columns are all in or all out
      store_partial(dst_row + col, acc[v]);
    }
    if (put) {  // the item's columns, whole: one put of the warp (non-blocking; quieted below)
      __syncwarp();
      const int64_t begin = (item % groups) * kSendSlices * 256;
      const int64_t end = min(begin + kSendSlices * 256, static_cast<int64_t>(L.hidden));
      Partial* own_row = reinterpret_cast<Partial*>(own + L.off_carea) + (static_cast<int64_t>(me) * M + t) * L.hidden;
      warp_put(own_row + begin, dst_row + begin, static_cast<size_t>(end - begin) * sizeof(Partial), s);
    }
  }
  if (!weights_in && warp % kWarps == 0) trace_mark(a.trace, kTraceCombineSend, 2);  // no item: nothing waited
  // Every block publishes its own partial sums to every source at once (no last block to wait
  // for): its share of kCombineDone, added to the source's combine flag [this rank].
  if (put_mask != 0) quiet_puts();  // every partial row this thread put is in before the flags
  __syncthreads();
  trace_mark(a.trace, kTraceCombineSend, 3);
  block_fence_system();
  if (tid < 32) {
    const int64_t at = L.off_cflags + 4 * me;
    const int share = combine_done_share(blockIdx.x, gridDim.x);
    for (int src = lane; src < R; src += 32) {
      if (cut(a.mask, me, src)) continue;
      if (puts_to(put_mask, src)) put_add(reinterpret_cast<int*>(own_flags + at), share, src);
      else red_release_sys_add(reinterpret_cast<int*>(buffer_of(a.peers, src, a.flags_offset) + at), share);
    }
  }
  trace_mark(a.trace, kTraceCombineSend, 4);
}

// ------------------------------------------------------------------------------ combine recv
// The ranks token t has rows on (lane k looks at entry k), as a bit mask: two warp OR reductions
// (ranks 0-31, 32-63) per 32 entries.
__device__ __forceinline__ unsigned long long token_ranks(const CombineArgs& a, int64_t t, int lane) {
  const int K = a.layout.num_topk;
  unsigned long long ranks = 0;
  for (int k0 = 0; k0 < K; k0 += 32) {
    const int d = k0 + lane < K ? pair_rank(a, t * K + k0 + lane, a.peers.rank) : -1;
    const unsigned long long bit = d >= 0 ? 1ull << d : 0ull;
    const unsigned lo = __reduce_or_sync(kFullWarp, static_cast<unsigned>(bit));
    const unsigned hi = __reduce_or_sync(kFullWarp, static_cast<unsigned>(bit >> 32));
    ranks |= (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  return ranks;
}

// Lane's 8 columns at col0 + v x 256 (v < kSlices) of a float32 partial row; zeros past hidden.
struct PartialSlices {
  float4 part[kSlices][2];
};
__device__ __forceinline__ PartialSlices load_partial(const float* src, int64_t col0, int hidden) {
  PartialSlices p;
#pragma unroll
  for (int v = 0; v < kSlices; ++v) {
    const int64_t col = col0 + v * 256;
    const bool in = col < hidden;
    p.part[v][0] = in ? __ldcg(reinterpret_cast<const float4*>(src + col)) : make_float4(0.f, 0.f, 0.f, 0.f);
    p.part[v][1] = in ? __ldcg(reinterpret_cast<const float4*>(src + col) + 1) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  return p;
}
// BF16 partial sums: a lane's 8 columns are one 16-byte load, kept packed until they are added
// (half the registers of float32 partials in flight).
struct PartialSlicesBf16 {
  uint4 part[kSlices];
};
__device__ __forceinline__ PartialSlicesBf16 load_partial(const __nv_bfloat16* src, int64_t col0, int hidden) {
  PartialSlicesBf16 p;
#pragma unroll
  for (int v = 0; v < kSlices; ++v) {
    const int64_t col = col0 + v * 256;
    p.part[v] = col < hidden ? __ldcg(reinterpret_cast<const uint4*>(src + col)) : make_uint4(0u, 0u, 0u, 0u);
  }
  return p;
}

__device__ __forceinline__ void add_partial(float (&acc)[kSlices][8], const PartialSlicesBf16& p) {
#pragma unroll
  for (int v = 0; v < kSlices; ++v) {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&p.part[v]);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[v][i] += __bfloat162float(h[i]);
  }
}

__device__ __forceinline__ void add_partial(float (&acc)[kSlices][8], const PartialSlices& p) {
#pragma unroll
  for (int v = 0; v < kSlices; ++v) {
    acc[v][0] += p.part[v][0].x; acc[v][1] += p.part[v][0].y; acc[v][2] += p.part[v][0].z; acc[v][3] += p.part[v][0].w;
    acc[v][4] += p.part[v][1].x; acc[v][5] += p.part[v][1].y; acc[v][6] += p.part[v][1].z; acc[v][7] += p.part[v][1].w;
  }
}

// Waits for every rank's flag (complete at kCombineDone), then one warp per (token, kSlices x 256
// columns) sums the partial sums of the ranks the token went to, in rank order, in float32, and
// casts; the last block resets the flags and the weight counters. A warp finds its first token's
// ranks before the wait (they depend on the dispatch only), and loads two ranks' partial rows at a
// time.
template <typename Partial, bool kTimed>
__device__ __forceinline__ void combine_recv(const CombineArgs& a) {
  const LLLayout& L = a.layout;
  trace_mark(a.trace, kTraceCombineRecv, 0);
  const int me = a.peers.rank;
  const int R = L.num_ranks;
  const int lane = threadIdx.x % 32;
  uint8_t* own = buffer_of(a.peers, me, a.data_offset);
  uint8_t* own_flags = buffer_of(a.peers, me, a.flags_offset);
  const int slices = (L.hidden + 255) / 256;
  const int groups = (slices + kSlices - 1) / kSlices;
  const int64_t items = static_cast<int64_t>(a.num_tokens) * groups;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const unsigned long long first_ranks = warp < items ? token_ranks(a, warp / groups, lane) : 0ull;
  if (threadIdx.x < R && !cut(a.mask, me, threadIdx.x)) {
    const int d = threadIdx.x;
    const wait::WaitSite site{"low_latency_combine_recv",
                              "combine_flag[src] (src's send blocks each add a share; complete at 2^20)", me, d,
                              a.timeout_ns};
    // Statistics: block 0's wait for each source.
    long long* waited = kTimed && a.wait_stats != nullptr && blockIdx.x == 0 ? a.wait_stats + d : nullptr;
    wait::wait_value<wait::Scope::kSys>(reinterpret_cast<const int*>(own_flags + L.off_cflags) + d, kCombineDone,
                                        wait::Cmp::kGe, site, waited);
  }
  __syncthreads();
  trace_mark(a.trace, kTraceCombineRecv, 1);
  const auto* area = reinterpret_cast<const Partial*>(own + L.off_carea);
  auto* out = static_cast<__nv_bfloat16*>(a.out);
  for (int64_t item = warp; item < items; item += num_warps) {
    const int64_t t = item / groups;
    const int64_t col0 = (item % groups) * kSlices * 256 + lane * 8;
    unsigned long long ranks = item == warp ? first_ranks : token_ranks(a, t, lane);
    float acc[kSlices][8];
#pragma unroll
    for (int v = 0; v < kSlices; ++v) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[v][i] = 0.0f;
    }
    while (ranks != 0) {  // ranks in order, two at a time
      const int d0 = __ffsll(static_cast<long long>(ranks)) - 1;
      ranks &= ranks - 1;
      const int d1 = ranks != 0 ? __ffsll(static_cast<long long>(ranks)) - 1 : -1;
      if (d1 >= 0) ranks &= ranks - 1;
      const auto p0 = load_partial(area + (static_cast<int64_t>(d0) * L.m + t) * L.hidden, col0, L.hidden);
      if (d1 >= 0) {
        const auto p1 = load_partial(area + (static_cast<int64_t>(d1) * L.m + t) * L.hidden, col0, L.hidden);
        add_partial(acc, p0);
        add_partial(acc, p1);
      } else {
        add_partial(acc, p0);
      }
    }
#pragma unroll
    for (int v = 0; v < kSlices; ++v) {
      const int64_t col = col0 + v * 256;
      if (col >= L.hidden) break;  // hidden % 8 == 0: a lane's 8 columns are all in or all out
      uint4 packed;
      __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = __float2bfloat16_rn(acc[v][i]);
      *reinterpret_cast<uint4*>(out + t * L.hidden + col) = packed;
    }
  }
  // The last block resets the flags every block has waited for, and the weight counters: every
  // rank's flag is complete, so every source's weight adds here (made before its blocks published)
  // have landed, and the next adds to them come with the combine after next (double buffering).
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    int* done = reinterpret_cast<int*>(own_flags + L.off_done) + 1;
    last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (last && threadIdx.x < R) {
    reinterpret_cast<volatile int*>(own_flags + L.off_cflags)[threadIdx.x] = 0;
    reinterpret_cast<volatile int*>(own_flags + L.off_wflags)[threadIdx.x] = 0;
  }
  if (last && threadIdx.x == 0) reinterpret_cast<int*>(own_flags + L.off_done)[1] = 0;
  trace_mark(a.trace, kTraceCombineRecv, 2);
}

template <bool kPuts, typename Partial>
__global__ void __launch_bounds__(kThreads) combine_send_kernel(CombineArgs a) {
  combine_send<kRowBatch, kSendSlices, kPuts, Partial, true>(a);
}
template <typename Partial>
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(CombineArgs a) { combine_recv<Partial, true>(a); }
// The receive half's registers leave the send half two rows per batch (three would spill).
template <bool kPuts, typename Partial>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs a) {
  combine_send<kFusedRowBatch, kFusedSendSlices, kPuts, Partial, false>(a);
  combine_recv<Partial, false>(a);
}

int grid_for(int work, int per_block, int num_sms) {
  int blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  return blocks < num_sms ? blocks : (num_sms < 1 ? 1 : num_sms);
}

void check_layout(const LLLayout& layout, const Peers& peers) {
  if (peers.bases == nullptr) throw std::invalid_argument("moe_ep low_latency: the buffer's peers are not open");
  if (layout.num_ranks != peers.num_ranks) throw std::invalid_argument("moe_ep low_latency: layout and peers disagree");
}

// A put_mask needs this build to link NVSHMEM's device library, and names ranks of the group only.
void check_puts(uint64_t put_mask, const LLLayout& layout) {
  if (put_mask == 0) return;
  if (!puts_compiled()) {
    throw std::invalid_argument("moe_ep low_latency: put_mask is set but this module was built without NVSHMEM's "
                                "device library (puts run from moe_ep._nvshmem)");
  }
  if (layout.num_ranks < 64 && (put_mask >> layout.num_ranks) != 0) {
    throw std::invalid_argument("moe_ep low_latency: put_mask names a rank >= num_ranks=" +
                                std::to_string(layout.num_ranks));
  }
}

// 14 bits of a hash of the sizes every rank of a call must agree on (the dispatch flags carry it).
int layout_tag(int num_ranks, int m, int hidden, int num_experts, int num_topk, bool use_fp8) {
  uint64_t h = 0x6d6f655f65705f6cull;  // any fixed start
  for (const uint64_t v : {static_cast<uint64_t>(num_ranks), static_cast<uint64_t>(m), static_cast<uint64_t>(hidden),
                           static_cast<uint64_t>(num_experts), static_cast<uint64_t>(num_topk),
                           static_cast<uint64_t>(use_fp8)}) {
    h = (h ^ v) * 0x100000001b3ull;  // FNV-1a's prime, one step per value
    h ^= h >> 29;
  }
  return static_cast<int>(h & ((1u << (30 - kTagShift)) - 1));
}

}  // namespace

LLLayout make_layout(int num_ranks, int num_experts, int m, int hidden, int num_topk, bool use_fp8) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::invalid_argument("moe_ep low_latency: num_ranks must be in [1, 64], got " + std::to_string(num_ranks));
  }
  if (num_experts < num_ranks || num_experts % num_ranks != 0 || num_experts > kMaxExperts) {
    throw std::invalid_argument("moe_ep low_latency: num_experts must be a multiple of num_ranks, at most " +
                                std::to_string(kMaxExperts) + ", got " + std::to_string(num_experts));
  }
  if (m < 1 || hidden < 1) throw std::invalid_argument("moe_ep low_latency: M and hidden must be >= 1");
  if (m > kCountMask - 1) {  // a dispatch flag holds count + 1 in 16 bits
    throw std::invalid_argument("moe_ep low_latency: num_max_dispatch_tokens_per_rank must be at most " +
                                std::to_string(kCountMask - 1) + ", got " + std::to_string(m));
  }
  if (num_topk < 1 || num_topk > kMaxTopk) {
    throw std::invalid_argument("moe_ep low_latency: top-k (topk_idx.size(1)) must be in [1, " + std::to_string(kMaxTopk) +
                                "], got " + std::to_string(num_topk));
  }
  if (hidden % 8 != 0) throw std::invalid_argument("moe_ep low_latency: hidden must be a multiple of 8, got " + std::to_string(hidden));
  if (use_fp8 && hidden % kGroup != 0) {
    throw std::invalid_argument("moe_ep low_latency: hidden must be a multiple of 128 for FP8, got " + std::to_string(hidden));
  }
  LLLayout l;
  l.num_ranks = num_ranks;
  l.num_experts = num_experts;
  l.num_local = num_experts / num_ranks;
  l.m = m;
  l.hidden = hidden;
  l.num_topk = num_topk;
  l.use_fp8 = use_fp8;
  l.tag = layout_tag(num_ranks, m, hidden, num_experts, num_topk, use_fp8);
  l.x_bytes = use_fp8 ? hidden : static_cast<int64_t>(hidden) * 2;
  l.off_scales = align16(l.x_bytes);
  l.off_src = l.off_scales + (use_fp8 ? align16(static_cast<int64_t>(hidden / kGroup) * 4) : 0);
  l.msg_bytes = l.off_src + align16((2 + 2 * static_cast<int64_t>(num_topk)) * 4);
  // Flags sit at offsets that do not depend on the sizes (see the header), data after them.
  l.off_dflags = 0;
  l.off_cflags = static_cast<int64_t>(kMaxExperts) * 4;
  l.off_wflags = l.off_cflags + static_cast<int64_t>(kMaxRanks) * 4;
  l.off_done = l.off_wflags + static_cast<int64_t>(kMaxRanks) * 4;
  l.off_dindex = 0;
  const int64_t dindex = static_cast<int64_t>(l.num_local) * num_ranks * m * 4;
  l.off_dtokens = (dindex + 127) / 128 * 128;
  const int64_t dtokens = static_cast<int64_t>(num_ranks) * m * l.msg_bytes;
  l.off_cweights = (l.off_dtokens + dtokens + 127) / 128 * 128;
  const int64_t cweights = static_cast<int64_t>(l.num_local) * num_ranks * m * 4;
  l.off_carea = (l.off_cweights + cweights + 127) / 128 * 128;
  const int64_t carea = static_cast<int64_t>(num_ranks) * m * hidden * 4;
  l.buffer_bytes = (l.off_carea + carea + 127) / 128 * 128;
  const int64_t slots = static_cast<int64_t>(num_ranks) * m;
  l.ws_token_rows = 0;
  l.ws_token_wslots = l.ws_token_rows + slots * num_topk;
  l.ws_token_count = l.ws_token_wslots + slots * num_topk;
  l.ws_owners = l.ws_token_count + slots;
  l.ws_num_owners = l.ws_owners + slots;
  l.ws_owners_ready = l.ws_num_owners + 1;
  l.ws_src_rows = l.ws_owners_ready + 1;
  l.ws_ints = l.ws_src_rows + num_ranks;
  return l;
}

uint64_t timeout_ns_from_env() { return wait::timeout_ns_from_env(); }

bool puts_compiled() {
#ifdef MOE_EP_NVSHMEM_DEVICE
  return true;
#else
  return false;
#endif
}

// MOE_EP_LL_SEND = "direct" (default: each half-warp stores its 8 FP8 bytes to every destination)
// or "staged" (the token is cast into shared memory, then every thread stores 16-byte vectors),
// read at every launch so a benchmark can compare them. BF16 rows always go as 16-byte vectors.
bool staged_send_from_env() {
  const char* raw = std::getenv("MOE_EP_LL_SEND");
  if (raw == nullptr || *raw == '\0' || std::string(raw) == "direct") return false;
  if (std::string(raw) == "staged") return true;
  throw std::invalid_argument(std::string("moe_ep: MOE_EP_LL_SEND must be 'direct' or 'staged', got '") + raw + "'");
}

// MOE_EP_LL_FUSED_ORDER = "layout_first" (default: a fused dispatch block lays out its receive
// before its publish, see dispatch_kernel) or "publish_first" (the order of the split kernels), read
// at every launch so a benchmark can compare them in one process.
bool layout_first_from_env() {
  const char* raw = std::getenv("MOE_EP_LL_FUSED_ORDER");
  if (raw == nullptr || *raw == '\0' || std::string(raw) == "layout_first") return true;
  if (std::string(raw) == "publish_first") return false;
  throw std::invalid_argument(std::string("moe_ep: MOE_EP_LL_FUSED_ORDER must be 'layout_first' or 'publish_first', got '") +
                              raw + "'");
}

// With the send's 17 KB (histograms, round arrays) and the receive's 8 KB of counts (a fused launch
// has both): under the 48 KB of static + dynamic shared memory a launch gets without opting in.
constexpr int64_t kMaxStageBytes = 16 << 10;

// The send's token check and its staged-send choice (both launches that run the send half).
DispatchArgs checked_send_args(const DispatchArgs& args, size_t* stage_bytes) {
  check_layout(args.layout, args.peers);
  check_puts(args.put_mask, args.layout);
  if (args.num_tokens < 0 || args.num_tokens > args.layout.m) {  // a token's message slot is its index
    throw std::invalid_argument("moe_ep low_latency: x has " + std::to_string(args.num_tokens) +
                                " tokens, more than num_max_dispatch_tokens_per_rank=" + std::to_string(args.layout.m));
  }
  DispatchArgs a = args;
  a.staged_send = args.layout.use_fp8 && args.layout.off_src <= kMaxStageBytes && staged_send_from_env();
  a.layout_first = layout_first_from_env();
  *stage_bytes = a.staged_send ? static_cast<size_t>(args.layout.off_src) : 0;
  return a;
}

int grid_of(int num_sms) { return num_sms < 1 ? 1 : num_sms; }

// The kernel that runs a dispatch's send half (with its receive half: with_recv) for the payload
// kind and the transport. kPuts kernels exist only where NVSHMEM's device library is linked
// (moe_ep._nvshmem); moe_ep._C compiles the stores-only ones alone.
using DispatchKernel = void (*)(DispatchArgs);

template <bool kPuts>
DispatchKernel send_kernel_of(const DispatchArgs& a, bool with_recv) {
  if (a.staged_send) return with_recv ? dispatch_kernel<kFp8Staged, kPuts> : dispatch_send_kernel<kFp8Staged, kPuts>;
  if (a.layout.use_fp8) return with_recv ? dispatch_kernel<kFp8Rows, kPuts> : dispatch_send_kernel<kFp8Rows, kPuts>;
  return with_recv ? dispatch_kernel<kBf16Rows, kPuts> : dispatch_send_kernel<kBf16Rows, kPuts>;
}

DispatchKernel send_kernel_for(const DispatchArgs& a, bool with_recv) {
#ifdef MOE_EP_NVSHMEM_DEVICE
  if (a.put_mask != 0) return send_kernel_of<true>(a, with_recv);
#endif
  return send_kernel_of<false>(a, with_recv);
}

void launch_dispatch_send(const DispatchArgs& args, int num_sms, cudaStream_t stream) {
  size_t stage_bytes = 0;
  const DispatchArgs a = checked_send_args(args, &stage_bytes);
  const dim3 grid(grid_for(args.num_tokens, 1, num_sms));
  send_kernel_for(a, false)<<<grid, kThreads, stage_bytes, stream>>>(a);
  cuda_check(cudaGetLastError(), "low_latency dispatch_send_kernel launch");
}

void launch_dispatch_recv(const DispatchArgs& recv_args, int num_sms, cudaStream_t stream) {
  check_layout(recv_args.layout, recv_args.peers);
  // Where the rows go is known on the device only: every SM takes a share.
  if (recv_args.layout.use_fp8) dispatch_recv_kernel<true><<<grid_of(num_sms), kThreads, 0, stream>>>(recv_args);
  else dispatch_recv_kernel<false><<<grid_of(num_sms), kThreads, 0, stream>>>(recv_args);
  cuda_check(cudaGetLastError(), "low_latency dispatch_recv_kernel launch");
}

void launch_dispatch(const DispatchArgs& args, int num_sms, cudaStream_t stream) {
  size_t stage_bytes = 0;
  const DispatchArgs a = checked_send_args(args, &stage_bytes);
  send_kernel_for(a, true)<<<dim3(grid_of(num_sms)), kThreads, stage_bytes, stream>>>(a);
  cuda_check(cudaGetLastError(), "low_latency dispatch_kernel launch");
}

// Calls launch(Partial{}) with the partial sums' type the args name (float, or __nv_bfloat16).
template <typename Launch>
void with_partial(const CombineArgs& args, Launch launch) {
  if (args.bf16_partials) launch(__nv_bfloat16{});
  else launch(float{});
}

void launch_combine_send(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  check_puts(args.put_mask, args.layout);
  // The rows each expert received are known on the device only: every SM takes a share.
  with_partial(args, [&](auto partial) {
    using Partial = decltype(partial);
#ifdef MOE_EP_NVSHMEM_DEVICE
    if (args.put_mask != 0) combine_send_kernel<true, Partial><<<grid_of(num_sms), kThreads, 0, stream>>>(args);
    else
#endif
    combine_send_kernel<false, Partial><<<grid_of(num_sms), kThreads, 0, stream>>>(args);
  });
  cuda_check(cudaGetLastError(), "low_latency combine_send_kernel launch");
}

void launch_combine_recv(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  const int slices = (args.layout.hidden + 255) / 256;
  const int groups = (slices + kSlices - 1) / kSlices;
  with_partial(args, [&](auto partial) {
    combine_recv_kernel<decltype(partial)><<<grid_for(args.num_tokens * groups, kWarps, num_sms), kThreads, 0, stream>>>(args);
  });
  cuda_check(cudaGetLastError(), "low_latency combine_recv_kernel launch");
}

void launch_combine(const CombineArgs& args, int num_sms, cudaStream_t stream) {
  check_layout(args.layout, args.peers);
  check_puts(args.put_mask, args.layout);
  with_partial(args, [&](auto partial) {
    using Partial = decltype(partial);
#ifdef MOE_EP_NVSHMEM_DEVICE
    if (args.put_mask != 0) combine_kernel<true, Partial><<<grid_of(num_sms), kThreads, 0, stream>>>(args);
    else
#endif
    combine_kernel<false, Partial><<<grid_of(num_sms), kThreads, 0, stream>>>(args);
  });
  cuda_check(cudaGetLastError(), "low_latency combine_kernel launch");
}

}  // namespace low_latency
}  // namespace moe_ep
