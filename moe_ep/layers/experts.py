"""Expert MLPs: one EP rank's shard of routed SwiGLU experts, and DeepSeek's shared experts.

The routed experts run on the two layouts the communication layer produces:

* ``forward_contiguous`` (prefill): ``x [N, H]`` with rows grouped by local expert and per-expert
  counts known on the host; one grouped GEMM over cumulative offsets.
* ``forward_masked`` (decode): DeepEP's low-latency receive buffer ``x [L, S, H]`` where only the
  first ``masked_count[l]`` rows of expert ``l`` are valid and the counts live on the device.
  Nothing here reads device values on the host, so a CUDA graph can capture the call.

Where the GEMMs run
-------------------
On CUDA devices of compute capability 9.x / 10.x (the ones whose ``torch._grouped_mm`` and
``torch._scaled_grouped_mm`` have native, sync-free kernels) the BF16 path uses
``torch._grouped_mm(a [M, K], b [G, K, N], offs)`` and the FP8 path ``torch._scaled_grouped_mm``.
Everywhere else (CPU, older GPUs, float32 inputs) a plain loop / ``torch.bmm`` computes the same
thing; on CPU ``torch._grouped_mm`` is used for the contiguous layout when this torch has it.
Rows that a grouped GEMM leaves uncomputed (past the last offset) are never read: padding rows of
the inputs cannot leak into valid outputs, and padding rows of the outputs are written as 0.

The masked layout on sm90 packs the valid rows to the front with device-computed gather indices
(``max_valid_rows``, a static bound on their number, shrinks the packed matrix), runs the grouped
GEMMs on it and gathers the results back; elsewhere ``bmm`` runs every slot and the invalid ones
are zeroed. On an H100 (torch 2.11; L=8, S=1024, H=7168, I=2048, 64 valid rows per expert,
CUDA-graph replay) the packed path took 0.51-0.62 ms against bmm's 1.1-1.2 ms (0.38 ms with
``max_valid_rows=512``; FP8: 0.44 ms, 0.27 ms). Eager, its ~20 small index ops cost about as
much host time as that: decode is meant to be replayed from a graph.
On CUDA with Triton installed, SwiGLU (and its FP8 quantization) and the 1x128 -> per-token
conversion run as fused row kernels instead of several float32 passes of torch ops.

FP8 (``quantize_fp8_``)
-----------------------
Weights are stored as DeepSeek-V3 checkpoints store them: float8_e4m3fn with one float32 scale
per 128x128 block (``w13_scale``, ``w2_scale``). ``torch._scaled_grouped_mm`` on sm90 only takes
*row-wise* scales (one per activation row, one per weight output channel), so at quantize time the
block weights are dequantized and re-quantized per output channel into cached, non-persistent
buffers (``w13_rowwise``/``w13_row_scale``, ``w2_rowwise``/``w2_row_scale``).

Activations arrive as 1x128 groups (``(x_fp8, scales [..., H/128])``, what dispatch sends). The
row-wise kernel needs one scale per token, so :func:`group_to_rowwise_fp8` uses

    s_t = max_g scales[t, g],     q'[t, k] = fp8( q[t, k] * (scales[t, g(k)] / s_t) )

``scales[t, g] / s_t <= 1``, so nothing saturates, and the group that holds the token's largest
magnitude passes through unchanged. Every other element is rounded once more to e4m3: a relative
error of at most 2^-4 (half an ulp of a 3-bit mantissa) for results in the normal range, plus an
absolute ``s_t * 2^-10`` where a small group falls into e4m3's subnormals. With power-of-two
(UE8M0) scales the ratio is a power of two and the conversion is exact outside the subnormals.
The SwiGLU intermediate is quantized per token directly (one rounding). The fallback instead
dequantizes weights and activations and runs the float path (no second rounding, no intermediate
quantization), so it is more accurate than the sm90 path. On Gaussian test data, relative
Frobenius error against float64 on the unquantized operands: fallback ~6%, sm90 path ~9% (that
is what e4m3's 3-bit mantissa costs: ~2.6% RMS per rounding); tests/test_experts.py states the
bounds and their derivation.

Note: ``module.to(dtype)`` casts every floating parameter, the FP8 ones included; move a
quantized module between devices only.
"""
from __future__ import annotations

import functools
import itertools
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.fp8 import (
    FP8_AMAX_FLOOR,
    FP8_DTYPE,
    FP8_GROUP_SIZE,
    FP8_MAX,
    per_block_dequant_fp8,
    per_block_quant_fp8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
    unpack_ue8m0,
)

Activations = Union[torch.Tensor, tuple]
Counts = Union[Sequence[int], torch.Tensor]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------ capability checks


def _native_grouped_gemm_device(device: torch.device) -> bool:
    """CUDA sm90/sm100: where torch's grouped GEMMs have native kernels (no host sync). Other
    CUDA parts either reject ``_scaled_grouped_mm`` or run ``_grouped_mm`` as a host loop."""
    if device.type != "cuda":
        return False
    return _cuda_major(torch.cuda.current_device() if device.index is None else device.index) in (9, 10)


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0] if torch.cuda.is_available() else 0


@functools.lru_cache(maxsize=None)
def _cpu_grouped_mm_works(dtype: torch.dtype) -> bool:
    """Recent torch runs ``_grouped_mm`` on CPU; older torch lacks it (probe once per dtype)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(3, 16, dtype=dtype)  # 16-element rows: every stride a multiple of 16 bytes
        b = torch.ones(2, 16, 16, dtype=dtype)
        out = torch._grouped_mm(a, b, offs=torch.tensor([1, 3], dtype=torch.int32))
        return bool(out.shape == (3, 16) and (out == 16).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _use_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """BF16 grouped GEMM for the contiguous layout (and the packed masked layout)."""
    if device.type == "cpu":
        return _cpu_grouped_mm_works(dtype)
    return dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and _native_grouped_gemm_device(device)


def _use_grouped_mm_masked(device: torch.device, dtype: torch.dtype) -> bool:
    """The masked layout packs rows only where the grouped GEMM is native: on CPU ``bmm`` over
    the whole buffer is simpler and as fast."""
    return device.type == "cuda" and _use_grouped_mm(device, dtype)


def _use_scaled_grouped_mm(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_grouped_mm") and _native_grouped_gemm_device(device)


def _scaled_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
                       offs: torch.Tensor) -> torch.Tensor:
    """Row-wise FP8 grouped GEMM: ``a [M, K]`` row-major fp8, ``a_scale [M]``, ``b_t [G, K, N]``
    column-major fp8 (a transpose of a contiguous ``[G, N, K]``), ``b_scale [G, N]`` -> bf16 [M, N].
    Precise accumulation (no fast accum): K is thousands of elements in real models."""
    return torch._scaled_grouped_mm(a, b_t, a_scale, b_scale, offs=offs, out_dtype=torch.bfloat16,
                                    use_fast_accum=False)


# ------------------------------------------------------------------------------ small math helpers


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``h [..., 2I]`` = [gate | up] -> ``silu(gate) * up`` (DeepSeek/HF ``act_fn(gate) * up``).
    The fused kernel has no backward: training (a graph that needs h's gradient) uses torch ops."""
    if _use_triton(h) and not (h.requires_grad and torch.is_grad_enabled()):
        return _triton_swiglu(h, quantize=False)[0]
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def swiglu_quant_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU then per-row FP8 (the second GEMM's input); one fused pass on CUDA with Triton."""
    if _use_triton(h):
        return _triton_swiglu(h, quantize=True)
    return quant_rowwise_fp8(swiglu(h))


def quant_rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row (``[..., K]`` -> fp8, scales ``[...]``) by the shared rule
    (``scale = max(amax, floor) / 448``, ``q = x / scale``) in two passes over ``x``: an inf-norm
    reduction and one division whose float32 result is rounded straight into the FP8 output.
    (``x / scale`` never exceeds 448 by more than a rounding, which e4m3 rounds back to 448.)"""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, dtype=torch.float32)
    scales = amax.clamp_min(FP8_AMAX_FLOOR) / FP8_MAX
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    torch.div(x, scales.unsqueeze(-1), out=q)
    return q, scales


def group_to_rowwise_fp8(x_fp8: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128-group FP8 ``(x_fp8 [..., H], scales [..., H/128])`` -> per-token ``(q [..., H], s [...])``.

    ``s = max_g scales``; every group is rescaled by ``scales_g / s <= 1`` and rounded once more
    (see the module docstring for the error). A row whose scales are all 0 stays 0 instead of NaN.
    """
    if _use_triton(x_fp8):
        return _triton_group_to_rowwise(x_fp8, scales)
    groups = (scales.shape[-1], x_fp8.shape[-1] // scales.shape[-1])
    token_scale = scales.amax(dim=-1).clamp_min(_FLOAT32_TINY)
    ratio = (scales / token_scale.unsqueeze(-1)).unsqueeze(-1)
    q = torch.empty(x_fp8.shape, dtype=FP8_DTYPE, device=x_fp8.device)
    # e4m3 -> bf16 is exact; the product is formed in float32 and rounded once, into q.
    torch.mul(x_fp8.to(torch.bfloat16).unflatten(-1, groups), ratio, out=q.unflatten(-1, groups))
    return q, token_scale.contiguous()


# ------------------------------------------------------------------------------ Triton kernels
# Unfused torch ops make several float32 passes over every activation; on a GPU these row-wise
# kernels do each job in one read and one write. Same formulas as the torch versions above (the
# conversion is bit-identical; SwiGLU keeps its product in float32 instead of rounding to bf16
# first). Optional: without Triton, or with TRITON_KERNELS = False, the torch versions run.
# Forward only: the FP8 paths never need gradients, and swiglu() avoids the kernel under autograd.

TRITON_KERNELS = True
_FLOAT32_TINY = torch.finfo(torch.float32).tiny

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def _use_triton(t: torch.Tensor) -> bool:
    return TRITON_KERNELS and triton is not None and t.is_cuda and t.dim() >= 1 and t.numel() > 0


if triton is not None:
    @triton.jit
    def _swiglu_rows_kernel(h_ptr, out_ptr, scale_ptr, inter, stride_h, stride_out,
                            QUANTIZE: tl.constexpr, AMAX_FLOOR: tl.constexpr, FP8_LIMIT: tl.constexpr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate)) * up
        if QUANTIZE:
            scale = tl.maximum(tl.max(tl.abs(act), axis=0), AMAX_FLOOR) / FP8_LIMIT
            tl.store(out_ptr + row * stride_out + cols, (act / scale).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(scale_ptr + row, scale)
        else:
            tl.store(out_ptr + row * stride_out + cols, act.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_to_rowwise_kernel(x_ptr, s_ptr, q_ptr, out_s_ptr, hidden, groups, stride_x, stride_s_row,
                                 stride_s_group, stride_q, TINY: tl.constexpr, GROUP: tl.constexpr,
                                 BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        group_scales = tl.load(s_ptr + row * stride_s_row + g * stride_s_group, mask=g < groups, other=0.0)
        token_scale = tl.maximum(tl.max(group_scales, axis=0), TINY)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < hidden
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + row * stride_s_row + (cols // GROUP) * stride_s_group, mask=mask, other=0.0)
        tl.store(q_ptr + row * stride_q + cols, (x * (scale / token_scale)).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(out_s_ptr + row, token_scale)


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _triton_swiglu(h: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    lead, inter = h.shape[:-1], h.shape[-1] // 2
    rows = h.reshape(-1, 2 * inter)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], inter, dtype=FP8_DTYPE if quantize else h.dtype, device=h.device)
    scales = torch.empty(rows.shape[0] if quantize else 0, dtype=torch.float32, device=h.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(inter)
        _swiglu_rows_kernel[(rows.shape[0],)](rows, out, scales, inter, rows.stride(0), out.stride(0),
                                               QUANTIZE=quantize, AMAX_FLOOR=FP8_AMAX_FLOOR, FP8_LIMIT=FP8_MAX,
                                               BLOCK=block, num_warps=_num_warps(block))
    return out.view(*lead, inter), (scales.view(lead) if quantize else None)


def _triton_group_to_rowwise(x_fp8: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lead, hidden, groups = x_fp8.shape[:-1], x_fp8.shape[-1], scales.shape[-1]
    x = x_fp8.reshape(-1, hidden)
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = scales.reshape(-1, groups)  # a view where it can be: column-major scales stay as they are
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    token_scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        block = triton.next_power_of_2(hidden)
        _group_to_rowwise_kernel[(x.shape[0],)](x, s, q, token_scale, hidden, groups, x.stride(0), s.stride(0),
                                                s.stride(1), q.stride(0), TINY=_FLOAT32_TINY,
                                                GROUP=hidden // groups, BLOCK_H=block,
                                                BLOCK_G=triton.next_power_of_2(groups), num_warps=_num_warps(block))
    return q.view(*lead, hidden), token_scale.view(lead)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Row-major, 16-byte-aligned storage: what the TMA-based grouped GEMMs require."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``index_select`` on dim 0; FP8 goes through a uint8 view (not every build indexes FP8)."""
    if t.dtype == FP8_DTYPE:
        return t.view(torch.uint8).index_select(0, index).view(FP8_DTYPE)
    return t.index_select(0, index)


def _offsets(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def _masked_packing(counts: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device-side packing of the masked layout, no host sync.

    Returns ``valid [L, S]``, ``src [L*S]`` (packed row j comes from flat row src[j]),
    ``dest [L*S]`` (flat row i lands at packed row dest[i]) and ``offs [L]`` int32. Valid rows of
    expert l go to ``[excl_l, excl_l + c_l)``; invalid rows fill the tail after the last offset,
    so ``dest`` is a permutation and the grouped GEMM never touches them. Counts are clamped to
    [0, S] (they cannot be validated without a sync): memory stays in bounds whatever they hold.
    """
    num_experts = counts.shape[0]
    c = counts.to(torch.int64).clamp(0, slots)
    inclusive = c.cumsum(0)
    exclusive = inclusive - c
    slot = torch.arange(slots, device=counts.device)
    flat = torch.arange(num_experts * slots, device=counts.device).view(num_experts, slots)
    valid = slot < c.unsqueeze(1)
    dest = torch.where(valid, exclusive.unsqueeze(1) + slot,
                       inclusive[-1] + flat - inclusive.unsqueeze(1)).flatten()
    src = torch.empty_like(dest).scatter_(0, dest, flat.flatten())
    return valid, src, dest, inclusive.to(torch.int32)


# ------------------------------------------------------------------------------ input validation


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_shape(t: torch.Tensor, name: str, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _check_fp8_pair(x, hidden: int, lead: tuple, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8 [*lead, H], scales [*lead, H/128])``; UE8M0-packed int32 scales are unpacked."""
    if len(x) != 2:
        raise ValueError(f"{name} as a tuple must be (x_fp8, scales), got {len(x)} items")
    x_fp8, scales = _check_tensor(x[0], f"{name}[0]"), _check_tensor(x[1], f"{name}[1]")
    if x_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"{name}[0] must be {FP8_DTYPE}, got {x_fp8.dtype}")
    if hidden % FP8_GROUP_SIZE:
        raise ValueError(f"FP8 activations need hidden_size ({hidden}) to be a multiple of {FP8_GROUP_SIZE}")
    _check_shape(x_fp8, f"{name}[0]", (*lead, hidden))
    if scales.dtype == torch.int32:
        _check_shape(scales, f"{name}[1] (UE8M0-packed)", (*lead, hidden // FP8_GROUP_SIZE // 4))
        scales = unpack_ue8m0(scales)
    elif scales.dtype != torch.float32:
        raise ValueError(f"{name}[1] (scales) must be float32 (or UE8M0-packed int32), got {scales.dtype}")
    _check_shape(scales, f"{name}[1] (scales)", (*lead, hidden // FP8_GROUP_SIZE))
    if scales.device != x_fp8.device:
        raise ValueError(f"{name}: scales are on {scales.device}, x_fp8 on {x_fp8.device}")
    return x_fp8, scales


def _first_tensor(x: Activations) -> torch.Tensor:
    """The activations tensor (``x`` itself, or ``x_fp8`` of a pair), for shape checks."""
    first = x[0] if isinstance(x, (tuple, list)) and len(x) else x
    return _check_tensor(first, "x[0]" if first is not x else "x")


def _host_counts(counts: Counts, num_experts: int, num_rows: int) -> list[int]:
    """Counts for the contiguous layout as Python ints (one host sync for a device tensor)."""
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1 or counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise ValueError(f"num_tokens_per_expert must be a 1-D integer tensor, got {counts.dtype} "
                             f"of shape {tuple(counts.shape)}")
        counts = counts.tolist()
    counts = list(counts)
    if len(counts) != num_experts:
        raise ValueError(f"num_tokens_per_expert must have num_local_experts={num_experts} entries, got {len(counts)}")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not hasattr(c, "__index__"):  # ints and NumPy integers, not 2.0
            raise ValueError(f"num_tokens_per_expert[{i}] must be an int, got {type(c).__name__}")
        counts[i] = c = operator.index(c)
        if c < 0:
            raise ValueError(f"num_tokens_per_expert[{i}] must be >= 0, got {c}")
    if sum(counts) > num_rows:
        raise ValueError(f"sum(num_tokens_per_expert)={sum(counts)} exceeds the number of rows of x ({num_rows})")
    return counts


# ------------------------------------------------------------------------------ routed experts


class SwiGLUExperts(nn.Module):
    """One EP rank's contiguous shard of routed experts: expert l computes
    ``down_l(silu(gate_l(x)) * up_l(x))``.

    Parameters: ``w13 [L, 2I, H]`` (gate rows ``[0, I)``, up rows ``[I, 2I)``: one GEMM for both)
    and ``w2 [L, H, I]`` (down), each in nn.Linear's ``[out, in]`` orientation so HF/DeepSeek
    weights copy in without a transpose.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        super().__init__()
        for name, value in (("num_local_experts", num_local_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        self.num_local_experts = num_local_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.fp8 = False
        self._compute_dtype = dtype
        self.w13 = nn.Parameter(torch.empty(num_local_experts, 2 * intermediate_size, hidden_size,
                                            dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, hidden_size, intermediate_size,
                                           dtype=dtype, device=device))
        self.register_load_state_dict_post_hook(_rederive_rowwise_after_load)
        self.reset_parameters()

    # -------------------------------------------------------------- weights
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the experts compute and return in for FP8-tuple inputs (the weights' dtype
        before ``quantize_fp8_``)."""
        return self._compute_dtype if self.fp8 else self.w13.dtype

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Gaussian weights with std 1/sqrt(fan_in): unit-scale inputs give unit-scale outputs."""
        if self.fp8:
            raise RuntimeError("reset_parameters on FP8 weights: build a new module, then quantize_fp8_()")
        for w in (self.w13, self.w2):
            draw = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32)
            w.copy_(draw / w.shape[-1] ** 0.5)

    @torch.no_grad()
    def load_expert_weights(self, l: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Fill local expert ``l`` from HF-style ``gate_proj [I, H]``, ``up_proj [I, H]``,
        ``down_proj [H, I]`` weights (any float dtype; re-quantized when already FP8)."""
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < self.num_local_experts:
            raise ValueError(f"l must be an int in [0, {self.num_local_experts}), got {l!r}")
        h, i = self.hidden_size, self.intermediate_size
        for name, t, shape in (("gate", gate, (i, h)), ("up", up, (i, h)), ("down", down, (h, i))):
            _check_tensor(t, name)
            _check_shape(t, name, shape)
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        w13 = torch.cat([gate, up], dim=0).to(self.w13.device)
        down = down.to(self.w2.device)
        if not self.fp8:
            self.w13[l].copy_(w13)
            self.w2[l].copy_(down)
            return
        for name, w in (("w13", w13), ("w2", down)):
            q, scales = per_block_quant_fp8(w)
            getattr(self, name)[l].copy_(q)
            getattr(self, f"{name}_scale")[l].copy_(scales)
        self._derive_rowwise(experts=[l])

    @torch.no_grad()
    def quantize_fp8_(self) -> "SwiGLUExperts":
        """Store the weights as FP8 with 128x128 block scales (DeepSeek-V3's checkpoint format)
        and cache their per-output-channel form for the sm90 kernel. Idempotent."""
        if self.fp8:
            return self
        self._compute_dtype = self.w13.dtype
        for name in ("w13", "w2"):
            q, scales = per_block_quant_fp8(getattr(self, name).detach())
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            self.register_buffer(f"{name}_scale", scales)
        self.fp8 = True
        self._derive_rowwise()
        return self

    @torch.no_grad()
    def _derive_rowwise(self, experts: Optional[Sequence[int]] = None) -> None:
        """Block-FP8 -> row-wise FP8, one expert at a time (bounded float32 temporaries)."""
        if not hasattr(self, "w13_rowwise"):
            for name in ("w13", "w2"):
                w = getattr(self, name)
                self.register_buffer(f"{name}_rowwise", torch.empty_like(w), persistent=False)
                self.register_buffer(f"{name}_row_scale", torch.empty(w.shape[:2], dtype=torch.float32,
                                                                      device=w.device), persistent=False)
        for name in ("w13", "w2"):
            w, block_scales = getattr(self, name), getattr(self, f"{name}_scale")
            rowwise, row_scale = getattr(self, f"{name}_rowwise"), getattr(self, f"{name}_row_scale")
            for l in range(self.num_local_experts) if experts is None else experts:
                q, s = quant_rowwise_fp8(per_block_dequant_fp8(w[l], block_scales[l], out_dtype=torch.float32))
                rowwise[l].copy_(q)
                row_scale[l].copy_(s)

    def _float_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13, w2)`` in ``dtype``; FP8 weights are dequantized (the fallback path)."""
        if self.fp8:
            return (per_block_dequant_fp8(self.w13, self.w13_scale, out_dtype=dtype),
                    per_block_dequant_fp8(self.w2, self.w2_scale, out_dtype=dtype))
        return self.w13.to(dtype), self.w2.to(dtype)

    # -------------------------------------------------------------- input handling
    def _split_input(self, x: Activations, lead: tuple, name: str):
        """-> ``(tensor or None, fp8 pair or None, output dtype)``."""
        if isinstance(x, (tuple, list)):
            pair = _check_fp8_pair(x, self.hidden_size, lead, name)
            self._check_device(pair[0], name)
            return None, pair, self.compute_dtype
        _check_tensor(x, name)
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be one of {_FLOAT_DTYPES} (or an (x_fp8, scales) tuple), got {x.dtype}")
        _check_shape(x, name, (*lead, self.hidden_size))
        self._check_device(x, name)
        return x, None, x.dtype

    def _check_device(self, t: torch.Tensor, name: str) -> None:
        if t.device != self.w13.device:
            raise ValueError(f"{name} is on {t.device} but the expert weights are on {self.w13.device}")

    def _fallback_input(self, x: Optional[torch.Tensor], pair, out_dtype: torch.dtype) -> torch.Tensor:
        """Float activations for the fallback: FP8 pairs are dequantized; with FP8 weights a float
        input is first quantized in 1x128 groups, as dispatch would have sent it."""
        if pair is None and self.fp8 and self.hidden_size % FP8_GROUP_SIZE == 0:
            pair = per_token_group_quant_fp8(x)
        if pair is not None:
            return per_token_group_dequant_fp8(pair[0], pair[1], out_dtype=out_dtype)
        return x

    def _rowwise_input(self, x: Optional[torch.Tensor], pair) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token FP8 activations for ``_scaled_grouped_mm`` (a float input is quantized per
        token directly: one rounding instead of two)."""
        if pair is None:
            return quant_rowwise_fp8(x)
        return group_to_rowwise_fp8(*pair)

    def _fp8_fast(self, device: torch.device) -> bool:
        h, i = self.hidden_size, self.intermediate_size
        return self.fp8 and h % 16 == 0 and i % 16 == 0 and _use_scaled_grouped_mm(device)

    # -------------------------------------------------------------- contiguous layout
    def forward_contiguous(self, x: Activations, num_tokens_per_expert: Counts) -> torch.Tensor:
        """Prefill layout: ``x [N, H]`` (or ``(x_fp8 [N, H], scales [N, H/128])``) with expert 0's
        rows first, then expert 1's, ...; ``num_tokens_per_expert`` (list of L ints or int tensor
        [L]) sums to at most N. Returns ``y [N, H]``; rows past the sum are 0.

        Output dtype: the input's; ``compute_dtype`` for an FP8 tuple. A device tensor of counts
        costs one host sync (the counts are validated and needed on the host)."""
        first = _first_tensor(x)
        if first.dim() != 2:
            raise ValueError(f"x must be [N, hidden_size] for the contiguous layout, got shape {tuple(first.shape)}")
        rows = first.shape[0]
        tensor, pair, out_dtype = self._split_input(x, (rows,), "x")
        counts = _host_counts(num_tokens_per_expert, self.num_local_experts, rows)
        total = sum(counts)
        device = self.w13.device
        if total == 0:
            return torch.zeros(rows, self.hidden_size, dtype=out_dtype, device=device)
        if tensor is not None:
            tensor = tensor[:total]
        if pair is not None:
            pair = (pair[0][:total], pair[1][:total])
        if self._fp8_fast(device):
            y = self._contiguous_fp8(tensor, pair, _offsets(counts, device)).to(out_dtype)
        else:
            y = self._contiguous_float(self._fallback_input(tensor, pair, out_dtype), counts)
        return F.pad(y, (0, 0, 0, rows - total)) if rows > total else y

    def _contiguous_float(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        w13, w2 = self._float_weights(x.dtype)
        if _use_grouped_mm(x.device, x.dtype) and self._aligned_for_grouped_mm(x.dtype):
            offs = _offsets(counts, x.device)
            h = torch._grouped_mm(_aligned(x), w13.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(_aligned(swiglu(h)), w2.transpose(-2, -1), offs=offs)
        return self._loop_experts(x, counts, w13, w2)

    def _aligned_for_grouped_mm(self, dtype: torch.dtype) -> bool:
        """Row strides of x, the intermediate and the weights must be multiples of 16 bytes."""
        per16 = 16 // torch.empty((), dtype=dtype).element_size()
        return self.hidden_size % per16 == 0 and self.intermediate_size % per16 == 0

    @staticmethod
    def _loop_experts(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """Reference-style fallback: one pair of matmuls per non-empty expert."""
        out = x.new_empty(x.shape[0], w2.shape[1])
        start = 0
        for l, count in enumerate(counts):
            if count:
                rows = x[start:start + count]
                out[start:start + count] = swiglu(rows @ w13[l].t()) @ w2[l].t()
            start += count
        return out

    def _contiguous_fp8(self, x: Optional[torch.Tensor], pair, offs: torch.Tensor) -> torch.Tensor:
        """sm90 FP8: per-token activations x row-wise weights, both GEMMs -> bf16 ``[M, H]``."""
        q, s = self._rowwise_input(x, pair)
        return self._fp8_gemms(q, s, offs)

    def _fp8_gemms(self, q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        h = _scaled_grouped_mm(_aligned(q), s, self.w13_rowwise.transpose(-2, -1), self.w13_row_scale, offs)
        hq, hs = swiglu_quant_fp8(h)
        return _scaled_grouped_mm(_aligned(hq), hs, self.w2_rowwise.transpose(-2, -1), self.w2_row_scale, offs)

    # -------------------------------------------------------------- masked layout
    def forward_masked(self, x: Activations, masked_count: torch.Tensor,
                       max_valid_rows: Optional[int] = None) -> torch.Tensor:
        """Decode layout: ``x [L, S, H]`` (or ``(x_fp8 [L, S, H], scales [L, S, H/128])``, scales
        may be a column-major view), expert l's first ``masked_count[l]`` rows valid. Returns
        ``[L, S, H]`` with rows ``>= masked_count[l]`` set to 0.

        No host synchronization: ``masked_count`` (int tensor [L] on x's device) is never read on
        the host. Only shapes and dtypes are validated (values too when it lives on the CPU, where
        reading it costs nothing); on a GPU counts outside [0, S] are clamped, not rejected.

        ``max_valid_rows``: an optional static bound on ``sum(masked_count)`` (e.g. tokens per
        rank * ranks * min(top_k, L)). The packed grouped-GEMM path then packs and computes that
        many rows instead of L*S. A caller that breaks the bound gets zeros for the rows past it,
        never an out-of-bounds access."""
        lead = self._masked_lead(x)
        tensor, pair, out_dtype = self._split_input(x, lead, "x")
        counts = self._check_masked_count(masked_count, lead[1])
        if max_valid_rows is not None and (isinstance(max_valid_rows, bool) or not isinstance(max_valid_rows, int)
                                           or max_valid_rows < 0):
            raise ValueError(f"max_valid_rows must be a non-negative int or None, got {max_valid_rows!r}")
        num_experts, slots = lead
        device = self.w13.device
        rows = num_experts * slots if max_valid_rows is None else min(max_valid_rows, num_experts * slots)
        if rows == 0:
            return torch.zeros(*lead, self.hidden_size, dtype=out_dtype, device=device)
        if self._fp8_fast(device):
            return self._masked_packed(tensor, pair, counts, rows, fp8=True).to(out_dtype)
        xf = self._fallback_input(tensor, pair, out_dtype)
        if _use_grouped_mm_masked(device, xf.dtype) and self._aligned_for_grouped_mm(xf.dtype):
            return self._masked_packed(xf, None, counts, rows, fp8=False)
        valid = torch.arange(slots, device=device) < counts.unsqueeze(1)
        return self._masked_bmm(xf).masked_fill_(~valid.unsqueeze(-1), 0)

    def _masked_lead(self, x: Activations) -> tuple:
        first = _first_tensor(x)
        if first.dim() != 3:
            raise ValueError(f"x must be [num_local_experts, S, hidden_size], got shape {tuple(first.shape)}")
        if first.shape[0] != self.num_local_experts:
            raise ValueError(f"x's first dimension must be num_local_experts={self.num_local_experts}, "
                             f"got shape {tuple(first.shape)}")
        return tuple(first.shape[:2])

    def _check_masked_count(self, masked_count: torch.Tensor, slots: int) -> torch.Tensor:
        _check_tensor(masked_count, "masked_count")
        if masked_count.is_floating_point() or masked_count.is_complex() or masked_count.dtype == torch.bool:
            raise ValueError(f"masked_count must be an integer tensor, got {masked_count.dtype}")
        _check_shape(masked_count, "masked_count", (self.num_local_experts,))
        if masked_count.device != self.w13.device:
            raise ValueError(f"masked_count is on {masked_count.device}, the experts on {self.w13.device}")
        if masked_count.device.type == "cpu" and masked_count.numel():
            low, high = int(masked_count.min()), int(masked_count.max())
            if low < 0 or high > slots:
                raise ValueError(f"masked_count values must be in [0, S={slots}], got min {low}, max {high}")
        return masked_count

    def _masked_bmm(self, x: torch.Tensor) -> torch.Tensor:
        """Every slot through its expert with ``bmm``; the caller zeroes the invalid ones."""
        w13, w2 = self._float_weights(x.dtype)
        return torch.bmm(swiglu(torch.bmm(x, w13.transpose(1, 2))), w2.transpose(1, 2))

    def _masked_packed(self, x: Optional[torch.Tensor], pair, counts: torch.Tensor, rows: int,
                       fp8: bool) -> torch.Tensor:
        """Valid rows packed to the front of a ``[rows + 1, H]`` matrix on the device, one grouped
        GEMM pair over ``offs = cumsum(counts)`` (the tail is never computed), then gathered back.
        The extra last row is zeroed after the GEMMs: invalid slots gather it, so the output needs
        no separate masking pass."""
        num_experts, slots = counts.shape[0], (x if x is not None else pair[0]).shape[1]
        valid, src, dest, offs = _masked_packing(counts, slots)
        take = F.pad(src[:rows], (0, 1))
        offs = offs.clamp(max=rows)
        flat = num_experts * slots
        if fp8:
            if pair is not None:
                pair = (_gather_rows(pair[0].reshape(flat, -1), take), pair[1].reshape(flat, -1).index_select(0, take))
            else:
                x = x.reshape(flat, -1).index_select(0, take)
            y = self._fp8_gemms(*self._rowwise_input(x, pair), offs)
        else:
            w13, w2 = self._float_weights(x.dtype)
            h = torch._grouped_mm(x.reshape(flat, -1).index_select(0, take), w13.transpose(-2, -1), offs=offs)
            y = torch._grouped_mm(_aligned(swiglu(h)), w2.transpose(-2, -1), offs=offs)
        y[rows:] = 0
        back = torch.where(valid.flatten() & (dest < rows), dest, rows)
        return y.index_select(0, back).view(num_experts, slots, -1)

    def forward(self, x: Activations, counts: Counts) -> torch.Tensor:
        """2-D (or 2-D FP8 pair) input: :meth:`forward_contiguous`; 3-D: :meth:`forward_masked`."""
        if _first_tensor(x).dim() == 3:
            return self.forward_masked(x, counts)
        return self.forward_contiguous(x, counts)

    def extra_repr(self) -> str:
        return (f"num_local_experts={self.num_local_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, fp8={self.fp8}")


def _rederive_rowwise_after_load(module: SwiGLUExperts, incompatible_keys) -> None:
    """Loading FP8 block weights by state_dict must refresh the row-wise cache derived from them."""
    if module.fp8:
        module._derive_rowwise()


# ------------------------------------------------------------------------------ shared experts


class SharedExperts(nn.Module):
    """DeepSeek's always-on shared experts: one dense SwiGLU MLP whose intermediate size is
    ``moe_intermediate_size * num_shared_experts``. Submodules are named as HF's DeepseekV3MLP
    (``gate_proj``, ``up_proj``, ``down_proj``) so checkpoint weights load by name."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype = torch.bfloat16,
                 device=None) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype, device=device)

    @classmethod
    def for_deepseek(cls, hidden_size: int, moe_intermediate_size: int, num_shared_experts: int,
                     **kwargs) -> "SharedExperts":
        """The shared block of a DeepSeek MoE layer from the config's own fields."""
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 1:
            raise ValueError(f"num_shared_experts must be a positive int, got {num_shared_experts!r}")
        return cls(hidden_size, moe_intermediate_size * num_shared_experts, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., H]`` -> ``down(silu(gate(x)) * up(x))``, computed in the module's dtype and
        returned in x's."""
        _check_tensor(x, "x")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x's last dimension must be hidden_size={self.hidden_size}, got shape {tuple(x.shape)}")
        if not x.is_floating_point() or x.dtype == FP8_DTYPE:
            raise ValueError(f"x must be bf16/fp16/fp32, got {x.dtype}")
        h = x.to(self.gate_proj.weight.dtype)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)).to(x.dtype)
