"""Argument checks at the public boundary of ``moe_ep.comm``.

Every message names the argument, what it got, and the bound, so a wrong call fails in Python with
a readable error instead of a hang or a device assert. Checks that would read device memory (and
so synchronize) run only on CPU tensors and on the reference backend's calls; on the kernel paths
the kernels check expert ids themselves (layout, low latency) or the engine reads their range
after the host wait it has anyway (intranode dispatch, :func:`expert_id_error`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .fp8 import FP8_DTYPE, FP8_GROUP_SIZE


def check_tensor(value, name: str, *, dtypes: Sequence[torch.dtype], dim: Optional[int] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    if device is not None and not same_device(value.device, device):
        raise ValueError(f"{name} is on {value.device} but this Buffer communicates on {device}")
    return value


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def check_hidden_states(x, name: str, device: torch.device, allow_fp8_tuple: bool = True) -> tuple[int, int]:
    """``x`` is [T, H] bf16 (float32 accepted for exact CPU checks) or ``(x_fp8, scales)``.
    Returns (T, H)."""
    if isinstance(x, tuple):
        if not allow_fp8_tuple:
            raise TypeError(f"{name} must be a tensor here, not an (x_fp8, scales) tuple")
        if len(x) != 2:
            raise ValueError(f"{name} as a tuple must be (x_fp8, scales), got {len(x)} elements")
        x_fp8, scales = x
        check_tensor(x_fp8, f"{name}[0] (x_fp8)", dtypes=[FP8_DTYPE], dim=2, device=device)
        check_tensor(scales, f"{name}[1] (scales)", dtypes=[torch.float32], dim=2, device=device)
        num_tokens, hidden = x_fp8.shape
        if hidden % FP8_GROUP_SIZE:
            raise ValueError(f"{name}: FP8 hidden size {hidden} must be a multiple of {FP8_GROUP_SIZE}")
        if tuple(scales.shape) != (num_tokens, hidden // FP8_GROUP_SIZE):
            raise ValueError(f"{name}[1] (scales) must have shape [{num_tokens}, {hidden // FP8_GROUP_SIZE}] "
                             f"(one float32 per 1x{FP8_GROUP_SIZE} group), got {tuple(scales.shape)}")
        return num_tokens, hidden
    check_tensor(x, name, dtypes=[torch.bfloat16, torch.float32], dim=2, device=device)
    return x.shape[0], x.shape[1]


def check_topk_idx(topk_idx, num_tokens: int, num_experts: int, device: torch.device,
                   name: str = "topk_idx", sync_free: bool = False, values: bool = True) -> int:
    """[T, K] int64 with values in [-1, num_experts). Returns K.

    With ``sync_free`` (low-latency calls) a CUDA tensor's values are checked on the device
    with a message instead of being read on the host. ``values=False``: the caller's kernel checks
    the values itself (the low-latency kernels do, for free, in the pass they make over topk_idx)."""
    check_tensor(topk_idx, name, dtypes=[torch.int64], dim=2, device=device)
    if topk_idx.shape[0] != num_tokens:
        raise ValueError(f"{name} has {topk_idx.shape[0]} rows but x has {num_tokens} tokens")
    if not values:
        return topk_idx.shape[1]
    if topk_idx.numel() and topk_idx.is_cuda and (sync_free or torch.cuda.is_current_stream_capturing()):
        in_range = ((topk_idx >= -1) & (topk_idx < num_experts)).all()
        torch._assert_async(in_range, f"moe_ep: {name} holds an expert id outside [-1, {num_experts - 1}]")
    elif topk_idx.numel():
        error = expert_id_error(name, int(topk_idx.min()), int(topk_idx.max()), num_experts)
        if error is not None:
            raise error
    return topk_idx.shape[1]


def expert_id_error(name: str, low: int, high: int, num_experts: int) -> Optional[ValueError]:
    """The error for expert ids whose smallest is ``low`` and largest ``high``, or None when both
    lie in [-1, num_experts)."""
    if low >= -1 and high < num_experts:
        return None
    bad = low if low < -1 else high
    return ValueError(f"{name} holds expert id {bad}; ids must be in [-1, {num_experts - 1}] "
                      f"(-1 = no expert, num_experts={num_experts})")


def check_topk_weights(topk_weights, topk_idx: torch.Tensor, device: torch.device,
                       name: str = "topk_weights") -> None:
    check_tensor(topk_weights, name, dtypes=[torch.float32], dim=2, device=device)
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"{name} shape {tuple(topk_weights.shape)} must equal topk_idx shape {tuple(topk_idx.shape)}")


def check_num_experts(num_experts, num_ranks: int) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} must be divisible by the number of ranks ({num_ranks})")


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
