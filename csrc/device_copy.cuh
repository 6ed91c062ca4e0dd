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

// ----------------------------------------------------------------------------- staged copies
// A register copy keeps at most kUnroll vectors per lane in flight (the 512-thread kernels have 128
// registers per thread). A staged copy loads into a per-warp ring of shared memory instead: kStageRing
// pieces of up to 32 x S vectors in flight per warp, then the warp's lanes use each piece from shared
// memory. On sm_90 a piece is one TMA bulk load (cp.async.bulk, completing on an mbarrier per slot),
// which takes the load off the per-thread load path entirely; elsewhere (sm_80, or
// MOE_EP_DISABLE_SM90_FEATURES) each lane loads its own vectors with cp.async.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(MOE_EP_DISABLE_SM90_FEATURES)
#define MOE_EP_STAGE_WITH_TMA 1
#endif

constexpr int kStageRing = 4;  // pieces in flight per warp (the ring's slots)

// Dynamic shared memory per warp: the ring's slots, then one 8-byte mbarrier per slot.
__host__ __device__ constexpr int64_t stage_bytes_per_warp(int S) {
  return static_cast<int64_t>(kStageRing) * (S * 32 * 16 + 8);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// A warp's ring: slot k holds 32 x S vectors; `used` counts the pieces the warp has used so far (the
// k-th use of a slot completes its mbarrier's phase k, so its parity is (used / kStageRing) & 1).
template <int S>
struct StageRing {
  uint4* data;
  uint64_t* bars;
  int used;

  // Carves warp `warp`'s ring out of the block's dynamic shared memory and, on sm_90, sets up its
  // mbarriers (lane 0; the warp meets before any use).
  __device__ __forceinline__ static StageRing carve(void* smem, int warp, int lane) {
    constexpr int kSlotVecs = 32 * S;
    auto* base = static_cast<uint8_t*>(smem) + static_cast<int64_t>(warp) * stage_bytes_per_warp(S);
    StageRing ring{reinterpret_cast<uint4*>(base), reinterpret_cast<uint64_t*>(base + kStageRing * kSlotVecs * 16), 0};
#ifdef MOE_EP_STAGE_WITH_TMA
    if (lane == 0) {
      for (int k = 0; k < kStageRing; ++k) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(ring.bars + k)) : "memory");
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncwarp();
#endif
    return ring;
  }

  __device__ __forceinline__ uint4* slot(int g) const { return data + (g % kStageRing) * 32 * S; }

  // Issues piece g: vecs (<= 32 x S) vectors from src, contiguous and 16-byte aligned. Every lane calls it.
  __device__ __forceinline__ void load(int g, const uint4* src, int vecs, int lane) const {
#ifdef MOE_EP_STAGE_WITH_TMA
    if (lane == 0 && vecs > 0) {
      const unsigned bar = smem_addr(bars + g % kStageRing);
      const unsigned bytes = static_cast<unsigned>(vecs) * 16u;
      // Orders this warp's generic reads of the slot (its last use) and the peers' generic stores
      // (acquired through a flag) before the async proxy's accesses.
      asm volatile("fence.proxy.async;\n" ::: "memory");
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                       smem_addr(slot(g))),
                   "l"(src), "r"(bytes), "r"(bar)
                   : "memory");
    } else if (lane == 0) {
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bars + g % kStageRing)) : "memory");
    }
#else
    uint4* dst = slot(g);
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int i = u * 32 + lane;
      if (i < vecs) cp_async16(dst + i, src + i);
    }
    cp_async_commit();
#endif
  }

  // An empty piece (keeps the cp.async group count in step; nothing to do with TMA).
  __device__ __forceinline__ void skip() const {
#ifndef MOE_EP_STAGE_WITH_TMA
    cp_async_commit();
#endif
  }

  // Waits until piece g (the oldest of up to kStageRing in flight) has landed; every lane calls it.
  __device__ __forceinline__ void wait(int g) const {
#ifdef MOE_EP_STAGE_WITH_TMA
    const unsigned bar = smem_addr(bars + g % kStageRing);
    const unsigned parity = static_cast<unsigned>(g / kStageRing) & 1u;
    unsigned done = 0;
    do {  // a local bulk load always completes (a faulting one traps), so this wait needs no bound
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    } while (!done);
#else
    (void)g;
    cp_async_wait<kStageRing - 1>();
#endif
  }
};

// Streams `pieces` pieces through the ring: piece(p, src, vecs) says where piece p comes from, use(p,
// slot) consumes it once landed (lane l reads vectors l, l + 32, ...: with cp.async only its own).
// Every lane calls both alike. The ring is refilled as it drains, so the next row's loads start before
// this row's last piece is used; all pieces are used before it returns.
template <int S, typename Piece, typename Use>
__device__ __forceinline__ void warp_stage_pieces(int pieces, StageRing<S>& ring, Piece piece, Use use, int lane) {
  auto issue = [&](int p) {
    if (p < pieces) {
      const uint4* src = nullptr;
      int vecs = 0;
      piece(p, src, vecs);
      ring.load(ring.used + p, src, vecs, lane);
    } else {
      ring.skip();
    }
  };
#pragma unroll
  for (int p = 0; p < kStageRing - 1; ++p) issue(p);
  for (int p = 0; p < pieces; ++p) {
    // The slot refilled here was used at piece p - 1; the warp meets first, so every lane's reads of
    // it are done before the bulk load overwrites it.
    __syncwarp();
    issue(p + kStageRing - 1);
    ring.wait(ring.used + p);
    use(p, ring.slot(ring.used + p));
  }
  ring.used += pieces;
}

// Staged warp copy of n rows of `vecs` vectors: row i from src_of(i) to dst_of(i) (uint4 pointers,
// every one 16-byte aligned). src_of / dst_of are called by every lane alike. Piece arithmetic is
// 32-bit (the callers pass at most a chunk of rows).
template <int S, typename SrcOf, typename DstOf>
__device__ __forceinline__ void warp_stream_rows(int n, int64_t vecs, SrcOf src_of, DstOf dst_of, StageRing<S>& ring,
                                                 int lane) {
  if (n <= 0 || vecs <= 0) return;
  constexpr int kPiece = 32 * S;
  const int v = static_cast<int>(vecs);
  const int per_row = (v + kPiece - 1) / kPiece;
  auto piece = [&](int p, const uint4*& src, int& count) {
    const int row = p / per_row;
    const int v0 = (p - row * per_row) * kPiece;
    src = src_of(row) + v0;
    count = min(kPiece, v - v0);
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
  warp_stage_pieces<S>(n * per_row, ring, piece, use, lane);
}

__device__ __forceinline__ void warp_zero(uint8_t* dst, int64_t nbytes, int lane) {
  for (int64_t i = lane; i < nbytes; i += 32) dst[i] = 0;
}

}  // namespace copy
}  // namespace moe_ep
