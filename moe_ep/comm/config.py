"""Kernel configs and buffer sizing: every size moe_ep allocates is computed here, once."""
from __future__ import annotations

from dataclasses import dataclass

from .fp8 import FP8_GROUP_SIZE
from .recv_pool import recv_pool_size_hint

# Bytes of per-row metadata the low-latency path carries beside each token: its index, the count
# and the (local expert, slot) pairs of up to 32 top-k entries (csrc/low_latency.h), as int32,
# rounded to 16 so payloads stay 16-byte aligned.
LL_MAX_TOPK = 32
LL_ROW_META_BYTES = (2 + 2 * LL_MAX_TOPK) * 4 + 8
# The low-latency kernels keep both buffers' flags in a fixed area first (csrc/low_latency.h
# kFlagsBytes; tests/test_cuda_low_latency.py checks this hint against the kernels' own sizes).
LL_FLAGS_BYTES = 16384
NUM_LOW_LATENCY_BUFFERS = 2  # double buffering: two results may be alive at once


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class Config:
    """Tuning of the normal kernels, with DeepEP's field order and meaning.

    ``num_sms``: SMs the kernel may hold (even: one sender and one receiver SM per channel).
    ``num_max_nvl_chunked_send_tokens`` / ``..._recv_tokens``: tokens moved per chunk and the ring
    size per channel inside a node. The RDMA pair applies across nodes.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.num_sms, int) or self.num_sms < 2 or self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be an even int >= 2, got {self.num_sms!r}")
        if self.num_max_nvl_chunked_send_tokens < 1 or self.num_max_nvl_chunked_recv_tokens <= self.num_max_nvl_chunked_send_tokens:
            raise ValueError(
                "Config: need 1 <= num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, got "
                f"{self.num_max_nvl_chunked_send_tokens} and {self.num_max_nvl_chunked_recv_tokens}"
            )

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_nvl_bytes`` the intranode kernels need for rows of ``hidden_bytes``."""
        # Per channel and peer: a ring of recv-chunk rows, each row carrying the payload,
        # top-k metadata and FP8 scales (the largest form), plus head/tail counters.
        row_bytes = hidden_bytes + 8 * 16 + 4 * (hidden_bytes // FP8_GROUP_SIZE + 1)
        ring = self.num_channels * num_ranks * num_ranks * self.num_max_nvl_chunked_recv_tokens * row_bytes
        counters = self.num_channels * num_ranks * num_ranks * 4 * 4 + num_ranks * num_ranks * 4 * 4
        return _align(ring + counters, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_rdma_bytes`` the internode kernels need (0 inside one node)."""
        num_nodes = max(1, num_ranks // 8)
        if num_nodes == 1:
            return 0
        row_bytes = hidden_bytes + 8 * 16 + 4 * (hidden_bytes // FP8_GROUP_SIZE + 1)
        return _align(2 * self.num_channels * num_nodes * self.num_max_rdma_chunked_recv_tokens * row_bytes, 128)


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of ``num_rdma_bytes`` a low-latency Buffer needs: two buffers (double buffering),
    each with a dispatch send area (one FP8/BF16 row per token), a receive area with a slot per
    (expert, source rank, token), and the same for combine in BF16, plus counters; and the outbox
    NVSHMEM puts stage rows in (a message and a float32 combine row per (rank, token), and 4 bytes
    per (expert, token) for index entries and weights; csrc/low_latency.h)."""
    m = num_max_dispatch_tokens_per_rank
    dispatch_row = _align(LL_ROW_META_BYTES + max(hidden * 2, hidden + 4 * (hidden // FP8_GROUP_SIZE)), 16)
    combine_row = _align(hidden * 2, 16)
    send = m * dispatch_row + num_experts * m * combine_row
    recv = num_experts * m * dispatch_row + num_experts * m * combine_row
    counters = 2 * num_experts * 8 + num_ranks * 8
    per_buffer = _align(send + recv + counters, 128) + 4 * 128  # each of 4 areas starts 128-byte aligned
    outbox = _align(num_ranks * m * (dispatch_row + 4 * hidden) + 2 * num_experts * m * 4, 128) + 4 * 128
    return NUM_LOW_LATENCY_BUFFERS * per_buffer + outbox + LL_FLAGS_BYTES


# Tuned defaults per rank count (DeepEP-compatible lookup); the CUDA backend's benchmark refines them.
_DISPATCH_CONFIGS = {
    2: Config(24, 24, 256, 6, 128), 4: Config(24, 6, 256, 6, 128), 8: Config(24, 6, 256, 6, 128),
}
_COMBINE_CONFIGS = {
    2: Config(24, 10, 256, 6, 128), 4: Config(24, 6, 256, 6, 128), 8: Config(24, 6, 256, 6, 128),
}


def default_dispatch_config(num_ranks: int, num_sms: int) -> Config:
    base = _DISPATCH_CONFIGS.get(num_ranks, Config(num_sms))
    return Config(num_sms, *list(vars(base).values())[1:])


def default_combine_config(num_ranks: int, num_sms: int) -> Config:
    base = _COMBINE_CONFIGS.get(num_ranks, Config(num_sms))
    return Config(num_sms, *list(vars(base).values())[1:])


# The intranode kernels hold whole batches (moe_ep.comm.backends.intranode): 1 GiB holds a
# DeepSeek-V3-sized prefill of 4096 tokens per rank on up to 8 ranks. Larger batches: pass
# num_nvl_bytes (intranode_size_hint gives the bytes).
AUTO_NVL_BYTES = 1 << 30


def auto_num_nvl_bytes(hidden_bytes: int, num_ranks: int) -> int:
    """``num_nvl_bytes`` for a GPU Buffer when the user leaves it to us ("auto")."""
    return max(Config().get_nvl_buffer_size_hint(hidden_bytes, num_ranks), AUTO_NVL_BYTES)


# A receive pool left to us ("auto") holds two dispatches' outputs and one combine input of this
# many tokens per rank, the batch AUTO_NVL_BYTES is sized for.
AUTO_RECV_POOL_TOKENS = 4096


def auto_recv_pool_bytes(hidden: int, num_ranks: int, num_topk: int, fp8_dispatch: bool) -> int:
    """``recv_pool_bytes`` when the user leaves it to us ("auto"): see recv_pool_size_hint."""
    return recv_pool_size_hint(AUTO_RECV_POOL_TOKENS, hidden, num_ranks, num_topk, fp8_dispatch)
