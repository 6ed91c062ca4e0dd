#pragma once
// Receive pool: the memory a dispatch's outputs can live in so that peers store rows straight
// into them (the receiver's copy out of its buffer disappears: each peer byte crosses an SM twice
// instead of four times; see moe_ep/comm/recv_pool.py for the policy).
//
// An arena is a range of device memory every peer has mapped (the tail of a rank's CUDA-IPC
// allocation). torch's caching allocator takes segments from it through a MemPool whose
// CUDAPluggableAllocator calls the two C functions below; torch then carves tensors out of those
// segments as usual (stream-ordered reuse, record_stream), so an output's lifetime is a normal
// tensor's. Host-only and torch-free (the CUDA runtime only for a full arena's overflow): the
// CPU tests build it alone and drive it through ctypes.
//
// Which arena an allocation comes from: the calling thread's selected arena
// (moe_ep_recv_pool_select), set only around the engine's own allocations; torch calls the
// allocator synchronously on that thread. A free finds its arena by address (torch may release
// segments from any thread, e.g. in empty_cache).
#include <sys/types.h>

#include <cstddef>
#include <cstdint>

// Every function is exported by name: torch's CUDAPluggableAllocator and the tests find them with dlsym.
#define MOE_EP_POOL_API __attribute__((visibility("default")))

extern "C" {
// Registers [base, base + bytes) as an arena; returns its id (>= 1), or -1 if base is 0, bytes is
// not positive, or the range overlaps a registered arena.
MOE_EP_POOL_API int moe_ep_recv_pool_register(uintptr_t base, int64_t bytes);
// Forgets an arena whose segments are all back (returns 0); returns the bytes still held (> 0) and
// keeps the arena otherwise; -1 for an unknown id.
MOE_EP_POOL_API int64_t moe_ep_recv_pool_unregister(int id);
// Selects the arena this thread's allocations come from (0: none, allocations fail). Returns the
// previous selection.
MOE_EP_POOL_API int moe_ep_recv_pool_select(int id);
// Bytes of an arena held by segments (-1 for an unknown id).
MOE_EP_POOL_API int64_t moe_ep_recv_pool_held_bytes(int id);
// Largest free run of an arena (-1 for an unknown id).
MOE_EP_POOL_API int64_t moe_ep_recv_pool_largest_free(int id);
// Segments the arena could not hold, handed out from cudaMalloc instead (-1 for an unknown id).
MOE_EP_POOL_API int64_t moe_ep_recv_pool_overflows(int id);

// The CUDAPluggableAllocator pair. alloc takes sizes rounded up to kRecvPoolAlign from the selected
// arena; when it is full, from cudaMalloc (the tensor is then outside the arena and the engine takes
// the buffer path for that call); nullptr when no arena is selected. free returns a segment to its
// arena (or cudaFree's an overflow one); a pointer it never handed out is ignored.
MOE_EP_POOL_API void* moe_ep_recv_pool_alloc(ssize_t size, int device, void* stream);
MOE_EP_POOL_API void moe_ep_recv_pool_free(void* ptr, size_t size, int device, void* stream);
}

namespace moe_ep {
namespace pool {
// Segment alignment: torch carves 512-byte aligned blocks; 4 KiB keeps segments page aligned.
constexpr int64_t kRecvPoolAlign = 4096;
}  // namespace pool
}  // namespace moe_ep
