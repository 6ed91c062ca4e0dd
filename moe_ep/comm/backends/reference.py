"""The reference backend: dispatch and combine on plain torch.distributed collectives.

It is the specification the CUDA kernels must reproduce, and it runs wherever torch.distributed
does (gloo on CPUs, NCCL on GPUs). Design:

* Each call packs every row it sends (payload, FP8 scales, top-k metadata, source index) into one
  ``uint8`` matrix, so a dispatch or combine is one ``all_to_all_single`` plus one small
  ``all_gather`` of counts. No Python loop runs over tokens; loops run over ranks only.
* Normal mode sizes its receive from counts (one host read of them, as DeepEP's host wait does).
  ``num_worst_tokens`` mode and the low-latency mode exchange fixed-size blocks instead, so they
  never read device values on the host and can be captured in a CUDA graph over NCCL.
* Combine sums a token's rows in float32 in source-rank order, then adds the biases, then casts:
  one fixed order, so results are reproducible bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..config import NUM_LOW_LATENCY_BUFFERS
from ..fp8 import FP8_DTYPE, FP8_GROUP_SIZE, pack_ue8m0, per_token_group_quant_fp8

Payload = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Row packing: several per-row tensors <-> one uint8 matrix
# --------------------------------------------------------------------------------------------
def _as_bytes(t: torch.Tensor, num_rows: int) -> torch.Tensor:
    row_bytes = t.element_size() * math.prod(t.shape[1:])  # explicit: num_rows may be 0
    if t.numel() == 0:  # empty tensors may carry strides that .view(uint8) rejects
        return torch.empty((num_rows, row_bytes), dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8).reshape(num_rows, row_bytes)


def pack_rows(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int, torch.dtype, tuple[int, ...]]]]:
    """Concatenate per-row tensors ``[n, ...]`` byte-wise into ``[n, row_bytes]`` uint8.

    Returns the matrix and the layout (byte offset, byte width, dtype, trailing shape) of each part.
    """
    num_rows = parts[0].shape[0]
    layout, columns, offset = [], [], 0
    for part in parts:
        as_bytes = _as_bytes(part, num_rows)
        layout.append((offset, as_bytes.shape[1], part.dtype, tuple(part.shape[1:])))
        columns.append(as_bytes)
        offset += as_bytes.shape[1]
    return torch.cat(columns, dim=1), layout


def unpack_rows(rows: torch.Tensor, layout) -> list[torch.Tensor]:
    """Inverse of :func:`pack_rows` for any number of rows with the same layout."""
    out = []
    for offset, width, dtype, shape in layout:
        # A fresh, packed tensor: offset 0 and row stride == width, so any dtype view is aligned.
        column = torch.empty((rows.shape[0], width), dtype=torch.uint8, device=rows.device)
        column.copy_(rows[:, offset:offset + width])
        out.append(column.view(dtype).reshape(rows.shape[0], *shape))
    return out


def _all_gather(values: torch.Tensor, group, num_ranks: int) -> torch.Tensor:
    """All-gather a 1-D tensor into ``[num_ranks, len]`` (fixed size: no host sync)."""
    out = torch.empty((num_ranks * values.numel(),), dtype=values.dtype, device=values.device)
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(out, values.contiguous(), group=group)
    return out.view(num_ranks, -1)


def check_worst_tokens_agree(group, device: torch.device, num_worst_tokens: int, agreed: set) -> None:
    """``num_worst_tokens`` sizes what every pair of ranks exchanges, so all ranks must pass the
    same value (DeepEP's callers pass one global bound too). A mismatch would wedge the exchange;
    instead each new value is compared once across ranks (one host read, then cached in
    ``agreed``, so later calls and CUDA-graph captures of an already-seen value cost nothing)."""
    num_ranks = dist.get_world_size(group)
    if num_worst_tokens in agreed or num_ranks == 1:
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"num_worst_tokens={num_worst_tokens} is first used inside a CUDA graph capture; "
                         "run the call once eagerly first (its value is checked across ranks once)")
    values = _all_gather(torch.tensor([num_worst_tokens], dtype=torch.int64, device=device), group,
                         num_ranks).flatten().tolist()
    if len(set(values)) != 1:
        raise ValueError(f"num_worst_tokens must be the same on every rank, got {values} (rank order)")
    agreed.add(num_worst_tokens)


def check_ranks_agree(group, device: torch.device, call: str, sizes: dict, host: bool = False) -> int:
    """Sizes every rank of ``call`` must share (they fix the rows the ranks exchange: a rank with
    another hidden size would make gloo abort the process, or land rows as garbage), compared with
    one small all-gather. CPU groups raise ValueError on every rank, naming each rank's value; GPU
    groups fail a device check naming the sizes (no host sync: CUDA graphs keep working), or with
    ``host`` (where a sync costs nothing, e.g. building a Buffer) raise as CPU groups do. Returns
    the ns the host waited for the other ranks (CPU), a wait for the sources like the exchange's."""
    num_ranks = dist.get_world_size(group)
    if num_ranks == 1:
        return 0
    names = list(sizes)
    mine = torch.tensor([int(sizes[name]) for name in names], dtype=torch.int64, device=device)
    start = time.perf_counter_ns()
    every = _all_gather(mine, group, num_ranks)
    if device.type == "cuda" and not host:
        torch._assert_async((every == mine).all(), f"moe_ep {call}: the ranks passed different "
                            f"{', '.join(names)} (every rank must pass the same)")
        return 0
    waited = time.perf_counter_ns() - start
    error = disagreement_error(call, names, every.tolist())
    if error is not None:
        raise error
    return waited


def disagreement_error(call: str, names: list, rows: list) -> Optional[ValueError]:
    """The ValueError every rank raises when the ranks passed ``call`` other sizes (``rows[r]``: rank
    r's values, in the order of ``names``), naming each size that differs with every rank's value;
    None when they all agree."""
    differ = [i for i, name in enumerate(names) if len({row[i] for row in rows}) > 1]
    if not differ:
        return None
    return ValueError(f"{call}: every rank must pass the same {', '.join(names)}; "
                      + "; ".join(f"{names[i]} by rank: {[row[i] for row in rows]}" for i in differ))


def _round_up(values: torch.Tensor, alignment: int) -> torch.Tensor:
    return (values + alignment - 1) // alignment * alignment


# --------------------------------------------------------------------------------------------
# Normal-mode routing state (what the handle carries)
# --------------------------------------------------------------------------------------------
@dataclass
class NormalRouting:
    """Everything combine and cached dispatch need to replay one dispatch's routing."""

    is_token_in_rank: torch.Tensor          # [T, R] bool
    rank_prefix_matrix: torch.Tensor        # [R, R] int32
    recv_src_idx: torch.Tensor              # [N or W] int32, the row's token index on its source
    num_worst_tokens: int = 0
    # counted mode (num_worst_tokens == 0)
    send_token_idx: Optional[torch.Tensor] = None   # [S] int64: sent tokens, by dest rank then index
    send_counts: list[int] = field(default_factory=list)
    recv_counts: list[int] = field(default_factory=list)
    # fixed-block mode (num_worst_tokens > 0)
    send_slot: Optional[torch.Tensor] = None        # [T, R] int64: token's row in dest's block
    recv_block_to_row: Optional[torch.Tensor] = None  # [R * W] int64: output row or W (none)
    tokens_per_expert_matrix: Optional[torch.Tensor] = None  # [R, E]: each source's expert counts

    @property
    def num_recv_rows(self) -> int:
        return self.recv_src_idx.shape[0]


class ReferenceBackend:
    """Implements every Buffer operation with torch.distributed collectives (see module doc)."""

    name = "reference"
    # SMs a normal call may hold (the Buffer sets it per call from its Config); collectives ignore it.
    num_sms: int = 20

    def __init__(self, group, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.low_latency = LowLatencyState(self)
        self._agreed_worst_tokens: set[int] = set()

    def _check_worst_tokens_agree(self, num_worst_tokens: int) -> None:
        check_worst_tokens_agree(self.group, self.device, num_worst_tokens, self._agreed_worst_tokens)

    # ---------------------------------------------------------------- layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        num_tokens = topk_idx.shape[0]
        experts_per_rank = num_experts // self.num_ranks
        valid = topk_idx >= 0
        expert = torch.where(valid, topk_idx, 0)
        num_tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device)
        num_tokens_per_expert.index_add_(0, expert.flatten(), valid.flatten().to(torch.int64))
        dest = expert // experts_per_rank
        hits = torch.zeros((num_tokens, self.num_ranks), dtype=torch.int32, device=topk_idx.device)
        hits.scatter_add_(1, dest, valid.to(torch.int32))
        is_token_in_rank = hits > 0
        num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
        return num_tokens_per_rank, None, num_tokens_per_expert.to(torch.int32), is_token_in_rank

    # ---------------------------------------------------------------- dispatch
    def dispatch(self, x: Payload, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                 expert_alignment: int, num_worst_tokens: int, num_experts: Optional[int]):
        is_fp8 = isinstance(x, tuple)
        x_parts = list(x) if is_fp8 else [x]
        num_tokens = x_parts[0].shape[0]
        cached = handle is not None
        if not cached:  # each new value once, on the host, 0 included: raises where a device check would assert
            self._check_worst_tokens_agree(num_worst_tokens)
        check_ranks_agree(self.group, self.device, "dispatch",
                          {"hidden": x_parts[0].shape[1], "FP8 (x as a tuple)": is_fp8,
                           "top-k columns (0: no topk_idx)": 0 if cached or topk_idx is None else topk_idx.shape[1],
                           "num_experts (num_tokens_per_expert's length)":
                               0 if cached or num_tokens_per_expert is None else num_tokens_per_expert.numel(),
                           "num_worst_tokens": 0 if cached else num_worst_tokens})
        if cached:
            routing: NormalRouting = handle[3]
        else:
            routing = self._plan_dispatch(is_token_in_rank, num_tokens_per_expert, num_worst_tokens)
        src_idx = torch.arange(num_tokens, dtype=torch.int32, device=self.device)
        parts = x_parts + [src_idx]
        if not cached and topk_idx is not None:
            parts += [topk_idx.to(torch.int64), topk_weights.to(torch.float32)]
        rows, layout = pack_rows(parts)
        recv_rows = self._exchange_dispatch(rows, routing)
        received = unpack_rows(recv_rows, layout)
        num_x = len(x_parts)
        recv_x = (received[0], received[1]) if is_fp8 else received[0]
        if cached:
            return recv_x, None, None, None, None
        routing.recv_src_idx = received[num_x]
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx, recv_topk_weights = self._localize_topk(received[num_x + 1], received[num_x + 2],
                                                                   routing, num_experts)
        counts_list = self._num_recv_tokens_per_expert(routing, expert_alignment)
        handle = (routing.rank_prefix_matrix, routing.is_token_in_rank, routing.recv_src_idx, routing)
        return recv_x, recv_topk_idx, recv_topk_weights, counts_list, handle

    def _plan_dispatch(self, is_token_in_rank, num_tokens_per_expert, num_worst_tokens: int) -> NormalRouting:
        send_counts = is_token_in_rank.sum(0, dtype=torch.int64)
        gathered = _all_gather(torch.cat([send_counts, num_tokens_per_expert.to(torch.int64)]), self.group,
                               self.num_ranks)
        counts_matrix = gathered[:, :self.num_ranks]           # [src, dst]
        rank_prefix_matrix = counts_matrix.cumsum(0).to(torch.int32)
        routing = NormalRouting(is_token_in_rank, rank_prefix_matrix,
                                recv_src_idx=torch.empty(0, dtype=torch.int32, device=self.device),
                                num_worst_tokens=num_worst_tokens)
        routing.tokens_per_expert_matrix = gathered[:, self.num_ranks:]  # [src, E]
        if num_worst_tokens == 0:
            # One host read of the counts sizes the receive (DeepEP's host wait on a mapped counter).
            dest, token = is_token_in_rank.t().nonzero(as_tuple=True)
            routing.send_token_idx = token
            routing.send_counts = send_counts.tolist()
            routing.recv_counts = counts_matrix[:, self.rank].tolist()
        else:
            # Fixed blocks of W rows per (source, destination): no host sync anywhere.
            slots = is_token_in_rank.to(torch.int64).cumsum(0) - 1
            routing.send_slot = torch.where(is_token_in_rank, slots, num_worst_tokens)
        return routing

    def _exchange_dispatch(self, rows: torch.Tensor, routing: NormalRouting) -> torch.Tensor:
        row_bytes = rows.shape[1]
        if routing.num_worst_tokens == 0:
            send = rows.index_select(0, routing.send_token_idx)
            recv = torch.empty((sum(routing.recv_counts), row_bytes), dtype=torch.uint8, device=self.device)
            dist.all_to_all_single(recv, send, routing.recv_counts, routing.send_counts, group=self.group)
            return recv
        w = routing.num_worst_tokens
        # Each row carries a leading "present" byte so the receiver can tell rows from padding.
        tagged = torch.cat([torch.ones((rows.shape[0], 1), dtype=torch.uint8, device=self.device), rows], dim=1)
        send = torch.zeros((self.num_ranks * w + 1, row_bytes + 1), dtype=torch.uint8, device=self.device)
        dest = torch.arange(self.num_ranks, device=self.device).expand_as(routing.send_slot)
        flat = torch.where(routing.send_slot < w, dest * w + routing.send_slot, self.num_ranks * w)
        token = torch.arange(rows.shape[0], device=self.device).unsqueeze(1).expand_as(flat)
        send.index_copy_(0, flat.flatten(), tagged.index_select(0, token.flatten()))
        recv = torch.empty((self.num_ranks * w, row_bytes + 1), dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(recv, send[:-1], group=self.group)
        if routing.recv_block_to_row is None:
            present = recv[:, 0] == 1
            order = present.to(torch.int64).cumsum(0) - 1
            total = present.sum()
            if self.device.type == "cpu":
                if int(total) > w:
                    raise ValueError(f"num_worst_tokens={w} is smaller than the {int(total)} tokens rank "
                                     f"{self.rank} receives; raise num_worst_tokens")
            else:
                torch._assert_async(total <= w, "moe_ep dispatch: num_worst_tokens is smaller than the tokens received")
            routing.recv_block_to_row = torch.where(present, order, w)
        out = torch.zeros((w + 1, row_bytes), dtype=torch.uint8, device=self.device)
        out.index_copy_(0, routing.recv_block_to_row, recv[:, 1:])
        return out[:w]

    def _localize_topk(self, topk_idx, topk_weights, routing: NormalRouting, num_experts: int):
        experts_per_rank = num_experts // self.num_ranks
        first = self.rank * experts_per_rank
        local = topk_idx - first
        is_local = (topk_idx >= first) & (topk_idx < first + experts_per_rank)
        if routing.num_worst_tokens > 0:
            is_padding = self._padding_rows(routing)
            is_local &= ~is_padding.unsqueeze(1)
        recv_topk_idx = torch.where(is_local, local, -1)
        recv_topk_weights = torch.where(is_local, topk_weights, 0.0)
        return recv_topk_idx, recv_topk_weights

    def _padding_rows(self, routing: NormalRouting) -> torch.Tensor:
        w = routing.num_worst_tokens
        filled = torch.zeros(w + 1, dtype=torch.bool, device=self.device)
        filled[routing.recv_block_to_row] = True
        return ~filled[:w]

    def _num_recv_tokens_per_expert(self, routing: NormalRouting, expert_alignment: int) -> list[int]:
        if routing.num_worst_tokens > 0:
            return []  # sizes are fixed; reading counts would need a host sync
        matrix = routing.tokens_per_expert_matrix
        experts_per_rank = matrix.shape[1] // self.num_ranks
        mine = matrix[:, self.rank * experts_per_rank:(self.rank + 1) * experts_per_rank].sum(0)
        return _round_up(mine, expert_alignment).tolist()

    # ---------------------------------------------------------------- combine
    def empty_combine_input(self, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        """A tensor for combine's x; this backend shares no memory, so a plain one."""
        return torch.empty((num_rows, hidden), dtype=dtype, device=self.device)

    def combine(self, x: torch.Tensor, handle, topk_weights: Optional[torch.Tensor], biases: list[torch.Tensor]):
        routing: NormalRouting = handle[3]
        num_tokens = routing.is_token_in_rank.shape[0]
        check_ranks_agree(self.group, self.device, "combine",
                          {"hidden": x.shape[1], "top-k weight columns (0: no topk_weights)":
                           0 if topk_weights is None else topk_weights.shape[1]})
        parts = [x] + ([topk_weights.to(torch.float32)] if topk_weights is not None else [])
        rows, layout = pack_rows(parts)
        per_rank = self._exchange_combine(rows, routing)          # list over source ranks of [T, bytes]
        acc_x = torch.zeros((num_tokens, x.shape[1]), dtype=torch.float32, device=self.device)
        acc_w = None
        if topk_weights is not None:
            acc_w = torch.zeros((num_tokens, topk_weights.shape[1]), dtype=torch.float32, device=self.device)
        for token_idx, rank_rows in per_rank:                    # source-rank order: fixed summation
            values = unpack_rows(rank_rows, layout)
            acc_x.index_add_(0, token_idx, values[0].float())
            if acc_w is not None:
                acc_w.index_add_(0, token_idx, values[1])
        for bias in biases:
            acc_x += bias.float()
        return acc_x.to(x.dtype), acc_w

    def _exchange_combine(self, rows: torch.Tensor, routing: NormalRouting):
        row_bytes = rows.shape[1]
        if routing.num_worst_tokens == 0:
            back = torch.empty((sum(routing.send_counts), row_bytes), dtype=torch.uint8, device=self.device)
            dist.all_to_all_single(back, rows[:routing.num_recv_rows], routing.send_counts, routing.recv_counts,
                                   group=self.group)
            pieces, start = [], 0
            token_chunks = routing.send_token_idx.split(routing.send_counts)
            for dest, count in enumerate(routing.send_counts):
                pieces.append((token_chunks[dest], back[start:start + count]))
                start += count
            return pieces
        w = routing.num_worst_tokens
        padded = torch.cat([rows[:w], torch.zeros((1, row_bytes), dtype=torch.uint8, device=self.device)])
        send = padded.index_select(0, routing.recv_block_to_row)      # [R * W, bytes], block order
        back = torch.empty_like(send)
        dist.all_to_all_single(back, send, group=self.group)
        back = back.view(self.num_ranks, w, row_bytes)
        pieces = []
        for dest in range(self.num_ranks):
            slot = routing.send_slot[:, dest]
            sent = slot < w
            rows_back = back[dest].index_select(0, slot.clamp(max=w - 1)) * sent.unsqueeze(1).to(torch.uint8)
            token_idx = torch.arange(slot.shape[0], device=self.device)
            # Rows for tokens never sent to `dest` are all-zero bytes: +0.0 leaves sums unchanged.
            pieces.append((token_idx, rows_back))
        return pieces


# --------------------------------------------------------------------------------------------
# Low-latency mode
# --------------------------------------------------------------------------------------------
@dataclass
class _LowLatencyResult:
    """One of the two persistent receive buffers (double buffering)."""

    data: torch.Tensor          # [L * R * M + 1, H or H bytes] (last row: discard slot)
    scales: Optional[torch.Tensor]  # flat column-major storage + a discard tail
    recv_count: torch.Tensor    # [L] int32
    src_info: torch.Tensor      # [L, R * M] int32
    layout_range: torch.Tensor  # [L, R] int64


class LowLatencyState:
    """Fixed-shape, sync-free dispatch/combine for decode, with two result buffers."""

    # Wait-time statistics (``*_wait_recv_cost_stats``) are host time around the receive's
    # collective: CPU groups only (on GPUs it would need a synchronization).
    WAIT_STATS_ON_GPU = False

    def __init__(self, backend: ReferenceBackend) -> None:
        self.backend = backend
        self.key = None
        self.results: list[_LowLatencyResult] = []
        self.combine_inputs: list[torch.Tensor] = []
        self.buffer_idx = 0
        self.mask = torch.zeros(backend.num_ranks, dtype=torch.int32, device=backend.device)

    # -------------------------------------------------------- buffers
    def _ensure(self, m: int, hidden: int, num_experts: int, use_fp8: bool, use_ue8m0: bool) -> None:
        key = (m, hidden, num_experts, use_fp8, use_ue8m0)
        if self.key == key:
            return
        b = self.backend
        num_local = num_experts // b.num_ranks
        slots = b.num_ranks * m
        dev = b.device
        self.results, self.combine_inputs = [], []
        for _ in range(NUM_LOW_LATENCY_BUFFERS):
            if use_fp8:
                data = torch.zeros((num_local * slots + 1, hidden), dtype=torch.uint8, device=dev)
                groups = hidden // FP8_GROUP_SIZE // (4 if use_ue8m0 else 1)
                scale_dtype = torch.int32 if use_ue8m0 else torch.float32
                scales = torch.zeros(num_local * groups * slots + groups, dtype=scale_dtype, device=dev)
            else:
                data = torch.zeros((num_local * slots + 1, hidden), dtype=torch.bfloat16, device=dev)
                scales = None
            self.results.append(_LowLatencyResult(
                data, scales,
                recv_count=torch.zeros(num_local, dtype=torch.int32, device=dev),
                src_info=torch.full((num_local, slots), -1, dtype=torch.int32, device=dev),
                layout_range=torch.zeros((num_local, b.num_ranks), dtype=torch.int64, device=dev)))
            self.combine_inputs.append(torch.zeros((num_local, slots, hidden), dtype=torch.bfloat16, device=dev))
        self.key = key

    def clean(self) -> None:
        for result in self.results:
            result.data.zero_()
            if result.scales is not None:
                result.scales.zero_()
            result.recv_count.zero_()
            result.src_info.fill_(-1)
            result.layout_range.zero_()
        for buf in self.combine_inputs:
            buf.zero_()

    def next_combine_buffer(self, handle) -> torch.Tensor:
        _, _, m, hidden, num_experts = handle[:5]
        if self.key is None or self.key[:3] != (m, hidden, num_experts):
            raise ValueError("handle: it does not come from this Buffer's current low-latency layout "
                             f"(handle has M={m}, hidden={hidden}, num_experts={num_experts})")
        return self.combine_inputs[self.buffer_idx]

    def _flip(self) -> int:
        idx = self.buffer_idx
        self.buffer_idx ^= 1
        return idx

    # -------------------------------------------------------- routing helpers
    def _send_pairs(self, topk_idx: torch.Tensor, num_experts: int):
        """Pairs (token, k) in (t, k) order with their destination rank, local expert and row
        position inside the destination's block (positions count the source's pairs in order)."""
        b = self.backend
        experts_per_rank = num_experts // b.num_ranks
        valid = topk_idx >= 0
        dest = torch.where(valid, topk_idx, 0) // experts_per_rank
        valid &= self.mask[dest] == 0          # masked (failed) ranks get nothing
        local = torch.where(valid, topk_idx, 0) % experts_per_rank
        flat_valid, flat_dest, flat_local = valid.flatten(), dest.flatten(), local.flatten()
        onehot = (flat_dest.unsqueeze(1) == torch.arange(b.num_ranks, device=b.device)) & flat_valid.unsqueeze(1)
        position = (onehot.to(torch.int64).cumsum(0) - 1).gather(1, flat_dest.unsqueeze(1)).squeeze(1)
        return flat_valid, flat_dest, flat_local, position

    def _combine_positions(self, flat_valid, flat_dest, flat_local, experts_per_rank: int):
        """Row of each pair inside the combine reply from its destination: the destination
        returns rows grouped by local expert, each group in the source's (t, k) order."""
        b = self.backend
        key = flat_dest * experts_per_rank + flat_local
        num_keys = b.num_ranks * experts_per_rank
        onehot = (key.unsqueeze(1) == torch.arange(num_keys, device=b.device)) & flat_valid.unsqueeze(1)
        within = (onehot.to(torch.int64).cumsum(0) - 1).gather(1, key.unsqueeze(1)).squeeze(1)
        per_key = onehot.sum(0).view(b.num_ranks, experts_per_rank)
        base = (per_key.cumsum(1) - per_key).flatten()
        return base[key] + within

    # -------------------------------------------------------- dispatch
    def dispatch(self, x, topk_idx, m: int, num_experts: int, recv_stats, use_fp8: bool, round_scale: bool,
                 use_ue8m0: bool, return_recv_hook: bool, wait_stats: Optional[torch.Tensor] = None):
        b = self.backend
        num_tokens, k = topk_idx.shape
        hidden = x.shape[1]
        sizes_wait_ns = check_ranks_agree(
            b.group, b.device, "low_latency_dispatch",
            {"num_max_dispatch_tokens_per_rank": m, "hidden": hidden, "num_experts": num_experts, "top-k": k,
             "use_fp8": use_fp8, "use_ue8m0": use_ue8m0})
        experts_per_rank = num_experts // b.num_ranks
        pairs_per_dest = m * k
        self._ensure(m, hidden, num_experts, use_fp8, use_ue8m0)
        result = self.results[self._flip()]

        if use_fp8:
            x_fp8, scales = per_token_group_quant_fp8(x, round_scale=round_scale)
            if use_ue8m0:
                scales = pack_ue8m0(scales)
            token_parts = [x_fp8, scales]
        else:
            token_parts = [x]
        flat_valid, flat_dest, flat_local, position = self._send_pairs(topk_idx, num_experts)
        token = torch.arange(num_tokens * k, device=b.device) // k
        meta = torch.stack([token + 1, flat_local], dim=1).to(torch.int32)  # token+1: 0 marks empty rows
        rows, layout = pack_rows([p.index_select(0, token) for p in token_parts] + [meta])
        send = torch.zeros((b.num_ranks * pairs_per_dest + 1, rows.shape[1]), dtype=torch.uint8, device=b.device)
        flat_index = torch.where(flat_valid, flat_dest * pairs_per_dest + position, b.num_ranks * pairs_per_dest)
        send.index_copy_(0, flat_index, rows)
        recv = torch.empty((b.num_ranks * pairs_per_dest, rows.shape[1]), dtype=torch.uint8, device=b.device)
        work = dist.all_to_all_single(recv, send[:-1], group=b.group, async_op=True)
        handle = (result.src_info, result.layout_range, m, hidden, num_experts)

        def receive() -> None:
            self._wait(work, wait_stats, sizes_wait_ns)
            self._place_received(recv, layout, result, m, experts_per_rank, pairs_per_dest, use_fp8)
            if recv_stats is not None:
                recv_stats.add_(result.recv_count)

        recv_x = self._result_views(result, m, hidden, experts_per_rank, use_fp8, use_ue8m0)
        if return_recv_hook:
            return recv_x, result.recv_count, handle, receive
        receive()
        return recv_x, result.recv_count, handle, None

    def _wait(self, work, wait_stats: Optional[torch.Tensor], waited_before_ns: int = 0) -> None:
        """Waits for a receive's collective and adds the wait (ns), plus ``waited_before_ns`` (the
        dispatch's wait in its size check), to ``wait_stats`` ([R]: this rank's row), every source
        alike: one collective brings all of them."""
        start = time.perf_counter_ns()
        work.wait()
        if wait_stats is not None:
            wait_stats += time.perf_counter_ns() - start + waited_before_ns

    def _place_received(self, recv, layout, result: _LowLatencyResult, m: int, experts_per_rank: int,
                        pairs_per_dest: int, use_fp8: bool) -> None:
        b = self.backend
        slots = b.num_ranks * m
        *payload, meta = unpack_rows(recv, layout)
        token_plus_one, local = meta[:, 0].to(torch.int64), meta[:, 1].to(torch.int64)
        src = torch.arange(recv.shape[0], device=b.device) // pairs_per_dest
        valid = (token_plus_one > 0) & (self.mask[src] == 0)
        onehot = (local.unsqueeze(1) == torch.arange(experts_per_rank, device=b.device)) & valid.unsqueeze(1)
        # Slots in (source rank, source pair order): each source's rows contiguous, in rank order.
        slot = (onehot.to(torch.int64).cumsum(0) - 1).gather(1, local.unsqueeze(1)).squeeze(1)
        valid &= slot < slots
        result.recv_count.copy_(onehot.sum(0))
        per_src = onehot.view(b.num_ranks, pairs_per_dest, experts_per_rank).sum(1).t()  # [L, R]
        begin = per_src.cumsum(1) - per_src
        result.layout_range.copy_((begin << 32) | per_src)
        discard = experts_per_rank * slots
        row = torch.where(valid, local * slots + slot, discard)
        src_info = torch.full((discard + 1,), -1, dtype=torch.int32, device=b.device)
        src_info.index_copy_(0, row, (token_plus_one - 1).to(torch.int32))
        result.src_info.copy_(src_info[:discard].view(experts_per_rank, slots))
        data = payload[0].view(torch.uint8) if use_fp8 else payload[0]
        result.data.index_copy_(0, row, data)
        if use_fp8:
            scales = payload[1]
            groups = scales.shape[1]
            g = torch.arange(groups, device=b.device)
            # Column-major scales: element (l, slot, g) lives at (l * G + g) * slots + slot.
            target = (local.unsqueeze(1) * groups + g) * slots + slot.unsqueeze(1)
            target = torch.where(valid.unsqueeze(1), target, experts_per_rank * groups * slots + g)
            result.scales.index_copy_(0, target.flatten(), scales.flatten())

    def _result_views(self, result: _LowLatencyResult, m: int, hidden: int, experts_per_rank: int,
                      use_fp8: bool, use_ue8m0: bool):
        slots = self.backend.num_ranks * m
        data = result.data[:-1].view(experts_per_rank, slots, hidden)
        if not use_fp8:
            return data
        groups = hidden // FP8_GROUP_SIZE // (4 if use_ue8m0 else 1)
        scales = result.scales[:experts_per_rank * groups * slots].view(experts_per_rank, groups, slots).transpose(1, 2)
        return data.view(FP8_DTYPE), scales

    # -------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, topk_idx, topk_weights, handle, out: Optional[torch.Tensor],
                return_recv_hook: bool, wait_stats: Optional[torch.Tensor] = None):
        b = self.backend
        _, layout_range, m, hidden, num_experts = handle[:5]
        experts_per_rank = num_experts // b.num_ranks
        num_tokens, k = topk_idx.shape
        pairs_per_dest = m * k
        slots = b.num_ranks * m
        self._flip()

        # Owner side: return each received row to its source, grouped by local expert.
        begin, count = layout_range >> 32, layout_range & 0xFFFFFFFF            # [L, R]
        row_in_block = torch.arange(slots, device=b.device)
        end = begin + count
        src = (row_in_block.view(1, -1, 1) >= end.unsqueeze(1)).sum(2)         # [L, slots]
        in_use = src < b.num_ranks
        src_c = src.clamp(max=b.num_ranks - 1)
        before = (count.cumsum(0) - count)                                       # [L, R] rows of lower experts
        q = before.gather(1, src_c) + row_in_block.view(1, -1) - begin.gather(1, src_c)
        discard = b.num_ranks * pairs_per_dest
        target = torch.where(in_use, src_c * pairs_per_dest + q, discard).flatten()
        send = torch.zeros((discard + 1, hidden), dtype=torch.bfloat16, device=b.device)
        send.index_copy_(0, target, x.reshape(-1, hidden))
        back = torch.empty((discard, hidden), dtype=torch.bfloat16, device=b.device)
        work = dist.all_to_all_single(back, send[:-1], group=b.group, async_op=True)

        flat_valid, flat_dest, flat_local, _ = self._send_pairs(topk_idx, num_experts)
        reply_row = self._combine_positions(flat_valid, flat_dest, flat_local, experts_per_rank)
        result = out if out is not None else torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=b.device)

        def receive() -> None:
            self._wait(work, wait_stats)
            picked = back.index_select(0, torch.where(flat_valid, flat_dest * pairs_per_dest + reply_row, 0))
            weights = torch.where(flat_valid, topk_weights.flatten().float(), 0.0)
            weighted = picked.float().view(num_tokens, k, hidden) * weights.view(num_tokens, k, 1)
            result.copy_(weighted.sum(1).to(torch.bfloat16))

        if return_recv_hook:
            return result, receive
        receive()
        return result, None
