// Intranode buffer runtime (csrc/ipc_buffer.h): CUDA IPC shared buffers, the cross-rank barrier
// kernel and a peer copy kernel. Runtime API only (libcuda is never linked).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "bounded_wait.cuh"
#include "ipc_buffer.h"
#include "runtime.h"

namespace moe_ep {
namespace ipc {
namespace {

constexpr int kBarrierThreads = kMaxRanks;  // one thread per source rank
constexpr int kCopyThreads = 256;
constexpr int kCopyMaxBlocks = 1024;

// Release-add at system scope to another process's memory (same or peer GPU): what this thread
// (and, by the fence before it, the kernels earlier in this stream) wrote is visible to whoever
// acquires the new value.
__device__ __forceinline__ void red_add_release_sys(unsigned long long* ptr, unsigned long long value) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
#else
  __threadfence_system();
  atomicAdd_system(ptr, value);
#endif
}

// The barrier's epoch lives on the device (a counter in the own header that every barrier kernel
// increments), not in a kernel argument: a CUDA graph that captured barriers replays them with
// fresh epochs, so replays synchronize exactly like eager calls.
// Thread t (< num_ranks): announce "rank entered barrier `epoch`" in rank t's header, with this
// rank's call word, then wait until rank t has announced the same in this rank's header and
// compare t's word with this rank's (ipc_buffer.h).
__global__ void __launch_bounds__(kBarrierThreads)
intranode_barrier_kernel(void* const* __restrict__ peer_bases, long long* own_counters, int rank, int num_ranks,
                         unsigned long long call_word, uint64_t timeout_ns) {
  __shared__ long long epoch;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    long long* own_epoch = own_counters + kEpochSlot;
    epoch = *own_epoch + 1;
    *own_epoch = epoch;
  }
  __syncthreads();
  if (t >= num_ranks) return;
  const int words = kWordSlot + static_cast<int>(epoch & 1) * kMaxRanks;
  auto* peer_counters = static_cast<unsigned long long*>(peer_bases[t]);
  *reinterpret_cast<volatile unsigned long long*>(peer_counters + words + rank) = call_word;
  // Order everything this rank wrote before the barrier (earlier kernels of the stream included,
  // e.g. peer_copy into peers' buffers) before the counter update, at system scope.
  __threadfence_system();
  red_add_release_sys(peer_counters + rank, 1ull);
  const wait::WaitSite site{"intranode_barrier", "barrier[src]", rank, t, timeout_ns};
  wait::wait_value<wait::Scope::kSys>(static_cast<const long long*>(own_counters + t), epoch, wait::Cmp::kGe, site);
  const auto theirs = *reinterpret_cast<const volatile unsigned long long*>(own_counters + words + t);
  if (call_word != 0 && theirs != 0 && theirs != call_word) {
    constexpr unsigned long long kHidden = (1ull << 40) - 1;
    printf("moe_ep: intranode combine on rank %d: rank %d called with other sizes than this rank (hidden=%llu, "
           "x element bytes=%llu, top-k weight columns=%llu there; hidden=%llu, x element bytes=%llu, top-k weight "
           "columns=%llu here): every rank must pass the same\n",
           rank, t, theirs & kHidden, (theirs >> 56) & 15, (theirs >> 40) & 0xffff, call_word & kHidden,
           (call_word >> 56) & 15, (call_word >> 40) & 0xffff);
    __trap();
  }
}

// Byte copy into (possibly) another process's buffer; 16-byte vectors when everything is aligned.
__global__ void __launch_bounds__(kCopyThreads)
peer_copy_kernel(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src, int64_t num_bytes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool aligned = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16) == 0;
  int64_t done = 0;
  if (aligned) {
    const int64_t vectors = num_bytes / 16;
    auto* dst16 = reinterpret_cast<uint4*>(dst);
    const auto* src16 = reinterpret_cast<const uint4*>(src);
    for (int64_t i = first; i < vectors; i += stride) dst16[i] = src16[i];
    done = vectors * 16;
  }
  for (int64_t i = done + first; i < num_bytes; i += stride) dst[i] = src[i];
}

// Makes `device` current for a scope and restores the previous one (errors ignored when restoring).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

std::string bad_arg(const char* name, const std::string& rule) {
  return std::string("moe_ep IpcBuffer: ") + name + " " + rule;
}

}  // namespace

IpcBuffer::IpcBuffer(int64_t num_bytes, int rank, int num_ranks) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::invalid_argument(bad_arg("num_ranks", "must be in [1, " + std::to_string(kMaxRanks) + "], got " +
                                                         std::to_string(num_ranks)));
  }
  if (rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument(bad_arg("rank", "must be in [0, num_ranks=" + std::to_string(num_ranks) +
                                                    "), got " + std::to_string(rank)));
  }
  if (num_bytes < 0 || num_bytes > (INT64_MAX / 2)) {
    throw std::invalid_argument(bad_arg("num_bytes", "must be >= 0 (and below 2^62), got " + std::to_string(num_bytes)));
  }
  num_bytes_ = num_bytes;
  rank_ = rank;
  num_ranks_ = num_ranks;
  cuda_check(cudaGetDevice(&device_), "cudaGetDevice");
  // Load both kernels now: with lazy module loading a kernel's first launch may wait for the
  // kernels already running (bounded_wait.cuh), e.g. a barrier spinning on another stream.
  cudaFuncAttributes attributes;
  cuda_check(cudaFuncGetAttributes(&attributes, intranode_barrier_kernel), "cudaFuncGetAttributes(intranode_barrier)");
  cuda_check(cudaFuncGetAttributes(&attributes, peer_copy_kernel), "cudaFuncGetAttributes(peer_copy)");

  const size_t total = static_cast<size_t>(kHeaderBytes + num_bytes);
  cuda_check(cudaMalloc(&base_, total), "cudaMalloc(IpcBuffer)");
  try {
    cuda_check(cudaMemset(base_, 0, total), "cudaMemset(IpcBuffer)");
    // The zeroing must be complete before any peer can see the handle and add to a counter.
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize(IpcBuffer zeroing)");
  } catch (...) {
    (void)cudaFree(base_);
    base_ = nullptr;
    throw;
  }
  peer_bases_.assign(static_cast<size_t>(num_ranks), nullptr);
  opened_.assign(static_cast<size_t>(num_ranks), false);
  peer_bases_[static_cast<size_t>(rank)] = base_;
}

std::unique_ptr<IpcBuffer> IpcBuffer::adopt(const std::vector<uintptr_t>& bases, int rank, int64_t num_bytes) {
  const int num_ranks = static_cast<int>(bases.size());
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::invalid_argument(bad_arg("bases", "must hold one address per rank, 1 to " + std::to_string(kMaxRanks) +
                                                     ", got " + std::to_string(num_ranks)));
  }
  if (rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument(bad_arg("rank", "must be in [0, " + std::to_string(num_ranks) + "), got " +
                                                    std::to_string(rank)));
  }
  if (num_bytes < 0) throw std::invalid_argument(bad_arg("num_bytes", "must be >= 0, got " + std::to_string(num_bytes)));
  for (int i = 0; i < num_ranks; ++i) {
    if (bases[static_cast<size_t>(i)] == 0) {
      throw std::invalid_argument(bad_arg("bases", "[" + std::to_string(i) + "] is null: rank " + std::to_string(i) +
                                                       " is not reachable by loads and stores from rank " +
                                                       std::to_string(rank)));
    }
  }
  std::unique_ptr<IpcBuffer> buffer(new IpcBuffer());
  buffer->owned_ = false;
  buffer->num_bytes_ = num_bytes;
  buffer->rank_ = rank;
  buffer->num_ranks_ = num_ranks;
  cuda_check(cudaGetDevice(&buffer->device_), "cudaGetDevice");
  cudaFuncAttributes attributes;
  cuda_check(cudaFuncGetAttributes(&attributes, intranode_barrier_kernel), "cudaFuncGetAttributes(intranode_barrier)");
  cuda_check(cudaFuncGetAttributes(&attributes, peer_copy_kernel), "cudaFuncGetAttributes(peer_copy)");
  buffer->base_ = reinterpret_cast<void*>(bases[static_cast<size_t>(rank)]);
  buffer->peer_bases_.resize(static_cast<size_t>(num_ranks));
  for (int i = 0; i < num_ranks; ++i) buffer->peer_bases_[static_cast<size_t>(i)] = reinterpret_cast<void*>(bases[static_cast<size_t>(i)]);
  buffer->opened_.assign(static_cast<size_t>(num_ranks), false);
  const size_t table_bytes = sizeof(void*) * static_cast<size_t>(num_ranks);
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&buffer->peer_bases_device_), table_bytes), "cudaMalloc(peer table)");
  cuda_check(cudaMemcpy(buffer->peer_bases_device_, buffer->peer_bases_.data(), table_bytes, cudaMemcpyHostToDevice),
             "cudaMemcpy(peer table)");
  buffer->peers_open_ = true;
  return buffer;
}

IpcBuffer::~IpcBuffer() {
  // Never throws: errors (e.g. after a trapped kernel made the context unusable) are ignored.
  int previous = -1;
  const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  if (have_previous && previous != device_) (void)cudaSetDevice(device_);
  (void)cudaDeviceSynchronize();  // no kernel of ours may still use the peers' memory or ours
  release_peers();
  if (base_ != nullptr && owned_) (void)cudaFree(base_);  // adopted memory belongs to its allocator
  base_ = nullptr;
  if (have_previous && previous != device_) (void)cudaSetDevice(previous);
}

void IpcBuffer::release_peers() noexcept {
  for (size_t i = 0; i < peer_bases_.size(); ++i) {
    if (opened_[i] && peer_bases_[i] != nullptr) (void)cudaIpcCloseMemHandle(peer_bases_[i]);
    if (static_cast<int>(i) != rank_) peer_bases_[i] = nullptr;
    opened_[i] = false;
  }
  if (peer_bases_device_ != nullptr) (void)cudaFree(peer_bases_device_);
  peer_bases_device_ = nullptr;
  peers_open_ = false;
}

std::string IpcBuffer::ipc_handle() const {
  const DeviceScope scope(device_);
  cudaIpcMemHandle_t handle;
  cuda_check(cudaIpcGetMemHandle(&handle, base_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void IpcBuffer::open_peers(const std::vector<std::string>& handles) {
  if (peers_open_) throw std::runtime_error("moe_ep IpcBuffer.open_peers: the peers are already open (call it once)");
  if (static_cast<int64_t>(handles.size()) != num_ranks_) {
    throw std::invalid_argument(bad_arg("handles", "must hold one handle per rank (num_ranks=" +
                                                       std::to_string(num_ranks_) + "), got " +
                                                       std::to_string(handles.size())));
  }
  for (size_t i = 0; i < handles.size(); ++i) {
    if (static_cast<int64_t>(handles[i].size()) != kHandleBytes) {
      throw std::invalid_argument(bad_arg("handles", "[" + std::to_string(i) + "] must be " +
                                                         std::to_string(kHandleBytes) + " bytes (a cudaIpcMemHandle_t), got " +
                                                         std::to_string(handles[i].size())));
    }
  }
  if (handles[static_cast<size_t>(rank_)] != ipc_handle()) {
    throw std::invalid_argument(bad_arg("handles", "[" + std::to_string(rank_) +
                                                       "] is not this rank's own handle: the list must be in rank order"));
  }
  const DeviceScope scope(device_);
  try {
    for (int i = 0; i < num_ranks_; ++i) {
      if (i == rank_) continue;
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, handles[static_cast<size_t>(i)].data(), sizeof(handle));
      void* ptr = nullptr;
      const std::string what = "cudaIpcOpenMemHandle(handle of peer rank " + std::to_string(i) + ", opened by rank " +
                               std::to_string(rank_) + ")";
      cuda_check(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess), what.c_str());
      peer_bases_[static_cast<size_t>(i)] = ptr;
      opened_[static_cast<size_t>(i)] = true;
    }
    const size_t table_bytes = sizeof(void*) * static_cast<size_t>(num_ranks_);
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&peer_bases_device_), table_bytes), "cudaMalloc(peer table)");
    cuda_check(cudaMemcpy(peer_bases_device_, peer_bases_.data(), table_bytes, cudaMemcpyHostToDevice),
               "cudaMemcpy(peer table)");
  } catch (...) {
    release_peers();
    throw;
  }
  peers_open_ = true;
}

void IpcBuffer::barrier(cudaStream_t stream, uint64_t call_word) {
  if (!peers_open_) throw std::runtime_error("moe_ep IpcBuffer.barrier: call open_peers() first");
  const uint64_t timeout_ns = wait::timeout_ns_from_env();  // validated before anything is launched
  const DeviceScope scope(device_);
  intranode_barrier_kernel<<<1, kBarrierThreads, 0, stream>>>(peer_bases_device_, static_cast<long long*>(base_),
                                                              rank_, num_ranks_, call_word, timeout_ns);
  cuda_check(cudaGetLastError(), "intranode_barrier_kernel launch");
  epoch_ += 1;  // host-side count of enqueued barriers (graph replays add device epochs beyond it)
}

void IpcBuffer::peer_copy(int dst_rank, int64_t offset, const void* src, int64_t num_bytes, cudaStream_t stream) {
  if (!peers_open_) throw std::runtime_error("moe_ep IpcBuffer.peer_copy: call open_peers() first");
  if (dst_rank < 0 || dst_rank >= num_ranks_) {
    throw std::invalid_argument(bad_arg("dst_rank", "must be in [0, num_ranks=" + std::to_string(num_ranks_) +
                                                        "), got " + std::to_string(dst_rank)));
  }
  if (offset < 0) throw std::invalid_argument(bad_arg("offset", "must be >= 0, got " + std::to_string(offset)));
  if (num_bytes < 0) throw std::invalid_argument(bad_arg("num_bytes", "must be >= 0, got " + std::to_string(num_bytes)));
  if (offset > num_bytes_ || num_bytes > num_bytes_ - offset) {
    throw std::invalid_argument(bad_arg("offset", "+ the source's size must fit in the buffer: offset=" +
                                                      std::to_string(offset) + " + " + std::to_string(num_bytes) +
                                                      " bytes > num_bytes=" + std::to_string(num_bytes_)));
  }
  if (num_bytes == 0) return;
  if (src == nullptr) throw std::invalid_argument(bad_arg("src", "is a null pointer"));
  const DeviceScope scope(device_);
  auto* dst = static_cast<uint8_t*>(peer_bases_[static_cast<size_t>(dst_rank)]) + kHeaderBytes + offset;
  const int64_t per_block = static_cast<int64_t>(kCopyThreads) * 16;
  int64_t blocks = (num_bytes + per_block - 1) / per_block;
  if (blocks > kCopyMaxBlocks) blocks = kCopyMaxBlocks;
  peer_copy_kernel<<<static_cast<unsigned>(blocks), kCopyThreads, 0, stream>>>(dst, static_cast<const uint8_t*>(src),
                                                                                num_bytes);
  cuda_check(cudaGetLastError(), "peer_copy_kernel launch");
}

}  // namespace ipc
}  // namespace moe_ep
