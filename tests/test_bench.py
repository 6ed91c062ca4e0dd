"""The layer benchmark's naive EP baseline computes the same function as ExpertParallelMoE, so
the ratio it reports compares equal work."""
from __future__ import annotations

import torch

from moe_ep.bench import naive_ep_forward
from moe_ep.layers.moe import ExpertParallelMoE

BLOCK = dict(hidden_size=256, moe_intermediate_size=64, num_experts=8, top_k=3, rule="softmax",
             num_shared_experts=1, dtype=torch.float32)


def _naive_vs_module(ctx, seed: int) -> float:
    moe = ExpertParallelMoE(**BLOCK, group=ctx.group, device=ctx.device, phase="prefill").init_weights(seed)
    x = torch.randn(19 + ctx.rank, BLOCK["hidden_size"], generator=torch.Generator().manual_seed(seed + ctx.rank))
    x = x.to(ctx.device)
    with torch.no_grad():
        ours, naive = moe(x), naive_ep_forward(moe, x)
    return ((ours - naive).norm() / ours.norm()).item()


def test_naive_baseline_matches_module(dist_pool, seed):
    errs = dist_pool(2).run(_naive_vs_module, seed)
    assert max(errs) < 1e-5, errs
