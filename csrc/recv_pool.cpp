// Receive-pool arenas (see recv_pool.h): first-fit over a free list ordered by offset, with
// neighbours merged on free. Segments are few and large (torch asks for 2 MiB multiples and keeps
// them), so a map under one mutex is plenty.
#include "recv_pool.h"

#include <cuda_runtime.h>

#include <iterator>
#include <map>
#include <mutex>
#include <set>

namespace {

using moe_ep::pool::kRecvPoolAlign;

struct Arena {
  uintptr_t base = 0;
  int64_t bytes = 0;
  std::map<int64_t, int64_t> free_runs;  // offset -> length, disjoint, never adjacent
  std::map<int64_t, int64_t> held;       // offset -> length of the segments handed out
  int64_t held_bytes = 0;
  int64_t overflows = 0;                 // segments it could not hold (given from cudaMalloc)
};

std::mutex g_mutex;
std::map<int, Arena> g_arenas;
std::set<uintptr_t> g_overflow;  // segments from cudaMalloc, for an arena that was full
int g_next_id = 1;
thread_local int t_selected = 0;

int64_t round_up(int64_t n) { return (n + kRecvPoolAlign - 1) / kRecvPoolAlign * kRecvPoolAlign; }

void give_back(Arena& arena, int64_t offset, int64_t length) {
  auto next = arena.free_runs.lower_bound(offset);
  if (next != arena.free_runs.end() && offset + length == next->first) {  // merge with the run after
    length += next->second;
    next = arena.free_runs.erase(next);
  }
  if (next != arena.free_runs.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {  // merge with the run before
      prev->second += length;
      return;
    }
  }
  arena.free_runs.emplace(offset, length);
}

}  // namespace

extern "C" {

int moe_ep_recv_pool_register(uintptr_t base, int64_t bytes) {
  if (base == 0 || bytes <= 0) return -1;
  std::lock_guard<std::mutex> lock(g_mutex);
  for (const auto& [id, a] : g_arenas) {
    if (base < a.base + static_cast<uintptr_t>(a.bytes) && a.base < base + static_cast<uintptr_t>(bytes)) return -1;
  }
  // Usable bytes start at the first aligned address.
  const uintptr_t aligned = (base + kRecvPoolAlign - 1) / kRecvPoolAlign * kRecvPoolAlign;
  const int64_t usable = bytes - static_cast<int64_t>(aligned - base);
  Arena arena;
  arena.base = aligned;
  arena.bytes = usable > 0 ? usable / kRecvPoolAlign * kRecvPoolAlign : 0;
  if (arena.bytes > 0) arena.free_runs.emplace(0, arena.bytes);
  const int id = g_next_id++;
  g_arenas.emplace(id, std::move(arena));
  return id;
}

int64_t moe_ep_recv_pool_unregister(int id) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_arenas.find(id);
  if (it == g_arenas.end()) return -1;
  if (it->second.held_bytes > 0) return it->second.held_bytes;
  g_arenas.erase(it);
  return 0;
}

int moe_ep_recv_pool_select(int id) {
  const int previous = t_selected;
  t_selected = id;
  return previous;
}

int64_t moe_ep_recv_pool_held_bytes(int id) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_arenas.find(id);
  return it == g_arenas.end() ? -1 : it->second.held_bytes;
}

int64_t moe_ep_recv_pool_largest_free(int id) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_arenas.find(id);
  if (it == g_arenas.end()) return -1;
  int64_t best = 0;
  for (const auto& [offset, length] : it->second.free_runs) best = length > best ? length : best;
  return best;
}

// An arena that is full hands out plain device memory instead: the tensor is then outside the
// arena, the engine sees that and takes the buffer path for that call. Failing instead would make
// torch empty every cache of the device before raising OutOfMemoryError.
static void* overflow_alloc(int64_t size, int device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) return nullptr;
  if (current != device && cudaSetDevice(device) != cudaSuccess) return nullptr;
  void* ptr = nullptr;
  const cudaError_t err = cudaMalloc(&ptr, static_cast<size_t>(size));
  if (current != device) (void)cudaSetDevice(current);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // leave no sticky error for the caller's next check
    return nullptr;
  }
  g_overflow.insert(reinterpret_cast<uintptr_t>(ptr));
  return ptr;
}

int64_t moe_ep_recv_pool_overflows(int id) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_arenas.find(id);
  return it == g_arenas.end() ? -1 : it->second.overflows;
}

void* moe_ep_recv_pool_alloc(ssize_t size, int device, void* /*stream*/) {
  const int id = t_selected;
  if (id == 0 || size <= 0) return nullptr;
  const int64_t want = round_up(static_cast<int64_t>(size));
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_arenas.find(id);
  if (it == g_arenas.end()) return nullptr;
  Arena& arena = it->second;
  for (auto run = arena.free_runs.begin(); run != arena.free_runs.end(); ++run) {
    if (run->second < want) continue;
    const int64_t offset = run->first;
    const int64_t rest = run->second - want;
    arena.free_runs.erase(run);
    if (rest > 0) arena.free_runs.emplace(offset + want, rest);
    arena.held.emplace(offset, want);
    arena.held_bytes += want;
    return reinterpret_cast<void*>(arena.base + static_cast<uintptr_t>(offset));
  }
  ++arena.overflows;
  return overflow_alloc(want, device);
}

void moe_ep_recv_pool_free(void* ptr, size_t /*size*/, int /*device*/, void* /*stream*/) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_overflow.erase(address) > 0) {
    (void)cudaFree(ptr);
    return;
  }
  for (auto& [id, arena] : g_arenas) {
    if (address < arena.base || address >= arena.base + static_cast<uintptr_t>(arena.bytes)) continue;
    auto seg = arena.held.find(static_cast<int64_t>(address - arena.base));
    if (seg == arena.held.end()) return;  // not a segment start: not ours to free
    arena.held_bytes -= seg->second;
    give_back(arena, seg->first, seg->second);
    arena.held.erase(seg);
    return;
  }
}

}  // extern "C"
