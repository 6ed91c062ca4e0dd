"""Hugging Face ``transformers`` interop: turn a model's MoE blocks into :class:`ExpertParallelMoE`.

Two entry points:

* :func:`from_hf_block` (``ExpertParallelMoE.from_hf``): one HF MoE block -> an
  :class:`ExpertParallelMoE` with the same router, the same routed experts (each EP rank copies
  only its own shard: local expert ``l`` on rank ``r`` is global expert ``r * L + l``) and the
  same shared experts.
* :func:`replace_moe_blocks`: every supported block of a model replaced, in place, by an
  :class:`HFMoEAdapter`, which keeps the replaced block's call signature and return convention,
  so the model's own forward (and its ``output_router_logits``) works unchanged.

Supported blocks (by class name, so the v4 and v5 layouts of ``transformers`` both work):

=========================  =========================================  ===========================
block                      router                                     experts
=========================  =========================================  ===========================
``DeepseekV3MoE``          ``deepseek_v3``: sigmoid, correction bias,  routed + ``shared_experts``
                           group-limited top-k, renorm, scaling
``Qwen3MoeSparseMoeBlock``  ``softmax`` top-k, ``norm_topk_prob``       routed
``MixtralSparseMoeBlock``   ``softmax`` top-k, always renormalized      routed
=========================  =========================================  ===========================

Expert weight layouts read: v5's fused ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj
[E, H, I]`` (or their transposed / interleaved variants the experts module declares with
``is_transposed`` / ``is_concatenated``), and v4's ``ModuleList`` of per-expert MLPs with
``gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2``.

Return conventions: in transformers v5 every one of these blocks returns the hidden states alone
(``[B, S, H]``); the router logits ``[B*S, E]`` reach ``output_router_logits`` through a forward
hook on the router submodule (``OutputRecorder(<Router class>, index=0)``). The adapter therefore
returns a tensor and exposes the logits through a ``gate`` submodule that is an instance of the
replaced router's class, so the model's hooks record them exactly as before. In v4, Mixtral and
Qwen3-MoE blocks returned ``(hidden_states, router_logits)``; the adapter mirrors that when the
block has the v4 (``ModuleList``) layout.

``transformers`` is optional: it is imported inside the functions that need it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .moe import ExpertParallelMoE

__all__ = ["SUPPORTED_BLOCKS", "from_hf_block", "replace_moe_blocks", "HFMoEAdapter", "hf_block_kind"]

# Block class name -> kind.
SUPPORTED_BLOCKS = {
    "DeepseekV3MoE": "deepseek_v3",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "MixtralSparseMoeBlock": "mixtral",
}

_TRANSFORMERS_MISSING = ("moe_ep.layers.hf needs Hugging Face transformers: "
                         "pip install 'transformers>=4.46' (or the moe_ep[hf] / moe_ep[test] extra)")


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(_TRANSFORMERS_MISSING) from exc
    return transformers


# ------------------------------------------------------------------------------ block reading


def hf_block_kind(block: nn.Module) -> Optional[str]:
    """``"deepseek_v3"`` | ``"qwen3_moe"`` | ``"mixtral"`` for a supported block (or a subclass of
    one), else ``None``."""
    for cls in type(block).__mro__:
        kind = SUPPORTED_BLOCKS.get(cls.__name__)
        if kind is not None:
            return kind
    return None


@dataclasses.dataclass
class _BlockSpec:
    kind: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    rule: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    router_weight: torch.Tensor
    correction_bias: Optional[torch.Tensor]
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # global e -> gate, up, down
    expert_dtype: torch.dtype
    shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # gate [Is,H], up [Is,H], down [H,Is]
    router_logits_dtype: Optional[torch.dtype]  # None: the input's dtype (logits = F.linear(x, W) in x's dtype)
    returns_router_logits: bool  # v4 Mixtral / Qwen3-MoE: forward returns (hidden, router_logits)
    router_class: type
    jitter_noise: float


def _first_attr(objs: Iterable[Any], names: Iterable[str], default: Any = None) -> Any:
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                return value
    return default


def _text_config(config):
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # noqa: BLE001 - a config without a text sub-config is its own text config
            return config
    return config


def _check_silu(block: nn.Module, experts: nn.Module, config) -> None:
    act = _first_attr((config, getattr(block, "config", None), getattr(experts, "config", None)), ("hidden_act",))
    if act is not None:
        if act not in ("silu", "swish"):
            raise ValueError(f"{type(block).__name__}: hidden_act={act!r} is not supported; "
                             "moe_ep experts are SwiGLU (silu)")
        return
    act_fn = getattr(experts, "act_fn", None)
    if act_fn is None and isinstance(experts, nn.ModuleList) and len(experts):
        act_fn = getattr(experts[0], "act_fn", None)
    if act_fn is not None and "silu" not in type(act_fn).__name__.lower():
        raise ValueError(f"{type(block).__name__}: activation {type(act_fn).__name__} is not supported; "
                         "moe_ep experts are SwiGLU (silu)")


def _fused_expert_reader(experts: nn.Module):
    """v5 layout: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` (``is_transposed``: ``[E, H, 2I]``,
    ``[E, I, H]``; ``is_concatenated=False``: gate and up rows interleaved)."""
    if getattr(experts, "has_bias", False) or getattr(experts, "has_post_expert_norm", False):
        raise ValueError(f"{type(experts).__name__}: experts with biases or a post-expert norm are not supported")
    if getattr(experts, "has_gate", True) is False:
        raise ValueError(f"{type(experts).__name__}: experts without a gate projection are not supported")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"{type(experts).__name__}: expected 3-D gate_up_proj/down_proj, "
                         f"got {tuple(gate_up.shape)} and {tuple(down.shape)}")
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    if transposed:
        num_experts, hidden, two_i = gate_up.shape
    else:
        num_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    expected_down = (num_experts, inter, hidden) if transposed else (num_experts, hidden, inter)
    if two_i % 2 or tuple(down.shape) != expected_down:
        raise ValueError(f"{type(experts).__name__}: inconsistent expert shapes gate_up_proj {tuple(gate_up.shape)}, "
                         f"down_proj {tuple(down.shape)} (is_transposed={transposed})")

    def read(e: int):
        w = gate_up[e].t() if transposed else gate_up[e]  # [2I, H]
        if concatenated:
            gate, up = w[:inter], w[inter:]
        else:
            gate, up = w[0::2], w[1::2]
        d = down[e].t() if transposed else down[e]  # [H, I]
        return gate, up, d

    return read, num_experts, hidden, inter, gate_up.dtype


def _module_list_expert_reader(experts: nn.ModuleList):
    """v4 layout: one MLP per expert, ``gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2``."""
    first = experts[0]
    if all(hasattr(first, n) for n in ("gate_proj", "up_proj", "down_proj")):
        names = ("gate_proj", "up_proj", "down_proj")
    elif all(hasattr(first, n) for n in ("w1", "w3", "w2")):
        names = ("w1", "w3", "w2")
    else:
        raise ValueError(f"unsupported per-expert MLP {type(first).__name__}: expected gate_proj/up_proj/down_proj "
                         "or w1/w3/w2 linears")
    for name in names:
        if getattr(getattr(first, name), "bias", None) is not None:
            raise ValueError(f"{type(first).__name__}.{name} has a bias; biased experts are not supported")

    def read(e: int):
        mlp = experts[e]
        return tuple(getattr(mlp, n).weight for n in names)

    gate = getattr(first, names[0]).weight
    return read, len(experts), gate.shape[1], gate.shape[0], gate.dtype


def _read_block(block: nn.Module, config=None) -> _BlockSpec:
    kind = hf_block_kind(block)
    if kind is None:
        raise TypeError(f"unsupported MoE block {type(block).__name__}; supported: {', '.join(SUPPORTED_BLOCKS)}")
    config = _text_config(config if config is not None else getattr(block, "config", None))
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None or getattr(gate, "weight", None) is None:
        raise ValueError(f"{type(block).__name__}: expected `gate` (with a weight) and `experts` submodules")
    _check_silu(block, experts, config)

    if hasattr(experts, "gate_up_proj"):
        read, num_experts, hidden, inter, expert_dtype = _fused_expert_reader(experts)
        v4_layout = False
    elif isinstance(experts, nn.ModuleList) and len(experts):
        read, num_experts, hidden, inter, expert_dtype = _module_list_expert_reader(experts)
        v4_layout = True
    else:
        raise ValueError(f"{type(block).__name__}: unrecognized experts module {type(experts).__name__}")

    router_weight = gate.weight
    if tuple(router_weight.shape) != (num_experts, hidden):
        raise ValueError(f"{type(block).__name__}: router weight {tuple(router_weight.shape)} does not match "
                         f"{num_experts} experts of hidden size {hidden}")
    srcs = (gate, block, config)
    top_k = _first_attr(srcs, ("top_k", "num_experts_per_tok"))
    if top_k is None:
        raise ValueError(f"{type(block).__name__}: cannot find top_k (pass the model config)")

    n_group = topk_group = 1
    scale = 1.0
    bias = None
    shared = None
    router_logits_dtype = None
    if kind == "deepseek_v3":
        rule = "deepseek_v3"
        for attr, ok in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):  # remote-code gates
            value = _first_attr((gate, config), (attr,))
            if value is not None and value != ok:
                raise ValueError(f"{type(block).__name__}: {attr}={value!r} is not supported (expected {ok!r})")
        n_group = _first_attr(srcs, ("num_group", "n_group"), 1)
        topk_group = _first_attr(srcs, ("topk_group",), 1)
        norm = _first_attr(srcs, ("norm_topk_prob",), True)
        scale = _first_attr(srcs, ("routed_scaling_factor",), 1.0)
        bias = getattr(gate, "e_score_correction_bias", None)
        router_logits_dtype = torch.float32  # HF computes V3's router in float32
        shared_mlp = getattr(block, "shared_experts", None)
        if shared_mlp is not None:
            shared = (shared_mlp.gate_proj.weight, shared_mlp.up_proj.weight, shared_mlp.down_proj.weight)
            if shared[0].shape[0] % inter:
                raise ValueError(f"{type(block).__name__}: shared experts' intermediate size {shared[0].shape[0]} "
                                 f"is not a multiple of moe_intermediate_size {inter}")
        returns_logits = False
    elif kind == "qwen3_moe":
        rule = "softmax"
        norm = _first_attr(srcs, ("norm_topk_prob",), None)
        if norm is None:
            raise ValueError(f"{type(block).__name__}: cannot find norm_topk_prob (pass the model config)")
        if getattr(block, "shared_expert", None) is not None:
            raise ValueError(f"{type(block).__name__}: a gated shared_expert (Qwen2-MoE style) is not supported")
        returns_logits = v4_layout
    else:  # mixtral
        rule = "softmax"
        norm = True
        returns_logits = v4_layout
    jitter = 0.0
    if kind == "mixtral":  # the only one of the three whose forward jitters its input in training
        jitter = float(_first_attr((block, config), ("jitter_noise", "router_jitter_noise"), 0.0) or 0.0)
    return _BlockSpec(kind=kind, hidden_size=int(hidden), intermediate_size=int(inter), num_experts=int(num_experts),
                      top_k=int(top_k), rule=rule, n_group=int(n_group), topk_group=int(topk_group),
                      norm_topk_prob=bool(norm), routed_scaling_factor=float(scale), router_weight=router_weight,
                      correction_bias=bias, expert_weights=read, expert_dtype=expert_dtype, shared=shared,
                      router_logits_dtype=router_logits_dtype, returns_router_logits=returns_logits,
                      router_class=type(gate), jitter_noise=jitter)


# ------------------------------------------------------------------------------ conversion


@torch.no_grad()
def _build(spec: _BlockSpec, group=None, **kwargs) -> ExpertParallelMoE:
    if kwargs.get("dtype") is None:
        kwargs["dtype"] = spec.expert_dtype
    if kwargs.get("device") is None:
        kwargs["device"] = spec.router_weight.device
    if spec.router_weight.is_meta or spec.expert_weights(0)[0].is_meta:
        raise ValueError("the HF block's weights are on the meta device: load (or materialize) them before converting")
    num_shared = spec.shared[0].shape[0] // spec.intermediate_size if spec.shared is not None else 0
    moe = ExpertParallelMoE(spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k, rule=spec.rule,
                            n_group=spec.n_group, topk_group=spec.topk_group, norm_topk_prob=spec.norm_topk_prob,
                            routed_scaling_factor=spec.routed_scaling_factor, num_shared_experts=num_shared,
                            group=group, **kwargs)
    moe.router.weight.copy_(spec.router_weight)
    if spec.correction_bias is not None:
        moe.router.e_score_correction_bias.copy_(spec.correction_bias)
    if spec.shared is not None:
        shared = moe.shared_experts
        for linear, weight in zip((shared.gate_proj, shared.up_proj, shared.down_proj), spec.shared):
            linear.weight.copy_(weight)
    first = moe.ep_rank * moe.num_local_experts
    for local in range(moe.num_local_experts):
        gate, up, down = spec.expert_weights(first + local)
        moe.experts.load_expert_weights(local, gate, up, down)
    return moe.quantize_fp8_()


def from_hf_block(block: nn.Module, config=None, group=None, **kwargs) -> ExpertParallelMoE:
    """An :class:`ExpertParallelMoE` computing what the HF MoE ``block`` computes.

    Args:
        block: a ``DeepseekV3MoE``, ``Qwen3MoeSparseMoeBlock`` or ``MixtralSparseMoeBlock`` (v4 or v5 layout).
        config: the model config; only needed where the block itself does not carry a hyper-parameter.
        group: the EP process group (``None``: every expert on this process). Each rank copies only
            its own experts.
        **kwargs: passed to :class:`ExpertParallelMoE` (``fp8``, ``phase``, ``low_latency_max_tokens``,
            ``return_router_logits``, ...). ``dtype`` defaults to the block's expert dtype and
            ``device`` to the block's device; with ``fp8=True`` the experts are quantized after loading.

    The result returns what ``ExpertParallelMoE`` returns (the hidden states, plus the router logits
    with ``return_router_logits=True``); use :class:`HFMoEAdapter` for the block's exact return form.
    """
    _require_transformers()
    return _build(_read_block(block, config), group=group, **kwargs)


# ------------------------------------------------------------------------------ adapter

_tap_classes: dict[type, type] = {}


def _router_tap(router_class: type) -> nn.Module:
    """A parameterless module that ``isinstance``-matches ``router_class`` and returns the logits it is
    given: HF v5 records ``router_logits`` with a forward hook on every module of the router class,
    so calling the tap with our logits feeds ``output_router_logits`` exactly as the replaced router did."""
    tap_class = _tap_classes.get(router_class)
    if tap_class is None:
        def __init__(self):
            nn.Module.__init__(self)
            self._is_hf_initialized = True  # nothing for HF's weight init to touch

        def forward(self, router_logits):
            return router_logits

        def extra_repr(self):
            return "records router_logits for output_router_logits"

        tap_class = type(f"EPRouterLogitsTap_{router_class.__name__}", (router_class,),
                         {"__init__": __init__, "forward": forward, "extra_repr": extra_repr,
                          "__module__": __name__})
        _tap_classes[router_class] = tap_class
    return tap_class()


class HFMoEAdapter(nn.Module):
    """Stands in for an HF MoE block: same call (``hidden_states [B, S, H]``), same return form.

    Holds the :class:`ExpertParallelMoE` as ``moe`` and a router-logits tap as ``gate`` (see
    :func:`_router_tap`). ``return_router_logits`` (v4 Mixtral/Qwen3-MoE) returns
    ``(hidden_states, router_logits [B*S, E])``; otherwise the hidden states alone (every v5 block,
    and DeepSeek-V3 in every version). Mixtral's router jitter is applied in training mode like the
    original block.
    """

    def __init__(self, moe: ExpertParallelMoE, *, return_router_logits: bool = False,
                 router_logits_dtype: Optional[torch.dtype] = None, router_class: Optional[type] = None,
                 jitter_noise: float = 0.0, source: str = "") -> None:
        super().__init__()
        moe.return_router_logits = True
        self.moe = moe
        self.gate = _router_tap(router_class) if router_class is not None else None
        self.return_router_logits = bool(return_router_logits)
        self.router_logits_dtype = router_logits_dtype
        self.jitter_noise = float(jitter_noise)
        self.source = source

    @classmethod
    def from_hf_block(cls, block: nn.Module, config=None, group=None, *, return_router_logits: Optional[bool] = None,
                      **kwargs) -> "HFMoEAdapter":
        """Convert ``block`` (see :func:`from_hf_block`); ``return_router_logits=None`` mirrors the block."""
        _require_transformers()
        spec = _read_block(block, config)
        kwargs.pop("return_router_logits", None)
        moe = _build(spec, group=group, **kwargs)
        adapter = cls(moe, return_router_logits=spec.returns_router_logits if return_router_logits is None
                      else return_router_logits, router_logits_dtype=spec.router_logits_dtype,
                      router_class=spec.router_class, jitter_noise=spec.jitter_noise, source=type(block).__name__)
        return adapter.train(block.training)

    def forward(self, hidden_states: torch.Tensor):
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        out, router_logits = self.moe(hidden_states)
        router_logits = router_logits.to(self.router_logits_dtype or hidden_states.dtype)
        if self.gate is not None:
            self.gate(router_logits)
        return (out, router_logits) if self.return_router_logits else out

    def extra_repr(self) -> str:
        return f"source={self.source!r}, return_router_logits={self.return_router_logits}"


# ------------------------------------------------------------------------------ whole models


def replace_moe_blocks(model: nn.Module, group=None, *, block_types: Optional[Iterable[Union[str, type]]] = None,
                       config=None, **kwargs) -> int:
    """Replace, in place, every supported MoE block of ``model`` by an :class:`HFMoEAdapter`.

    Args:
        model: any ``nn.Module`` (an HF ``PreTrainedModel`` typically).
        group: the EP process group (``None``: EP size 1).
        block_types: restrict to these block classes (names or classes); naming an unsupported one
            raises ``ValueError``. ``None``: every supported kind.
        config: defaults to ``model.config`` (its text config for multimodal models).
        **kwargs: passed to :class:`ExpertParallelMoE` (``fp8``, ``phase``, ``low_latency_max_tokens``, ...).

    Returns the number of blocks replaced. Every rank of ``group`` must call this on the same model.
    """
    _require_transformers()
    wanted = None
    if block_types is not None:
        wanted = set()
        for entry in block_types:
            name = entry if isinstance(entry, str) else getattr(entry, "__name__", repr(entry))
            if name not in SUPPORTED_BLOCKS:
                raise ValueError(f"unsupported MoE block type {name!r}; supported: {', '.join(SUPPORTED_BLOCKS)}")
            wanted.add(SUPPORTED_BLOCKS[name])
    if config is None:
        config = getattr(model, "config", None)
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, HFMoEAdapter):
            continue
        kind = hf_block_kind(module)
        if kind is not None and (wanted is None or kind in wanted) and name:
            targets.append(name)
    if hf_block_kind(model) is not None and (wanted is None or hf_block_kind(model) in wanted):
        raise ValueError("model is itself an MoE block: convert it with from_hf_block / HFMoEAdapter.from_hf_block")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block = getattr(parent, child)
        adapter = HFMoEAdapter.from_hf_block(block, config=config, group=group, **kwargs)
        _inherit_router_hooks(adapter.gate, getattr(block, "gate", None))
        setattr(parent, child, adapter)
        del block
    return len(targets)


def _inherit_router_hooks(tap: Optional[nn.Module], router: Optional[nn.Module]) -> None:
    """Give the adapter's router tap the forward hooks the replaced router carried. transformers 5
    installs its output-recording hooks (``output_router_logits``...) once, on the first forward that
    asks for an output; a model that already ran one would otherwise record nothing from the taps.
    Copying the hooks themselves works whatever transformers' recorder looks like inside."""
    if tap is None or router is None:
        return
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks_with_kwargs"):
        source = getattr(router, attr, None)
        if source:
            getattr(tap, attr).update(source)
