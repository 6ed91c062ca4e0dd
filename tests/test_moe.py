"""ExpertParallelMoE on several CPU ranks equals the same block run densely in one process."""
from __future__ import annotations

import os

import pytest
import torch

from moe_ep.layers.moe import ExpertParallelMoE

BLOCK = dict(hidden_size=256, moe_intermediate_size=96, num_experts=16, top_k=4, rule="deepseek_v3", n_group=4,
             topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_shared_experts=1)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def _tokens(seed: int, rank: int, num_tokens: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 31 + rank)
    return torch.randn(num_tokens, BLOCK["hidden_size"], generator=gen).to(device)


def _ep_vs_dense(ctx, seed: int, phase: str, num_tokens_by_rank: list[int], fp8: bool, dtype_name: str):
    dtype = getattr(torch, dtype_name)
    kwargs = dict(BLOCK, fp8=fp8, dtype=dtype, device=ctx.device, low_latency_max_tokens=max(num_tokens_by_rank))
    ep = ExpertParallelMoE(**kwargs, group=ctx.group, phase=phase).init_weights(seed).quantize_fp8_()
    dense = ExpertParallelMoE(**kwargs, group=None, phase=phase).init_weights(seed).quantize_fp8_()
    x = _tokens(seed, ctx.rank, num_tokens_by_rank[ctx.rank], ctx.device).to(dtype)
    with torch.no_grad():
        out, ref = ep(x), dense(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    return _rel_err(out, ref) if x.shape[0] else 0.0


@pytest.mark.parametrize("world_size", [2, 4])
def test_prefill_float32_matches_dense(dist_pool, seed, world_size):
    tokens = [33, 0, 17, 40][:world_size]  # a rank with no tokens
    errs = dist_pool(world_size).run(_ep_vs_dense, seed, "prefill", tokens, False, "float32")
    # Only the summation order differs from the dense run.
    assert max(errs) < 1e-5, errs


@pytest.mark.parametrize("world_size", [2, 4])
def test_decode_matches_dense(dist_pool, seed, world_size):
    tokens = [9, 16, 0, 5][:world_size]
    errs = dist_pool(world_size).run(_ep_vs_dense, seed, "decode", tokens, False, "float32")
    # Low-latency dispatch carries bf16 (DeepEP's contract): bf16 rounding of activations and
    # expert outputs bounds the difference to about 2^-8 relative per element.
    assert max(errs) < 1e-2, errs


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_bf16_matches_dense(dist_pool, seed, phase):
    errs = dist_pool(2).run(_ep_vs_dense, seed, phase, [24, 11], False, "bfloat16")
    assert max(errs) < 2e-2, errs


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_fp8_matches_dense_fp8(dist_pool, seed, phase):
    errs = dist_pool(2).run(_ep_vs_dense, seed, phase, [20, 13], True, "bfloat16")
    # Both sides quantize the same tokens and weights identically; bf16 accumulation differs.
    assert max(errs) < 3e-2, errs


def test_fp8_error_bound_against_bf16():
    """FP8 (1x128 activations, 128x128 weights) stays within 6% of BF16 on random data: each
    e4m3 value carries 3 mantissa bits (relative step 2^-4 at worst, ~2^-5 on average per
    operand); errors of independent products average out over the 256- and 96-long sums."""
    torch.manual_seed(7)
    bf16 = ExpertParallelMoE(**BLOCK, dtype=torch.bfloat16).init_weights(3)
    fp8 = ExpertParallelMoE(**BLOCK, dtype=torch.bfloat16, fp8=True).init_weights(3).quantize_fp8_()
    x = torch.randn(50, BLOCK["hidden_size"]).bfloat16()
    with torch.no_grad():
        assert _rel_err(fp8(x), bf16(x)) < 6e-2


def test_ep1_decode_equals_prefill():
    moe = ExpertParallelMoE(**BLOCK, dtype=torch.float32, low_latency_max_tokens=32).init_weights(11)
    x = torch.randn(2, 13, BLOCK["hidden_size"])
    with torch.no_grad():
        with moe.use_phase("prefill"):
            prefill = moe(x)
        with moe.use_phase("decode"):
            decode = moe(x)
    assert moe.phase == "auto"
    assert prefill.shape == x.shape
    assert _rel_err(decode, prefill) < 1e-6


def test_auto_phase_follows_capacity():
    moe = ExpertParallelMoE(**BLOCK, dtype=torch.float32, low_latency_max_tokens=8).init_weights(1)
    assert moe._resolve_phase(8) == "decode"
    assert moe._resolve_phase(9) == "prefill"
    with torch.no_grad():
        out = moe(torch.randn(20, BLOCK["hidden_size"]))  # above capacity: prefill, no error
    assert out.shape == (20, BLOCK["hidden_size"])


def test_router_logits_returned():
    moe = ExpertParallelMoE(**BLOCK, dtype=torch.float32, return_router_logits=True).init_weights(2)
    out, logits = moe(torch.randn(5, BLOCK["hidden_size"]))
    assert out.shape == (5, BLOCK["hidden_size"]) and logits.shape == (5, BLOCK["num_experts"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="phase"):
        ExpertParallelMoE(**BLOCK, phase="training")
    with pytest.raises(ValueError, match="hidden_size"):
        ExpertParallelMoE(**dict(BLOCK, hidden_size=200), fp8=True)
    moe = ExpertParallelMoE(**BLOCK, dtype=torch.float32, low_latency_max_tokens=4, phase="decode")
    with pytest.raises(ValueError, match="low_latency_max_tokens"):
        moe(torch.randn(5, BLOCK["hidden_size"]))
    with pytest.raises(ValueError, match="hidden_size"):
        moe(torch.randn(3, 100))


def _indivisible(ctx):
    with pytest.raises(ValueError, match="divisible"):
        ExpertParallelMoE(**dict(BLOCK, num_experts=15, n_group=3, topk_group=2), group=ctx.group)
    return True


def test_experts_must_divide_ep_size(dist_pool):
    assert all(dist_pool(2).run(_indivisible))


def _from_config(ctx, path: str):
    from moe_ep import config

    cfg = config.load(path)
    moe = ExpertParallelMoE.from_config(cfg, group=ctx.group, device=ctx.device).init_weights(0)
    dense = ExpertParallelMoE.dense_from_config(cfg, device=ctx.device).init_weights(0)
    x = torch.randn(12, cfg.model.hidden_size, generator=torch.Generator().manual_seed(ctx.rank)).to(ctx.device)
    with torch.no_grad():
        return _rel_err(moe(x.to(moe.dtype)), dense(x.to(moe.dtype)))


def test_from_demo_config(dist_pool):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.yaml")
    errs = dist_pool(2).run(_from_config, path)
    assert max(errs) < 1e-2, errs


def _w_recv_pool_reaches_buffer(ctx):
    from moe_ep.comm import recv_pool_size_hint

    """parallel.recv_pool_bytes (here the keyword) reaches the shared Buffer; a later layer asking for
    a larger pool rebuilds it, a smaller one keeps it."""
    from moe_ep.layers.moe import _shared_buffers

    _shared_buffers.pop(id(ctx.group), None)
    first = ExpertParallelMoE(**BLOCK, dtype=torch.float32, group=ctx.group, recv_pool_bytes=4 << 20)
    assert first.buffer.recv_pool_bytes == 4 << 20
    larger = ExpertParallelMoE(**BLOCK, dtype=torch.float32, group=ctx.group, recv_pool_bytes=8 << 20)
    assert larger.buffer.recv_pool_bytes == 8 << 20 and larger.buffer is not first.buffer
    smaller = ExpertParallelMoE(**BLOCK, dtype=torch.float32, group=ctx.group, recv_pool_bytes=1 << 20)
    assert smaller.buffer is larger.buffer
    _shared_buffers.pop(id(ctx.group), None)
    auto = ExpertParallelMoE(**BLOCK, dtype=torch.float32, group=ctx.group, recv_pool_bytes="auto")
    assert auto.buffer.recv_pool_bytes == recv_pool_size_hint(4096, BLOCK["hidden_size"], ctx.world_size,
                                                              BLOCK["top_k"])
    _shared_buffers.pop(id(ctx.group), None)
    default = ExpertParallelMoE(**BLOCK, dtype=torch.float32, group=ctx.group)  # "auto" by default
    assert default.buffer.recv_pool_bytes == auto.buffer.recv_pool_bytes
    _shared_buffers.pop(id(ctx.group), None)
    from tests.env import environ
    with environ(MOE_EP_RECV_POOL_BYTES=str(3 << 20)):  # an explicit setting wins over the default
        chosen = ExpertParallelMoE(**BLOCK, dtype=torch.float32, group=ctx.group)
        assert chosen.buffer.recv_pool_bytes is None, chosen.buffer.recv_pool_bytes  # None: the Buffer reads it
    _shared_buffers.pop(id(ctx.group), None)
    for bad in (-1, "big", True):
        with pytest.raises(ValueError, match="recv_pool_bytes"):
            ExpertParallelMoE(**BLOCK, dtype=torch.float32, group=ctx.group, recv_pool_bytes=bad)


def test_recv_pool_bytes_reaches_the_buffer(dist_pool):
    dist_pool(2).run(_w_recv_pool_reaches_buffer)
