"""ExpertParallelMoE: the module that takes the place of a transformer's MoE block.

One forward reads like the paper: route, dispatch, experts, combine, plus the shared experts.

* prefill / training ("contiguous"): normal dispatch; received (row, expert) pairs are grouped by
  local expert and run as one grouped GEMM; each row's local results are weighted and summed
  before combine returns the rows (combine itself applies no weights, as in DeepEP).
* decode ("masked"): low-latency dispatch into ``[L, R*M, H]`` slots with per-expert counts, the
  experts on that layout, and a weighted low-latency combine: static shapes and no host sync, so
  a CUDA graph can capture the step.

With ``ep_size == 1`` (no process group) the same two layouts are built locally, no communication.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..comm import Buffer, per_token_group_quant_fp8
from ..comm.config import auto_num_nvl_bytes, auto_recv_pool_bytes
from ..comm.recv_pool import RECV_POOL_ENV
from ..comm.validation import check_positive_int
from .experts import SharedExperts, SwiGLUExperts
from .gating import Router

PHASES = ("prefill", "decode", "auto")
BufferBytes = Union[int, str]


# Every layer of a model on one process group shares one Buffer (the memory is the scarce part).
_shared_buffers: dict[int, Buffer] = {}


def get_shared_buffer(group, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool,
                      recv_pool_bytes: Optional[int] = None) -> Buffer:
    """A Buffer for ``group`` at least as large as asked, reused across layers; rebuilt if too small
    (a receive pool of ``recv_pool_bytes``, if given, counts as part of the size)."""
    key = id(group)
    buffer = _shared_buffers.get(key)
    have_pool = (buffer.recv_pool_bytes or 0) if buffer else 0
    if (buffer is None or buffer.num_nvl_bytes < num_nvl_bytes or buffer.num_rdma_bytes < num_rdma_bytes
            or (low_latency_mode and not buffer.low_latency_mode) or (recv_pool_bytes or 0) > have_pool):
        pool = max(recv_pool_bytes or 0, have_pool) or None  # None: MOE_EP_RECV_POOL_BYTES decides
        buffer = Buffer(group, num_nvl_bytes=max(num_nvl_bytes, buffer.num_nvl_bytes if buffer else 0),
                        num_rdma_bytes=max(num_rdma_bytes, buffer.num_rdma_bytes if buffer else 0),
                        low_latency_mode=low_latency_mode or bool(buffer and buffer.low_latency_mode),
                        recv_pool_bytes=pool)
        _shared_buffers[key] = buffer
    return buffer


def expert_generator(seed: int, expert: int, device: torch.device) -> torch.Generator:
    """The generator that initializes global expert ``expert``: every rank (and a dense copy of the
    model) draws the same weights for it without drawing anyone else's."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + expert)
    return gen


class ExpertParallelMoE(nn.Module):
    """A routed-experts MoE block, sharded over an expert-parallel group.

    Args:
        hidden_size, moe_intermediate_size, num_experts, top_k: the model's MoE dimensions.
        rule, n_group, topk_group, norm_topk_prob, routed_scaling_factor: the gating rule
            (``deepseek_v3`` | ``deepseek_v2`` | ``softmax``) and its parameters.
        num_shared_experts: DeepSeek's always-on experts (0: none).
        group: the EP process group; ``None`` runs every expert locally (EP size 1).
        fp8: FP8 expert weights (128x128 block scales) and FP8 activations/dispatch (1x128).
        low_latency_max_tokens: decode capacity per rank (``num_max_dispatch_tokens_per_rank``).
        phase: ``prefill`` | ``decode`` | ``auto`` (decode when every rank's batch fits in
            ``low_latency_max_tokens``; it agrees across ranks with one small all-reduce, so set the
            phase explicitly when capturing CUDA graphs).
        return_router_logits: return ``(out, router_logits)`` like Mixtral/Qwen3-MoE blocks.
        recv_pool_bytes: the Buffer's receive pool per rank (prefill dispatch outputs that peers
            store into, combine inputs that peers read in place; see ``moe_ep.comm.recv_pool``);
            ``"auto"`` (the default) sizes it for two dispatches and one combine input of 4096
            tokens per rank, unless ``MOE_EP_RECV_POOL_BYTES`` is set (an explicit setting wins);
            ``None`` reads ``MOE_EP_RECV_POOL_BYTES`` (unset: off).
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, num_experts: int, top_k: int, *,
                 rule: str = "softmax", n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, num_shared_experts: int = 0, group=None, fp8: bool = False,
                 fp8_round_scale: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None, low_latency_max_tokens: int = 128,
                 num_nvl_bytes: BufferBytes = "auto", num_rdma_bytes: BufferBytes = "auto",
                 num_sms: Optional[int] = None, phase: str = "auto", return_router_logits: bool = False,
                 recv_pool_bytes: Optional[BufferBytes] = "auto") -> None:
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group) if group is not None else 1
        self.ep_rank = dist.get_rank(group) if group is not None else 0
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the EP size ({self.ep_size})")
        if fp8 and hidden_size % 128:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 128 with fp8=True")
        if low_latency_max_tokens < 1:
            raise ValueError(f"low_latency_max_tokens must be >= 1, got {low_latency_max_tokens}")
        if recv_pool_bytes is not None and recv_pool_bytes != "auto":
            check_positive_int(recv_pool_bytes, "recv_pool_bytes (or None, 'auto')", minimum=0)
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_local_experts = num_experts // self.ep_size
        self.fp8 = bool(fp8)
        self.fp8_round_scale = bool(fp8_round_scale)
        self.dtype = dtype
        self.low_latency_max_tokens = low_latency_max_tokens
        self.return_router_logits = return_router_logits
        self.num_sms = num_sms
        self._num_nvl_bytes, self._num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.recv_pool_bytes = recv_pool_bytes
        self.phase = phase
        self.router = Router(hidden_size, num_experts, top_k, rule, n_group=n_group, topk_group=topk_group,
                             norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor,
                             device=device)
        self.experts = SwiGLUExperts(self.num_local_experts, hidden_size, moe_intermediate_size, dtype=dtype,
                                     device=device)
        self.shared_experts = (SharedExperts(hidden_size, moe_intermediate_size * num_shared_experts, dtype=dtype,
                                             device=device) if num_shared_experts > 0 else None)
        self._buffer: Optional[Buffer] = None
        # Tokens routed to each global expert since the last reset (index E counts -1 entries);
        # updated on the device with no host sync.
        self.register_buffer("expert_load", torch.zeros(num_experts + 1, dtype=torch.int64, device=device),
                             persistent=False)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, cfg, group=None, device: Optional[torch.device] = None,
                    return_router_logits: bool = False) -> "ExpertParallelMoE":
        """Build from a :class:`moe_ep.config.MoEEPConfig`; ``group`` must have ``ep_size`` ranks
        (``None`` with ``ep_size`` 1 — or, to run a config's model densely, pass ``group=None``
        and ``dense=True`` through :func:`dense_from_config`)."""
        ep_size = dist.get_world_size(group) if group is not None else 1
        if ep_size != cfg.parallel.ep_size:
            raise ValueError(f"parallel.ep_size={cfg.parallel.ep_size} but the group has {ep_size} ranks")
        return cls._from_config(cfg, group, device, return_router_logits)

    @classmethod
    def dense_from_config(cls, cfg, device: Optional[torch.device] = None,
                          return_router_logits: bool = False) -> "ExpertParallelMoE":
        """The same block with every expert on this process (EP size 1): the dense reference."""
        return cls._from_config(cfg, None, device, return_router_logits)

    @classmethod
    def _from_config(cls, cfg, group, device, return_router_logits):
        m, g, p, prec = cfg.model, cfg.gating, cfg.parallel, cfg.precision
        return cls(m.hidden_size, m.moe_intermediate_size, m.num_experts, m.top_k, rule=g.rule, n_group=g.n_group,
                   topk_group=g.topk_group, norm_topk_prob=g.norm_topk_prob,
                   routed_scaling_factor=g.routed_scaling_factor, num_shared_experts=m.num_shared_experts,
                   group=group, fp8=prec.fp8, fp8_round_scale=prec.fp8_round_scale, dtype=prec.torch_dtype,
                   device=device, low_latency_max_tokens=p.low_latency_max_tokens, num_nvl_bytes=p.num_nvl_bytes,
                   num_rdma_bytes=p.num_rdma_bytes, num_sms=p.num_sms, phase=p.default_phase,
                   return_router_logits=return_router_logits, recv_pool_bytes=p.recv_pool_bytes or None)
        # (0 in a config: off unless MOE_EP_RECV_POOL_BYTES sets it, hence None.)

    @classmethod
    def from_hf(cls, block, config=None, group=None, **kwargs) -> "ExpertParallelMoE":
        """Convert a transformers MoE block (see :func:`moe_ep.layers.hf.from_hf_block`)."""
        from .hf import from_hf_block
        return from_hf_block(block, config=config, group=group, **kwargs)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "ExpertParallelMoE":
        """Deterministic weights that do not depend on the EP size: router and shared experts from
        ``seed``; global expert e from :func:`expert_generator` (seed, e). Call before
        :meth:`quantize_fp8_`."""
        device = self.router.weight.device
        self.router.reset_parameters(expert_generator(seed, -1, device))
        if self.shared_experts is not None:
            gen = expert_generator(seed, -2, device)
            for linear in (self.shared_experts.gate_proj, self.shared_experts.up_proj, self.shared_experts.down_proj):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen, device=device)
                                    / linear.weight.shape[1] ** 0.5)
        h, i = self.hidden_size, self.moe_intermediate_size
        for local in range(self.num_local_experts):
            gen = expert_generator(seed, self.ep_rank * self.num_local_experts + local, device)
            gate = torch.randn(i, h, generator=gen, device=device) / h ** 0.5
            up = torch.randn(i, h, generator=gen, device=device) / h ** 0.5
            down = torch.randn(h, i, generator=gen, device=device) / i ** 0.5
            self.experts.load_expert_weights(local, gate, up, down)
        return self

    def quantize_fp8_(self) -> "ExpertParallelMoE":
        """Store the routed experts in FP8 (no-op unless built with ``fp8=True``)."""
        if self.fp8 and not getattr(self.experts, "fp8", False):
            self.experts.quantize_fp8_()
        return self

    # ------------------------------------------------------------------ phase
    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {value!r}")
        self._phase = value

    @contextlib.contextmanager
    def use_phase(self, value: str) -> Iterator["ExpertParallelMoE"]:
        """``with moe.use_phase("decode"): ...`` sets the phase for the block, then restores it."""
        previous = self.phase
        self.phase = value
        try:
            yield self
        finally:
            self.phase = previous

    def _resolve_phase(self, num_tokens: int) -> str:
        if self._phase != "auto":
            return self._phase
        if self.group is None:
            return "decode" if num_tokens <= self.low_latency_max_tokens else "prefill"
        # Every rank must take the same path: agree on the largest batch.
        largest = torch.tensor([num_tokens], device=self._comm_device())
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.group)
        return "decode" if int(largest.item()) <= self.low_latency_max_tokens else "prefill"

    # ------------------------------------------------------------------ communication
    def _comm_device(self) -> torch.device:
        backend = str(dist.get_backend(self.group)).lower()
        return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def _resolve_bytes(self) -> tuple[int, int]:
        nvl = self._num_nvl_bytes
        if nvl == "auto":
            nvl = auto_num_nvl_bytes(self.hidden_size * 2, self.ep_size)
        rdma = self._num_rdma_bytes
        if rdma == "auto":
            rdma = Buffer.get_low_latency_rdma_size_hint(self.low_latency_max_tokens, self.hidden_size,
                                                         self.ep_size, self.num_experts)
        return int(nvl), int(rdma)

    @property
    def buffer(self) -> Buffer:
        """The shared communication Buffer of this block's group (built on first use)."""
        if self.group is None:
            raise RuntimeError("an EP-size-1 block has no communication Buffer")
        if self._buffer is None:
            nvl, rdma = self._resolve_bytes()
            pool = self.recv_pool_bytes
            if pool == "auto" and os.environ.get(RECV_POOL_ENV, "").strip():
                pool = None  # the user's MOE_EP_RECV_POOL_BYTES over our default
            if pool == "auto":
                pool = auto_recv_pool_bytes(self.hidden_size, self.ep_size, self.top_k, self.fp8)
            self._buffer = get_shared_buffer(self.group, nvl, rdma, low_latency_mode=True, recv_pool_bytes=pool)
            if self.num_sms is not None:
                Buffer.set_num_sms(self.num_sms)
        return self._buffer

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor):
        """``hidden_states [..., H]`` -> the block's output of the same shape (and the router
        logits ``[T, E]`` when ``return_router_logits``)."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states' last dimension must be hidden_size={self.hidden_size}, "
                             f"got shape {tuple(hidden_states.shape)}")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size).to(self.dtype)
        topk_idx, topk_weights, router_logits = self.router(x)
        self._count_load(topk_idx)
        phase = self._resolve_phase(x.shape[0])
        if phase == "decode":
            if x.shape[0] > self.low_latency_max_tokens:
                raise ValueError(f"decode phase takes at most low_latency_max_tokens={self.low_latency_max_tokens} "
                                 f"tokens per rank, got {x.shape[0]}")
            routed = self._decode(x, topk_idx, topk_weights)
        else:
            routed = self._prefill(x, topk_idx, topk_weights)
        out = routed.float()
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        out = out.to(hidden_states.dtype).view(shape)
        return (out, router_logits) if self.return_router_logits else out

    def _count_load(self, topk_idx: torch.Tensor) -> None:
        slots = torch.where(topk_idx >= 0, topk_idx, self.num_experts).flatten()
        self.expert_load.index_add_(0, slots, torch.ones_like(slots))

    def _activations(self, x: torch.Tensor):
        """What travels: FP8 ``(x_fp8, scales)`` with fp8, else the activations themselves."""
        return per_token_group_quant_fp8(x, round_scale=self.fp8_round_scale) if self.fp8 else x

    def _prefill(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return self._local_experts_on_rows(self._activations(x), topk_idx, topk_weights, x.shape[0])
        buffer = self.buffer
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, self.num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            self._activations(x), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
        num_recv = recv_idx.shape[0]
        # The rows go out in the wire dtype (combine sums whole rows from each rank), written straight
        # into combine's input: with a receive pool its peers read them there in place.
        rows = buffer.empty_combine_input(num_recv, self.hidden_size,
                                          x.dtype if x.dtype == torch.float32 else torch.bfloat16)
        self._local_experts_on_rows(recv_x, recv_idx, recv_w, num_recv, out=rows, counts=counts)
        combined, _, _ = buffer.combine(rows, handle)
        return combined

    def _local_experts_on_rows(self, rows_x, local_idx: torch.Tensor, weights: torch.Tensor,
                               num_rows: int, out: Optional[torch.Tensor] = None,
                               counts: Optional[list[int]] = None) -> torch.Tensor:
        """Rows -> sum over their local experts of weight * expert(row), into ``out`` when given
        (cast to its dtype).

        The (row, k) pairs are grouped by expert for one grouped GEMM ("contiguous" layout); the
        outputs are put back in (row, k) order and reduced with the weights by one batched
        [1, K] x [K, H] product per row: no float32 scatter-add, one pass over the outputs.
        ``counts``: the (row, k) pairs per local expert as host ints, which a dispatch returns
        (``num_recv_tokens_per_expert_list``); then this runs without a host synchronisation (the
        GPU need not drain while the host launches the GEMMs). Without them: one, to count."""
        num_k = local_idx.shape[1]
        flat_idx = local_idx.flatten()
        key = torch.where(flat_idx >= 0, flat_idx, self.num_local_experts)  # -1 (not here) sorts last
        if counts is None:
            counts = torch.bincount(key, minlength=self.num_local_experts + 1)[:-1].tolist()
        # (row, k) ids grouped by expert, row-major within an expert (a stable sort), without the -1s.
        pair = torch.argsort(key, stable=True)[:sum(counts)]
        row = pair // num_k
        if isinstance(rows_x, tuple):
            pairs_x = (rows_x[0].index_select(0, row), rows_x[1].index_select(0, row))
        else:
            pairs_x = rows_x.index_select(0, row)
        y = self.experts.forward_contiguous(pairs_x, counts)
        by_slot = torch.zeros((num_rows * num_k, self.hidden_size), dtype=y.dtype, device=y.device)
        by_slot.index_copy_(0, pair, y)
        slot_weights = torch.where(local_idx >= 0, weights, 0.0).to(y.dtype)
        lhs, rhs = slot_weights.view(num_rows, 1, num_k), by_slot.view(num_rows, num_k, self.hidden_size)
        if out is None:
            return torch.bmm(lhs, rhs).view(num_rows, self.hidden_size)
        if out.dtype == y.dtype:
            torch.bmm(lhs, rhs, out=out.view(num_rows, 1, self.hidden_size))
        else:
            out.copy_(torch.bmm(lhs, rhs).view(num_rows, self.hidden_size))
        return out

    def _decode(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return self._local_decode(x, topk_idx, topk_weights)
        buffer = self.buffer
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x.to(torch.bfloat16), topk_idx, self.low_latency_max_tokens, self.num_experts, use_fp8=self.fp8,
            round_scale=self.fp8_round_scale)
        # Each source sends this rank at most M * min(K, L) (token, expert) pairs: a fixed bound
        # that shrinks the packed GEMMs without a host sync.
        bound = self.ep_size * self.low_latency_max_tokens * min(self.top_k, self.num_local_experts)
        y = self.experts.forward_masked(recv_x, recv_count, max_valid_rows=bound)
        combined, _, _ = buffer.low_latency_combine(y.to(torch.bfloat16), topk_idx, topk_weights, handle)
        return combined

    def _local_decode(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """EP size 1 decode on the masked layout, built on the device: no host sync."""
        num_tokens, k = topk_idx.shape
        # An expert takes a token at most once (routers pick distinct experts), so M slots do.
        slots = self.low_latency_max_tokens
        valid = topk_idx >= 0
        expert = torch.where(valid, topk_idx, 0).flatten()
        onehot = (expert.unsqueeze(1) == torch.arange(self.num_experts, device=x.device)) & valid.flatten().unsqueeze(1)
        slot = (onehot.to(torch.int64).cumsum(0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)
        counts = onehot.sum(0).to(torch.int32)
        # A duplicated expert id in one token's row would overflow its block: such copies are dropped.
        kept = valid.flatten() & (slot < slots)
        target = torch.where(kept, expert * slots + slot, self.num_experts * slots)
        token = torch.arange(num_tokens * k, device=x.device) // k
        payload = self._activations(x)
        parts = list(payload) if isinstance(payload, tuple) else [payload]
        masked = []
        for part in parts:
            # Copy FP8 as bytes: index_copy_ has no float8 kernel on every device.
            raw = part.view(torch.uint8) if part.dtype == torch.float8_e4m3fn else part
            flat = torch.zeros((self.num_experts * slots + 1, part.shape[1]), dtype=raw.dtype, device=x.device)
            flat.index_copy_(0, target, raw.index_select(0, token))
            masked.append(flat[:-1].view(part.dtype).view(self.num_experts, slots, part.shape[1]))
        y = self.experts.forward_masked(tuple(masked) if len(masked) == 2 else masked[0], counts,
                                        max_valid_rows=num_tokens * k)
        picked = y.reshape(-1, self.hidden_size).index_select(0, torch.where(kept, target, 0))
        weights = torch.where(kept.view(num_tokens, k), topk_weights, 0.0).view(num_tokens, k, 1)
        return (picked.float().view(num_tokens, k, self.hidden_size) * weights).sum(1)

    def extra_repr(self) -> str:
        return (f"ep_size={self.ep_size}, num_local_experts={self.num_local_experts}, fp8={self.fp8}, "
                f"phase={self.phase!r}, low_latency_max_tokens={self.low_latency_max_tokens}")


def set_phase(model: nn.Module, phase: str) -> None:
    """Set the phase of every ExpertParallelMoE in ``model``."""
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            module.phase = phase
