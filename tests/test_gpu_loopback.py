"""GPU: engines for ranks that are threads of one process on one GPU (``IntranodeEngine.in_process``,
``LowLatencyEngine.in_process``), which the loopback benchmark times. Their results must equal
what the same kernels give ranks in separate processes (the specification, checked here directly):

* intranode: a routed dispatch's ``recv_x`` is every source's rows for this rank, sources in rank
  order, tokens in order, bit for bit; the received per-expert counts; a cached dispatch gives the
  same rows; combine of the dispatched rows is ``x * ranks the token went to``;
* low latency (BF16): the received counts per local expert; the combine of the received rows with
  the source's weights is ``x * sum(valid weights)``, within bf16 tolerance.

Fresh random data (never zeros), -1 entries, a rank with zero tokens, a hidden size that is not a
power of two, 2 and 3 ranks. Skips, with the reason, without a GPU or the extension.

The cases run in ONE child process (``python tests/test_gpu_loopback.py``) started with
``CUDA_MODULE_LOADING=EAGER``, which in-process ranks need from before CUDA starts (this pytest
process may have started CUDA lazily already); each test reads its case's line.
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def child_results() -> dict[str, str]:
    """Runs every case in one child process with eager module loading: {case: "OK" or the error}."""
    from tests.conftest import kernels_missing

    reason = kernels_missing("intranode", "intranode_dispatch")
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, CUDA_MODULE_LOADING="EAGER", MOE_EP_TIMEOUT_S=os.environ.get("MOE_EP_TIMEOUT_S", "20"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            name, _, verdict = line[5:].partition(" ")
            results[name] = verdict
    results["_log"] = proc.stdout[-4000:] + proc.stderr[-4000:]
    return results


def _check(child_results: dict[str, str], case: str, family: str, entry_point: str) -> None:
    from tests.conftest import kernels_missing

    reason = kernels_missing(family, entry_point)
    if reason:
        pytest.skip(reason)
    assert child_results.get(case) == "OK", f"{case}: {child_results.get(case, 'did not run')}\n{child_results['_log']}"


@pytest.mark.parametrize("num_ranks,hidden", [(2, 2560), (3, 7168)])
def test_intranode_in_process(child_results, num_ranks: int, hidden: int) -> None:
    _check(child_results, f"intranode-{num_ranks}-{hidden}", "intranode", "intranode_dispatch")


def test_low_latency_in_process(child_results) -> None:
    _check(child_results, "low_latency", "low_latency", "ll_dispatch")


def _routing(num_tokens: int, hidden: int, experts: int, top_k: int, seed: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    topk_idx = torch.rand(num_tokens, experts, generator=gen).topk(top_k, dim=1).indices
    if num_tokens:
        topk_idx[torch.rand(num_tokens, top_k, generator=gen) < 0.1] = -1
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return x.to(device), topk_idx.to(device), weights.to(device)


# ------------------------------------------------------------------------------ the cases (child process)
def intranode_case(num_ranks: int, hidden: int) -> None:
    from moe_ep.bench_loopback import ThreadRanks
    from moe_ep.comm.backends.intranode import IntranodeEngine, intranode_size_hint

    device = torch.device("cuda", torch.cuda.current_device())
    experts, top_k = 12 * num_ranks, 4
    tokens = [37, 0, 129][:num_ranks]  # rank 1 sends nothing
    data = [_routing(t, hidden, experts, top_k, 100 + r, device) for r, t in enumerate(tokens)]
    engines = IntranodeEngine.in_process(num_ranks, device, intranode_size_hint(max(tokens), hidden, num_ranks, top_k))
    ext = engines[0].ext
    layouts = [ext.get_dispatch_layout(idx, experts, num_ranks) for _, idx, _ in data]
    ranks = ThreadRanks(num_ranks, device)

    def body(rank: int):
        engine = engines[rank]
        engine.num_sms = 4
        x, topk_idx, weights = data[rank]
        _, per_expert, in_rank = layouts[rank]
        recv_x, _, _, counts, handle = engine.dispatch(x, None, in_rank, per_expert, topk_idx, weights, 1, 0, experts)
        # The loopback's --isolate diagnostic (peer rows waited for, not copied) must leave the
        # protocol intact: own rows still right, and the calls after it exact again.
        engine.diagnostic_skip_peer_copy = True
        try:
            partial = engine.dispatch(x, handle, None, None, None, None, 1, 0, experts)[0].clone()
        finally:
            engine.diagnostic_skip_peer_copy = False
        cached = engine.dispatch(x, handle, None, None, None, None, 1, 0, experts)[0]
        combined, _ = engine.combine(recv_x, handle, None, [])
        return recv_x.clone(), cached.clone(), list(counts), combined.clone(), partial

    results = ranks.run(body)
    local = experts // num_ranks
    for rank, (recv_x, cached, counts, combined, partial) in enumerate(results):
        expected = torch.cat([data[src][0][layouts[src][2][:, rank]] for src in range(num_ranks)])
        assert torch.equal(recv_x, expected), f"rank {rank}: received rows differ"
        assert torch.equal(cached, expected), f"rank {rank}: cached dispatch rows differ"
        start = sum(int(layouts[src][2][:, rank].sum()) for src in range(rank))  # rows come in source order
        own = slice(start, start + int(layouts[rank][2][:, rank].sum()))
        assert torch.equal(partial[own], expected[own]), f"rank {rank}: own rows differ with the peer copy left out"
        idx = torch.cat([data[src][1] for src in range(num_ranks)])
        mine = idx[(idx >= rank * local) & (idx < (rank + 1) * local)] - rank * local
        assert counts == torch.bincount(mine, minlength=local).tolist(), f"rank {rank}: expert counts"
        x, _, _ = data[rank]
        reached = layouts[rank][2].sum(1, keepdim=True).float()
        torch.testing.assert_close(combined.float(), (x.float() * reached).to(torch.bfloat16).float(), rtol=0, atol=0)


def low_latency_case() -> None:
    from moe_ep.bench_loopback import ThreadRanks
    from moe_ep.comm.backends.low_latency import LowLatencyEngine, ll_size_hint

    num_ranks, hidden, experts, top_k, m = 2, 2560, 24, 8, 16
    device = torch.device("cuda", torch.cuda.current_device())
    tokens = [13, 0]
    data = [_routing(t, hidden, experts, top_k, 200 + r, device) for r, t in enumerate(tokens)]
    engines = LowLatencyEngine.in_process(num_ranks, device, ll_size_hint(m, hidden, num_ranks, experts, top_k),
                                          num_sms=8)
    ranks = ThreadRanks(num_ranks, device)

    def body(rank: int):
        engine = engines[rank]
        x, topk_idx, weights = data[rank]
        recv, recv_count, handle, _ = engine.dispatch(x, topk_idx, m, experts, None, False, False, False, False)
        combined, _ = engine.combine(recv, topk_idx, weights, handle, None, False)
        return recv_count.clone(), combined.clone()

    results = ranks.run(body)
    local = experts // num_ranks
    idx = torch.cat([d[1] for d in data])
    for rank, (recv_count, combined) in enumerate(results):
        mine = idx[(idx >= rank * local) & (idx < (rank + 1) * local)] - rank * local
        assert recv_count.tolist() == torch.bincount(mine, minlength=local).tolist(), f"rank {rank}: counts"
        x, topk_idx, weights = data[rank]
        expected = x.float() * torch.where(topk_idx >= 0, weights, 0).sum(1, keepdim=True)
        torch.testing.assert_close(combined.float(), expected, rtol=2e-2, atol=2e-2)


def _main() -> None:
    cases = {f"intranode-{r}-{h}": (lambda r=r, h=h: intranode_case(r, h)) for r, h in [(2, 2560), (3, 7168)]}
    cases["low_latency"] = low_latency_case
    for name, case in cases.items():
        try:
            case()
            print(f"CASE {name} OK", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported to the parent test
            traceback.print_exc()
            print(f"CASE {name} {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", flush=True)
            if isinstance(exc, getattr(torch, "AcceleratorError", ())):
                break  # the context is gone: the remaining cases cannot run


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    _main()
