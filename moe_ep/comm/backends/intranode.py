"""Intranode normal dispatch and combine on the CUDA kernels of ``csrc/intranode.cu``.

Policy lives here (allocation, the order of the steps, size checks); the kernels only move bytes.
A dispatch is ``notify | host wait | transfer`` and a combine ``barrier | combine`` (see
``csrc/intranode.h`` for why: every payload byte crosses NVLink once, and the receivers' copies
overlap the senders' stores, chunk by chunk). With a receive pool (``moe_ep/comm/recv_pool.py``)
dispatch outputs are stored into by the peers directly, and a combine input in the pool is read
by the peers in place (the one place NVLink carries loads).

Results equal :class:`~moe_ep.comm.backends.reference.ReferenceBackend` bit for bit: the same row
order (source rank, then source token) and, in combine, the same float32 summation order (ranks
ascending, then the biases).

Buffer size: a rank's buffer receives the rows its peers send it (its own rows go straight from
``x`` to the outputs), and in combine the rows of every peer, ``stride_rows`` (the largest token
count of any rank, or ``num_worst_tokens``) per peer. :func:`intranode_size_hint` gives the bytes
for a token budget. Every size check uses what every rank knows alike (the count matrix the notify
step hands to all ranks, the agreed ``num_worst_tokens``, the smallest ``num_nvl_bytes`` of the
group), so a call too big for any rank's buffer raises the same ``ValueError`` naming
``num_nvl_bytes`` on EVERY rank, before anything is written, and the engine stays usable.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import MoeEpTimeoutError, timeout_seconds
from ..ipc import adopt_in_process, open_intranode_buffer
from ..recv_pool import RECV_POOL_ENV, ReceivePool, arena_offset, combine_pull_from_env, recv_pool_bytes_from_env
from ..validation import check_positive_int, expert_id_error
from .reference import Payload, check_worst_tokens_agree, disagreement_error

# What every rank of a dispatch must pass alike, in the order of csrc/intranode.h's CallSizes (the
# notify kernel compares them; its trap message names them in this order too). The first, fifth
# and sixth are named as the reference backend names them.
DISPATCH_SIZE_NAMES = ("hidden", "FP8 (x as a tuple)", "x element bytes", "scale columns",
                       "top-k columns (0: no topk_idx)", "num_experts (num_tokens_per_expert's length)",
                       "cached (a handle given)", "num_worst_tokens")


def _extension():
    from moe_ep import _C
    return _C


def intranode_size_hint(num_max_tokens: int, hidden: int, num_ranks: int, num_topk: int = 8,
                        fp8_dispatch: bool = False) -> int:
    """Bytes of ``num_nvl_bytes`` that dispatch (BF16, or FP8 with scales) and a BF16 combine of up
    to ``num_max_tokens`` tokens per rank need, whatever the routing (a rank's buffer may receive
    every token of every peer)."""
    ext = _extension()
    x_bytes = hidden if fp8_dispatch else hidden * 2
    scale_bytes = (hidden // 128) * 4 if fp8_dispatch else 0
    dispatch = ext.intranode_dispatch_bytes((num_ranks - 1) * num_max_tokens, x_bytes, scale_bytes, num_topk)
    combine = ext.intranode_combine_bytes(num_max_tokens, hidden * 2, num_topk, num_ranks)
    return int(max(dispatch, combine))


def _check_engine_args(device: torch.device, num_nvl_bytes) -> None:
    if device.type != "cuda":
        raise ValueError(f"IntranodeEngine needs a CUDA device, got {device}")
    if isinstance(num_nvl_bytes, bool) or not isinstance(num_nvl_bytes, int) or num_nvl_bytes < 0:
        raise ValueError(f"num_nvl_bytes must be a non-negative int, got {num_nvl_bytes!r}")


def _check_pool_bytes(recv_pool_bytes: Optional[int]) -> int:
    if recv_pool_bytes is None:
        return recv_pool_bytes_from_env()
    return check_positive_int(recv_pool_bytes, "recv_pool_bytes", minimum=0)


def _region_bytes(num_nvl_bytes: int, pool_bytes: int) -> int:
    """A rank's region: the buffer's num_nvl_bytes, then (with a receive pool) the pool's arena."""
    return arena_offset(num_nvl_bytes) + pool_bytes if pool_bytes > 0 else num_nvl_bytes


def _check_num_ranks(num_ranks: int) -> None:
    limit = int(_extension().intranode_max_ranks)
    if not 1 <= num_ranks <= limit:
        raise ValueError(f"intranode kernels support 1 to {limit} ranks, the group has {num_ranks}")


@dataclass(frozen=True)
class IntranodeKnobs:
    """Tuning knobs of the transfer and combine kernels. ``chunk_rows`` (rows per flag) is part of
    the protocol, so every rank of a group must use the same (the engine checks at construction;
    whoever changes them later, as the benchmark does, changes them alike on every rank)."""

    # Defaults from the loopback benchmark (one H200, 2 ranks, 24 SMs, 2026-11-29): dispatch wants
    # more senders (each sent row is one copy, each received row one or two) than combine, whose
    # reducers read two ranks' rows per token.
    unroll: int = 8              # 16-byte vectors in flight per lane in the copies
    chunk_rows: int = 4          # rows per flag: smaller chunks start receivers sooner, each costs a fence
    send_warps: int = 6          # dispatch: of each block's 16 warps; the others receive
    combine_send_warps: int = 4  # combine: of each block's 16 warps; the others reduce
    # Combine: 0 holds its loads in registers (unroll per lane); 16/24 (16-byte packs) load with
    # cp.async into a per-warp shared-memory ring of that many vectors per lane (128/192 KB per block;
    # 16 fits every sm_80+ GPU). Loopback on one H200: +6% at 24 SMs, +12% at 32, even at 8-16. The
    # dispatch stays on registers: staged (cp.async or TMA bulk loads) it measured 25-40% slower.
    combine_staged_vectors: int = 16
    # Dispatch sender warps with a receive pool (direct receive): receivers then copy only their own
    # rows, so the senders carry (R - 1) / R of the work. 0 = by ranks: 8 for 2 (loopback, one H200:
    # at 12 SMs 8 senders gave 486 GB/s BF16 against 391 with 6 and 335 with 12), 12 for more.
    direct_send_warps: int = 0

    ALLOWED = {"unroll": (4, 8, 16), "chunk_rows": (4, 8, 16, 32, 64), "send_warps": (2, 4, 6, 8, 12),
               "combine_send_warps": (2, 4, 6, 8, 12), "combine_staged_vectors": (0, 16, 24),
               "direct_send_warps": (0, 2, 4, 6, 8, 12)}
    ENV = {"unroll": "MOE_EP_INTRANODE_UNROLL", "chunk_rows": "MOE_EP_INTRANODE_CHUNK_ROWS",
           "send_warps": "MOE_EP_INTRANODE_SEND_WARPS", "combine_send_warps": "MOE_EP_INTRANODE_COMBINE_SEND_WARPS",
           "combine_staged_vectors": "MOE_EP_INTRANODE_COMBINE_STAGED_VECTORS",
           "direct_send_warps": "MOE_EP_INTRANODE_DIRECT_SEND_WARPS"}

    def __post_init__(self) -> None:
        for name, allowed in self.ALLOWED.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
                raise ValueError(f"intranode {name} ({self.ENV[name]}) must be one of {allowed}, got {value!r}")

    @classmethod
    def from_env(cls) -> "IntranodeKnobs":
        """The defaults, overridden by the variables in ENV (MOE_EP_INTRANODE_UNROLL, ...)."""
        values = {}
        for name, var in cls.ENV.items():
            raw = os.environ.get(var, "").strip()
            if raw:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{var} must be one of {cls.ALLOWED[name]}, got {raw!r}") from None
        return cls(**values)

    def astuple(self) -> tuple[int, int, int, int, int, int]:
        """(unroll, chunk_rows, send_warps, combine_send_warps, combine_staged_vectors, direct_send_warps)
        as set (0: by ranks), what the ranks compare."""
        return (self.unroll, self.chunk_rows, self.send_warps, self.combine_send_warps, self.combine_staged_vectors,
                self.direct_send_warps)

    def launch_tuple(self, num_ranks: int) -> tuple[int, int, int, int, int, int]:
        """astuple() with direct_send_warps resolved for ``num_ranks``: the launchers' tuple."""
        direct = self.direct_send_warps or (8 if num_ranks <= 2 else 12)
        return self.astuple()[:5] + (direct,)


@dataclass
class IntranodeRouting:
    """What combine and cached dispatch need to replay one kernel dispatch (handle[3])."""

    is_token_in_rank: torch.Tensor    # [T, R] bool
    rank_prefix_matrix: torch.Tensor  # [R, R] int32
    recv_src_idx: torch.Tensor        # [N or W] int32
    send_slot: torch.Tensor           # [T, R] int32: the token's index among those sent to r, or -1
    send_lists: torch.Tensor          # [R, T] int32: the tokens sent to r, in order
    num_recv_rows: int                # rows of the outputs (N, or W in worst-token mode)
    stride_rows: int                  # rows per (rank, source): max tokens of any rank, or W
    max_buffer_rows: int              # the most rows any rank's buffer receives (a bound: W)
    num_worst_tokens: int = 0


class IntranodeEngine:
    """Dispatch/combine among the ranks of one node through a CUDA-IPC buffer.

    Building one is collective over ``group`` (any backend; ranks may share a GPU, which is how
    the tests run several ranks on one device).
    """

    def __init__(self, group, device: torch.device, num_nvl_bytes: int, recv_pool_bytes: Optional[int] = None) -> None:
        _check_engine_args(device, num_nvl_bytes)
        pool_bytes = _check_pool_bytes(recv_pool_bytes)
        rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
        _check_num_ranks(num_ranks)
        with torch.cuda.device(device):
            ipc = open_intranode_buffer(group, _region_bytes(int(num_nvl_bytes), pool_bytes))
        # Peers store into this rank's buffer, so sizes are checked against the smallest buffer of
        # the group, which every rank knows alike (open_intranode_buffer succeeded on every rank);
        # the knobs (one of them is part of the protocol) must agree, and so must the receive pool's
        # being on (it changes the senders' protocol), not its size.
        knobs = IntranodeKnobs.from_env()
        gathered: list = [None] * num_ranks
        dist.all_gather_object(gathered, (int(num_nvl_bytes), knobs.astuple(), pool_bytes > 0), group=group)
        if len({tuple(k) for _, k, _ in gathered}) > 1:
            raise ValueError("the ranks of the group set different intranode knobs (unroll, chunk_rows, send_warps, "
                             "combine_send_warps, combine_staged_vectors, direct_send_warps): "
                             f"{[tuple(k) for _, k, _ in gathered]}; set "
                             f"{', '.join(IntranodeKnobs.ENV.values())} alike on every rank")
        if len({on for _, _, on in gathered}) > 1:
            raise ValueError(f"some ranks of the group have a receive pool and some not ({RECV_POOL_ENV} per rank: "
                             f"{['>0' if on else '0' for _, _, on in gathered]}); enable it on every rank or none")
        # Small host-side agreements (num_worst_tokens) go over the group's own backend.
        nccl = "nccl" in str(dist.get_backend(group)).lower()
        self._setup(group, rank, num_ranks, device, int(num_nvl_bytes), ipc, min(int(n) for n, _, _ in gathered), knobs,
                    device if nccl else torch.device("cpu"), pool_bytes, ipc)

    @classmethod
    def in_process(cls, num_ranks: int, device: torch.device, num_nvl_bytes: int,
                   knobs: Optional[IntranodeKnobs] = None, recv_pool_bytes: int = 0) -> list["IntranodeEngine"]:
        """``num_ranks`` engines over buffers on ONE device, for ranks that are threads of this process
        (the loopback benchmark): unlike ranks in separate processes, which time-slice a shared GPU,
        their kernels run at once on their own streams. Each thread must drive its own engine on its
        own stream. No torch.distributed group: ``num_worst_tokens`` is not checked across ranks."""
        _check_engine_args(device, num_nvl_bytes)
        _check_num_ranks(num_ranks)
        pool_bytes = _check_pool_bytes(recv_pool_bytes)
        if knobs is not None and not isinstance(knobs, IntranodeKnobs):
            raise TypeError(f"knobs must be an IntranodeKnobs or None, got {type(knobs).__name__}")
        ipcs, regions = adopt_in_process(num_ranks, device, _region_bytes(int(num_nvl_bytes), pool_bytes))
        engines = []
        for rank, ipc in enumerate(ipcs):
            engine = cls.__new__(cls)
            engine._setup(None, rank, num_ranks, device, int(num_nvl_bytes), ipc, int(num_nvl_bytes),
                          knobs or IntranodeKnobs(), torch.device("cpu"), pool_bytes, (ipc, regions))
            engine._regions = regions  # the memory the adopted buffers point into
            engines.append(engine)
        return engines

    def _setup(self, group, rank: int, num_ranks: int, device: torch.device, num_nvl_bytes: int, ipc,
               min_nvl_bytes: int, knobs: IntranodeKnobs, collective_device: torch.device, pool_bytes: int,
               memory_owner) -> None:
        self.group, self.rank, self.num_ranks, self.device = group, rank, num_ranks, device
        self.num_nvl_bytes, self.min_nvl_bytes, self.knobs, self.ipc = num_nvl_bytes, min_nvl_bytes, knobs, ipc
        # Direct receive (moe_ep/comm/recv_pool.py): outputs in the region's tail, peers store into them.
        self.pool_offset = arena_offset(num_nvl_bytes)
        self.recv_pool: Optional[ReceivePool] = None
        self.direct_calls = 0  # dispatches whose outputs were all in the pool (peers stored into them)
        self.pull_calls = 0    # combines whose input was in the pool (peers read it in place)
        self.combine_pull = combine_pull_from_env()  # MOE_EP_COMBINE_PULL=0: push even from the pool
        if pool_bytes > 0:
            self.recv_pool = ReceivePool(int(ipc.data_ptr()) + self.pool_offset, pool_bytes, device, memory_owner)
        self.num_sms = 20
        self.ext = _extension()
        self._device_index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(device):
            self.record = self.ext.IntranodeHostRecord()
        self._epoch = 0
        self._agreed_worst_tokens: set[int] = set()
        # Set to a list to record (step, start event, end event) per step: the benchmark's breakdown.
        self.profile: Optional[list] = None
        # A diagnostic for the loopback benchmark only (its --isolate rows): receivers wait for the
        # peers' rows but do not copy them out, leaving them unwritten. Never set by a Buffer.
        self.diagnostic_skip_peer_copy = False
        self._collective_device = collective_device

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

    def _check_fits(self, needed: int, what: str, rank: Optional[int] = None) -> None:
        """Raises on every rank alike: ``needed`` is computed from what every rank knows."""
        if needed > self.min_nvl_bytes:
            where = f"rank {rank} needs" if rank is not None else "every rank needs"
            raise ValueError(f"num_nvl_bytes={self.num_nvl_bytes} is too small for this {what}: {where} {needed} bytes "
                             f"(the group's smallest buffer has {self.min_nvl_bytes}; every rank raises this; see "
                             "moe_ep.comm.backends.intranode.intranode_size_hint)")

    def _wait_sizes(self, num_local_experts: int) -> tuple[int, int, list[int], int, int, int, int]:
        """(num_recv, max_tokens, per-local-expert counts, max_buffer_rows, max_buffer_rank, smallest
        expert id, largest expert id) once this dispatch's notify published them. Ranks that passed
        other sizes: ValueError, on every rank (each notify compares every rank's), before any row moves."""
        got = self.record.wait(self._epoch, timeout_seconds(), num_local_experts, self.num_ranks)
        if got is None:
            raise MoeEpTimeoutError(f"rank {self.rank}: dispatch waited {timeout_seconds():.0f} s for the receive sizes "
                                    "(another rank did not reach the dispatch, or failed; MOE_EP_TIMEOUT_S sets the bound)")
        if got[0] == "sizes differ":
            raise disagreement_error("dispatch", list(DISPATCH_SIZE_NAMES), got[1])
        return got

    def _allocate_outputs(self, specs: list) -> tuple[list[Optional[torch.Tensor]], bool]:
        """Tensors of these specs (dispatch outputs, a combine input), from the receive pool where
        there is one (not while a CUDA graph is being captured: the capture allocates from its own
        pool); whether they all lie in its arena."""
        pool = self.recv_pool
        if pool is not None and not torch.cuda.is_current_stream_capturing():
            with pool.allocating():
                outputs = self.ext.empty_tensors(specs, self._device_index)
            return outputs, all(pool.contains(t) for t in outputs)
        # One call for all of them: after the dispatch's host wait the GPU idles until the transfer
        # is launched, and torch.empty costs a few µs of Python per tensor.
        return self.ext.empty_tensors(specs, self._device_index), False

    def empty_combine_input(self, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``[num_rows, hidden]`` tensor for combine's ``x``: from the receive pool
        where there is one (peers then read its rows in place), else from torch's default pool."""
        return self._allocate_outputs([((num_rows, hidden), dtype)])[0][0]

    def _pullable(self, x: torch.Tensor, topk_weights: Optional[torch.Tensor]) -> bool:
        """Whether peers may read this combine input in place: x (and weights) whole in the pool."""
        pool = self.recv_pool
        return (pool is not None and self.combine_pull and x.numel() > 0 and x.data_ptr() % 16 == 0 and pool.contains(x)
                and (topk_weights is None or pool.contains(topk_weights)))

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

        def needed(buffer_rows: int) -> int:
            return self.ext.intranode_dispatch_bytes(buffer_rows, x_bytes, scale_bytes, num_topk)

        if cached:
            self._check_fits(needed(routing.max_buffer_rows), "cached dispatch")
        elif self.group is not None:  # in-process engines (in_process) have no group to ask
            # Each new value once, 0 included (a rank passing 0 beside one passing W > 0 raises
            # instead of leaving the other in the all-gather); the notify compares every call's.
            check_worst_tokens_agree(self.group, self._collective_device, num_worst_tokens, self._agreed_worst_tokens)
        if not cached and num_worst_tokens > 0:
            # No host wait in this mode: the bound (every rank receives at most W rows) is checked.
            self._check_fits(needed(num_worst_tokens), f"dispatch with num_worst_tokens={num_worst_tokens}")

        sms = int(self.num_sms)
        counts_list: list[int] = []
        sizes = [hidden, int(is_fp8), x_data.element_size(), 0 if scales is None else scales.shape[1], num_topk,
                 0 if cached or num_tokens_per_expert is None else num_tokens_per_expert.numel(), int(cached),
                 0 if cached else num_worst_tokens]
        if cached:
            with self._step("notify"):  # the barrier only: every peer is done with its buffer
                self.ext.intranode_notify(self.ipc, self.record, sizes, is_token_in_rank=None, expert_counts=None,
                                          topk_idx=None, num_tokens=num_tokens, expert_alignment=1, num_worst_tokens=0,
                                          send_slot=None, send_lists=None, rank_prefix_matrix=None, epoch=0)
            rank_prefix_matrix, recv_src_idx, send_lists = (routing.rank_prefix_matrix, routing.recv_src_idx,
                                                            routing.send_lists)
            num_rows, stride_rows = routing.num_recv_rows, routing.stride_rows
        else:
            # The routing pass (each token's slot per destination, the send lists) and the expert ids'
            # range are the notify kernel's first step: no torch ops to launch before it.
            is_token_in_rank = is_token_in_rank.contiguous()
            expert_counts = num_tokens_per_expert.to(torch.int32).contiguous()
            topk_idx = None if topk_idx is None else topk_idx.to(torch.int64).contiguous()
            topk_weights = None if topk_weights is None else topk_weights.to(torch.float32).contiguous()
            send_slot, send_lists, rank_prefix_matrix = self.ext.empty_tensors(
                [((num_tokens, R), torch.int32), ((R, num_tokens), torch.int32), ((R, R), torch.int32)],
                self._device_index)
            num_local = num_experts // R
            self._epoch += 1
            with self._step("notify + host wait"):
                self.ext.intranode_notify(self.ipc, self.record, sizes, is_token_in_rank, expert_counts, topk_idx,
                                          num_tokens, expert_alignment, num_worst_tokens, send_slot, send_lists,
                                          rank_prefix_matrix, self._epoch)
                if num_worst_tokens > 0:  # no host wait: the kernel traps at an expert id out of range
                    num_rows = stride_rows = max_buffer_rows = num_worst_tokens
                else:
                    num_rows, stride_rows, counts_list, max_buffer_rows, max_rank, id_min, id_max = \
                        self._wait_sizes(num_local)
                    if topk_idx is not None and topk_idx.numel():
                        error = expert_id_error("topk_idx", id_min, id_max, num_experts)
                        if error is not None:  # this rank stops before its transfer (its peers' waits are bounded)
                            raise error
                    self._check_fits(needed(max_buffer_rows), "dispatch", max_rank)

        specs = [((num_rows, hidden), x_data.dtype),
                 None if scales is None else ((num_rows, scales.shape[1]), scales.dtype),
                 ((num_rows, num_topk), torch.int64) if num_topk else None,
                 ((num_rows, num_topk), torch.float32) if num_topk else None,
                 None if cached else ((num_rows,), torch.int32)]
        outputs, in_pool = self._allocate_outputs(specs)
        self.direct_calls += int(in_pool)
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights = outputs[:4]
        if not cached:
            recv_src_idx = outputs[4]
        num_local = (num_experts // R) if num_experts else 0
        with self._step("transfer"):
            self.ext.intranode_transfer(self.ipc, x_data, scales, topk_idx, topk_weights, send_lists,
                                        rank_prefix_matrix, max(int(stride_rows), 1), cached, recv_src_idx, recv_x,
                                        recv_scales, recv_topk_idx, recv_topk_weights, num_local,
                                        self.knobs.launch_tuple(R), sms, self.diagnostic_skip_peer_copy,
                                        self.recv_pool is not None, self.pool_offset if in_pool else -1)
        out_x = (recv_x, recv_scales) if is_fp8 else recv_x
        if cached:
            return out_x, None, None, None, None
        routing = IntranodeRouting(is_token_in_rank, rank_prefix_matrix, recv_src_idx, send_slot, send_lists, num_rows,
                                   max(int(stride_rows), 1), int(max_buffer_rows), num_worst_tokens)
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
        out, out_weights = self.ext.empty_tensors(
            [((num_tokens, hidden), x.dtype), ((num_tokens, num_topk), torch.float32) if num_topk else None],
            self._device_index)
        sms = int(self.num_sms)
        pullable = self._pullable(x, topk_weights)
        self.pull_calls += int(pullable)
        with self._step("barrier"):
            # Every rank is done with its buffer (previous step); a rank whose peer passed another
            # hidden, dtype or weight count traps here with a message naming both.
            self.ipc.barrier((hidden, x.element_size(), num_topk))
        with self._step("combine"):
            self.ext.intranode_combine(self.ipc, x, topk_weights, routing.is_token_in_rank.contiguous(),
                                       routing.send_slot, routing.rank_prefix_matrix, routing.stride_rows, num_topk,
                                       biases[0] if biases else None, biases[1] if len(biases) > 1 else None, out,
                                       out_weights, self.knobs.launch_tuple(self.num_ranks), sms,
                                       self.recv_pool is not None, self.pool_offset if pullable else -1)
        return out, out_weights
