"""A dense, single-process oracle of the Buffer semantics, plus the test data it runs on.

Every rank of a test builds the same *world* (all ranks' inputs, from one seed), runs the real
collective on its own slice, and checks its own outputs against what this module computes from
the whole world. Nothing here imports the backends: the oracle is written from the specification
(shared/API.md), with plain Python loops over tokens so each rule reads as stated.

Notation: R ranks, E experts, L = E / R local experts, expert e lives on rank e // L as local
expert e % L; -1 in ``topk_idx`` means "no expert".
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from moe_ep.comm.fp8 import FP8_DTYPE, per_token_group_dequant_fp8, per_token_group_quant_fp8, unpack_ue8m0

Rows = Union[torch.Tensor, tuple]  # [N, H] tensor, or (x_fp8 [N, H], scales [N, H/128])


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------

@dataclass
class World:
    """All ranks' inputs: ``xs[r]`` [T_r, H] bf16, ``topk_idx[r]`` [T_r, K] int64,
    ``topk_weights[r]`` [T_r, K] float32."""

    num_experts: int
    xs: list
    topk_idx: list
    topk_weights: list
    extra: dict = field(default_factory=dict)

    @property
    def num_ranks(self) -> int:
        return len(self.xs)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def hidden(self) -> int:
        return self.xs[0].shape[1]

    @property
    def num_topk(self) -> int:
        return self.topk_idx[0].shape[1]


def make_tokens(gen: torch.Generator, num_tokens: int, hidden: int, integer: bool = False) -> torch.Tensor:
    """[T, H] bf16 with no zeros. ``integer``: small integers (±1..±4), so sums stay exact."""
    if integer:
        magnitude = torch.randint(1, 5, (num_tokens, hidden), generator=gen)
        sign = torch.randint(0, 2, (num_tokens, hidden), generator=gen) * 2 - 1
        return (magnitude * sign).to(torch.bfloat16)
    # Per-row magnitudes spread over two decades so FP8 groups get different scales.
    row_scale = torch.exp(torch.randn(num_tokens, 1, generator=gen) * 1.5)
    x = (torch.randn(num_tokens, hidden, generator=gen) * row_scale).to(torch.bfloat16)
    return torch.where(x == 0, torch.full_like(x, 0.375), x)


def make_topk_idx(gen: torch.Generator, num_tokens: int, num_topk: int, num_experts: int,
                  routing: str = "random", drop_prob: float = 0.0, hot_expert: int = 0,
                  duplicate_prob: float = 0.0, all_dropped_token: bool = False) -> torch.Tensor:
    """[T, K] int64 routing.

    ``random``: K distinct experts per token. ``skewed``: every token picks ``hot_expert`` in one
    random slot and -1 elsewhere. ``drop_prob`` sprinkles -1; ``all_dropped_token`` makes token 0
    route nowhere; ``duplicate_prob`` repeats a token's first expert in its second slot.
    """
    idx = torch.empty(num_tokens, num_topk, dtype=torch.int64)
    for t in range(num_tokens):
        idx[t] = torch.randperm(num_experts, generator=gen)[:num_topk]
    if routing == "skewed":
        idx.fill_(-1)
        for t in range(num_tokens):
            idx[t, int(torch.randint(0, num_topk, (1,), generator=gen))] = hot_expert
    elif routing != "random":
        raise ValueError(f"unknown routing {routing!r}")
    if duplicate_prob > 0 and num_topk > 1:
        dup = torch.rand(num_tokens, generator=gen) < duplicate_prob
        idx[dup, 1] = idx[dup, 0]
    if drop_prob > 0:
        idx[torch.rand(num_tokens, num_topk, generator=gen) < drop_prob] = -1
    if all_dropped_token and num_tokens > 0:
        idx[0] = -1
    return idx


def make_world(seed: int, num_ranks: int, tokens: Union[int, Sequence[int]], hidden: int, num_topk: int,
               num_experts: int, integer: bool = False, **routing) -> World:
    """The same world on every rank for a given seed. ``tokens``: per-rank counts or one count."""
    gen = torch.Generator().manual_seed(seed)
    counts = [tokens] * num_ranks if isinstance(tokens, int) else list(tokens)
    xs, idxs, weights = [], [], []
    for num_tokens in counts:
        xs.append(make_tokens(gen, num_tokens, hidden, integer=integer))
        idxs.append(make_topk_idx(gen, num_tokens, num_topk, num_experts, **routing))
        # Non-zero everywhere, -1 slots included: the receiver must zero those itself.
        weights.append(torch.rand(num_tokens, num_topk, generator=gen) + 0.25)
    return World(num_experts, xs, idxs, weights)


# ----------------------------------------------------------------------------------------------
# Row helpers (FP8 tensors support few ops on CPU: move them as bytes)
# ----------------------------------------------------------------------------------------------

def _take_rows(t: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    index = torch.tensor(list(rows), dtype=torch.int64)
    if t.dtype == FP8_DTYPE:
        return t.view(torch.uint8).index_select(0, index).view(FP8_DTYPE)
    return t.index_select(0, index)


def take_rows(x: Rows, rows: Sequence[int]) -> Rows:
    if isinstance(x, tuple):
        return tuple(_take_rows(part, rows) for part in x)
    return _take_rows(x, rows)


def _cat_rows(parts: list, like: torch.Tensor) -> torch.Tensor:
    if not parts:
        return like.new_empty((0, *like.shape[1:]))
    if like.dtype == FP8_DTYPE:
        return torch.cat([p.view(torch.uint8) for p in parts]).view(FP8_DTYPE)
    return torch.cat(parts)


def cat_rows(parts: list, like: Rows) -> Rows:
    if isinstance(like, tuple):
        return tuple(_cat_rows([p[i] for p in parts], like[i]) for i in range(len(like)))
    return _cat_rows(parts, like)


def quantize(x: torch.Tensor, round_scale: bool = False) -> tuple:
    """The shared FP8 definition: per token, per 128-group."""
    return per_token_group_quant_fp8(x, round_scale=round_scale)


# ----------------------------------------------------------------------------------------------
# Normal dispatch / combine
# ----------------------------------------------------------------------------------------------

def check_divisible(num_experts: int, num_ranks: int) -> int:
    assert num_experts % num_ranks == 0, (num_experts, num_ranks)
    return num_experts // num_ranks


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``."""
    num_local = check_divisible(num_experts, num_ranks)
    num_tokens = topk_idx.shape[0]
    per_expert = [0] * num_experts
    in_rank = [[False] * num_ranks for _ in range(num_tokens)]
    for t in range(num_tokens):
        for e in topk_idx[t].tolist():
            if e < 0:
                continue
            per_expert[e] += 1
            in_rank[t][e // num_local] = True
    per_rank = [sum(in_rank[t][r] for t in range(num_tokens)) for r in range(num_ranks)]
    return (torch.tensor(per_rank, dtype=torch.int32), torch.tensor(per_expert, dtype=torch.int32),
            torch.tensor(in_rank, dtype=torch.bool).reshape(num_tokens, num_ranks))


@dataclass
class DispatchExpectation:
    recv_x: Rows
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert_list: list
    rank_prefix_matrix: torch.Tensor
    recv_src: list  # (source rank, source token) of each received row, in order

    @property
    def num_recv_tokens(self) -> int:
        return len(self.recv_src)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def dispatch(rank: int, xs: Sequence[Rows], topk_idx: Sequence[torch.Tensor], topk_weights: Sequence[torch.Tensor],
             num_experts: int, expert_alignment: int = 1) -> DispatchExpectation:
    """What ``rank`` receives when every rank r dispatches ``xs[r]`` routed by ``topk_idx[r]``."""
    num_ranks = len(xs)
    num_local = check_divisible(num_experts, num_ranks)
    num_topk = topk_idx[0].shape[1]
    sends = torch.zeros(num_ranks, num_ranks, dtype=torch.int32)  # [i, j]: tokens i sends to j
    recv_src, recv_idx, recv_w, parts = [], [], [], []
    per_expert = [0] * num_local
    for src in range(num_ranks):
        rows = []
        for t in range(topk_idx[src].shape[0]):
            experts = topk_idx[src][t].tolist()
            for dst in {e // num_local for e in experts if e >= 0}:
                sends[src, dst] += 1
            if not any(e >= 0 and e // num_local == rank for e in experts):
                continue
            rows.append(t)
            recv_src.append((src, t))
            local_ids, weights = [], []
            for k, e in enumerate(experts):
                mine = e >= 0 and e // num_local == rank
                local_ids.append(e % num_local if mine else -1)
                weights.append(float(topk_weights[src][t, k]) if mine else 0.0)
                if mine:
                    per_expert[e % num_local] += 1
            recv_idx.append(local_ids)
            recv_w.append(weights)
        parts.append(take_rows(xs[src], rows))
    return DispatchExpectation(
        recv_x=cat_rows(parts, xs[0]),
        recv_topk_idx=torch.tensor(recv_idx, dtype=torch.int64).reshape(-1, num_topk),
        recv_topk_weights=torch.tensor(recv_w, dtype=torch.float32).reshape(-1, num_topk),
        num_recv_tokens_per_expert_list=[align_up(n, expert_alignment) for n in per_expert],
        rank_prefix_matrix=sends.cumsum(0).to(torch.int32),
        recv_src=recv_src,
    )


def combine(rank: int, xs_back: Sequence[torch.Tensor], recv_srcs: Sequence[list], num_tokens: int, hidden: int,
            bias: Union[None, torch.Tensor, tuple] = None, topk_weights_back: Optional[Sequence[torch.Tensor]] = None):
    """``(combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None)`` on ``rank``:
    each rank r returns row n of ``xs_back[r]`` to ``recv_srcs[r][n]``; rows are summed without
    weights in float32, in rank order, then the bias, then cast to bf16."""
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    weights_acc = None
    if topk_weights_back is not None:
        weights_acc = torch.zeros(num_tokens, topk_weights_back[0].shape[1], dtype=torch.float32)
    for r in range(len(xs_back)):
        for n, (src, t) in enumerate(recv_srcs[r]):
            if src != rank:
                continue
            acc[t] += xs_back[r][n].float()
            if weights_acc is not None:
                weights_acc[t] += topk_weights_back[r][n].float()
    biases = () if bias is None else (bias,) if isinstance(bias, torch.Tensor) else tuple(bias)
    for b in biases:
        acc += b.float()
    return acc.to(torch.bfloat16), weights_acc


# ----------------------------------------------------------------------------------------------
# Low latency
# ----------------------------------------------------------------------------------------------

def ll_expected_pairs(rank: int, topk_idx: Sequence[torch.Tensor], num_experts: int,
                      masked_ranks: Sequence[int] = ()) -> list:
    """Per local expert of ``rank``: the Counter of (source rank, source token) pairs it receives.
    Every valid (token, k) goes, duplicates included; nothing goes to a masked rank."""
    num_ranks = len(topk_idx)
    num_local = check_divisible(num_experts, num_ranks)
    pairs = [Counter() for _ in range(num_local)]
    if rank in masked_ranks:
        return pairs
    for src in range(num_ranks):
        for t in range(topk_idx[src].shape[0]):
            for e in topk_idx[src][t].tolist():
                if e >= 0 and e // num_local == rank:
                    pairs[e % num_local][(src, t)] += 1
    return pairs


def ll_transported(x: torch.Tensor, use_fp8: bool, round_scale: bool = False) -> torch.Tensor:
    """The bf16 rows an expert sees after low-latency dispatch (FP8 round trip if ``use_fp8``)."""
    if not use_fp8:
        return x
    q, scales = quantize(x, round_scale=round_scale)
    return per_token_group_dequant_fp8(q, scales, torch.bfloat16)


def toy_expert(global_expert: int, rows: torch.Tensor) -> torch.Tensor:
    """A known per-expert function for combine tests: scale bf16 rows by (e + 1) / 8."""
    return (rows.float() * ((global_expert + 1) / 8.0)).to(torch.bfloat16)


def ll_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
               num_ranks: int, use_fp8: bool, round_scale: bool = False, masked_ranks: Sequence[int] = ()) -> torch.Tensor:
    """combined_x [T, H] bf16 when each expert applies :func:`toy_expert` to what it received:
    Σ_k topk_weights[t, k] · toy_expert(e_k, transported x[t]) over k with e_k ≥ 0 on a live rank."""
    num_local = check_divisible(num_experts, num_ranks)
    seen = ll_transported(x, use_fp8, round_scale)
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k, e in enumerate(topk_idx[t].tolist()):
            if e < 0 or e // num_local in masked_ranks:
                continue
            acc[t] += float(topk_weights[t, k]) * toy_expert(e, seen[t:t + 1])[0].float()
    return acc.to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Checks shared by the test files
# ----------------------------------------------------------------------------------------------

_BIT_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
              FP8_DTYPE: torch.uint8}


def bits(t: torch.Tensor) -> torch.Tensor:
    view = _BIT_VIEWS.get(t.dtype)
    return t.contiguous().view(view) if view is not None else t


def assert_same(got, expected, what: str) -> None:
    """Bit-exact equality of tensors (or tuples of them) with dtype and shape."""
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected), f"{what}: expected a {len(expected)}-tuple, got {type(got).__name__}"
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{what}[{i}]")
        return
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    got = got.cpu()
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not torch.equal(bits(got), bits(expected)):
        mismatch = (bits(got) != bits(expected))
        first = mismatch.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(mismatch.sum())} of {mismatch.numel()} elements differ; first at {first}: "
                             f"got {got[tuple(first)].item()!r}, expected {expected[tuple(first)].item()!r}")


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-2, atol: float = 1e-3) -> None:
    got = got.cpu()
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def unpack_layout_range(layout_range: torch.Tensor, local_expert: int, src_rank: int) -> tuple:
    value = int(layout_range[local_expert, src_rank])
    return value >> 32, value & 0xFFFFFFFF


def check_ll_recv(rank: int, world: World, num_max_tokens: int, recv_x, recv_count: torch.Tensor, handle: tuple,
                  use_fp8: bool, round_scale: bool = False, use_ue8m0: bool = False,
                  masked_ranks: Sequence[int] = ()) -> list:
    """Check a low-latency dispatch result on ``rank`` order-independently against the oracle.

    Returns, per local expert, the list of (row, source rank, source token) of its valid rows.
    Rows from a masked source rank may be present or absent; if present they must be right.
    """
    num_ranks, num_local, hidden = world.num_ranks, world.num_local_experts, world.hidden
    slots = num_ranks * num_max_tokens
    expected_pairs = ll_expected_pairs(rank, world.topk_idx, world.num_experts, masked_ranks)

    if use_fp8:
        assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"recv_x: expected (fp8, scales), got {type(recv_x).__name__}"
        data, scales = recv_x[0].cpu(), recv_x[1]
        assert data.dtype == FP8_DTYPE and tuple(data.shape) == (num_local, slots, hidden), \
            f"recv_x[0]: {data.dtype} {tuple(data.shape)}, expected {FP8_DTYPE} {(num_local, slots, hidden)}"
        groups = hidden // 512 if use_ue8m0 else hidden // 128
        scale_dtype = torch.int32 if use_ue8m0 else torch.float32
        assert scales.dtype == scale_dtype and tuple(scales.shape) == (num_local, slots, groups), \
            f"recv_x[1] (scales): {scales.dtype} {tuple(scales.shape)}, expected {scale_dtype} {(num_local, slots, groups)}"
        assert scales.stride(-2) == 1, f"scales must be column-major in their last two dims, strides {scales.stride()}"
        scales = scales.cpu()
    else:
        assert isinstance(recv_x, torch.Tensor), f"recv_x: expected a bf16 tensor, got {type(recv_x).__name__}"
        data = recv_x.cpu()
        assert data.dtype == torch.bfloat16 and tuple(data.shape) == (num_local, slots, hidden), \
            f"recv_x: {data.dtype} {tuple(data.shape)}, expected bf16 {(num_local, slots, hidden)}"

    assert recv_count.dtype == torch.int32 and tuple(recv_count.shape) == (num_local,), \
        f"recv_count: {recv_count.dtype} {tuple(recv_count.shape)}, expected int32 ({num_local},)"
    assert len(handle) == 5, f"handle: expected 5 elements, got {len(handle)}"
    src_info, layout_range = handle[0].cpu(), handle[1].cpu()
    assert src_info.dtype == torch.int32 and tuple(src_info.shape) == (num_local, slots), \
        f"handle[0] (src_info): {src_info.dtype} {tuple(src_info.shape)}, expected int32 {(num_local, slots)}"
    assert layout_range.dtype == torch.int64 and tuple(layout_range.shape) == (num_local, num_ranks), \
        f"handle[1] (layout_range): {layout_range.dtype} {tuple(layout_range.shape)}, expected int64 {(num_local, num_ranks)}"
    assert tuple(handle[2:]) == (num_max_tokens, hidden, world.num_experts), \
        f"handle[2:]: {tuple(handle[2:])}, expected {(num_max_tokens, hidden, world.num_experts)}"

    recv_count = recv_count.cpu()
    valid_rows = []
    for l in range(num_local):
        count = int(recv_count[l])
        covered = torch.zeros(slots, dtype=torch.int32)
        rows, got_pairs = [], Counter()
        for src in range(num_ranks):
            begin, n = unpack_layout_range(layout_range, l, src)
            if n == 0:
                continue
            assert 0 <= begin and begin + n <= count, \
                f"expert {l}: source {src} rows [{begin}, {begin + n}) outside the valid [0, {count})"
            covered[begin:begin + n] += 1
            for row in range(begin, begin + n):
                token = int(src_info[l, row])
                assert 0 <= token < world.xs[src].shape[0], \
                    f"expert {l} row {row}: src_info {token} is not a token of rank {src} (T={world.xs[src].shape[0]})"
                rows.append((row, src, token))
                got_pairs[(src, token)] += 1
        assert bool((covered[:count] == 1).all()), \
            f"expert {l}: layout_range does not tile rows [0, {count}) exactly once: {covered[:count].tolist()}"
        expected = Counter(expected_pairs[l])
        for src in masked_ranks:  # a masked source's rows are optional, but all-or-nothing
            from_src = Counter({p: c for p, c in got_pairs.items() if p[0] == src})
            if from_src:
                assert from_src == Counter({p: c for p, c in expected.items() if p[0] == src}), \
                    f"expert {l}: rows from masked rank {src} are partial"
            else:
                expected = Counter({p: c for p, c in expected.items() if p[0] != src})
        assert got_pairs == expected, (
            f"local expert {l} of rank {rank}: received (source rank, token) pairs differ from the oracle: "
            f"missing {sorted((expected - got_pairs).elements())}, unexpected {sorted((got_pairs - expected).elements())}")
        assert count == sum(expected.values()), f"recv_count[{l}] = {count}, expected {sum(expected.values())}"

        for row, src, token in rows:
            source = world.xs[src][token:token + 1]
            where = f"local expert {l} row {row} (rank {src} token {token})"
            if use_fp8:
                q, s = quantize(source, round_scale=round_scale)
                assert_same(data[l, row:row + 1], q, f"{where}: fp8 data")
                got_scales = unpack_ue8m0(scales[l, row:row + 1]) if use_ue8m0 else scales[l, row:row + 1]
                assert_same(got_scales, s, f"{where}: scales")
            else:
                assert_same(data[l, row:row + 1], source, f"{where}: bf16 data")
        valid_rows.append(rows)
    return valid_rows


def ll_expert_outputs(recv_x, recv_count: torch.Tensor, rank: int, num_local: int, use_fp8: bool,
                      use_ue8m0: bool = False, poison: float = float("nan")) -> torch.Tensor:
    """What a rank's experts return for low-latency combine: :func:`toy_expert` of each valid row
    (FP8 input dequantized with the shared helper), ``poison`` in every invalid row."""
    if use_fp8:
        data, scales = recv_x[0].cpu(), recv_x[1].cpu()
        if use_ue8m0:
            scales = unpack_ue8m0(scales)
    else:
        data = recv_x.cpu()
    out = torch.full(data.shape, poison, dtype=torch.bfloat16)
    for l in range(num_local):
        count = int(recv_count[l])
        if count == 0:
            continue
        rows = per_token_group_dequant_fp8(data[l, :count], scales[l, :count].contiguous(), torch.bfloat16) if use_fp8 \
            else data[l, :count]
        out[l, :count] = toy_expert(rank * num_local + l, rows)
    return out
