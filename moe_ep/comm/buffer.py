"""``moe_ep.comm.Buffer``: DeepEP V1's Buffer API (names, arguments, defaults, return tuples).

The Buffer owns policy: validation, allocation, streams and events. A backend owns the data
movement: ``reference`` (torch.distributed collectives; runs on gloo and NCCL) today, ``cuda``
(NVLink/NVSHMEM kernels) where the extension provides them. Code written for ``deep_ep.Buffer``
switches with one import::

    from moe_ep.comm import Buffer   # instead of: from deep_ep import Buffer

Shapes: T tokens on this rank, H hidden, K top-k, E experts, R ranks, L = E / R local experts
(expert e lives on rank e // L as local expert e % L). ``-1`` in ``topk_idx`` means "no expert".
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from .. import env
from . import validation as check
from .backends.reference import ReferenceBackend, check_ranks_agree
from .errors import translate_device_errors
from .config import Config, default_combine_config, default_dispatch_config, low_latency_rdma_size_hint
from .event import EventOverlap
from .fp8 import FP8_GROUP_SIZE
from .hooks import HookLedger

logger = logging.getLogger("moe_ep")

Payload = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
NUM_MAX_NVL_PEERS = 8  # ranks per node: a group larger than this spans nodes

_announced_backends: set[str] = set()


def _announce_once(message: str) -> None:
    if message not in _announced_backends:
        _announced_backends.add(message)
        logger.warning(message)


def _load_extension():
    try:
        from .. import _C  # type: ignore[attr-defined]
        return _C
    except ImportError:
        return None


def _group_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _kernel_checks_topk(backend, call: str, topk_idx: torch.Tensor, num_experts: int) -> bool:
    """Whether ``call``'s kernel path checks topk_idx's values itself (CudaBackend.checks_expert_ids),
    so the Buffer need not: reading them on the host synchronises (the GPU then idles while the host
    launches what follows), and a device assert costs five small kernels (~7 µs at decode sizes)."""
    checks = getattr(backend, "checks_expert_ids", None)
    return checks is not None and isinstance(topk_idx, torch.Tensor) and bool(checks(call, topk_idx, num_experts))


class Buffer:
    """Dispatch/combine buffers of one process group (collective: every rank builds it).

    Args:
        group: the torch.distributed process group (``None``: the default group).
        num_nvl_bytes: bytes for the normal kernels inside a node.
        num_rdma_bytes: bytes for the low-latency and cross-node kernels; low-latency calls need
            at least ``get_low_latency_rdma_size_hint(...)``.
        low_latency_mode: enable the low-latency (decode) calls.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: hardware
            options of the RDMA/NVLink paths. They are validated and recorded; the reference
            backend moves data through torch.distributed and shares no memory, so they do not
            change its results.
        explicitly_destroy: if True, ``destroy()`` must be called to free the buffers.
        enable_shrink: enable the mask-buffer calls (ranks marked failed are skipped).
        comm: DeepEP's mpi4py communicator; moe_ep groups ranks with torch.distributed only, so
            passing one raises ``ValueError``.
        recv_pool_bytes: (moe_ep only, keyword) bytes per rank of the intranode kernels' receive
            pool, where dispatch outputs live so that peers store rows straight into them
            (``moe_ep/comm/recv_pool.py``); ``None`` reads ``MOE_EP_RECV_POOL_BYTES`` (default 0:
            off). Every rank must enable it alike.
    """

    num_sms: int = 20

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, *, recv_pool_bytes: Optional[int] = None) -> None:
        if comm is not None:
            raise ValueError("comm: moe_ep groups ranks with torch.distributed; pass group= (a ProcessGroup) "
                             "instead of an mpi4py communicator")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Buffer needs torch.distributed initialized (init_process_group) before it is built")
        self.group = group if group is not None else dist.group.WORLD
        check.check_positive_int(num_nvl_bytes, "num_nvl_bytes", minimum=0)
        check.check_positive_int(num_rdma_bytes, "num_rdma_bytes", minimum=0)
        check.check_positive_int(num_qps_per_rank, "num_qps_per_rank", minimum=1)
        if recv_pool_bytes is not None:
            check.check_positive_int(recv_pool_bytes, "recv_pool_bytes", minimum=0)
        self.recv_pool_bytes = recv_pool_bytes
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = bool(allow_nvlink_for_low_latency_mode)
        self.allow_mnnvl = bool(allow_mnnvl)
        self.use_fabric = bool(use_fabric)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self.device = _group_device(self.group)
        self._comm_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._raw_buffers: dict[bool, torch.Tensor] = {}
        self._hooks = HookLedger()  # misused receive hooks raise (moe_ep/comm/hooks.py)
        self._destroyed = False
        # Opening the buffers is collective: a rank that asks for other kinds (say, no
        # low_latency_mode) would leave the others waiting in the open. Compared first, once.
        check_ranks_agree(self.group, self.device, "Buffer",
                          {"num_nvl_bytes > 0": num_nvl_bytes > 0, "low_latency_mode": self.low_latency_mode,
                           "num_rdma_bytes > 0": num_rdma_bytes > 0, "enable_shrink": self.enable_shrink}, host=True)
        self.backend = self._select_backend()
        self.runtime = self.backend  # DeepEP exposes `runtime`; ours is the backend object

    # ------------------------------------------------------------------ setup
    def _select_backend(self):
        unknown = env.unknown_settings()
        if unknown:  # a misspelled setting would otherwise change nothing, silently
            _announce_once(f"moe_ep: environment variables moe_ep does not read (a typo?): {', '.join(unknown)}; "
                           "`python -m moe_ep info` lists the ones it does")
        ext = _load_extension()
        families = tuple(getattr(ext, "kernel_families", ())) if ext is not None else ()
        if self.device.type == "cuda" and families:
            from .backends.cuda import CudaBackend
            backend = CudaBackend(self, ext)
            _announce_once(backend.describe())  # which calls run kernels, which the reference
            return backend
        reason = ("the CUDA extension is not built" if ext is None else
                  "tensors are on the CPU" if self.device.type != "cuda" else
                  "this build has no CUDA kernel families")
        _announce_once(f"moe_ep: using the reference backend (torch.distributed collectives): {reason}")
        return ReferenceBackend(self.group, self.device)

    def destroy(self) -> None:
        """Free the buffers (required when built with ``explicitly_destroy=True``)."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() is for Buffers built with explicitly_destroy=True; "
                               "others free their memory when garbage-collected")
        if self.device.type == "cuda":
            # Peers write into this rank's shared buffers: every rank finishes its kernels and meets
            # the others before any of them unmaps or frees (collective, as DeepEP's destroy).
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)
        self._raw_buffers.clear()
        self.backend = None
        self._destroyed = True

    def _live_backend(self):
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed; build a new one")
        return self.backend

    def is_sm90_compiled(self) -> bool:
        """Whether the CUDA extension was built with Hopper (sm_90) features."""
        ext = _load_extension()
        return bool(ext is not None and ext.is_sm90_compiled())

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SMs the normal kernels may use (even: kernels pair a sender and a receiver SM)."""
        if not isinstance(new_num_sms, int) or isinstance(new_num_sms, bool) or new_num_sms < 2 or new_num_sms % 2:
            raise ValueError(f"new_num_sms must be an even int >= 2, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap recorded on the current CUDA stream (empty on a machine without CUDA)."""
        if not torch.cuda.is_available():
            return EventOverlap()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` that low-latency calls with these sizes need."""
        check.check_positive_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank")
        check.check_positive_int(hidden, "hidden")
        check.check_positive_int(num_ranks, "num_ranks")
        check.check_positive_int(num_experts, "num_experts")
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Tuned normal-kernel config for dispatch on ``num_ranks`` ranks, using ``Buffer.num_sms``."""
        check.check_positive_int(num_ranks, "num_ranks", minimum=2)
        return default_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Tuned normal-kernel config for combine on ``num_ranks`` ranks, using ``Buffer.num_sms``."""
        check.check_positive_int(num_ranks, "num_ranks", minimum=2)
        return default_combine_config(num_ranks, Buffer.num_sms)

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        """The stream communication runs on (``None`` on CPU groups, where calls are synchronous)."""
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A typed view of this rank's raw buffer memory (allocated on first use)."""
        total = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        which = "num_rdma_bytes" if use_rdma_buffer else "num_nvl_bytes"
        check.check_positive_int(offset, "offset", minimum=0)
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = (total - offset) // itemsize if size is None else int(torch.Size(size).numel())
        if offset + numel * itemsize > total or numel < 0:
            raise ValueError(f"size {tuple(size) if size is not None else ''} at offset {offset} needs "
                             f"{offset + numel * itemsize} bytes but {which}={total}")
        raw = self._raw_buffers.get(use_rdma_buffer)
        if raw is None:
            raw = torch.zeros(total, dtype=torch.uint8, device=self.device)
            self._raw_buffers[use_rdma_buffer] = raw
        view = raw[offset:offset + numel * itemsize].view(dtype)
        return view.view(size) if size is not None else view

    # ------------------------------------------------------------------ streams and events
    def _run(self, fn: Callable, previous_event: Optional[EventOverlap], async_finish: bool,
             allocate_on_comm_stream: bool, inputs: tuple, what: str):
        """Run ``fn`` on the communication stream with DeepEP's event semantics; a device-side
        wait that timed out surfaces here as :class:`MoeEpTimeoutError` naming ``what``."""
        with translate_device_errors(f"Buffer.{what}"):
            return self._run_on_streams(fn, previous_event, async_finish, allocate_on_comm_stream, inputs)

    def _run_on_streams(self, fn: Callable, previous_event: Optional[EventOverlap], async_finish: bool,
                        allocate_on_comm_stream: bool, inputs: tuple):
        if self.device.type != "cuda":
            return fn(), EventOverlap()
        if allocate_on_comm_stream and previous_event is None:
            raise ValueError("allocate_on_comm_stream=True needs previous_event (as in DeepEP)")
        compute = torch.cuda.current_stream()
        comm = self._comm_stream
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        # Outputs were allocated on the comm stream: used on the compute stream, they are recorded
        # there so the allocator does not hand their memory to comm-stream work too early.
        outputs = [t for t in _flatten(result) if t.is_cuda]
        if not allocate_on_comm_stream:
            for t in outputs:
                t.record_stream(compute)
        if async_finish or previous_event is not None:
            # The comm stream may still read the caller's inputs after the call returns (async), or
            # they may come from the stream previous_event was recorded on, which nothing orders
            # after the comm stream: recorded there, so the allocator keeps them until it is done.
            tensors = [t for t in _flatten(inputs) if t.is_cuda]
            for t in tensors:
                t.record_stream(comm)
        if async_finish:
            event = torch.cuda.Event()
            event.record(comm)
            return result, EventOverlap(event, extra_tensors=tuple(tensors + outputs))
        # Synchronous, ordered after the compute stream: the compute stream waits for the comm
        # stream here, so whatever reuses the inputs' memory there runs after the call (no
        # record_stream for them, as in DeepEP: a host cost on every call).
        compute.wait_stream(comm)
        return result, EventOverlap()

    # ------------------------------------------------------------------ normal kernels
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Where each token goes.

        Args: ``topk_idx`` [T, K] int64 (-1: no expert), ``num_experts`` E (divisible by R).
        Returns: ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [nodes] int32 or None
        inside one node, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool, event)``.
        """
        backend = self._live_backend()
        check.check_num_experts(num_experts, self.group_size)
        check.check_topk_idx(topk_idx, topk_idx.shape[0] if isinstance(topk_idx, torch.Tensor) else 0,
                             num_experts, self.device,
                             values=not _kernel_checks_topk(backend, "get_dispatch_layout", topk_idx, num_experts))

        def run():
            per_rank, _, per_expert, in_rank = backend.get_dispatch_layout(topk_idx, num_experts)
            per_rdma_rank = self._tokens_per_node(in_rank)
            return per_rank, per_rdma_rank, per_expert, in_rank

        result, event = self._run(run, previous_event, async_finish, allocate_on_comm_stream, (topk_idx,),
                                  "get_dispatch_layout")
        return (*result, event)

    def _tokens_per_node(self, is_token_in_rank: torch.Tensor) -> Optional[torch.Tensor]:
        if self.group_size <= NUM_MAX_NVL_PEERS:
            return None
        num_nodes = self.group_size // NUM_MAX_NVL_PEERS
        in_node = is_token_in_rank.view(-1, num_nodes, NUM_MAX_NVL_PEERS).any(dim=2)
        return in_node.sum(0, dtype=torch.int32)

    def dispatch(self, x: Payload, handle: Optional[tuple] = None, num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None, is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None, topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send each token to every rank that holds one of its experts.

        Args:
            x: [T, H] bf16, or ``(x_fp8 [T, H] float8_e4m3fn, scales [T, H/128] float32)``.
            handle: a previous dispatch's handle: repeat its routing for new ``x`` (cached mode).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: from get_dispatch_layout.
            topk_idx [T, K] int64, topk_weights [T, K] float32: forwarded with the tokens.
            expert_alignment: round each per-expert count up to this multiple.
            num_worst_tokens: if > 0, outputs have exactly this many rows and no host sync happens.
        Returns:
            ``(recv_x, recv_topk_idx [N, K] int64 (local ids, -1 elsewhere), recv_topk_weights
            [N, K] float32 (0 where -1), num_recv_tokens_per_expert_list (L ints; [] with
            num_worst_tokens), handle, event)``; rows ordered by source rank, then source token.
            Cached mode returns ``(recv_x, None, None, None, None, event)``.
        """
        backend = self._live_backend()
        num_tokens, _ = check.check_hidden_states(x, "x", self.device)
        self._check_config(config)
        check.check_positive_int(expert_alignment, "expert_alignment")
        check.check_positive_int(num_worst_tokens, "num_worst_tokens", minimum=0)
        num_experts = None
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx/topk_weights must be None with handle= (cached dispatch reuses the routing)")
            self._check_normal_handle(handle)
            if handle[1].shape[0] != num_tokens:
                raise ValueError(f"x has {num_tokens} tokens but the handle routed {handle[1].shape[0]}")
        else:
            if is_token_in_rank is None or num_tokens_per_expert is None:
                raise ValueError("dispatch without handle needs is_token_in_rank and num_tokens_per_expert "
                                 "(from get_dispatch_layout)")
            check.check_tensor(is_token_in_rank, "is_token_in_rank", dtypes=[torch.bool], dim=2, device=self.device)
            if tuple(is_token_in_rank.shape) != (num_tokens, self.group_size):
                raise ValueError(f"is_token_in_rank must have shape [{num_tokens}, {self.group_size}], "
                                 f"got {tuple(is_token_in_rank.shape)}")
            check.check_tensor(num_tokens_per_expert, "num_tokens_per_expert", dtypes=[torch.int32, torch.int64],
                               dim=1, device=self.device)
            num_experts = num_tokens_per_expert.shape[0]
            check.check_num_experts(num_experts, self.group_size)
            if num_tokens_per_rank is not None:
                check.check_tensor(num_tokens_per_rank, "num_tokens_per_rank", dtypes=[torch.int32, torch.int64],
                                   dim=1, device=self.device)
                if num_tokens_per_rank.shape[0] != self.group_size:
                    raise ValueError(f"num_tokens_per_rank must have {self.group_size} entries, "
                                     f"got {num_tokens_per_rank.shape[0]}")
            if (topk_idx is None) != (topk_weights is None):
                raise ValueError("topk_idx and topk_weights must be given together")
            if topk_idx is not None:
                check.check_topk_idx(topk_idx, num_tokens, num_experts, self.device,
                                     values=not _kernel_checks_topk(backend, "dispatch", topk_idx, num_experts))
                check.check_topk_weights(topk_weights, topk_idx, self.device)

        backend.num_sms = self._call_num_sms(config)

        def run():
            return backend.dispatch(x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                                    expert_alignment, num_worst_tokens, num_experts)

        inputs = (x, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert)
        result, event = self._run(run, previous_event, async_finish, allocate_on_comm_stream, inputs, "dispatch")
        return (*result, event)

    def empty_combine_input(self, num_rows: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """(moe_ep only) An uninitialised ``[num_rows, hidden]`` tensor to write the expert outputs into
        and pass to :meth:`combine` as ``x``. With a receive pool (``recv_pool_bytes``) it lives there
        and combine's peers read its rows in place, so this rank sends nothing (fewer passes over
        the data; ``moe_ep/comm/recv_pool.py``); otherwise it is a plain ``torch.empty``. combine
        takes any other tensor as well."""
        backend = self._live_backend()
        check.check_positive_int(num_rows, "num_rows", minimum=0)
        check.check_positive_int(hidden, "hidden", minimum=1)
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float32 (what combine takes), got {dtype}")
        return backend.empty_combine_input(num_rows, hidden, dtype)

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple, None] = None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Return each received row to its source and sum a token's rows (no weights applied).

        Args:
            x: [N, H] bf16 (N = rows dispatch returned), handle: from dispatch,
            topk_weights: [N, K] float32 to sum back alongside, bias: 0, 1 or 2 tensors [T, H].
        Returns: ``(combined_x [T, H], combined_topk_weights [T, K] float32 or None, event)``.
        """
        backend = self._live_backend()
        self._check_normal_handle(handle)
        self._check_config(config)
        check.check_tensor(x, "x", dtypes=[torch.bfloat16, torch.float32], dim=2, device=self.device)
        num_recv = handle[3].num_recv_rows
        if x.shape[0] != num_recv:
            raise ValueError(f"x has {x.shape[0]} rows but the dispatch behind this handle received {num_recv}")
        num_tokens = handle[1].shape[0]
        if topk_weights is not None:
            check.check_tensor(topk_weights, "topk_weights", dtypes=[torch.float32], dim=2, device=self.device)
            if topk_weights.shape[0] != num_recv:
                raise ValueError(f"topk_weights has {topk_weights.shape[0]} rows, expected {num_recv}")
        biases = [] if bias is None else [bias] if isinstance(bias, torch.Tensor) else [b for b in bias if b is not None]
        if len(biases) > 2:
            raise ValueError(f"bias takes at most 2 tensors, got {len(biases)}")
        for i, b in enumerate(biases):
            check.check_tensor(b, f"bias[{i}]", dtypes=[torch.bfloat16, torch.float32], dim=2, device=self.device)
            if tuple(b.shape) != (num_tokens, x.shape[1]):
                raise ValueError(f"bias[{i}] must have shape [{num_tokens}, {x.shape[1]}], got {tuple(b.shape)}")

        backend.num_sms = self._call_num_sms(config)

        def run():
            return backend.combine(x, handle, topk_weights, biases)

        result, event = self._run(run, previous_event, async_finish, allocate_on_comm_stream,
                                  (x, topk_weights, *biases), "combine")
        return (*result, event)

    def internode_dispatch(self, x: Payload, handle: Optional[tuple] = None, num_tokens_per_rank=None,
                           num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                           topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                           config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                           async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Dispatch across nodes: the same contract as :meth:`dispatch` (which calls it for
        multi-node groups). The reference backend treats every group alike."""
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                             config, previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle: tuple, topk_weights=None, bias=None,
                          config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Combine across nodes: the same contract as :meth:`combine`."""
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    def _check_normal_handle(self, handle) -> None:
        if not isinstance(handle, tuple) or len(handle) != 4 or not hasattr(handle[3], "is_token_in_rank"):
            raise TypeError("handle must be the handle a normal dispatch of this library returned")

    @staticmethod
    def _call_num_sms(config: Optional[Config]) -> int:
        """SMs a normal call may hold: its config's, else ``Buffer.set_num_sms``'s (as in DeepEP)."""
        return config.num_sms if config is not None else Buffer.num_sms

    @staticmethod
    def _check_config(config) -> None:
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be a moe_ep.comm.Config, got {type(config).__name__}")

    # ------------------------------------------------------------------ low-latency kernels
    def _check_low_latency(self, m: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise ValueError("low-latency calls need a Buffer built with low_latency_mode=True")
        need = low_latency_rdma_size_hint(m, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise ValueError(f"num_rdma_bytes={self.num_rdma_bytes} is too small for low-latency calls with "
                             f"num_max_dispatch_tokens_per_rank={m}, hidden={hidden}, num_ranks={self.group_size}, "
                             f"num_experts={num_experts}: Buffer.get_low_latency_rdma_size_hint(...) = {need}")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency buffers (needed after normal kernels used the same memory)."""
        check.check_num_experts(num_experts, self.group_size)
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._live_backend().low_latency.clean()
        self._hooks.clear()
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        dist.barrier(group=self.group)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Send every (token, expert) pair to the expert's rank, into fixed-size slots.

        Args:
            x: [T, H] bf16, T <= num_max_dispatch_tokens_per_rank (M, the same on every rank).
            topk_idx: [T, K] int64 (-1: none). num_experts: E.
            cumulative_local_expert_recv_stats: [L] int32, the counts are added to it.
            dispatch_wait_recv_cost_stats: [R] (this rank's row, as DeepEP's kernels take it) or
                [R, R] int64: the receive's wait (ns) for each source is added to that row
                (README "Wait-time statistics").
            use_fp8 / round_scale / use_ue8m0: cast to FP8 with 1x128 scales (power-of-two with
                round_scale; packed UE8M0 int32 [L, R*M, H/512] with use_ue8m0).
            return_recv_hook: only issue the sends; ``hook()`` completes the receive, once. At most
                two dispatches may be outstanding: a third, while the hook of the one two calls back
                has not run, raises RuntimeError (its buffer would be reused); so does a combine of
                a dispatch not yet received. A hook that will never be called: drop it with
                ``clean_low_latency_buffer``.
        Returns:
            ``(recv_x [L, R*M, H] bf16 or (fp8, scales column-major), recv_count [L] int32,
            handle, event, hook)``. Expert l's first recv_count[l] rows are valid; each source's
            rows are contiguous, at ``handle[1]`` (layout_range: begin << 32 | count).
        """
        backend = self._live_backend()
        check.check_tensor(x, "x", dtypes=[torch.bfloat16], dim=2, device=self.device)
        num_tokens, hidden = x.shape
        m = check.check_positive_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank")
        if num_tokens > m:
            raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={m}")
        check.check_num_experts(num_experts, self.group_size)
        check.check_topk_idx(topk_idx, num_tokens, num_experts, self.device, sync_free=True,
                             values=not _kernel_checks_topk(backend, "low_latency_dispatch", topk_idx, num_experts))
        if use_fp8 and hidden % FP8_GROUP_SIZE:
            raise ValueError(f"hidden={hidden} must be a multiple of {FP8_GROUP_SIZE} for use_fp8=True")
        if use_ue8m0:
            if not use_fp8 or not round_scale:
                raise ValueError("use_ue8m0=True needs use_fp8=True and round_scale=True (UE8M0 holds powers of two)")
            if hidden % (4 * FP8_GROUP_SIZE):
                raise ValueError(f"hidden={hidden} must be a multiple of {4 * FP8_GROUP_SIZE} for use_ue8m0=True")
        self._check_low_latency(m, hidden, num_experts)
        num_local = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            check.check_tensor(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats",
                               dtypes=[torch.int32], dim=1, device=self.device)
            if cumulative_local_expert_recv_stats.shape[0] != num_local:
                raise ValueError(f"cumulative_local_expert_recv_stats must have {num_local} entries")
        state = backend.low_latency
        wait_row = self._wait_stats_row(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", state)
        self._hooks.check_issue("low_latency_dispatch")

        def run():
            return state.dispatch(x, topk_idx, m, num_experts, cumulative_local_expert_recv_stats, use_fp8,
                                  round_scale, use_ue8m0, return_recv_hook, wait_row)

        (recv_x, recv_count, handle, hook), event = self._run(run, None, async_finish, False, (x, topk_idx),
                                                              "low_latency_dispatch")
        hook = self._hooks.issued("low_latency_dispatch", hook, handle)
        return recv_x, recv_count, handle, event, hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """Bring expert outputs back and reduce them with the top-k weights.

        Args:
            x: [L, R*M, H] bf16 in recv_x's layout (the experts' outputs).
            topk_idx [T, K] int64, topk_weights [T, K] float32: as given to the dispatch.
            handle: the low_latency_dispatch handle. zero_copy: ``x`` was written into
                ``get_next_low_latency_combine_buffer(handle)``. out: [T, H] bf16 to write into.
        Returns: ``(combined_x [T, H] bf16, event, hook)`` with
            ``combined_x[t] = sum_k topk_weights[t, k] * expert_output(topk_idx[t, k])[t]``.
        """
        backend = self._live_backend()
        if use_logfmt:
            raise ValueError("use_logfmt=True (LogFMT-compressed combine) is not supported by moe_ep's reference "
                             "backend; call with use_logfmt=False")
        self._check_low_latency_handle(handle)
        _, _, m, hidden, num_experts = handle
        num_local = num_experts // self.group_size
        check.check_tensor(x, "x", dtypes=[torch.bfloat16], dim=3, device=self.device)
        expected = (num_local, self.group_size * m, hidden)
        if tuple(x.shape) != expected:
            raise ValueError(f"x must have shape {list(expected)} (recv_x's layout), got {tuple(x.shape)}")
        check.check_tensor(topk_idx, "topk_idx", dtypes=[torch.int64], dim=2, device=self.device)
        num_tokens = topk_idx.shape[0]
        if num_tokens > m:
            raise ValueError(f"topk_idx has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={m}")
        check.check_topk_idx(topk_idx, num_tokens, num_experts, self.device, sync_free=True,
                             values=not _kernel_checks_topk(backend, "low_latency_combine", topk_idx, num_experts))
        check.check_topk_weights(topk_weights, topk_idx, self.device)
        state = backend.low_latency
        if zero_copy and x.data_ptr() != state.next_combine_buffer(handle).data_ptr():
            raise ValueError("zero_copy=True needs x to be the tensor get_next_low_latency_combine_buffer(handle) returned")
        if out is not None:
            check.check_tensor(out, "out", dtypes=[torch.bfloat16], dim=2, device=self.device)
            if tuple(out.shape) != (num_tokens, hidden):
                raise ValueError(f"out must have shape [{num_tokens}, {hidden}], got {tuple(out.shape)}")
        wait_row = self._wait_stats_row(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", state)
        self._hooks.check_handle(handle)
        self._hooks.check_issue("low_latency_combine")

        def run():
            return state.combine(x, topk_idx, topk_weights, handle, out, return_recv_hook, wait_row)

        (combined, hook), event = self._run(run, None, async_finish, False, (x, topk_idx, topk_weights),
                                            "low_latency_combine")
        hook = self._hooks.issued("low_latency_combine", hook)
        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The [L, R*M, H] bf16 tensor the next low_latency_combine reads (for zero_copy)."""
        self._check_low_latency_handle(handle)
        return self._live_backend().low_latency.next_combine_buffer(handle)

    def _check_low_latency_handle(self, handle) -> None:
        if not isinstance(handle, tuple) or len(handle) != 5 or not isinstance(handle[2], int):
            raise TypeError("handle must be the 5-tuple low_latency_dispatch returned "
                            "(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)")

    def _wait_stats_row(self, stats: Optional[torch.Tensor], name: str, state) -> Optional[torch.Tensor]:
        """The [R] int64 view a receive adds its wait for each source (ns) to: ``stats`` itself when
        it is [R] (the shape DeepEP's kernels take: this rank's row), row ``rank`` when it is
        [R, R] (the documented global view). ``state.WAIT_STATS_ON_GPU``: whether it can on GPUs."""
        if stats is None:
            return None
        r = self.group_size
        check.check_tensor(stats, name, dtypes=[torch.int64], device=self.device)
        if tuple(stats.shape) not in ((r,), (r, r)):
            raise ValueError(f"{name} must have shape [{r}] (this rank's row) or [{r}, {r}], got {tuple(stats.shape)}")
        if not stats.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if self.device.type == "cuda" and not state.WAIT_STATS_ON_GPU:
            raise ValueError(f"{name}: the reference backend times waits on the host, which on GPUs would need a "
                             "synchronization; pass None, or use the low-latency kernels (they time waits on the "
                             "GPU)")
        return stats if stats.dim() == 1 else stats[self.rank]

    # ------------------------------------------------------------------ rank masking (shrink)
    def _check_shrink(self) -> None:
        if not self.enable_shrink:
            raise ValueError("the mask-buffer calls need a Buffer built with enable_shrink=True")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mark ``rank_to_mask`` as failed (mask=True) or healthy (mask=False)."""
        self._check_shrink()
        if not isinstance(rank_to_mask, int) or not 0 <= rank_to_mask < self.group_size:
            raise ValueError(f"rank_to_mask must be in [0, {self.group_size - 1}], got {rank_to_mask!r}")
        self._live_backend().low_latency.mask[rank_to_mask] = 1 if mask else 0

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy the mask (1 = masked) into ``mask_status`` [R] int32."""
        self._check_shrink()
        check.check_tensor(mask_status, "mask_status", dtypes=[torch.int32], dim=1)
        if mask_status.shape[0] != self.group_size:
            raise ValueError(f"mask_status must have {self.group_size} entries, got {mask_status.shape[0]}")
        mask_status.copy_(self._live_backend().low_latency.mask)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank."""
        self._check_shrink()
        self._live_backend().low_latency.mask.zero_()


def _flatten(value) -> list[torch.Tensor]:
    """The tensors in a call's (nested) inputs or results, for record_stream. Lists of ints (a
    dispatch's per-expert counts: one per local expert) are skipped whole, not walked item by item:
    this runs on the host after every call, while the GPU may wait for the host's next launch."""
    found: list[torch.Tensor] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)) and not (item and type(item[0]) is int):
            pending.extend(item)
    return found
