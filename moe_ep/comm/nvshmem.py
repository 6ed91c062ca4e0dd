"""Low-latency buffers in NVSHMEM symmetric memory (the ``moe_ep._nvshmem`` module).

:func:`open_nvshmem_buffer` is collective over a process group: NVSHMEM is initialized once per
process with the unique-id bootstrap (rank 0 makes the id, torch.distributed broadcasts it), every
rank allocates the same zeroed symmetric buffer, and ``nvshmem_ptr`` gives this process's address
of every peer's copy. The result is a ``moe_ep._C.IpcBuffer`` adopting that memory, so the
low-latency kernels run on it unchanged, plus the ranks they must reach by puts.

Peers: a peer ``nvshmem_ptr`` maps (NVLink / P2P, one node) gets stores straight into its memory;
a peer it cannot map (RDMA, across nodes) is reached with NVSHMEM's device API (puts, atomic adds
and quiet; IBGDA where present): the same kernels built into ``moe_ep._nvshmem`` with a put mask
(``csrc/low_latency.h``). ``MOE_EP_NVSHMEM_PUTS=all`` puts to every rank, this one included: the
RDMA path's code run over NVLink (or on one GPU), which is how it is tested without InfiniBand;
``MOE_EP_NVSHMEM_PUTS=1,3`` (a list of ranks) puts to those ranks only, the mix of a multi-node job
(mapped peers get stores, the others puts).
NVSHMEM wants one PE per GPU, so ranks should not share a device here (the CUDA-IPC buffers of
``moe_ep.comm.ipc`` allow that).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import translate_device_errors

__all__ = ["NvshmemUnavailable", "open_nvshmem_buffer", "HOW_TO_ENABLE", "PUTS_ENV", "parse_puts", "puts_from_env"]

# Which ranks the low-latency kernels reach by NVSHMEM puts: "auto" (default: those nvshmem_ptr cannot
# map), "all" (every rank, this one too) or a comma-separated list of ranks (those, besides the
# unmappable ones).
PUTS_ENV = "MOE_EP_NVSHMEM_PUTS"


def parse_puts(raw):
    """"auto", "all", or the tuple of ranks a "1,3"-style list names (ValueError otherwise)."""
    if raw in ("auto", "all"):
        return raw
    if isinstance(raw, (tuple, list)):
        ranks = tuple(raw)
    else:
        try:
            ranks = tuple(int(part) for part in str(raw).split(","))
        except ValueError:
            ranks = ()
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
        raise ValueError(f"{PUTS_ENV} (puts) must be 'auto', 'all' or a comma-separated list of ranks >= 0, "
                         f"got {raw!r}")
    return ranks


def puts_from_env():
    import os

    return parse_puts(os.environ.get(PUTS_ENV, "auto"))


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


def open_nvshmem_buffer(group, num_bytes: int, puts="auto"):
    """Collectively build a ``moe_ep._C.IpcBuffer`` over NVSHMEM symmetric memory of ``num_bytes``
    (plus the buffer header) on the current CUDA device of every rank. Returns ``(buffer,
    put_ranks)``: the ranks the kernels must reach by puts (``puts="auto"``: those ``nvshmem_ptr``
    cannot map; ``"all"``: every rank; a sequence of ranks: those and the unmappable ones). The
    unmappable ranks' entries in the buffer's peer table hold this rank's own address and are never
    stored through."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes <= 0:
        raise ValueError(f"num_rdma_bytes must be a positive int, got {num_bytes!r}")
    puts = parse_puts(puts)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if isinstance(puts, tuple) and max(puts) >= world:
        raise ValueError(f"{PUTS_ENV} (puts) names rank {max(puts)}, but the group has {world} ranks")
    runtime = _runtime()
    from moe_ep import _C

    _ensure_initialized(group, runtime)
    addr = runtime.symmetric_zeros(int(_C.ipc_header_bytes) + num_bytes)
    peers = [runtime.peer_pointer(addr, pe) for pe in range(world)]
    unreachable = [pe for pe, ptr in enumerate(peers) if ptr == 0]
    # Every rank learns every rank's verdict, so all raise alike instead of some waiting.
    verdicts: list = [None] * world
    dist.all_gather_object(verdicts, unreachable, group=group)
    if any(verdicts) and not getattr(runtime, "ll_puts_compiled", False):
        raise NvshmemUnavailable("NVSHMEM peers out of load/store reach (" + "; ".join(
            f"rank {r} cannot reach {pes}" for r, pes in enumerate(verdicts) if pes) + "), and moe_ep._nvshmem "
            "was built without the low-latency kernels' put path: rebuild it (setup.py) with NVSHMEM's "
            "libnvshmem_device.a present")
    if puts == "all":
        put_ranks = list(range(world))
    else:
        put_ranks = sorted(set(unreachable) | (set(puts) if isinstance(puts, tuple) else set()))
    # This rank's entry is the symmetric address itself: the put path names locations by it.
    table = [addr if pe in unreachable or pe == rank else ptr for pe, ptr in enumerate(peers)]
    buffer = _C.IpcBuffer.adopt(table, rank, num_bytes)
    with translate_device_errors("open_nvshmem_buffer (first barrier)"):
        torch.cuda.current_stream().synchronize()
        runtime.barrier_all()  # NVSHMEM's own barrier: it reaches every PE, mapped or not
    return buffer, put_ranks
