"""GPU: the decode step (router, low-latency dispatch, masked experts, combine) is captured in a
CUDA graph and replayed with fresh inputs, matching eager execution every time. Runs over NCCL
with one rank per GPU (up to 2); with one GPU the EP group has a single rank, which still runs the
whole Buffer path on the device."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

REPLAYS = 50
HIDDEN = 512


def _graph_worker(ctx) -> None:
    rank = ctx.rank
    import torch.distributed as dist

    from moe_ep.layers.moe import ExpertParallelMoE

    device = torch.device("cuda", rank)
    moe = ExpertParallelMoE(HIDDEN, 256, 32, 4, rule="deepseek_v3", n_group=4, topk_group=2,
                            routed_scaling_factor=2.5, num_shared_experts=1, group=dist.group.WORLD,
                            dtype=torch.bfloat16, device=device, low_latency_max_tokens=64, phase="decode")
    moe.init_weights(5)
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    static_x = torch.randn(48, HIDDEN, generator=gen, device=device).bfloat16()
    with torch.no_grad():
        for _ in range(3):  # warm-up on a side stream, as graph capture requires
            moe(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe(static_x)
        for step in range(REPLAYS):
            static_x.copy_(torch.randn(48, HIDDEN, generator=gen, device=device))
            graph.replay()
            replayed = static_out.clone()
            eager = moe(static_x)
            torch.cuda.synchronize()
            assert torch.isfinite(replayed).all(), f"rank {rank} replay {step}: non-finite output"
            diff = (replayed.float() - eager.float()).abs().max().item()
            assert diff == 0.0, f"rank {rank} replay {step}: graph and eager differ by {diff}"


def test_decode_step_cuda_graph_replays_match_eager(nccl_pool):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl_pool(min(2, max(count, 1))).run(_graph_worker, timeout=300)
