"""Intranode normal dispatch and combine on the CUDA kernels of ``csrc/intranode.cu``.

Policy lives here (allocation, the order of the steps, size checks); the kernels only move bytes.
A dispatch is ``barrier | stage | barrier | notify | host wait | pull`` and a combine
``barrier | push | barrier | reduce`` (see ``csrc/intranode.h`` for why: every rank's payload is
read or written over NVLink exactly once, with one local copy of the sender's own tokens).

Results equal :class:`~moe_ep.comm.backends.reference.ReferenceBackend` bit for bit: the same row
order (source rank, then source token) and, in combine, the same float32 summation order (ranks
ascending, then the biases).

Buffer size: a dispatch of T tokens stages every token once (its row: x, scales, top-k) plus the
send lists; a combine holds, per rank, R x S rows where S is the largest token count of any rank
(or ``num_worst_tokens``). :func:`intranode_size_hint` gives the bytes. A dispatch that does not
fit on some rank raises ``ValueError`` naming ``num_nvl_bytes`` and the bytes needed on EVERY
rank (the overflowing rank stages nothing and says so in its control block, which the notify step
reads); with ``num_worst_tokens`` (no host wait) the notify kernel prints that and traps instead.
A combine's size is the same on every rank, so all of them raise alike. A cached dispatch with a
larger payload than its original raises on the ranks that overflow only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import MoeEpTimeoutError, timeout_seconds
from ..ipc import open_intranode_buffer
from .reference import Payload, check_worst_tokens_agree


def _extension():
    from moe_ep import _C
    return _C


def intranode_size_hint(num_max_tokens: int, hidden: int, num_ranks: int, num_topk: int = 8,
                        fp8_dispatch: bool = False) -> int:
    """Bytes of ``num_nvl_bytes`` that dispatch (BF16, or FP8 with scales) and a BF16 combine of up
    to ``num_max_tokens`` tokens per rank need."""
    ext = _extension()
    x_bytes = hidden if fp8_dispatch else hidden * 2
    scale_bytes = (hidden // 128) * 4 if fp8_dispatch else 0
    dispatch = ext.intranode_dispatch_bytes(num_max_tokens, x_bytes, scale_bytes, num_topk, num_ranks)
    combine = ext.intranode_combine_bytes(num_max_tokens, hidden * 2, num_topk, num_ranks)
    return int(max(dispatch, combine))


@dataclass
class IntranodeRouting:
    """What combine and cached dispatch need to replay one kernel dispatch (handle[3])."""

    is_token_in_rank: torch.Tensor    # [T, R] bool
    rank_prefix_matrix: torch.Tensor  # [R, R] int32
    recv_src_idx: torch.Tensor        # [N or W] int32
    send_slot: torch.Tensor           # [T, R] int32: the token's index among those sent to r, or -1
    num_recv_rows: int                # rows of the outputs (N, or W in worst-token mode)
    stride_rows: int                  # combine rows per (rank, source): max tokens of any rank, or W
    num_worst_tokens: int = 0


class IntranodeEngine:
    """Dispatch/combine among the ranks of one node through a CUDA-IPC buffer.

    Building one is collective over ``group`` (any backend; ranks may share a GPU, which is how
    the tests run several ranks on one device).
    """

    def __init__(self, group, device: torch.device, num_nvl_bytes: int) -> None:
        if device.type != "cuda":
            raise ValueError(f"IntranodeEngine needs a CUDA device, got {device}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        if isinstance(num_nvl_bytes, bool) or not isinstance(num_nvl_bytes, int) or num_nvl_bytes < 0:
            raise ValueError(f"num_nvl_bytes must be a non-negative int, got {num_nvl_bytes!r}")
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_sms = 20
        self.ext = _extension()
        if self.num_ranks > int(self.ext.intranode_max_ranks):
            raise ValueError(f"intranode kernels support at most {self.ext.intranode_max_ranks} ranks, "
                             f"the group has {self.num_ranks}")
        with torch.cuda.device(device):
            self.ipc = open_intranode_buffer(group, self.num_nvl_bytes)
            self.record = self.ext.IntranodeHostRecord()
            self.peer_tokens = torch.zeros(self.num_ranks, dtype=torch.int32, device=device)
        self._epoch = 0
        self._agreed_worst_tokens: set[int] = set()
        # Set to a list to record (step, start event, end event) per step: the benchmark's breakdown.
        self.profile: Optional[list] = None
        # Small host-side agreements (num_worst_tokens) go over the group's own backend.
        nccl = "nccl" in str(dist.get_backend(group)).lower()
        self._collective_device = device if nccl else torch.device("cpu")

    # ---------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        if self.profile is None:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.profile.append((name, start, end))

    def _check_fits(self, needed: int, what: str) -> None:
        if needed > self.num_nvl_bytes:
            raise ValueError(f"num_nvl_bytes={self.num_nvl_bytes} is too small for this {what} on rank {self.rank}: "
                             f"it needs {needed} bytes (see moe_ep.comm.backends.intranode.intranode_size_hint)")

    def _wait_sizes(self, num_local_experts: int) -> tuple[int, int, list[int], int, int]:
        got = self.record.wait(self._epoch, timeout_seconds(), num_local_experts)
        if got is None:
            raise MoeEpTimeoutError(f"rank {self.rank}: dispatch waited {timeout_seconds():.0f} s for the receive sizes "
                                    "(another rank did not reach the dispatch, or failed; MOE_EP_TIMEOUT_S sets the bound)")
        return got

    # ---------------------------------------------------------------- dispatch
    def dispatch(self, x: Payload, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                 expert_alignment: int, num_worst_tokens: int, num_experts: Optional[int]):
        is_fp8 = isinstance(x, tuple)
        x_data = (x[0] if is_fp8 else x).contiguous()
        scales = x[1].contiguous() if is_fp8 else None
        num_tokens, hidden = x_data.shape
        cached = handle is not None
        R = self.num_ranks
        if cached:
            routing: IntranodeRouting = handle[3]
            topk_idx = topk_weights = None
        num_topk = 0 if topk_idx is None else topk_idx.shape[1]
        scale_bytes = 0 if scales is None else scales.shape[1] * scales.element_size()
        x_bytes = hidden * x_data.element_size()
        needed = self.ext.intranode_dispatch_bytes(num_tokens, x_bytes, scale_bytes, num_topk, R)
        overflow = 0
        if cached:
            self._check_fits(needed, "cached dispatch")  # no notify step to tell the peers: raises here only
        elif needed > self.num_nvl_bytes:
            overflow = needed  # staged as "nothing"; notify tells every rank, and every rank raises below
        if num_worst_tokens > 0 and not cached:
            check_worst_tokens_agree(self.group, self._collective_device, num_worst_tokens,
                                     self._agreed_worst_tokens)

        send_slot = send_counts = expert_counts = None
        if not cached:
            csum = is_token_in_rank.to(torch.int32).cumsum(0, dtype=torch.int32)
            send_slot = torch.where(is_token_in_rank, csum - 1, -1).to(torch.int32)
            send_counts = (csum[-1] if num_tokens > 0 else torch.zeros(R, dtype=torch.int32, device=self.device))
            send_counts = send_counts.contiguous()
            expert_counts = num_tokens_per_expert.to(torch.int32).contiguous()
            topk_idx = None if topk_idx is None else topk_idx.to(torch.int64).contiguous()
            topk_weights = None if topk_weights is None else topk_weights.to(torch.float32).contiguous()

        sms = int(self.num_sms)
        with self._step("barrier"):
            self.ipc.barrier()  # every rank is done reading our region (previous step)
        with self._step("stage"):
            self.ext.intranode_stage(self.ipc, x_data, scales, topk_idx, topk_weights, send_slot, send_counts,
                                     expert_counts, overflow, sms)
        with self._step("barrier"):
            self.ipc.barrier()  # every rank's rows, lists and counts are in place

        counts_list: list[int] = []
        if cached:
            rank_prefix_matrix, recv_src_idx = routing.rank_prefix_matrix, routing.recv_src_idx
            num_rows, stride_rows = routing.num_recv_rows, routing.stride_rows
        else:
            num_local = num_experts // R
            rank_prefix_matrix = torch.empty((R, R), dtype=torch.int32, device=self.device)
            self._epoch += 1
            with self._step("notify + host wait"):
                self.ext.intranode_notify(self.ipc, self.record, num_experts, expert_alignment, num_worst_tokens,
                                          rank_prefix_matrix, self.peer_tokens, self._epoch)
                if num_worst_tokens > 0:
                    num_rows = stride_rows = num_worst_tokens
                else:
                    num_rows, stride_rows, counts_list, overflow_bytes, overflow_rank = self._wait_sizes(num_local)
                    counts_list = list(counts_list)
                    if overflow_bytes > 0:
                        raise ValueError(f"num_nvl_bytes={self.num_nvl_bytes} is too small for this dispatch: rank "
                                         f"{overflow_rank} needs {overflow_bytes} bytes (every rank raises this; see "
                                         "moe_ep.comm.backends.intranode.intranode_size_hint)")
            recv_src_idx = torch.empty(num_rows, dtype=torch.int32, device=self.device)

        recv_x = torch.empty((num_rows, hidden), dtype=x_data.dtype, device=self.device)
        recv_scales = None if scales is None else torch.empty((num_rows, scales.shape[1]), dtype=scales.dtype,
                                                              device=self.device)
        recv_topk_idx = recv_topk_weights = None
        if num_topk:
            recv_topk_idx = torch.empty((num_rows, num_topk), dtype=torch.int64, device=self.device)
            recv_topk_weights = torch.empty((num_rows, num_topk), dtype=torch.float32, device=self.device)
        num_local = (num_experts // R) if num_experts else 0
        with self._step("pull"):
            self.ext.intranode_pull(self.ipc, scale_bytes, num_topk, rank_prefix_matrix, self.peer_tokens, cached,
                                    recv_src_idx, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, num_local,
                                    sms)
        out_x = (recv_x, recv_scales) if is_fp8 else recv_x
        if cached:
            return out_x, None, None, None, None
        routing = IntranodeRouting(is_token_in_rank, rank_prefix_matrix, recv_src_idx, send_slot, num_rows,
                                   max(int(stride_rows), 1), num_worst_tokens)
        handle = (rank_prefix_matrix, is_token_in_rank, recv_src_idx, routing)
        return out_x, recv_topk_idx, recv_topk_weights, counts_list, handle

    # ---------------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, handle, topk_weights: Optional[torch.Tensor], biases: list):
        routing: IntranodeRouting = handle[3]
        x = x.contiguous()
        hidden = x.shape[1]
        num_tokens = routing.is_token_in_rank.shape[0]
        num_topk = 0 if topk_weights is None else topk_weights.shape[1]
        if topk_weights is not None:
            topk_weights = topk_weights.to(torch.float32).contiguous()
        needed = self.ext.intranode_combine_bytes(routing.stride_rows, hidden * x.element_size(), num_topk,
                                                  self.num_ranks)
        self._check_fits(needed, "combine")
        biases = [b.contiguous() for b in biases]
        sms = int(self.num_sms)
        with self._step("barrier"):
            self.ipc.barrier()  # every rank is done reading its region (previous step)
        with self._step("push"):
            self.ext.intranode_push(self.ipc, routing.rank_prefix_matrix, x, topk_weights, routing.stride_rows, sms)
        with self._step("barrier"):
            self.ipc.barrier()  # every row is back at its source
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=self.device)
        out_weights = None
        if num_topk:
            out_weights = torch.empty((num_tokens, num_topk), dtype=torch.float32, device=self.device)
        with self._step("reduce"):
            self.ext.intranode_reduce(self.ipc, routing.is_token_in_rank.contiguous(), routing.send_slot,
                                      routing.stride_rows, num_topk, biases[0] if biases else None,
                                      biases[1] if len(biases) > 1 else None, out, out_weights, sms)
        return out, out_weights
