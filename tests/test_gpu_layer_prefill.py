"""GPU: the prefill path of ExpertParallelMoE (router, normal dispatch, grouped experts written
into ``Buffer.empty_combine_input``, combine) with a receive pool equals the same layer without
one bit for bit, and went through the pool (dispatch outputs stored into by the peers, the combine
input read in place). Runs over NCCL with one rank per GPU (up to 2); with one GPU the group has a
single rank, which still runs the whole Buffer -> engine path on the device."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN = 512
POOL_BYTES = 256 << 20


def _layer_worker(ctx, fp8: bool) -> None:
    import torch.distributed as dist

    from moe_ep.layers.moe import ExpertParallelMoE, _shared_buffers

    rank = ctx.rank
    device = torch.device("cuda", rank)
    group = dist.group.WORLD

    def build(pool_bytes: int) -> ExpertParallelMoE:
        _shared_buffers.pop(id(group), None)  # each layer gets its own Buffer (with or without a pool)
        moe = ExpertParallelMoE(HIDDEN, 256, 32, 4, rule="deepseek_v3", n_group=4, topk_group=2,
                                routed_scaling_factor=2.5, num_shared_experts=1, group=group, fp8=fp8,
                                dtype=torch.bfloat16, device=device, phase="prefill", recv_pool_bytes=pool_bytes)
        moe.init_weights(7)
        return moe.quantize_fp8_() if fp8 else moe

    gen = torch.Generator(device=device).manual_seed(300 + rank)
    inputs = [torch.randn(n, HIDDEN, generator=gen, device=device).bfloat16() for n in (130, 1, 67 * (rank + 1))]
    with torch.no_grad():
        plain = build(0)
        if plain.buffer.backend.name != "cuda" or not plain.buffer.backend.uses_kernel("combine"):
            pytest.skip("the Buffer does not run combine through the intranode kernels")
        expected = [plain(x) for x in inputs]
        pooled = build(POOL_BYTES)
        engine = pooled.buffer.backend.intranode
        assert engine.recv_pool is not None, "the layer's Buffer has no receive pool"
        got = [pooled(x) for x in inputs]
        torch.cuda.synchronize()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.isfinite(g).all(), f"rank {rank} input {i}: non-finite output"
        assert torch.equal(g, e), f"rank {rank} input {i}: with a pool the output differs by {(g - e).abs().max()}"
    assert engine.direct_calls == len(inputs), f"dispatches stored into the pool: {engine.direct_calls}"
    assert engine.pull_calls == len(inputs), f"combines read in place: {engine.pull_calls}"
    _shared_buffers.pop(id(group), None)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_prefill_layer_with_a_recv_pool_equals_without(nccl_pool, fp8):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl_pool(min(2, max(count, 1))).run(_layer_worker, fp8, timeout=300)
