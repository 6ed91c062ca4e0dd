"""Intranode buffers shared by CUDA IPC handles exchanged over torch.distributed.

:func:`open_intranode_buffer` is collective over a process group: every rank allocates a
``moe_ep._C.IpcBuffer`` on its current CUDA device, the ranks all-gather their IPC handles (plain
bytes, so any torch.distributed backend works, gloo included), every rank opens the others'
handles, and one device barrier proves that every rank can reach every other rank's memory.

Because only bytes are exchanged, several ranks may share ONE GPU (separate processes on the same
device, grouped by gloo): CUDA IPC between processes on one device is allowed, and their kernels
time-slice. That is how the tests run R = 2 and R = 4 ranks on a single GPU.

Before a rank drops its buffer every rank must have stopped using it: synchronise the device and
``torch.distributed.barrier(group)`` first.
"""
from __future__ import annotations

import ctypes
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from .errors import translate_device_errors

__all__ = ["IntranodeBufferError", "adopt_in_process", "open_intranode_buffer"]


class IntranodeBufferError(RuntimeError):
    """The ranks of a group could not set up a shared intranode buffer (raised on every rank)."""


def _load_extension():
    try:
        from moe_ep import _C
    except ImportError as exc:
        raise IntranodeBufferError(f"open_intranode_buffer needs the CUDA extension moe_ep._C, which is not built "
                                   f"({exc}); build it with `python3 setup.py build_ext --inplace`") from exc
    if not hasattr(_C, "IpcBuffer"):
        raise IntranodeBufferError("this build of moe_ep._C has no IpcBuffer (rebuild the extension)")
    return _C


def _describe_groups(values: list[Any]) -> str:
    by_value: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        by_value.setdefault(value, []).append(rank)
    return "; ".join(f"ranks {ranks} have {value!r}" for value, ranks in by_value.items())


def _check_same_node(infos: list[dict]) -> None:
    hosts = [info["host"] for info in infos]
    if len(set(hosts)) > 1:
        raise IntranodeBufferError("open_intranode_buffer: every rank of the group must be on ONE node (CUDA IPC "
                                   f"handles do not cross machines), but the host names differ: "
                                   f"{_describe_groups(hosts)}")
    counts = [info["device_count"] for info in infos]
    if len(set(counts)) > 1:
        raise IntranodeBufferError("open_intranode_buffer: the ranks see different numbers of GPUs "
                                   f"(CUDA_VISIBLE_DEVICES differs between them?): {_describe_groups(counts)}")


def open_intranode_buffer(group: dist.ProcessGroup | None, num_bytes: int):
    """Collectively build a buffer of ``num_bytes`` per rank that every rank of ``group`` can write.

    Each rank's buffer lives on its current CUDA device (``torch.cuda.current_device()``; set it
    first). Returns the ``moe_ep._C.IpcBuffer`` with its peers opened and one barrier completed.
    Raises :class:`IntranodeBufferError` on every rank when any rank fails (different nodes or
    GPU counts, a handle that cannot be opened: the message names the ranks), ``ValueError`` for
    a bad ``num_bytes``, and :class:`moe_ep.comm.errors.MoeEpTimeoutError` if the first barrier
    times out (``MOE_EP_TIMEOUT_S``).
    """
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"num_bytes must be a non-negative int, got {num_bytes!r}")
    if not torch.cuda.is_available():
        raise IntranodeBufferError("open_intranode_buffer needs a CUDA GPU (torch.cuda.is_available() is False)")
    ext = _load_extension()
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    if world > int(getattr(ext, "ipc_max_ranks", 64)):
        raise ValueError(f"open_intranode_buffer supports at most {ext.ipc_max_ranks} ranks, the group has {world}")

    # Allocation may fail on one rank only; every rank still joins the all-gather so none hangs.
    buffer, error = None, None
    try:
        buffer = ext.IpcBuffer(num_bytes, rank, world)
        handle = buffer.ipc_handle()
    except (RuntimeError, ValueError) as exc:
        handle, error = b"", f"{type(exc).__name__}: {exc}"
    info = {"rank": rank, "host": socket.gethostname(), "device_count": torch.cuda.device_count(),
            "device": torch.cuda.current_device(), "pid": os.getpid(), "handle": handle, "error": error}
    infos: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(infos, info, group=group)

    failed = [(i["rank"], i["error"]) for i in infos if i["error"]]
    if failed:
        raise IntranodeBufferError("open_intranode_buffer: allocating the buffer failed on "
                                   + "; ".join(f"rank {r}: {e}" for r, e in failed))
    _check_same_node(infos)

    error = None
    try:
        buffer.open_peers([i["handle"] for i in infos])
    except (RuntimeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    statuses: list[Any] = [None] * world
    dist.all_gather_object(statuses, error, group=group)
    failed = [(r, e) for r, e in enumerate(statuses) if e]
    if failed:
        devices = ", ".join(f"rank {i['rank']} on cuda:{i['device']} (pid {i['pid']})" for i in infos)
        raise IntranodeBufferError("open_intranode_buffer: opening the peers' CUDA IPC handles failed on "
                                   + "; ".join(f"rank {r}: {e}" for r, e in failed)
                                   + f". Ranks: {devices}. Peer access between these GPUs may be unavailable.")

    with translate_device_errors("open_intranode_buffer (first IpcBuffer.barrier)"):
        buffer.barrier()
        torch.cuda.current_stream().synchronize()
    return buffer


def module_loading_mode() -> str:
    """"eager" or "lazy": how this process's CUDA driver loads kernels (cuModuleGetLoadingMode;
    CUDA_MODULE_LOADING, read when CUDA starts), "unknown" where the driver cannot say."""
    try:
        mode = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuModuleGetLoadingMode(ctypes.byref(mode)) != 0:
            return "unknown"
    except (OSError, AttributeError):
        return "unknown"
    return {1: "eager", 2: "lazy"}.get(mode.value, "unknown")


def adopt_in_process(num_ranks: int, device: torch.device, num_bytes: int) -> tuple[list, list[torch.Tensor]]:
    """``num_ranks`` buffers of ``num_bytes`` on ONE device for ranks that are threads of this process
    (``IntranodeEngine.in_process``, the loopback benchmark). A process cannot open its own IPC
    handles, and needs not: every rank's region is a zeroed tensor here, adopted by
    ``IpcBuffer.adopt`` with the others' addresses. Returns (buffers, regions); the regions must
    outlive the buffers (the buffers do not own them). No first barrier: one thread would wait for
    the others on its own stream. Needs eager module loading (raises IntranodeBufferError, saying
    why, without it)."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"num_bytes must be a non-negative int, got {num_bytes!r}")
    ext = _load_extension()
    if not 1 <= num_ranks <= int(getattr(ext, "ipc_max_ranks", 64)):
        raise ValueError(f"num_ranks must be in [1, {getattr(ext, 'ipc_max_ranks', 64)}], got {num_ranks}")
    torch.cuda.init()
    if module_loading_mode() != "eager":
        raise IntranodeBufferError(
            "ranks that are threads of one process need CUDA_MODULE_LOADING=EAGER, set before CUDA starts: with "
            "lazy loading, the first launch of a kernel may wait for the whole device, while a peer's kernel on "
            f"it waits for this rank (a deadlock). This process loads modules: {module_loading_mode()}")
    total = int(ext.ipc_header_bytes) + num_bytes
    regions = [torch.zeros(total, dtype=torch.uint8, device=device) for _ in range(num_ranks)]
    torch.cuda.synchronize(device)  # zeroed before any kernel of any rank's stream reads a flag
    bases = [region.data_ptr() for region in regions]
    with torch.cuda.device(device):
        buffers = [ext.IpcBuffer.adopt(bases, rank, num_bytes) for rank in range(num_ranks)]
    return buffers, regions
