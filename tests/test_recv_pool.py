"""The receive pool's arena allocator (csrc/recv_pool.cpp) on the CPU, and its Python policy.

The allocator is what torch's CUDAPluggableAllocator calls for the pool's segments; here it is
built alone with nvcc (no GPU, no torch) and driven through ctypes on a fake address range, the
way torch drives it: select an arena, allocate, free. The GPU side (peers storing into the
outputs) is tested in tests/test_cuda_intranode.py.
"""
from __future__ import annotations

import os
import subprocess
import threading

import pytest

from moe_ep.comm import recv_pool
from tests.env import environ
from tests.test_csrc_builds import CSRC, _find_nvcc

BASE = 0x7F00_0000_0000 + 123   # deliberately unaligned: the arena starts at the next 4 KiB
ALIGN = 4096
BYTES = 64 << 20


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc to build csrc/recv_pool.cpp")
    out = str(tmp_path_factory.mktemp("recv_pool") / "librecv_pool.so")
    cmd = [nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-I", CSRC,
           os.path.join(CSRC, "recv_pool.cpp"), "-o", out]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return recv_pool.load_arena_library(out)


@pytest.fixture
def arena(lib):
    arena_id = lib.moe_ep_recv_pool_register(BASE, BYTES)
    assert arena_id > 0
    previous = lib.moe_ep_recv_pool_select(arena_id)
    yield arena_id
    lib.moe_ep_recv_pool_select(previous)
    start = (BASE + ALIGN - 1) // ALIGN * ALIGN
    # Give back whatever a test left, then forget the arena, so the next test can register it again.
    for offset in range(0, BYTES, ALIGN):
        if lib.moe_ep_recv_pool_held_bytes(arena_id) == 0:
            break
        lib.moe_ep_recv_pool_free(start + offset, 0, 0, None)
    assert lib.moe_ep_recv_pool_unregister(arena_id) == 0


def usable_start() -> int:
    return (BASE + ALIGN - 1) // ALIGN * ALIGN


def usable_bytes() -> int:
    return (BYTES - (usable_start() - BASE)) // ALIGN * ALIGN


def test_segments_are_aligned_disjoint_and_inside(lib, arena):
    sizes = [1, 4095, 4096, 4097, 3 << 20, 2 << 20, 12345]
    spans = []
    for size in sizes:
        ptr = lib.moe_ep_recv_pool_alloc(size, 0, None)
        assert ptr is not None and ptr % ALIGN == 0
        rounded = (size + ALIGN - 1) // ALIGN * ALIGN
        assert usable_start() <= ptr and ptr + rounded <= usable_start() + usable_bytes()
        spans.append((ptr, ptr + rounded))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    assert lib.moe_ep_recv_pool_held_bytes(arena) == sum(end - start for start, end in spans)


def test_free_merges_neighbours_back_into_one_run(lib, arena):
    ptrs = [lib.moe_ep_recv_pool_alloc(1 << 20, 0, None) for _ in range(5)]
    assert None not in ptrs
    for i in (1, 3, 0, 4, 2):  # out of order: merges before, after and on both sides
        lib.moe_ep_recv_pool_free(ptrs[i], 1 << 20, 0, None)
    assert lib.moe_ep_recv_pool_held_bytes(arena) == 0
    assert lib.moe_ep_recv_pool_largest_free(arena) == usable_bytes()


def test_a_freed_hole_is_reused_first_fit(lib, arena):
    a = lib.moe_ep_recv_pool_alloc(2 << 20, 0, None)
    b = lib.moe_ep_recv_pool_alloc(2 << 20, 0, None)
    lib.moe_ep_recv_pool_free(a, 2 << 20, 0, None)
    c = lib.moe_ep_recv_pool_alloc(1 << 20, 0, None)
    assert c == a and b == a + (2 << 20)


def test_unknown_pointers_are_ignored(lib, arena):
    ptr = lib.moe_ep_recv_pool_alloc(8192, 0, None)
    lib.moe_ep_recv_pool_free(ptr + ALIGN, 0, 0, None)   # inside a segment, not its start
    lib.moe_ep_recv_pool_free(0x1000, 0, 0, None)        # in no arena
    assert lib.moe_ep_recv_pool_held_bytes(arena) == 8192


def test_a_full_arena_overflows_outside_it(lib, arena):
    """No room: the segment comes from cudaMalloc (None on a machine without a GPU), never from
    inside the arena, and the arena counts it."""
    assert lib.moe_ep_recv_pool_alloc(usable_bytes(), 0, None) == usable_start()
    ptr = lib.moe_ep_recv_pool_alloc(ALIGN, 0, None)
    assert ptr is None or not usable_start() <= ptr < usable_start() + usable_bytes()
    assert lib.moe_ep_recv_pool_overflows(arena) == 1
    if ptr is not None:
        lib.moe_ep_recv_pool_free(ptr, ALIGN, 0, None)


def test_no_selection_no_allocation_and_selection_is_per_thread(lib, arena):
    seen = {}

    def other_thread():
        seen["ptr"] = lib.moe_ep_recv_pool_alloc(ALIGN, 0, None)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert seen["ptr"] is None, "a thread that selected no arena must get no memory"
    assert lib.moe_ep_recv_pool_alloc(ALIGN, 0, None) is not None
    assert lib.moe_ep_recv_pool_alloc(0, 0, None) is None


def test_register_refuses_bad_and_overlapping_ranges(lib, arena):
    assert lib.moe_ep_recv_pool_register(0, BYTES) == -1
    assert lib.moe_ep_recv_pool_register(BASE + BYTES, 0) == -1
    assert lib.moe_ep_recv_pool_register(BASE + BYTES // 2, BYTES) == -1
    assert lib.moe_ep_recv_pool_held_bytes(10 ** 6) == -1


def test_unregister_waits_for_every_segment(lib):
    arena_id = lib.moe_ep_recv_pool_register(BASE, BYTES)
    previous = lib.moe_ep_recv_pool_select(arena_id)
    try:
        ptr = lib.moe_ep_recv_pool_alloc(5000, 0, None)
    finally:
        lib.moe_ep_recv_pool_select(previous)
    assert lib.moe_ep_recv_pool_unregister(arena_id) == 2 * ALIGN  # still held: kept
    lib.moe_ep_recv_pool_free(ptr, 5000, 0, None)
    assert lib.moe_ep_recv_pool_unregister(arena_id) == 0
    assert lib.moe_ep_recv_pool_unregister(arena_id) == -1


def test_pool_bytes_from_the_environment():
    with environ(MOE_EP_RECV_POOL_BYTES=""):
        assert recv_pool.recv_pool_bytes_from_env() == 0
    with environ(MOE_EP_RECV_POOL_BYTES=str(1 << 30)):
        assert recv_pool.recv_pool_bytes_from_env() == 1 << 30
    for bad in ("-1", "1e9", "lots"):
        with environ(MOE_EP_RECV_POOL_BYTES=bad):
            with pytest.raises(ValueError, match="MOE_EP_RECV_POOL_BYTES"):
                recv_pool.recv_pool_bytes_from_env()


def test_the_arena_starts_aligned_after_the_buffer():
    assert recv_pool.arena_offset(0) == 0
    assert recv_pool.arena_offset(1) == recv_pool.ARENA_ALIGN
    assert recv_pool.arena_offset(recv_pool.ARENA_ALIGN) == recv_pool.ARENA_ALIGN
    assert recv_pool.arena_offset(10 ** 9) % recv_pool.ARENA_ALIGN == 0 >= 10 ** 9 - recv_pool.arena_offset(10 ** 9)


def test_size_hint_covers_the_outputs():
    # 4096 tokens x 2 ranks, hidden 7168, top-8: recv_x 117.4 MB, ids 0.5 MB, weights 0.26 MB, source 32 KB.
    one = recv_pool.recv_pool_size_hint(4096, 7168, 2, 8, outputs_alive=1, combine_inputs_alive=0)
    rows = 4096 * 2
    recv_x = (rows * 7168 * 2 + recv_pool.ARENA_ALIGN - 1) // recv_pool.ARENA_ALIGN * recv_pool.ARENA_ALIGN
    assert one >= rows * (7168 * 2 + 8 * 12 + 4) and one % recv_pool.ARENA_ALIGN == 0
    assert one == recv_x + 3 * recv_pool.ARENA_ALIGN
    # The default: two dispatches' outputs and one BF16 combine input of as many rows.
    assert recv_pool.recv_pool_size_hint(4096, 7168, 2, 8) == 2 * one + recv_x
    fp8 = recv_pool.recv_pool_size_hint(4096, 7168, 2, 8, fp8_dispatch=True, outputs_alive=1, combine_inputs_alive=0)
    assert rows * (7168 + 56 * 4) <= fp8 < one
    with pytest.raises(ValueError, match="combine_inputs_alive"):
        recv_pool.recv_pool_size_hint(16, 128, 2, combine_inputs_alive=-1)
    with pytest.raises(ValueError, match="num_ranks"):
        recv_pool.recv_pool_size_hint(16, 128, 0)


def _pool_without_cuda(lib, arena_id: int, base: int, num_bytes: int) -> recv_pool.ReceivePool:
    """A ReceivePool over the test library's arena, without the torch MemPool (which needs CUDA):
    enough for contains() and the close/retain rule."""
    pool = recv_pool.ReceivePool.__new__(recv_pool.ReceivePool)
    pool.base, pool.num_bytes, pool.device, pool._owner = base, num_bytes, None, object()
    pool._lib, pool._id, pool._pool = lib, arena_id, object()
    return pool


def test_contains_means_whole_tensor_inside():
    import torch

    t = torch.empty(64, dtype=torch.float32)
    start = t.data_ptr()
    pool = _pool_without_cuda(None, 0, start, 256)
    assert pool.contains(None) and pool.contains(t[:0])
    assert pool.contains(t) and pool.contains(t[10:20])
    assert not _pool_without_cuda(None, 0, start + 4, 256).contains(t)       # starts before the arena
    assert not _pool_without_cuda(None, 0, start, 255).contains(t)           # ends after it
    pool._pool = None  # nothing to close


def test_close_keeps_a_pool_torch_still_holds_until_it_gives_everything_back(lib):
    arena_id = lib.moe_ep_recv_pool_register(BASE, BYTES)
    previous = lib.moe_ep_recv_pool_select(arena_id)
    try:
        ptr = lib.moe_ep_recv_pool_alloc(ALIGN, 0, None)
    finally:
        lib.moe_ep_recv_pool_select(previous)
    pool = _pool_without_cuda(lib, arena_id, usable_start(), usable_bytes())
    pool.close()
    assert pool in recv_pool._RETAINED, "a segment is still held: the arena's memory must be kept"
    lib.moe_ep_recv_pool_free(ptr, ALIGN, 0, None)
    recv_pool._sweep_retained()
    assert pool not in recv_pool._RETAINED
    assert lib.moe_ep_recv_pool_held_bytes(arena_id) == -1, "the arena is forgotten once everything is back"
    pool.close()  # twice is harmless


def test_combine_pull_switch(monkeypatch):
    monkeypatch.delenv(recv_pool.COMBINE_PULL_ENV, raising=False)
    assert recv_pool.combine_pull_from_env() is True
    monkeypatch.setenv(recv_pool.COMBINE_PULL_ENV, "0")
    assert recv_pool.combine_pull_from_env() is False
    monkeypatch.setenv(recv_pool.COMBINE_PULL_ENV, "yes")
    with pytest.raises(ValueError, match=recv_pool.COMBINE_PULL_ENV):
        recv_pool.combine_pull_from_env()
