"""GPU: the intranode (NVLink, CUDA IPC) normal dispatch/combine kernels, through
``moe_ep.comm.backends.intranode.IntranodeEngine``, against the specification.

The engine's ``dispatch`` and ``combine`` take exactly the positional arguments and give exactly
the results of ``ReferenceBackend.dispatch`` / ``combine``, bit for bit. What is checked:

1. Shared-GPU ranks (one GPU is enough): a gloo pool whose rank r runs on cuda:(r % count), 2, 3
   and 4 ranks, each case compared with the independent oracle (tests/oracle.py) built from the
   same seeded world on every rank. Outputs are allocated by the engine, so they cannot be
   poisoned beforehand; instead each case runs twice in a row on one engine with different data
   (anything of the first run that reaches the second run's outputs is a mismatch), and the
   worst-token padding rows of combine inputs hold NaN (the reference never reads them).
2. A back-to-back stress run: 1000 random iterations on 2 ranks (sizes, payload forms, cached
   and worst-token modes all varying), each checked on the GPU against a vectorised expectation
   that is itself checked against the oracle every 100 iterations.
3. Bad input on one rank: a ``num_nvl_bytes`` too small for a call (or negative) raises
   ``ValueError`` naming it, and the engine still works afterwards.
4. ``Buffer`` on an NCCL group of 1 and of 2 GPUs equals the reference backend (skipped with the
   reason where the cuda backend does not run dispatch through the engine).
5. compute-sanitizer memcheck and racecheck over a tiny 2-rank run
   (tests/intranode_sanitizer_case.py).

Workers are module-level functions (the pool pickles them by reference). Engines are collective
to build, so each rank process keeps one per (world size, num_nvl_bytes) in ``_ENGINES``; every
rank runs the same test sequence, so every rank builds them in the same order.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pytest
import torch

from moe_ep.comm.fp8 import FP8_DTYPE
from tests import oracle
from tests.env import environ
from tests.sanitizer import assert_sanitizer_clean

pytestmark = pytest.mark.gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_NVL_BYTES = 1 << 30        # holds the largest case below (4 ranks x 2048 tokens x 7168 bf16, top-8)
SMALL_NVL_BYTES = 8 << 20      # the bad-input test: too small for 4096 x 4096 bf16 rows (32 MiB)
POISON = float("nan")          # combine-input padding rows (worst-token mode) the engine must never read

Rows = Any  # [N, H] tensor, or (x_fp8 [N, H], scales [N, H / 128])

_ENGINES: dict[tuple[int, int, int], Any] = {}


def engine_for(ctx, num_nvl_bytes: int = NUM_NVL_BYTES, recv_pool_bytes: int = 0):
    """This rank's engine for the pool's world size (and receive pool size), built on first use
    (collectively).

    Reused across tests on purpose: a model reuses one buffer for every layer, so whatever a call
    leaves in the shared buffer must never reach a later call's results."""
    key = (ctx.world_size, num_nvl_bytes, recv_pool_bytes)
    engine = _ENGINES.get(key)
    if engine is None:
        from moe_ep.comm.backends.intranode import IntranodeEngine

        engine = _ENGINES[key] = IntranodeEngine(ctx.group, ctx.device, num_nvl_bytes, recv_pool_bytes=recv_pool_bytes)
    return engine


# ---------------------------------------------------------------------------------------------
# Cases: data on CPU from the seeded oracle world (the same on every rank), moved to the GPU
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One dispatch -> (cached dispatch) -> combine sequence. ``tokens``: per rank (the first
    world-size entries are used); ``routing``: make_world keyword arguments as (name, value)
    pairs (``routing="skewed"`` sends every token to the last expert unless ``hot_expert`` is
    given); ``payload``: "bf16", "fp32" or "fp8"; ``worst``: num_worst_tokens = the largest
    receive of any rank + 5 (the same on every rank); ``signed_zeros``: the combine inputs hold
    -0.0 (the reference's float32 sum starts from +0.0, so a token whose rows are all -0.0
    combines to +0.0)."""

    name: str
    tokens: tuple = (24, 17, 31, 5)
    hidden: int = 2048
    payload: str = "bf16"
    num_topk: int = 4
    local_experts: int = 3
    routing: tuple = ()
    expert_alignment: int = 1
    worst: bool = False
    cached: bool = False
    num_biases: int = 0
    combine_weights: bool = True
    signed_zeros: bool = False
    timeout: float = 180.0


SPARSE = (("drop_prob", 0.3), ("all_dropped_token", True))  # -1 entries, and token 0 routed nowhere
SKEWED = (("routing", "skewed"),)                             # every token to the last expert
BIG = (2048, 1536, 2048, 1024)

CASES = [
    Case("random-bf16-h2048", hidden=2048),
    Case("random-bf16-h2560-bias1", hidden=2560, num_biases=1),
    Case("random-bf16-h7168-bias2", tokens=(40, 23, 31, 12), hidden=7168, num_biases=2),
    # 100 elements: not a multiple of 8 (200-byte rows, not a multiple of 16 bytes)
    Case("masked-bf16-h100-bias2", hidden=100, routing=SPARSE, num_biases=2),
    Case("masked-bf16-h200-bias1", hidden=200, routing=SPARSE, num_biases=1),
    Case("masked-bf16-h384", hidden=384, routing=SPARSE),
    Case("skewed-one-expert-bf16", tokens=(30, 30, 30, 30), hidden=384, routing=SKEWED, num_biases=1),
    Case("skewed-one-expert-fp8", tokens=(30, 9, 30, 0), hidden=384, payload="fp8", routing=SKEWED),
    Case("all-masked-bf16", hidden=384, routing=(("drop_prob", 1.0),), num_biases=1),
    Case("zero-token-rank-bf16", tokens=(19, 0, 11, 6), hidden=2048, routing=SPARSE, num_biases=2),
    Case("zero-token-rank-fp8", tokens=(0, 19, 0, 6), hidden=2048, payload="fp8", routing=SPARSE),
    Case("duplicate-experts-bf16", hidden=384, routing=(("duplicate_prob", 0.5),)),
    Case("top1-bf16", hidden=384, num_topk=1),
    Case("top8-bf16", hidden=384, num_topk=8, local_experts=4),
    Case("fp32-h384-bias2", hidden=384, payload="fp32", routing=SPARSE, num_biases=2),
    Case("fp32-h100-bias1", hidden=100, payload="fp32", num_biases=1),
    Case("fp8-h384", hidden=384, payload="fp8", routing=SPARSE),
    Case("fp8-h2048-bias1", hidden=2048, payload="fp8", num_biases=1),
    Case("fp8-h2560", hidden=2560, payload="fp8"),
    Case("fp8-h7168-bias2", tokens=(40, 23, 31, 12), hidden=7168, payload="fp8", num_biases=2),
    Case("align4-bf16", hidden=384, expert_alignment=4),
    Case("align128-bf16", hidden=2048, routing=SPARSE, expert_alignment=128),
    Case("align128-fp8", hidden=384, payload="fp8", expert_alignment=128),
    Case("worst-bf16-bias1", hidden=2048, routing=SPARSE, worst=True, num_biases=1),
    Case("worst-fp8", hidden=2048, payload="fp8", routing=SPARSE, worst=True),
    Case("worst-zero-token-ranks-bf16-bias2", tokens=(0, 25, 3, 0), hidden=384, worst=True, num_biases=2),
    Case("worst-fp32", hidden=100, payload="fp32", routing=SPARSE, worst=True, expert_alignment=4),
    Case("cached-bf16-bias1", hidden=2048, routing=SPARSE, cached=True, num_biases=1),
    Case("cached-fp8", hidden=2560, payload="fp8", cached=True),
    Case("cached-worst-bf16", hidden=384, routing=SPARSE, cached=True, worst=True),
    Case("cached-worst-fp8-bias1", hidden=384, payload="fp8", cached=True, worst=True, num_biases=1),
    Case("signed-zeros-bf16-bias1", hidden=384, routing=SPARSE, signed_zeros=True, num_biases=1),
    Case("no-combine-weights-bf16-bias2", hidden=2048, combine_weights=False, num_biases=2),
    # More tokens than the notify kernel's routing tile (1024 threads x 4 = 4096): slots carried across tiles.
    Case("multi-tile-routing-bf16", tokens=(4500, 2049, 2047, 3001), hidden=256, num_topk=2, routing=SPARSE,
         num_biases=1),
    Case("multi-tile-routing-worst-fp8", tokens=(2049, 4097, 0, 2100), hidden=256, payload="fp8", num_topk=3,
         worst=True),
    Case("many-tokens-bf16-h7168-top8", tokens=BIG, hidden=7168, num_topk=8, local_experts=8, routing=SPARSE,
         num_biases=1, timeout=600.0),
    Case("many-tokens-fp8-h7168-top8-worst", tokens=BIG, hidden=7168, payload="fp8", num_topk=8, local_experts=8,
         worst=True, cached=True, timeout=600.0),
]


def case_world(case: Case, world_size: int, seed: int) -> oracle.World:
    num_experts = case.local_experts * world_size
    routing = dict(case.routing)
    if routing.get("routing") == "skewed":
        routing.setdefault("hot_expert", num_experts - 1)
    return oracle.make_world(seed, world_size, list(case.tokens[:world_size]), case.hidden, case.num_topk,
                             num_experts, **routing)


def as_payload(x: torch.Tensor, payload: str) -> Rows:
    """The dispatch input form of a bf16 token matrix."""
    if payload == "fp8":
        return oracle.quantize(x)
    if payload == "fp32":
        return x.float()
    assert payload == "bf16", payload
    return x


def combine_dtype(payload: str) -> torch.dtype:
    """Experts return float32 for float32 payloads and bf16 otherwise (FP8 included)."""
    return torch.float32 if payload == "fp32" else torch.bfloat16


def on(ctx, x):
    """A fresh, packed copy on the rank's device (never an alias of the oracle's CPU tensors);
    None stays None. Packed: an empty tensor such as the scales of 0 tokens at hidden 128 can
    carry a zero stride, which the reference's byte packing rejects."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(on(ctx, part) for part in x)
    return torch.empty(x.shape, dtype=x.dtype, device=ctx.device).copy_(x)


def on_cpu(x: Rows) -> Rows:
    return tuple(part.cpu() for part in x) if isinstance(x, tuple) else x.cpu()


def received_rows(layouts: list, dst: int) -> int:
    """Rows rank ``dst`` receives, from every rank's oracle.dispatch_layout."""
    return sum(int(layout[2][:, dst].sum()) for layout in layouts)


def pad_rows(x: Rows, rows: int, fill: float) -> Rows:
    """``x`` extended to ``rows`` rows of ``fill``: the worst-token padding (FP8 parts are padded
    with zero bytes, as the reference pads them)."""
    if isinstance(x, tuple):
        return tuple(pad_rows(part, rows, 0) for part in x)
    extra = rows - x.shape[0]
    assert extra >= 0, f"cannot pad {x.shape[0]} rows to {rows}"
    if x.dtype == FP8_DTYPE:
        pad = torch.zeros((extra, *x.shape[1:]), dtype=torch.uint8, device=x.device)
        return torch.cat([x.view(torch.uint8), pad]).view(FP8_DTYPE)
    return torch.cat([x, torch.full((extra, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)])


def expert_outputs(rank: int, rows: torch.Tensor, signed_zeros: bool = False) -> torch.Tensor:
    """What ``rank``'s experts return for its received rows: a per-rank scale that is no power
    of two, so a token's rows from different ranks differ and round differently. (Sums of a
    few bf16 rows are mostly exact in float32 whatever the order; the float32 cases are the ones
    where another summation order shows.)"""
    out = (rows.float() * (1.0 + 0.3 * (rank + 1))).to(rows.dtype)
    if signed_zeros and out.numel():
        out[:, ::5] = -0.0
    return out


def make_biases(seed: int, rank: int, num_tokens: int, hidden: int, count: int, dtype: torch.dtype) -> list:
    """``count`` bias tensors [T, H]: the first in the combine dtype, the second float32 (the
    Buffer accepts either dtype for either input)."""
    gen = torch.Generator().manual_seed(seed * 31 + 7 + rank)
    dtypes = [dtype, torch.float32]
    return [oracle.make_tokens(gen, num_tokens, hidden).to(dtypes[i]) for i in range(count)]


def expected_combine(rank: int, xs_back: Sequence[torch.Tensor], recv_srcs: Sequence[list], num_tokens: int,
                     hidden: int, biases: list, weights_back: Optional[Sequence[torch.Tensor]], dtype: torch.dtype):
    """(combined_x, combined_topk_weights or None) as the oracle defines them. The oracle casts
    to bf16; for float32 inputs the same loop runs here without that cast."""
    if dtype == torch.bfloat16:
        return oracle.combine(rank, xs_back, recv_srcs, num_tokens, hidden, tuple(biases), weights_back)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    weights_acc = None if weights_back is None else torch.zeros(num_tokens, weights_back[0].shape[1])
    for r, srcs in enumerate(recv_srcs):
        for n, (src, t) in enumerate(srcs):
            if src == rank:
                acc[t] += xs_back[r][n].float()
                if weights_acc is not None:
                    weights_acc[t] += weights_back[r][n]
    for bias in biases:
        acc += bias.float()
    return acc.to(dtype), weights_acc


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def assert_on_device(ctx, value: Rows, what: str) -> None:
    for i, part in enumerate(value if isinstance(value, tuple) else (value,)):
        assert isinstance(part, torch.Tensor), f"{what}[{i}]: expected a tensor, got {type(part).__name__}"
        assert part.device == ctx.device, f"{what}[{i}]: on {part.device}, expected {ctx.device}"


def check_handle(handle, expected: oracle.DispatchExpectation, is_token_in_rank: torch.Tensor, rows: int,
                 what: str) -> None:
    """handle[0..2] equal the reference's (its recv_src_idx pads worst-token rows with 0);
    handle[3] is the routing combine reads."""
    assert isinstance(handle, tuple) and len(handle) == 4, \
        f"{what}: handle must be a 4-tuple (rank_prefix_matrix, is_token_in_rank, recv_src_idx, routing), " \
        f"got {type(handle).__name__} of length {len(handle) if isinstance(handle, tuple) else '-'}"
    oracle.assert_same(handle[0], expected.rank_prefix_matrix, f"{what}: handle[0] (rank_prefix_matrix)")
    oracle.assert_same(handle[1], is_token_in_rank, f"{what}: handle[1] (is_token_in_rank)")
    src_idx = torch.tensor([t for _, t in expected.recv_src], dtype=torch.int32).reshape(-1)
    oracle.assert_same(handle[2], pad_rows(src_idx, rows, 0), f"{what}: handle[2] (recv_src_idx)")
    routing = handle[3]
    assert routing.num_recv_rows == rows, f"{what}: handle[3].num_recv_rows = {routing.num_recv_rows}, expected {rows}"
    oracle.assert_same(routing.is_token_in_rank, is_token_in_rank, f"{what}: handle[3].is_token_in_rank")


def check_dispatch(ctx, got, expected: oracle.DispatchExpectation, is_token_in_rank: torch.Tensor,
                   num_worst_tokens: int, what: str):
    """Every output of a (non-cached) dispatch, bit for bit, worst-token padding included.
    Returns (recv_x, recv_topk_weights, handle)."""
    assert isinstance(got, tuple) and len(got) == 5, \
        f"{what}: dispatch must return (recv_x, recv_topk_idx, recv_topk_weights, counts, handle), got {got!r:.200}"
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle = got
    rows = num_worst_tokens or expected.num_recv_tokens
    for name, value in (("recv_x", recv_x), ("recv_topk_idx", recv_topk_idx), ("recv_topk_weights", recv_topk_weights)):
        assert_on_device(ctx, value, f"{what}: {name}")
    oracle.assert_same(recv_x, pad_rows(expected.recv_x, rows, 0), f"{what}: recv_x")
    oracle.assert_same(recv_topk_idx, pad_rows(expected.recv_topk_idx, rows, -1), f"{what}: recv_topk_idx")
    oracle.assert_same(recv_topk_weights, pad_rows(expected.recv_topk_weights, rows, 0.0), f"{what}: recv_topk_weights")
    if num_worst_tokens:
        assert counts == [], f"{what}: num_recv_tokens_per_expert_list must be [] with num_worst_tokens, got {counts!r}"
    else:
        assert isinstance(counts, list) and all(type(c) is int for c in counts), \
            f"{what}: num_recv_tokens_per_expert_list must be a list of int, got {counts!r}"
        assert counts == expected.num_recv_tokens_per_expert_list, \
            f"{what}: num_recv_tokens_per_expert_list {counts}, expected {expected.num_recv_tokens_per_expert_list}"
    check_handle(handle, expected, is_token_in_rank, rows, what)
    return recv_x, recv_topk_weights, handle


def check_cached(ctx, got, expected_x: Rows, what: str) -> None:
    assert isinstance(got, tuple) and len(got) == 5, f"{what}: cached dispatch must return a 5-tuple"
    assert all(item is None for item in got[1:]), \
        f"{what}: cached dispatch returns (recv_x, None, None, None, None); got {[type(i).__name__ for i in got]}"
    assert_on_device(ctx, got[0], f"{what}: recv_x")
    oracle.assert_same(got[0], expected_x, f"{what}: recv_x")


# ---------------------------------------------------------------------------------------------
# One case on one rank
# ---------------------------------------------------------------------------------------------

def pulls_here(ctx, combine_input: str) -> bool:
    """Whether this rank's combine input goes into its receive pool (read in place by its peers):
    "pool" on every rank, "mixed" on even ranks only (the others push), "plain" on none."""
    return combine_input == "pool" or (combine_input == "mixed" and ctx.rank % 2 == 0)


def into_pool(engine, t: torch.Tensor, is_x: bool) -> torch.Tensor:
    """A copy of ``t`` in the engine's receive pool (combine's x through empty_combine_input)."""
    if is_x:
        copy = engine.empty_combine_input(t.shape[0], t.shape[1], t.dtype)
    else:
        copy = engine.recv_pool.empty([(tuple(t.shape), t.dtype)])[0]
    assert engine.recv_pool.contains(copy), "the combine input did not land in the receive pool"
    return copy.copy_(t)


def run_case(ctx, engine, case: Case, seed: int, what: str, combine_input: str = "plain") -> int:
    """Dispatch, cached dispatch (if the case says so) and combine of one seeded world, every
    result compared with the oracle. ``combine_input`` (see pulls_here) puts combine's x and
    weights into the receive pool. Returns the rows this rank received."""
    num_ranks, me = ctx.world_size, ctx.rank
    world = case_world(case, num_ranks, seed)
    num_experts = world.num_experts
    layouts = [oracle.dispatch_layout(world.topk_idx[r], num_experts, num_ranks) for r in range(num_ranks)]
    _, per_expert, in_rank = layouts[me]
    worst = max(received_rows(layouts, dst) for dst in range(num_ranks)) + 5 if case.worst else 0

    # Dispatch.
    xs = [as_payload(x, case.payload) for x in world.xs]
    cpu_inputs = (xs[me], in_rank, per_expert, world.topk_idx[me], world.topk_weights[me])
    inputs = on(ctx, cpu_inputs)
    got = engine.dispatch(inputs[0], None, *inputs[1:], case.expert_alignment, worst, num_experts)
    torch.cuda.synchronize(ctx.device)
    oracle.assert_same(inputs, cpu_inputs, f"{what}: dispatch inputs after the call (must be left unchanged)")
    expected = oracle.dispatch(me, xs, world.topk_idx, world.topk_weights, num_experts, case.expert_alignment)
    rows = worst or expected.num_recv_tokens
    _, _, handle = check_dispatch(ctx, got, expected, in_rank, worst, f"{what}: dispatch")

    # Cached dispatch of fresh payloads through the handle: as Buffer passes it with its defaults
    # (expert_alignment=1, num_worst_tokens=0) and, in worst-token mode, with the same W again.
    if case.cached:
        calls = [(1, 0)] + ([(case.expert_alignment, worst)] if worst else [])
        for i, (alignment, worst_arg) in enumerate(calls):
            fresh = [as_payload(x, case.payload) for x in case_world(case, num_ranks, seed + 101 + i).xs]
            got_cached = engine.dispatch(on(ctx, fresh[me]), handle, None, None, None, None, alignment, worst_arg, None)
            expected_x = oracle.dispatch(me, fresh, world.topk_idx, world.topk_weights, num_experts).recv_x
            check_cached(ctx, got_cached, pad_rows(expected_x, rows, 0),
                         f"{what}: cached dispatch (expert_alignment={alignment}, num_worst_tokens={worst_arg})")

    # Combine: every rank's experts return scaled copies of what they received.
    dtype = combine_dtype(case.payload)
    plain = [x.to(dtype) for x in world.xs]
    routes = [oracle.dispatch(r, plain, world.topk_idx, world.topk_weights, num_experts) for r in range(num_ranks)]
    xs_back = [expert_outputs(r, routes[r].recv_x, case.signed_zeros) for r in range(num_ranks)]
    weights_back = [route.recv_topk_weights for route in routes] if case.combine_weights else None
    num_tokens = world.xs[me].shape[0]
    biases = make_biases(seed, me, num_tokens, case.hidden, case.num_biases, dtype)
    expected_x, expected_w = expected_combine(me, xs_back, [route.recv_src for route in routes], num_tokens,
                                              case.hidden, biases, weights_back, dtype)
    # Padding rows of the input (worst-token mode) hold NaN: the reference never reads them.
    cpu_combine = [pad_rows(xs_back[me], rows, POISON)]
    if weights_back is not None:
        cpu_combine.append(pad_rows(weights_back[me], rows, POISON))
    cpu_combine += biases
    combine_inputs = on(ctx, cpu_combine)
    pull = pulls_here(ctx, combine_input)
    if pull:  # x (and the weights) where the peers read them in place
        inputs_in_pool = 2 if weights_back is not None else 1
        combine_inputs = ([into_pool(engine, t, i == 0) for i, t in enumerate(combine_inputs[:inputs_in_pool])]
                          + combine_inputs[inputs_in_pool:])
    x_in = combine_inputs[0]
    w_in = combine_inputs[1] if weights_back is not None else None
    biases_in = combine_inputs[2:] if weights_back is not None else combine_inputs[1:]
    pulls_before = engine.pull_calls
    got = engine.combine(x_in, handle, w_in, biases_in)
    torch.cuda.synchronize(ctx.device)
    assert engine.pull_calls - pulls_before == int(pull and x_in.numel() > 0 and engine.combine_pull), (
        f"{what}: combine input in the pool: {pull}, rows {x_in.shape[0]}, pulled calls {engine.pull_calls - pulls_before}")
    oracle.assert_same(tuple(combine_inputs), tuple(cpu_combine),
                       f"{what}: combine inputs after the call (must be left unchanged)")
    assert isinstance(got, tuple) and len(got) == 2, f"{what}: combine must return (combined_x, combined_topk_weights)"
    assert_on_device(ctx, got[0], f"{what}: combined_x")
    oracle.assert_same(got[0], expected_x, f"{what}: combined_x")
    if expected_w is None:
        assert got[1] is None, f"{what}: combined_topk_weights must be None without topk_weights"
    else:
        oracle.assert_same(got[1], expected_w, f"{what}: combined_topk_weights")
    return expected.num_recv_tokens


def _w_case(ctx, case: Case, seed: int, recv_pool_bytes: int = 0, combine_input: str = "plain") -> list:
    """The case twice on this rank's engine, with different data each time."""
    engine = engine_for(ctx, recv_pool_bytes=recv_pool_bytes)
    return [run_case(ctx, engine, case, seed + 1_000_003 * rep, f"{case.name} (run {rep + 1} of 2)", combine_input)
            for rep in range(2)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_engine_matches_oracle(gpu_gloo_pool, case, world_size, seed):
    received = gpu_gloo_pool(world_size).run(_w_case, case, seed, timeout=case.timeout)
    assert len(received) == world_size and all(len(per_rank) == 2 for per_rank in received)


# The kernel variants the benchmark compares (the engine's IntranodeKnobs: unroll, chunk_rows,
# send_warps, combine_send_warps, combine_staged_vectors, set alike on every rank) must give the same
# results: both staged ring sizes and none (pieces cut rows at 128 and 192 vectors) and a few cases
# with the big rows of BIG, a partial last chunk, skew, FP8 (scales as vectors and not), float32, a
# rank with no tokens, cached/worst-token and non-16-byte-aligned rows, on 3 ranks. 64 rows per chunk
# takes the path of chunks longer than a warp (which the defaults reach only with more rows per rank
# pair than there are flags).
VARIANT_CASE_NAMES = ("random-bf16-h7168-bias2", "masked-bf16-h100-bias2", "skewed-one-expert-bf16", "fp8-h7168-bias2",
                      "cached-worst-fp8-bias1", "fp32-h384-bias2", "zero-token-rank-fp8")
VARIANT_CASES = [case for case in CASES if case.name in VARIANT_CASE_NAMES]
assert len(VARIANT_CASES) == len(VARIANT_CASE_NAMES), "a variant case was renamed"
VARIANTS = [("4", "4", "2", "12", "0"), ("16", "16", "12", "2", "0"), ("8", "32", "6", "6", "24"),
            ("8", "64", "8", "8", "16"), ("8", "8", "4", "4", "24"), ("8", "4", "6", "4", "0"),
            ("8", "4", "8", "2", "16")]


def _w_case_with_knobs(ctx, case: Case, seed: int, unroll: str, chunk_rows: str, send_warps: str,
                       combine_send_warps: str, combine_staged_vectors: str) -> list:
    from moe_ep.comm.backends.intranode import IntranodeKnobs

    engine = engine_for(ctx)
    engine.knobs = IntranodeKnobs(int(unroll), int(chunk_rows), int(send_warps), int(combine_send_warps),
                                  int(combine_staged_vectors))
    try:
        return _w_case(ctx, case, seed)
    finally:
        engine.knobs = IntranodeKnobs()


@pytest.mark.parametrize("unroll,chunk_rows,send_warps,combine_send_warps,combine_staged_vectors", VARIANTS,
                         ids=[f"unroll{u}-rows{r}-send{w}-csend{c}-cstage{v}" for u, r, w, c, v in VARIANTS])
@pytest.mark.parametrize("case", VARIANT_CASES, ids=[case.name for case in VARIANT_CASES])
def test_copy_variants_match_oracle(gpu_gloo_pool, case, unroll, chunk_rows, send_warps, combine_send_warps,
                                    combine_staged_vectors, seed):
    received = gpu_gloo_pool(3).run(_w_case_with_knobs, case, seed, unroll, chunk_rows, send_warps, combine_send_warps,
                                    combine_staged_vectors, timeout=case.timeout)
    assert len(received) == 3


# ---------------------------------------------------------------------------------------------
# 2. Back-to-back stress
# ---------------------------------------------------------------------------------------------

STRESS_ITERATIONS = 1000
STRESS_RANKS = 2
STRESS_LOCAL_EXPERTS = 8
STRESS_HIDDEN = (128, 384, 1024, 2048)   # multiples of 128, for FP8
STRESS_TOPK = (1, 2, 4, 8)
STRESS_ORACLE_EVERY = 100


@dataclass
class StressWorld:
    """One iteration's inputs for every rank: CPU copies (for the oracle) and device copies."""

    xs: list            # bf16 [T_r, H]
    topk_idx: list
    topk_weights: list
    num_experts: int


def stress_world(gen: torch.Generator, num_ranks: int, hidden: int, num_topk: int, drop_prob: float) -> StressWorld:
    """Fresh tokens and routing (distinct experts per token, some -1); some ranks get 0 tokens."""
    num_experts = STRESS_LOCAL_EXPERTS * num_ranks
    xs, idxs, weights = [], [], []
    for _ in range(num_ranks):
        num_tokens = 0 if float(torch.rand((), generator=gen)) < 0.1 else int(torch.randint(1, 129, (), generator=gen))
        xs.append(oracle.make_tokens(gen, num_tokens, hidden))
        idx = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :num_topk]
        idx[torch.rand(num_tokens, num_topk, generator=gen) < drop_prob] = -1
        idxs.append(idx.contiguous())
        # In place: `rand(0, 1) + 0.25` has strides (1, 0), which the reference cannot pack.
        weights.append(torch.rand(num_tokens, num_topk, generator=gen).add_(0.25))
    return StressWorld(xs, idxs, weights, num_experts)


def fast_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """(num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool) with tensor ops (the same
    definition as oracle.dispatch_layout, without its per-token loop)."""
    valid = topk_idx >= 0
    expert = torch.where(valid, topk_idx, 0)
    per_expert = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device)
    per_expert.index_add_(0, expert.flatten(), valid.flatten().to(torch.int64))
    hits = torch.zeros((topk_idx.shape[0], num_ranks), dtype=torch.int32, device=topk_idx.device)
    hits.scatter_add_(1, expert // (num_experts // num_ranks), valid.to(torch.int32))
    return per_expert.to(torch.int32), hits > 0


def take(x: Rows, index: torch.Tensor) -> Rows:
    if isinstance(x, tuple):
        return tuple(take(part, index) for part in x)
    if x.dtype == FP8_DTYPE:
        return x.view(torch.uint8).index_select(0, index).view(FP8_DTYPE)
    return x.index_select(0, index)


def cat(parts: list) -> Rows:
    if isinstance(parts[0], tuple):
        return tuple(cat([p[i] for p in parts]) for i in range(len(parts[0])))
    if parts[0].dtype == FP8_DTYPE:
        return torch.cat([p.view(torch.uint8) for p in parts]).view(FP8_DTYPE)
    return torch.cat(parts)


def fast_dispatch(me: int, xs: list, topk_idx: list, topk_weights: list, in_ranks: list, per_experts: list,
                  num_experts: int, expert_alignment: int) -> oracle.DispatchExpectation:
    """oracle.dispatch with tensor ops on the device: rows by source rank, then source token."""
    num_ranks = len(xs)
    num_local = num_experts // num_ranks
    first = me * num_local
    parts, src, idx, weights = [], [], [], []
    for r in range(num_ranks):
        tokens = in_ranks[r][:, me].nonzero().flatten()
        parts.append(take(xs[r], tokens))
        src.extend((r, t) for t in tokens.tolist())
        chosen = topk_idx[r].index_select(0, tokens)
        local = (chosen >= first) & (chosen < first + num_local)
        idx.append(torch.where(local, chosen - first, -1))
        weights.append(torch.where(local, topk_weights[r].index_select(0, tokens), 0.0))
    counts = torch.stack([in_rank.sum(0) for in_rank in in_ranks]).to(torch.int32)   # [src, dst]
    per_expert = sum(p[first:first + num_local].to(torch.int64) for p in per_experts)
    aligned = ((per_expert + expert_alignment - 1) // expert_alignment * expert_alignment).tolist()
    return oracle.DispatchExpectation(recv_x=cat(parts), recv_topk_idx=torch.cat(idx), recv_topk_weights=torch.cat(weights),
                                      num_recv_tokens_per_expert_list=aligned,
                                      rank_prefix_matrix=counts.cumsum(0).to(torch.int32), recv_src=src)


def same(got: Rows, want: Rows, what: str) -> None:
    """Bit-exact equality on the device; on a mismatch, the oracle's message (on CPU copies)."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), f"{what}: expected a {len(want)}-tuple"
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{what}[{i}]")
        return
    if not (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
            and torch.equal(oracle.bits(got), oracle.bits(want))):
        oracle.assert_same(got, want.cpu(), what)


def stress_step(ctx, engine, gen: torch.Generator, it: int, stats: Counter) -> None:
    """One random dispatch (+ cached dispatch) + combine, every result checked. Every random
    choice comes from ``gen``, seeded alike on every rank, so the ranks agree on all of them."""
    num_ranks, me = ctx.world_size, ctx.rank
    fp8 = it % 2 == 1
    hidden = STRESS_HIDDEN[int(torch.randint(len(STRESS_HIDDEN), (), generator=gen))]
    num_topk = STRESS_TOPK[int(torch.randint(len(STRESS_TOPK), (), generator=gen))]
    drop_prob = (0.0, 0.2, 0.6)[int(torch.randint(3, (), generator=gen))]
    alignment = (1, 4, 128)[int(torch.randint(3, (), generator=gen))]
    cached = float(torch.rand((), generator=gen)) < 0.3
    use_worst = float(torch.rand((), generator=gen)) < 0.2
    worst_margin = int(torch.randint(0, 9, (), generator=gen))
    num_biases = int(torch.randint(3, (), generator=gen))
    with_weights = float(torch.rand((), generator=gen)) < 0.5
    world = stress_world(gen, num_ranks, hidden, num_topk, drop_prob)
    fresh = [oracle.make_tokens(gen, x.shape[0], hidden) for x in world.xs] if cached else None
    num_experts = world.num_experts
    what = (f"iteration {it} ({'fp8' if fp8 else 'bf16'}, H={hidden}, K={num_topk}, "
            f"tokens={[x.shape[0] for x in world.xs]}, alignment={alignment}, cached={cached}, "
            f"worst={use_worst}, biases={num_biases}, weights={with_weights})")

    def form(xs: list) -> list:
        return [oracle.quantize(x) for x in xs] if fp8 else xs

    payload = form(world.xs)
    dev_xs, dev_payload = on(ctx, world.xs), on(ctx, payload)
    dev_idx, dev_w = on(ctx, world.topk_idx), on(ctx, world.topk_weights)
    layouts = [fast_layout(idx, num_experts, num_ranks) for idx in dev_idx]
    per_experts, in_ranks = [layout[0] for layout in layouts], [layout[1] for layout in layouts]
    most = int(torch.stack([in_rank.sum(0) for in_rank in in_ranks]).sum(0).max())
    worst = max(1, most + worst_margin) if use_worst else 0
    expected = fast_dispatch(me, dev_payload, dev_idx, dev_w, in_ranks, per_experts, num_experts, alignment)
    if it % STRESS_ORACLE_EVERY == 0:  # the fast expectation is itself checked against the oracle
        slow = oracle.dispatch(me, payload, world.topk_idx, world.topk_weights, num_experts, alignment)
        for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "rank_prefix_matrix"):
            oracle.assert_same(on_cpu(getattr(expected, name)), getattr(slow, name),
                               f"{what}: fast expectation vs oracle: {name}")
        assert expected.recv_src == slow.recv_src, f"{what}: fast expectation vs oracle: recv_src"
        assert expected.num_recv_tokens_per_expert_list == slow.num_recv_tokens_per_expert_list, \
            f"{what}: fast expectation vs oracle: num_recv_tokens_per_expert_list"
    rows = worst or expected.num_recv_tokens

    got = engine.dispatch(dev_payload[me], None, in_ranks[me], per_experts[me], dev_idx[me], dev_w[me], alignment,
                          worst, num_experts)
    assert isinstance(got, tuple) and len(got) == 5, f"{what}: dispatch must return a 5-tuple"
    recv_x, recv_idx, recv_w, counts, handle = got
    same(recv_x, pad_rows(expected.recv_x, rows, 0), f"{what}: recv_x")
    same(recv_idx, pad_rows(expected.recv_topk_idx, rows, -1), f"{what}: recv_topk_idx")
    same(recv_w, pad_rows(expected.recv_topk_weights, rows, 0.0), f"{what}: recv_topk_weights")
    want_counts = [] if worst else expected.num_recv_tokens_per_expert_list
    assert counts == want_counts, f"{what}: num_recv_tokens_per_expert_list {counts!r}, expected {want_counts}"
    same(handle[0], expected.rank_prefix_matrix, f"{what}: handle[0] (rank_prefix_matrix)")
    same(handle[1], in_ranks[me], f"{what}: handle[1] (is_token_in_rank)")
    src_idx = torch.tensor([t for _, t in expected.recv_src], dtype=torch.int32, device=ctx.device)
    same(handle[2], pad_rows(src_idx, rows, 0), f"{what}: handle[2] (recv_src_idx)")

    if cached:  # new payloads through the handle, as Buffer passes them with its defaults
        dev_fresh = on(ctx, form(fresh))
        want = fast_dispatch(me, dev_fresh, dev_idx, dev_w, in_ranks, per_experts, num_experts, 1).recv_x
        got_cached = engine.dispatch(dev_fresh[me], handle, None, None, None, None, 1, 0, None)
        assert isinstance(got_cached, tuple) and len(got_cached) == 5 and all(i is None for i in got_cached[1:]), \
            f"{what}: cached dispatch must return (recv_x, None, None, None, None)"
        same(got_cached[0], pad_rows(want, rows, 0), f"{what}: cached recv_x")

    # Combine: rank r's experts return expert_outputs(r, .) of the tokens it received, so the row
    # rank r returns for token t is expert_outputs(r, x[t]) and the sum needs no exchange. Every
    # fourth iteration they return float32 (where a wrong summation order would show).
    dtype = torch.float32 if it % 4 == 2 else torch.bfloat16
    plain_rows = fast_dispatch(me, dev_xs, dev_idx, dev_w, in_ranks, per_experts, num_experts, 1).recv_x
    x_back = pad_rows(expert_outputs(me, plain_rows.to(dtype)), rows, POISON)
    num_tokens = world.xs[me].shape[0]
    bias_gen = torch.Generator().manual_seed(it * 7 + 3 + me)
    biases = on(ctx, [oracle.make_tokens(bias_gen, num_tokens, hidden).to(dtype)
                      for dtype in (torch.bfloat16, torch.float32)[:num_biases]])
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=ctx.device)
    for r in range(num_ranks):  # source-rank order; adding +0.0 where rank r got nothing changes nothing
        acc += torch.where(in_ranks[me][:, r:r + 1], expert_outputs(r, dev_xs[me].to(dtype)).float(), 0.0)
    for bias in biases:
        acc += bias.float()
    # With a receive pool, two of three (rank, iteration) pairs put x into it (read in place by the
    # peers; the others push, so calls mix both), and overwrite it right after the call: the
    # peers' reads must be over before this rank's combine kernel ends.
    pull = engine.recv_pool is not None and (it + me) % 3 != 0
    if pull:
        x_back = into_pool(engine, x_back, True)
    pulls_before = engine.pull_calls
    got = engine.combine(x_back, handle, recv_w if with_weights else None, biases)
    if engine.pull_calls > pulls_before:
        x_back.fill_(float("nan"))
    assert isinstance(got, tuple) and len(got) == 2, f"{what}: combine must return a 2-tuple"
    same(got[0], acc.to(dtype), f"{what}: combined_x ({dtype})")
    if with_weights:  # each (t, k) weight comes back from its expert's rank; the others add +0.0
        same(got[1], torch.where(dev_idx[me] >= 0, dev_w[me], 0.0), f"{what}: combined_topk_weights")
    else:
        assert got[1] is None, f"{what}: combined_topk_weights must be None without topk_weights"

    stats["fp8" if fp8 else "bf16"] += 1
    stats["float32_combine"] += int(dtype == torch.float32)
    stats["cached"] += int(cached)
    stats["worst"] += int(worst > 0)
    stats["zero_token_rank"] += int(any(x.shape[0] == 0 for x in world.xs))
    stats["nothing_received"] += int(expected.num_recv_tokens == 0)
    stats[f"biases{num_biases}"] += 1
    stats["weights"] += int(with_weights)
    stats["pulled"] += engine.pull_calls - pulls_before


def _w_stress(ctx, seed: int, iterations: int, recv_pool_bytes: int = 0) -> dict:
    engine = engine_for(ctx, recv_pool_bytes=recv_pool_bytes)
    stats: Counter = Counter()
    for it in range(iterations):
        stress_step(ctx, engine, torch.Generator().manual_seed(seed * 10_007 + it), it, stats)
    torch.cuda.synchronize(ctx.device)
    return dict(stats)


def test_back_to_back_stress(gpu_gloo_pool, seed):
    """1000 dispatch/combine iterations back to back on 2 ranks sharing a GPU, every one checked."""
    stats = gpu_gloo_pool(STRESS_RANKS).run(_w_stress, seed, STRESS_ITERATIONS, timeout=900)
    # "nothing_received" is this rank's own count (it depends on where the routing sent tokens);
    # every other counter describes the shared schedule and must agree.
    shared = [{k: v for k, v in rank_stats.items() if k != "nothing_received"} for rank_stats in stats]
    assert shared[0] == shared[1], f"the ranks ran different schedules: {stats}"
    assert stats[0]["bf16"] + stats[0]["fp8"] == STRESS_ITERATIONS, stats[0]
    for key in ("fp8", "bf16", "float32_combine", "cached", "worst", "zero_token_rank", "biases0", "biases1", "biases2",
                "weights"):
        assert stats[0][key] > 0, f"the random schedule never covered {key!r}: {stats[0]}"


GRAPH_REPLAYS = 200


def _graph_inputs(ctx, seed: int, tokens: int, hidden: int, num_topk: int, num_experts: int):
    """One replay's inputs (the same world on every rank) and this rank's exact expectation:
    combine(dispatch(x)) = x * (ranks the token reached), and the weights summed back = the valid
    top-k weights (each expert's rank returns its own entries, the others 0)."""
    world = oracle.make_world(seed, ctx.world_size, tokens, hidden, num_topk, num_experts, **dict(SPARSE))
    x, idx, weights = world.xs[ctx.rank], world.topk_idx[ctx.rank], world.topk_weights[ctx.rank]
    _, per_expert, in_rank = oracle.dispatch_layout(idx, num_experts, ctx.world_size)
    # + 0.0: a token that reached no rank combines to +0.0 (the sum starts at +0.0), never -0.0.
    expected_x = (x.float() * in_rank.sum(1, keepdim=True).float() + 0.0).to(torch.bfloat16)
    expected_w = torch.where(idx >= 0, weights, 0.0)
    return (x, idx, weights, in_rank, per_expert.to(torch.int32)), expected_x, expected_w


def _w_graph_replays(ctx, seed: int, recv_pool_bytes: int = 0, pull: bool = False) -> None:
    """Worst-token dispatch + combine captured in a CUDA graph and replayed with fresh inputs (new
    tokens AND new routing each time): every replay must equal its exact expectation. The
    barriers' epochs live on the device, so replays synchronize as eager calls do. ``pull``: the
    combine's inputs are copied into tensors of the receive pool made before the capture, so the
    captured combine is read in place by the peers (every replay republishes them)."""
    engine = engine_for(ctx, recv_pool_bytes=recv_pool_bytes)
    tokens, hidden, num_topk, num_experts = 40, 512, 4, 8 * ctx.world_size
    worst = tokens * ctx.world_size  # a bound on any rank's receive, whatever the routing
    inputs, _, _ = _graph_inputs(ctx, seed, tokens, hidden, num_topk, num_experts)
    static = on(ctx, inputs)
    if pull:
        pooled_x = engine.empty_combine_input(worst, hidden, torch.bfloat16)
        pooled_w = engine.recv_pool.empty([((worst, num_topk), torch.float32)])[0]
        assert engine.recv_pool.contains(pooled_x) and engine.recv_pool.contains(pooled_w)

    def step():
        x, idx, weights, in_rank, per_expert = static
        recv_x, _, recv_w, _, handle = engine.dispatch(x, None, in_rank, per_expert, idx, weights, 1, worst,
                                                       num_experts)
        if pull:
            recv_x, recv_w = pooled_x.copy_(recv_x), pooled_w.copy_(recv_w)
        return engine.combine(recv_x, handle, recv_w, [])

    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        for _ in range(2):  # eager warm-up (also settles the once-per-value num_worst_tokens check)
            step()
    torch.cuda.current_stream(ctx.device).wait_stream(side)
    torch.cuda.synchronize(ctx.device)
    graph = torch.cuda.CUDAGraph()
    pulls_before = engine.pull_calls
    with torch.cuda.graph(graph):
        out_x, out_w = step()
    assert engine.pull_calls - pulls_before == int(pull), "the captured combine did not take the expected path"
    for replay in range(GRAPH_REPLAYS):
        fresh, expected_x, expected_w = _graph_inputs(ctx, seed + 1 + replay, tokens, hidden, num_topk, num_experts)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize(ctx.device)
        oracle.assert_same(out_x, expected_x, f"replay {replay}: combined_x")
        oracle.assert_same(out_w, expected_w, f"replay {replay}: combined_topk_weights")


def test_cuda_graph_replays_with_fresh_routing(gpu_gloo_pool, seed):
    gpu_gloo_pool(2).run(_w_graph_replays, seed, timeout=600)


# ---------------------------------------------------------------------------------------------
# 2b. Receive pool (direct receive: peers store rows straight into the outputs)
# ---------------------------------------------------------------------------------------------

RECV_POOL_BYTES = 512 << 20   # every case's outputs, several alive at once (4 x 2048 rows of 7168 bf16: 117 MB)
TINY_RECV_POOL_BYTES = 4 << 20  # a 1-10 MB output makes torch ask for a 20 MB segment: it overflows


def _w_case_in_pool(ctx, case: Case, seed: int, combine_input: str = "plain") -> dict:
    """The case twice on an engine with a receive pool; every dispatch must have gone direct (all
    outputs in the arena, so peers stored into them), or the test would not test the path; with
    ``combine_input`` (pulls_here) the combine reads the inputs of those ranks in place."""
    engine = engine_for(ctx, recv_pool_bytes=RECV_POOL_BYTES)
    before = engine.direct_calls
    _w_case(ctx, case, seed, RECV_POOL_BYTES, combine_input)
    return {"direct": engine.direct_calls - before, "overflows": engine.recv_pool.overflows}


# Combine inputs: pushed by every rank (plain), read in place on every rank (pool, the pull
# protocol), and both in one call (mixed: even ranks are read in place, odd ones push).
@pytest.mark.parametrize("world_size,combine_input", [(2, "plain"), (3, "plain"), (2, "pool"), (3, "pool"),
                                                       (3, "mixed")])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_recv_pool_engine_matches_oracle(gpu_gloo_pool, case, world_size, combine_input, seed):
    stats = gpu_gloo_pool(world_size).run(_w_case_in_pool, case, seed, combine_input, timeout=case.timeout)
    calls = 2 * (1 + (((2 if case.worst else 1)) if case.cached else 0))  # dispatches per rank, both runs
    for rank_stats in stats:
        assert rank_stats == {"direct": calls, "overflows": 0}, f"not every dispatch went direct: {stats}"


def _w_tiny_pool(ctx, seed: int) -> dict:
    """An arena too small for the outputs: torch's segment comes from cudaMalloc instead, the call
    takes the buffer path, and the results are still the oracle's."""
    engine = engine_for(ctx, recv_pool_bytes=TINY_RECV_POOL_BYTES)
    case = dataclasses.replace(next(c for c in CASES if c.name == "random-bf16-h7168-bias2"),
                               tokens=(120, 90, 0, 0))  # up to 210 rows of 14 KB: a 3 MB recv_x
    before = engine.direct_calls
    _w_case(ctx, case, seed, TINY_RECV_POOL_BYTES)
    return {"direct": engine.direct_calls - before, "overflows": engine.recv_pool.overflows}


def test_recv_pool_too_small_falls_back_to_the_buffer(gpu_gloo_pool, seed):
    stats = gpu_gloo_pool(2).run(_w_tiny_pool, seed, timeout=300)
    for rank_stats in stats:
        assert rank_stats["direct"] == 0 and rank_stats["overflows"] > 0, stats


def test_recv_pool_stress(gpu_gloo_pool, seed):
    """300 random back-to-back iterations (every mode) with a receive pool."""
    stats = gpu_gloo_pool(STRESS_RANKS).run(_w_stress, seed, 300, RECV_POOL_BYTES, timeout=900)
    assert stats[0]["cached"] > 0 and stats[0]["worst"] > 0 and stats[0]["fp8"] > 0, stats[0]
    assert all(rank_stats["pulled"] > 0 for rank_stats in stats), f"no combine was read in place: {stats}"


def test_recv_pool_cuda_graph_replays(gpu_gloo_pool, seed):
    """Under capture the outputs come from the graph's own pool (the receiver takes the buffer
    path) while its peers keep the protocol: replays stay exact."""
    gpu_gloo_pool(2).run(_w_graph_replays, seed, RECV_POOL_BYTES, timeout=600)


def test_pulled_combine_cuda_graph_replays(gpu_gloo_pool, seed):
    """A captured combine whose inputs are in the receive pool: its peers read them in place on
    every replay (publication and the closing handshake run on device epochs)."""
    gpu_gloo_pool(2).run(_w_graph_replays, seed, RECV_POOL_BYTES, True, timeout=600)


def _w_outputs_outlive_engine(ctx, seed: int) -> None:
    """A user may keep recv_x after the engine is gone: the arena's memory stays until torch gives
    its segments back."""
    import gc

    import torch.distributed as dist

    from moe_ep.comm import recv_pool
    from moe_ep.comm.backends.intranode import IntranodeEngine

    engine = IntranodeEngine(ctx.group, ctx.device, SMALL_NVL_BYTES, recv_pool_bytes=64 << 20)
    tokens, hidden, num_topk, num_experts = 40, 512, 4, 8 * ctx.world_size
    (x, idx, weights, in_rank, per_expert), _, _ = _graph_inputs(ctx, seed, tokens, hidden, num_topk, num_experts)
    x, idx, weights, in_rank, per_expert = on(ctx, (x, idx, weights, in_rank, per_expert))
    recv_x = engine.dispatch(x, None, in_rank, per_expert, idx, weights, 1, 0, num_experts)[0]
    assert engine.direct_calls == 1 and engine.recv_pool.contains(recv_x)
    kept = recv_x.clone()
    base = engine.recv_pool.base
    torch.cuda.synchronize(ctx.device)
    dist.barrier(group=ctx.group)
    del engine
    gc.collect()
    assert any(p.base == base for p in recv_pool._RETAINED), "the pool must be kept while torch holds its segments"
    recv_x.mul_(2)  # the memory is still this process's to write
    torch.cuda.synchronize(ctx.device)
    assert torch.equal(recv_x, kept * 2)
    dist.barrier(group=ctx.group)


def test_recv_pool_outputs_outlive_the_engine(gpu_gloo_pool, seed):
    gpu_gloo_pool(2).run(_w_outputs_outlive_engine, seed, timeout=300)


def _w_pull_switched_off(ctx, seed: int) -> dict:
    """MOE_EP_COMBINE_PULL=0 on rank 0 only: its combine inputs, in the pool like rank 1's, are
    pushed all the same (rank 1's are read in place), and the results are the oracle's."""
    from moe_ep.comm.backends.intranode import IntranodeEngine
    from moe_ep.comm.recv_pool import COMBINE_PULL_ENV

    previous = os.environ.get(COMBINE_PULL_ENV)
    os.environ[COMBINE_PULL_ENV] = "0" if ctx.rank == 0 else "1"
    try:
        engine = IntranodeEngine(ctx.group, ctx.device, SMALL_NVL_BYTES, recv_pool_bytes=64 << 20)
    finally:
        if previous is None:
            os.environ.pop(COMBINE_PULL_ENV, None)
        else:
            os.environ[COMBINE_PULL_ENV] = previous
    case = next(c for c in CASES if c.name == "random-bf16-h2560-bias1")
    for rep in range(2):  # run_case checks pull_calls against what pulls_here says: rank 0 must not pull
        run_case(ctx, engine, case, seed + rep, f"{case.name} (MOE_EP_COMBINE_PULL per rank)", "pool")
        engine_input = engine.empty_combine_input(4, case.hidden, torch.bfloat16)
        assert engine.recv_pool.contains(engine_input)
    return {"pulled": engine.pull_calls, "direct": engine.direct_calls}


def test_combine_pull_switched_off_on_one_rank(gpu_gloo_pool, seed):
    stats = gpu_gloo_pool(2).run(_w_pull_switched_off, seed, timeout=300)
    assert stats[0]["pulled"] == 0 and stats[1]["pulled"] == 2 and all(s["direct"] == 2 for s in stats), stats


def _w_pool_disagrees(ctx) -> None:
    from moe_ep.comm.backends.intranode import IntranodeEngine

    with environ(MOE_EP_RECV_POOL_BYTES=str(8 << 20) if ctx.rank == 1 else "0"):
        with pytest.raises(ValueError, match="receive pool"):
            IntranodeEngine(ctx.group, ctx.device, SMALL_NVL_BYTES)
    torch.cuda.synchronize(ctx.device)


def test_ranks_with_and_without_a_recv_pool_raise(gpu_gloo_pool):
    """The senders' protocol changes with the pool, so ranks must agree on having one."""
    gpu_gloo_pool(2).run(_w_pool_disagrees, timeout=120)


# ---------------------------------------------------------------------------------------------
# 3. Bad input (one rank: no peer waits on a rank that raised)
# ---------------------------------------------------------------------------------------------

def _w_too_small(ctx, seed: int) -> None:
    """Both ranks receive about 4096 x 3/4 rows of the other (a rank's own rows bypass its buffer)."""
    from moe_ep.comm.backends.intranode import IntranodeEngine

    engine = IntranodeEngine(ctx.group, ctx.device, SMALL_NVL_BYTES)
    big = Case("too-big", tokens=(4096, 4096), hidden=4096, num_topk=2, local_experts=4)
    world = case_world(big, ctx.world_size, seed)
    r = ctx.rank
    _, per_expert, in_rank = oracle.dispatch_layout(world.topk_idx[r], world.num_experts, ctx.world_size)
    for payload in ("bf16", "fp8"):  # about 24 MiB and 12 MiB of rows for an 8 MiB buffer
        inputs = on(ctx, (as_payload(world.xs[r], payload), in_rank, per_expert, world.topk_idx[r],
                          world.topk_weights[r]))
        with pytest.raises(ValueError, match="num_nvl_bytes"):
            engine.dispatch(inputs[0], None, *inputs[1:], 1, 0, world.num_experts)
        with pytest.raises(ValueError, match="num_nvl_bytes"):  # the bound W is checked before any wait
            engine.dispatch(inputs[0], None, *inputs[1:], 1, 4096, world.num_experts)
    # The error left the engine usable: small calls still give the reference's results.
    for i, payload in enumerate(("bf16", "fp8")):
        small = Case(f"small-after-error-{payload}", tokens=(33, 20), hidden=256, payload=payload, num_topk=2,
                     local_experts=4, routing=SPARSE, cached=True, num_biases=1)
        run_case(ctx, engine, small, seed + 1 + i, small.name)
    torch.cuda.synchronize(ctx.device)


def test_num_nvl_bytes_too_small_raises(gpu_gloo_pool, seed):
    gpu_gloo_pool(2).run(_w_too_small, seed, timeout=300)


def _w_one_rank_overflows(ctx, seed: int) -> None:
    """Only rank 1's buffer is too small for what rank 0 sends it: EVERY rank raises (the notify
    step hands every rank the whole count matrix), naming rank 1, instead of some rank writing past
    a peer's buffer or waiting for a rank that gave up."""
    from moe_ep.comm.backends.intranode import IntranodeEngine

    engine = IntranodeEngine(ctx.group, ctx.device, SMALL_NVL_BYTES)
    uneven = Case("uneven", tokens=(4096, 8), hidden=4096, num_topk=2, local_experts=4)
    world = case_world(uneven, ctx.world_size, seed)
    _, per_expert, in_rank = oracle.dispatch_layout(world.topk_idx[ctx.rank], world.num_experts, ctx.world_size)
    inputs = on(ctx, (world.xs[ctx.rank], in_rank, per_expert, world.topk_idx[ctx.rank], world.topk_weights[ctx.rank]))
    with pytest.raises(ValueError, match=r"num_nvl_bytes=.*rank 1 needs"):
        engine.dispatch(inputs[0], None, *inputs[1:], 1, 0, world.num_experts)
    small = Case("small-after-overflow", tokens=(21, 34), hidden=256, num_topk=2, local_experts=4, routing=SPARSE,
                 num_biases=1)
    run_case(ctx, engine, small, seed + 1, small.name)
    torch.cuda.synchronize(ctx.device)


def test_one_rank_overflowing_raises_on_every_rank(gpu_gloo_pool, seed):
    gpu_gloo_pool(2).run(_w_one_rank_overflows, seed, timeout=300)


def _w_knobs_disagree(ctx) -> None:
    """chunk_rows decides which flag covers which rows: ranks that disagree would wait on the wrong
    flags, so building the engine raises on every rank instead."""
    from moe_ep.comm.backends.intranode import IntranodeEngine

    with environ(MOE_EP_INTRANODE_CHUNK_ROWS="16" if ctx.rank == 1 else "8"):
        with pytest.raises(ValueError, match="different intranode knobs"):
            IntranodeEngine(ctx.group, ctx.device, SMALL_NVL_BYTES)
    torch.cuda.synchronize(ctx.device)


def test_ranks_with_different_knobs_raise(gpu_gloo_pool):
    gpu_gloo_pool(2).run(_w_knobs_disagree, timeout=120)


def _w_other_sizes_raise(ctx, seed: int) -> None:
    """Ranks that pass a routed dispatch other sizes (hidden, payload form, top-k columns) would
    read each other's rows at wrong offsets: the notify hands every rank every rank's sizes, so
    EVERY rank raises ValueError naming each rank's value, before any row moves; the shared engine
    then still gives the oracle's results."""
    engine = engine_for(ctx)
    r, R = ctx.rank, ctx.world_size
    gen = torch.Generator().manual_seed(seed + 7 * r)
    num_experts, tokens = 4 * R, 19 + 6 * r

    def call(hidden: int, payload: str, num_topk: int):
        x = (torch.randn(tokens, hidden, generator=gen) * 0.5).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:num_topk] for _ in range(tokens)])
        weights = torch.rand(tokens, num_topk, generator=gen)
        _, per_expert, in_rank = oracle.dispatch_layout(idx, num_experts, R)
        inputs = on(ctx, (as_payload(x, payload), in_rank, per_expert, idx, weights))
        return lambda: engine.dispatch(inputs[0], None, *inputs[1:], 1, 0, num_experts)

    every = [256 + 128 * q for q in range(R)]
    for args, expected in [((every[r], "bf16", 2), rf"hidden by rank: \[{', '.join(map(str, every))}\]"),
                           ((256, "fp8" if r == 1 else "bf16", 2), r"FP8 \(x as a tuple\) by rank: \[0, 1"),
                           ((256, "bf16", 2 + r), r"top-k columns \(0: no topk_idx\) by rank: \[2, 3")]:
        with pytest.raises(ValueError, match=expected):
            call(*args)()
    small = Case("small-after-other-sizes", tokens=(21, 34, 9, 13), hidden=256, num_topk=2, local_experts=4,
                 routing=SPARSE, cached=True, num_biases=1)
    run_case(ctx, engine, small, seed + 1, small.name)
    torch.cuda.synchronize(ctx.device)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_with_other_dispatch_sizes_raise(gpu_gloo_pool, world_size, seed):
    gpu_gloo_pool(world_size).run(_w_other_sizes_raise, seed, timeout=300)


# Two ranks agree on a routed dispatch, then rank 1 passes another hidden size to a call with no
# host wait (the case): cached dispatch, worst-token dispatch or combine. Both kernels print the line
# and trap. worst_differs: after both values were agreed on, rank 0 passes num_worst_tokens 0 (a
# routed dispatch: it raises ValueError after its host wait) and rank 1 passes 32 (it traps). With
# one shared GPU, a rank whose trap coincided with the other's may report BLOCKED instead of RAISED
# (tests/trap_child.run_two_ranks); with one GPU each, both must raise.
_OTHER_SIZES_SETUP = """
from moe_ep.comm.backends.intranode import IntranodeEngine
from tests import oracle
engine = IntranodeEngine(dist.group.WORLD, device, 64 << 20)
torch.manual_seed(rank)
idx = torch.stack([torch.randperm(8)[:2] for _ in range(11)])
_, per_expert, in_rank = oracle.dispatch_layout(idx, 8, 2)
args = [t.to(device) for t in (in_rank, per_expert, idx, torch.rand(11, 2))]
x = torch.randn(11, 256, device=device).to(torch.bfloat16)
hidden = 128 if rank == 1 else 256
"""
_OTHER_SIZES_CALL = """
if case == "worst":
    engine.dispatch(x[:, :hidden].contiguous(), None, *args, 1, 32, 8)
elif case == "worst_differs":  # both values agreed on first, then rank 1 passes 32, rank 0 0
    for w in (32, 0):
        engine.dispatch(x, None, *args, 1, w, 8)
    torch.cuda.synchronize()
    engine.dispatch(x, None, *args, 1, 32 if rank == 1 else 0, 8)
else:
    recv_x, _, recv_w, _, handle = engine.dispatch(x, None, *args, 1, 0, 8)
    torch.cuda.synchronize()
    if case == "cached":
        engine.dispatch(x[:, :hidden].contiguous(), handle, None, None, None, None, 1, 0, 8)
    else:
        engine.combine(recv_x[:, :hidden].contiguous(), handle, recv_w, [])
"""


@pytest.mark.parametrize("case", ["cached", "worst", "combine", "worst_differs"])
def test_other_sizes_without_a_host_wait_trap_with_a_message(require_intranode_kernels, tmp_path, case):
    """Where there is no host wait to raise from, the kernel that compares the ranks' sizes (the
    notify for a dispatch, the barrier before a combine) prints which rank passed what and traps
    on both ranks: an exception, never rows read at wrong offsets."""
    from tests.trap_child import run_two_ranks

    output = run_two_ranks(tmp_path, _OTHER_SIZES_SETUP, _OTHER_SIZES_CALL, case)
    assert "NO ERROR" not in output, output
    if case == "worst_differs":  # rank 0 (0: a host wait) raises ValueError, rank 1 (32: none) traps
        assert "rank 0: RAISED ValueError" in output and "num_worst_tokens by rank: [0, 32]" in output, output
        assert "rank 1: RAISED" in output, output
        assert ("moe_ep: intranode dispatch on rank 1: rank 0 called with other sizes than this rank "
                "(hidden=256, fp8=0, x element bytes=2, scale columns=0, top-k columns=2, num_experts=8, cached=0, "
                "num_worst_tokens=0 there;") in output, output
        return
    call = "combine" if case == "combine" else "dispatch"
    for rank, other, theirs in ((0, 1, 128), (1, 0, 256)):
        assert (f"moe_ep: intranode {call} on rank {rank}: rank {other} called with other sizes than this rank "
                f"(hidden={theirs},") in output, output
        blocked = f"rank {rank}: BLOCKED" in output
        assert f"rank {rank}: RAISED" in output or (blocked and "GPUS 1" in output), output
    assert "RAISED" in output, output


def _w_negative_size(ctx) -> None:
    from moe_ep.comm.backends.intranode import IntranodeEngine

    with pytest.raises(ValueError, match="num_nvl_bytes"):
        IntranodeEngine(ctx.group, ctx.device, -1)


def test_negative_num_nvl_bytes_raises(gpu_gloo_pool):
    """The error names the caller's argument (num_nvl_bytes), not an internal one."""
    gpu_gloo_pool(1).run(_w_negative_size, timeout=120)


# ---------------------------------------------------------------------------------------------
# 4. Buffer over NCCL (1 and 2 GPUs) equals the reference backend
# ---------------------------------------------------------------------------------------------

NCCL_CASES = [
    Case("bf16", tokens=(64, 37), hidden=2048, routing=SPARSE, num_biases=1),
    Case("fp8", tokens=(45, 64), hidden=2048, payload="fp8", num_biases=2),
    Case("worst-bf16", tokens=(50, 0), hidden=7168, routing=SPARSE, worst=True),
    Case("worst-fp8", tokens=(31, 60), hidden=2560, payload="fp8", worst=True, num_biases=1),
    Case("cached-bf16", tokens=(40, 40), hidden=384, routing=SPARSE, cached=True, expert_alignment=4),
    Case("cached-worst-fp8", tokens=(29, 41), hidden=384, payload="fp8", cached=True, worst=True),
]


def compare_buffer_with_reference(ctx, buffer, reference, case: Case, seed: int, what: str) -> None:
    """Identical inputs through Buffer (the intranode kernels) and ReferenceBackend: every
    output, handle[0..2] included, bit for bit."""
    num_ranks, me = ctx.world_size, ctx.rank
    world = case_world(case, num_ranks, seed)
    num_experts = world.num_experts
    layouts = [oracle.dispatch_layout(world.topk_idx[r], num_experts, num_ranks) for r in range(num_ranks)]
    per_rank, per_expert, in_rank = on(ctx, layouts[me])
    worst = max(received_rows(layouts, dst) for dst in range(num_ranks)) + 3 if case.worst else 0
    x, idx, weights = on(ctx, (as_payload(world.xs[me], case.payload), world.topk_idx[me], world.topk_weights[me]))

    *got, _event = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights,
                                   expert_alignment=case.expert_alignment, num_worst_tokens=worst)
    want = reference.dispatch(x, None, in_rank, per_expert, idx, weights, case.expert_alignment, worst, num_experts)
    for i, name in enumerate(("recv_x", "recv_topk_idx", "recv_topk_weights")):
        oracle.assert_same(got[i], on_cpu(want[i]), f"{what}: {name}")
    assert got[3] == want[3], f"{what}: num_recv_tokens_per_expert_list {got[3]}, reference {want[3]}"
    for i in range(3):
        oracle.assert_same(got[4][i], want[4][i].cpu(), f"{what}: handle[{i}]")
    handle, ref_handle = got[4], want[4]

    if case.cached:
        fresh = on(ctx, as_payload(case_world(case, num_ranks, seed + 101).xs[me], case.payload))
        cached, *rest = buffer.dispatch(fresh, handle=handle)
        assert all(item is None for item in rest[:4]), f"{what}: cached dispatch returns (recv_x, None x4, event)"
        ref_cached = reference.dispatch(fresh, ref_handle, None, None, None, None, 1, 0, None)[0]
        oracle.assert_same(cached, on_cpu(ref_cached), f"{what}: cached recv_x")

    # Combine: the same expert outputs (NaN in worst-token padding rows) and biases for both.
    rows = handle[3].num_recv_rows
    x_back = oracle.make_tokens(torch.Generator().manual_seed(seed * 13 + me), rows, case.hidden)
    x_back[received_rows(layouts, me):] = POISON
    # Through empty_combine_input: with a receive pool the peers read it in place.
    x_back = buffer.empty_combine_input(rows, case.hidden, torch.bfloat16).copy_(on(ctx, x_back))
    biases = on(ctx, make_biases(seed, me, world.xs[me].shape[0], case.hidden, case.num_biases, torch.bfloat16))
    combined, combined_w, _event = buffer.combine(x_back, handle, topk_weights=got[2], bias=tuple(biases))
    ref_combined, ref_w = reference.combine(x_back, ref_handle, want[2], biases)
    oracle.assert_same(combined, ref_combined.cpu(), f"{what}: combined_x")
    oracle.assert_same(combined_w, ref_w.cpu(), f"{what}: combined_topk_weights")


def _w_buffer_vs_reference(ctx, seed: int, recv_pool_bytes: int = 0) -> None:
    from moe_ep.comm import Buffer
    from moe_ep.comm.backends.reference import ReferenceBackend

    buffer = Buffer(ctx.group, num_nvl_bytes=int(1e9), recv_pool_bytes=recv_pool_bytes)
    uses_kernel = getattr(buffer.backend, "uses_kernel", None)
    if uses_kernel is None or not uses_kernel("dispatch"):
        pytest.skip(f"Buffer's {buffer.backend.name} backend does not run dispatch through the intranode kernels "
                    "(CudaBackend.uses_kernel('dispatch') is False)")
    reference = ReferenceBackend(ctx.group, ctx.device)
    for i, case in enumerate(NCCL_CASES):
        # Top-k needs at least k experts: on one rank the case gets enough local experts.
        case = dataclasses.replace(case, local_experts=max(case.local_experts, -(-case.num_topk // ctx.world_size)))
        for rep in range(2):
            compare_buffer_with_reference(ctx, buffer, reference, case, seed + 17 * i + 1_000_003 * rep,
                                          f"{case.name} (run {rep + 1} of 2)")
    torch.cuda.synchronize()
    if recv_pool_bytes:
        engine = buffer.backend.intranode
        assert engine.recv_pool is not None and engine.direct_calls > 0, "the Buffer's dispatches never went direct"
        assert engine.pull_calls > 0, "no combine of the Buffer was read in place"


def _w_dispatch_bad_expert_id(ctx, seed: int) -> None:
    """A routed dispatch whose topk_idx holds an id outside [-1, E) raises ValueError naming
    topk_idx on every rank (each has the bad entry): the range is read after the host wait, with no
    synchronisation of its own. The Buffer stays usable: the next dispatch equals the reference."""
    from moe_ep.comm import Buffer
    from moe_ep.comm.backends.reference import ReferenceBackend

    buffer = Buffer(ctx.group, num_nvl_bytes=64 << 20)
    if not buffer.backend.uses_kernel("dispatch"):
        pytest.skip("the Buffer does not run dispatch through the intranode kernels")
    case = next(c for c in CASES if c.name == "random-bf16-h2048")
    case = dataclasses.replace(case, local_experts=max(case.local_experts, -(-case.num_topk // ctx.world_size)))
    world = case_world(case, ctx.world_size, seed)
    x, idx, weights = on(ctx, (world.xs[ctx.rank], world.topk_idx[ctx.rank], world.topk_weights[ctx.rank]))
    num_experts = world.num_experts
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    for bad in (num_experts, -3):
        wrong = idx.clone()
        wrong[wrong.shape[0] // 2, 0] = bad
        with pytest.raises(ValueError, match=f"topk_idx holds expert id {bad}"):
            buffer.dispatch(x, topk_idx=wrong, topk_weights=weights, **layout)
    got = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, **layout)
    want = ReferenceBackend(ctx.group, ctx.device).dispatch(x, None, in_rank, per_expert, idx, weights, 1, 0,
                                                            num_experts)
    for i, name in enumerate(("recv_x", "recv_topk_idx", "recv_topk_weights")):
        oracle.assert_same(got[i], on_cpu(want[i]), f"after the bad calls: {name}")


@pytest.mark.parametrize("world_size", [1, 2])
def test_dispatch_with_a_bad_expert_id_raises_after_the_host_wait(nccl_pool, world_size, seed):
    nccl_pool(world_size).run(_w_dispatch_bad_expert_id, seed, timeout=300)


_BAD_ID_WORST_SETUP = r'''
buffer = Buffer(dist.group.WORLD, num_nvl_bytes=64 << 20)
assert buffer.backend.uses_kernel("dispatch"), buffer.backend.describe()
x = torch.randn(5, 256, device="cuda").to(torch.bfloat16)
topk_idx = torch.randint(0, 16, (5, 2), device="cuda")
weights = torch.rand(5, 2, device="cuda")
per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 16)
layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, num_worst_tokens=8, **layout)
torch.cuda.synchronize()
topk_idx[3, 1] = {bad}
'''


@pytest.mark.parametrize("bad", [16, -2])
def test_worst_token_dispatch_with_a_bad_expert_id_traps_with_a_message(require_intranode_kernels, bad):
    """With num_worst_tokens there is no host wait to raise from, so the notify kernel checks the
    ids in its pass over topk_idx and stops with one line naming the entry and the bound; the host
    gets an exception, never silent garbage."""
    from tests.trap_child import assert_call_traps

    assert_call_traps(_BAD_ID_WORST_SETUP.format(bad=bad),
                      "buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, num_worst_tokens=8, **layout)",
                      f"moe_ep: dispatch on rank 0: topk_idx[3][1] = {bad} is outside [-1, 15] (num_experts = 16)")


@pytest.mark.parametrize("world_size", [1, 2])
def test_buffer_over_nccl_equals_reference(nccl_pool, world_size, seed):
    """One rank per GPU: 1 (the Buffer -> CudaBackend -> engine path on any GPU machine) and 2."""
    nccl_pool(world_size).run(_w_buffer_vs_reference, seed, timeout=300)


@pytest.mark.parametrize("world_size", [1, 2])
def test_buffer_with_recv_pool_equals_reference(nccl_pool, world_size, seed):
    """The same through a Buffer built with recv_pool_bytes (its dispatches must go direct)."""
    nccl_pool(world_size).run(_w_buffer_vs_reference, seed, RECV_POOL_BYTES, timeout=300)


# ---------------------------------------------------------------------------------------------
# 5. compute-sanitizer
# ---------------------------------------------------------------------------------------------

SANITIZER_TIMEOUT_S = 900
SANITIZER_SCRIPT = os.path.join(REPO_ROOT, "tests", "intranode_sanitizer_case.py")
SANITIZER_NVL_BYTES = 64 << 20
SANITIZER_OK_LINE = "intranode sanitizer case: all checks passed"
# Tiny on purpose (memcheck and racecheck slow kernels down by orders of magnitude): 17 tokens,
# hidden 256, 8 experts over 2 ranks, top-2; run by tests/intranode_sanitizer_case.py.
TINY = {"tokens": (17, 17), "hidden": 256, "num_topk": 2, "local_experts": 4}
SANITIZER_CASES = [
    Case("sanitizer-bf16-cached", **TINY, routing=SPARSE, cached=True, num_biases=1),
    Case("sanitizer-fp8-worst-cached", **TINY, payload="fp8", worst=True, cached=True, num_biases=2),
    Case("sanitizer-bf16-zero-token-rank", **{**TINY, "tokens": (17, 0)}, expert_alignment=4),
]


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_reports_no_errors(require_intranode_kernels, tool):
    assert_sanitizer_clean(tool, SANITIZER_SCRIPT, SANITIZER_OK_LINE, SANITIZER_TIMEOUT_S)


def test_empty_tensors_makes_one_tensor_per_spec(require_intranode_kernels):
    """The engine allocates a dispatch's outputs with one call (after its host wait, while the GPU
    idles): each spec's shape, dtype and device, None for None, and a negative size refused."""
    from moe_ep import _C
    device = torch.cuda.current_device()
    specs = [((3, 7168), torch.bfloat16), None, ((0, 8), torch.int64), ((5,), torch.int32),
             ((2, 56), torch.float32), ((4, 4), FP8_DTYPE)]
    out = _C.empty_tensors(specs, device)
    assert len(out) == len(specs) and out[1] is None
    for spec, t in zip(specs, out):
        if spec is not None:
            assert (tuple(t.shape), t.dtype, t.device) == (spec[0], spec[1], torch.device("cuda", device))
            assert t.is_contiguous()
    out[0].fill_(1.5)
    assert out[0].float().sum().item() == 1.5 * 3 * 7168
    with pytest.raises(ValueError, match="negative size"):
        _C.empty_tensors([((2, -1), torch.float32)], device)
