"""Low-latency (decode) dispatch and combine on the CUDA kernels of ``csrc/low_latency.cu``.

:class:`LowLatencyEngine` has the interface of the reference backend's ``LowLatencyState``
(``dispatch``, ``combine``, ``clean``, ``next_combine_buffer``, ``mask``), so ``Buffer`` drives
either the same way. Policy lives here: the two result buffers (double buffering: two dispatches
may be in flight, e.g. with receive hooks), which buffer a call uses, and the hook split.

Transport: the kernels store straight into peers' memory through a table of peer pointers, from a
CUDA-IPC buffer of ``num_rdma_bytes`` per rank (``moe_ep.comm.ipc``; the default when every rank runs
on one host) or from NVSHMEM symmetric memory (``moe_ep.comm.nvshmem``: unique-id bootstrap over
torch.distributed, peer addresses from ``nvshmem_ptr``; the default across hosts, or
``MOE_EP_LL_TRANSPORT=nvshmem``). With NVSHMEM, the ranks
``nvshmem_ptr`` cannot map (RDMA, across nodes; or every rank with ``MOE_EP_NVSHMEM_PUTS=all``) are
reached by NVSHMEM puts: the same kernels built into ``moe_ep._nvshmem`` with a put mask, which then
runs every call of this engine; the buffer then also holds an outbox (``ll_size_hint(..., puts=True)``).
Nothing is read on the host, so a decode step can be captured in a CUDA graph
(every replay reuses the buffer index chosen at capture; the kernels reset their flags after
reading them, so consecutive replays need no cleaning).

Rank masking: a masked rank is cut off both ways (it neither sends nor waits, and nobody sends to
or waits for it); its own calls return empty counts and a zero combine. The mask a dispatch used
is kept for its combine. At most two dispatches (and two combines) may be outstanding at once
across the group: a rank must not start a third before every rank completed the first.

Results equal the reference backend's: the same counts, ``layout_range``, ``src_info`` and row
placement; FP8 values and scales from the same formula (scales may differ in the last bit of a
division); the combine sums ``weight x row`` over k in float32, then casts.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..config import NUM_LOW_LATENCY_BUFFERS
from ..fp8 import FP8_DTYPE, FP8_GROUP_SIZE
from ..ipc import adopt_in_process, open_intranode_buffer


# Where the buffers live: "ipc" (CUDA-IPC buffers, any torch.distributed backend, ranks may share a
# GPU), "nvshmem" (NVSHMEM symmetric memory, one GPU per rank; moe_ep.comm.nvshmem), or "auto" (the
# default): CUDA IPC when every rank runs on this host, else NVSHMEM (IPC cannot reach other hosts;
# NVSHMEM's puts can).
TRANSPORT_ENV = "MOE_EP_LL_TRANSPORT"
TRANSPORTS = ("auto", "ipc", "nvshmem")


def choose_transport(requested: str, hosts: Sequence[str]) -> str:
    """The transport for ``requested`` (a TRANSPORTS entry) given every rank's host name."""
    if requested not in TRANSPORTS:
        raise ValueError(f"{TRANSPORT_ENV} must be one of {', '.join(TRANSPORTS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "ipc" if len(set(hosts)) <= 1 else "nvshmem"


def _group_hosts(group) -> list:
    import socket

    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return hosts
# A call without a hook runs its send and receive halves in one kernel ("1", the default) or in two
# ("0": as with a hook; for comparison). Read when the engine is built.
FUSED_ENV = "MOE_EP_LL_FUSED"


def _fused_from_env() -> bool:
    raw = os.environ.get(FUSED_ENV, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{FUSED_ENV} must be '0' or '1', got {raw!r}")
    return raw == "1"


# The combine's partial sums cross back as bfloat16 ("bfloat16", the default: half the bytes over
# the link, one more rounding per rank's partial; within the bf16 tolerance the tests hold every
# combine to) or float32 ("float32": exact up to float32 association). The default was decided by
# the rule README wrote before the figures (2 x H200, 128 tokens/rank, kernel time: float32 30.9
# µs, 30.4 under graph replay, over issue 5's 28; bfloat16 20.3 / 20.4; benchmarks/RESULTS.md). Part of the protocol, so
# every rank must set it alike (checked when the engine is built).
PARTIALS_ENV = "MOE_EP_LL_COMBINE_PARTIALS"
PARTIALS_CHOICES = ("float32", "bfloat16")


def partials_setting() -> str:
    """This process's MOE_EP_LL_COMBINE_PARTIALS as set (unset or blank: bfloat16), not yet checked."""
    return os.environ.get(PARTIALS_ENV, "").strip() or "bfloat16"


def _check_partials(raw: str) -> bool:
    if raw not in PARTIALS_CHOICES:
        raise ValueError(f"{PARTIALS_ENV} must be one of {PARTIALS_CHOICES}, got {raw!r}")
    return raw == "bfloat16"


def _agreed_bf16_partials(group) -> bool:
    """This rank's setting once every rank of ``group`` has the same (the settings are gathered
    before any is judged, so a bad or differing one raises on every rank alike)."""
    raw = partials_setting()
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, raw, group=group)
    if len(set(every)) > 1:
        raise ValueError(f"{PARTIALS_ENV} differs across the group's ranks ({every}); set it alike on every rank")
    return _check_partials(raw)


def _extension():
    from moe_ep import _C
    return _C


def _put_extension():
    """moe_ep._nvshmem, whose build of the kernels has the put path (checked, so a stale build says so)."""
    from moe_ep import _nvshmem
    if not getattr(_nvshmem, "ll_puts_compiled", False):
        raise RuntimeError("moe_ep._nvshmem has no low-latency kernels with puts: rebuild it (setup.py build_ext) "
                           "with NVSHMEM's libnvshmem_device.a present")
    return _nvshmem


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels load rows in 8- and 16-byte pieces); a view at an
    odd offset is copied."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def ll_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int,
                 num_topk: int = 8, puts: bool = False) -> int:
    """Bytes the low-latency kernels need (both buffers; with ``puts``, the outbox too);
    ``Buffer.get_low_latency_rdma_size_hint`` is never smaller than either."""
    info = _extension().ll_layout_info(num_ranks, num_experts, num_max_dispatch_tokens_per_rank, hidden, num_topk,
                                       False)
    return int(info["region_bytes_with_outbox" if puts else "region_bytes"])


def _check_engine_args(device: torch.device, num_bytes) -> None:
    if device.type != "cuda":
        raise ValueError(f"LowLatencyEngine needs a CUDA device, got {device}")
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes <= 0:
        raise ValueError(f"num_rdma_bytes must be a positive int for the low-latency kernels, got {num_bytes!r}")


@dataclass
class _Result:
    """One of the two result buffers, and what its dispatch was (for the matching combine)."""

    data: torch.Tensor             # [L, R*M, H] bf16 or uint8 (fp8 bytes)
    scales: Optional[torch.Tensor]  # flat column-major storage (fp8 only)
    recv_count: torch.Tensor       # [L] int32
    src_info: torch.Tensor         # [L, R*M] int32
    layout_range: torch.Tensor     # [L, R] int64
    counts_e: torch.Tensor         # [E] int32: this rank's rows per expert
    pair_pos: torch.Tensor         # [M*K] int32
    send_done: torch.Tensor        # [E] int32 kernel workspace: zero between dispatches
    combine_input: torch.Tensor    # [L, R*M, H] bf16 (zero-copy combine)
    mask: torch.Tensor             # [R] int32: the mask its dispatch used (the combine must use the same)
    routing: torch.Tensor          # int32 kernel workspace: which rows each (source, token) has here
    use_fp8: bool = False
    num_topk: int = 0
    num_tokens: int = 0


class LowLatencyEngine:
    """Building one is collective over ``group`` (any backend; ranks may share one GPU)."""

    # Wait-time statistics (dispatch/combine's ``wait_stats``: this rank's [R] int64 row) are timed
    # by the kernels (block 0, %globaltimer ns per source; README "Wait-time statistics"), so GPU
    # groups get them with no host sync.
    WAIT_STATS_ON_GPU = True

    def __init__(self, group, device: torch.device, num_bytes: int, num_sms: Optional[int] = None) -> None:
        _check_engine_args(device, num_bytes)
        requested = os.environ.get(TRANSPORT_ENV, "auto")
        choose_transport(requested, [])  # a bad setting raises here, before anything collective
        transport = choose_transport(requested, _group_hosts(group) if requested == "auto" else [])
        bf16_partials = _agreed_bf16_partials(group)
        put_ranks: list = []
        with torch.cuda.device(device):
            if transport == "ipc":
                ipc = open_intranode_buffer(group, num_bytes)
            else:
                from ..nvshmem import open_nvshmem_buffer, puts_from_env
                ipc, put_ranks = open_nvshmem_buffer(group, num_bytes, puts_from_env())
        self._setup(group, dist.get_rank(group), dist.get_world_size(group), device, num_bytes, num_sms, ipc,
                    transport, lambda: dist.barrier(group=group), put_ranks)
        self.bf16_partials = bf16_partials

    @classmethod
    def in_process(cls, num_ranks: int, device: torch.device, num_bytes: int,
                   num_sms: Optional[int] = None) -> list["LowLatencyEngine"]:
        """``num_ranks`` engines over buffers on ONE device for ranks that are threads of this process
        (the loopback benchmark; see ``IntranodeEngine.in_process``). Each thread drives its own
        engine on its own stream; the barrier on a size change is a ``threading.Barrier``."""
        _check_engine_args(device, num_bytes)
        bf16_partials = _check_partials(partials_setting())
        ipcs, regions = adopt_in_process(num_ranks, device, num_bytes)
        barrier = threading.Barrier(num_ranks)
        engines = []
        for rank, ipc in enumerate(ipcs):
            engine = cls.__new__(cls)
            engine._setup(None, rank, num_ranks, device, num_bytes, num_sms, ipc, "in-process", barrier.wait)
            engine.bf16_partials = bf16_partials  # one process: one environment for every rank
            engine._regions = regions  # the memory the adopted buffers point into
            engines.append(engine)
        return engines

    def _setup(self, group, rank: int, num_ranks: int, device: torch.device, num_bytes: int, num_sms: Optional[int],
               ipc, transport: str, peer_barrier: Callable[[], object], put_ranks: Sequence[int] = ()) -> None:
        self.group, self.rank, self.num_ranks, self.device = group, rank, num_ranks, device
        self.num_bytes, self.ipc, self.transport = num_bytes, ipc, transport
        self._peer_barrier = peer_barrier  # host barrier of the ranks (their sizes change together)
        self.view = ipc.ll_view()  # what the launchers need of the buffer
        # Bit r: rank r is reached by NVSHMEM puts; then moe_ep._nvshmem's build of the kernels runs.
        self.put_mask = sum(1 << r for r in sorted(set(put_ranks)))
        self.ext = _extension() if self.put_mask == 0 else _put_extension()
        # Decode kernels are latency-bound: they may use every SM (as DeepEP's low-latency kernels).
        self.num_sms = num_sms or torch.cuda.get_device_properties(device).multi_processor_count
        self.mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=device)
        self.key = None
        self.results: list[_Result] = []
        self.buffer_idx = 0    # dispatches alternate between the two buffers' dispatch areas
        self.combine_idx = 0   # combines alternate between their combine areas, independently, so
        #                        repeated combines of one handle never reuse the area a peer reads
        self.fused = _fused_from_env()
        self.bf16_partials = False  # MOE_EP_LL_COMBINE_PARTIALS, set by the constructors (agreed by every rank)
        self.trace: Optional[torch.Tensor] = None  # enable_trace()

    def enable_trace(self) -> torch.Tensor:
        """Make every later call record its phase boundaries (%globaltimer ns, csrc/low_latency.h) into
        the returned int64 tensor [kernel, block, event] (kernels: dispatch send, dispatch recv, combine
        send, combine recv); a diagnostic of the loopback benchmark. Each call overwrites its rows."""
        shape = tuple(self.ext.ll_trace_shape)
        self.trace = torch.zeros(shape, dtype=torch.int64, device=self.device)
        return self.trace

    # -------------------------------------------------------- buffers
    def _ensure(self, m: int, hidden: int, num_experts: int, num_topk: int, use_fp8: bool, use_ue8m0: bool) -> None:
        key = (m, hidden, num_experts, num_topk, use_fp8, use_ue8m0)
        if self.key == key:
            return
        if self.key is not None:
            # New sizes move the areas: no peer may still be inside a call with the old ones (every
            # rank changes sizes at the same call, so this barrier is matched).
            torch.cuda.synchronize(self.device)
            self._peer_barrier()
        info = self.ext.ll_layout_info(self.num_ranks, num_experts, m, hidden, num_topk, use_fp8)
        needed = info["region_bytes_with_outbox" if self.put_mask else "region_bytes"]
        if needed > self.num_bytes:
            with_puts = " (with the outbox of NVSHMEM puts)" if self.put_mask else ""
            raise ValueError(f"num_rdma_bytes={self.num_bytes} is too small for the low-latency kernels with "
                             f"M={m}, hidden={hidden}, num_experts={num_experts}, top-k={num_topk}: they need "
                             f"{needed}{with_puts}")
        num_local = num_experts // self.num_ranks
        slots = self.num_ranks * m
        dev = self.device
        self.results = []
        for _ in range(NUM_LOW_LATENCY_BUFFERS):
            if use_fp8:
                data = torch.zeros((num_local, slots, hidden), dtype=torch.uint8, device=dev)
                groups = hidden // FP8_GROUP_SIZE // (4 if use_ue8m0 else 1)
                scales = torch.zeros(num_local * groups * slots, dtype=torch.int32 if use_ue8m0 else torch.float32,
                                     device=dev)
            else:
                data = torch.zeros((num_local, slots, hidden), dtype=torch.bfloat16, device=dev)
                scales = None
            self.results.append(_Result(
                data, scales,
                recv_count=torch.zeros(num_local, dtype=torch.int32, device=dev),
                src_info=torch.full((num_local, slots), -1, dtype=torch.int32, device=dev),
                layout_range=torch.zeros((num_local, self.num_ranks), dtype=torch.int64, device=dev),
                counts_e=torch.zeros(num_experts, dtype=torch.int32, device=dev),
                pair_pos=torch.zeros(max(m * num_topk, 1), dtype=torch.int32, device=dev),
                send_done=torch.zeros(num_experts, dtype=torch.int32, device=dev),
                combine_input=torch.zeros((num_local, slots, hidden), dtype=torch.bfloat16, device=dev),
                mask=torch.zeros(self.num_ranks, dtype=torch.int32, device=dev),
                routing=torch.zeros(int(info["routing_ints"]), dtype=torch.int32, device=dev)))
        # The flags do not move with the sizes (csrc/low_latency.h), so new sizes need no cleaning.
        self.key = key

    def clean(self) -> None:
        """Zero every flag (after a failed call, or when other kernels used the memory). The Buffer
        synchronizes and barriers after it, as DeepEP's clean_low_latency_buffer."""
        self.ipc.local_view()[:int(self.ext.ll_flags_bytes)].zero_()
        for result in self.results:
            result.recv_count.zero_()
            result.src_info.fill_(-1)
            result.layout_range.zero_()
            result.send_done.zero_()

    def _result_of(self, handle) -> int:
        for b, result in enumerate(self.results):
            if handle[0] is result.src_info:
                return b
        raise ValueError("handle: it does not come from this Buffer's current low-latency buffers "
                         "(a dispatch with other sizes replaced them, or it comes from another Buffer)")

    def next_combine_buffer(self, handle) -> torch.Tensor:
        return self.results[self._result_of(handle)].combine_input

    def _views(self, result: _Result, hidden: int, use_fp8: bool, use_ue8m0: bool):
        if not use_fp8:
            return result.data
        num_local, slots = result.data.shape[:2]
        groups = hidden // FP8_GROUP_SIZE // (4 if use_ue8m0 else 1)
        scales = result.scales.view(num_local, groups, slots).transpose(1, 2)
        return result.data.view(FP8_DTYPE), scales

    # -------------------------------------------------------- dispatch
    def dispatch(self, x, topk_idx, m: int, num_experts: int, recv_stats, use_fp8: bool, round_scale: bool,
                 use_ue8m0: bool, return_recv_hook: bool, wait_stats: Optional[torch.Tensor] = None):
        hidden = x.shape[1]
        num_topk = topk_idx.shape[1]
        if x.shape[0] > m:
            raise ValueError(f"x has {x.shape[0]} tokens, more than num_max_dispatch_tokens_per_rank={m}")
        self._ensure(m, hidden, num_experts, num_topk, use_fp8, use_ue8m0)
        b = self.buffer_idx
        self.buffer_idx ^= 1
        result = self.results[b]
        result.use_fp8, result.num_topk, result.num_tokens = use_fp8, num_topk, x.shape[0]
        x = _aligned(x)
        topk_idx = topk_idx.contiguous()
        # The send kernel copies the live mask into result.mask (no separate copy on the stream): the
        # receive and this dispatch's combine use that snapshot, whatever the live mask becomes.

        def launch(send: bool, recv: bool) -> None:
            self.ext.ll_dispatch(self.view, send, recv, num_experts, m, b, x, topk_idx, self.mask, result.mask, use_fp8,
                                 round_scale, use_ue8m0, result.counts_e, result.pair_pos, result.send_done, result.data,
                                 result.scales, result.recv_count, result.src_info, result.layout_range, recv_stats,
                                 result.routing, self.num_sms, self.fused, self.trace, self.put_mask,
                                 wait_stats if recv else None)  # the send half waits for nothing

        handle = (result.src_info, result.layout_range, m, hidden, num_experts)
        recv_x = self._views(result, hidden, use_fp8, use_ue8m0)
        if return_recv_hook:
            launch(True, False)
            return recv_x, result.recv_count, handle, lambda: launch(False, True)
        launch(True, True)
        return recv_x, result.recv_count, handle, None

    # -------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, topk_idx, topk_weights, handle, out: Optional[torch.Tensor],
                return_recv_hook: bool, wait_stats: Optional[torch.Tensor] = None):
        b = self._result_of(handle)
        result = self.results[b]
        _, layout_range, m, hidden, num_experts = handle
        if topk_idx.shape[1] != result.num_topk:
            raise ValueError(f"topk_idx has {topk_idx.shape[1]} columns but the dispatch behind this handle had "
                             f"{result.num_topk}")
        if topk_idx.shape[0] != result.num_tokens:
            raise ValueError(f"topk_idx has {topk_idx.shape[0]} rows but the dispatch behind this handle had "
                             f"{result.num_tokens} tokens")
        x = _aligned(x)
        topk_idx = topk_idx.contiguous()
        topk_weights = topk_weights.to(torch.float32).contiguous()
        # The kernel writes 16-byte rows pieces; a strided or unaligned out= gets them through a copy.
        direct = out is not None and out.is_contiguous() and out.data_ptr() % 16 == 0
        combined = out if direct else torch.empty((topk_idx.shape[0], hidden), dtype=torch.bfloat16,
                                                  device=self.device)

        area = self.combine_idx
        self.combine_idx ^= 1
        bf16_partials = self.bf16_partials  # the send and a later hook's receive must agree

        def launch(send: bool, recv: bool) -> None:
            self.ext.ll_combine(self.view, send, recv, num_experts, m, area, result.use_fp8, x, layout_range, topk_idx,
                                topk_weights, result.mask, result.pair_pos, result.src_info, result.routing, combined,
                                self.num_sms, self.fused, self.trace, self.put_mask, bf16_partials,
                                wait_stats)  # both halves wait: the send for weights, the receive for partials
            if recv and out is not None and not direct:
                out.copy_(combined)

        result_tensor = out if out is not None else combined

        if return_recv_hook:
            launch(True, False)
            hook: Optional[Callable[[], None]] = lambda: launch(False, True)
            return result_tensor, hook
        launch(True, True)
        return result_tensor, None
