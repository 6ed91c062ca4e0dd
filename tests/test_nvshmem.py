"""NVSHMEM symmetric memory for the low-latency kernels (moe_ep.comm.nvshmem), and their put path.

On any machine: without the optional module ``moe_ep._nvshmem`` the runtime raises an error that
says how to enable it; bad settings raise before anything starts. With 2 GPUs and the module built:
a low-latency engine on NVSHMEM memory gives the oracle's results (one GPU per rank, as NVSHMEM
wants). The put path (NVSHMEM's device API, for peers nvshmem_ptr cannot map) is forced onto every
rank with MOE_EP_NVSHMEM_PUTS=all (and onto rank 1 only with "1": puts and stores mixed, as in a
multi-node job) and checked against the oracle on every low-latency case: on one GPU with one rank
(puts to itself), and on 2 GPUs. ``MOE_EP_TEST_NVSHMEM_SHARED_GPU=1`` also runs
the 2-rank put test with both ranks on one GPU (NVSHMEM's multiple-PEs-per-GPU mode; opt in, as
NVSHMEM supports that mode only in part)."""
from __future__ import annotations

import importlib.util
import os

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
        assert engine.put_mask == 0, f"every peer is mapped here, yet put_mask = {engine.put_mask}"
        for rep in range(3):
            run_case(ctx, engine, case, seed + rep, rep, f"{case.name} on NVSHMEM (run {rep + 1} of 3)")
        torch.cuda.synchronize()


def _two_rank_pool(nccl_pool, gpu_gloo_pool):
    """Two NVSHMEM ranks: one GPU each, or (MOE_EP_TEST_NVSHMEM_SHARED_GPU=1) both on one GPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if os.environ.get("MOE_EP_TEST_NVSHMEM_SHARED_GPU") == "1" and count >= 1:
        return gpu_gloo_pool(2)
    if count < 2:
        pytest.skip(f"NVSHMEM needs one GPU per rank: 2 GPUs needed, {count} visible "
                    "(MOE_EP_TEST_NVSHMEM_SHARED_GPU=1 tries one shared GPU)")
    return nccl_pool(2)


@pytest.mark.gpu
def test_low_latency_engine_on_nvshmem_memory(nccl_pool, gpu_gloo_pool, seed):
    if importlib.util.find_spec("moe_ep._nvshmem") is None:
        pytest.skip(f"moe_ep._nvshmem is not built: {nvshmem.HOW_TO_ENABLE}")
    _two_rank_pool(nccl_pool, gpu_gloo_pool).run(_w_engine_on_nvshmem, seed, timeout=300)


def test_puts_setting_is_parsed_and_checked(monkeypatch):
    assert nvshmem.parse_puts("auto") == "auto" and nvshmem.parse_puts("all") == "all"
    assert nvshmem.parse_puts("1,3") == (1, 3) and nvshmem.parse_puts([0]) == (0,)
    for bad in ("some", "", "1,x", "-1", [True], [-2]):
        monkeypatch.setenv(nvshmem.PUTS_ENV, str(bad))
        with pytest.raises(ValueError, match="MOE_EP_NVSHMEM_PUTS"):
            nvshmem.puts_from_env()
        with pytest.raises(ValueError, match="MOE_EP_NVSHMEM_PUTS"):
            nvshmem.open_nvshmem_buffer(None, 1024, puts=bad)


def _require_put_build() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec("moe_ep._nvshmem") is None:
        pytest.skip(f"moe_ep._nvshmem is not built: {nvshmem.HOW_TO_ENABLE}")
    from moe_ep import _nvshmem

    if not getattr(_nvshmem, "ll_puts_compiled", False):
        pytest.skip("moe_ep._nvshmem was built without the put path (no libnvshmem_device.a at build time)")


# Every rank engine of a pool process, per (world size, bytes): NVSHMEM memory is never freed while
# the process lives, so each process builds one and reuses it.
_PUT_ENGINES: dict = {}


def _seed_with_valid_data(case, world_size: int, seed: int) -> int:
    """The first seed from ``seed`` on whose data respects the kernels' limits (with one rank, 8
    experts and duplicated top-k entries, an expert may get more than M rows; redraw then)."""
    from tests.test_cuda_low_latency import case_world, check_within_limits

    for candidate in range(seed, seed + 50):
        try:
            check_within_limits(case_world(case, world_size, candidate), case.m)
            return candidate
        except AssertionError:
            continue
    raise AssertionError(f"test data: no seed in [{seed}, {seed + 50}) gives {case.name} valid data")


def _w_put_path(ctx, seed: int, puts: str) -> int:
    from tests.test_cuda_low_latency import CASES, REPS, Case, _w_masked, run_case

    with environ(MOE_EP_LL_TRANSPORT="nvshmem", MOE_EP_NVSHMEM_PUTS=puts):
        from moe_ep.comm.backends.low_latency import LowLatencyEngine, ll_size_hint

        num_bytes = max(ll_size_hint(c.m, c.hidden, ctx.world_size, c.num_experts(ctx.world_size), c.num_topk,
                                     puts=True) for c in CASES)
        key = (ctx.world_size, num_bytes, puts)
        engine = _PUT_ENGINES.get(key)
        if engine is None:
            engine = _PUT_ENGINES[key] = LowLatencyEngine(ctx.group, ctx.device, num_bytes)
        want = (1 << ctx.world_size) - 1 if puts == "all" else sum(1 << int(r) for r in puts.split(","))
        assert engine.put_mask == want, (engine.put_mask, want)
        assert engine.ext.__name__ == "moe_ep._nvshmem", engine.ext.__name__
        runs = 0
        for i, case in enumerate(CASES):
            for rep in range(REPS):  # every hook combination; the combine's output modes cycle too
                data_seed = _seed_with_valid_data(case, ctx.world_size, seed + 131 * i + 37 * rep)
                run_case(ctx, engine, case, data_seed, rep, f"{case.name} by puts (run {rep + 1} of {REPS})")
                runs += 1
        with environ(MOE_EP_LL_SEND="staged"):  # the staged FP8 send's own kernel, by puts
            staged = Case("staged-fp8-h7168", hidden=7168, fmt="fp8")
            for rep in range(REPS):
                data_seed = _seed_with_valid_data(staged, ctx.world_size, seed + 997 + 37 * rep)
                run_case(ctx, engine, staged, data_seed, rep, f"{staged.name} by puts (run {rep + 1})")
                runs += 1
        if ctx.world_size > 1:  # a masked rank: nobody puts to it or waits for it
            _w_masked(ctx, ctx.world_size - 1, seed + 5, engine)
            runs += 1
        torch.cuda.synchronize()
        return runs


@pytest.mark.gpu
def test_put_path_matches_the_oracle_on_one_rank(nccl_pool, seed):
    """Every low-latency case through the put path with one rank: each row, index entry, weight,
    count and flag goes out as an NVSHMEM put (to this PE) and comes back through the receive."""
    _require_put_build()
    runs = nccl_pool(1).run(_w_put_path, seed, "all", timeout=900)
    assert runs and all(r > 0 for r in runs), runs


@pytest.mark.gpu
@pytest.mark.parametrize("puts", ["all", "1"], ids=["puts-to-all", "puts-to-rank-1-stores-to-rank-0"])
def test_put_path_matches_the_oracle_on_two_ranks(nccl_pool, gpu_gloo_pool, seed, puts):
    """``1``: the mix of a multi-node job (rank 1 by puts, rank 0 by stores, from either rank)."""
    _require_put_build()
    runs = _two_rank_pool(nccl_pool, gpu_gloo_pool).run(_w_put_path, seed, puts, timeout=900)
    assert len(runs) == 2 and all(r > 0 for r in runs), runs


def _w_puts_refused_by_the_stores_only_build(ctx) -> str:
    from moe_ep.comm.backends.low_latency import LowLatencyEngine, ll_size_hint

    engine = LowLatencyEngine(ctx.group, ctx.device, ll_size_hint(8, 256, 1, 8, 2, puts=True))
    engine.put_mask = 1  # the stores-only module (moe_ep._C) must refuse it, not launch it
    x = torch.randn(4, 256, device=ctx.device).to(torch.bfloat16)
    topk_idx = torch.randint(0, 8, (4, 2), device=ctx.device)
    with pytest.raises(ValueError, match="without NVSHMEM's device library") as info:
        engine.dispatch(x, topk_idx, 8, 8, None, False, False, False, False)
    return str(info.value)


@pytest.mark.gpu
def test_stores_only_build_refuses_a_put_mask(nccl_pool):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.test_cuda_low_latency import require_ll_kernels

    require_ll_kernels()
    messages = nccl_pool(1).run(_w_puts_refused_by_the_stores_only_build, timeout=120)
    assert "put_mask" in messages[0], messages


def test_transport_choice():
    """auto: CUDA IPC on one host, NVSHMEM across hosts (IPC cannot reach them); explicit choices stand."""
    from moe_ep.comm.backends.low_latency import choose_transport

    assert choose_transport("auto", ["node0", "node0"]) == "ipc"
    assert choose_transport("auto", ["node0"]) == "ipc"
    assert choose_transport("auto", ["node0", "node1"]) == "nvshmem"
    assert choose_transport("ipc", ["node0", "node1"]) == "ipc"
    assert choose_transport("nvshmem", ["node0"]) == "nvshmem"
    with pytest.raises(ValueError, match="MOE_EP_LL_TRANSPORT"):
        choose_transport("rdma", ["node0"])


@pytest.mark.parametrize("transport", ["auto", "nvshmem"])
def test_missing_nvshmem_across_hosts(monkeypatch, transport):
    """Across hosts the low-latency kernels need NVSHMEM: with the transport chosen automatically a
    missing moe_ep._nvshmem falls back to the reference, saying why and how to enable it; asked for
    explicitly (MOE_EP_LL_TRANSPORT=nvshmem), it raises."""
    from types import SimpleNamespace

    from moe_ep.comm.backends import cuda, low_latency

    def missing(*args, **kwargs):
        raise nvshmem.NvshmemUnavailable(f"moe_ep._nvshmem is not built: {nvshmem.HOW_TO_ENABLE}")

    monkeypatch.setattr(low_latency, "LowLatencyEngine", missing)
    monkeypatch.setenv(low_latency.TRANSPORT_ENV, transport)
    backend = SimpleNamespace(group=None, device=torch.device("cpu"))
    buffer = SimpleNamespace(low_latency_mode=True, num_rdma_bytes=1 << 20)
    if transport == "nvshmem":
        with pytest.raises(nvshmem.NvshmemUnavailable, match="nvidia-nvshmem-cu13"):
            cuda.CudaBackend._open_low_latency(backend, buffer)
        return
    engine, note = cuda.CudaBackend._open_low_latency(backend, buffer)
    assert engine is None and "need NVSHMEM across hosts" in note and "nvidia-nvshmem-cu13" in note, note
