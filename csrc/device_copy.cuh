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

// ------------------------------------------------------------------ staged (cp.async) copies
// A register copy keeps at most kUnroll vectors per lane in flight (the 512-thread kernels have 128
// registers per thread). The staged copies load with cp.async into a per-warp ring of shared memory
// instead (no registers held), so a warp keeps kStageRing pieces of 32 x S vectors in flight, up to
// 192 KB per SM. Each lane reads back only the vectors it loaded itself, so no warp barrier is needed
// between load and use. sm_80+ (cp.async; below that they copy synchronously). Measured (one H200,
// loopback): faster for the intranode combine, whose reduce reads several ranks' rows per token;
// slower for plain row copies (the dispatch), where the registers' loads already keep up, and slower
// again with TMA bulk loads in place of cp.async.
constexpr int kStageRing = 4;  // pieces in flight per warp (the ring's slots)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Shared memory a block needs for staged copies of S vectors per lane per piece (16 warps).
__host__ __device__ constexpr int64_t stage_bytes_per_warp(int S) { return static_cast<int64_t>(kStageRing) * S * 32 * 16; }

// Pieces of a row stream: n rows of `vecs` 16-byte vectors each, cut into pieces of 32 x S vectors.
// load(p, slot) issues piece p's cp.async into `slot` (this lane's vectors only), use(p, slot) consumes
// it once landed. Every lane calls both alike (the callers broadcast pointers with shuffles). The ring
// is refilled as it drains, so the loads of the next row start before this row's last piece is used.
template <int S, typename Load, typename Use>
__device__ __forceinline__ void warp_stage_pieces(int pieces, uint4* ring, Load load, Use use) {
#pragma unroll
  for (int p = 0; p < kStageRing - 1; ++p) {
    if (p < pieces) load(p, ring + p * 32 * S);
    cp_async_commit();  // empty groups too, so the wait below counts alike on every piece
  }
  for (int p = 0; p < pieces; ++p) {
    const int ahead = p + kStageRing - 1;
    // The slot refilled here was used (by this lane, in program order) at piece p - 1.
    if (ahead < pieces) load(ahead, ring + (ahead % kStageRing) * 32 * S);
    cp_async_commit();
    cp_async_wait<kStageRing - 1>();
    use(p, ring + (p % kStageRing) * 32 * S);
  }
}

// Staged warp copy of n rows of `vecs` vectors: row i from src_of(i) to dst_of(i) (uint4 pointers,
// every one 16-byte aligned). src_of / dst_of are called by every lane alike. Piece arithmetic is
// 32-bit (n * pieces per row < 2^31: the callers pass at most a chunk of rows).
template <int S, typename SrcOf, typename DstOf>
__device__ __forceinline__ void warp_stream_rows(int n, int64_t vecs, SrcOf src_of, DstOf dst_of, uint4* ring, int lane) {
  if (n <= 0 || vecs <= 0) return;
  constexpr int kPiece = 32 * S;
  const int v = static_cast<int>(vecs);
  const int per_row = (v + kPiece - 1) / kPiece;
  auto load = [&](int p, uint4* slot) {
    const int row = p / per_row;
    const int v0 = (p - row * per_row) * kPiece;
    const uint4* src = src_of(row) + v0;
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int i = u * 32 + lane;
      if (i < v - v0) cp_async16(slot + i, src + i);
    }
  };
  auto use = [&](int p, const uint4* slot) {
    const int row = p / per_row;
    const int v0 = (p - row * per_row) * kPiece;
    uint4* dst = dst_of(row) + v0;
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int i = u * 32 + lane;
      if (i < v - v0) dst[i] = slot[i];
    }
  };
  warp_stage_pieces<S>(n * per_row, ring, load, use);
}

__device__ __forceinline__ void warp_zero(uint8_t* dst, int64_t nbytes, int lane) {
  for (int64_t i = lane; i < nbytes; i += 32) dst[i] = 0;
}

}  // namespace copy
}  // namespace moe_ep
