"""Receive pool: dispatch outputs that the peers store rows straight into.

Why: without it a peer's row crosses an SM four times on its way into ``recv_x`` (the sender loads
it from ``x`` and stores it into this rank's IPC buffer; the receiver loads it from there and
stores it into ``recv_x``). When ``recv_x`` itself lives in memory the peers have mapped, the
senders store into it and the receiver only waits for their flags: two crossings, and the
receiver's warps are free for its own rows. Loopback on one H200 (2 ranks, 4096 tokens, hidden
7168): cached BF16 dispatch 322 -> 486 GB/s at 12 SMs, 491 -> 754 at 24 (benchmarks/RESULTS.md).

How: the pool's arena is the tail of the rank's CUDA-IPC allocation, past ``num_nvl_bytes``.
torch's caching allocator takes segments from it through a ``torch.cuda.MemPool`` whose
``CUDAPluggableAllocator`` is the pair of C functions in ``csrc/recv_pool.cpp``, so the outputs are
ordinary tensors: freed when their last reference goes, reused in stream order, ``record_stream``
honoured. An arena that is full hands out plain device memory instead; a call whose outputs are
not all inside the arena takes the buffer path (peers store into the IPC buffer, the receiver
copies out), so a small pool costs speed, never correctness. ``overflows`` counts those segments.

Lifetime: outputs may outlive the engine (a user keeps ``recv_x``). Closing the pool therefore
frees its arena only once torch has given every segment back; until then the memory that holds
the arena stays allocated (kept in ``_RETAINED`` for the life of the process).

Combine, backwards (the pull protocol): a combine input that lies in the pool (from
``Buffer.empty_combine_input``, which the layers write their expert outputs into) is read by the
peers' reducers in place, and its rank sends nothing: 1.5 crossings of an SM per byte instead of
2.5. Its combine kernel ends only once every peer has said it is done reading, so torch may reuse
the memory as soon as the kernel ends. Inputs elsewhere are pushed as before; both mix in a call.
``MOE_EP_COMBINE_PULL=0`` pushes a rank's inputs even from the pool.

Policy (``MOE_EP_RECV_POOL_BYTES``, default 0 = off for a bare Buffer; the layers ask for one,
sized by ``recv_pool_size_hint``): the arena's bytes per rank. Every rank of a
group must enable it alike (the engine checks), since the senders' protocol changes with it.
Outputs need ``rows * (hidden * elem + scales + 12 * top-k + 4)`` bytes each dispatch, rounded up
by torch to 2 MiB per tensor; give room for the outputs that are alive at once
(:func:`recv_pool_size_hint`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any, Iterator, Optional, Sequence

import torch

RECV_POOL_ENV = "MOE_EP_RECV_POOL_BYTES"
# 0 turns the pull protocol off on a rank: its combine inputs are pushed even when they lie in the
# pool (a rank-local choice: both kinds mix in one call). Two H200s: pulling won at 12 and 24 SMs.
COMBINE_PULL_ENV = "MOE_EP_COMBINE_PULL"
# The arena starts this aligned past num_nvl_bytes (torch's large segments are 2 MiB multiples).
ARENA_ALIGN = 2 << 20
ALLOC_FN, FREE_FN = "moe_ep_recv_pool_alloc", "moe_ep_recv_pool_free"

_RETAINED: list["ReceivePool"] = []   # closed pools whose arena torch still holds segments of
_ALLOCATOR: Optional[Any] = None     # one CUDAPluggableAllocator per process


def recv_pool_bytes_from_env() -> int:
    """``MOE_EP_RECV_POOL_BYTES`` as an int (0 when unset); a ValueError names the variable."""
    raw = os.environ.get(RECV_POOL_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{RECV_POOL_ENV} must be a non-negative number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{RECV_POOL_ENV} must be a non-negative number of bytes, got {value}")
    return value


def combine_pull_from_env() -> bool:
    """``MOE_EP_COMBINE_PULL``: 1 (default) lets peers read a combine input in the pool in place,
    0 pushes it; anything else is a ValueError naming the variable."""
    raw = os.environ.get(COMBINE_PULL_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{COMBINE_PULL_ENV} must be 0 or 1, got {raw!r}")
    return raw != "0"


def recv_pool_size_hint(num_max_tokens: int, hidden: int, num_ranks: int, num_topk: int = 8,
                        fp8_dispatch: bool = False, outputs_alive: int = 2, combine_inputs_alive: int = 1) -> int:
    """Bytes of a receive pool that holds ``outputs_alive`` dispatches' outputs at once, each of up to
    ``num_max_tokens`` tokens from every one of ``num_ranks`` ranks (any routing): recv_x (BF16, or
    FP8 with 1x128 float32 scales), top-k ids and weights, the source index; plus
    ``combine_inputs_alive`` BF16 combine inputs of as many rows (``Buffer.empty_combine_input``,
    which the layers use); every tensor rounded up to torch's 2 MiB segments. Two dispatches alive
    cover a layer's outputs plus the next layer's."""
    for name, value, minimum in (("num_max_tokens", num_max_tokens, 1), ("hidden", hidden, 1),
                                 ("num_ranks", num_ranks, 1), ("num_topk", num_topk, 0),
                                 ("outputs_alive", outputs_alive, 1), ("combine_inputs_alive", combine_inputs_alive, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    rows = num_max_tokens * num_ranks

    def segments(num_bytes: int) -> int:
        return (num_bytes + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN

    parts = [rows * hidden * (1 if fp8_dispatch else 2), rows * num_topk * 8, rows * num_topk * 4, rows * 4]
    if fp8_dispatch:
        parts.append(rows * ((hidden + 127) // 128) * 4)
    per_dispatch = sum(segments(p) for p in parts if p > 0)
    return per_dispatch * outputs_alive + segments(rows * hidden * 2) * combine_inputs_alive


def arena_offset(num_nvl_bytes: int) -> int:
    """Where the arena starts in a rank's region: past the buffer's num_nvl_bytes, 2 MiB aligned."""
    return (int(num_nvl_bytes) + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN


def load_arena_library(path: str) -> ctypes.CDLL:
    """The arena functions of a library that has csrc/recv_pool.cpp (moe_ep._C, or a test build)."""
    lib = ctypes.CDLL(path)
    lib.moe_ep_recv_pool_register.argtypes = [ctypes.c_size_t, ctypes.c_int64]
    lib.moe_ep_recv_pool_register.restype = ctypes.c_int
    for name in ("unregister", "held_bytes", "largest_free", "overflows"):
        fn = getattr(lib, f"moe_ep_recv_pool_{name}")
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int64
    lib.moe_ep_recv_pool_select.argtypes, lib.moe_ep_recv_pool_select.restype = [ctypes.c_int], ctypes.c_int
    lib.moe_ep_recv_pool_alloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.moe_ep_recv_pool_alloc.restype = ctypes.c_void_p
    lib.moe_ep_recv_pool_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.moe_ep_recv_pool_free.restype = None
    return lib


def _extension_path() -> str:
    from moe_ep import _C
    return _C.__file__


def _allocator():
    global _ALLOCATOR
    if _ALLOCATOR is None:
        _ALLOCATOR = torch.cuda.memory.CUDAPluggableAllocator(_extension_path(), ALLOC_FN, FREE_FN)
    return _ALLOCATOR


class ReceivePool:
    """The arena ``[base, base + num_bytes)`` on ``device`` and the MemPool that allocates from it.

    ``owner`` is what keeps the arena's memory alive (the IpcBuffer, or the in-process regions);
    the pool holds it until torch has given back every segment (see :meth:`close`)."""

    def __init__(self, base: int, num_bytes: int, device: torch.device, owner: Any) -> None:
        if num_bytes <= 0:
            raise ValueError(f"a receive pool needs a positive size, got {num_bytes}")
        self.base, self.num_bytes, self.device, self._owner = int(base), int(num_bytes), device, owner
        self._lib = load_arena_library(_extension_path())
        self._id = self._lib.moe_ep_recv_pool_register(self.base, self.num_bytes)
        if self._id <= 0:
            raise RuntimeError(f"could not register a receive pool arena at {self.base:#x} ({self.num_bytes} bytes): "
                               "it overlaps another")
        self._pool: Optional[torch.cuda.MemPool] = torch.cuda.MemPool(_allocator().allocator())

    def contains(self, t: Optional[torch.Tensor]) -> bool:
        """Whether ``t`` lies whole inside the arena (None and empty tensors count as inside)."""
        if t is None or t.numel() == 0:
            return True
        begin = t.data_ptr()
        return self.base <= begin and begin + t.numel() * t.element_size() <= self.base + self.num_bytes

    def empty(self, specs: Sequence[Optional[tuple[tuple[int, ...], torch.dtype]]]) -> list[Optional[torch.Tensor]]:
        """``torch.empty`` of each (shape, dtype) from the pool (None stays None). Some may lie
        outside the arena when it is full: check with :meth:`contains`."""
        with self.allocating():
            return [None if spec is None else torch.empty(spec[0], dtype=spec[1], device=self.device)
                    for spec in specs]

    @contextlib.contextmanager
    def allocating(self) -> Iterator[None]:
        """Inside it, this thread's CUDA allocations on the pool's device (torch's, from Python or
        C++) come from the pool; some may lie outside the arena when it is full."""
        if self._pool is None:
            raise RuntimeError("this receive pool is closed")
        previous = self._lib.moe_ep_recv_pool_select(self._id)
        try:
            with torch.cuda.use_mem_pool(self._pool, self.device):
                yield
        finally:
            self._lib.moe_ep_recv_pool_select(previous)

    @property
    def overflows(self) -> int:
        """Segments the arena could not hold (calls that then took the buffer path)."""
        return int(self._lib.moe_ep_recv_pool_overflows(self._id))

    @property
    def held_bytes(self) -> int:
        """Arena bytes torch holds as segments (live tensors and its own cache)."""
        return int(self._lib.moe_ep_recv_pool_held_bytes(self._id))

    def close(self) -> None:
        """Drop the MemPool; the arena is forgotten once torch has given back every segment, else the
        pool (and the memory under it) is retained until then."""
        if self._pool is None:
            return
        self._pool = None
        if self._lib.moe_ep_recv_pool_unregister(self._id) > 0 and self not in _RETAINED:
            _RETAINED.append(self)
        _sweep_retained()

    def __del__(self) -> None:  # an engine dropped without close(): the same rule
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free into
            pass


def _sweep_retained() -> None:
    for pool in list(_RETAINED):
        if pool._lib.moe_ep_recv_pool_unregister(pool._id) <= 0:
            _RETAINED.remove(pool)
