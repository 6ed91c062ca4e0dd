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
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import kernels_missing

pytestmark = pytest.mark.gpu


def _skip_without(family: str, entry_point: str) -> None:
    reason = kernels_missing(family, entry_point)
    if reason:
        pytest.skip(reason)


def _routing(num_tokens: int, hidden: int, experts: int, top_k: int, seed: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    topk_idx = torch.rand(num_tokens, experts, generator=gen).topk(top_k, dim=1).indices
    if num_tokens:
        topk_idx[torch.rand(num_tokens, top_k, generator=gen) < 0.1] = -1
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return x.to(device), topk_idx.to(device), weights.to(device)


@pytest.mark.parametrize("num_ranks,hidden", [(2, 2560), (3, 7168)])
def test_intranode_in_process(num_ranks: int, hidden: int) -> None:
    _skip_without("intranode", "intranode_dispatch")
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
        cached = engine.dispatch(x, handle, None, None, None, None, 1, 0, experts)[0]
        combined, _ = engine.combine(recv_x, handle, None, [])
        return recv_x.clone(), cached.clone(), list(counts), combined.clone()

    results = ranks.run(body)
    local = experts // num_ranks
    for rank, (recv_x, cached, counts, combined) in enumerate(results):
        expected = torch.cat([data[src][0][layouts[src][2][:, rank]] for src in range(num_ranks)])
        assert torch.equal(recv_x, expected), f"rank {rank}: received rows differ"
        assert torch.equal(cached, expected), f"rank {rank}: cached dispatch rows differ"
        idx = torch.cat([data[src][1] for src in range(num_ranks)])
        mine = idx[(idx >= rank * local) & (idx < (rank + 1) * local)] - rank * local
        assert counts == torch.bincount(mine, minlength=local).tolist(), f"rank {rank}: expert counts"
        x, _, _ = data[rank]
        reached = layouts[rank][2].sum(1, keepdim=True).float()
        torch.testing.assert_close(combined.float(), (x.float() * reached).to(torch.bfloat16).float(), rtol=0, atol=0)


def test_low_latency_in_process() -> None:
    _skip_without("low_latency", "ll_dispatch")
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
