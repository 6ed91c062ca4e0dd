"""The cuda backend: the extension ``moe_ep._C``'s kernels where this build has them, the
reference backend for every other call.

Kernels come in families (one ``csrc/*.cu`` file each); the extension lists the families it was
built with in ``moe_ep._C.kernel_families``. A call runs a kernel when its family is in the build
and this class has a kernel path for it; otherwise it is inherited from :class:`ReferenceBackend`,
so results are the same either way (the reference is the specification).
"""
from __future__ import annotations

import os

import torch

from ..errors import translate_device_errors
from ..ipc import IntranodeBufferError
from .reference import ReferenceBackend

# Every backend call the Buffer makes, with the kernel family that will implement it.
CALL_FAMILIES: dict[str, str] = {
    "get_dispatch_layout": "layout",
    "dispatch": "intranode",
    "combine": "intranode",
    "low_latency_dispatch": "low_latency",
    "low_latency_combine": "low_latency",
}


# Families whose kernels have passed the GPU tests run by default; the others only when named in
# MOE_EP_EXPERIMENTAL_KERNELS (comma-separated), e.g. MOE_EP_EXPERIMENTAL_KERNELS=low_latency.
VERIFIED_FAMILIES = ("layout", "intranode", "low_latency")
EXPERIMENTAL_ENV = "MOE_EP_EXPERIMENTAL_KERNELS"


def enabled_families(built: tuple[str, ...]) -> tuple[str, ...]:
    """The built families the backend may use: verified ones, plus experimental ones opted into."""
    opted = {name.strip() for name in os.environ.get(EXPERIMENTAL_ENV, "").split(",") if name.strip()}
    return tuple(f for f in built if f in VERIFIED_FAMILIES or f in opted)


class CudaBackend(ReferenceBackend):
    """Built by ``Buffer`` as ``CudaBackend(buffer)`` for groups whose tensors are on a GPU."""

    name = "cuda"
    # Calls this class has a kernel path for (the others are inherited from the reference).
    KERNEL_PATHS: tuple[str, ...] = ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch",
                                      "low_latency_combine")

    def __init__(self, buffer, extension=None) -> None:
        super().__init__(buffer.group, buffer.device)
        if extension is None:
            from .. import buffer as buffer_module
            extension = buffer_module._load_extension()
        if extension is None:
            raise RuntimeError("CudaBackend needs the CUDA extension moe_ep._C; it is not built")
        self.ext = extension
        self.kernel_families: tuple[str, ...] = enabled_families(tuple(getattr(extension, "kernel_families", ())))
        self._layout_max_ranks = int(getattr(extension, "layout_max_ranks", 64))
        self._layout_max_experts = int(getattr(extension, "layout_max_experts", 0))
        calls = [call for call in self.KERNEL_PATHS if CALL_FAMILIES[call] in self.kernel_families]
        if "get_dispatch_layout" in calls and self.num_ranks > self._layout_max_ranks:
            calls.remove("get_dispatch_layout")  # the layout kernel keeps a rank mask of 64 bits
        self.intranode = None
        notes = []
        if "dispatch" in calls:
            self.intranode, note = self._open_intranode(buffer)
            if self.intranode is None:
                calls = [c for c in calls if CALL_FAMILIES[c] != "intranode"]
                notes.append(note)
        if "low_latency_dispatch" in calls:
            engine, note = self._open_low_latency(buffer)
            if engine is None:
                calls = [c for c in calls if CALL_FAMILIES[c] != "low_latency"]
                notes.append(note)
            else:
                self.low_latency = engine  # the reference's LowLatencyState, replaced by the kernels
        self.intranode_note = "; ".join(n for n in notes if n)
        self.kernel_calls: tuple[str, ...] = tuple(calls)
        self.reference_calls: tuple[str, ...] = tuple(c for c in CALL_FAMILIES if c not in self.kernel_calls)

    def _open_intranode(self, buffer):
        """The intranode kernels need a shared buffer (num_nvl_bytes > 0) and every rank on one node.
        The decision is the same on every rank: num_nvl_bytes is (as in DeepEP) passed alike, and
        open_intranode_buffer raises on every rank when any rank cannot join."""
        if buffer.num_nvl_bytes <= 0:
            return None, "num_nvl_bytes=0 (pass num_nvl_bytes > 0 for the intranode kernels)"
        if self.num_ranks > int(getattr(self.ext, "intranode_max_ranks", 64)):
            return None, f"{self.num_ranks} ranks exceed the intranode kernels' {self.ext.intranode_max_ranks}"
        from .intranode import IntranodeEngine
        try:
            with translate_device_errors("Buffer (opening the intranode buffer)"):
                return IntranodeEngine(self.group, self.device, buffer.num_nvl_bytes,
                                       recv_pool_bytes=getattr(buffer, "recv_pool_bytes", None)), ""
        except IntranodeBufferError as exc:
            return None, f"the intranode buffer could not be opened ({exc})"

    def _open_low_latency(self, buffer):
        """The low-latency kernels need low_latency_mode=True and num_rdma_bytes > 0 (the same on
        every rank, as in DeepEP); across hosts they need NVSHMEM (moe_ep._nvshmem). Where the
        transport was chosen automatically and NVSHMEM is missing, the calls fall back to the
        reference and describe() says why and how to enable it; MOE_EP_LL_TRANSPORT=nvshmem raises."""
        if not buffer.low_latency_mode or buffer.num_rdma_bytes <= 0:
            return None, "low-latency kernels need low_latency_mode=True and num_rdma_bytes > 0"
        from ..nvshmem import NvshmemUnavailable
        from .low_latency import TRANSPORT_ENV, LowLatencyEngine
        try:
            with translate_device_errors("Buffer (opening the low-latency buffer)"):
                return LowLatencyEngine(self.group, self.device, buffer.num_rdma_bytes), ""
        except IntranodeBufferError as exc:
            return None, f"the low-latency buffer could not be opened ({exc})"
        except NvshmemUnavailable as exc:
            if os.environ.get(TRANSPORT_ENV, "auto") == "nvshmem":
                raise
            return None, f"the low-latency kernels need NVSHMEM across hosts ({exc})"

    def uses_kernel(self, call: str) -> bool:
        """Whether ``call`` (a name in ``CALL_FAMILIES``) runs a CUDA kernel on this backend."""
        if call not in CALL_FAMILIES:
            raise ValueError(f"call must be one of {', '.join(CALL_FAMILIES)}; got {call!r}")
        return call in self.kernel_calls

    def describe(self) -> str:
        """One line: which calls run kernels and which fall back to the reference."""
        kernels = ", ".join(self.kernel_calls) or "none"
        reference = ", ".join(self.reference_calls) or "none"
        note = f" ({self.intranode_note})" if self.intranode_note else ""
        return (f"moe_ep: using the cuda backend (kernel families: {', '.join(self.kernel_families) or 'none'}): "
                f"CUDA kernels for {kernels}; reference (torch.distributed) for {reference}{note}")

    def checks_expert_ids(self, call: str, topk_idx: torch.Tensor, num_experts: int) -> bool:
        """Whether ``call`` checks topk_idx's values on its kernel path, so the Buffer need not read
        them on the host (a synchronisation): the layout and low-latency kernels trap with a line
        naming the entry; the intranode dispatch reads the ids' range after its host wait."""
        if call == "get_dispatch_layout":
            return self._layout_runs_kernel(topk_idx, num_experts)
        if call == "dispatch":
            return self.intranode is not None and topk_idx.is_cuda
        return call.startswith("low_latency") and call in self.kernel_calls

    # ---------------------------------------------------------------- layout
    def _layout_runs_kernel(self, topk_idx: torch.Tensor, num_experts: int) -> bool:
        return ("get_dispatch_layout" in self.kernel_calls and topk_idx.is_cuda
                and not (self._layout_max_experts and num_experts > self._layout_max_experts))

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        if not self._layout_runs_kernel(topk_idx, num_experts):
            return super().get_dispatch_layout(topk_idx, num_experts)
        per_rank, per_expert, in_rank = self.ext.get_dispatch_layout(topk_idx.contiguous(), num_experts,
                                                                     self.num_ranks)
        return per_rank, None, per_expert, in_rank

    # ---------------------------------------------------------------- dispatch / combine
    def dispatch(self, x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                 expert_alignment: int, num_worst_tokens: int, num_experts):
        if self.intranode is None or (handle is not None and not self._is_kernel_handle(handle)):
            return super().dispatch(x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                                    expert_alignment, num_worst_tokens, num_experts)
        self.intranode.num_sms = self.num_sms
        return self.intranode.dispatch(x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                                       expert_alignment, num_worst_tokens, num_experts)

    def empty_combine_input(self, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        if self.intranode is None:
            return super().empty_combine_input(num_rows, hidden, dtype)
        return self.intranode.empty_combine_input(num_rows, hidden, dtype)

    def combine(self, x, handle, topk_weights, biases):
        if self.intranode is None or not self._is_kernel_handle(handle):
            return super().combine(x, handle, topk_weights, biases)
        self.intranode.num_sms = self.num_sms
        return self.intranode.combine(x, handle, topk_weights, biases)

    @staticmethod
    def _is_kernel_handle(handle) -> bool:
        from .intranode import IntranodeRouting
        return isinstance(handle[3], IntranodeRouting)
