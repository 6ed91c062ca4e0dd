"""Routing rules: which experts each token goes to, and with what weight.

One function per rule, each matching its reference model's semantics exactly (DeepSeek-V3's
biased sigmoid grouped top-k, DeepSeek-V2's group-limited greedy softmax, Mixtral/Qwen3-MoE's
softmax top-k), because a routing mismatch silently changes every layer's output.

Two choices hold for every rule:

* all math runs in float32 whatever the logits' dtype (bf16 scores tie far too often);
* top-k is a *stable* descending sort, so exact ties go to the lower expert (or group) index on
  every device and every call. ``torch.topk`` does not promise a tie order, and ranks of an
  expert-parallel job must agree on where each token goes.

Every rule returns ``(topk_idx [T, K] int64, topk_weights [T, K] float32)``, entries ordered by
descending selection score.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_RULES = ("deepseek_v3", "deepseek_v2", "softmax")

# Guards the renormalization against an all-zero selection; the constant DeepSeek and HF use.
_NORM_EPS = 1e-20


# ----------------------------------------------------------------------------------- checks


def _check_int(value, name: str, low: int, high: Optional[int] = None) -> int:
    """Reject bools and floats too: ``top_k=6.0`` or ``True`` is almost always a config bug."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_logits(logits, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_tokens, num_experts], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert column, got shape {tuple(logits.shape)}")
    return logits


def _check_groups(num_experts: int, top_k: int, n_group: int, topk_group: int) -> int:
    """Validate the group-limited parameters; returns the experts per group.

    ``top_k`` must fit in the kept groups: otherwise the masked-out experts (score 0.0) would be
    picked with a meaningless weight instead of the call failing.
    """
    _check_int(top_k, "top_k", 1, num_experts)
    _check_int(n_group, "n_group", 1, num_experts)
    if num_experts % n_group:
        raise ValueError(f"n_group ({n_group}) must divide num_experts ({num_experts})")
    _check_int(topk_group, "topk_group", 1, n_group)
    group_size = num_experts // n_group
    if top_k > topk_group * group_size:
        raise ValueError(f"top_k ({top_k}) must be <= topk_group * (num_experts // n_group) "
                         f"= {topk_group} * {group_size} = {topk_group * group_size}")
    return group_size


def _check_bias(bias, num_experts: int, logits: torch.Tensor) -> None:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"correction_bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"correction_bias must be a floating tensor, got {bias.dtype}")
    if tuple(bias.shape) != (num_experts,):
        raise ValueError(f"correction_bias must have shape [num_experts] = [{num_experts}], "
                         f"got {tuple(bias.shape)}")
    if bias.device != logits.device:
        raise ValueError(f"correction_bias is on {bias.device} but logits are on {logits.device}")


def _check_scale(routed_scaling_factor) -> float:
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"routed_scaling_factor must be a float, got {type(routed_scaling_factor).__name__}")
    if not math.isfinite(routed_scaling_factor) or routed_scaling_factor <= 0:
        raise ValueError(f"routed_scaling_factor must be finite and > 0, got {routed_scaling_factor}")
    return float(routed_scaling_factor)


# ---------------------------------------------------------------------------------- helpers


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim where exact ties go to the lower index (stable descending sort)."""
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def _keep_top_groups(group_scores: torch.Tensor, topk_group: int, group_size: int) -> torch.Tensor:
    """Boolean [T, E] mask of the experts in each token's ``topk_group`` best groups."""
    _, group_idx = stable_topk(group_scores, topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return group_mask.repeat_interleave(group_size, dim=1)


def _group_view(scores: torch.Tensor, n_group: int) -> torch.Tensor:
    """[T, E] -> [T, n_group, E // n_group]; groups are contiguous runs of expert ids."""
    return scores.view(scores.shape[0], n_group, scores.shape[1] // n_group)  # explicit: T may be 0


# ------------------------------------------------------------------------------------ rules


def deepseek_v3_topk(logits: torch.Tensor, correction_bias: Optional[torch.Tensor], top_k: int,
                     n_group: int, topk_group: int, norm_topk_prob: bool,
                     routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (HF ``DeepseekV3MoE.route_tokens_to_experts``).

    The correction bias only steers *which* experts are chosen (aux-loss-free load balancing);
    the weights come from the unbiased sigmoid scores. Groups are ranked by the sum of their two
    best biased scores; experts outside the kept groups get choice -inf, as in DeepSeek's inference
    code and transformers 5.x (4.x used 0.0, which lets a dropped expert win when every kept
    biased score is negative).
    """
    _check_logits(logits)
    num_experts = logits.shape[1]
    group_size = _check_groups(num_experts, top_k, n_group, topk_group)
    if group_size < 2:
        raise ValueError(f"deepseek_v3 ranks groups by their two best experts, so each group needs "
                         f">= 2 experts; num_experts // n_group = {num_experts} // {n_group} = {group_size}")
    scale = _check_scale(routed_scaling_factor)
    scores = logits.float().sigmoid()
    choice = scores
    if correction_bias is not None:
        _check_bias(correction_bias, num_experts, logits)
        choice = scores + correction_bias.float()
    group_scores = _group_view(choice, n_group).topk(2, dim=-1).values.sum(dim=-1)
    keep = _keep_top_groups(group_scores, topk_group, group_size)
    _, topk_idx = stable_topk(choice.masked_fill(~keep, float("-inf")), top_k)
    weights = scores.gather(1, topk_idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return topk_idx, weights * scale


def deepseek_v2_topk(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                     norm_topk_prob: bool,
                     routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 ``group_limited_greedy`` routing.

    Groups are ranked by their best softmax score. Normalization and scaling are exclusive, exactly
    as V2's branch: renormalized weights are *not* scaled, and un-normalized ones are.
    """
    _check_logits(logits)
    group_size = _check_groups(logits.shape[1], top_k, n_group, topk_group)
    scale = _check_scale(routed_scaling_factor)
    scores = logits.float().softmax(dim=-1)
    group_scores = _group_view(scores, n_group).amax(dim=-1)
    keep = _keep_top_groups(group_scores, topk_group, group_size)
    weights, topk_idx = stable_topk(scores.masked_fill(~keep, 0.0), top_k)
    if top_k > 1 and norm_topk_prob:
        return topk_idx, weights / (weights.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return topk_idx, weights * scale


def softmax_topk(logits: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax then top-k: Mixtral (``renormalize=True``) and Qwen3-MoE (``norm_topk_prob``)."""
    _check_logits(logits)
    _check_int(top_k, "top_k", 1, logits.shape[1])
    probs = logits.float().softmax(dim=-1)
    weights, topk_idx = stable_topk(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return topk_idx, weights


# ----------------------------------------------------------------------------------- module


class Router(nn.Module):
    """The gate linear plus one routing rule.

    The gate runs in float32 whatever the weight's dtype, as DeepSeek and HF compute V3's router:
    bf16 logits would reorder near-tied experts. For ``deepseek_v3`` the per-expert
    ``e_score_correction_bias`` is a float32 buffer, not a parameter: it is updated by a load
    balancing rule, not by gradients, but it is saved in the state dict.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, rule: str, n_group: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> None:
        super().__init__()
        _check_router_config(hidden_size, num_experts, top_k, rule, n_group, topk_group,
                             routed_scaling_factor)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.rule = rule
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = bool(norm_topk_prob)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        if rule == "deepseek_v3":
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Normal(0, 0.02) gate weight; a small random bias so tests exercise the biased choice.

        Pass a ``generator`` to get the same router on every rank without touching global RNG state.
        """
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=0.02, generator=generator)
            if self.e_score_correction_bias is not None:
                nn.init.normal_(self.e_score_correction_bias, mean=0.0, std=1e-3, generator=generator)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, H] -> (topk_idx [T, K] int64, topk_weights [T, K] float32, router_logits [T, E] float32)."""
        _check_hidden(hidden_states, self.hidden_size)
        logits = F.linear(hidden_states.float(), self.weight.float())
        topk_idx, topk_weights = self.route(logits)
        return topk_idx, topk_weights, logits

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply this router's rule to precomputed logits (e.g. logits gathered from another rank)."""
        if self.rule == "deepseek_v3":
            return deepseek_v3_topk(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                                    self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)
        if self.rule == "deepseek_v2":
            return deepseek_v2_topk(logits, self.top_k, self.n_group, self.topk_group,
                                    self.norm_topk_prob, self.routed_scaling_factor)
        return softmax_topk(logits, self.top_k, self.norm_topk_prob)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"rule={self.rule!r}, n_group={self.n_group}, topk_group={self.topk_group}, "
                f"norm_topk_prob={self.norm_topk_prob}, routed_scaling_factor={self.routed_scaling_factor}")


def _check_router_config(hidden_size: int, num_experts: int, top_k: int, rule: str, n_group: int,
                         topk_group: int, routed_scaling_factor: float) -> None:
    """Fail at construction, not on the first forward, for a config that no input can satisfy."""
    if rule not in ROUTER_RULES:
        raise ValueError(f"rule must be one of {', '.join(ROUTER_RULES)}; got {rule!r}")
    _check_int(hidden_size, "hidden_size", 1)
    _check_int(num_experts, "num_experts", 1)
    _check_scale(routed_scaling_factor)
    if rule == "softmax":
        # Mixtral/Qwen3 have neither groups nor scaling: refuse values that would be silently ignored.
        _check_int(top_k, "top_k", 1, num_experts)
        if n_group != 1 or topk_group != 1:
            raise ValueError(f"n_group and topk_group must be 1 for rule 'softmax', "
                             f"got n_group={n_group}, topk_group={topk_group}")
        if routed_scaling_factor != 1.0:
            raise ValueError(f"routed_scaling_factor must be 1.0 for rule 'softmax', got {routed_scaling_factor}")
        return
    group_size = _check_groups(num_experts, top_k, n_group, topk_group)
    if rule == "deepseek_v3" and group_size < 2:
        raise ValueError(f"deepseek_v3 needs >= 2 experts per group; num_experts // n_group = {group_size}")


def _check_hidden(hidden_states, hidden_size: int) -> None:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating tensor, got {hidden_states.dtype}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != hidden_size:
        raise ValueError(f"hidden_states must have shape [num_tokens, hidden_size={hidden_size}], "
                         f"got {tuple(hidden_states.shape)}")
