"""GPU: the low-latency (decode) kernels of ``csrc/low_latency.cu``, through
``moe_ep.comm.backends.low_latency.LowLatencyEngine``, against the specification.

The engine has the interface of the reference backend's ``LowLatencyState`` (``dispatch``,
``combine``, ``clean``, ``next_combine_buffer``, ``mask``), whose semantics are the specification
(shared/API.md, README "Low-latency layout"). What is checked, and how exactly:

* ``recv_count``, ``layout_range`` (``begin << 32 | count``, sources in rank order) and
  ``src_info`` (each source's rows in its (token, k) order, -1 in unused slots): exactly, against
  :func:`expected_layout` (the README's rule, cross-checked with ``oracle.ll_expected_pairs``).
* bf16 rows: bit for bit (``oracle.check_ll_recv`` as well). FP8 rows: scales within
  ``SCALE_RTOL`` of the reference formula ``max(amax, 1e-4) / 448`` (``round_scale``: exactly the
  smallest power of two >= it; ``use_ue8m0``: those exponents packed, exactly); dequantized values
  within FP8 rounding (:func:`check_dequant`); the FP8 bytes equal ``moe_ep.comm.fp8``'s quantizer's
  (:func:`check_fp8_bits`).
* combine: within bf16 tolerance (``oracle.assert_close``) of the float32 sum over k of
  weight x expert row, cast to bf16 (``oracle.ll_combine`` for bf16; for FP8, from the rows the
  experts actually returned, gathered from every rank, since the kernel's scales may differ from
  the reference's in the last bit).

Tests:

1. Shared-GPU ranks (a gloo pool whose rank r runs on cuda:(r % count), 2 and 3 ranks): a matrix of
   cases (random / skewed / -1 entries / a rank with 0 tokens / T < M / hidden 7168, 2560, 384 /
   bf16, FP8, round_scale, UE8M0 / many experts), each run three times in a row on one engine
   with fresh data (both result buffers; the outputs are poisoned after each check, so whatever a
   call does not write shows up two calls later), cycling receive hooks and combine modes; plus
   dedicated tests of hooks, cumulative statistics, masked ranks, zero-copy, ``out=`` (contiguous
   and strided), two dispatches in flight, and repeated combines of one handle.
2. A CUDA graph: dispatch (+hook) + toy expert + combine captured on 2 ranks, replayed 1000 times
   with fresh inputs, every replay checked on the GPU against a vectorised expectation and every
   100th against the oracle.
3. The receive hook overlaps a matmul on the same stream.
4. Bad input: ``num_bytes`` too small (the error names ``num_rdma_bytes``) or not positive.
5. ``Buffer`` on 2 GPUs over NCCL, with MOE_EP_EXPERIMENTAL_KERNELS=low_latency, equals the
   reference backend.
6. compute-sanitizer memcheck and racecheck over a tiny 2-rank run (tests/ll_sanitizer_case.py).

Engines are collective to build, so each rank process keeps one per (world size, num_bytes) in
``_ENGINES`` (every rank runs the same test sequence, so every rank builds them in the same order).
Known limits of the kernels, which no case exceeds (checked by :func:`check_within_limits`): hidden
a multiple of 8 (128 for FP8, 512 for UE8M0), at most 1024 experts, at most M rows from one
source to one expert.
"""
from __future__ import annotations

import os
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pytest
import torch
import torch.distributed as dist

from moe_ep.comm.fp8 import (FP8_AMAX_FLOOR, FP8_DTYPE, FP8_GROUP_SIZE, FP8_MAX, pack_ue8m0,
                             per_token_group_dequant_fp8, unpack_ue8m0)
from tests import oracle
from tests.env import environ
from tests.conftest import kernels_missing
from tests.sanitizer import assert_sanitizer_clean

pytestmark = pytest.mark.gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 32                       # num_max_dispatch_tokens_per_rank of most cases
NUM_BYTES = 256 << 20        # per rank; holds every case below (each case asserts it)
EXPERIMENTAL_ENV = "MOE_EP_EXPERIMENTAL_KERNELS"

# fmt -> (use_fp8, round_scale, use_ue8m0)
FORMATS = {
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8-round": (True, True, False),
    "ue8m0": (True, True, True),
}
SCALE_RTOL = 1e-6            # FP8 scales vs max(amax, 1e-4) / 448 (a division may differ in its last bit)
FP8_REL = 2.0 ** -4          # e4m3: half an ulp is at most 2^-4 of the value (normal range)
FP8_SUB = 2.0 ** -9          # ... and at most 2^-10 x scale below it (subnormals); twice that, for margin
SENTINEL = 3.25              # around an out= view: must stay untouched
POISON = float("nan")

LL_ROUTING = (("drop_prob", 0.15), ("duplicate_prob", 0.25), ("all_dropped_token", True))
SKEWED = (("routing", "skewed"),)   # every token to one expert (the last unless hot_expert is given)
NOTHING = (("drop_prob", 1.0),)     # every entry -1: nothing is sent anywhere

MODES = ("plain", "zero_copy", "out", "out_strided")
REP_HOOKS = ((False, False), (True, False), (True, True))   # (dispatch hook, combine hook) per repetition
REPS = 3

_ENGINES: dict[tuple[int, int], Any] = {}
_LAYOUTS: dict[int, tuple] = {}


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

def ll_kernels_missing() -> Optional[str]:
    """Why the low-latency kernels cannot run here (None when they can)."""
    return kernels_missing("low_latency", "ll_dispatch")


def require_ll_kernels() -> None:
    reason = ll_kernels_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def ll_pool(gpu_gloo_pool):
    """``gpu_gloo_pool``, skipping (with the reason) when the build has no low-latency kernels."""
    def get(world_size: int):
        require_ll_kernels()
        return gpu_gloo_pool(world_size)
    return get


def make_engine(group, device: torch.device, num_bytes: int):
    from moe_ep.comm.backends.low_latency import LowLatencyEngine

    return LowLatencyEngine(group, device, num_bytes)


def needed_bytes(m: int, hidden: int, num_ranks: int, num_experts: int, num_topk: int) -> int:
    from moe_ep.comm.backends.low_latency import ll_size_hint

    return ll_size_hint(m, hidden, num_ranks, num_experts, num_topk)


def engine_for(ctx, num_bytes: int = NUM_BYTES):
    """This rank's engine for the pool's world size, built on first use (collectively). Reused
    across tests on purpose: whatever a call leaves behind must never reach a later call."""
    key = (ctx.world_size, num_bytes)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = make_engine(ctx.group, ctx.device, num_bytes)
    return engine


def sync(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def ensure_layout(ctx, engine, key: tuple) -> None:
    """Collective: before the first call with other sizes (M, hidden, E, top-k, FP8, UE8M0) on a
    shared engine, zero this rank's whole region once all ranks are idle.

    The buffer layout (where each buffer's flags live) depends on the sizes, and the engine does
    not clean when they change (test_layout_change_after_clean covers that on its own); the other
    tests must not depend on it."""
    if _LAYOUTS.get(id(engine)) == key:
        return
    sync(ctx)
    dist.barrier(group=ctx.group)
    engine.ipc.local_view().zero_()
    sync(ctx)
    dist.barrier(group=ctx.group)
    _LAYOUTS[id(engine)] = key


# ---------------------------------------------------------------------------------------------
# Cases and data (CPU, from the seeded oracle world: the same on every rank)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """``tokens``: per rank (the first world-size entries are used); ``local_experts`` L per
    rank (E = L x R, capped at the kernels' 1024 experts); ``routing``: make_world keyword
    arguments as (name, value) pairs."""

    name: str
    hidden: int = 2560
    fmt: str = "bf16"
    tokens: tuple = (M, M - 7, M - 13)
    num_topk: int = 8
    local_experts: int = 8
    m: int = M
    routing: tuple = LL_ROUTING
    timeout: float = 300.0

    def num_experts(self, num_ranks: int) -> int:
        return min(self.local_experts * num_ranks, 1024 // num_ranks * num_ranks)


CASES = [
    Case("random-bf16-h7168", hidden=7168),
    Case("random-bf16-h2560", hidden=2560),
    Case("random-bf16-h384", hidden=384),
    Case("random-fp8-h7168", hidden=7168, fmt="fp8"),
    Case("random-fp8-h2560", hidden=2560, fmt="fp8"),
    Case("round-scale-fp8-h7168", hidden=7168, fmt="fp8-round"),
    Case("round-scale-fp8-h2560", hidden=2560, fmt="fp8-round"),
    Case("ue8m0-h7168", hidden=7168, fmt="ue8m0"),
    Case("ue8m0-h2560", hidden=2560, fmt="ue8m0"),
    Case("skewed-one-expert-bf16-h2560", tokens=(M, M, M), routing=SKEWED),
    Case("skewed-one-expert-fp8-h7168", hidden=7168, fmt="fp8", tokens=(M, M, M), routing=SKEWED),
    Case("zero-token-rank-bf16-h2560", tokens=(0, M, 5)),
    Case("zero-token-ranks-fp8-h2560", fmt="fp8", tokens=(M, 0, 0)),
    Case("fewer-tokens-than-m-fp8-h2560", fmt="fp8", tokens=(1, 4, 2)),
    Case("nothing-routed-bf16-h384", hidden=384, routing=NOTHING),
    Case("top1-bf16-h2560", num_topk=1),
    Case("many-experts-bf16-h384", hidden=384, local_experts=512, m=16, tokens=(16, 11, 16)),
    Case("many-experts-fp8-h512", hidden=512, fmt="fp8", local_experts=512, m=16, tokens=(9, 16, 13)),
]


def case_world(case: Case, num_ranks: int, seed: int) -> oracle.World:
    num_experts = case.num_experts(num_ranks)
    routing = dict(case.routing)
    if routing.get("routing") == "skewed":
        routing.setdefault("hot_expert", num_experts - 1)
    return oracle.make_world(seed, num_ranks, list(case.tokens[:num_ranks]), case.hidden, case.num_topk,
                             num_experts, **routing)


def check_within_limits(world: oracle.World, m: int) -> None:
    """The test data respects the kernels' documented limits (a failure here is a test bug)."""
    assert world.num_experts <= 1024, f"test data: {world.num_experts} experts, the kernels take at most 1024"
    for src, idx in enumerate(world.topk_idx):
        assert idx.shape[0] <= m, f"test data: rank {src} has {idx.shape[0]} tokens, more than M={m}"
        per_expert = Counter(e for e in idx.flatten().tolist() if e >= 0)
        worst = max(per_expert.values(), default=0)
        assert worst <= m, f"test data: rank {src} sends {worst} rows to one expert, more than M={m}"


def on(ctx, x):
    """A fresh, packed copy on the rank's device (never an alias of the oracle's CPU tensors)."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(on(ctx, part) for part in x)
    return torch.empty(x.shape, dtype=x.dtype, device=ctx.device).copy_(x)


def exact_pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s (positive, normal float32), exactly: from frexp, not from
    a float log2."""
    mantissa, exponent = torch.frexp(s)              # s = mantissa * 2^exponent, mantissa in [0.5, 1)
    power = ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)  # 2^exponent
    return torch.where(mantissa == 0.5, s, power)


def reference_scales(x: torch.Tensor) -> torch.Tensor:
    """[..., H/128] float32: max(amax, 1e-4) / 448 per 128-group (moe_ep.comm.fp8's rule, unrounded)."""
    groups = x.float().unflatten(-1, (x.shape[-1] // FP8_GROUP_SIZE, FP8_GROUP_SIZE))
    return groups.abs().amax(dim=-1).clamp_min(FP8_AMAX_FLOOR) / FP8_MAX


def dequant_received(recv_x, use_ue8m0: bool) -> torch.Tensor:
    """recv_x (fp8, scales) -> bf16 [L, slots, H], every row (invalid rows hold whatever is there)."""
    data, scales = recv_x
    if use_ue8m0:
        scales = unpack_ue8m0(scales)
    return per_token_group_dequant_fp8(data, scales, torch.bfloat16)


def poison_dispatch_outputs(recv_x, recv_count: torch.Tensor, handle: tuple) -> None:
    """Overwrite every output of a dispatch (on the current stream)."""
    recv_count.fill_(-7)
    handle[0].fill_(-5)
    handle[1].fill_(-3)
    if isinstance(recv_x, tuple):
        recv_x[0].view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn
        recv_x[1].fill_(-1 if recv_x[1].dtype == torch.int32 else POISON)
    else:
        recv_x.fill_(POISON)


# ---------------------------------------------------------------------------------------------
# Expectations and checks
# ---------------------------------------------------------------------------------------------

@dataclass
class Expected:
    rows: list                  # per local expert: (source rank, token) of each valid row, in slot order
    recv_count: torch.Tensor    # [L] int32
    layout_range: torch.Tensor  # [L, R] int64
    src_info: torch.Tensor      # [L, R*M] int32


def expected_layout(rank: int, world: oracle.World, m: int, masked: Sequence[int] = ()) -> Expected:
    """What ``rank`` receives, slot by slot: inside each local expert's block, sources in rank
    order, each source's rows in its (token, k) order (a token with the expert twice comes twice);
    nothing from or to a masked rank."""
    num_ranks, num_local = world.num_ranks, world.num_local_experts
    slots = num_ranks * m
    routes = [idx.tolist() for idx in world.topk_idx]
    rows: list = [[] for _ in range(num_local)]
    layout_range = torch.zeros((num_local, num_ranks), dtype=torch.int64)
    for l in range(num_local):
        expert = rank * num_local + l
        for src in range(num_ranks):
            begin = len(rows[l])
            if rank not in masked and src not in masked:
                for t, experts in enumerate(routes[src]):
                    rows[l].extend((src, t) for e in experts if e == expert)
            layout_range[l, src] = (begin << 32) | (len(rows[l]) - begin)
    src_info = torch.full((num_local, slots), -1, dtype=torch.int32)
    for l, block in enumerate(rows):
        assert len(block) <= slots, f"test data: local expert {l} would receive {len(block)} rows > {slots} slots"
        if block:
            src_info[l, :len(block)] = torch.tensor([t for _, t in block], dtype=torch.int32)
    # The same multiset of (source, token) pairs as the oracle's.
    pairs = oracle.ll_expected_pairs(rank, world.topk_idx, world.num_experts, masked)
    for l in range(num_local):
        want = Counter({p: c for p, c in pairs[l].items() if p[0] not in masked})
        assert Counter(rows[l]) == want, f"expected_layout disagrees with oracle.ll_expected_pairs for local expert {l}"
    return Expected(rows, torch.tensor([len(b) for b in rows], dtype=torch.int32), layout_range, src_info)


def check_dequant(q: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, what: str, rows=None) -> None:
    """FP8 rows ``q`` [n, H] with float32 ``scales`` [n, H/128] approximate bf16 ``x`` [n, H] within
    e4m3 rounding: |q * s - x| <= 2^-4 |x| + 2^-9 s."""
    n, hidden = x.shape
    groups = hidden // FP8_GROUP_SIZE
    s = scales.float().reshape(n, groups, 1)
    deq = q.float().reshape(n, groups, FP8_GROUP_SIZE) * s
    ref = x.float().reshape(n, groups, FP8_GROUP_SIZE)
    bad = ~((deq - ref).abs() <= ref.abs() * FP8_REL + s * FP8_SUB)  # NaN counts as bad
    if bool(bad.any()):
        i, g, c = bad.nonzero()[0].tolist()
        where = f"row {i}" if rows is None else f"row {i} {rows[i]}"
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} FP8 values beyond e4m3 rounding; first at "
                             f"{where}, column {g * FP8_GROUP_SIZE + c}: dequantized {deq[i, g, c].item()!r}, "
                             f"token value {ref[i, g, c].item()!r}, scale {s[i, g, 0].item()!r}")


def check_fp8_scales(raw: torch.Tensor, x: torch.Tensor, fmt: str, what: str) -> torch.Tensor:
    """Received scales of the bf16 rows ``x`` [n, H] (raw: float32 [n, G] or packed int32 [n, G/4])
    against the reference formula; returns them as float32 [n, G]."""
    _, round_scale, use_ue8m0 = FORMATS[fmt]
    want = reference_scales(x)
    if use_ue8m0:
        oracle.assert_same(raw, pack_ue8m0(exact_pow2_ceil(want)), f"{what}: UE8M0 scales (packed exponents)")
        return unpack_ue8m0(raw)
    if round_scale:
        oracle.assert_same(raw, exact_pow2_ceil(want), f"{what}: round_scale scales (powers of two)")
        return raw
    rel = (raw - want).abs() / want
    if not bool((rel <= SCALE_RTOL).all()):  # NaN fails too
        i, g = (~(rel <= SCALE_RTOL)).nonzero()[0].tolist()
        raise AssertionError(f"{what}: scales differ from max(amax, 1e-4) / 448 by more than {SCALE_RTOL} (relative); "
                             f"first at row {i}, group {g}: got {raw[i, g].item()!r}, expected {want[i, g].item()!r}")
    return raw


def check_recv(ctx, world: oracle.World, m: int, got, fmt: str, what: str, masked: Sequence[int] = ()) -> Expected:
    """Every output of a low-latency dispatch on this rank (see the module docstring)."""
    recv_x, recv_count, handle = got
    use_fp8, _, use_ue8m0 = FORMATS[fmt]
    me = ctx.rank
    num_local, hidden, num_ranks = world.num_local_experts, world.hidden, world.num_ranks
    slots = num_ranks * m
    exp = expected_layout(me, world, m, masked)
    for name, value in (("recv_count", recv_count), ("handle[0]", handle[0]), ("handle[1]", handle[1])):
        assert isinstance(value, torch.Tensor) and value.device == ctx.device, f"{what}: {name} must be on {ctx.device}"
    assert isinstance(handle, tuple) and len(handle) == 5, f"{what}: handle must be a 5-tuple"
    assert tuple(handle[2:]) == (m, hidden, world.num_experts), \
        f"{what}: handle[2:] = {tuple(handle[2:])}, expected {(m, hidden, world.num_experts)}"
    oracle.assert_same(recv_count, exp.recv_count, f"{what}: recv_count")
    oracle.assert_same(handle[1], exp.layout_range, f"{what}: handle[1] (layout_range)")
    oracle.assert_same(handle[0], exp.src_info, f"{what}: handle[0] (src_info)")
    if not use_fp8:
        oracle.check_ll_recv(me, world, m, recv_x, recv_count, handle, False, masked_ranks=masked)
        return exp

    assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"{what}: recv_x must be (fp8, scales)"
    data, scales = recv_x
    groups = hidden // FP8_GROUP_SIZE // (4 if use_ue8m0 else 1)
    scale_dtype = torch.int32 if use_ue8m0 else torch.float32
    assert data.device == ctx.device and scales.device == ctx.device, f"{what}: recv_x must be on {ctx.device}"
    assert data.dtype == FP8_DTYPE and tuple(data.shape) == (num_local, slots, hidden), \
        f"{what}: recv_x[0] {data.dtype} {tuple(data.shape)}, expected {FP8_DTYPE} {(num_local, slots, hidden)}"
    assert scales.dtype == scale_dtype and tuple(scales.shape) == (num_local, slots, groups), \
        f"{what}: recv_x[1] {scales.dtype} {tuple(scales.shape)}, expected {scale_dtype} {(num_local, slots, groups)}"
    assert scales.stride(-2) == 1, f"{what}: scales must be column-major in their last two dims, strides {scales.stride()}"
    data, scales = data.cpu(), scales.cpu()
    for l, rows in enumerate(exp.rows):
        if not rows:
            continue
        n = len(rows)
        x = torch.stack([world.xs[src][t] for src, t in rows])
        where = f"{what}: local expert {l}"
        s = check_fp8_scales(scales[l, :n].contiguous(), x, fmt, where)
        check_dequant(data[l, :n], s, x, where, rows)
        check_fp8_bits(data[l, :n], x, fmt, where, rows)
    return exp


def check_fp8_bits(q: torch.Tensor, x: torch.Tensor, fmt: str, what: str, rows) -> None:
    """The FP8 bytes equal moe_ep.comm.fp8's quantizer's on the same rows, bit for bit (the kernel
    divides by the scale as the quantizer does)."""
    from moe_ep.comm.fp8 import per_token_group_quant_fp8

    _, round_scale, _ = FORMATS[fmt]
    want, _ = per_token_group_quant_fp8(x, round_scale=round_scale)
    got_bits, want_bits = q.view(torch.uint8), want.view(torch.uint8)
    differ = got_bits != want_bits
    if bool(differ.any()):
        i, c = differ.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(differ.sum())} FP8 values differ from the reference quantizer's; first at "
                             f"row {i} {rows[i]}, column {c}: byte {int(got_bits[i, c])} vs {int(want_bits[i, c])} "
                             f"(token value {x[i, c].item()!r})")


def expected_combine(ctx, world: oracle.World, outputs: torch.Tensor, layout_range: torch.Tensor, fmt: str,
                     masked: Sequence[int] = (), gathered: bool = False) -> torch.Tensor:
    """combined_x [T, H] bf16 of this rank when every rank's experts returned ``outputs`` (CPU,
    [L, R*M, H], in recv_x's layout). bf16 toy-expert outputs: the oracle, end to end. FP8 (or
    ``gathered``, for any outputs): the kernel's own transported rows may differ from the
    reference's by a last-bit scale difference, so the sum is taken over the rows the experts
    actually returned (collective: every rank's outputs and layout_range are gathered); the
    received rows themselves are checked by check_recv."""
    me = ctx.rank
    use_fp8 = FORMATS[fmt][0]
    if not use_fp8 and not gathered:
        return oracle.ll_combine(world.xs[me], world.topk_idx[me], world.topk_weights[me], world.num_experts,
                                 world.num_ranks, False, masked_ranks=masked)
    assert not masked, "the gathered expectation needs every rank"
    shared: list = [None] * ctx.world_size
    dist.all_gather_object(shared, (outputs.cpu(), layout_range.cpu()), group=ctx.group)
    num_local = world.num_local_experts
    idx, weights = world.topk_idx[me], world.topk_weights[me]
    acc = torch.zeros(idx.shape[0], world.hidden, dtype=torch.float32)
    seen: Counter = Counter()
    for t, experts in enumerate(idx.tolist()):
        for k, e in enumerate(experts):
            if e < 0:
                continue
            dst, l = divmod(e, num_local)
            j = seen[e]
            seen[e] += 1
            begin, count = oracle.unpack_layout_range(shared[dst][1], l, me)
            assert j < count, f"rank {dst} local expert {l} holds {count} rows of rank {me}, expected more than {j}"
            acc[t] += float(weights[t, k]) * shared[dst][0][l, begin + j].float()
    return acc.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# One dispatch + combine
# ---------------------------------------------------------------------------------------------

def combine_with_mode(ctx, engine, outputs: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, handle,
                      mode: str, hook_mode: bool, hook_barrier: bool, what: str) -> torch.Tensor:
    """Combine ``outputs`` (CPU) through the engine: ``plain`` (a device copy), ``zero_copy``
    (written into next_combine_buffer(handle)), ``out`` (a contiguous view inside a sentinel frame)
    or ``out_strided`` (a strided view). With ``hook_mode`` the returned tensor is poisoned before
    hook(): only what the hook writes counts."""
    num_tokens, hidden = idx.shape[0], outputs.shape[-1]
    cpu_side = (idx.cpu(), weights.cpu())
    x = on(ctx, outputs)
    out = frame = None
    if mode == "zero_copy":
        x = engine.next_combine_buffer(handle)
        assert isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and tuple(x.shape) == tuple(outputs.shape) \
            and x.device == ctx.device and x.is_contiguous(), \
            f"{what}: next_combine_buffer: {x.dtype} {tuple(x.shape)} on {x.device}, expected contiguous bf16 " \
            f"{tuple(outputs.shape)} on {ctx.device}"
        x.copy_(outputs)
    elif mode == "out":
        frame = torch.full((num_tokens + 2, hidden), SENTINEL, dtype=torch.bfloat16, device=ctx.device)
        out = frame[1:num_tokens + 1]
    elif mode == "out_strided":
        frame = torch.full((num_tokens, hidden + 16), SENTINEL, dtype=torch.bfloat16, device=ctx.device)
        out = frame[:, 8:8 + hidden]
        assert num_tokens < 2 or not out.is_contiguous()
    else:
        assert mode == "plain", mode
    if out is not None:
        out.fill_(POISON)
    result = engine.combine(x, idx, weights, handle, out, hook_mode)
    assert isinstance(result, tuple) and len(result) == 2, f"{what}: combine must return (combined_x, hook)"
    combined, hook = result
    if hook_mode:
        assert callable(hook), f"{what}: return_recv_hook=True must give a callable hook, got {hook!r}"
        combined.fill_(POISON)
        sync(ctx)
        if hook_barrier:  # every rank has issued its sends; none has received
            dist.barrier(group=ctx.group)
        hook()
    else:
        assert hook is None, f"{what}: return_recv_hook=False must give no hook, got {hook!r}"
    sync(ctx)
    assert isinstance(combined, torch.Tensor) and combined.device == ctx.device, f"{what}: combined_x must be on {ctx.device}"
    assert combined.dtype == torch.bfloat16 and tuple(combined.shape) == (num_tokens, hidden), \
        f"{what}: combined_x {combined.dtype} {tuple(combined.shape)}, expected bf16 {(num_tokens, hidden)}"
    if out is not None:
        assert combined.data_ptr() == out.data_ptr() and combined.stride() == out.stride(), \
            f"{what}: with out= the result must be out itself"
        rest = torch.cat([frame[0], frame[-1]]) if mode == "out" else torch.cat([frame[:, :8], frame[:, 8 + hidden:]], 1)
        assert bool((rest == SENTINEL).all()), f"{what}: combine wrote outside out= ({mode})"
    oracle.assert_same(x, outputs, f"{what}: combine input x after the call (must be left unchanged)")
    oracle.assert_same((idx, weights), cpu_side, f"{what}: combine topk_idx/topk_weights after the call")
    return combined


def run_case(ctx, engine, case: Case, seed: int, rep: int, what: str, masked: Sequence[int] = (),
             hook_barrier: bool = False, hooks: Optional[tuple] = None, mode: Optional[str] = None,
             reset_layout: bool = True) -> list:
    """One dispatch + toy experts + combine of a seeded world, every result checked. Hooks and the
    combine mode cycle with ``rep`` unless given. With ``masked`` the masked ranks must not call
    (they model failed ranks). Returns this rank's recv_count."""
    use_fp8, round_scale, use_ue8m0 = FORMATS[case.fmt]
    me, num_ranks = ctx.rank, ctx.world_size
    world = case_world(case, num_ranks, seed)
    num_experts, m, hidden, num_topk = world.num_experts, case.m, case.hidden, case.num_topk
    check_within_limits(world, m)
    need = needed_bytes(m, hidden, num_ranks, num_experts, num_topk)
    assert need <= engine.num_bytes, f"test setup: {case.name} needs {need} bytes, the engine has {engine.num_bytes}"
    if reset_layout:
        ensure_layout(ctx, engine, (m, hidden, num_experts, num_topk, use_fp8, use_ue8m0))
    dispatch_hook, combine_hook = hooks if hooks is not None else REP_HOOKS[rep % len(REP_HOOKS)]
    if mode is None:
        mode = MODES[(rep + zlib.crc32(case.name.encode())) % len(MODES)]
    what = f"{what} [dispatch hook={dispatch_hook}, combine hook={combine_hook}, combine mode={mode}]"

    cpu_in = (world.xs[me], world.topk_idx[me], world.topk_weights[me])
    x, idx, weights = on(ctx, cpu_in)
    result = engine.dispatch(x, idx, m, num_experts, None, use_fp8, round_scale, use_ue8m0, dispatch_hook)
    assert isinstance(result, tuple) and len(result) == 4, f"{what}: dispatch must return (recv_x, recv_count, handle, hook)"
    recv_x, recv_count, handle, hook = result
    if dispatch_hook:
        assert callable(hook), f"{what}: return_recv_hook=True must give a callable hook, got {hook!r}"
        poison_dispatch_outputs(recv_x, recv_count, handle)  # only what hook() writes counts
        sync(ctx)
        if hook_barrier:  # every rank's send half has finished without any receive
            dist.barrier(group=ctx.group)
        hook()
    else:
        assert hook is None, f"{what}: return_recv_hook=False must give no hook, got {hook!r}"
    sync(ctx)
    oracle.assert_same((x, idx), cpu_in[:2], f"{what}: dispatch inputs after the call (must be left unchanged)")
    check_recv(ctx, world, m, (recv_x, recv_count, handle), case.fmt, f"{what}: dispatch", masked)
    counts = recv_count.cpu().tolist()

    outputs = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), me, world.num_local_experts, use_fp8, use_ue8m0)
    expected = expected_combine(ctx, world, outputs, handle[1], case.fmt, masked)
    combined = combine_with_mode(ctx, engine, outputs, idx, weights, handle, mode, combine_hook, hook_barrier, what)
    oracle.assert_close(combined, expected, f"{what}: combined_x")
    # This buffer's next use (two dispatches later) must overwrite everything it reports.
    poison_dispatch_outputs(recv_x, recv_count, handle)
    sync(ctx)
    return counts


# ---------------------------------------------------------------------------------------------
# 1. Shared-GPU ranks
# ---------------------------------------------------------------------------------------------

def _w_case(ctx, case: Case, seed: int) -> list:
    engine = engine_for(ctx)
    return [run_case(ctx, engine, case, seed + 1_000_003 * rep, rep, f"{case.name} (run {rep + 1} of {REPS})")
            for rep in range(REPS)]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_engine_matches_reference_semantics(ll_pool, case, world_size, seed):
    counts = ll_pool(world_size).run(_w_case, case, seed, timeout=case.timeout)
    assert len(counts) == world_size and all(len(per_rank) == REPS for per_rank in counts)
    if case.routing == SKEWED and case.tokens[:world_size] == (case.m,) * world_size:
        hot = case.num_experts(world_size) - 1
        num_local = case.num_experts(world_size) // world_size
        for rep in range(REPS):  # the hot expert's block is full: R x M rows
            assert counts[hot // num_local][rep][hot % num_local] == world_size * case.m, counts


# The staged FP8 send (MOE_EP_LL_SEND=staged, read by the launcher at every launch) must give the
# same results as the default direct send: FP8 cases only (BF16 rows take one path).
STAGED_CASE_NAMES = ("random-fp8-h7168", "round-scale-fp8-h2560", "ue8m0-h7168", "skewed-one-expert-fp8-h7168",
                     "zero-token-ranks-fp8-h2560", "many-experts-fp8-h512")
STAGED_CASES = [case for case in CASES if case.name in STAGED_CASE_NAMES]
assert len(STAGED_CASES) == len(STAGED_CASE_NAMES), "a staged-send case was renamed"


def _w_case_staged(ctx, case: Case, seed: int) -> list:
    with environ(MOE_EP_LL_SEND="staged"):
        return _w_case(ctx, case, seed)


@pytest.mark.parametrize("case", STAGED_CASES, ids=[case.name for case in STAGED_CASES])
def test_staged_send_matches_reference_semantics(ll_pool, case, seed):
    counts = ll_pool(3).run(_w_case_staged, case, seed, timeout=case.timeout)
    assert len(counts) == 3 and all(len(per_rank) == REPS for per_rank in counts)


# The cases each engine variant below (two-kernel launch, bf16 partial sums) runs: both payloads,
# skewed routing, ranks with zero tokens, nothing routed, many experts.
VARIANT_CASE_NAMES = ("random-fp8-h7168", "random-bf16-h2560", "skewed-one-expert-fp8-h7168",
                      "zero-token-ranks-fp8-h2560", "nothing-routed-bf16-h384", "many-experts-fp8-h512")
VARIANT_CASES = [case for case in CASES if case.name in VARIANT_CASE_NAMES]
assert len(VARIANT_CASES) == len(VARIANT_CASE_NAMES), "an engine-variant case was renamed"

# A call without a hook runs send and receive in one kernel (LowLatencyEngine.fused, the default);
# the two-kernel form (as a hook runs it, MOE_EP_LL_FUSED=0) must give the same results. Hooks off.
SPLIT_CASES = VARIANT_CASES


def _w_case_split(ctx, case: Case, seed: int) -> None:
    engine = engine_for(ctx)
    engine.fused = False
    try:
        for rep in range(2):
            run_case(ctx, engine, case, seed + rep, rep, f"{case.name}, two kernels (run {rep + 1} of 2)",
                     hooks=(False, False), mode=("plain", "zero_copy")[rep])
    finally:
        engine.fused = True


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[case.name for case in SPLIT_CASES])
def test_split_launch_matches_reference_semantics(ll_pool, case, seed):
    ll_pool(3).run(_w_case_split, case, seed, timeout=case.timeout)


# The fused dispatch's other block order (MOE_EP_LL_FUSED_ORDER=publish_first: a block publishes its
# rows before laying out its receive; the default lays out first, read at every launch) must give
# the same results. Hooks off: only the fused kernel has an order to choose.
def _w_case_publish_first(ctx, case: Case, seed: int) -> None:
    with environ(MOE_EP_LL_FUSED_ORDER="publish_first"):
        for rep in range(2):
            run_case(ctx, engine_for(ctx), case, seed + rep, rep, f"{case.name}, publish first (run {rep + 1} of 2)",
                     hooks=(False, False), mode=("plain", "zero_copy")[rep])


@pytest.mark.parametrize("case", VARIANT_CASES, ids=[case.name for case in VARIANT_CASES])
def test_publish_first_order_matches_reference_semantics(ll_pool, case, seed):
    ll_pool(3).run(_w_case_publish_first, case, seed, timeout=case.timeout)


# The combine's partial sums in the dtype the engine was NOT built with (MOE_EP_LL_COMBINE_PARTIALS,
# which sets LowLatencyEngine.bf16_partials alike on every rank; default bfloat16, so this runs the
# float32 partials): the same results within the bf16 tolerance every combine is held to, fused,
# split (hooks) and in every combine mode (run_case cycles them). The toy experts keep a token's
# terms of one sign, so this checks where the partial rows land and how they are read, not the
# bf16 setting's extra rounding (bounded by 2^-8 of the partials' magnitudes).
PARTIALS_CASES = VARIANT_CASES


def _w_case_other_partials(ctx, case: Case, seed: int) -> list:
    engine = engine_for(ctx)
    built = engine.bf16_partials
    engine.bf16_partials = not built
    try:
        return _w_case(ctx, case, seed)
    finally:
        engine.bf16_partials = built


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", PARTIALS_CASES, ids=[case.name for case in PARTIALS_CASES])
def test_other_partials_dtype_matches_reference_semantics(ll_pool, case, world_size, seed):
    counts = ll_pool(world_size).run(_w_case_other_partials, case, seed, timeout=case.timeout)
    assert len(counts) == world_size and all(len(per_rank) == REPS for per_rank in counts)


def _w_trace(ctx, seed: int) -> list:
    """Phase trace on: one fused dispatch + combine, then the same with hooks (split kernels). Every
    block of every kernel records its events in order (non-decreasing %globaltimer)."""
    engine = engine_for(ctx)
    case = Case("trace-fp8", hidden=2560, fmt="fp8")
    trace = engine.enable_trace()
    try:
        grids = []
        for hooks in ((False, False), (True, True)):
            trace.zero_()
            run_case(ctx, engine, case, seed, 0, f"trace, hooks={hooks}", hooks=hooks, mode="plain")
            sync(ctx)
            t = trace.cpu()
            events = {0: 5, 1: 4, 2: 5, 3: 3}  # recorded events per kernel (csrc/low_latency.cu TraceKernel)
            used = []
            for kernel, n in events.items():
                rows = t[kernel, :, :n]
                ran = rows[:, 0] != 0
                assert bool(ran[0]), f"hooks={hooks}: kernel {kernel}: block 0 recorded no start"
                rows = rows[ran]
                assert bool((rows != 0).all()), f"hooks={hooks}: kernel {kernel}: a block missed an event: {rows}"
                assert bool((rows[:, 1:] >= rows[:, :-1]).all()), \
                    f"hooks={hooks}: kernel {kernel}: events out of order: {rows}"
                used.append(int(ran.sum()))
            # A receive starts once its send half ended (same kernel, or the next on the stream); the
            # fused dispatch (default order, MOE_EP_LL_FUSED_ORDER) publishes between its receive's
            # layout and its copy, the split one before its receive starts.
            b = t[:, 0]
            assert int(b[3, 0]) >= int(b[2, 4]), b
            if hooks[0]:
                assert int(b[1, 0]) >= int(b[0, 4]), b
            else:
                assert int(b[1, 0]) >= int(b[0, 3]) and int(b[1, 2]) <= int(b[0, 4]) <= int(b[1, 3]), b
            grids.append(used)
        return grids
    finally:
        engine.trace = None


def test_phase_trace_records_every_kernel(ll_pool, seed):
    grids = ll_pool(2).run(_w_trace, seed, timeout=300)
    assert all(len(g) == 2 for g in grids), grids


def _w_hooks(ctx, fmt: str, seed: int) -> None:
    """Both hooks; outputs poisoned between the send half and hook(); a barrier there shows the
    send halves complete without any receive."""
    engine = engine_for(ctx)
    case = Case(f"hooks-{fmt}", hidden=7168 if fmt != "bf16" else 2560, fmt=fmt)
    for rep in range(2):
        run_case(ctx, engine, case, seed + rep, rep, f"{case.name} (run {rep + 1} of 2)", hook_barrier=True,
                 hooks=(True, True), mode=("plain", "out")[rep])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_recv_hooks(ll_pool, world_size, fmt, seed):
    ll_pool(world_size).run(_w_hooks, fmt, seed, timeout=300)


def _w_combine_mode(ctx, mode: str, seed: int) -> None:
    engine = engine_for(ctx)
    case = Case(f"combine-{mode}", hidden=2560, fmt="fp8", tokens=(M, 0, 17))
    for rep in range(2):
        run_case(ctx, engine, case, seed + rep, rep, f"{case.name} (run {rep + 1} of 2)", hooks=(False, rep == 1),
                 mode=mode)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("mode", ["zero_copy", "out", "out_strided"])
def test_combine_output_modes(ll_pool, world_size, mode, seed):
    """zero_copy (next_combine_buffer(handle) written in place), out= contiguous inside a frame,
    out= strided: the result lands in out and nowhere else."""
    ll_pool(world_size).run(_w_combine_mode, mode, seed, timeout=300)


def _w_stats(ctx, seed: int) -> None:
    engine = engine_for(ctx)
    case = Case("stats-fp8-h2560", fmt="fp8")
    me, num_ranks = ctx.rank, ctx.world_size
    num_local = case.num_experts(num_ranks) // num_ranks
    initial = torch.randint(1, 1000, (num_local,), generator=torch.Generator().manual_seed(seed + 31 * me),
                            dtype=torch.int32)
    stats = on(ctx, initial)
    total = torch.zeros(num_local, dtype=torch.int32)
    for i, (hook_mode, with_stats) in enumerate([(False, True), (True, True), (False, False), (True, True)]):
        world = case_world(case, num_ranks, seed + i)
        check_within_limits(world, case.m)
        ensure_layout(ctx, engine, (case.m, case.hidden, world.num_experts, case.num_topk, True, False))
        x, idx = on(ctx, (world.xs[me], world.topk_idx[me]))
        recv_x, recv_count, handle, hook = engine.dispatch(x, idx, case.m, world.num_experts,
                                                           stats if with_stats else None, True, False, False, hook_mode)
        if hook_mode:
            hook()
        sync(ctx)
        want = expected_layout(me, world, case.m).recv_count
        oracle.assert_same(recv_count, want, f"dispatch {i}: recv_count")
        if with_stats:
            total += want
        oracle.assert_same(stats, initial + total,
                           f"cumulative_local_expert_recv_stats after dispatch {i} (hook={hook_mode}, stats given={with_stats})")


@pytest.mark.parametrize("world_size", [2, 3])
def test_cumulative_recv_stats(ll_pool, world_size, seed):
    ll_pool(world_size).run(_w_stats, seed, timeout=300)


LATE_S = 0.3  # how late the last rank starts one call in the wait-statistics test


def _w_wait_stats(ctx, seed: int) -> None:
    """``*_wait_recv_cost_stats`` timed by the kernels: each call adds, to the row it is given (row
    ``rank`` of an [R, R] tensor here), its wait for each source (ns). The last rank starts one call LATE_S late: in that call every other
    rank's entry for it is at least LATE_S / 2 and no other entry reaches that (the late rank finds
    everything there); a call nobody is late for stays below it everywhere (ranks sharing one GPU
    are time-sliced, milliseconds at most). With and without hooks; the results are checked too."""
    import time

    engine = engine_for(ctx)
    case = Case("wait-stats-fp8-h2560", fmt="fp8")
    me, num_ranks, late = ctx.rank, ctx.world_size, ctx.world_size - 1
    use_fp8, round_scale, use_ue8m0 = FORMATS[case.fmt]
    for i, (late_call, hook_mode) in enumerate([("dispatch", False), ("combine", False), ("dispatch", True),
                                                ("combine", True)]):
        world = case_world(case, num_ranks, seed + i)
        check_within_limits(world, case.m)
        ensure_layout(ctx, engine, (case.m, case.hidden, world.num_experts, case.num_topk, use_fp8, use_ue8m0))
        base = torch.randint(0, 1 << 40, (num_ranks, num_ranks), generator=torch.Generator().manual_seed(seed + i),
                             dtype=torch.int64)
        stats = {"dispatch": on(ctx, base), "combine": on(ctx, base)}
        what = f"late {late_call}, hook={hook_mode}"

        def start(call: str) -> None:
            sync(ctx)
            dist.barrier(group=ctx.group)
            if call == late_call and me == late:
                time.sleep(LATE_S)

        x, idx, weights = on(ctx, (world.xs[me], world.topk_idx[me], world.topk_weights[me]))
        start("dispatch")
        recv_x, recv_count, handle, hook = engine.dispatch(x, idx, case.m, world.num_experts, None, use_fp8,
                                                           round_scale, use_ue8m0, hook_mode, stats["dispatch"][me])
        if hook_mode:
            hook()
        sync(ctx)
        check_recv(ctx, world, case.m, (recv_x, recv_count, handle), case.fmt, f"{what}: dispatch")
        outputs = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), me, world.num_local_experts, use_fp8, use_ue8m0)
        expected = expected_combine(ctx, world, outputs, handle[1], case.fmt)
        start("combine")
        combined, hook = engine.combine(on(ctx, outputs), idx, weights, handle, None, hook_mode, stats["combine"][me])
        if hook_mode:
            hook()
        sync(ctx)
        oracle.assert_close(combined, expected, f"{what}: combined_x")
        for call, got in stats.items():
            delta = got.cpu() - base
            assert not torch.cat([delta[:me], delta[me + 1:]]).any(), \
                f"{what}: {call} changed rows other than rank {me}: {delta.tolist()}"
            row = delta[me].tolist()
            assert min(row) >= 0, f"{what}: {call} row {me} decreased: {row}"
            slow = [s for s, ns in enumerate(row) if ns >= LATE_S / 2 * 1e9]
            want = [late] if call == late_call and me != late else []
            assert slow == want, f"{what}: {call} on rank {me}: sources waited on >= {LATE_S / 2} s: {slow}, " \
                                 f"expected {want} (row, ns: {row})"


@pytest.mark.parametrize("world_size", [2, 3])
def test_wait_recv_cost_stats(ll_pool, world_size, seed):
    ll_pool(world_size).run(_w_wait_stats, seed, timeout=300)


def _w_masked(ctx, masked_rank: int, seed: int, engine=None) -> None:
    """Rank ``masked_rank`` is masked on every rank and makes no call (a failed rank): the others
    neither send to it nor wait for it. Then the mask is cleared and every rank runs again.
    ``engine``: this rank's engine (default: the shared one of ``engine_for``)."""
    engine = engine if engine is not None else engine_for(ctx)
    case = Case("masked-bf16-h2560", hidden=2560, tokens=(M, 20, 27))
    world = case_world(case, ctx.world_size, seed)
    ensure_layout(ctx, engine, (case.m, case.hidden, world.num_experts, case.num_topk, False, False))
    engine.mask[masked_rank] = 1
    try:
        if ctx.rank != masked_rank:
            # An even number of dispatches keeps this rank's double-buffer index in step with the
            # masked rank's, which makes none.
            for rep in range(2):
                run_case(ctx, engine, case, seed + rep, rep, f"rank {masked_rank} masked (run {rep + 1} of 2)",
                         masked=(masked_rank,), hooks=((False, False), (True, True))[rep])
        sync(ctx)
        dist.barrier(group=ctx.group)
    finally:
        engine.mask.zero_()
    sync(ctx)
    dist.barrier(group=ctx.group)
    for rep in range(2):
        run_case(ctx, engine, case, seed + 11 + rep, rep, f"after clearing the mask (run {rep + 1} of 2)")


@pytest.mark.parametrize("world_size", [2, 3])
def test_masked_rank(ll_pool, world_size, seed):
    ll_pool(world_size).run(_w_masked, 1, seed, timeout=300)


def _w_two_in_flight(ctx, fmt: str, seed: int, rounds: int = 3) -> None:
    """Two dispatches in flight (hooks), received in reverse order, both intact; then both combines
    in flight, received in reverse order. Repeated: the two buffers alternate back to back."""
    engine = engine_for(ctx)
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    case = Case(f"two-in-flight-{fmt}", hidden=2560, fmt=fmt)
    me = ctx.rank
    for r in range(rounds):
        worlds = [case_world(case, ctx.world_size, seed + 2 * r + i) for i in range(2)]
        for world in worlds:
            check_within_limits(world, case.m)
        ensure_layout(ctx, engine, (case.m, case.hidden, worlds[0].num_experts, case.num_topk, use_fp8, use_ue8m0))
        inputs = [on(ctx, (w.xs[me], w.topk_idx[me], w.topk_weights[me])) for w in worlds]
        got = [engine.dispatch(x, idx, case.m, w.num_experts, None, use_fp8, round_scale, use_ue8m0, True)
               for w, (x, idx, _) in zip(worlds, inputs)]
        assert got[0][1].data_ptr() != got[1][1].data_ptr() and got[0][2][0].data_ptr() != got[1][2][0].data_ptr(), \
            "two dispatches in flight must use the two result buffers"
        for i in (1, 0):
            got[i][3]()
        sync(ctx)
        outputs, handles = [], []
        for i, (world, (recv_x, recv_count, handle, _)) in enumerate(zip(worlds, got)):
            check_recv(ctx, world, case.m, (recv_x, recv_count, handle), fmt, f"round {r}, micro-batch {i}: dispatch")
            outputs.append(oracle.ll_expert_outputs(recv_x, recv_count.cpu(), me, world.num_local_experts, use_fp8,
                                                    use_ue8m0))
            handles.append(handle)
        expected = [expected_combine(ctx, w, o, h[1], fmt) for w, o, h in zip(worlds, outputs, handles)]
        pending = [engine.combine(on(ctx, o), idx, w, h, None, True)
                   for o, (_, idx, w), h in zip(outputs, inputs, handles)]
        for i in (1, 0):
            pending[i][1]()
        sync(ctx)
        for i in range(2):
            oracle.assert_close(pending[i][0], expected[i], f"round {r}, micro-batch {i}: combined_x")
        for recv_x, recv_count, handle, _ in got:
            poison_dispatch_outputs(recv_x, recv_count, handle)
        sync(ctx)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_two_dispatches_in_flight(ll_pool, world_size, fmt, seed):
    ll_pool(world_size).run(_w_two_in_flight, fmt, seed, timeout=300)


def _w_repeated_combine(ctx, fmt: str, seed: int, rounds: int = 2) -> None:
    """One handle combined three times with different expert outputs: the first two in flight at
    once (hooks, received in reverse order), then a third; each result its own."""
    engine = engine_for(ctx)
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    case = Case(f"repeated-combine-{fmt}", hidden=2560, fmt=fmt, tokens=(M, 13, 0))
    me = ctx.rank
    for r in range(rounds):
        world = case_world(case, ctx.world_size, seed + r)
        check_within_limits(world, case.m)
        ensure_layout(ctx, engine, (case.m, case.hidden, world.num_experts, case.num_topk, use_fp8, use_ue8m0))
        x, idx, weights = on(ctx, (world.xs[me], world.topk_idx[me], world.topk_weights[me]))
        recv_x, recv_count, handle, _ = engine.dispatch(x, idx, case.m, world.num_experts, None, use_fp8, round_scale,
                                                        use_ue8m0, False)
        sync(ctx)
        check_recv(ctx, world, case.m, (recv_x, recv_count, handle), fmt, f"round {r}: dispatch")
        base = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), me, world.num_local_experts, use_fp8, use_ue8m0)
        outputs = [(base.float() * factor).to(torch.bfloat16) for factor in (1.0, -0.5, 4.0)]  # exact in bf16
        expected = [expected_combine(ctx, world, o, handle[1], fmt, gathered=True) for o in outputs]
        first = engine.combine(on(ctx, outputs[0]), idx, weights, handle, None, True)
        second = engine.combine(on(ctx, outputs[1]), idx, weights, handle, None, True)
        second[1]()
        first[1]()
        third, hook = engine.combine(on(ctx, outputs[2]), idx, weights, handle, None, False)
        assert hook is None
        sync(ctx)
        for i, got in enumerate((first[0], second[0], third)):
            oracle.assert_close(got, expected[i], f"round {r}: combine {i + 1} of 3 of one handle")
        poison_dispatch_outputs(recv_x, recv_count, handle)
        sync(ctx)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_repeated_combines_of_one_handle(ll_pool, world_size, fmt, seed):
    ll_pool(world_size).run(_w_repeated_combine, fmt, seed, timeout=300)


# ---------------------------------------------------------------------------------------------
# 2. CUDA graph
# ---------------------------------------------------------------------------------------------

GRAPH_RANKS = 2
GRAPH_REPLAYS = 1000
GRAPH_ORACLE_EVERY = 100
GRAPH_M = 64
GRAPH_HIDDEN = 2048
GRAPH_TOPK = 8
GRAPH_LOCAL = 8
GRAPH_CHECKS = ("recv_count", "layout_range", "src_info", "rows", "scales", "combined_x")


def graph_inputs(gen: torch.Generator, it: int, num_ranks: int, m: int, hidden: int, num_topk: int,
                 num_experts: int, device: torch.device):
    """Every rank's inputs of replay ``it``, generated on the device from ``gen`` (seeded alike on
    every rank, so every rank holds the whole world): x [R, m, H] bf16 (no zeros), topk_idx
    [R, m, K] (distinct experts, some -1; replay kinds by ``it``: every token to one expert, a rank
    routing nowhere, duplicate experts), topk_weights [R, m, K]."""
    row_scale = torch.exp(torch.randn(num_ranks, m, 1, generator=gen, device=device) * 1.5)
    x = (torch.randn(num_ranks, m, hidden, generator=gen, device=device) * row_scale).to(torch.bfloat16)
    x = torch.where(x == 0, torch.full_like(x, 0.375), x)
    idx = torch.rand(num_ranks, m, num_experts, generator=gen, device=device).argsort(dim=-1)[..., :num_topk]
    drop = torch.rand(num_ranks, m, num_topk, generator=gen, device=device) < (0.0, 0.2, 0.6)[it % 3]
    idx = torch.where(drop, -1, idx)
    kind = it % 10
    if kind == 3:      # every token of every rank to one expert
        idx = torch.full_like(idx, -1)
        idx[..., 0] = (7 * it) % num_experts
    elif kind == 5:    # duplicate experts in half of the tokens
        idx[:, ::2, 1] = idx[:, ::2, 0]
    elif kind == 7:    # one rank routes nothing
        idx[it % num_ranks] = -1
    weights = torch.rand(num_ranks, m, num_topk, generator=gen, device=device) + 0.25
    return x, idx.contiguous(), weights


def exact_quant(x: torch.Tensor):
    """(q fp8, scales float32) with power-of-two scales computed exactly (round_scale)."""
    groups = x.float().unflatten(-1, (x.shape[-1] // FP8_GROUP_SIZE, FP8_GROUP_SIZE))
    scales = exact_pow2_ceil(reference_scales(x))
    q = (groups / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2), scales


def fast_expected(me: int, x_all, idx_all, w_all, m: int, num_local: int, fmt: str) -> dict:
    """The low-latency results of rank ``me`` with tensor ops on the device (the rules of
    expected_layout and oracle.ll_combine, vectorised; checked against them every
    GRAPH_ORACLE_EVERY replays)."""
    num_ranks, num_tokens, num_topk = idx_all.shape
    hidden = x_all.shape[-1]
    slots = num_ranks * m
    dev = idx_all.device
    pairs = num_tokens * num_topk
    first = me * num_local
    hits = idx_all.reshape(num_ranks, pairs, 1) == torch.arange(first, first + num_local, device=dev).view(1, 1, -1)
    per_src = hits.sum(1).t()                                   # [L, R]
    begin = per_src.cumsum(1) - per_src
    within = hits.to(torch.int64).cumsum(1) - 1                 # [R, pairs, L]
    row = begin.t().unsqueeze(1) + within
    discard = num_local * slots
    target = torch.where(hits, torch.arange(num_local, device=dev).view(1, 1, -1) * slots + row, discard).flatten()
    token = (torch.arange(pairs, device=dev) // num_topk).view(1, pairs, 1).expand(num_ranks, pairs, num_local)
    src = torch.arange(num_ranks, device=dev).view(-1, 1, 1).expand_as(token)
    src_info = torch.full((discard + 1,), -1, dtype=torch.int32, device=dev)
    src_info.scatter_(0, target, token.flatten().to(torch.int32))          # duplicates only at the discard slot
    row_of = torch.zeros(discard + 1, dtype=torch.int64, device=dev)
    row_of.scatter_(0, target, (src * num_tokens + token).flatten())
    recv_count = per_src.sum(1).to(torch.int32)
    rows = x_all.reshape(num_ranks * num_tokens, hidden).index_select(0, row_of[:-1]).view(num_local, slots, hidden)

    # combine: sum over k of weight x toy_expert(e, transported token), float32, then bf16
    use_fp8 = FORMATS[fmt][0]
    x_me, idx_me, w_me = x_all[me], idx_all[me], w_all[me]
    if use_fp8:
        q, s = exact_quant(x_me)
        x_me = per_token_group_dequant_fp8(q, s, torch.bfloat16)
    factor = (idx_me + 1).float() / 8.0                          # toy_expert's (e + 1) / 8
    toy = (x_me.float().unsqueeze(1) * factor.unsqueeze(-1)).to(torch.bfloat16)
    weights = torch.where(idx_me >= 0, w_me, 0.0)
    combined = (toy.float() * weights.unsqueeze(-1)).sum(1).to(torch.bfloat16)
    return {"recv_count": recv_count, "layout_range": (begin << 32) | per_src, "src_info": src_info[:-1].view(num_local, slots),
            "rows": rows, "valid": torch.arange(slots, device=dev).view(1, -1) < recv_count.view(-1, 1),
            "combined": combined}


def fast_mismatches(exp: dict, outputs: tuple, fmt: str) -> torch.Tensor:
    """[len(GRAPH_CHECKS)] int64 on the device: mismatching elements per output (no host sync)."""
    recv_x, recv_count, handle, _, combined = outputs
    use_fp8, _, use_ue8m0 = FORMATS[fmt]
    valid = exp["valid"].unsqueeze(-1)
    zero = torch.zeros((), dtype=torch.int64, device=recv_count.device)
    counts = [(recv_count != exp["recv_count"]).sum(), (handle[1] != exp["layout_range"]).sum(),
              (handle[0] != exp["src_info"]).sum()]
    if not use_fp8:
        counts += [((recv_x.view(torch.int16) != exp["rows"].view(torch.int16)) & valid).sum(), zero]
    else:
        data, raw = recv_x
        want = exact_pow2_ceil(reference_scales(exp["rows"]))
        got = unpack_ue8m0(raw) if use_ue8m0 else raw
        scale_bad = (raw != pack_ue8m0(want)) if use_ue8m0 else (raw != want)
        deq = data.float().unflatten(-1, (-1, FP8_GROUP_SIZE)) * got.unsqueeze(-1)
        ref = exp["rows"].float().unflatten(-1, (-1, FP8_GROUP_SIZE))
        row_bad = ~((deq - ref).abs() <= ref.abs() * FP8_REL + got.unsqueeze(-1) * FP8_SUB)
        counts += [(row_bad & valid.unsqueeze(-1)).sum(), (scale_bad & valid).sum()]
    close = torch.isclose(combined.float(), exp["combined"].float(), rtol=1e-2, atol=1e-3)
    counts.append((~close).sum())
    return torch.stack([c.to(torch.int64) for c in counts])


def _w_graph(ctx, fmt: str, seed: int, replays: int = GRAPH_REPLAYS, capture: bool = True) -> int:
    """Capture dispatch + hook + toy experts + combine once (after an eager warm-up on a side
    stream), replay with fresh inputs copied into the static tensors, check every replay.
    ``capture=False`` runs the same steps eagerly (for checking this test's own logic)."""
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    engine = engine_for(ctx)
    me, num_ranks, dev = ctx.rank, ctx.world_size, ctx.device
    m, hidden, num_topk, num_local = GRAPH_M, GRAPH_HIDDEN, GRAPH_TOPK, GRAPH_LOCAL
    num_experts = num_local * num_ranks
    assert needed_bytes(m, hidden, num_ranks, num_experts, num_topk) <= engine.num_bytes
    ensure_layout(ctx, engine, (m, hidden, num_experts, num_topk, use_fp8, use_ue8m0))
    gen = torch.Generator(device=dev).manual_seed(seed)
    x_s = torch.zeros((m, hidden), dtype=torch.bfloat16, device=dev)
    idx_s = torch.full((m, num_topk), -1, dtype=torch.int64, device=dev)
    w_s = torch.zeros((m, num_topk), dtype=torch.float32, device=dev)
    factors = ((torch.arange(num_local, dtype=torch.float32) + me * num_local + 1) / 8.0).view(-1, 1, 1).to(dev)

    def load(it: int):
        inputs = graph_inputs(gen, it, num_ranks, m, hidden, num_topk, num_experts, dev)
        x_s.copy_(inputs[0][me])
        idx_s.copy_(inputs[1][me])
        w_s.copy_(inputs[2][me])
        return inputs

    def step():
        recv_x, recv_count, handle, hook = engine.dispatch(x_s, idx_s, m, num_experts, None, use_fp8, round_scale,
                                                           use_ue8m0, True)
        hook()
        rows = dequant_received(recv_x, use_ue8m0) if use_fp8 else recv_x
        out = (rows.float() * factors).to(torch.bfloat16)     # oracle.toy_expert of every row
        combined, _ = engine.combine(out, idx_s, w_s, handle, None, False)
        return recv_x, recv_count, handle, out, combined

    def oracle_check(inputs, outputs, what: str) -> None:
        x_all, idx_all, w_all = (t.cpu() for t in inputs)
        world = oracle.World(num_experts, list(x_all), list(idx_all), list(w_all))
        recv_x, recv_count, handle, _, combined = outputs
        check_recv(ctx, world, m, (recv_x, recv_count, handle), fmt, f"{what}: dispatch")
        experts = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), me, num_local, use_fp8, use_ue8m0)
        want = expected_combine(ctx, world, experts, handle[1], fmt)
        oracle.assert_close(combined, want, f"{what}: combined_x")
        fast = fast_expected(me, *inputs, m, num_local, fmt)
        oracle.assert_close(fast["combined"], want, f"{what}: the vectorised expectation vs the oracle")
        slow = expected_layout(me, world, m)
        for name, value in (("recv_count", slow.recv_count), ("layout_range", slow.layout_range),
                            ("src_info", slow.src_info)):
            oracle.assert_same(fast[name], value, f"{what}: the vectorised expectation vs the oracle: {name}")

    # Eager warm-up on a side stream (as capture needs), checked like a replay.
    inputs = load(-1)
    if capture:
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            outputs = step()
        torch.cuda.current_stream(dev).wait_stream(side)
    else:
        outputs = step()
    sync(ctx)
    oracle_check(inputs, outputs, "eager warm-up")

    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captures on a side stream of its own
            static = step()
    bad = torch.zeros((replays, len(GRAPH_CHECKS)), dtype=torch.int64, device=dev)
    checked = 0
    for it in range(replays):
        inputs = load(it)
        if capture:
            graph.replay()
            outputs = static
        else:
            outputs = step()
        bad[it] = fast_mismatches(fast_expected(me, *inputs, m, num_local, fmt), outputs, fmt)
        if it % GRAPH_ORACLE_EVERY == 0 or it == replays - 1:
            sync(ctx)
            failed = bad[:it + 1].nonzero()
            if failed.numel():
                first, check = failed[0].tolist()
                raise AssertionError(f"replay {first}: {GRAPH_CHECKS[check]}: {int(bad[first, check])} elements differ "
                                     f"from the expectation (all mismatches per replay and output: "
                                     f"{bad[:it + 1].sum(0).tolist()})")
            if it % GRAPH_ORACLE_EVERY == 0:
                oracle_check(inputs, outputs, f"replay {it}")
            checked = it + 1
    sync(ctx)
    return checked


@pytest.mark.parametrize("fmt", ["bf16", "ue8m0"])
def test_cuda_graph_replays(ll_pool, fmt, seed):
    """2 ranks sharing a GPU, 1000 replays of one captured decode step, every replay checked."""
    checked = ll_pool(GRAPH_RANKS).run(_w_graph, fmt, seed, timeout=600)
    assert checked == [GRAPH_REPLAYS] * GRAPH_RANKS


# ---------------------------------------------------------------------------------------------
# 3. The receive hook overlaps compute
# ---------------------------------------------------------------------------------------------

def _w_overlap(ctx, seed: int) -> None:
    engine = engine_for(ctx)
    case = Case("overlap-fp8-h7168", hidden=7168, fmt="fp8")
    me = ctx.rank
    world = case_world(case, ctx.world_size, seed)
    check_within_limits(world, case.m)
    ensure_layout(ctx, engine, (case.m, case.hidden, world.num_experts, case.num_topk, True, False))
    gen = torch.Generator(device=ctx.device).manual_seed(seed + me)
    a = torch.randn(2048, 2048, generator=gen, device=ctx.device)
    b = torch.randn(2048, 2048, generator=gen, device=ctx.device)
    x, idx, weights = on(ctx, (world.xs[me], world.topk_idx[me], world.topk_weights[me]))

    recv_x, recv_count, handle, hook = engine.dispatch(x, idx, case.m, world.num_experts, None, True, False, False, True)
    during = a @ b          # on the same stream, between the send half and the receive half
    hook()
    after = a @ b
    sync(ctx)
    torch.testing.assert_close(during, after, msg=lambda msg: f"matmul between dispatch and hook: {msg}")
    check_recv(ctx, world, case.m, (recv_x, recv_count, handle), case.fmt, "dispatch with a matmul before hook()")

    outputs = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), me, world.num_local_experts, True)
    expected = expected_combine(ctx, world, outputs, handle[1], case.fmt)
    combined, hook = engine.combine(on(ctx, outputs), idx, weights, handle, None, True)
    during = a @ b
    hook()
    sync(ctx)
    torch.testing.assert_close(during, after, msg=lambda msg: f"matmul between combine and hook: {msg}")
    oracle.assert_close(combined, expected, "combined_x with a matmul before hook()")
    poison_dispatch_outputs(recv_x, recv_count, handle)
    sync(ctx)


def test_recv_hook_overlaps_matmul(ll_pool, seed):
    ll_pool(2).run(_w_overlap, seed, timeout=300)


# ---------------------------------------------------------------------------------------------
# 4. Bad input (one rank: no peer waits on a rank that raised)
# ---------------------------------------------------------------------------------------------

def _w_too_small(ctx, seed: int) -> None:
    fits = Case("fits-exactly-bf16-h2048", hidden=2048, tokens=(16,), m=16, local_experts=16)
    need = needed_bytes(fits.m, fits.hidden, 1, fits.num_experts(1), fits.num_topk)
    exact = make_engine(ctx.group, ctx.device, need)
    for rep in range(2):
        run_case(ctx, exact, fits, seed + rep, rep, f"{fits.name}: num_bytes = ll_size_hint (run {rep + 1} of 2)")

    short = make_engine(ctx.group, ctx.device, need - 1)
    for fmt in ("bf16", "fp8"):
        use_fp8 = FORMATS[fmt][0]
        world = case_world(Case("too-big", hidden=7168, fmt=fmt, tokens=(16,), m=16, local_experts=16), 1, seed)
        x, idx = on(ctx, (world.xs[0], world.topk_idx[0]))
        with pytest.raises(ValueError, match="num_rdma_bytes"):
            short.dispatch(x, idx, 16, world.num_experts, None, use_fp8, False, False, False)
    fits_world = case_world(fits, 1, seed)
    x, idx = on(ctx, (fits_world.xs[0], fits_world.topk_idx[0]))
    with pytest.raises(ValueError, match="num_rdma_bytes"):  # one byte short of what `fits` needs
        short.dispatch(x, idx, fits.m, fits.num_experts(1), None, False, False, False, False)
    # The errors left the engine usable for calls that fit.
    small = Case("small-after-error-fp8-h512", hidden=512, fmt="fp8", tokens=(16,), m=16, local_experts=16)
    for rep in range(2):
        run_case(ctx, short, small, seed + 7 + rep, rep, f"{small.name} (run {rep + 1} of 2)")
    sync(ctx)


def test_num_bytes_too_small_raises(ll_pool, seed):
    ll_pool(1).run(_w_too_small, seed, timeout=300)


def _w_bad_fused_order(ctx, seed: int) -> None:
    case = Case("after-bad-order-fp8-h512", hidden=512, fmt="fp8", tokens=(16,), m=16, local_experts=16)
    engine = engine_for(ctx)
    world = case_world(case, 1, seed)
    x, idx = on(ctx, (world.xs[0], world.topk_idx[0]))
    with environ(MOE_EP_LL_FUSED_ORDER="sideways"):
        with pytest.raises(ValueError, match="MOE_EP_LL_FUSED_ORDER must be 'layout_first' or 'publish_first'"):
            engine.dispatch(x, idx, case.m, case.num_experts(1), None, True, False, False, False)
    for rep in range(2):  # the refusal left the engine usable
        run_case(ctx, engine, case, seed + rep, rep, f"{case.name} (run {rep + 1} of 2)", hooks=(False, False))
    sync(ctx)


def test_bad_fused_order_raises(ll_pool, seed):
    ll_pool(1).run(_w_bad_fused_order, seed, timeout=120)


def _w_nonpositive(ctx) -> None:
    for num_bytes in (0, -1):
        with pytest.raises(ValueError):
            make_engine(ctx.group, ctx.device, num_bytes)


def test_nonpositive_num_bytes_raises(ll_pool):
    ll_pool(1).run(_w_nonpositive, timeout=120)


def test_buffer_size_hint_covers_the_kernels():
    """Buffer.get_low_latency_rdma_size_hint is never smaller than the kernels' ll_size_hint, with the
    outbox of NVSHMEM puts too (one expert per rank and a wide hidden size is its tightest case)."""
    require_ll_kernels()
    from moe_ep.comm import Buffer
    from moe_ep.comm.backends.low_latency import ll_size_hint

    for m, hidden, num_ranks, num_experts in [(1, 8, 1, 1), (16, 384, 2, 16), (128, 7168, 8, 256), (256, 2560, 4, 64),
                                              (32, 4096, 3, 1023), (64, 512, 64, 1024), (128, 7168, 1, 1),
                                              (256, 7168, 8, 8)]:
        hint = Buffer.get_low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts)
        for puts in (False, True):
            need = ll_size_hint(m, hidden, num_ranks, num_experts, 8, puts=puts)
            assert hint >= need, (f"M={m} H={hidden} R={num_ranks} E={num_experts} puts={puts}: Buffer hint {hint} "
                                  f"< kernels' {need}")


# ---------------------------------------------------------------------------------------------
# Sizes that change on one engine (a private pool: a failure may leave the CUDA context unusable)
# ---------------------------------------------------------------------------------------------

def _w_layout_change(ctx, seed: int) -> None:
    engine = make_engine(ctx.group, ctx.device, NUM_BYTES)
    # 8 experts, top-8: every token goes to every expert, filling the big layout's dispatch area.
    # (top-8 of 8 experts: duplicates would exceed M rows per expert, so only -1 entries in the small ones)
    sparse = (("drop_prob", 0.2),)
    steps = [
        Case("big-bf16-h7168", hidden=7168, tokens=(16, 16), m=16, local_experts=4, routing=()),
        Case("small-bf16-h512", hidden=512, tokens=(16, 9), m=16, local_experts=4, routing=sparse),
        Case("big-fp8-h7168", hidden=7168, fmt="fp8", tokens=(16, 16), m=16, local_experts=4, routing=()),
        Case("small-fp8-h512", hidden=512, fmt="fp8", tokens=(12, 16), m=16, local_experts=4, routing=sparse),
    ]
    for i, case in enumerate(steps):
        if i:  # what DeepEP requires before other sizes: clean, with every rank idle
            sync(ctx)
            dist.barrier(group=ctx.group)
            engine.clean()
            sync(ctx)
            dist.barrier(group=ctx.group)
        for rep in range(2):  # both buffers
            run_case(ctx, engine, case, seed + 10 * i + rep, rep, f"step {i}: {case.name} (run {rep + 1} of 2)",
                     hooks=(False, False), mode="plain", reset_layout=False)
    sync(ctx)
    dist.barrier(group=ctx.group)


def test_layout_change_after_clean():
    """One engine, calls with other sizes (hidden, FP8) after clean(): the reference handles any
    sequence of sizes; a buffer's flags move with the sizes, so what clean() zeroes must be what
    the next call reads."""
    require_ll_kernels()
    from tests.dist_pool import DistPool

    pool = DistPool(2, backend="gloo", cuda_devices=True)
    try:
        pool.run(_w_layout_change, zlib.crc32(b"layout-change"), timeout=300)
    finally:
        pool.shutdown()


# ---------------------------------------------------------------------------------------------
# 5. Buffer on two GPUs over NCCL equals the reference backend
# ---------------------------------------------------------------------------------------------

NCCL_CASES = [
    Case("bf16-h7168", hidden=7168, tokens=(M, 19)),
    Case("fp8-h2560", hidden=2560, fmt="fp8", tokens=(7, M)),
    Case("fp8-round-h2048-skewed", hidden=2048, fmt="fp8-round", tokens=(M, M), routing=SKEWED),
    Case("ue8m0-h7168-zero-tokens", hidden=7168, fmt="ue8m0", tokens=(M, 0)),
]


def compare_valid_rows(got, want, exp: Expected, fmt: str, what: str) -> None:
    """Buffer vs reference on the valid rows: bf16 bit for bit; FP8 scales (relative 1e-6, or
    exactly with round_scale / UE8M0) and dequantized rows within e4m3 rounding of each other."""
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    for l, rows in enumerate(exp.rows):
        n = len(rows)
        if not n:
            continue
        where = f"{what}: local expert {l}"
        if not use_fp8:
            oracle.assert_same(got[l, :n], want[l, :n].cpu(), f"{where}: rows vs reference")
            continue
        g_raw, w_raw = got[1][l, :n].cpu().contiguous(), want[1][l, :n].cpu().contiguous()
        if round_scale:
            oracle.assert_same(g_raw, w_raw, f"{where}: scales vs reference")
        else:
            rel = (g_raw - w_raw).abs() / w_raw
            assert bool((rel <= SCALE_RTOL).all()), f"{where}: scales differ from the reference's by more than {SCALE_RTOL}"
        g_s = unpack_ue8m0(g_raw) if use_ue8m0 else g_raw
        w_s = unpack_ue8m0(w_raw) if use_ue8m0 else w_raw
        g_deq = per_token_group_dequant_fp8(got[0][l, :n].cpu(), g_s, torch.float32)
        w_deq = per_token_group_dequant_fp8(want[0][l, :n].cpu(), w_s, torch.float32)
        s = torch.maximum(g_s, w_s).repeat_interleave(FP8_GROUP_SIZE, dim=-1)
        ok = (g_deq - w_deq).abs() <= 3 * (w_deq.abs() * FP8_REL + s * FP8_SUB)
        assert bool(ok.all()), f"{where}: dequantized rows differ from the reference's beyond FP8 rounding"


def compare_buffer_with_reference(ctx, buffer, reference, case: Case, seed: int, rep: int, what: str) -> None:
    """The same inputs through Buffer.low_latency_dispatch/combine and the reference backend's
    LowLatencyState: structure exactly, rows as compare_valid_rows, combine within bf16
    tolerance (both combine the same expert outputs); plus the oracle checks of check_recv."""
    use_fp8, round_scale, use_ue8m0 = FORMATS[case.fmt]
    me = ctx.rank
    world = case_world(case, ctx.world_size, seed)
    check_within_limits(world, case.m)
    num_experts, m = world.num_experts, case.m
    x, idx, weights = on(ctx, (world.xs[me], world.topk_idx[me], world.topk_weights[me]))
    hook_mode = rep % 2 == 1
    recv_x, recv_count, handle, _event, hook = buffer.low_latency_dispatch(
        x, idx, m, num_experts, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
        return_recv_hook=hook_mode)
    if hook_mode:
        hook()
    want_x, want_count, want_handle, _ = reference.dispatch(x, idx, m, num_experts, None, use_fp8, round_scale,
                                                            use_ue8m0, False)
    sync(ctx)
    oracle.assert_same(recv_count, want_count.cpu(), f"{what}: recv_count vs reference")
    oracle.assert_same(handle[0], want_handle[0].cpu(), f"{what}: handle[0] (src_info) vs reference")
    oracle.assert_same(handle[1], want_handle[1].cpu(), f"{what}: handle[1] (layout_range) vs reference")
    assert tuple(handle[2:]) == tuple(want_handle[2:]), f"{what}: handle[2:] {handle[2:]} vs reference {want_handle[2:]}"
    exp = check_recv(ctx, world, m, (recv_x, recv_count, handle), case.fmt, f"{what}: dispatch")
    compare_valid_rows(recv_x, want_x, exp, case.fmt, what)

    outputs = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), me, world.num_local_experts, use_fp8, use_ue8m0)
    want, _ = reference.combine(on(ctx, outputs), idx, weights, want_handle, None, False)
    mode = ("plain", "zero_copy", "out", "hook")[rep % 4]
    kwargs: dict = {}
    x_back = on(ctx, outputs)
    if mode == "zero_copy":
        x_back = buffer.get_next_low_latency_combine_buffer(handle)
        x_back.copy_(outputs)
        kwargs["zero_copy"] = True
    elif mode == "out":
        kwargs["out"] = torch.full((world.xs[me].shape[0], case.hidden), POISON, dtype=torch.bfloat16, device=ctx.device)
    elif mode == "hook":
        kwargs["return_recv_hook"] = True
    combined, _event, hook = buffer.low_latency_combine(x_back, idx, weights, handle, **kwargs)
    if mode == "hook":
        hook()
    if mode == "out":
        assert combined.data_ptr() == kwargs["out"].data_ptr(), f"{what}: out= must receive the result"
    sync(ctx)
    oracle.assert_close(combined, want.cpu(), f"{what}: combined_x vs reference ({mode})")
    oracle.assert_close(combined, expected_combine(ctx, world, outputs, handle[1], case.fmt),
                        f"{what}: combined_x vs the expectation ({mode})")


def _w_buffer_vs_reference(ctx, seed: int) -> None:
    from moe_ep.comm import Buffer
    from moe_ep.comm.backends.reference import ReferenceBackend

    previous = os.environ.get(EXPERIMENTAL_ENV)
    with environ(**{EXPERIMENTAL_ENV: ",".join(p for p in (previous, "low_latency") if p)}):
        for i, case in enumerate(NCCL_CASES):
            num_experts = case.num_experts(ctx.world_size)
            hint = Buffer.get_low_latency_rdma_size_hint(case.m, case.hidden, ctx.world_size, num_experts)
            # A Buffer per case: one Buffer's buffers are laid out for one set of sizes.
            buffer = Buffer(ctx.group, low_latency_mode=True, num_rdma_bytes=hint)
            uses_kernel = getattr(buffer.backend, "uses_kernel", None)
            if uses_kernel is None or not uses_kernel("low_latency_dispatch"):
                pytest.skip(f"Buffer's {buffer.backend.name} backend does not run low_latency_dispatch through the "
                            f"kernels with {EXPERIMENTAL_ENV}={os.environ[EXPERIMENTAL_ENV]!r} "
                            f"({getattr(buffer.backend, 'describe', lambda: '')()})")
            reference = ReferenceBackend(ctx.group, ctx.device).low_latency
            for rep in range(4):
                compare_buffer_with_reference(ctx, buffer, reference, case, seed + 17 * i + 1_000_003 * rep, rep,
                                              f"{case.name} (run {rep + 1} of 4)")
            sync(ctx)
            dist.barrier(group=ctx.group)  # no rank frees its buffer while a peer may still write into it
            del buffer


def test_buffer_on_two_gpus_equals_reference(nccl_pool, seed):
    require_ll_kernels()
    nccl_pool(2).run(_w_buffer_vs_reference, seed, timeout=300)


# ---------------------------------------------------------------------------------------------
# 6. compute-sanitizer
# ---------------------------------------------------------------------------------------------

SANITIZER_TIMEOUT_S = 900
SANITIZER_SCRIPT = os.path.join(REPO_ROOT, "tests", "ll_sanitizer_case.py")
SANITIZER_BYTES = 16 << 20
SANITIZER_OK_LINE = "low-latency sanitizer case: all checks passed"
# Tiny on purpose (memcheck and racecheck slow kernels down by orders of magnitude): 2 ranks,
# M = 8, 8 experts, top-2; run by tests/ll_sanitizer_case.py, each case REPS times (hooks and
# combine modes cycle).
TINY = {"m": 8, "num_topk": 2, "local_experts": 4, "tokens": (8, 5)}
SANITIZER_CASES = [
    Case("sanitizer-bf16-h256", hidden=256, **TINY),
    Case("sanitizer-fp8-h256", hidden=256, fmt="fp8", **TINY),
    Case("sanitizer-ue8m0-zero-token-rank-h512", hidden=512, fmt="ue8m0", **{**TINY, "tokens": (0, 8)}),
]


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_reports_no_errors(tool):
    require_ll_kernels()
    assert_sanitizer_clean(tool, SANITIZER_SCRIPT, SANITIZER_OK_LINE, SANITIZER_TIMEOUT_S)


def test_flag_area_matches_the_size_hint():
    """The Python size hint reserves the kernels' fixed flag area (moe_ep.comm.config mirrors the
    C++ constant; this keeps the two from drifting apart)."""
    require_ll_kernels()
    from moe_ep import _C
    from moe_ep.comm.config import LL_FLAGS_BYTES

    assert int(_C.ll_flags_bytes) == LL_FLAGS_BYTES


# ---------------------------------------------------------------------------------------------
# Out-of-range expert ids: the kernels check topk_idx themselves (no host sync, no assert kernels)
# ---------------------------------------------------------------------------------------------

_BAD_ENTRY_SETUP = r'''
buffer = Buffer(dist.group.WORLD, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(8, 256, 1, 16),
                low_latency_mode=True, num_qps_per_rank=16)
assert buffer.backend.uses_kernel("{call}"), buffer.backend.describe()
x = torch.randn(5, 256, device="cuda").to(torch.bfloat16)
topk_idx = torch.randint(0, 16, (5, 2), device="cuda")
# BF16 rows: the combine below takes them back as its x (an FP8 dispatch returns (rows, scales)).
recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, 8, 16, use_fp8=False)
torch.cuda.synchronize()
topk_idx[3, 1] = {bad}
'''
_BAD_ENTRY_CALLS = {
    "low_latency_dispatch": "buffer.low_latency_dispatch(x, topk_idx, 8, 16, use_fp8=False)",
    "low_latency_combine": 'buffer.low_latency_combine(recv_x, topk_idx, torch.rand(5, 2, device="cuda"), handle)',
}


@pytest.mark.gpu
@pytest.mark.parametrize("call,bad", [("low_latency_dispatch", 16), ("low_latency_dispatch", -2),
                                      ("low_latency_combine", 99)])
def test_out_of_range_expert_id_traps_with_a_message(call, bad):
    """An expert id outside [-1, E) stops the kernel with one line naming the call, the entry and
    the bound, and the host gets an exception: never silent garbage."""
    from tests.trap_child import assert_call_traps

    require_ll_kernels()
    assert_call_traps(_BAD_ENTRY_SETUP.format(call=call, bad=bad), _BAD_ENTRY_CALLS[call],
                      f"moe_ep: {call} on rank 0: topk_idx[3][1] = {bad} is outside [-1, 15] (num_experts = 16)",
                      env={"MOE_EP_EXPERIMENTAL_KERNELS": "low_latency"})


# ---------------------------------------------------------------------------------------------
# Ranks that disagree on the sizes: the dispatch flags carry a layout tag
# ---------------------------------------------------------------------------------------------

# Rank 1 passes another num_max_dispatch_tokens_per_rank. It sends, then receives 3 s later (hook
# mode), so the two traps do not coincide (two processes trapping at once on one shared GPU: see
# tests/trap_child.run_two_ranks); staggered, both raise.
_OTHER_SIZES_SETUP = """
from moe_ep.comm.backends.low_latency import LowLatencyEngine, ll_size_hint
engine = LowLatencyEngine(dist.group.WORLD, device, ll_size_hint(32, 256, 2, 16, 4))
m = 32 if rank == 0 else 16
x = torch.randn(8, 256, device=device).to(torch.bfloat16)
topk_idx = torch.randint(0, 16, (8, 4), device=device)
"""
_OTHER_SIZES_CALL = """
*_, hook = engine.dispatch(x, topk_idx, m, 16, None, False, False, False, rank == 1)
if hook is not None:
    torch.cuda.synchronize()
    time.sleep(3)
    hook()
"""


@pytest.mark.gpu
def test_ranks_with_other_sizes_trap_with_a_message(tmp_path):
    """Rank 1 dispatches with num_max_dispatch_tokens_per_rank 16, rank 0 with 32 (each would read
    the other's rows at the wrong offsets): each receive sees the other's flags, names the other
    rank and its own sizes, then traps, and the host raises on both ranks. Two processes on one GPU
    (or one each); rank 1 receives through the hook 3 s after its send (see the child)."""
    from tests.trap_child import run_two_ranks

    require_ll_kernels()
    output = run_two_ranks(tmp_path, _OTHER_SIZES_SETUP, _OTHER_SIZES_CALL, timeout=120)
    assert "NO ERROR" not in output, output
    for rank, other, m in ((0, 1, 32), (1, 0, 16)):
        assert f"rank {rank}: RAISED" in output, output
        assert (f"moe_ep: low_latency_dispatch on rank {rank}: rank {other} called with other sizes than this rank "
                f"(num_max_dispatch_tokens_per_rank={m}, hidden=256, num_experts=16, top-k=4, fp8=0 here") in output, output
