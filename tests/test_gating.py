"""moe_ep.layers.gating: each routing rule against an independent float64 re-statement of its
formula, deterministic ties, the correction bias's role, group masking, Router, and validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_ep.layers.gating import Router, deepseek_v2_topk, deepseek_v3_topk, softmax_topk

RTOL = 1e-6

# (num_tokens, num_experts, top_k, n_group, topk_group): odd token counts, real-model group shapes.
GROUPED_SHAPES = [
    (37, 64, 6, 8, 3),
    (37, 256, 8, 8, 4),   # DeepSeek-V3
    (19, 160, 6, 8, 3),   # DeepSeek-V2
    (23, 64, 6, 1, 1),    # DeepSeek-V2-Lite: no groups
]


def random_logits(seed: int, num_tokens: int, num_experts: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=gen) * scale


# ------------------------------------------------------------- float64 reference formulas


def ranked(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def ref_v3_token(row: list[float], bias: list[float], top_k: int, n_group: int, topk_group: int,
                 norm: bool, scale: float) -> tuple[list[int], dict[int, float]]:
    size = len(row) // n_group
    scores = [1.0 / (1.0 + math.exp(-x)) for x in row]
    choice = [s + b for s, b in zip(scores, bias)]
    group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
    kept = set(ranked(group_score, topk_group))
    masked = [c if e // size in kept else float("-inf") for e, c in enumerate(choice)]
    chosen = ranked(masked, top_k)
    weights = {e: scores[e] for e in chosen}
    if norm:
        total = sum(weights.values()) + 1e-20
        weights = {e: w / total for e, w in weights.items()}
    return chosen, {e: w * scale for e, w in weights.items()}


def softmax64(row: list[float]) -> list[float]:
    peak = max(row)
    exps = [math.exp(x - peak) for x in row]
    total = sum(exps)
    return [x / total for x in exps]


def ref_v2_token(row: list[float], top_k: int, n_group: int, topk_group: int, norm: bool,
                 scale: float) -> tuple[list[int], dict[int, float]]:
    size = len(row) // n_group
    scores = softmax64(row)
    group_score = [max(scores[g * size:(g + 1) * size]) for g in range(n_group)]
    kept = set(ranked(group_score, topk_group))
    masked = [s if e // size in kept else 0.0 for e, s in enumerate(scores)]
    chosen = ranked(masked, top_k)
    weights = {e: masked[e] for e in chosen}
    if top_k > 1 and norm:
        total = sum(weights.values()) + 1e-20
        return chosen, {e: w / total for e, w in weights.items()}
    return chosen, {e: w * scale for e, w in weights.items()}


def ref_softmax_token(row: list[float], top_k: int, renormalize: bool) -> tuple[list[int], dict[int, float]]:
    probs = softmax64(row)
    chosen = ranked(probs, top_k)
    weights = {e: probs[e] for e in chosen}
    if renormalize:
        total = sum(weights.values())
        weights = {e: w / total for e, w in weights.items()}
    return chosen, weights


def assert_matches_reference(topk_idx: torch.Tensor, topk_weights: torch.Tensor, reference) -> None:
    """Exact expert ids in the same (descending score) order; weights matched by expert id."""
    assert topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32
    for t, (idx_row, w_row) in enumerate(zip(topk_idx.tolist(), topk_weights.tolist())):
        chosen, weights = reference[t]
        assert idx_row == chosen, f"token {t}: experts {idx_row} != reference {chosen}"
        for e, w in zip(idx_row, w_row):
            assert w == pytest.approx(weights[e], rel=RTOL, abs=1e-12), f"token {t}, expert {e}"


# ------------------------------------------------------------------------ rule vs reference


@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: "T{}-E{}-K{}-G{}-TG{}".format(*s))
@pytest.mark.parametrize("norm,scale", [(True, 2.5), (False, 1.0), (True, 1.0), (False, 0.7)])
@pytest.mark.parametrize("trial", range(2))
def test_deepseek_v3_matches_formula(shape, norm, scale, trial, seed):
    num_tokens, num_experts, top_k, n_group, topk_group = shape
    logits = random_logits(seed, num_tokens, num_experts)
    bias = torch.randn(num_experts, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    idx, weights = deepseek_v3_topk(logits, bias, top_k, n_group, topk_group, norm, scale)
    bias64 = bias.double().tolist()
    reference = [ref_v3_token(row, bias64, top_k, n_group, topk_group, norm, scale)
                 for row in logits.double().tolist()]
    assert_matches_reference(idx, weights, reference)


def test_deepseek_v3_without_bias_equals_zero_bias(seed):
    logits = random_logits(seed, 37, 64)
    no_bias = deepseek_v3_topk(logits, None, 6, 8, 3, True, 2.5)
    zero_bias = deepseek_v3_topk(logits, torch.zeros(64), 6, 8, 3, True, 2.5)
    assert torch.equal(no_bias[0], zero_bias[0]) and torch.equal(no_bias[1], zero_bias[1])


@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: "T{}-E{}-K{}-G{}-TG{}".format(*s))
@pytest.mark.parametrize("norm,scale", [(True, 16.0), (False, 16.0), (False, 1.0)])
@pytest.mark.parametrize("trial", range(2))
def test_deepseek_v2_matches_formula(shape, norm, scale, trial, seed):
    num_tokens, num_experts, top_k, n_group, topk_group = shape
    logits = random_logits(seed, num_tokens, num_experts)
    idx, weights = deepseek_v2_topk(logits, top_k, n_group, topk_group, norm, scale)
    reference = [ref_v2_token(row, top_k, n_group, topk_group, norm, scale) for row in logits.double().tolist()]
    assert_matches_reference(idx, weights, reference)


def test_deepseek_v2_top1_scales_even_when_norm_requested(seed):
    """V2's branch: normalization needs top_k > 1; otherwise the scaling factor applies."""
    logits = random_logits(seed, 11, 16)
    idx, weights = deepseek_v2_topk(logits, 1, 4, 2, True, 3.0)
    reference = [ref_v2_token(row, 1, 4, 2, True, 3.0) for row in logits.double().tolist()]
    assert_matches_reference(idx, weights, reference)
    assert (weights < 3.0).all() and not torch.allclose(weights, torch.full_like(weights, 1.0))


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(37, 8, 2), (29, 128, 8), (13, 60, 4), (7, 5, 5)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("trial", range(2))
def test_softmax_topk_matches_formula(num_tokens, num_experts, top_k, renormalize, trial, seed):
    logits = random_logits(seed, num_tokens, num_experts)
    idx, weights = softmax_topk(logits, top_k, renormalize)
    reference = [ref_softmax_token(row, top_k, renormalize) for row in logits.double().tolist()]
    assert_matches_reference(idx, weights, reference)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["v3", "v2", "softmax"])
def test_bf16_logits_are_routed_in_float32(rule, seed):
    """bf16 input is upcast first: same result as routing its exact float32 values."""
    logits = random_logits(seed, 37, 64).bfloat16()
    route = {
        "v3": lambda x: deepseek_v3_topk(x, None, 6, 8, 3, True, 2.5),
        "v2": lambda x: deepseek_v2_topk(x, 6, 8, 3, True, 1.0),
        "softmax": lambda x: softmax_topk(x, 6, True),
    }[rule]
    idx, weights = route(logits)
    idx32, weights32 = route(logits.float())
    assert weights.dtype == torch.float32
    assert torch.equal(idx, idx32) and torch.equal(weights, weights32)


# ------------------------------------------------------------------------- correction bias


def test_v3_bias_forces_choice_but_weight_stays_unbiased(seed):
    logits = random_logits(seed, 9, 16)
    forced = logits.argmin(dim=1)  # each token's worst expert
    bias = torch.zeros(16)
    idx_plain, _ = deepseek_v3_topk(logits, bias, 4, 1, 1, False, 1.0)
    assert not (idx_plain == forced[:, None]).any(dim=1).any()
    for t in range(logits.shape[0]):
        bias = torch.zeros(16)
        bias[forced[t]] = 10.0
        row = logits[t:t + 1]
        idx, weights = deepseek_v3_topk(row, bias, 4, 1, 1, True, 2.5)
        assert idx[0, 0].item() == forced[t].item(), "the biased expert ranks first"
        chosen_scores = torch.sigmoid(row[0, idx[0]].double())
        expected = chosen_scores[0] / chosen_scores.sum() * 2.5
        assert weights[0, 0].item() == pytest.approx(expected.item(), rel=RTOL)
        assert weights[0, 0].item() < 2.5 / 4, "its weight comes from its low unbiased score"


def test_v3_bias_pulls_in_a_group(seed):
    """A large bias on one expert makes its group win; its weight is still sigmoid(logit)."""
    logits = random_logits(seed, 1, 16)
    logits[0, 12:16] = -4.0  # group 3 is the worst group
    bias = torch.zeros(16)
    bias[13] = 5.0
    idx, weights = deepseek_v3_topk(logits, bias, 2, 4, 1, False, 1.0)
    assert set(idx[0].tolist()) <= {12, 13, 14, 15} and idx[0, 0].item() == 13
    assert weights[0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(-4.0)).item(), rel=RTOL)


# ----------------------------------------------------------------------------------- ties


def test_softmax_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0], [0.5] * 5, [2.0, 2.0, 2.0, 2.0, 9.0]])
    idx, weights = softmax_topk(logits, 2, True)
    assert idx.tolist() == [[1, 2], [0, 1], [4, 0]]
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("rule", ["v3", "v2", "softmax"])
def test_all_equal_logits_pick_lowest_experts_every_call(rule):
    """Every score ties, so group and expert choices fall to the lowest indices, on every call."""
    logits = torch.full((64, 32), 0.25)
    route = {
        "v3": lambda: deepseek_v3_topk(logits, None, 6, 8, 3, True, 2.5),
        "v2": lambda: deepseek_v2_topk(logits, 6, 8, 3, True, 1.0),
        "softmax": lambda: softmax_topk(logits, 6, True),
    }[rule]
    first_idx, first_weights = route()
    assert first_idx.tolist() == [list(range(6))] * 64
    for _ in range(3):
        idx, weights = route()
        assert torch.equal(idx, first_idx) and torch.equal(weights, first_weights)


def test_v3_group_ties_go_to_lower_group():
    """Groups 1 and 3 tie on their top-2 sum; with room for one group, group 1 wins."""
    logits = torch.full((1, 16), -3.0)
    logits[0, [4, 5]] = 1.0
    logits[0, [14, 15]] = 1.0
    idx, _ = deepseek_v3_topk(logits, None, 2, 4, 1, True, 1.0)
    assert idx.tolist() == [[4, 5]]


def test_v2_group_ties_go_to_lower_group():
    logits = torch.full((1, 16), -3.0)
    logits[0, 6] = 2.0
    logits[0, 9] = 2.0
    idx, _ = deepseek_v2_topk(logits, 2, 4, 1, True, 1.0)
    assert idx[0, 0].item() == 6 and set(idx[0].tolist()) <= {4, 5, 6, 7}


# ------------------------------------------------------------------------- group masking


def kept_groups_v3(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int) -> list[set[int]]:
    choice = logits.double().sigmoid() + bias.double()
    group_score = choice.view(logits.shape[0], n_group, -1).topk(2, dim=-1).values.sum(-1)
    return [set(ranked(row, topk_group)) for row in group_score.tolist()]


@pytest.mark.parametrize("trial", range(3))
def test_v3_masked_groups_never_selected(trial, seed):
    logits = random_logits(seed, 37, 256, scale=3.0)
    bias = torch.rand(256, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    idx, _ = deepseek_v3_topk(logits, bias, 8, 8, 4, True, 2.5)
    for t, kept in enumerate(kept_groups_v3(logits, bias, 8, 4)):
        assert {e // 32 for e in idx[t].tolist()} <= kept


@pytest.mark.parametrize("trial", range(3))
def test_v2_masked_groups_never_selected(trial, seed):
    logits = random_logits(seed, 37, 160, scale=3.0)
    idx, weights = deepseek_v2_topk(logits, 6, 8, 3, True, 1.0)
    group_max = logits.softmax(-1).view(37, 8, 20).amax(-1)
    for t in range(37):
        kept = set(ranked(group_max[t].tolist(), 3))
        assert {e // 20 for e in idx[t].tolist()} <= kept
    assert (weights > 0).all()


def test_v3_ranks_groups_by_top2_sum_and_v2_by_max():
    """Group 0 holds the single best expert; group 1 has the better top-2 sum."""
    logits = torch.full((1, 8), -4.0)
    logits[0, 0] = 3.0
    logits[0, [4, 5]] = 2.0
    v3_idx, _ = deepseek_v3_topk(logits, None, 2, 2, 1, True, 1.0)
    v2_idx, _ = deepseek_v2_topk(logits, 2, 2, 1, True, 1.0)
    assert v3_idx.tolist() == [[4, 5]]
    assert v2_idx[0, 0].item() == 0 and set(v2_idx[0].tolist()) <= {0, 1, 2, 3}


def test_v3_masks_dropped_groups_with_minus_inf():
    """Dropped groups get choice -inf, as in DeepSeek's inference code and transformers 5.x: even
    when every kept choice is negative (a strongly negative bias), only kept experts are chosen.
    (transformers 4.x masked with 0.0 and would pick experts 4 and 5 here.)"""
    logits = torch.zeros(1, 8)
    logits[0, :4] = 1.0  # group 0 is kept
    bias = torch.full((8,), -5.0)
    idx, weights = deepseek_v3_topk(logits, bias, 2, 2, 1, False, 1.0)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.sigmoid(torch.ones(1, 2)))


# ---------------------------------------------------------------------------------- Router


@pytest.mark.parametrize("rule,kwargs", [
    ("deepseek_v3", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    ("deepseek_v2", dict(n_group=4, topk_group=2, routed_scaling_factor=16.0, norm_topk_prob=False)),
    ("softmax", dict(norm_topk_prob=False)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_forward_shapes_and_dtypes(rule, kwargs, dtype, seed):
    router = Router(48, 16, 4, rule, dtype=dtype, **kwargs)
    router.reset_parameters(torch.Generator().manual_seed(seed))
    hidden = torch.randn(37, 48, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    idx, weights, logits = router(hidden)
    assert router.weight.dtype == dtype
    assert idx.shape == (37, 4) and idx.dtype == torch.int64
    assert weights.shape == (37, 4) and weights.dtype == torch.float32
    assert logits.shape == (37, 16) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(hidden.double(), router.weight.double()).float(),
                               rtol=1e-5, atol=1e-6)
    again = router.route(logits)
    assert torch.equal(again[0], idx) and torch.equal(again[1], weights)


def test_router_v3_uses_its_correction_bias(seed):
    router = Router(32, 16, 4, "deepseek_v3", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    router.reset_parameters(torch.Generator().manual_seed(seed))
    bias = router.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.shape == (16,) and bias.abs().max() > 0
    assert "e_score_correction_bias" in router.state_dict()
    assert "e_score_correction_bias" not in dict(router.named_parameters())
    hidden = torch.randn(21, 32, generator=torch.Generator().manual_seed(seed + 1))
    idx, weights, logits = router(hidden)
    expected = deepseek_v3_topk(logits, bias, 4, 4, 2, True, 2.5)
    assert torch.equal(idx, expected[0]) and torch.equal(weights, expected[1])


def test_router_reset_is_reproducible_with_a_generator():
    a = Router(32, 16, 4, "deepseek_v3", n_group=4, topk_group=2)
    b = Router(32, 16, 4, "deepseek_v3", n_group=4, topk_group=2)
    a.reset_parameters(torch.Generator().manual_seed(7))
    b.reset_parameters(torch.Generator().manual_seed(7))
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)
    assert a.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_router_without_bias_for_other_rules():
    assert Router(8, 4, 2, "softmax").e_score_correction_bias is None
    assert "e_score_correction_bias" not in Router(8, 4, 2, "deepseek_v2").state_dict()


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("call,error,match", [
    (lambda x: softmax_topk(x, 0, True), ValueError, r"top_k must be in \[1, 16\]"),
    (lambda x: softmax_topk(x, 17, True), ValueError, r"top_k must be in \[1, 16\]"),
    (lambda x: softmax_topk(x, 2.0, True), TypeError, "top_k must be an int"),
    (lambda x: deepseek_v3_topk(x, None, 2, 3, 1, True, 1.0), ValueError, r"n_group \(3\) must divide num_experts \(16\)"),
    (lambda x: deepseek_v3_topk(x, None, 2, 4, 0, True, 1.0), ValueError, r"topk_group must be in \[1, 4\]"),
    (lambda x: deepseek_v3_topk(x, None, 2, 4, 5, True, 1.0), ValueError, r"topk_group must be in \[1, 4\]"),
    (lambda x: deepseek_v3_topk(x, None, 9, 4, 2, True, 1.0), ValueError, r"top_k \(9\) must be <= topk_group"),
    (lambda x: deepseek_v2_topk(x, 9, 4, 2, True, 1.0), ValueError, r"top_k \(9\) must be <= topk_group"),
    (lambda x: deepseek_v3_topk(x, None, 2, 16, 2, True, 1.0), ValueError, "each group needs >= 2 experts"),
    (lambda x: deepseek_v3_topk(x, torch.zeros(15), 2, 4, 2, True, 1.0), ValueError, r"correction_bias must have shape \[num_experts\]"),
    (lambda x: deepseek_v3_topk(x, torch.zeros(16, dtype=torch.int64), 2, 4, 2, True, 1.0), TypeError, "correction_bias must be a floating"),
    (lambda x: deepseek_v3_topk(x, None, 2, 4, 2, True, 0.0), ValueError, "routed_scaling_factor must be finite and > 0"),
    (lambda x: softmax_topk(x[0], 2, True), ValueError, "logits must be 2-D"),
    (lambda x: softmax_topk(x.long(), 2, True), TypeError, "logits must be a floating tensor"),
    (lambda x: deepseek_v2_topk(x.tolist(), 2, 4, 2, True, 1.0), TypeError, "logits must be a torch.Tensor"),
])
def test_rule_arguments_are_validated(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(5, 16))


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((32, 16, 4, "switch"), {}, ValueError, "rule must be one of deepseek_v3, deepseek_v2, softmax"),
    ((32, 16, 0, "softmax"), {}, ValueError, r"top_k must be in \[1, 16\]"),
    ((0, 16, 2, "softmax"), {}, ValueError, "hidden_size must be in"),
    ((32, 16, 2, "softmax"), dict(n_group=4), ValueError, "n_group and topk_group must be 1 for rule 'softmax'"),
    ((32, 16, 2, "softmax"), dict(routed_scaling_factor=2.5), ValueError, "routed_scaling_factor must be 1.0"),
    ((32, 16, 2, "deepseek_v3"), dict(n_group=5), ValueError, "n_group .* must divide num_experts"),
    ((32, 16, 2, "deepseek_v3"), dict(n_group=16, topk_group=2), ValueError, "deepseek_v3 needs >= 2 experts per group"),
    ((32, 16, 6, "deepseek_v2"), dict(n_group=4, topk_group=1), ValueError, r"top_k \(6\) must be <= topk_group"),
])
def test_router_config_is_validated(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        Router(*args, **kwargs)


def test_router_rejects_bad_hidden_states():
    router = Router(32, 16, 2, "softmax")
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[num_tokens, hidden_size=32\]"):
        router(torch.randn(4, 31))
    with pytest.raises(TypeError, match="hidden_states must be a floating tensor"):
        router(torch.ones(4, 32, dtype=torch.int64))


# -------------------------------------------------------------------------- HF cross-check


def hf_deepseek_v3_route(moe, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx, topk_weights) from HF's DeepseekV3MoE, whose router API differs by version."""
    gate_out = moe.gate(hidden)
    if isinstance(gate_out, torch.Tensor) and hasattr(moe, "route_tokens_to_experts"):
        return moe.route_tokens_to_experts(gate_out)  # gate returns logits only
    if isinstance(gate_out, tuple) and len(gate_out) == 2 and not gate_out[0].is_floating_point():
        return gate_out  # 4.5x: (topk_indices, topk_weights)
    if isinstance(gate_out, tuple) and len(gate_out) == 3 and not gate_out[2].is_floating_point():
        return gate_out[2], gate_out[1]  # 5.x: (router_logits, topk_weights, topk_indices)
    pytest.skip("unrecognised transformers DeepseekV3 router API")


def test_deepseek_v3_matches_hf_router(seed):
    """Biased choices stay positive here: HF 4.x fills dropped groups with 0.0 and 5.x with -inf,
    which differ only when every kept choice is <= 0 (see test_v3_masks_with_zero_like_hf)."""
    pytest.importorskip("transformers", reason="transformers is not installed; HF cross-check skipped")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                              n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    moe = DeepseekV3MoE(config).eval()
    router = Router(32, 16, 4, "deepseek_v3", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    router.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        moe.gate.weight.copy_(router.weight)
        moe.gate.e_score_correction_bias.copy_(router.e_score_correction_bias * 100)
        router.e_score_correction_bias.mul_(100)  # large enough to change choices
    hidden = torch.randn(37, 32, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        hf_idx, hf_weights = hf_deepseek_v3_route(moe, hidden)
        idx, weights, _ = router(hidden)
    for t in range(hidden.shape[0]):
        ours = dict(zip(idx[t].tolist(), weights[t].tolist()))
        theirs = dict(zip(hf_idx[t].tolist(), hf_weights[t].float().tolist()))
        assert set(ours) == set(theirs), f"token {t}"
        for e, w in ours.items():
            assert w == pytest.approx(theirs[e], rel=RTOL)
