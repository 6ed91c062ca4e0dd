"""FP8 (float8_e4m3fn) quantization shared by the communication API and the layers.

One place defines how moe_ep quantizes, so that the dispatch path, the low-latency kernels and the
expert GEMMs agree bit for bit:

* activations: per token, per group of ``FP8_GROUP_SIZE`` (128) consecutive hidden elements, scale =
  amax / 448 (amax clamped below by ``FP8_AMAX_FLOOR``), optionally rounded *up* to a power of two
  (UE8M0, what DeepGEMM's scale format and Blackwell need);
* weights: one scale per 128×128 block, same rule.

Scales are float32 and *multiply* back: ``x ≈ x_fp8.float() * scale``.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_GROUP_SIZE = 128
FP8_BLOCK_SIZE = 128
# A group of zeros would give a zero scale and NaN on the way back; DeepEP uses the same floor.
FP8_AMAX_FLOOR = 1e-4


def _div_exact(amax: torch.Tensor, bound: float) -> torch.Tensor:
    """amax / bound, correctly rounded on every device. CUDA divides by a Python scalar as a
    multiplication by its reciprocal (1 ulp off at times), which would make these scales differ
    from the kernels' (IEEE division) and from the CPU's, and flip FP8 roundings at group edges."""
    return amax / torch.full_like(amax, bound)


def _check_groupable(x: torch.Tensor, name: str, group_size: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] % group_size != 0:
        raise ValueError(
            f"{name}: the last dimension ({x.shape[-1] if x.dim() else 'scalar'}) must be a multiple "
            f"of {group_size} for FP8 group quantization"
        )
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise TypeError(f"{name} must be bf16/fp16/fp32 to quantize, got {x.dtype}")


def round_scale_to_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next power of two (UE8M0-representable)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = FP8_GROUP_SIZE, round_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., H]`` to ``(x_fp8 [..., H] float8_e4m3fn, scales [..., H/group] float32)``."""
    _check_groupable(x, "x", group_size)
    groups = x.float().unflatten(-1, (x.shape[-1] // group_size, group_size))
    amax = groups.abs().amax(dim=-1).clamp_min(FP8_AMAX_FLOOR)
    scales = _div_exact(amax, FP8_MAX)
    if round_scale:
        scales = round_scale_to_pow2(scales)
    q = (groups / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2), scales


def per_token_group_dequant_fp8(
    x_fp8: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of :func:`per_token_group_quant_fp8` (group size inferred from the shapes)."""
    if x_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"x_fp8 must be {FP8_DTYPE}, got {x_fp8.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if scales.shape[:-1] != x_fp8.shape[:-1] or scales.shape[-1] == 0 or x_fp8.shape[-1] % scales.shape[-1]:
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match x_fp8 shape {tuple(x_fp8.shape)} "
            "(expected [..., H / group_size])"
        )
    group = x_fp8.shape[-1] // scales.shape[-1]
    out = x_fp8.float().unflatten(-1, (scales.shape[-1], group)) * scales.unsqueeze(-1)
    return out.flatten(-2).to(out_dtype)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales [..., G] into int32 [..., G/4]: 4 exponent bytes per word,
    group 4j+i in byte i (little end first), as DeepEP's ``use_ue8m0`` output."""
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if scales.shape[-1] % 4:
        raise ValueError(f"UE8M0 packing needs the number of scale groups ({scales.shape[-1]}) to be a multiple of 4 (hidden a multiple of 512)")
    exponent = (scales.contiguous().view(torch.int32) >> 23) & 0xFF
    exponent = exponent.unflatten(-1, (scales.shape[-1] // 4, 4))
    shifts = torch.arange(4, device=scales.device, dtype=torch.int32) * 8
    return _pack_words(exponent, shifts)


def _pack_words(exponent: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    # Sum in int64 then reinterpret the low 32 bits as int32 (values ≥ 2^31 become negative).
    words = (exponent.to(torch.int64) << shifts.to(torch.int64)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: int32 [..., G/4] → float32 [..., G]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    shifts = torch.arange(4, device=packed.device, dtype=torch.int32) * 8
    exponent = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return (exponent << 23).to(torch.int32).view(torch.float32).flatten(-2)


def per_block_quant_fp8(w: torch.Tensor, block: int = FP8_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights ``w [..., N, K]`` with one scale per ``block×block`` tile (DeepSeek-V3's
    format): ``(w_fp8 [..., N, K], scales [..., ceil(N/block), ceil(K/block)] float32)``."""
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dimensions, got shape {tuple(w.shape)}")
    if w.dim() > 2:
        # One matrix at a time: the float32 tiles of a whole expert bank would need 4x its size.
        flat = w.reshape(-1, *w.shape[-2:])
        pieces = [per_block_quant_fp8(matrix, block) for matrix in flat]
        q = torch.stack([p[0] for p in pieces]).view(w.shape)
        scales = torch.stack([p[1] for p in pieces])
        return q, scales.view(*w.shape[:-2], *scales.shape[-2:])
    n, k = w.shape[-2:]
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.nn.functional.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    tiles = padded.unflatten(-1, (kb, block)).unflatten(-3, (nb, block))  # [..., nb, b, kb, b]
    amax = tiles.abs().amax(dim=(-3, -1)).clamp_min(FP8_AMAX_FLOOR)  # [..., nb, kb]
    scales = _div_exact(amax, FP8_MAX)
    q = (tiles / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-2).flatten(-3, -2)[..., :n, :k]
    return q.contiguous(), scales


def per_block_dequant_fp8(w_fp8: torch.Tensor, scales: torch.Tensor, block: int = FP8_BLOCK_SIZE,
                          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`per_block_quant_fp8`."""
    n, k = w_fp8.shape[-2:]
    full = scales.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :n, :k]
    return (w_fp8.float() * full).to(out_dtype)
