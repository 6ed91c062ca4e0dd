"""Low-latency buffers in NVSHMEM symmetric memory (the ``moe_ep._nvshmem`` module).

:func:`open_nvshmem_buffer` is collective over a process group: NVSHMEM is initialized once per
process with the unique-id bootstrap (rank 0 makes the id, torch.distributed broadcasts it), every
rank allocates the same zeroed symmetric buffer, and ``nvshmem_ptr`` gives this process's address
of every peer's copy. The result is a ``moe_ep._C.IpcBuffer`` adopting that memory, so the
low-latency kernels (which store straight into peers' memory) run on it unchanged.

Scope today: every peer must be reachable by loads and stores (NVLink / P2P, i.e. one node). A
peer reachable only by RDMA (``nvshmem_ptr`` returns null) raises :class:`NvshmemUnavailable`:
the kernels' RDMA path (NVSHMEM puts over IBGDA) is not written yet. NVSHMEM wants one PE per GPU,
so ranks must not share a device here (the CUDA-IPC buffers of ``moe_ep.comm.ipc`` allow that).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import translate_device_errors

__all__ = ["NvshmemUnavailable", "open_nvshmem_buffer", "HOW_TO_ENABLE"]

HOW_TO_ENABLE = ("install the nvidia-nvshmem-cu13 wheel (or set NVSHMEM_DIR to an NVSHMEM install) and rebuild "
                 "with `python3 setup.py build_ext --inplace`, which then builds moe_ep._nvshmem")

_state: dict = {}


class NvshmemUnavailable(RuntimeError):
    """NVSHMEM cannot serve this group (not built, or a peer out of load/store reach)."""


def _runtime():
    try:
        from moe_ep import _nvshmem
    except ImportError as exc:
        raise NvshmemUnavailable(f"moe_ep._nvshmem is not built ({exc}): {HOW_TO_ENABLE}") from exc
    return _nvshmem


def _ensure_initialized(group, runtime) -> None:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if runtime.initialized():
        if _state.get("world") != (rank, world):
            raise NvshmemUnavailable(f"NVSHMEM is already initialized in this process for rank/size {_state.get('world')}, "
                                     f"not ({rank}, {world}): one NVSHMEM team per process")
        return
    ids = [runtime.unique_id() if rank == 0 else None]
    dist.broadcast_object_list(ids, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    runtime.init(rank, world, ids[0])
    _state["world"] = (rank, world)


def open_nvshmem_buffer(group, num_bytes: int):
    """Collectively build a ``moe_ep._C.IpcBuffer`` over NVSHMEM symmetric memory of ``num_bytes``
    (plus the buffer header) on the current CUDA device of every rank."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes <= 0:
        raise ValueError(f"num_rdma_bytes must be a positive int, got {num_bytes!r}")
    runtime = _runtime()
    from moe_ep import _C

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _ensure_initialized(group, runtime)
    addr = runtime.symmetric_zeros(int(_C.ipc_header_bytes) + num_bytes)
    peers = [runtime.peer_pointer(addr, pe) for pe in range(world)]
    unreachable = [pe for pe, ptr in enumerate(peers) if ptr == 0]
    # Every rank learns every rank's verdict, so all raise alike instead of some waiting.
    verdicts: list = [None] * world
    dist.all_gather_object(verdicts, unreachable, group=group)
    if any(verdicts):
        raise NvshmemUnavailable("NVSHMEM peers out of load/store reach (" + "; ".join(
            f"rank {r} cannot reach {pes}" for r, pes in enumerate(verdicts) if pes) + "): the RDMA path of the "
            "low-latency kernels is not written yet; use ranks of one NVLink domain")
    buffer = _C.IpcBuffer.adopt(peers, rank, num_bytes)
    with translate_device_errors("open_nvshmem_buffer (first barrier)"):
        buffer.barrier()
        torch.cuda.current_stream().synchronize()
    return buffer
