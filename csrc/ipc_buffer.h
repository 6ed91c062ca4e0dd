#pragma once
// Intranode buffer runtime: one device allocation per rank, shared with the other ranks of the
// node through CUDA IPC handles (the handles travel as bytes over any torch.distributed backend;
// moe_ep/comm/ipc.py does the exchange). Torch-free: raw pointers + cudaStream_t, runtime API only.
//
// Allocation layout (one cudaMalloc per rank):
//
//   [0, kHeaderBytes)                       header: barrier counters, int64 [kMaxRanks]
//                                           (counter[src] = how many barriers rank src has entered),
//                                           the own epoch (kEpochSlot), the call words (kWordSlot)
//   [kHeaderBytes, kHeaderBytes + num_bytes) the user region (local_data(), peer_copy offsets)
//
// The whole allocation is zeroed, and the zeroing has completed, before ipc_handle() returns, so
// a peer cannot add to a counter that is later overwritten by the zeroing.
//
// Barrier: every call has an epoch e = 1, 2, 3, ... (kept on the device in the own header slot
// kEpochSlot and advanced by each barrier kernel, so CUDA-graph replays of captured barriers get
// fresh epochs). Rank r adds 1 (release, system scope) to counter[r] of every rank's header, then waits
// (acquire loads, bounded: csrc/bounded_wait.cuh) until its own counter[src] >= e for every src.
// Counters only grow, so there is nothing to reset and no race between consecutive barriers: a
// fast rank entering barrier e+1 only makes counters reach e+1, which still satisfies >= e.
//
// Call word: a barrier may carry a word that every rank must pass alike (combine passes its row
// sizes, combine_call_word). Rank r stores it into word[e % 2][r] of every rank's header before
// its counter add (the release orders it); a rank past the wait compares each rank's word with its
// own and, where both are nonzero and differ, prints both ranks' sizes and traps. Two slots by
// parity suffice: rank r writes slot e % 2 again only at barrier e + 2, which needs this rank to
// have entered e + 1, so to have finished reading e.
//
// Lifetime: every rank must stop using the peers' buffers (synchronise, then a barrier over
// torch.distributed) before any rank destroys its IpcBuffer. The destructor synchronises this
// device, closes the peer handles, then frees the allocation; it never throws.
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe_ep {
namespace ipc {

constexpr int kMaxRanks = 64;
// Header slot (int64 index) of this rank's own barrier epoch, after the kMaxRanks counters.
constexpr int kEpochSlot = kMaxRanks;
// Header slot of the call words, [2 parities][kMaxRanks] int64.
constexpr int kWordSlot = 2 * kMaxRanks;
// Barrier counters, epoch and call words, padded so the user region starts 4 KiB aligned.
constexpr int64_t kHeaderBytes = 4096;
static_assert((kWordSlot + 2 * kMaxRanks) * 8 <= kHeaderBytes, "the barrier's header slots must fit in the header");

// The call word of a combine (what its rows' layout in the peers' buffers depends on): bit 62 set,
// x's element bytes at bits 56-59, top-k weight columns at 40-55, hidden at 0-39. 0 (unchecked)
// when a size does not fit its bits.
inline uint64_t combine_call_word(int64_t hidden, int64_t element_bytes, int64_t num_topk) {
  if (hidden < 0 || hidden >= (int64_t{1} << 40) || element_bytes < 0 || element_bytes > 15 || num_topk < 0 ||
      num_topk >= (1 << 16)) {
    return 0;
  }
  return (uint64_t{1} << 62) | (static_cast<uint64_t>(element_bytes) << 56) | (static_cast<uint64_t>(num_topk) << 40) |
         static_cast<uint64_t>(hidden);
}
// Size of a cudaIpcMemHandle_t as bytes.
constexpr int64_t kHandleBytes = static_cast<int64_t>(sizeof(cudaIpcMemHandle_t));

class IpcBuffer {
 public:
  // Allocates and zeroes kHeaderBytes + num_bytes on the current CUDA device.
  // Throws std::invalid_argument naming the argument unless num_bytes >= 0 (0 is allowed: the
  // header still exists, so barrier() works), 1 <= num_ranks <= kMaxRanks, 0 <= rank < num_ranks;
  // std::runtime_error (moe_ep::cuda_check) if a CUDA call fails.
  IpcBuffer(int64_t num_bytes, int rank, int num_ranks);
  // Adopts memory every rank can already reach (e.g. NVSHMEM symmetric memory with the peers'
  // addresses from nvshmem_ptr): bases[i] is rank i's allocation of kHeaderBytes + num_bytes,
  // zeroed, as seen from this process. Nothing is allocated, opened or freed; the peers count as
  // open, so barrier() and the kernels work the same.
  static std::unique_ptr<IpcBuffer> adopt(const std::vector<uintptr_t>& bases, int rank, int64_t num_bytes);
  ~IpcBuffer();
  IpcBuffer(const IpcBuffer&) = delete;
  IpcBuffer& operator=(const IpcBuffer&) = delete;

  // This rank's cudaIpcMemHandle_t as kHandleBytes bytes.
  std::string ipc_handle() const;

  // handles[i]: rank i's ipc_handle() bytes, for every rank of the group (handles[rank] must be
  // this object's own handle: a check that the list is in rank order). Opens every other rank's
  // handle (cudaIpcMemLazyEnablePeerAccess) and uploads the table of base pointers to the
  // device. Once only. On failure every handle opened so far is closed again and the error names
  // the peer rank.
  void open_peers(const std::vector<std::string>& handles);

  // Enqueues one barrier over all ranks on `stream` (see above), carrying call_word (0: none).
  // Needs open_peers().
  void barrier(cudaStream_t stream, uint64_t call_word = 0);

  // Enqueues a copy of num_bytes bytes from device memory `src` (on this device) into rank
  // dst_rank's user region at byte `offset`. dst_rank == rank writes the own buffer. Needs
  // open_peers(). Visible to dst_rank after a later barrier() of both ranks.
  void peer_copy(int dst_rank, int64_t offset, const void* src, int64_t num_bytes, cudaStream_t stream);

  void* local_data() const { return static_cast<char*>(base_) + kHeaderBytes; }
  int64_t num_bytes() const { return num_bytes_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  bool peers_open() const { return peers_open_; }
  int64_t epoch() const { return epoch_; }  // barriers enqueued so far
  // Device array [num_ranks] of every rank's allocation base (regions start kHeaderBytes later).
  void* const* device_peer_table() const { return peer_bases_device_; }

 private:
  IpcBuffer() = default;
  void release_peers() noexcept;  // closes the opened handles and frees the pointer table

  int64_t num_bytes_ = 0;
  int rank_ = 0;
  int num_ranks_ = 0;
  int device_ = 0;
  void* base_ = nullptr;                   // own allocation (header + user region)
  std::vector<void*> peer_bases_;          // [num_ranks] base pointers; own rank: base_
  std::vector<bool> opened_;               // which entries came from cudaIpcOpenMemHandle
  void** peer_bases_device_ = nullptr;     // device copy of peer_bases_
  bool peers_open_ = false;
  bool owned_ = true;                      // false: adopted memory (see adopt)
  int64_t epoch_ = 0;
};

}  // namespace ipc
}  // namespace moe_ep
