"""NVSHMEM symmetric memory for the low-latency kernels (moe_ep.comm.nvshmem).

On any machine: without the optional module ``moe_ep._nvshmem`` the runtime raises an error that
says how to enable it. With 2 GPUs and the module built: a low-latency engine on NVSHMEM memory
gives the oracle's results (one GPU per rank, as NVSHMEM requires)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from moe_ep.comm import nvshmem
from tests.env import environ


def test_missing_runtime_says_how_to_enable(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_nvshmem(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "moe_ep" and fromlist and "_nvshmem" in fromlist:
            raise ImportError("No module named 'moe_ep._nvshmem'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_nvshmem)
    with pytest.raises(nvshmem.NvshmemUnavailable, match="nvidia-nvshmem-cu13"):
        nvshmem._runtime()


def test_bad_size_is_rejected_before_anything_starts():
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        nvshmem.open_nvshmem_buffer(None, 0)


def _w_engine_on_nvshmem(ctx, seed: int) -> None:
    from tests.test_cuda_low_latency import CASES, run_case

    with environ(MOE_EP_LL_TRANSPORT="nvshmem"):
        from moe_ep.comm.backends.low_latency import LowLatencyEngine, ll_size_hint

        case = next(c for c in CASES if c.name.startswith("random"))
        engine = LowLatencyEngine(ctx.group, ctx.device, ll_size_hint(case.m, 7168, ctx.world_size, 1024, 8) + (1 << 20))
        assert engine.transport == "nvshmem"
        for rep in range(3):
            run_case(ctx, engine, case, seed + rep, rep, f"{case.name} on NVSHMEM (run {rep + 1} of 3)")
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_low_latency_engine_on_nvshmem_memory(nccl_pool, seed):
    if importlib.util.find_spec("moe_ep._nvshmem") is None:
        pytest.skip(f"moe_ep._nvshmem is not built: {nvshmem.HOW_TO_ENABLE}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        pytest.skip(f"NVSHMEM needs one GPU per rank: 2 GPUs needed, {count} visible")
    nccl_pool(2).run(_w_engine_on_nvshmem, seed, timeout=300)
