"""moe_ep.layers.hf: HF MoE blocks converted to ExpertParallelMoE compute what the blocks compute.

Every model here is a tiny random-weight float32 model built from a config in code (no downloads).
HF initializes some MoE tensors to zero (DeepSeek's correction bias, Qwen3's router); they are
refilled with random values so routing is meaningful.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moe_ep.layers.hf import (HFMoEAdapter, SUPPORTED_BLOCKS, from_hf_block, hf_block_kind,  # noqa: E402
                              replace_moe_blocks)
from moe_ep.layers.moe import ExpertParallelMoE  # noqa: E402

KINDS = ("deepseek_v3", "mixtral", "qwen3_moe")
PREFILL_TOL = 1e-5   # float32: only the summation order differs from HF
EP_DECODE_TOL = 1e-2  # EP > 1 decode carries bf16 through low-latency dispatch/combine (DeepEP's contract)


# ------------------------------------------------------------------------------ tiny models


def _config(kind: str, **overrides):
    """Tiny config of each kind; ``experts_implementation="eager"`` (HF's reference loop) unless overridden."""
    common = dict(vocab_size=97, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, experts_implementation="eager", tie_word_embeddings=False)
    if kind == "deepseek_v3":
        cfg = dict(common, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, n_routed_experts=16,
                   num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                   norm_topk_prob=True, first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=64,
                   kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
        cls = transformers.DeepseekV3Config
    elif kind == "mixtral":
        cfg = dict(common, hidden_size=128, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
        cls = transformers.MixtralConfig
    else:
        cfg = dict(common, hidden_size=128, intermediate_size=256, moe_intermediate_size=48, num_experts=8,
                   num_experts_per_tok=3, norm_topk_prob=True, head_dim=32, decoder_sparse_step=1)
        cls = transformers.Qwen3MoeConfig
    cfg.update(overrides)
    return cls(**cfg)


def _block_class(kind: str):
    if kind == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        return DeepseekV3MoE
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        return MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    return Qwen3MoeSparseMoeBlock


@torch.no_grad()
def _randomize_moe(block: nn.Module, seed: int, bias_std: float = 0.1) -> nn.Module:
    """Fill every tensor of an MoE block with seeded random values of a sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in block.named_parameters():
        if name.startswith("gate."):
            std = 0.1  # router logits of order 1: the top-k choice is decided by the weights
        else:
            std = param.shape[-1] ** -0.5  # in-features last in both HF layouts
        param.copy_(torch.randn(param.shape, generator=gen) * std)
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        bias.copy_(torch.randn(bias.shape, generator=gen) * bias_std)
    return block


def _make_block(kind: str, seed: int, dtype=torch.float32, **overrides) -> nn.Module:
    block = _block_class(kind)(_config(kind, **overrides))
    return _randomize_moe(block, seed).to(dtype).eval()


def _make_model(kind: str, seed: int, **overrides) -> nn.Module:
    """A 2-layer causal LM with HF's default experts implementation (not forced to eager)."""
    overrides.setdefault("experts_implementation", None)
    cls = {"deepseek_v3": transformers.DeepseekV3ForCausalLM, "mixtral": transformers.MixtralForCausalLM,
           "qwen3_moe": transformers.Qwen3MoeForCausalLM}[kind]
    torch.manual_seed(seed)
    model = cls(_config(kind, **overrides)).eval()
    for i, module in enumerate(m for m in model.modules() if hf_block_kind(m) is not None):
        _randomize_moe(module, seed * 7 + i)
    return model


def _tokens(seed: int, num_tokens: int, hidden: int, batch: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, hidden, generator=gen).to(dtype)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def _assert_same_return(out, ref, tol: float) -> None:
    """Same structure (tensor, or tuple of tensors), shapes, dtypes, and values within ``tol``."""
    assert type(out) is type(ref), (type(out), type(ref))
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert isinstance(o, torch.Tensor) and o.shape == r.shape and o.dtype == r.dtype, (o.shape, r.shape, o.dtype)
        assert _rel_err(o, r) < tol, _rel_err(o, r)


class _Recorder:
    """Collects what a module returns at index 0 (tensor or tuple), the way HF's OutputRecorder does."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(
            lambda _m, _a, out: self.outputs.append(out[0] if isinstance(out, tuple) else out))


# ------------------------------------------------------------------------------ single blocks


@pytest.mark.parametrize("phase", ["prefill", "decode", "auto"])
@pytest.mark.parametrize("kind", KINDS)
def test_block_matches_hf(kind, phase, seed):
    block = _make_block(kind, seed)
    hidden = block.gate.weight.shape[1]
    x = _tokens(seed, 13, hidden, batch=2)
    with torch.no_grad():
        hf_logits = _Recorder(block.gate)
        ref = block(x)
        adapter = HFMoEAdapter.from_hf_block(block, phase=phase, low_latency_max_tokens=32)
        ep_logits = _Recorder(adapter.gate)
        out = adapter(x)
        moe_out = from_hf_block(block, phase=phase, low_latency_max_tokens=32)(x)
    # transformers 5 returns the hidden states alone; the adapter returns exactly that form.
    assert isinstance(ref, torch.Tensor)
    _assert_same_return(out, ref, PREFILL_TOL)
    _assert_same_return(moe_out, ref, PREFILL_TOL)
    # The router logits the model's hooks record: [B*S, E], in the HF router's dtype, equal.
    (hf_l,), (ep_l,) = hf_logits.outputs, ep_logits.outputs
    assert ep_l.shape == hf_l.shape == (2 * 13, block.gate.weight.shape[0]) and ep_l.dtype == hf_l.dtype
    torch.testing.assert_close(ep_l, hf_l, rtol=1e-6, atol=1e-6)


def test_from_hf_block_hyperparameters_and_weights(seed):
    block = _make_block("deepseek_v3", seed)
    moe = from_hf_block(block)
    assert isinstance(moe, ExpertParallelMoE)
    assert (moe.hidden_size, moe.moe_intermediate_size, moe.num_experts, moe.top_k) == (256, 64, 16, 4)
    assert moe.num_local_experts == 16 and moe.ep_rank == 0 and moe.dtype == torch.float32
    r = moe.router
    assert (r.rule, r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor) == \
        ("deepseek_v3", 4, 2, True, 2.5)
    assert torch.equal(r.weight, block.gate.weight)
    assert torch.equal(r.e_score_correction_bias, block.gate.e_score_correction_bias)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(getattr(moe.shared_experts, name).weight, getattr(block.shared_experts, name).weight)
    assert not moe.return_router_logits
    with torch.no_grad():
        out, logits = from_hf_block(block, return_router_logits=True)(_tokens(seed, 5, 256))
    assert out.shape == (1, 5, 256) and logits.shape == (5, 16)

    mixtral = from_hf_block(_make_block("mixtral", seed))
    assert (mixtral.router.rule, mixtral.router.norm_topk_prob, mixtral.top_k, mixtral.shared_experts) == \
        ("softmax", True, 2, None)
    qwen = from_hf_block(_make_block("qwen3_moe", seed, norm_topk_prob=False))
    assert (qwen.router.rule, qwen.router.norm_topk_prob, qwen.moe_intermediate_size, qwen.top_k) == \
        ("softmax", False, 48, 3)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_qwen3_without_norm_topk_prob(phase, seed):
    block = _make_block("qwen3_moe", seed, norm_topk_prob=False)
    x = _tokens(seed, 11, 128)
    with torch.no_grad():
        ref = block(x)
        out = HFMoEAdapter.from_hf_block(block, phase=phase)(x)
    _assert_same_return(out, ref, PREFILL_TOL)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_deepseek_v3_negative_choice_scores(phase, seed):
    """Bias pushes most choice scores below 0: kept groups must still beat dropped ones (-inf mask, as
    transformers 5 does)."""
    block = _make_block("deepseek_v3", seed)
    bias = torch.full((16,), -2.0)
    bias[::4] = 0.5
    block.gate.e_score_correction_bias.copy_(bias)
    x = _tokens(seed, 9, 256, batch=2)
    with torch.no_grad():
        ref = block(x)
        out = HFMoEAdapter.from_hf_block(block, phase=phase)(x)
    _assert_same_return(out, ref, PREFILL_TOL)


def test_block_keeps_dtype_bf16(seed):
    block = _make_block("mixtral", seed, dtype=torch.bfloat16)
    x = _tokens(seed, 10, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = block(x)
        adapter = HFMoEAdapter.from_hf_block(block, phase="prefill")
        out = adapter(x)
    assert adapter.moe.dtype == torch.bfloat16
    # bf16 experts (and HF's bf16 router logits, which ours keep in float32) round differently.
    _assert_same_return(out, ref, 2e-2)


def test_fp8_conversion_quantizes_experts(seed):
    block = _make_block("deepseek_v3", seed)
    x = _tokens(seed, 10, 256)
    with torch.no_grad():
        ref = block(x)
        adapter = HFMoEAdapter.from_hf_block(block, fp8=True, phase="prefill")
        out = adapter(x)
    assert adapter.moe.fp8 and adapter.moe.experts.fp8
    # e4m3 activations (1x128 scales) and weights (128x128 blocks): a few percent, not exactness.
    assert type(out) is type(ref) and out.dtype == ref.dtype
    assert _rel_err(out, ref) < 0.1


def test_adapter_follows_training_mode_and_jitter(seed):
    block = _make_block("mixtral", seed, router_jitter_noise=0.1)
    adapter = HFMoEAdapter.from_hf_block(block, phase="prefill")
    assert not adapter.training and adapter.jitter_noise == 0.1
    x = _tokens(seed, 6, 128)
    with torch.no_grad():
        _assert_same_return(adapter(x), block(x), PREFILL_TOL)  # eval: no jitter
        adapter.train()
        assert _rel_err(adapter(x), block(x)) > 1e-4  # training: inputs jittered like the original


def test_gradients_reach_router_and_experts(seed):
    block = _make_block("qwen3_moe", seed)
    adapter = HFMoEAdapter.from_hf_block(block, phase="prefill")
    adapter(_tokens(seed, 7, 128)).square().sum().backward()
    assert adapter.moe.router.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.moe.experts.parameters())


# ------------------------------------------------------------------------------ v4 layout


class MixtralSparseMoeBlock(nn.Module):  # noqa: D101 - transformers 4.x's block, restated
    """transformers 4.x Mixtral block: ``nn.Linear`` gate, ``ModuleList`` of w1/w3/w2 experts,
    forward returns ``(hidden_states, router_logits [B*S, E])``."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.hidden_dim, self.num_experts, self.top_k, self.jitter_noise = hidden, num_experts, top_k, 0.0
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(_V4Expert(hidden, inter) for _ in range(num_experts))

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(selected == e)
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        return out.view(b, s, h), router_logits


class _V4Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_v4_module_list_layout_and_tuple_return(phase, seed):
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(64, 32, 8, 2).eval()
    x = _tokens(seed, 9, 64, batch=2)
    with torch.no_grad():
        ref = block(x)
        out = HFMoEAdapter.from_hf_block(block, phase=phase)(x)
    assert isinstance(ref, tuple) and ref[1].shape == (18, 8)
    _assert_same_return(out, ref, PREFILL_TOL)


# ------------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("kind,expected", [("deepseek_v3", 1), ("mixtral", 2), ("qwen3_moe", 2)])
def test_replace_moe_blocks_full_model(kind, expected, seed):
    model = _make_model(kind, seed)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids, output_router_logits=True)
        assert replace_moe_blocks(model, phase="auto", low_latency_max_tokens=16) == expected
        assert not any(hf_block_kind(m) is not None for m in model.modules())
        assert sum(isinstance(m, HFMoEAdapter) for m in model.modules()) == expected
        out = model(ids, output_router_logits=True)
    assert _rel_err(out.logits, ref.logits) < PREFILL_TOL
    # output_router_logits still collects one [B*S, E] tensor per MoE layer (the model's hooks fire
    # on the adapter's router tap), and Mixtral/Qwen3's load-balancing loss is unchanged.
    if getattr(ref, "router_logits", None) is None:  # this transformers' model does not return them
        assert getattr(out, "router_logits", None) is None
    else:
        assert len(out.router_logits) == len(ref.router_logits) == expected
    for o, r in zip(getattr(out, "router_logits", None) or (), getattr(ref, "router_logits", None) or ()):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    if getattr(ref, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    assert replace_moe_blocks(model) == 0  # nothing left to replace


def test_router_logits_recorded_when_replaced_before_first_capture(seed):
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(seed))
    original, converted = _make_model("qwen3_moe", seed), _make_model("qwen3_moe", seed)
    assert replace_moe_blocks(converted, phase="prefill") == 2  # before any output_router_logits call
    with torch.no_grad():
        ref, out = original(ids, output_router_logits=True), converted(ids, output_router_logits=True)
        again = converted(ids, output_router_logits=True)
    assert _rel_err(out.logits, ref.logits) < PREFILL_TOL
    assert len(out.router_logits) == len(again.router_logits) == 2  # hooked once, not twice
    for o, r in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)


def test_replace_moe_blocks_generate(seed):
    model = _make_model("mixtral", seed)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    replace_moe_blocks(model, low_latency_max_tokens=8)  # auto: prompt and each decode step fit -> decode
    assert torch.equal(model.generate(ids, **kwargs), ref)


def test_replace_moe_blocks_block_types(seed):
    model = _make_model("qwen3_moe", seed)
    assert replace_moe_blocks(model, block_types=["MixtralSparseMoeBlock"]) == 0
    with pytest.raises(ValueError, match="unsupported MoE block type 'Qwen2MoeSparseMoeBlock'"):
        replace_moe_blocks(model, block_types=["Qwen2MoeSparseMoeBlock"])
    assert replace_moe_blocks(model, block_types=[_block_class("qwen3_moe")]) == 2


def test_unsupported_blocks_are_refused():
    with pytest.raises(TypeError, match="unsupported MoE block Linear"):
        from_hf_block(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        from_hf_block(_make_block("mixtral", 0, hidden_act="gelu"))
    with torch.device("meta"):
        meta_block = _block_class("mixtral")(_config("mixtral"))
    with pytest.raises(ValueError, match="meta device"):
        from_hf_block(meta_block)
    block = _make_block("mixtral", 0)
    with pytest.raises(ValueError, match="is itself an MoE block"):
        replace_moe_blocks(block)
    assert set(SUPPORTED_BLOCKS) == {"DeepseekV3MoE", "Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock"}


def test_missing_transformers_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'transformers>=4.46'"):
        from_hf_block(nn.Linear(4, 4))


# ------------------------------------------------------------------------------ expert parallel


def _ep_block(ctx, kind: str, phase: str, seed: int, num_tokens_by_rank: list[int]):
    """Every rank builds the same HF block, converts its shard, and runs its own tokens."""
    block = _make_block(kind, seed)
    hidden, num_experts = block.gate.weight.shape[1], block.gate.weight.shape[0]
    adapter = HFMoEAdapter.from_hf_block(block, group=ctx.group, device=ctx.device, phase=phase,
                                         low_latency_max_tokens=max(num_tokens_by_rank))
    moe = adapter.moe
    assert moe.ep_size == ctx.world_size and moe.ep_rank == ctx.rank
    assert moe.num_local_experts == num_experts // ctx.world_size
    x = _tokens(seed * 31 + ctx.rank, num_tokens_by_rank[ctx.rank], hidden)
    with torch.no_grad():
        out = adapter(x.to(ctx.device)).cpu()
        ref = block(x)
    assert type(out) is type(ref) and out.shape == ref.shape and out.dtype == ref.dtype
    return _rel_err(out, ref) if x.shape[1] else 0.0


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("kind", KINDS)
def test_expert_parallel_block_matches_hf(dist_pool, kind, phase, seed):
    errs = dist_pool(2).run(_ep_block, kind, phase, seed, [13, 6])
    assert max(errs) < (PREFILL_TOL if phase == "prefill" else EP_DECODE_TOL), errs


def _ep_model(ctx, kind: str, seed: int):
    model = _make_model(kind, seed)
    ids = torch.randint(0, 97, (1, 7 + 3 * ctx.rank), generator=torch.Generator().manual_seed(seed + ctx.rank))
    with torch.no_grad():
        ref = model(ids).logits
        replace_moe_blocks(model, group=ctx.group, phase="prefill")
        out = model.to(ctx.device)(ids.to(ctx.device)).logits.cpu()
    return _rel_err(out, ref)


@pytest.mark.parametrize("kind", ["deepseek_v3", "mixtral"])
def test_expert_parallel_full_model(dist_pool, kind, seed):
    errs = dist_pool(2).run(_ep_model, kind, seed)
    assert max(errs) < PREFILL_TOL, errs
