#pragma once
// Warp-cooperative copies shared by the kernel families: a warp owns a row and its lanes move
// 16-byte vectors (narrower ones when the row is not 16-byte aligned), kUnroll vectors in flight
// per lane, so a few SMs keep enough bytes in flight to fill NVLink. Torch-free.
#include <cuda_runtime.h>

#include <cstdint>

namespace moe_ep {
namespace copy {

constexpr int kUnroll = 8;

__host__ __device__ __forceinline__ int64_t align16(int64_t v) { return (v + 15) / 16 * 16; }

template <typename V>
__device__ __forceinline__ V load_stream(const V* ptr) {
  return __ldcg(ptr);  // L2 only: the rows are read once, and may live on another GPU
}

// Warp-cooperative copy of nbytes with vectors of type V (every address and nbytes V-aligned),
// U vectors in flight per lane. The last round is predicated, not a one-vector-at-a-time tail: a
// copy costs ceil(n / 32U) load latencies (a 7168-byte FP8 row at U = 8: 2, where a serial tail
// took 7).
template <typename V, int U = kUnroll>
__device__ __forceinline__ void warp_copy_vectors(uint8_t* dst, const uint8_t* src, int64_t nbytes, int lane) {
  const int64_t n = nbytes / static_cast<int64_t>(sizeof(V));
  auto* d = reinterpret_cast<V*>(dst);
  const auto* s = reinterpret_cast<const V*>(src);
  for (int64_t i = lane; i < n; i += 32 * U) {
    V v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i + 32 * u < n) v[u] = load_stream(s + i + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i + 32 * u < n) d[i + 32 * u] = v[u];
    }
  }
}

// Rows that are not 16-byte aligned (odd hidden sizes; FP8 rows and their scales are) take a
// one-vector-per-round loop: unrolled narrow paths beside the 16-byte one cost every caller
// registers, and ptxas spilled the transfer kernel for them (296 bytes at U = 8; none without).
template <int U = kUnroll>
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t nbytes, int lane) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uint64_t>(nbytes);
  if (bits % 16 == 0) {
    warp_copy_vectors<uint4, U>(dst, src, nbytes, lane);
  } else if (bits % 8 == 0) {
    warp_copy_vectors<uint2, 1>(dst, src, nbytes, lane);
  } else if (bits % 4 == 0) {
    warp_copy_vectors<unsigned int, 1>(dst, src, nbytes, lane);
  } else if (bits % 2 == 0) {
    warp_copy_vectors<unsigned short, 1>(dst, src, nbytes, lane);
  } else {
    warp_copy_vectors<unsigned char, 1>(dst, src, nbytes, lane);
  }
}

__device__ __forceinline__ void warp_zero(uint8_t* dst, int64_t nbytes, int lane) {
  for (int64_t i = lane; i < nbytes; i += 32) dst[i] = 0;
}

}  // namespace copy
}  // namespace moe_ep
