"""Start N ranks on this machine (CPU/gloo or one per GPU/NCCL), or join a torchrun launch.

The CLI, the benchmarks and the demo share this, so every entry point launches ranks the same way.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Keep NVLink multicast off (the shared GPUs of the device machines must not use it).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def pick_backend(nproc: int, requested: str = "auto") -> str:
    """``nccl`` when there is one GPU per rank, else ``gloo`` (CPU)."""
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, got {requested!r}")
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"


def _worker(rank: int, nproc: int, backend: str, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(SAFE_ENV)
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    else:
        torch.cuda.set_device(rank)
    # The parent hosts the store (see launch), so no rank's exit can pull it from under the others.
    store = dist.TCPStore("127.0.0.1", port, nproc, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=nproc,
                            device_id=torch.device("cuda", rank) if backend == "nccl" else None)
    fn(rank, nproc, *args)
    dist.barrier()
    # Leave without running C++ destructors: tearing down gloo process groups at interpreter exit
    # sometimes aborts ("terminate called without an active exception") after all work is done.
    # Every rank has passed the barrier, so nothing is in flight. An exception in fn skips this
    # and exits non-zero through torch.multiprocessing as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Callable[..., Any], nproc: int, backend: str = "auto", args: tuple = ()) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``nproc`` ranks.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) this process is one rank and ``nproc`` is ignored.
    """
    os.environ.update(SAFE_ENV)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        chosen = pick_backend(world_size, backend)
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(chosen)
        try:
            fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        return
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    chosen = pick_backend(nproc, backend)
    if chosen == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"nproc={nproc} with nccl needs {nproc} GPUs, found {torch.cuda.device_count()}")
    # The rendezvous store lives in this (parent) process, which outlives every rank: when rank 0
    # hosted it, rank 0 finishing first could abort a slower rank's teardown ("terminate called").
    store = dist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
    try:
        mp.start_processes(_worker, args=(nproc, chosen, store.port, fn, args), nprocs=nproc,
                           start_method="spawn")
    finally:
        del store
