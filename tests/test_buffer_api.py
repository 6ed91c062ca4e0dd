"""moe_ep.comm.Buffer's surface: static helpers, configs, events, buffer management, and the
validation at the public boundary (errors that name the offending argument).

Also a few checks of the rank pool itself (tests/dist_pool.py), which every distributed test uses.
"""
from __future__ import annotations

import re

import pytest
import torch

from moe_ep.comm.buffer import _kernel_checks_topk
from tests import oracle
from tests.dist_pool import RankFailure

HIDDEN = 256
NUM_TOPK = 4
LOCAL_EXPERTS = 3
MAX_TOKENS = 8
NUM_NVL_BYTES = 1 << 22

# Errors must name the argument; these patterns accept the reasonable spellings.
X_NAME = r"\bx\b|\bx\[|x_fp8"
TOPK_NAME = r"topk_idx"
EXPERT_ID = r"topk_idx|expert"
FP8_HIDDEN = r"hidden|128"


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------

def _w_identity(ctx, value):
    import torch.distributed as dist

    total = torch.tensor([ctx.rank + value], device=ctx.device)
    dist.all_reduce(total, group=ctx.group)
    return ctx.rank, ctx.world_size, str(ctx.device), int(total)


def _w_raise_on_rank(ctx, bad_rank):
    if ctx.rank == bad_rank:
        raise ValueError(f"deliberate failure on rank {ctx.rank}")
    return ctx.rank


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_pool_runs_on_every_rank(dist_pool, world_size):
    results = dist_pool(world_size).run(_w_identity, 10)
    total = sum(range(world_size)) + 10 * world_size
    assert [r[:2] for r in results] == [(rank, world_size) for rank in range(world_size)]
    assert all(r[3] == total for r in results)


def test_pool_reports_remote_rank_and_traceback(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(RankFailure, match=r"rank 1") as info:
        pool.run(_w_raise_on_rank, 1)
    assert "deliberate failure on rank 1" in str(info.value)
    assert "_w_raise_on_rank" in str(info.value)  # the remote traceback
    assert pool.alive and pool.run(_w_identity, 0)[0][0] == 0  # still usable


def _w_sleep_on_rank_0(ctx, seconds):
    import time

    if ctx.rank == 0:
        time.sleep(seconds)
    return ctx.rank


def _w_raise_before_collective(ctx):
    import torch.distributed as dist

    if ctx.rank == 1:
        raise ValueError("rank 1 never reaches the all_reduce")
    dist.all_reduce(torch.ones(1, device=ctx.device), group=ctx.group)
    if ctx.device.type == "cuda":  # NCCL only enqueues the collective: wedge where the host waits for it
        torch.cuda.synchronize(ctx.device)


def test_pool_timeout_kills_the_pool(dist_pool):
    from tests.dist_pool import PoolTimeout

    pool = dist_pool(2)
    with pytest.raises(PoolTimeout, match=r"timed out .* rank\(s\) \[0\]"):
        pool.run(_w_sleep_on_rank_0, 60, timeout=2)
    assert not pool.alive
    fresh = dist_pool(2)
    assert fresh is not pool and fresh.run(_w_identity, 1)[1][3] == 3


def test_pool_killed_when_peers_wedge_after_a_failure(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(RankFailure, match=r"rank 1 never reaches") as info:
        pool.run(_w_raise_before_collective)
    assert "did not finish" in str(info.value) and "all_reduce" in str(info.value)  # rank 0's stack dump
    assert not pool.alive and dist_pool(2).alive


# ---------------------------------------------------------------------------------------------
# Static helpers and buffer management
# ---------------------------------------------------------------------------------------------

def test_configs_and_static_helpers():
    from moe_ep.comm import Buffer, Config
    from moe_ep.comm.event import EventOverlap

    for num_ranks in (2, 4, 8):
        for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
            assert isinstance(config, Config)
            assert config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks) > 0
            assert config.get_rdma_buffer_size_hint(HIDDEN * 2, num_ranks) == 0  # one node: no RDMA buffer
    config = Buffer.get_dispatch_config(8)
    across = [config.get_rdma_buffer_size_hint(HIDDEN * 2, n) for n in (16, 32)]
    assert all(b > 0 and b % 128 == 0 for b in across) and across[0] < across[1]  # grows with the nodes
    assert isinstance(Buffer.capture(), EventOverlap)
    small = Buffer.get_low_latency_rdma_size_hint(8, 1024, 2, 8)
    large = Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert isinstance(small, int) and 0 < small < large


def test_set_num_sms_rejects_odd():
    from moe_ep.comm import Buffer

    with pytest.raises(ValueError, match=r"num_sms|SMs|sms"):
        Buffer.set_num_sms(23)
    Buffer.set_num_sms(20)  # the default; even values are accepted


def _w_buffer_management(ctx):
    from moe_ep.comm import Buffer

    buffer = Buffer(ctx.group, num_nvl_bytes=NUM_NVL_BYTES, explicitly_destroy=True)
    assert isinstance(buffer.is_sm90_compiled(), bool)
    local = buffer.get_local_buffer_tensor(torch.bfloat16, size=torch.Size([4, 8]))
    assert isinstance(local, torch.Tensor) and local.dtype == torch.bfloat16 and tuple(local.shape) == (4, 8)
    buffer.destroy()
    # The receive pool (a moe_ep keyword): recorded, and a bad size names the argument.
    pooled = Buffer(ctx.group, num_nvl_bytes=NUM_NVL_BYTES, recv_pool_bytes=1 << 20)
    assert pooled.recv_pool_bytes == 1 << 20
    for bad in (-1, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="recv_pool_bytes"):
            Buffer(ctx.group, num_nvl_bytes=NUM_NVL_BYTES, recv_pool_bytes=bad)


def test_buffer_management(dist_pool):
    dist_pool(2).run(_w_buffer_management)


def _w_buffer_kinds_disagree(ctx, what):
    """Opening the buffers is collective, so the ranks must ask for the same kinds: the last rank
    asks otherwise, and every rank raises ValueError naming the setting and each rank's value
    (instead of the others waiting in the open); a Buffer with agreeing settings then builds."""
    import re

    from moe_ep.comm import Buffer

    odd = ctx.rank == ctx.world_size - 1
    kwargs = {"low_latency_mode": dict(num_rdma_bytes=1 << 20, low_latency_mode=not odd),
              "num_nvl_bytes": dict(num_nvl_bytes=0 if odd else NUM_NVL_BYTES)}[what]
    name = "low_latency_mode" if what == "low_latency_mode" else "num_nvl_bytes > 0"
    values = [1] * (ctx.world_size - 1) + [0]
    with pytest.raises(ValueError, match=re.escape(f"{name} by rank: {values}")):
        Buffer(ctx.group, **kwargs)
    Buffer(ctx.group, num_nvl_bytes=NUM_NVL_BYTES)


@pytest.mark.parametrize("what", ["low_latency_mode", "num_nvl_bytes"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_buffer_kinds_must_agree(dist_pool, world_size, what):
    dist_pool(world_size).run(_w_buffer_kinds_disagree, what)


# ---------------------------------------------------------------------------------------------
# Validation. Every rank passes the same bad input, so every rank raises before communicating.
# ---------------------------------------------------------------------------------------------

def _normal_buffer(ctx):
    from moe_ep.comm import Buffer

    return Buffer(ctx.group, num_nvl_bytes=NUM_NVL_BYTES)


def _ll_buffer(ctx, num_max_tokens=MAX_TOKENS, hidden=HIDDEN, num_experts=None, num_rdma_bytes=None):
    from moe_ep.comm import Buffer

    num_experts = num_experts or LOCAL_EXPERTS * ctx.world_size
    if num_rdma_bytes is None:
        num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_max_tokens, hidden, ctx.world_size, num_experts)
    return Buffer(ctx.group, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True)


def _inputs(ctx, seed, tokens=10, hidden=HIDDEN):
    world = oracle.make_world(seed, ctx.world_size, tokens, hidden, NUM_TOPK, LOCAL_EXPERTS * ctx.world_size)
    x = world.xs[ctx.rank].to(ctx.device, copy=True)
    return (world, x, world.topk_idx[ctx.rank].to(ctx.device, copy=True),
            world.topk_weights[ctx.rank].to(ctx.device, copy=True))


def _layout_kwargs(buffer, topk_idx, topk_weights, num_experts):
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)


def _with_entry(topk_idx, expert):
    bad = topk_idx.clone()
    bad[bad.shape[0] // 2, 1] = expert
    return bad


def _other_device(ctx):
    return torch.device("cpu") if ctx.device.type == "cuda" else torch.device("meta")


def _w_normal_validation(ctx, seed, case):
    world, x, topk_idx, topk_weights = _inputs(ctx, seed)
    num_experts = world.num_experts
    buffer = _normal_buffer(ctx)
    bad = (ValueError, TypeError)
    if case == "x_dtype":
        with pytest.raises(bad, match=X_NAME):
            buffer.dispatch(x.to(torch.int32), **_layout_kwargs(buffer, topk_idx, topk_weights, num_experts))
    elif case == "x_device":
        with pytest.raises(bad, match=X_NAME + "|device"):
            buffer.dispatch(x.to(_other_device(ctx)), **_layout_kwargs(buffer, topk_idx, topk_weights, num_experts))
    elif case == "topk_idx_dtype":
        with pytest.raises(bad, match=TOPK_NAME):
            buffer.get_dispatch_layout(topk_idx.to(torch.int32), num_experts)
    elif case == "topk_idx_shape":
        with pytest.raises(bad, match=TOPK_NAME):
            buffer.get_dispatch_layout(topk_idx.flatten(), num_experts)
    elif case == "tokens_mismatch":
        # The layout matches x; only topk_idx / topk_weights have one token more.
        kwargs = _layout_kwargs(buffer, topk_idx[:-1], topk_weights[:-1], num_experts)
        kwargs.update(topk_idx=topk_idx, topk_weights=topk_weights)
        with pytest.raises(bad, match=X_NAME + "|" + TOPK_NAME):
            buffer.dispatch(x[:-1], **kwargs)
    elif case in ("expert_id_too_large", "expert_id_below_minus_one"):
        wrong = _with_entry(topk_idx, num_experts if case == "expert_id_too_large" else -2)
        # Where the layout kernel runs, it checks the ids itself and traps with a line naming the
        # entry (tests/test_cuda_layout.py runs that in a child process): the host raises there.
        if not _kernel_checks_topk(buffer.backend, "get_dispatch_layout", wrong, num_experts):
            with pytest.raises(bad, match=EXPERT_ID):
                buffer.get_dispatch_layout(wrong, num_experts)
        # dispatch raises on every backend: the Buffer reads the ids, or the kernels' engine does
        # after its host wait.
        kwargs = _layout_kwargs(buffer, topk_idx, topk_weights, num_experts)
        kwargs["topk_idx"] = wrong
        with pytest.raises(bad, match=EXPERT_ID):
            buffer.dispatch(x, **kwargs)
    elif case == "num_experts_not_divisible":
        with pytest.raises(bad, match="num_experts"):
            buffer.get_dispatch_layout(topk_idx, num_experts + 1)
    elif case == "fp8_hidden":
        x_fp8 = torch.ones(x.shape[0], 200, device=ctx.device).to(torch.float8_e4m3fn)
        scales = torch.ones(x.shape[0], 2, device=ctx.device)
        with pytest.raises(bad, match=FP8_HIDDEN):
            buffer.dispatch((x_fp8, scales), **_layout_kwargs(buffer, topk_idx, topk_weights, num_experts))
    elif case == "num_worst_tokens_too_small":
        # With 10 tokens per rank and 4 of 3R experts each, every rank receives far more than 1 token.
        with pytest.raises(bad, match="num_worst_tokens"):
            buffer.dispatch(x, num_worst_tokens=1, **_layout_kwargs(buffer, topk_idx, topk_weights, num_experts))
    elif case == "num_worst_tokens_differ":
        # It sizes the exchanged blocks, so ranks must agree; a mismatch raises instead of wedging.
        with pytest.raises(bad, match="num_worst_tokens must be the same on every rank"):
            buffer.dispatch(x, num_worst_tokens=1000 + ctx.rank,
                            **_layout_kwargs(buffer, topk_idx, topk_weights, num_experts))
    else:
        raise AssertionError(f"unknown case {case}")


NORMAL_CASES = ["x_dtype", "x_device", "topk_idx_dtype", "topk_idx_shape", "tokens_mismatch", "expert_id_too_large",
                "expert_id_below_minus_one", "num_experts_not_divisible", "fp8_hidden", "num_worst_tokens_too_small",
                "num_worst_tokens_differ"]


# Checks of device values that a CUDA group makes without host synchronization (a device-side
# assert, which poisons the CUDA context) instead of raising: exercised on CPU groups only.
SYNC_FREE_ON_CUDA = {"num_worst_tokens_too_small", "ll:expert_id_too_large", "ll:expert_id_below_minus_one"}


def _skip_if_sync_free(dist_backend, case):
    if dist_backend == "nccl" and case in SYNC_FREE_ON_CUDA:
        pytest.skip(f"{case}: CUDA groups check this with a device assert (no host sync), not an exception")


@pytest.mark.parametrize("case", NORMAL_CASES)
def test_normal_validation(dist_pool, dist_backend, case, seed):
    _skip_if_sync_free(dist_backend, case)
    dist_pool(2).run(_w_normal_validation, seed, case)


def _w_ll_validation(ctx, seed, case):
    from moe_ep.comm import Buffer

    world, x, topk_idx, topk_weights = _inputs(ctx, seed, tokens=MAX_TOKENS)
    num_experts = world.num_experts
    bad = (ValueError, TypeError)
    if case == "rdma_bytes_too_small":
        hint = Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, ctx.world_size, num_experts)
        buffer = _ll_buffer(ctx, num_rdma_bytes=hint // 2)
        with pytest.raises(bad, match=re.escape(str(hint))):
            buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts)
        return
    if case == "fp8_hidden":
        buffer = _ll_buffer(ctx, hidden=200)
        x200 = torch.ones(x.shape[0], 200, dtype=torch.bfloat16, device=ctx.device)
        with pytest.raises(bad, match=FP8_HIDDEN):
            buffer.low_latency_dispatch(x200, topk_idx, MAX_TOKENS, num_experts, use_fp8=True)
        return
    buffer = _ll_buffer(ctx)
    if case == "x_dtype":
        with pytest.raises(bad, match=X_NAME):
            buffer.low_latency_dispatch(x.to(torch.int32), topk_idx, MAX_TOKENS, num_experts)
    elif case == "x_device":
        with pytest.raises(bad, match=X_NAME + "|device"):
            buffer.low_latency_dispatch(x.to(_other_device(ctx)), topk_idx, MAX_TOKENS, num_experts)
    elif case == "topk_idx_dtype":
        with pytest.raises(bad, match=TOPK_NAME):
            buffer.low_latency_dispatch(x, topk_idx.to(torch.int32), MAX_TOKENS, num_experts)
    elif case == "topk_idx_shape":
        with pytest.raises(bad, match=TOPK_NAME):
            buffer.low_latency_dispatch(x, topk_idx.flatten(), MAX_TOKENS, num_experts)
    elif case == "tokens_mismatch":
        with pytest.raises(bad, match=X_NAME + "|" + TOPK_NAME):
            buffer.low_latency_dispatch(x[:-1], topk_idx, MAX_TOKENS, num_experts)
    elif case == "expert_id_too_large":
        with pytest.raises(bad, match=EXPERT_ID):
            buffer.low_latency_dispatch(x, _with_entry(topk_idx, num_experts + 3), MAX_TOKENS, num_experts)
    elif case == "expert_id_below_minus_one":
        with pytest.raises(bad, match=EXPERT_ID):
            buffer.low_latency_dispatch(x, _with_entry(topk_idx, -5), MAX_TOKENS, num_experts)
    elif case == "num_experts_not_divisible":
        with pytest.raises(bad, match="num_experts"):
            buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts + 1)
    elif case == "too_many_tokens":
        extra = oracle.make_tokens(torch.Generator().manual_seed(seed), 1, HIDDEN).to(ctx.device)
        with pytest.raises(bad, match="num_max_dispatch_tokens_per_rank"):
            buffer.low_latency_dispatch(torch.cat([x, extra]), torch.cat([topk_idx, topk_idx[:1]]),
                                        MAX_TOKENS, num_experts)
    elif case == "ue8m0_without_round_scale":
        with pytest.raises(ValueError, match="round_scale|ue8m0"):
            buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=True, use_ue8m0=True,
                                        round_scale=False)
    elif case == "use_logfmt":
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts,
                                                                      use_fp8=False)
        with pytest.raises((ValueError, NotImplementedError), match="logfmt"):
            buffer.low_latency_combine(recv_x, topk_idx, topk_weights, handle, use_logfmt=True)
    else:
        raise AssertionError(f"unknown case {case}")


LL_CASES = ["rdma_bytes_too_small", "fp8_hidden", "x_dtype", "x_device", "topk_idx_dtype", "topk_idx_shape",
            "tokens_mismatch", "expert_id_too_large", "expert_id_below_minus_one", "num_experts_not_divisible",
            "too_many_tokens", "ue8m0_without_round_scale", "use_logfmt"]


@pytest.mark.parametrize("case", LL_CASES)
def test_low_latency_validation(dist_pool, dist_backend, case, seed):
    _skip_if_sync_free(dist_backend, "ll:" + case)
    dist_pool(2).run(_w_ll_validation, seed, case)


def _w_num_experts_divisibility_3_ranks(ctx, seed):
    _, x, topk_idx, _ = _inputs(ctx, seed)
    buffer = _normal_buffer(ctx)
    with pytest.raises((ValueError, TypeError), match="num_experts"):
        buffer.get_dispatch_layout(topk_idx, 10)  # 10 experts over 3 ranks


def test_num_experts_not_divisible_by_3_ranks(dist_pool, seed):
    dist_pool(3).run(_w_num_experts_divisibility_3_ranks, seed)


def test_flatten_finds_every_tensor_and_skips_int_lists():
    from moe_ep.comm.buffer import _flatten

    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    nested = (a, None, [b, (c, 7)], [1, 2, 3], "x", ())
    found = _flatten(nested)
    assert len(found) == 3 and {id(t) for t in found} == {id(a), id(b), id(c)}
    assert _flatten(a) == [a] and _flatten(None) == [] and _flatten([4, 5]) == []
