"""Normal (throughput) kernels of moe_ep.comm.Buffer: layout, dispatch, cached dispatch, combine.

Each test runs a module-level worker on every rank of a pooled process group (tests/conftest.py).
Every rank builds the same random world from the test's seed, runs the collective on its slice,
and compares its own outputs with the independent oracle (tests/oracle.py).
"""
from __future__ import annotations

import pytest
import torch

from tests import oracle
from tests.conftest import skip_where_kernels_trap

NUM_NVL_BYTES = 1 << 22
HIDDEN = 256
NUM_TOPK = 4
LOCAL_EXPERTS = 3  # E = 3 R: not a power of two, divisible for 2, 3 and 4 ranks


def _on(ctx, x):
    """A copy on the rank's device (never an alias of the oracle's tensors, even on CPU)."""
    if isinstance(x, tuple):
        return tuple(part.to(ctx.device, copy=True) for part in x)
    return x.to(ctx.device, copy=True)


def _buffer(ctx, **kwargs):
    from moe_ep.comm import Buffer

    return Buffer(ctx.group, num_nvl_bytes=NUM_NVL_BYTES, **kwargs)


def _world(ctx, seed, tokens=24, hidden=HIDDEN, integer=False, num_topk=NUM_TOPK, **routing):
    return oracle.make_world(seed, ctx.world_size, tokens, hidden, num_topk, LOCAL_EXPERTS * ctx.world_size,
                             integer=integer, **routing)


def _layout(ctx, buffer, world):
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(_on(ctx, world.topk_idx[ctx.rank]), world.num_experts)
    assert num_tokens_per_rdma_rank is None, "num_tokens_per_rdma_rank must be None inside one node"
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


def _dispatch(ctx, buffer, world, x=None, **kwargs):
    """Layout + dispatch of this rank's slice of ``world`` (``x`` overrides the payload)."""
    num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank = _layout(ctx, buffer, world)
    payload = world.xs[ctx.rank] if x is None else x
    inputs = (_on(ctx, payload), _on(ctx, world.topk_idx[ctx.rank]), _on(ctx, world.topk_weights[ctx.rank]))
    result = buffer.dispatch(inputs[0], num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                             num_tokens_per_expert=num_tokens_per_expert, topk_idx=inputs[1], topk_weights=inputs[2],
                             **kwargs)
    oracle.assert_same(inputs, (payload, world.topk_idx[ctx.rank], world.topk_weights[ctx.rank]),
                       "dispatch inputs after the call (must be left unchanged)")
    return result


def _check_dispatch(ctx, result, expected: oracle.DispatchExpectation, num_worst_tokens=0):
    from moe_ep.comm.event import EventOverlap

    assert isinstance(result, tuple) and len(result) == 6, f"dispatch must return a 6-tuple, got {type(result).__name__}"
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = result
    n = expected.num_recv_tokens
    if num_worst_tokens:
        rows = num_worst_tokens
        got_x = tuple(part[:n] for part in recv_x) if isinstance(recv_x, tuple) else recv_x[:n]
        for i, part in enumerate(recv_x if isinstance(recv_x, tuple) else (recv_x,)):
            assert part.shape[0] == rows, f"recv_x part {i}: {part.shape[0]} rows, expected num_worst_tokens={rows}"
        assert recv_topk_idx.shape[0] == rows and recv_topk_weights.shape[0] == rows, \
            f"recv_topk_idx/weights rows {recv_topk_idx.shape[0]}/{recv_topk_weights.shape[0]}, expected {rows}"
        padding_idx = recv_topk_idx[n:].cpu()
        assert bool((padding_idx == -1).all()), f"padding rows of recv_topk_idx must be -1, got {padding_idx.unique().tolist()}"
        padding_w = recv_topk_weights[n:].cpu()
        assert bool((padding_w == 0).all()), "padding rows of recv_topk_weights must be 0"
        oracle.assert_same(got_x, expected.recv_x, "recv_x (real rows)")
        oracle.assert_same(recv_topk_idx[:n], expected.recv_topk_idx, "recv_topk_idx (real rows)")
        oracle.assert_same(recv_topk_weights[:n], expected.recv_topk_weights, "recv_topk_weights (real rows)")
        assert counts == [], f"num_recv_tokens_per_expert_list must be [] with num_worst_tokens, got {counts!r}"
    else:
        oracle.assert_same(recv_x, expected.recv_x, "recv_x")
        oracle.assert_same(recv_topk_idx, expected.recv_topk_idx, "recv_topk_idx")
        oracle.assert_same(recv_topk_weights, expected.recv_topk_weights, "recv_topk_weights")
        assert isinstance(counts, list) and all(type(c) is int for c in counts), \
            f"num_recv_tokens_per_expert_list must be a list of int, got {counts!r}"
        assert counts == expected.num_recv_tokens_per_expert_list, \
            f"num_recv_tokens_per_expert_list {counts}, expected {expected.num_recv_tokens_per_expert_list}"
    assert isinstance(handle, tuple), f"handle must be a tuple, got {type(handle).__name__}"
    oracle.assert_same(handle[0], expected.rank_prefix_matrix, "handle[0] (rank_prefix_matrix)")
    assert isinstance(event, EventOverlap), f"event must be an EventOverlap, got {type(event).__name__}"
    return recv_x, handle


def _round_trip_expected(ctx, world):
    """combine(recv_x) of a dispatch: x times the number of ranks the token went to (exact in
    float32 for ≤ 4 ranks, then one rounding to bf16); +0 for a token that went nowhere."""
    _, _, in_rank = oracle.dispatch_layout(world.topk_idx[ctx.rank], world.num_experts, ctx.world_size)
    fan_out = in_rank.sum(1, keepdim=True)
    x = world.xs[ctx.rank]
    return torch.where(fan_out > 0, (x.float() * fan_out.float()).to(torch.bfloat16), torch.zeros((), dtype=x.dtype))


def _expect(ctx, world, xs=None, expert_alignment=1):
    return oracle.dispatch(ctx.rank, world.xs if xs is None else xs, world.topk_idx, world.topk_weights,
                           world.num_experts, expert_alignment)


# ---------------------------------------------------------------------------------------------
# Workers (module level: they are pickled by reference into the rank processes)
# ---------------------------------------------------------------------------------------------

def _w_layout(ctx, seed, tokens, routing):
    from moe_ep.comm.event import EventOverlap

    world = _world(ctx, seed, tokens, **routing)
    buffer = _buffer(ctx)
    topk_idx = world.topk_idx[ctx.rank]
    result = buffer.get_dispatch_layout(_on(ctx, topk_idx), world.num_experts)
    assert isinstance(result, tuple) and len(result) == 5, "get_dispatch_layout must return a 5-tuple"
    per_rank, per_rdma_rank, per_expert, in_rank, event = result
    expected_rank, expected_expert, expected_in_rank = oracle.dispatch_layout(topk_idx, world.num_experts, ctx.world_size)
    oracle.assert_same(per_rank, expected_rank, "num_tokens_per_rank")
    assert per_rdma_rank is None, "num_tokens_per_rdma_rank must be None inside one node"
    oracle.assert_same(per_expert, expected_expert, "num_tokens_per_expert")
    oracle.assert_same(in_rank, expected_in_rank, "is_token_in_rank")
    assert isinstance(event, EventOverlap)


def _w_dispatch(ctx, seed, tokens, routing, fp8=False, expert_alignment=1, num_worst_tokens=0):
    world = _world(ctx, seed, tokens, **routing)
    xs = [oracle.quantize(x) for x in world.xs] if fp8 else world.xs
    buffer = _buffer(ctx)
    kwargs = {"expert_alignment": expert_alignment}
    if num_worst_tokens:
        kwargs["num_worst_tokens"] = num_worst_tokens
    result = _dispatch(ctx, buffer, world, x=xs[ctx.rank], **kwargs)
    _check_dispatch(ctx, result, _expect(ctx, world, xs, expert_alignment), num_worst_tokens)
    return _expect(ctx, world).num_recv_tokens


def _w_topk_round_trip(ctx, seed, tokens, num_topk):
    world = _world(ctx, seed, tokens, num_topk=num_topk, **SPARSE)
    buffer = _buffer(ctx)
    recv_x, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world), _expect(ctx, world))
    combined, _, _ = buffer.combine(recv_x, handle)
    oracle.assert_same(combined, _round_trip_expected(ctx, world), "combined_x of a round trip")


def _w_reuse(ctx, seed):
    """One Buffer, successive layers of different sizes and payload forms (as a model uses it)."""
    buffer = _buffer(ctx)
    for step, (tokens, hidden, fp8) in enumerate([(12, 256, False), (30, 128, True), (5, 384, False), (17, 256, True)]):
        world = _world(ctx, seed + step, tokens, hidden=hidden, **SPARSE)
        xs = [oracle.quantize(x) for x in world.xs] if fp8 else world.xs
        _check_dispatch(ctx, _dispatch(ctx, buffer, world, x=xs[ctx.rank]), _expect(ctx, world, xs))
        recv_x, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world), _expect(ctx, world))
        combined, _, _ = buffer.combine(recv_x, handle)
        oracle.assert_same(combined, _round_trip_expected(ctx, world), f"combined_x at step {step}")


def _w_float32(ctx, seed):
    world = _world(ctx, seed, 14, **SPARSE)
    xs = [x.float() for x in world.xs]
    buffer = _buffer(ctx)
    _check_dispatch(ctx, _dispatch(ctx, buffer, world, x=xs[ctx.rank]), _expect(ctx, world, xs))


def _w_num_recv(ctx, seed, tokens, routing):
    return _expect(ctx, _world(ctx, seed, tokens, **routing)).num_recv_tokens


def _w_cached_dispatch(ctx, seed, fp8):
    world = _world(ctx, seed, 20, drop_prob=0.2)
    second = oracle.make_world(seed + 1, ctx.world_size, 20, HIDDEN, NUM_TOPK, world.num_experts).xs
    first_xs = [oracle.quantize(x) for x in world.xs] if fp8 else world.xs
    second_xs = [oracle.quantize(x) for x in second] if fp8 else second
    buffer = _buffer(ctx)
    _, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world, x=first_xs[ctx.rank]), _expect(ctx, world, first_xs))
    result = buffer.dispatch(_on(ctx, second_xs[ctx.rank]), handle=handle)
    assert isinstance(result, tuple) and len(result) == 6, "cached dispatch must return a 6-tuple"
    assert all(item is None for item in result[1:5]), \
        f"cached dispatch returns (recv_x, None, None, None, None, event); got types {[type(i).__name__ for i in result]}"
    oracle.assert_same(result[0], _expect(ctx, world, second_xs).recv_x, "recv_x of cached dispatch")


def _w_round_trip(ctx, seed, tokens, routing):
    """combine(recv_x) = x · (number of ranks the token went to); exact for bf16 with ≤ 4 ranks."""
    world = _world(ctx, seed, tokens, **routing)
    buffer = _buffer(ctx)
    recv_x, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world), _expect(ctx, world))
    expected_weights = _expect(ctx, world).recv_topk_weights
    combined, combined_weights, _ = buffer.combine(recv_x, handle, topk_weights=_on(ctx, expected_weights))
    topk_idx = world.topk_idx[ctx.rank]
    oracle.assert_same(combined, _round_trip_expected(ctx, world), "combined_x of a round trip")
    # Each (t, k) weight lives on exactly one rank (its expert's), zeros elsewhere.
    expected_w = torch.where(topk_idx >= 0, world.topk_weights[ctx.rank], torch.zeros(()))
    oracle.assert_same(combined_weights, expected_w, "combined_topk_weights of a round trip")


def _w_combine(ctx, seed, tokens, routing, integer, bias_kind):
    """Each rank returns different rows (its received rows times rank + 1); sums match the oracle."""
    world = _world(ctx, seed, tokens, integer=integer, **routing)
    buffer = _buffer(ctx)
    recv_x, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world), _expect(ctx, world))
    expectations = [oracle.dispatch(r, world.xs, world.topk_idx, world.topk_weights, world.num_experts)
                    for r in range(ctx.world_size)]
    xs_back = [(e.recv_x.float() * (r + 1)).to(torch.bfloat16) for r, e in enumerate(expectations)]
    num_tokens = world.xs[ctx.rank].shape[0]
    gen = torch.Generator().manual_seed(seed + 7 + ctx.rank)
    bias = None
    if bias_kind == "one":
        bias = oracle.make_tokens(gen, num_tokens, world.hidden, integer=integer)
    elif bias_kind == "two":
        bias = (oracle.make_tokens(gen, num_tokens, world.hidden, integer=integer),
                oracle.make_tokens(gen, num_tokens, world.hidden, integer=integer))
    combined, combined_weights, _ = buffer.combine(_on(ctx, xs_back[ctx.rank]), handle,
                                                   bias=None if bias is None else _on(ctx, bias))
    assert combined_weights is None, "combined_topk_weights must be None without topk_weights"
    expected, _ = oracle.combine(ctx.rank, xs_back, [e.recv_src for e in expectations], num_tokens, world.hidden, bias)
    if integer:
        oracle.assert_same(combined, expected, "combined_x")
    else:
        oracle.assert_close(combined, expected, "combined_x")


def _w_hidden_sizes(ctx, seed, hidden_sizes):
    for i, hidden in enumerate(hidden_sizes):
        world = _world(ctx, seed + i, 10, hidden=hidden, drop_prob=0.1)
        buffer = _buffer(ctx)
        recv_x, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world), _expect(ctx, world))
        fp8_xs = [oracle.quantize(x) for x in world.xs]
        _check_dispatch(ctx, _dispatch(ctx, buffer, world, x=fp8_xs[ctx.rank]), _expect(ctx, world, fp8_xs))
        combined, _, _ = buffer.combine(recv_x, handle)
        oracle.assert_same(combined, _round_trip_expected(ctx, world), f"combined_x (hidden {hidden})")


def _w_async_previous_event(ctx, seed):
    from moe_ep.comm import Buffer
    from moe_ep.comm.event import EventOverlap

    world = _world(ctx, seed, 16)
    buffer = _buffer(ctx)
    dispatch_config, combine_config = Buffer.get_dispatch_config(ctx.world_size), Buffer.get_combine_config(ctx.world_size)
    previous = Buffer.capture()
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, event = buffer.get_dispatch_layout(
        _on(ctx, world.topk_idx[ctx.rank]), world.num_experts, previous_event=previous, async_finish=True)
    event.current_stream_wait()
    result = buffer.dispatch(_on(ctx, world.xs[ctx.rank]), num_tokens_per_rank=num_tokens_per_rank,
                             is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                             topk_idx=_on(ctx, world.topk_idx[ctx.rank]),
                             topk_weights=_on(ctx, world.topk_weights[ctx.rank]),
                             config=dispatch_config, previous_event=Buffer.capture(), async_finish=True)
    result[5].current_stream_wait()
    recv_x, handle = _check_dispatch(ctx, result, _expect(ctx, world))
    combined, _, event = buffer.combine(recv_x, handle, config=combine_config, previous_event=Buffer.capture(),
                                        async_finish=True)
    assert isinstance(event, EventOverlap)
    with event:
        pass
    oracle.assert_same(combined, _round_trip_expected(ctx, world), "combined_x")


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

RANDOM = {}
SPARSE = {"drop_prob": 0.3, "all_dropped_token": True}


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("routing", [RANDOM, SPARSE], ids=["random", "sparse"])
def test_dispatch_layout(dist_pool, world_size, routing, seed):
    dist_pool(world_size).run(_w_layout, seed, 24, routing)


def test_dispatch_layout_skewed_and_empty(dist_pool, seed):
    pool = dist_pool(4)
    pool.run(_w_layout, seed, [12, 0, 7, 30], {"routing": "skewed", "hot_expert": 11})


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_dispatch_bf16_random(dist_pool, world_size, seed):
    counts = dist_pool(world_size).run(_w_dispatch, seed, [24, 17, 31, 5][:world_size], RANDOM)
    assert sum(counts) > 0


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_dispatch_bf16_sparse(dist_pool, world_size, seed):
    """-1 entries sprinkled, and token 0 of every rank routed nowhere."""
    dist_pool(world_size).run(_w_dispatch, seed, 24, SPARSE)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_dispatch_fp8(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_dispatch, seed, [20, 33, 8, 15][:world_size], SPARSE, fp8=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_skewed_to_one_expert(dist_pool, world_size, seed):
    """Every token goes to the last expert: one rank receives everything, the others nothing."""
    hot = LOCAL_EXPERTS * world_size - 1
    counts = dist_pool(world_size).run(_w_dispatch, seed, 30, {"routing": "skewed", "hot_expert": hot})
    assert counts[:-1] == [0] * (world_size - 1) and counts[-1] == 30 * world_size


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_dispatch_rank_with_zero_tokens(dist_pool, world_size, fp8, seed):
    tokens = {2: [19, 0], 3: [19, 0, 11]}[world_size]
    dist_pool(world_size).run(_w_dispatch, seed, tokens, SPARSE, fp8=fp8)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("expert_alignment", [4, 128])
def test_dispatch_expert_alignment(dist_pool, world_size, expert_alignment, seed):
    dist_pool(world_size).run(_w_dispatch, seed, 21, RANDOM, expert_alignment=expert_alignment)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_dispatch_num_worst_tokens(dist_pool, world_size, fp8, seed):
    pool = dist_pool(world_size)
    tokens = [18, 9, 25, 3][:world_size]
    most = max(pool.run(_w_num_recv, seed, tokens, SPARSE))
    pool.run(_w_dispatch, seed, tokens, SPARSE, fp8=fp8, num_worst_tokens=most + 5)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_cached_dispatch_bf16(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_cached_dispatch, seed, False)


@pytest.mark.parametrize("world_size", [2, 4])
def test_cached_dispatch_fp8(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_cached_dispatch, seed, True)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_combine_round_trip(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_round_trip, seed, [26, 14, 5, 9][:world_size], SPARSE)


@pytest.mark.parametrize("world_size", [2, 3])
def test_combine_rank_with_zero_tokens(dist_pool, world_size, seed):
    tokens = {2: [0, 17], 3: [13, 21, 0]}[world_size]
    dist_pool(world_size).run(_w_round_trip, seed, tokens, SPARSE)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("bias_kind", ["none", "one", "two"])
def test_combine_exact_integer_data(dist_pool, world_size, bias_kind, seed):
    """Integer-valued rows, so any summation order is exact: checks routing of the sum and bias."""
    dist_pool(world_size).run(_w_combine, seed, 22, SPARSE, True, bias_kind)


@pytest.mark.parametrize("world_size", [2, 4])
def test_combine_random_data_with_bias(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_combine, seed, 19, RANDOM, False, "two")


def test_combine_skewed(dist_pool, seed):
    dist_pool(3).run(_w_combine, seed, 15, {"routing": "skewed", "hot_expert": 4}, True, "one")


@pytest.mark.parametrize("num_topk", [1, 8])
def test_dispatch_combine_topk_sizes(dist_pool, num_topk, seed):
    """top-1 and top-8 (of 12 experts over 4 ranks) through dispatch and a round trip."""
    dist_pool(4).run(_w_topk_round_trip, seed, [20, 11, 16, 7], num_topk)


@pytest.mark.parametrize("world_size", [2, 4])
def test_buffer_reused_across_layers(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_reuse, seed)


def test_many_tokens(dist_pool, seed):
    """A larger batch (160 tokens per rank) to exercise the bookkeeping beyond toy sizes."""
    dist_pool(4).run(_w_round_trip, seed, [160, 150, 140, 160], SPARSE)


def test_dispatch_float32_on_cpu(dist_pool, dist_backend, seed):
    """float32 payloads are accepted on CPU groups (exact checks without bf16 rounding)."""
    if dist_backend != "gloo":
        pytest.skip("float32 payloads are a CPU convenience")
    dist_pool(2).run(_w_float32, seed)


def test_hidden_sizes(dist_pool, seed):
    """bf16 and FP8 dispatch, then combine, at DeepSeek/Qwen-like hidden sizes."""
    dist_pool(2).run(_w_hidden_sizes, seed, [2048, 2560, 7168], timeout=240)


def test_async_finish_previous_event_and_config(dist_pool, seed):
    """async_finish / previous_event / config are accepted; waiting on the events gives the data."""
    dist_pool(2).run(_w_async_previous_event, seed)


def _w_combine_through_empty_input(ctx, seed):
    """Expert outputs written into Buffer.empty_combine_input (what the layer does) combine like any
    tensor; bad arguments name themselves."""
    world = _world(ctx, seed, [14, 0, 9][:ctx.world_size], **SPARSE)
    buffer = _buffer(ctx)
    recv_x, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world), _expect(ctx, world))
    expectations = [oracle.dispatch(r, world.xs, world.topk_idx, world.topk_weights, world.num_experts)
                    for r in range(ctx.world_size)]
    xs_back = [(e.recv_x.float() * (r + 2)).to(torch.bfloat16) for r, e in enumerate(expectations)]
    rows = recv_x.shape[0]
    x_in = buffer.empty_combine_input(rows, world.hidden)
    assert x_in.shape == (rows, world.hidden) and x_in.dtype == torch.bfloat16 and x_in.device == recv_x.device
    x_in.copy_(_on(ctx, xs_back[ctx.rank]))
    combined, _, _ = buffer.combine(x_in, handle)
    num_tokens = world.xs[ctx.rank].shape[0]
    expected, _ = oracle.combine(ctx.rank, xs_back, [e.recv_src for e in expectations], num_tokens, world.hidden)
    oracle.assert_close(combined, expected, "combined_x (input from empty_combine_input)")
    assert buffer.empty_combine_input(3, 5, torch.float32).dtype == torch.float32
    for args, name in (((-1, 8), "num_rows"), ((4, 0), "hidden"), ((4, 8, torch.float16), "dtype")):
        with pytest.raises(ValueError, match=name):
            buffer.empty_combine_input(*args)


@pytest.mark.parametrize("world_size", [2, 3])
def test_combine_through_empty_combine_input(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_combine_through_empty_input, seed)


TRAP_TEST = "tests/test_cuda_intranode.py::test_other_sizes_without_a_host_wait_trap_with_a_message"


def _w_other_hidden(ctx, seed, call):
    """The last rank passes rows of another hidden size to ``call`` (routed dispatch, cached
    dispatch or combine): every rank raises ValueError naming each rank's hidden (gloo would
    otherwise abort the process, or a rank would read another's rows as garbage); the Buffer then
    works with agreeing sizes."""
    import re

    last = ctx.world_size - 1
    world = _world(ctx, seed, 12)
    buffer = _buffer(ctx)
    expected = _expect(ctx, world)
    narrow = HIDDEN - 128 if ctx.rank == last else HIDDEN
    message = re.escape(f"hidden by rank: {[HIDDEN] * last + [HIDDEN - 128]}")
    if call == "dispatch":
        with pytest.raises(ValueError, match=message):
            _dispatch(ctx, buffer, world, x=world.xs[ctx.rank][:, :narrow].contiguous())
    recv_x, handle = _check_dispatch(ctx, _dispatch(ctx, buffer, world), expected)
    if call == "cached dispatch":
        with pytest.raises(ValueError, match=message):
            buffer.dispatch(_on(ctx, world.xs[ctx.rank][:, :narrow].contiguous()), handle=handle)
    if call == "combine":
        with pytest.raises(ValueError, match=message):
            buffer.combine(recv_x[:, :narrow].contiguous(), handle)
    combined, _, _ = buffer.combine(recv_x, handle)
    oracle.assert_same(combined, _round_trip_expected(ctx, world), "combined_x after the refused call")


@pytest.mark.parametrize("call", ["dispatch", "cached dispatch", "combine"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_with_other_hidden_raise(dist_pool, dist_backend, world_size, call, seed):
    if call != "dispatch":  # a routed dispatch has its host wait: the kernels raise there too
        skip_where_kernels_trap(dist_backend, "intranode", "intranode_dispatch", TRAP_TEST)
    dist_pool(world_size).run(_w_other_hidden, seed, call)


def _w_other_num_experts(ctx, seed):
    """The last rank counts tokens per expert over twice the experts: every rank raises naming each
    rank's count of experts (the counts' all-gather would otherwise abort under gloo)."""
    import re

    last = ctx.world_size - 1
    world = _world(ctx, seed, 12)
    buffer = _buffer(ctx)
    num_experts = world.num_experts * (2 if ctx.rank == last else 1)
    topk_idx = _on(ctx, world.topk_idx[ctx.rank])
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(topk_idx,
                                                                                                    num_experts)
    values = [world.num_experts] * last + [2 * world.num_experts]
    with pytest.raises(ValueError, match=re.escape(f"num_experts (num_tokens_per_expert's length) by rank: {values}")):
        buffer.dispatch(_on(ctx, world.xs[ctx.rank]), num_tokens_per_rank=num_tokens_per_rank,
                        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                        topk_idx=topk_idx, topk_weights=_on(ctx, world.topk_weights[ctx.rank]))
    _check_dispatch(ctx, _dispatch(ctx, buffer, world), _expect(ctx, world))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_with_other_num_experts_raise(dist_pool, world_size, seed):
    dist_pool(world_size).run(_w_other_num_experts, seed)


def _w_other_worst_tokens(ctx, seed):
    """num_worst_tokens sizes the exchanged blocks. The last rank passes 64 where the others pass 0:
    a new value is compared once on the host (every rank raises, naming the values, instead of the
    ranks entering different all-gathers); once both values have been agreed on, every call still
    compares them (naming each rank's value). Agreeing calls keep working in between."""
    import re

    last = ctx.world_size - 1
    world = _world(ctx, seed, 12)
    buffer = _buffer(ctx)
    expected = _expect(ctx, world)
    mine = 64 if ctx.rank == last else 0
    values = [0] * last + [64]
    with pytest.raises(ValueError, match="num_worst_tokens must be the same on every rank"):
        _dispatch(ctx, buffer, world, num_worst_tokens=mine)
    _check_dispatch(ctx, _dispatch(ctx, buffer, world, num_worst_tokens=64), expected, num_worst_tokens=64)
    _check_dispatch(ctx, _dispatch(ctx, buffer, world), expected)
    with pytest.raises(ValueError, match=re.escape(f"num_worst_tokens by rank: {values}")):
        _dispatch(ctx, buffer, world, num_worst_tokens=mine)
    _check_dispatch(ctx, _dispatch(ctx, buffer, world), expected)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_with_other_num_worst_tokens_raise(dist_pool, dist_backend, world_size, seed):
    # The second disagreement comes after both values were agreed on: no host check, a kernel's trap.
    skip_where_kernels_trap(dist_backend, "intranode", "intranode_dispatch", TRAP_TEST)
    dist_pool(world_size).run(_w_other_worst_tokens, seed)
