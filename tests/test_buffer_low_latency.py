"""Low-latency (decode) kernels of moe_ep.comm.Buffer: low_latency_dispatch / low_latency_combine.

Received rows are checked order-independently: for each local expert, the multiset of
(source rank, source token) pairs read through the handle (layout_range gives each source's rows,
src_info the token) must equal the oracle's, and every row must hold its source token's data.
Combine is checked by letting each expert be a known function of its input (oracle.toy_expert).
"""
from __future__ import annotations

import re

import pytest
import torch

from tests import oracle
from tests.conftest import skip_where_kernels_trap

HIDDEN = 256
UE8M0_HIDDEN = 512  # packed UE8M0 scales need hidden a multiple of 512
NUM_TOPK = 4
LOCAL_EXPERTS = 3
MAX_TOKENS = 8  # num_max_dispatch_tokens_per_rank

LL_ROUTING = {"drop_prob": 0.15, "duplicate_prob": 0.25, "all_dropped_token": True}


def _on(ctx, x):
    """A copy on the rank's device (never an alias of the oracle's tensors, even on CPU)."""
    if isinstance(x, tuple):
        return tuple(part.to(ctx.device, copy=True) for part in x)
    return x.to(ctx.device, copy=True)


def _ll_buffer(ctx, num_max_tokens, hidden, num_experts, **kwargs):
    from moe_ep.comm import Buffer

    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_max_tokens, hidden, ctx.world_size, num_experts)
    return Buffer(ctx.group, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                  num_qps_per_rank=max(1, num_experts // ctx.world_size), **kwargs)


def _world(ctx, seed, tokens, hidden=HIDDEN, routing=None):
    return oracle.make_world(seed, ctx.world_size, tokens, hidden, NUM_TOPK, LOCAL_EXPERTS * ctx.world_size,
                             **(LL_ROUTING if routing is None else routing))


def _ll_dispatch(ctx, buffer, world, num_max_tokens, **kwargs):
    x, topk_idx = _on(ctx, world.xs[ctx.rank]), _on(ctx, world.topk_idx[ctx.rank])
    result = buffer.low_latency_dispatch(x, topk_idx, num_max_tokens, world.num_experts, **kwargs)
    oracle.assert_same((x, topk_idx), (world.xs[ctx.rank], world.topk_idx[ctx.rank]),
                       "low_latency_dispatch inputs after the call (must be left unchanged)")
    assert isinstance(result, tuple) and len(result) == 5, "low_latency_dispatch must return a 5-tuple"
    recv_x, recv_count, handle, event, hook = result
    if kwargs.get("return_recv_hook"):
        assert callable(hook), f"return_recv_hook=True must return a callable hook, got {hook!r}"
        hook()
    return recv_x, recv_count, handle


def _expected_combine(ctx, world, use_fp8, round_scale=False, masked_ranks=()):
    r = ctx.rank
    return oracle.ll_combine(world.xs[r], world.topk_idx[r], world.topk_weights[r], world.num_experts,
                             ctx.world_size, use_fp8, round_scale, masked_ranks)


def _ll_combine(ctx, buffer, world, recv_x, recv_count, handle, use_fp8, use_ue8m0=False, mode="plain",
                return_recv_hook=False):
    """Run toy experts on the received rows and combine them back; returns combined_x."""
    from moe_ep.comm.event import EventOverlap

    outputs = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), ctx.rank, world.num_local_experts, use_fp8, use_ue8m0)
    topk_idx, topk_weights = _on(ctx, world.topk_idx[ctx.rank]), _on(ctx, world.topk_weights[ctx.rank])
    kwargs = {"return_recv_hook": return_recv_hook}
    x = _on(ctx, outputs)
    out = None
    if mode == "zero_copy":
        x = buffer.get_next_low_latency_combine_buffer(handle)
        assert x.dtype == torch.bfloat16 and tuple(x.shape) == tuple(outputs.shape), \
            f"get_next_low_latency_combine_buffer: {x.dtype} {tuple(x.shape)}, expected bf16 {tuple(outputs.shape)}"
        x.copy_(_on(ctx, outputs))
        kwargs["zero_copy"] = True
    elif mode == "out":
        out = torch.full((world.xs[ctx.rank].shape[0], world.hidden), float("nan"), dtype=torch.bfloat16,
                         device=ctx.device)
        kwargs["out"] = out
    result = buffer.low_latency_combine(x, topk_idx, topk_weights, handle, **kwargs)
    assert isinstance(result, tuple) and len(result) == 3, "low_latency_combine must return a 3-tuple"
    combined, event, hook = result
    assert isinstance(event, EventOverlap), f"event must be an EventOverlap, got {type(event).__name__}"
    if return_recv_hook:
        assert callable(hook), f"return_recv_hook=True must return a callable hook, got {hook!r}"
        hook()
    if out is not None:
        assert combined.data_ptr() == out.data_ptr() and combined.shape == out.shape, "out= must receive the result"
        combined = out
    return combined


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

def _w_dispatch(ctx, seed, tokens, hidden, use_fp8, round_scale=False, use_ue8m0=False, hook=False, routing=None,
                num_max_tokens=MAX_TOKENS):
    world = _world(ctx, seed, tokens, hidden, routing)
    buffer = _ll_buffer(ctx, num_max_tokens, hidden, world.num_experts)
    recv_x, recv_count, handle = _ll_dispatch(ctx, buffer, world, num_max_tokens, use_fp8=use_fp8,
                                              round_scale=round_scale, use_ue8m0=use_ue8m0, return_recv_hook=hook)
    oracle.check_ll_recv(ctx.rank, world, num_max_tokens, recv_x, recv_count, handle, use_fp8, round_scale, use_ue8m0)
    return [int(c) for c in recv_count.cpu()]


def _w_dispatch_combine(ctx, seed, tokens, hidden, use_fp8, round_scale=False, use_ue8m0=False, mode="plain",
                        dispatch_hook=False, combine_hook=False, routing=None, num_max_tokens=MAX_TOKENS):
    world = _world(ctx, seed, tokens, hidden, routing)
    buffer = _ll_buffer(ctx, num_max_tokens, hidden, world.num_experts)
    recv_x, recv_count, handle = _ll_dispatch(ctx, buffer, world, num_max_tokens, use_fp8=use_fp8,
                                              round_scale=round_scale, use_ue8m0=use_ue8m0,
                                              return_recv_hook=dispatch_hook)
    oracle.check_ll_recv(ctx.rank, world, num_max_tokens, recv_x, recv_count, handle, use_fp8, round_scale, use_ue8m0)
    combined = _ll_combine(ctx, buffer, world, recv_x, recv_count, handle, use_fp8, use_ue8m0, mode, combine_hook)
    oracle.assert_close(combined, _expected_combine(ctx, world, use_fp8, round_scale), "combined_x")


def _w_hidden_sizes(ctx, seed, hidden_sizes):
    for i, hidden in enumerate(hidden_sizes):
        _w_dispatch_combine(ctx, seed + i, [4, 3], hidden, use_fp8=True, num_max_tokens=4)
        _w_dispatch_combine(ctx, seed + 100 + i, [2, 4], hidden, use_fp8=False, num_max_tokens=4)


def _w_double_buffering(ctx, seed, use_fp8):
    """Two dispatches in flight (two micro-batches): both results stay intact, both combine."""
    first = _world(ctx, seed, [MAX_TOKENS, 5, 7, 2][:ctx.world_size])
    second = _world(ctx, seed + 1, [3, MAX_TOKENS, 1, 6][:ctx.world_size])
    buffer = _ll_buffer(ctx, MAX_TOKENS, HIDDEN, first.num_experts)
    a = _ll_dispatch(ctx, buffer, first, MAX_TOKENS, use_fp8=use_fp8)
    b = _ll_dispatch(ctx, buffer, second, MAX_TOKENS, use_fp8=use_fp8)
    oracle.check_ll_recv(ctx.rank, first, MAX_TOKENS, *a, use_fp8)
    oracle.check_ll_recv(ctx.rank, second, MAX_TOKENS, *b, use_fp8)
    combined_a = _ll_combine(ctx, buffer, first, *a, use_fp8)
    combined_b = _ll_combine(ctx, buffer, second, *b, use_fp8)
    oracle.assert_close(combined_a, _expected_combine(ctx, first, use_fp8), "combined_x of the first micro-batch")
    oracle.assert_close(combined_b, _expected_combine(ctx, second, use_fp8), "combined_x of the second micro-batch")


def _w_hook_misuse(ctx, seed):
    """Receive hooks used out of order raise before anything is sent (moe_ep/comm/hooks.py), on
    every rank alike, and the Buffer stays usable: a third dispatch or combine while the hook two
    calls back has not run, a combine of a dispatch not yet received, a hook called twice."""
    world = _world(ctx, seed, [MAX_TOKENS, 5, 7, 2][:ctx.world_size])
    buffer = _ll_buffer(ctx, MAX_TOKENS, HIDDEN, world.num_experts)
    x, topk_idx = _on(ctx, world.xs[ctx.rank]), _on(ctx, world.topk_idx[ctx.rank])
    topk_weights = _on(ctx, world.topk_weights[ctx.rank])

    def dispatch(hook):
        return buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, world.num_experts, use_fp8=False,
                                           return_recv_hook=hook)

    first, second = dispatch(True), dispatch(True)
    with pytest.raises(RuntimeError, match="two calls back was never called"):
        dispatch(False)
    expert_out = torch.randn(second[0].shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="has not received its rows"):
        buffer.low_latency_combine(_on(ctx, expert_out), topk_idx, topk_weights, second[2])
    first[4]()
    second[4]()
    with pytest.raises(RuntimeError, match="already ran"):
        first[4]()
    recv_x, recv_count, handle, _, _ = dispatch(False)  # the buffer of `first`, whose hook has run now
    oracle.check_ll_recv(ctx.rank, world, MAX_TOKENS, recv_x, recv_count, handle, False)

    outputs = _on(ctx, oracle.ll_expert_outputs(recv_x, recv_count.cpu(), ctx.rank, world.num_local_experts, False,
                                                False))
    hooks = [buffer.low_latency_combine(outputs, topk_idx, topk_weights, handle, return_recv_hook=True)[2]
             for _ in range(2)]
    with pytest.raises(RuntimeError, match="two calls back was never called"):
        buffer.low_latency_combine(outputs, topk_idx, topk_weights, handle)
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, world.num_experts)  # drops both pending hooks
    recv_x, recv_count, handle = _ll_dispatch(ctx, buffer, world, MAX_TOKENS, use_fp8=False)
    combined = _ll_combine(ctx, buffer, world, recv_x, recv_count, handle, False)
    oracle.assert_close(combined, _expected_combine(ctx, world, False), "combined_x after the dropped hooks")
    assert len(hooks) == 2


LATE_S = 1.0  # how late the last rank starts one of the calls in the wait-statistics test


def _w_wait_stats(ctx, seed, hook, late_call, row_only=False):
    """``*_wait_recv_cost_stats`` [R, R] int64: each call adds its own receive's wait for the data
    (ns) to row ``rank`` (the reference: every column alike; the kernels: per source, the wait
    for that source's data), other rows untouched (``row_only``: the [R] tensor of
    this rank's row is passed, the shape DeepEP's kernels take). The last rank starts
    ``late_call`` LATE_S late, so rank 0 waits about that long in that call's receive and briefly
    in the other's: a wait must land in its own call's statistics (the combine once added the
    dispatch's). Bounds of LATE_S / 2 either side leave a wide margin."""
    import time

    world = _world(ctx, seed, [MAX_TOKENS, 5, 7][:ctx.world_size])
    buffer = _ll_buffer(ctx, MAX_TOKENS, HIDDEN, world.num_experts)
    x, topk_idx = _on(ctx, world.xs[ctx.rank]), _on(ctx, world.topk_idx[ctx.rank])
    topk_weights = _on(ctx, world.topk_weights[ctx.rank])
    base = torch.arange(ctx.world_size ** 2, dtype=torch.int64, device=ctx.device).view(ctx.world_size,
                                                                                        ctx.world_size) * 7
    stats = {"dispatch": base.clone(), "combine": base.clone()}
    if ctx.device.type == "cuda" and not buffer.backend.low_latency.WAIT_STATS_ON_GPU:
        # The reference backend on GPUs (low-latency kernels off) would need a host sync to time waits.
        with pytest.raises(ValueError, match="dispatch_wait_recv_cost_stats: the reference backend times waits"):
            buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, world.num_experts, use_fp8=False,
                                        dispatch_wait_recv_cost_stats=stats["dispatch"])
        return

    last = ctx.world_size - 1

    def start(call):
        torch.distributed.barrier(group=ctx.group)
        if call == late_call and ctx.rank == last:
            time.sleep(LATE_S)

    start("dispatch")
    recv_x, recv_count, handle, _, dispatch_hook = buffer.low_latency_dispatch(
        x, topk_idx, MAX_TOKENS, world.num_experts, use_fp8=False, return_recv_hook=hook,
        dispatch_wait_recv_cost_stats=stats["dispatch"][ctx.rank] if row_only else stats["dispatch"])
    if hook:
        assert torch.equal(stats["dispatch"], base), "a hook's wait is added when the hook runs, not before"
        dispatch_hook()
    outputs = _on(ctx, oracle.ll_expert_outputs(recv_x, recv_count.cpu(), ctx.rank, world.num_local_experts, False,
                                                False))
    start("combine")
    _, _, combine_hook = buffer.low_latency_combine(outputs, topk_idx, topk_weights, handle, return_recv_hook=hook,
                                                    combine_wait_recv_cost_stats=stats["combine"][ctx.rank] if row_only
                                                    else stats["combine"])
    if hook:
        combine_hook()
    for call, after in stats.items():
        delta = after - base
        others = torch.cat([delta[:ctx.rank], delta[ctx.rank + 1:]])
        assert not others.any(), f"{call}: rows other than rank {ctx.rank} changed: {delta.tolist()}"
        row = delta[ctx.rank].cpu()
        assert (row >= 0).all(), f"{call}: row {ctx.rank} got {row.tolist()}"
        if ctx.device.type == "cpu":  # the reference times the whole receive: one figure for every source
            assert (row == row[0]).all(), f"{call}: row {ctx.rank} got {row.tolist()}"
        if ctx.rank == 0:  # the kernels time each source's data: the late rank's column holds the wait
            waited = int(row[last]) / 1e9
            if call == late_call:
                assert waited >= LATE_S / 2, f"{call}: rank 0 waited {waited:.3f} s for a rank {LATE_S} s late"
            assert int(row.max()) / 1e9 < LATE_S / 2 or call == late_call, \
                f"{call}: rank 0 waited {int(row.max()) / 1e9:.3f} s, nobody was late"
    r, on = ctx.world_size, {"device": ctx.device}
    for bad, message in ((torch.zeros(r, r + 1, dtype=torch.int64, **on), "must have shape"),
                         (torch.zeros(r + 1, dtype=torch.int64, **on), "must have shape"),
                         (torch.zeros(r, r, 1, dtype=torch.int64, **on), "must have shape"),
                         (torch.zeros(r, 2 * r, dtype=torch.int64, **on)[:, ::2], "contiguous"),
                         (torch.zeros(r, r, dtype=torch.int32, **on), "int64")):
        with pytest.raises((ValueError, TypeError), match=message):
            buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, world.num_experts, dispatch_wait_recv_cost_stats=bad)
        with pytest.raises((ValueError, TypeError), match=message):
            buffer.low_latency_combine(outputs, topk_idx, topk_weights, handle, combine_wait_recv_cost_stats=bad)


def _w_cumulative_stats(ctx, seed):
    world = _world(ctx, seed, [6, MAX_TOKENS, 3][:ctx.world_size])
    buffer = _ll_buffer(ctx, MAX_TOKENS, HIDDEN, world.num_experts)
    gen = torch.Generator().manual_seed(seed + ctx.rank)
    initial = torch.randint(1, 100, (world.num_local_experts,), generator=gen, dtype=torch.int32)
    stats = initial.clone().to(ctx.device)  # .to(cpu) alone would alias `initial`
    for _ in range(2):
        _, recv_count, _ = _ll_dispatch(ctx, buffer, world, MAX_TOKENS, use_fp8=True,
                                        cumulative_local_expert_recv_stats=stats)
    expected_counts = torch.tensor([sum(p.values()) for p in oracle.ll_expected_pairs(
        ctx.rank, world.topk_idx, world.num_experts)], dtype=torch.int32)
    oracle.assert_same(recv_count, expected_counts, "recv_count")
    oracle.assert_same(stats, initial + 2 * expected_counts, "cumulative_local_expert_recv_stats after two dispatches")


def _w_mask(ctx, seed, masked_rank):
    world = _world(ctx, seed, [MAX_TOKENS, 6, 7, 5][:ctx.world_size])
    buffer = _ll_buffer(ctx, MAX_TOKENS, HIDDEN, world.num_experts, enable_shrink=True)
    status = torch.full((ctx.world_size,), 5, dtype=torch.int32, device=ctx.device)
    buffer.low_latency_query_mask_buffer(status)
    oracle.assert_same(status, torch.zeros(ctx.world_size, dtype=torch.int32), "mask status before any update")

    buffer.low_latency_update_mask_buffer(masked_rank, True)
    status.fill_(5)
    buffer.low_latency_query_mask_buffer(status)
    one_hot = torch.zeros(ctx.world_size, dtype=torch.int32)
    one_hot[masked_rank] = 1
    oracle.assert_same(status, one_hot, f"mask status after masking rank {masked_rank}")

    recv_x, recv_count, handle = _ll_dispatch(ctx, buffer, world, MAX_TOKENS, use_fp8=False)
    if ctx.rank != masked_rank:
        oracle.check_ll_recv(ctx.rank, world, MAX_TOKENS, recv_x, recv_count, handle, False,
                             masked_ranks=(masked_rank,))
    combined = _ll_combine(ctx, buffer, world, recv_x, recv_count, handle, False)
    if ctx.rank != masked_rank:
        oracle.assert_close(combined, _expected_combine(ctx, world, False, masked_ranks=(masked_rank,)),
                            f"combined_x with rank {masked_rank} masked")

    buffer.low_latency_clean_mask_buffer()
    status.fill_(5)
    buffer.low_latency_query_mask_buffer(status)
    oracle.assert_same(status, torch.zeros(ctx.world_size, dtype=torch.int32), "mask status after clean")
    recv_x, recv_count, handle = _ll_dispatch(ctx, buffer, world, MAX_TOKENS, use_fp8=False)
    oracle.check_ll_recv(ctx.rank, world, MAX_TOKENS, recv_x, recv_count, handle, False)
    combined = _ll_combine(ctx, buffer, world, recv_x, recv_count, handle, False)
    oracle.assert_close(combined, _expected_combine(ctx, world, False), "combined_x after cleaning the mask")


def _w_normal_then_low_latency(ctx, seed):
    """One Buffer used by the normal kernels, then (after clean_low_latency_buffer) low latency."""
    from moe_ep.comm import Buffer

    world = _world(ctx, seed, [MAX_TOKENS, 5, 7][:ctx.world_size])
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, ctx.world_size, world.num_experts)
    buffer = Buffer(ctx.group, num_nvl_bytes=1 << 22, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True)
    x, topk_idx = _on(ctx, world.xs[ctx.rank]), _on(ctx, world.topk_idx[ctx.rank])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, world.num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                 topk_weights=_on(ctx, world.topk_weights[ctx.rank]))
    expected = oracle.dispatch(ctx.rank, world.xs, world.topk_idx, world.topk_weights, world.num_experts)
    oracle.assert_same(recv_x, expected.recv_x, "recv_x of the normal dispatch")
    buffer.combine(recv_x, handle)
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, world.num_experts)
    recv_x, recv_count, handle = _ll_dispatch(ctx, buffer, world, MAX_TOKENS, use_fp8=True)
    oracle.check_ll_recv(ctx.rank, world, MAX_TOKENS, recv_x, recv_count, handle, True)
    combined = _ll_combine(ctx, buffer, world, recv_x, recv_count, handle, True)
    oracle.assert_close(combined, _expected_combine(ctx, world, True), "combined_x")


def _w_mask_requires_shrink(ctx):
    buffer = _ll_buffer(ctx, MAX_TOKENS, HIDDEN, LOCAL_EXPERTS * ctx.world_size)
    with pytest.raises((ValueError, RuntimeError, AssertionError)):
        buffer.low_latency_update_mask_buffer(0, True)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ll_dispatch_bf16_fewer_tokens_than_max(dist_pool, world_size, seed):
    counts = dist_pool(world_size).run(_w_dispatch, seed, [5, 7, 1, 6][:world_size], HIDDEN, use_fp8=False)
    assert sum(map(sum, counts)) > 0


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ll_dispatch_fp8_full(dist_pool, world_size, seed):
    """T == num_max_dispatch_tokens_per_rank on every rank; duplicates and -1 entries included."""
    dist_pool(world_size).run(_w_dispatch, seed, MAX_TOKENS, HIDDEN, use_fp8=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ll_dispatch_fp8_round_scale(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch, seed, [MAX_TOKENS, 3, 6, 4][:world_size], HIDDEN, use_fp8=True,
                              round_scale=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ll_dispatch_fp8_ue8m0(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch, seed, [7, MAX_TOKENS, 2, 5][:world_size], UE8M0_HIDDEN, use_fp8=True,
                              round_scale=True, use_ue8m0=True)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_ll_dispatch_recv_hook(dist_pool, world_size, use_fp8, seed):
    dist_pool(world_size).run(_w_dispatch, seed, [6, MAX_TOKENS, 3][:world_size], HIDDEN, use_fp8=use_fp8, hook=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ll_dispatch_skewed_to_one_expert(dist_pool, world_size, seed):
    hot = LOCAL_EXPERTS * world_size - 2
    counts = dist_pool(world_size).run(_w_dispatch, seed, MAX_TOKENS, HIDDEN, use_fp8=True,
                                       routing={"routing": "skewed", "hot_expert": hot})
    assert counts[hot // LOCAL_EXPERTS][hot % LOCAL_EXPERTS] == MAX_TOKENS * world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_ll_rank_with_zero_tokens(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch_combine, seed, [0, MAX_TOKENS, 4][:world_size], HIDDEN, use_fp8=True)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_ll_combine(dist_pool, world_size, use_fp8, seed):
    dist_pool(world_size).run(_w_dispatch_combine, seed, [MAX_TOKENS, 5, 7, 3][:world_size], HIDDEN, use_fp8)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ll_combine_after_ue8m0_dispatch(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch_combine, seed, [4, MAX_TOKENS, 6, 1][:world_size], UE8M0_HIDDEN,
                              use_fp8=True, round_scale=True, use_ue8m0=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ll_combine_recv_hooks(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch_combine, seed, [5, MAX_TOKENS, 2, 7][:world_size], HIDDEN, use_fp8=True,
                              dispatch_hook=True, combine_hook=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ll_combine_into_poisoned_out(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch_combine, seed, [MAX_TOKENS, 4, 6, 5][:world_size], HIDDEN, use_fp8=False,
                              mode="out")


@pytest.mark.parametrize("world_size", [2, 4])
def test_ll_combine_zero_copy(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch_combine, seed, [3, MAX_TOKENS, 6, 7][:world_size], HIDDEN, use_fp8=True,
                              mode="zero_copy")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_ll_double_buffering(dist_pool, world_size, use_fp8, seed):
    dist_pool(world_size).run(_w_double_buffering, seed, use_fp8)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ll_hook_misuse_raises(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_hook_misuse, seed)


@pytest.mark.parametrize("late_call", ["dispatch", "combine"])
@pytest.mark.parametrize("hook", [False, True], ids=["plain", "hook"])
def test_ll_wait_recv_cost_stats(dist_pool, hook, late_call, seed):
    dist_pool(2).run(_w_wait_stats, seed, hook, late_call)


def test_ll_wait_recv_cost_stats_as_one_row(dist_pool, seed):
    dist_pool(2).run(_w_wait_stats, seed, True, "combine", row_only=True)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ll_cumulative_recv_stats(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_cumulative_stats, seed)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ll_after_normal_kernels_and_clean(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_normal_then_low_latency, seed)


def test_ll_mask_buffer(dist_pool, seed):
    dist_pool(4).run(_w_mask, seed, 2)


def test_ll_mask_requires_enable_shrink(dist_pool):
    dist_pool(2).run(_w_mask_requires_shrink)


def test_ll_hidden_sizes(dist_pool, seed):
    """FP8 and bf16 low-latency dispatch + combine at DeepSeek/Qwen-like hidden sizes."""
    dist_pool(2).run(_w_hidden_sizes, seed, [2048, 2560, 7168], timeout=240)


def _w_other_sizes(ctx, seed, what):
    """The last rank dispatches with another M or hidden: every rank raises ValueError naming the
    size and each rank's value (gloo would otherwise abort the process on the mismatched
    exchange), nothing is sent, and a call with agreeing sizes then works."""
    last = ctx.world_size - 1
    small = 7  # every rank's tokens fit: only the sizes differ
    world = _world(ctx, seed, [small] * ctx.world_size)
    buffer = _ll_buffer(ctx, MAX_TOKENS, HIDDEN, world.num_experts)
    x, topk_idx = _on(ctx, world.xs[ctx.rank]), _on(ctx, world.topk_idx[ctx.rank])
    m = MAX_TOKENS - (1 if what == "m" and ctx.rank == last else 0)
    if what == "hidden" and ctx.rank == last:
        x = x[:, :HIDDEN - 128].contiguous()
    values = [MAX_TOKENS] * last + [MAX_TOKENS - 1] if what == "m" else [HIDDEN] * last + [HIDDEN - 128]
    name = "num_max_dispatch_tokens_per_rank" if what == "m" else "hidden"
    with pytest.raises(ValueError, match=re.escape(f"{name} by rank: {values}")):
        buffer.low_latency_dispatch(x, topk_idx, m, world.num_experts, use_fp8=False)
    recv_x, recv_count, handle = _ll_dispatch(ctx, buffer, world, MAX_TOKENS, use_fp8=False)
    oracle.check_ll_recv(ctx.rank, world, MAX_TOKENS, recv_x, recv_count, handle, False, False, False)


@pytest.mark.parametrize("what", ["m", "hidden"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ll_ranks_with_other_sizes_raise(dist_pool, dist_backend, world_size, what, seed):
    skip_where_kernels_trap(dist_backend, "low_latency", "ll_dispatch",
                            "tests/test_cuda_low_latency.py::test_ranks_with_other_sizes_trap_with_a_message")
    dist_pool(world_size).run(_w_other_sizes, seed, what)
