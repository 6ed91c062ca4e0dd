"""The communication core: DeepEP-compatible MoE dispatch and combine.

``from moe_ep.comm import Buffer`` replaces ``from deep_ep import Buffer``.
"""
from .buffer import Buffer
from .config import Config
from .errors import MoeEpTimeoutError
from .event import EventOverlap
from .fp8 import (
    per_block_dequant_fp8,
    per_block_quant_fp8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
    pack_ue8m0,
    unpack_ue8m0,
)
from .recv_pool import recv_pool_size_hint

__all__ = [
    "Buffer", "Config", "EventOverlap", "MoeEpTimeoutError", "per_token_group_quant_fp8", "per_token_group_dequant_fp8",
    "per_block_quant_fp8", "per_block_dequant_fp8", "pack_ue8m0", "unpack_ue8m0", "recv_pool_size_hint",
]
