#pragma once
// Bounded device-side waits: every spin on a flag or counter written by another kernel, stream,
// GPU or the host ends, either because the value arrived or because a timeout passed.
//
// On timeout the waiting thread prints ONE line with printf and executes `trap`:
//
//   moe_ep: device wait timed out after 100.000 s: kernel=intranode_dispatch rank=3 channel=7
//   counter=tail last=12 expected>=13 block=5 thread=0 (timeout: MOE_EP_TIMEOUT_S)
//
// Device printf goes to the process's *stdout* (the CUDA driver writes it when the host next
// synchronises, including the synchronisation that reports the trap). After a trap the CUDA
// context is unusable: every later CUDA call in the process fails and the process must restart.
// The host side turns the resulting CUDA error into moe_ep.comm.errors.MoeEpTimeoutError.
//
// The timeout:
//   * is chosen on the HOST by the launcher and passed to the kernel as an argument (nanoseconds,
//     the `timeout_ns` of a WaitSite); there is no device-side global state to set up;
//   * defaults to kDefaultTimeoutSeconds (100 s), overridden by the environment variable
//     MOE_EP_TIMEOUT_S (a positive number of seconds, e.g. "5" or "0.5"), read at every launch by
//     timeout_ns_from_env() below, so a change of os.environ in Python takes effect on the next
//     launch. moe_ep.comm.errors.timeout_seconds() applies the same rules in Python.
//
// Time is %globaltimer (nanoseconds; its resolution is about a microsecond, far below any
// sensible timeout). Loads are acquire loads (ld.acquire.gpu / ld.acquire.sys), so what the
// writer stored before its release store of the flag is visible once the flag is seen.
// Acquire loads and __nanosleep need sm_70; every architecture setup.py builds (sm_80, sm_90)
// has them, so MOE_EP_DISABLE_AGGRESSIVE_PTX_INSTRS (which disables the non-portable
// ld.global.nc.L1::no_allocate forms elsewhere) does not change anything here. Older
// architectures fall back to a volatile load followed by a fence, and a plain spin.
//
// Use: one thread per counter waits (typically lane 0 of a warp, the others meet it at a
// __syncwarp / __syncthreads afterwards):
//
//   const moe_ep::wait::WaitSite site{"intranode_dispatch", "tail", rank, channel, timeout_ns};
//   moe_ep::wait::wait_value<moe_ep::wait::Scope::kSys>(tail_ptr, expected, moe_ep::wait::Cmp::kGe, site);
//
// or with any predicate (a callable returning a WaitPoll {ready, value}):
//
//   moe_ep::wait::wait_until([&] { const int v = ld_acquire<Scope::kGpu>(p); return WaitPoll{v != 0, v}; },
//                            site, 1, Cmp::kNe);
//
// Strings in a WaitSite must be string literals (device printf reads them from device memory).
//
// Producer and consumer kernels must both be loaded before the consumer spins: with lazy module
// loading (CUDA_MODULE_LOADING=LAZY, the default since CUDA 12.2) the first launch of a kernel
// may wait for the kernels already running, so a producer launched for the first time while its
// consumer spins never starts and the consumer times out. Launch (or cudaFuncGetAttributes) every
// kernel of such a pair once beforehand, e.g. when the Buffer is built.
// This header includes no torch headers.
#include <cuda_runtime.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moe_ep {
namespace wait {

constexpr double kDefaultTimeoutSeconds = 100.0;
// Longer timeouts are clamped to this (the nanosecond count must fit in 64 bits).
constexpr double kMaxTimeoutSeconds = 1e9;
constexpr const char* kTimeoutEnvVar = "MOE_EP_TIMEOUT_S";

// ------------------------------------------------------------------------------------- host side

// Seconds -> nanoseconds for a kernel argument. Throws std::invalid_argument unless `seconds` is
// a finite positive number; `what` names the value in the message.
inline uint64_t timeout_ns_from_seconds(double seconds, const char* what = "timeout_s") {
  if (!std::isfinite(seconds) || seconds <= 0.0) {
    throw std::invalid_argument(std::string("moe_ep: ") + what + " must be a positive number of seconds, got " +
                                std::to_string(seconds));
  }
  if (seconds > kMaxTimeoutSeconds) seconds = kMaxTimeoutSeconds;
  const double ns = std::ceil(seconds * 1e9);
  return ns < 1.0 ? 1ull : static_cast<uint64_t>(ns);
}

// The timeout in force, in seconds: MOE_EP_TIMEOUT_S when set and non-empty, else 100.
// Accepts a decimal number (digits, one optional '.', an optional exponent, surrounding spaces),
// which must be finite and > 0; anything else throws std::invalid_argument naming the variable
// (a Python ValueError through pybind11).
inline double timeout_seconds_from_env() {
  const char* raw = std::getenv(kTimeoutEnvVar);
  if (raw == nullptr) return kDefaultTimeoutSeconds;
  const char* begin = raw;
  while (*begin == ' ' || *begin == '\t') ++begin;
  if (*begin == '\0') return kDefaultTimeoutSeconds;
  const std::string bad = std::string("moe_ep: environment variable ") + kTimeoutEnvVar +
                          " must be a positive number of seconds (e.g. 100 or 0.5), got '" + raw + "'";
  for (const char* c = begin; *c != '\0'; ++c) {  // no hex, inf, nan: same rules as the Python side
    if (std::strchr("0123456789.eE+- \t", *c) == nullptr) throw std::invalid_argument(bad);
  }
  errno = 0;
  char* end = nullptr;
  const double value = std::strtod(begin, &end);
  if (end == begin || errno == ERANGE) throw std::invalid_argument(bad);
  while (*end == ' ' || *end == '\t') ++end;
  if (*end != '\0' || !std::isfinite(value) || value <= 0.0) throw std::invalid_argument(bad);
  return value;
}

// What a launcher passes to its kernel: MOE_EP_TIMEOUT_S (or 100 s) in nanoseconds.
inline uint64_t timeout_ns_from_env() { return timeout_ns_from_seconds(timeout_seconds_from_env(), kTimeoutEnvVar); }

// ----------------------------------------------------------------------------------- device side

enum class Scope : int { kGpu, kSys };  // kSys: the writer is the host or another GPU via the host
enum class Cmp : int { kEq, kNe, kGe, kGt, kLe, kLt };

// Where a wait happens, for the one line printed on timeout.
struct WaitSite {
  const char* kernel;   // kernel name (string literal)
  const char* counter;  // the flag's / counter's name (string literal)
  int rank;             // this rank
  int channel;          // channel or peer rank; -1 when not applicable
  uint64_t timeout_ns;  // from the launcher (timeout_ns_from_env / timeout_ns_from_seconds)
};

// One observation of the awaited memory: whether the wait is over, and the value seen.
struct WaitPoll {
  bool ready;
  long long value;
};

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void backoff_sleep(unsigned ns) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  __nanosleep(ns);
#else
  (void)ns;
#endif
}

template <Scope S>
__device__ __forceinline__ int ld_acquire(const int* ptr) {
  int value;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  if constexpr (S == Scope::kSys) {
    asm volatile("ld.acquire.sys.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  } else {
    asm volatile("ld.acquire.gpu.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  }
#else
  value = *static_cast<const volatile int*>(ptr);
  if constexpr (S == Scope::kSys) __threadfence_system(); else __threadfence();
#endif
  return value;
}

template <Scope S>
__device__ __forceinline__ long long ld_acquire(const long long* ptr) {
  long long value;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  if constexpr (S == Scope::kSys) {
    asm volatile("ld.acquire.sys.b64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  } else {
    asm volatile("ld.acquire.gpu.b64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  }
#else
  value = *static_cast<const volatile long long*>(ptr);
  if constexpr (S == Scope::kSys) __threadfence_system(); else __threadfence();
#endif
  return value;
}

__device__ __forceinline__ const char* cmp_symbol(Cmp cmp) {
  switch (cmp) {
    case Cmp::kEq: return "==";
    case Cmp::kNe: return "!=";
    case Cmp::kGe: return ">=";
    case Cmp::kGt: return ">";
    case Cmp::kLe: return "<=";
    default: return "<";
  }
}

template <typename T>
__device__ __forceinline__ bool compare(T value, T expected, Cmp cmp) {
  switch (cmp) {
    case Cmp::kEq: return value == expected;
    case Cmp::kNe: return value != expected;
    case Cmp::kGe: return value >= expected;
    case Cmp::kGt: return value > expected;
    case Cmp::kLe: return value <= expected;
    default: return value < expected;
  }
}

namespace detail {
// Only the first thread (of this translation unit's kernels) to time out prints; the others wait
// for its trap to end the grid, so the output is one line however many threads time out.
static __device__ int timeout_reported = 0;
}  // namespace detail

// Print the timeout line and trap. Never returns.
static __device__ __noinline__ void report_timeout(const WaitSite& site, long long last, long long expected, Cmp cmp) {
  if (atomicCAS(&detail::timeout_reported, 0, 1) == 0) {
    printf("moe_ep: device wait timed out after %.3f s: kernel=%s rank=%d channel=%d counter=%s last=%lld "
           "expected%s%lld block=%d thread=%d (timeout: MOE_EP_TIMEOUT_S)\n",
           static_cast<double>(site.timeout_ns) * 1e-9, site.kernel, site.rank, site.channel, site.counter, last,
           cmp_symbol(cmp), expected, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x));
    __threadfence_system();
    asm volatile("trap;");
  }
  // Another thread is reporting; its trap ends this grid too. Bounded anyway: trap after 1 s.
  const uint64_t give_up = global_timer_ns() + 1000000000ull;
  while (global_timer_ns() < give_up) backoff_sleep(1024);
  asm volatile("trap;");
  __builtin_unreachable();
}

// Spin until poll() reports ready; returns the last value seen. `expected` and `cmp` only
// describe the condition in the timeout line. Polls hot for a short while (flags usually arrive
// within microseconds), then backs off with __nanosleep (32 ns doubling to 1 us) and checks the
// clock; past site.timeout_ns it prints the timeout line and traps. `waited_ns` (optional): the
// time spent here is added to it (0 when the first poll is ready: the fast path stays as it was).
template <typename Poll>
__device__ __forceinline__ long long wait_until(Poll poll, const WaitSite& site, long long expected, Cmp cmp,
                                                long long* waited_ns = nullptr) {
  WaitPoll seen = poll();
  if (seen.ready) return seen.value;
  const uint64_t start = global_timer_ns();
  unsigned sleep_ns = 0;
  int hot = 0;
  for (;;) {
    seen = poll();
    if (seen.ready) {
      if (waited_ns != nullptr) *waited_ns += static_cast<long long>(global_timer_ns() - start);
      return seen.value;
    }
    if (hot < 64) {
      ++hot;
    } else {
      sleep_ns = sleep_ns == 0 ? 32u : (sleep_ns < 1024u ? sleep_ns * 2u : 1024u);
      backoff_sleep(sleep_ns);
      if (global_timer_ns() - start > site.timeout_ns) {
        seen = poll();  // one last look after the deadline
        if (seen.ready) return seen.value;
        report_timeout(site, seen.value, expected, cmp);
      }
    }
  }
}

// Spin until `*ptr cmp expected` holds (acquire loads at scope S); returns the value seen.
template <Scope S, typename T>
__device__ __forceinline__ T wait_value(const T* ptr, T expected, Cmp cmp, const WaitSite& site,
                                        long long* waited_ns = nullptr) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "wait_value: 32- or 64-bit counters");
  const auto poll = [ptr, expected, cmp]() {
    T value;
    if constexpr (sizeof(T) == 4) {
      const int raw = ld_acquire<S>(reinterpret_cast<const int*>(ptr));
      memcpy(&value, &raw, sizeof(T));
    } else {
      const long long raw = ld_acquire<S>(reinterpret_cast<const long long*>(ptr));
      memcpy(&value, &raw, sizeof(T));
    }
    return WaitPoll{compare(value, expected, cmp), static_cast<long long>(value)};
  };
  return static_cast<T>(wait_until(poll, site, static_cast<long long>(expected), cmp, waited_ns));
}

}  // namespace wait
}  // namespace moe_ep
