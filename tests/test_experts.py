"""SwiGLUExperts / SharedExperts against an independent float64 per-expert loop.

Shapes are deliberately odd: L=3 local experts, hidden 256 and 384 (not a power of two),
intermediate 96 (not a multiple of 128), uneven counts with an empty expert, and padding rows
poisoned with NaN / huge values that must not reach valid outputs (padding outputs must be 0).

Error bounds (relative Frobenius error ||out - ref|| / ||ref||):

* float32: 1e-5 (float32 accumulation over K <= 384, against float64).
* bf16: 1e-2 (inputs, weights and the SwiGLU intermediate rounded to 8-bit mantissas: ~0.4% each).
* FP8 fallback, against float64 on the *dequantized* FP8 operands: 1e-2 (only the bf16 rounding
  of the dequantized values and of the intermediate is left; measured <= 0.6%).
* FP8 fallback, against float64 on the *original* operands: 8e-2. e4m3 keeps 3 mantissa bits: one
  round-to-nearest costs a relative RMS error of about 2^-3 / sqrt(12) * E[1/m] ~ 2.6% per
  element (m the mantissa in [1, 2)); the gate/up GEMMs see two such roundings (x and w13, ~3.7%),
  the SwiGLU product adds gate's and up's errors (~5%), and the down GEMM w2's (~6%). Measured
  6.0-6.4% over 10 seeds; the bound leaves room for the seed-to-seed spread.
* sm90 FP8 path (run here with ``torch._scaled_grouped_mm`` emulated in float32): the row-wise
  kernel re-rounds the block weights per output channel, the 1x128 activations per token, and
  quantizes the SwiGLU intermediate: about three more e4m3 roundings. Measured 5.3-6.5% against
  the dequantized operands (bound 9e-2) and at most 8.9% against the original ones (bound 1.2e-1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_ep.layers.experts as experts_mod
from moe_ep.comm.fp8 import (
    FP8_DTYPE,
    per_block_dequant_fp8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
)
from moe_ep.layers.experts import SharedExperts, SwiGLUExperts, group_to_rowwise_fp8

L, INTER = 3, 96
HIDDEN_SIZES = (256, 384)
COUNTS = [7, 0, 12]  # an empty expert in the middle
PAD = 5  # padding rows after the counted ones
SLOTS = 16  # masked layout: slots per expert
MASKED_COUNTS = [5, 0, 16]  # an empty expert and a full one

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
FP8_FALLBACK_VS_DEQUANT = 1e-2
FP8_FALLBACK_VS_ORIGINAL = 8e-2
FP8_SM90_VS_DEQUANT = 9e-2
FP8_SM90_VS_ORIGINAL = 1.2e-1


# ------------------------------------------------------------------------------ helpers


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_experts(hidden: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> SwiGLUExperts:
    experts = SwiGLUExperts(L, hidden, INTER, dtype=dtype, device=device)
    experts.reset_parameters(gen(seed, device))
    return experts


def float_weights(experts: SwiGLUExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights as float64 (dequantized when FP8)."""
    if experts.fp8:
        return (per_block_dequant_fp8(experts.w13, experts.w13_scale, out_dtype=torch.float64),
                per_block_dequant_fp8(experts.w2, experts.w2_scale, out_dtype=torch.float64))
    return experts.w13.detach().double(), experts.w2.detach().double()


def expert_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert in float64 from the separate gate/up/down matrices."""
    inter = w2.shape[1]
    gate, up, down = w13[:inter].double(), w13[inter:].double(), w2.double()
    x = x.double()
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def contiguous_ref(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    start = 0
    for l, count in enumerate(counts):
        out[start:start + count] = expert_ref(x[start:start + count], w13[l], w2[l])
        start += count
    return out


def masked_ref(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(*x.shape[:2], w2.shape[1], dtype=torch.float64)
    for l, count in enumerate(counts):
        out[l, :count] = expert_ref(x[l, :count], w13[l], w2[l])
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def poison_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """NaN in the even poisoned rows, 1e30 (finite in bf16 and float32) in the odd ones."""
    t = t.clone()
    bad = torch.where(torch.arange(rows.numel()) % 2 == 0, float("nan"), 1e30).to(t.dtype)
    t[rows] = bad.unsqueeze(-1).expand(-1, t.shape[-1]).to(t.device)
    return t


def poison_fp8_pair(pair: tuple, rows) -> tuple:
    """NaN codes (0x7F) in the FP8 payload and NaN / huge scales on the padding rows."""
    x_fp8, scales = pair[0].clone(), pair[1].clone()
    x_fp8.view(torch.uint8)[rows] = 0x7F
    scales[rows] = float("nan")
    scales[rows, ..., :1] = 1e30
    return x_fp8, scales


def contiguous_input(hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Fresh data with the padding rows poisoned."""
    total = sum(COUNTS)
    x = torch.randn(total + PAD, hidden, generator=gen(seed + 1)).to(dtype)
    return poison_rows(x, torch.arange(total, total + PAD))


def masked_input(hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(L, SLOTS, hidden, generator=gen(seed + 2)).to(dtype)
    for l, count in enumerate(MASKED_COUNTS):
        x[l] = poison_rows(x[l], torch.arange(count, SLOTS))
    return x


def masked_counts(device: str = "cpu") -> torch.Tensor:
    return torch.tensor(MASKED_COUNTS, dtype=torch.int32, device=device)


def assert_padding_zero(y: torch.Tensor) -> None:
    if y.dim() == 2:
        assert torch.equal(y[sum(COUNTS):], torch.zeros_like(y[sum(COUNTS):]))
    else:
        for l, count in enumerate(MASKED_COUNTS):
            assert torch.equal(y[l, count:], torch.zeros_like(y[l, count:]))


def emulated_scaled_grouped_mm(a, a_scale, b_t, b_scale, offs):
    """What ``torch._scaled_grouped_mm`` computes (row-wise scales, 2-D x 3-D with offsets), in
    float32; rows past the last offset are NaN, as uninitialized memory may be."""
    assert a.dtype == FP8_DTYPE and b_t.dtype == FP8_DTYPE and offs.dtype == torch.int32
    assert a.stride(-1) == 1 and b_t.stride(-2) == 1, "a row-major, b column-major"
    assert a_scale.shape == (a.shape[0],) and b_scale.shape == (b_t.shape[0], b_t.shape[2])
    out = torch.full((a.shape[0], b_t.shape[2]), float("nan"), dtype=torch.bfloat16, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        rows = a[start:end].float() * a_scale[start:end, None]
        out[start:end] = (rows @ (b_t[g].float() * b_scale[g][None, :])).to(torch.bfloat16)
        start = end
    return out


@pytest.fixture
def emulate_sm90_fp8(monkeypatch):
    """Route FP8 through the sm90 code (layouts, scale conversion, packing) on the CPU."""
    monkeypatch.setattr(experts_mod, "_use_scaled_grouped_mm", lambda device: True)
    monkeypatch.setattr(experts_mod, "_scaled_grouped_mm", emulated_scaled_grouped_mm)


def force_contiguous_path(monkeypatch, path: str, dtype: torch.dtype) -> None:
    if path == "loop":
        monkeypatch.setattr(experts_mod, "_use_grouped_mm", lambda device, dtype: False)
    elif not experts_mod._cpu_grouped_mm_works(dtype):
        pytest.skip(f"this torch ({torch.__version__}) has no CPU torch._grouped_mm for {dtype}")


def force_masked_path(monkeypatch, path: str, dtype: torch.dtype) -> None:
    if path == "packed":
        if not experts_mod._cpu_grouped_mm_works(dtype):
            pytest.skip(f"this torch ({torch.__version__}) has no CPU torch._grouped_mm for {dtype}")
        monkeypatch.setattr(experts_mod, "_use_grouped_mm_masked", lambda device, dtype: True)


# ------------------------------------------------------------------------------ float layouts


@pytest.mark.parametrize("path", ["loop", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_contiguous_matches_reference(monkeypatch, seed, hidden, dtype, path):
    force_contiguous_path(monkeypatch, path, dtype)
    experts = make_experts(hidden, dtype, seed)
    x = contiguous_input(hidden, dtype, seed)
    y = experts.forward_contiguous(x, COUNTS)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert_padding_zero(y)
    w13, w2 = float_weights(experts)
    assert rel_err(y, contiguous_ref(x, COUNTS, w13, w2)) < TOL[dtype]


def test_contiguous_counts_as_tensor_and_no_padding(seed):
    experts = make_experts(256, torch.float32, seed)
    x = contiguous_input(256, torch.float32, seed)[: sum(COUNTS)]
    y_list = experts.forward_contiguous(x, COUNTS)
    y_tensor = experts.forward_contiguous(x, torch.tensor(COUNTS, dtype=torch.int64))
    assert torch.equal(y_list, y_tensor)
    y_zero = experts.forward_contiguous(x, [0, 0, 0])
    assert torch.equal(y_zero, torch.zeros_like(x))


def test_float32_input_on_bf16_weights_uses_float32_math(seed):
    experts = make_experts(256, torch.bfloat16, seed)
    x = contiguous_input(256, torch.float32, seed)
    y = experts.forward_contiguous(x, COUNTS)
    assert y.dtype == torch.float32
    w13, w2 = float_weights(experts)
    assert rel_err(y, contiguous_ref(x, COUNTS, w13, w2)) < TOL[torch.float32]


@pytest.mark.parametrize("path", ["bmm", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_masked_matches_reference(monkeypatch, seed, hidden, dtype, path):
    force_masked_path(monkeypatch, path, dtype)
    experts = make_experts(hidden, dtype, seed)
    x = masked_input(hidden, dtype, seed)
    y = experts.forward_masked(x, masked_counts())
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert_padding_zero(y)
    w13, w2 = float_weights(experts)
    assert rel_err(y, masked_ref(x, MASKED_COUNTS, w13, w2)) < TOL[dtype]


def test_masked_packing_is_a_permutation():
    counts = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    valid, src, dest, offs = experts_mod._masked_packing(counts, 3)
    assert offs.tolist() == [2, 2, 5, 6] and offs.dtype == torch.int32
    assert sorted(dest.tolist()) == list(range(12))
    assert torch.equal(src[dest], torch.arange(12))
    # Valid rows first, in expert order; the invalid ones after the last offset.
    assert src[:6].tolist() == [0, 1, 6, 7, 8, 9]
    assert valid.flatten().tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("sm90", [False, True], ids=["bf16-packed", "fp8-sm90-emulated"])
def test_masked_max_valid_rows(request, monkeypatch, seed, sm90):
    if sm90:
        request.getfixturevalue("emulate_sm90_fp8")
        experts, _ = fp8_setup(256, seed)
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
        force_masked_path(monkeypatch, "packed", dtype)
        experts = make_experts(256, dtype, seed)
    x = masked_input(256, dtype, seed)
    full = experts.forward_masked(x, masked_counts())
    total = sum(MASKED_COUNTS)
    # (GEMMs of other row counts may block the sums differently: close, not always equal.)
    torch.testing.assert_close(experts.forward_masked(x, masked_counts(), max_valid_rows=total), full)
    # A broken bound is the caller's error: rows past it come back 0, nothing reads out of bounds.
    short = experts.forward_masked(x, masked_counts(), max_valid_rows=3)
    torch.testing.assert_close(short[0, :3], full[0, :3])
    assert torch.equal(short[0, 3:], torch.zeros_like(short[0, 3:])) and torch.equal(short[1:], torch.zeros_like(short[1:]))
    with pytest.raises(ValueError, match="max_valid_rows"):
        experts.forward_masked(x, masked_counts(), max_valid_rows=-1)


def test_forward_dispatches_on_rank(seed):
    experts = make_experts(256, torch.float32, seed)
    x2 = contiguous_input(256, torch.float32, seed)
    x3 = masked_input(256, torch.float32, seed)
    assert torch.equal(experts(x2, COUNTS), experts.forward_contiguous(x2, COUNTS))
    assert torch.equal(experts(x3, masked_counts()), experts.forward_masked(x3, masked_counts()))


# ------------------------------------------------------------------------------ FP8


def fp8_setup(hidden: int, seed: int):
    """bf16 experts, their original float64 weights, then the FP8-quantized module."""
    experts = make_experts(hidden, torch.bfloat16, seed)
    original = float_weights(experts)
    experts.quantize_fp8_()
    return experts, original


@pytest.mark.parametrize("sm90", [False, True], ids=["fallback", "sm90-emulated"])
@pytest.mark.parametrize("form", ["tensor", "tuple"])
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_fp8_contiguous(request, seed, hidden, form, sm90):
    if sm90:
        request.getfixturevalue("emulate_sm90_fp8")
    experts, original = fp8_setup(hidden, seed)
    x = contiguous_input(hidden, torch.bfloat16, seed)
    total = sum(COUNTS)
    if form == "tuple":
        pair = per_token_group_quant_fp8(x[:total])
        pair = tuple(torch.cat([p, p[:PAD]]) for p in pair)
        inp = poison_fp8_pair(pair, slice(total, None))
        x_deq = per_token_group_dequant_fp8(*pair, out_dtype=torch.float64)
    else:
        inp = x
        x_deq = per_token_group_dequant_fp8(*per_token_group_quant_fp8(x), out_dtype=torch.float64)
    y = experts.forward_contiguous(inp, COUNTS)
    assert y.dtype == torch.bfloat16 and y.shape == (total + PAD, hidden)
    assert torch.isfinite(y).all()
    assert_padding_zero(y)
    err_original = rel_err(y, contiguous_ref(x, COUNTS, *original))
    if sm90:
        assert err_original < FP8_SM90_VS_ORIGINAL
    else:
        assert err_original < FP8_FALLBACK_VS_ORIGINAL
        if form == "tuple":  # the fallback is the float path on the dequantized operands
            assert rel_err(y, contiguous_ref(x_deq, COUNTS, *float_weights(experts))) < FP8_FALLBACK_VS_DEQUANT


@pytest.mark.parametrize("sm90", [False, True], ids=["fallback", "sm90-emulated"])
@pytest.mark.parametrize("form", ["tensor", "tuple-contiguous-scales", "tuple-column-major-scales"])
def test_fp8_masked(request, seed, form, sm90):
    if sm90:
        request.getfixturevalue("emulate_sm90_fp8")
    hidden = 384
    experts, original = fp8_setup(hidden, seed)
    x = masked_input(hidden, torch.bfloat16, seed)
    clean = x.clone()
    for l, count in enumerate(MASKED_COUNTS):
        clean[l, count:] = 0
    if form == "tensor":
        inp = x
    else:
        x_fp8, scales = per_token_group_quant_fp8(clean)
        for l, count in enumerate(MASKED_COUNTS):
            x_fp8[l], scales[l] = poison_fp8_pair((x_fp8[l], scales[l]), slice(count, None))
        if form == "tuple-column-major-scales":  # DeepEP's low-latency layout: [L, G, S] storage
            scales = scales.transpose(1, 2).contiguous().transpose(1, 2)
            assert not scales.is_contiguous()
        inp = (x_fp8, scales)
    y = experts.forward_masked(inp, masked_counts())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert_padding_zero(y)
    bound = FP8_SM90_VS_ORIGINAL if sm90 else FP8_FALLBACK_VS_ORIGINAL
    assert rel_err(y, masked_ref(clean, MASKED_COUNTS, *original)) < bound


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_fp8_sm90_emulated_against_dequantized_operands(emulate_sm90_fp8, seed, hidden):
    experts, _ = fp8_setup(hidden, seed)
    x = contiguous_input(hidden, torch.bfloat16, seed)[: sum(COUNTS)]
    pair = per_token_group_quant_fp8(x)
    x_deq = per_token_group_dequant_fp8(*pair, out_dtype=torch.float64)
    y = experts.forward_contiguous(pair, COUNTS)
    assert rel_err(y, contiguous_ref(x_deq, COUNTS, *float_weights(experts))) < FP8_SM90_VS_DEQUANT


def test_fp8_float32_input_returns_float32(seed):
    experts, original = fp8_setup(256, seed)
    x = contiguous_input(256, torch.float32, seed)
    y = experts.forward_contiguous(x, COUNTS)
    assert y.dtype == torch.float32
    assert_padding_zero(y)
    assert rel_err(y, contiguous_ref(x, COUNTS, *original)) < FP8_FALLBACK_VS_ORIGINAL


def test_group_to_rowwise_conversion(seed):
    x = torch.randn(6, 384, generator=gen(seed)) * torch.logspace(-2, 2, 6).unsqueeze(1)
    x[:, 128:256] *= 1e-3  # one quiet group per token: its ratio to the token's scale is tiny
    for round_scale in (False, True):
        x_fp8, scales = per_token_group_quant_fp8(x, round_scale=round_scale)
        q, s = group_to_rowwise_fp8(x_fp8, scales)
        assert q.dtype == FP8_DTYPE and s.shape == (6,) and torch.equal(s, scales.amax(-1))
        before = per_token_group_dequant_fp8(x_fp8, scales, out_dtype=torch.float64)
        after = q.double() * s.double().unsqueeze(1)
        # Normal-range results: at most half an e4m3 ulp (2^-4 relative); subnormal ones: half
        # the subnormal spacing, s * 2^-10.
        bound = torch.maximum(before.abs() * 2.0 ** -4, s.double().unsqueeze(1) * 2.0 ** -10)
        assert ((after - before).abs() <= bound * (1 + 1e-6)).all()
        loudest = scales.argmax(-1)  # the group that defines s passes through unchanged
        for t in range(6):
            cols = slice(128 * int(loudest[t]), 128 * int(loudest[t]) + 128)
            assert torch.equal(q[t, cols].view(torch.uint8), x_fp8[t, cols].view(torch.uint8))
        if round_scale:  # power-of-two ratios: exact wherever the result stays a normal number
            normal = before.abs() >= s.double().unsqueeze(1) * 2.0 ** -6
            assert torch.equal(after[normal], before[normal])
    zero_q, zero_s = group_to_rowwise_fp8(torch.zeros(2, 256, dtype=FP8_DTYPE), torch.zeros(2, 2))
    assert torch.isfinite(zero_s).all() and torch.equal(zero_q.float(), torch.zeros(2, 256))


def test_quant_rowwise_matches_the_shared_rule(seed):
    x = torch.randn(7, 96, generator=gen(seed)).to(torch.bfloat16) * 10
    x[3] = 0  # the amax floor
    q, s = experts_mod.quant_rowwise_fp8(x)
    q_ref, s_ref = per_token_group_quant_fp8(x, group_size=96)
    assert torch.equal(s, s_ref.squeeze(-1))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_quantize_fp8_storage_and_idempotence(seed):
    experts, _ = fp8_setup(384, seed)
    assert experts.fp8 and experts.compute_dtype == torch.bfloat16
    assert experts.w13.dtype == FP8_DTYPE and experts.w2.dtype == FP8_DTYPE
    assert experts.w13_scale.shape == (L, 2, 3) and experts.w2_scale.shape == (L, 3, 1)
    assert experts.w13_row_scale.shape == (L, 2 * INTER) and experts.w2_row_scale.shape == (L, 384)
    state = experts.state_dict()
    assert set(state) == {"w13", "w2", "w13_scale", "w2_scale"}  # DeepSeek's format, no caches
    before = experts.w13.clone()
    experts.quantize_fp8_()
    assert torch.equal(experts.w13.view(torch.uint8), before.view(torch.uint8))


def test_fp8_state_dict_load_refreshes_rowwise_cache(seed):
    source, _ = fp8_setup(256, seed)
    target, _ = fp8_setup(256, seed + 7)
    target.load_state_dict(source.state_dict())
    for name in ("w13_rowwise", "w2_rowwise"):
        assert torch.equal(getattr(target, name).view(torch.uint8), getattr(source, name).view(torch.uint8))
    assert torch.equal(target.w13_row_scale, source.w13_row_scale)


def test_load_expert_weights(seed):
    experts = make_experts(256, torch.float32, seed)
    g = gen(seed + 3)
    gate, up, down = torch.randn(INTER, 256, generator=g), torch.randn(INTER, 256, generator=g), \
        torch.randn(256, INTER, generator=g)
    experts.load_expert_weights(1, gate, up, down)
    x = torch.randn(4, 256, generator=g)
    y = experts.forward_contiguous(x, [0, 4, 0])
    ref = (F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)) @ down.double().T
    assert rel_err(y, ref) < TOL[torch.float32]
    # On FP8 weights the expert is re-quantized and its row-wise cache refreshed.
    experts.quantize_fp8_()
    experts.load_expert_weights(2, gate, up, down)
    assert torch.equal(experts.w13[2].view(torch.uint8), experts.w13[1].view(torch.uint8))
    assert torch.equal(experts.w2_rowwise[2].view(torch.uint8), experts.w2_rowwise[1].view(torch.uint8))


def test_reset_parameters_scale_and_seeding(seed):
    a = make_experts(384, torch.float32, seed)
    b = make_experts(384, torch.float32, seed)
    assert torch.equal(a.w13, b.w13) and torch.equal(a.w2, b.w2)
    assert abs(a.w13.std().item() * 384 ** 0.5 - 1) < 0.05
    assert abs(a.w2.std().item() * INTER ** 0.5 - 1) < 0.05


# ------------------------------------------------------------------------------ shared experts


def test_shared_experts_formula_and_names(seed):
    shared = SharedExperts.for_deepseek(256, 48, 2, dtype=torch.float32)
    assert shared.intermediate_size == 96
    assert set(shared.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    g = gen(seed)
    for linear in (shared.gate_proj, shared.up_proj, shared.down_proj):
        linear.weight.data.copy_(torch.randn(linear.weight.shape, generator=g) / linear.weight.shape[1] ** 0.5)
    x = torch.randn(9, 256, generator=g)
    gate, up, down = (m.weight.double() for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
    ref = (F.silu(x.double() @ gate.T) * (x.double() @ up.T)) @ down.T
    y = shared(x)
    assert y.dtype == torch.float32 and rel_err(y, ref) < TOL[torch.float32]
    bf16 = SharedExperts(256, 96)
    bf16.load_state_dict(shared.state_dict())
    y16 = bf16(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and rel_err(y16, ref) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------------ bad inputs


def test_bad_contiguous_inputs_raise(seed):
    experts = make_experts(256, torch.float32, seed)
    x = torch.randn(10, 256)
    cases = [
        ((torch.randn(10, 128), [1, 2, 3]), r"x must have shape \(10, 256\)"),
        ((torch.randn(2, 5, 256), [1, 2, 3]), r"\[N, hidden_size\]"),
        ((x.to(torch.int32), [1, 2, 3]), r"x must be one of"),
        ((x, [1, 2]), r"num_local_experts=3 entries"),
        ((x, [1, -1, 3]), r"num_tokens_per_expert\[1\] must be >= 0"),
        ((x, [5, 5, 1]), r"sum\(num_tokens_per_expert\)=11 exceeds the number of rows of x \(10\)"),
        ((x, torch.tensor([1.0, 2.0, 3.0])), r"1-D integer tensor"),
        ((x, [1, 2.5, 3]), r"num_tokens_per_expert\[1\] must be an int"),
        (((x.to(FP8_DTYPE), torch.ones(10, 3)), [1, 2, 3]), r"x\[1\] \(scales\) must have shape \(10, 2\)"),
        (((x, torch.ones(10, 2)), [1, 2, 3]), r"x\[0\] must be torch.float8_e4m3fn"),
        (((x.to(FP8_DTYPE), torch.ones(10, 2, dtype=torch.float64)), [1, 2, 3]), r"must be float32"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            experts.forward_contiguous(*args)


def test_bad_masked_inputs_raise(seed):
    experts = make_experts(256, torch.float32, seed)
    x = torch.randn(L, 4, 256)
    ok = torch.tensor([1, 2, 3], dtype=torch.int32)
    cases = [
        ((torch.randn(2, 4, 256), ok), r"num_local_experts=3"),
        ((torch.randn(L, 256), ok), r"\[num_local_experts, S, hidden_size\]"),
        ((torch.randn(L, 4, 100), ok), r"x must have shape \(3, 4, 256\)"),
        ((x, torch.tensor([1, 2])), r"masked_count must have shape \(3,\)"),
        ((x, torch.tensor([1.0, 2.0, 3.0])), r"integer tensor"),
        ((x, torch.tensor([1, 5, 3])), r"\[0, S=4\]"),
        ((x, torch.tensor([-1, 0, 3])), r"\[0, S=4\]"),
        (((x.to(FP8_DTYPE), torch.ones(L, 4, 3)), ok), r"x\[1\] \(scales\) must have shape \(3, 4, 2\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            experts.forward_masked(*args)


def test_bad_construction_and_loading_raise():
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        SwiGLUExperts(3, 0, 96)
    with pytest.raises(ValueError, match="dtype must be one of"):
        SwiGLUExperts(3, 256, 96, dtype=torch.int8)
    experts = SwiGLUExperts(3, 256, 96, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"l must be an int in \[0, 3\)"):
        experts.load_expert_weights(3, torch.zeros(96, 256), torch.zeros(96, 256), torch.zeros(256, 96))
    with pytest.raises(ValueError, match=r"down must have shape \(256, 96\)"):
        experts.load_expert_weights(0, torch.zeros(96, 256), torch.zeros(96, 256), torch.zeros(96, 256))
    with pytest.raises(ValueError, match="hidden_size=256"):
        SharedExperts(256, 96)(torch.zeros(2, 128))


# ------------------------------------------------------------------------------ GPU (sm90)


def _sm90_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA (torch.cuda.is_available() is False)"
    cap = torch.cuda.get_device_capability()
    if cap[0] not in (9, 10):
        return f"needs an sm90/sm100 GPU for torch._grouped_mm/_scaled_grouped_mm, this one is sm{cap[0]}{cap[1]}"
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_gpu_grouped_paths_match_fallback(monkeypatch, seed, hidden):
    reason = _sm90_skip_reason()
    if reason:
        pytest.skip(reason)
    dev = "cuda"
    experts = make_experts(hidden, torch.bfloat16, seed, device=dev)
    w13, w2 = float_weights(experts)
    w13, w2 = w13.cpu(), w2.cpu()
    x = contiguous_input(hidden, torch.bfloat16, seed).to(dev)
    xm = masked_input(hidden, torch.bfloat16, seed).to(dev)
    counts_dev = masked_counts(dev)

    assert experts_mod._use_grouped_mm(x.device, torch.bfloat16)
    fast_c = experts.forward_contiguous(x, COUNTS)
    fast_m = experts.forward_masked(xm, counts_dev)
    with monkeypatch.context() as m:
        m.setattr(experts_mod, "_use_grouped_mm", lambda device, dtype: False)
        slow_c = experts.forward_contiguous(x, COUNTS)
        slow_m = experts.forward_masked(xm, counts_dev)
    for fast, slow, ref in ((fast_c, slow_c, contiguous_ref(x.cpu(), COUNTS, w13, w2)),
                            (fast_m, slow_m, masked_ref(xm.cpu(), MASKED_COUNTS, w13, w2))):
        assert torch.isfinite(fast).all()
        assert_padding_zero(fast.cpu())
        assert rel_err(fast, ref) < TOL[torch.bfloat16]
        assert rel_err(fast, slow.double().cpu()) < TOL[torch.bfloat16]

    # FP8: the real kernel against the float32 emulation of the same call (same operands: only
    # accumulation order and bf16 output rounding differ), and against the fallback.
    original = (w13, w2)
    experts.quantize_fp8_()
    pair = per_token_group_quant_fp8(x)
    pair_m = per_token_group_quant_fp8(xm)
    pair_m = (pair_m[0], pair_m[1].transpose(1, 2).contiguous().transpose(1, 2))  # column-major
    assert experts_mod._use_scaled_grouped_mm(x.device)
    real = [experts.forward_contiguous(pair, COUNTS), experts.forward_masked(pair_m, counts_dev)]
    with monkeypatch.context() as m:
        m.setattr(experts_mod, "_scaled_grouped_mm", emulated_scaled_grouped_mm)
        emulated = [experts.forward_contiguous(pair, COUNTS), experts.forward_masked(pair_m, counts_dev)]
    with monkeypatch.context() as m:
        m.setattr(experts_mod, "_use_scaled_grouped_mm", lambda device: False)
        fallback = [experts.forward_contiguous(pair, COUNTS), experts.forward_masked(pair_m, counts_dev)]
    refs = [contiguous_ref(x.cpu(), COUNTS, *original), masked_ref(xm.cpu(), MASKED_COUNTS, *original)]
    for r, e, f, ref in zip(real, emulated, fallback, refs):
        assert torch.isfinite(r).all()
        assert_padding_zero(r.cpu())
        assert rel_err(r, e.double().cpu()) < TOL[torch.bfloat16]
        assert rel_err(r, ref) < FP8_SM90_VS_ORIGINAL
        assert rel_err(f, ref) < FP8_FALLBACK_VS_ORIGINAL


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_masked_is_cuda_graph_capturable(seed, fp8):
    reason = _sm90_skip_reason()
    if reason:
        pytest.skip(reason)
    dev = "cuda"
    experts = make_experts(256, torch.bfloat16, seed, device=dev)
    if fp8:
        experts.quantize_fp8_()
    xm = torch.randn(L, SLOTS, 256, generator=gen(seed + 2)).to(device=dev, dtype=torch.bfloat16)
    counts = masked_counts(dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, kernel selection)
        experts.forward_masked(xm, counts)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts.forward_masked(xm, counts)
    for new_counts in ([5, 0, 16], [16, 3, 0], [0, 0, 0]):
        counts.copy_(torch.tensor(new_counts, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        eager = experts.forward_masked(xm, counts)
        assert torch.equal(out, eager), f"graph replay differs from eager for counts {new_counts}"
        for l, count in enumerate(new_counts):
            assert torch.equal(out[l, count:], torch.zeros_like(out[l, count:]))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_gpu_triton_kernels_match_torch(monkeypatch, seed, hidden):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (torch.cuda.is_available() is False)")
    if experts_mod.triton is None:
        pytest.skip("Triton is not installed")
    g = gen(seed, "cuda")
    x = torch.randn(37, hidden, generator=g, device="cuda") * torch.logspace(-3, 3, hidden, device="cuda")
    x_fp8, scales = per_token_group_quant_fp8(x)
    col_major = scales.t().contiguous().t()
    h = torch.randn(37, 2 * INTER, generator=g, device="cuda").to(torch.bfloat16) * 4
    fused = [experts_mod.group_to_rowwise_fp8(x_fp8, col_major), experts_mod.swiglu(h),
             experts_mod.swiglu_quant_fp8(h)]
    monkeypatch.setattr(experts_mod, "TRITON_KERNELS", False)
    plain = [experts_mod.group_to_rowwise_fp8(x_fp8, scales), experts_mod.swiglu(h),
             experts_mod.swiglu_quant_fp8(h)]
    (q_t, s_t), (q_p, s_p) = fused[0], plain[0]
    assert torch.equal(s_t, s_p) and torch.equal(q_t.view(torch.uint8), q_p.view(torch.uint8))
    # SwiGLU: the fused kernel keeps silu(gate) in float32 where torch rounds it to bf16 first.
    assert rel_err(fused[1], plain[1].double().cpu()) < 4e-3
    (hq_t, hs_t), (hq_p, hs_p) = fused[2], plain[2]
    torch.testing.assert_close(hs_t, hs_p, rtol=1e-2, atol=0)
    deq_t = hq_t.float() * hs_t.unsqueeze(1)
    deq_p = hq_p.float() * hs_p.unsqueeze(1)
    assert rel_err(deq_t, deq_p.double().cpu()) < 4e-2  # at most one e4m3 step apart, rarely


@pytest.mark.parametrize("path", ["loop", "grouped_mm"])
def test_gradients_flow_through_both_layouts(monkeypatch, seed, path):
    force_contiguous_path(monkeypatch, path, torch.float32)
    experts = make_experts(256, torch.float32, seed)
    x = torch.randn(sum(COUNTS) + PAD, 256, generator=gen(seed + 1), requires_grad=True)
    experts.forward_contiguous(x, COUNTS).square().sum().backward()
    assert experts.w13.grad[1].abs().sum() == 0 and experts.w13.grad[0].abs().sum() > 0  # expert 1 is empty
    assert torch.equal(x.grad[sum(COUNTS):], torch.zeros_like(x.grad[sum(COUNTS):]))
    xm = torch.randn(L, SLOTS, 256, generator=gen(seed + 2), requires_grad=True)
    experts.zero_grad()
    experts.forward_masked(xm, masked_counts()).sum().backward()
    assert experts.w2.grad[2].abs().sum() > 0
    assert torch.equal(xm.grad[0, MASKED_COUNTS[0]:], torch.zeros_like(xm.grad[0, MASKED_COUNTS[0]:]))
