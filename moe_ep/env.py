"""Every environment setting moe_ep reads, in one table.

Why: the settings are read where they act (the build, an engine, a launch), so nothing else lists
them; a misspelled ``MOE_EP_*`` name would be ignored without a word. ``python -m moe_ep info``
prints this table with the values in effect and names any ``MOE_EP_*`` variable that moe_ep does
not read. A CPU test keeps the table equal to the names the code reads (tests/test_env.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

PREFIX = "MOE_EP_"


@dataclass(frozen=True)
class Setting:
    name: str
    default: str   # what an unset variable means
    read: str      # when: "build" (setup.py), "engine" (a Buffer/engine is built), "call", "tests"
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ build (setup.py)
    Setting("TORCH_CUDA_ARCH_LIST", "9.0", "build", "GPU architectures the extension is compiled for"),
    Setting("DISABLE_SM90_FEATURES", "0", "build", "1: an sm_80 build without Hopper-only instructions"),
    Setting("TORCH_CUDA_ARCH_LIST_SM80", "8.0", "build", "the architectures of a DISABLE_SM90_FEATURES=1 build"),
    Setting("DISABLE_AGGRESSIVE_PTX_INSTRS", "0", "build", "1: no non-portable load/store forms"),
    Setting("NVSHMEM_DIR", "the nvidia-nvshmem-cu13 wheel", "build", "where NVSHMEM's include/ and lib/ are"),
    Setting("MOE_EP_SKIP_CUDA", "0", "build", "1: build no extension (the package runs the reference backend)"),
    Setting("MOE_EP_SKIP_NVSHMEM", "0", "build", "1: skip moe_ep._nvshmem (the put path and cross-node runtime)"),
    # ------------------------------------------------------------------ kernels in use
    Setting("MOE_EP_EXPERIMENTAL_KERNELS", "", "engine",
            "comma-separated kernel families to use before their 2-GPU verification (none today)"),
    Setting("MOE_EP_TIMEOUT_S", "100", "call", "seconds a device-side wait may last before it reports and traps"),
    # ------------------------------------------------------------------ intranode (normal) kernels
    Setting("MOE_EP_INTRANODE_UNROLL", "8", "engine", "rows in flight per warp in the transfer (4, 8, 16)"),
    Setting("MOE_EP_INTRANODE_CHUNK_ROWS", "4", "engine", "rows per flag (4, 8, 16, 32, 64)"),
    Setting("MOE_EP_INTRANODE_SEND_WARPS", "6", "engine", "dispatch sender warps of each block's 16"),
    Setting("MOE_EP_INTRANODE_COMBINE_SEND_WARPS", "4", "engine", "combine sender warps of each block's 16"),
    Setting("MOE_EP_INTRANODE_COMBINE_STAGED_VECTORS", "16", "engine",
            "combine: 16-byte vectors per lane staged in shared memory (0 = registers)"),
    Setting("MOE_EP_INTRANODE_DIRECT_SEND_WARPS", "0 (8 for 2 ranks, 12 for more)", "engine",
            "dispatch sender warps with a receive pool"),
    Setting("MOE_EP_RECV_POOL_BYTES", "0 (off; the layers size one themselves)", "engine",
            "bytes per rank of the receive pool: dispatch outputs the peers store into directly"),
    Setting("MOE_EP_COMBINE_PULL", "1", "engine", "0: push a pool-resident combine input instead of letting peers pull it"),
    # ------------------------------------------------------------------ low-latency kernels
    Setting("MOE_EP_LL_TRANSPORT", "auto", "engine", "ipc, nvshmem or auto (nvshmem when the group spans hosts)"),
    Setting("MOE_EP_NVSHMEM_PUTS", "auto", "engine", "ranks reached by NVSHMEM puts instead of stores: auto, all, or a list of ranks"),
    Setting("MOE_EP_LL_FUSED", "1", "engine", "0: send and receive halves as two kernels even without a hook"),
    Setting("MOE_EP_LL_COMBINE_PARTIALS", "bfloat16", "engine", "float32: the combine's partial sums unrounded, twice the bytes"),
    Setting("MOE_EP_LL_SEND", "direct", "call", "staged: the FP8 send casts each token through shared memory"),
    Setting("MOE_EP_LL_FUSED_ORDER", "layout_first", "call",
            "publish_first: a fused dispatch block publishes its rows before laying out its receive"),
    # ------------------------------------------------------------------ the test suite
    Setting("MOE_EP_TEST_BACKEND", "gloo", "tests", "nccl: run the CPU-marked tests over NCCL on GPUs"),
    Setting("MOE_EP_TEST_NVSHMEM_SHARED_GPU", "0", "tests", "1: also try two NVSHMEM ranks on one GPU"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def unknown_settings(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """``MOE_EP_*`` variables set in ``environ`` that moe_ep never reads (likely typos)."""
    environ = os.environ if environ is None else environ
    return sorted(name for name in environ if name.startswith(PREFIX) and name not in BY_NAME)


def rows(environ: Optional[Mapping[str, str]] = None) -> list[dict]:
    """One dict per setting: name, value (None when unset), default, read, meaning."""
    environ = os.environ if environ is None else environ
    return [{"name": s.name, "value": environ.get(s.name), "default": s.default, "read": s.read,
             "meaning": s.meaning} for s in SETTINGS]
