"""The low-latency kernels' phase trace, as the benchmarks report it (``bench loopback --trace``,
``bench ll --trace``).

Why: a kernel's time alone does not say which of its phases (waiting for a peer, routing, copying,
publishing) holds it up. With ``LowLatencyEngine.enable_trace`` thread 0 of every block stores
``%globaltimer`` at each phase boundary (``csrc/low_latency.cu``, ``TraceKernel``); here those
stamps become "µs after the call started", the mean over blocks and the last block, averaged over
iterations. On one GPU every rank reads the same clock (``shared_clock``: one origin for all ranks,
so a receive's wait for a peer shows); on several GPUs each rank is measured from its own start.
"""
from __future__ import annotations

from typing import Callable

import torch

TRACE_ITERS = 20
# Kernel rows of the trace and the events each records, in order (csrc/low_latency.cu TraceKernel).
# A fused dispatch block publishes between its receive's "layout" and "copied" (MOE_EP_LL_FUSED_ORDER).
TRACE_EVENTS = (("dispatch send", ("start", "histogram", "routed", "stored", "published")),
                ("dispatch recv", ("start", "counts in", "layout", "copied")),
                ("combine send", ("start", "weights out", "weights in", "sums stored", "published")),
                ("combine recv", ("start", "flags in", "written")))


def traced_iterations(engine, run_one: Callable[[], object]) -> list[torch.Tensor]:
    """TRACE_ITERS calls of ``run_one`` (one timed dispatch + combine, synchronized) with the engine's
    trace on; each one's trace (int64 ns, on the CPU). The trace is off again afterwards."""
    trace = engine.enable_trace()
    samples = []
    try:
        for _ in range(TRACE_ITERS):
            trace.zero_()
            run_one()
            torch.cuda.synchronize(trace.device)
            samples.append(trace.cpu())
    finally:
        engine.trace = None
    return samples


def _dispatch_start(trace: torch.Tensor) -> float:
    starts = trace[0, :, 0][trace[0, :, 0] > 0]
    return float(starts.min()) if starts.numel() else float("inf")


def trace_summary(per_rank: list[list[torch.Tensor]], shared_clock: bool) -> dict:
    """{"rank r": {kernel: {"blocks": n, event: [mean over blocks, last block]}}} in µs after the
    first dispatch-send block started (of any rank with ``shared_clock``, else of rank r),
    averaged over the iterations; kernels no block ran are left out."""
    out: dict = {}
    iters = len(per_rank[0])
    for it in range(iters):
        traces = [samples[it].double() for samples in per_rank]
        origins = [_dispatch_start(t) for t in traces]
        if shared_clock:
            origins = [min(origins)] * len(traces)
        for rank, (t, t0) in enumerate(zip(traces, origins)):
            for k, (kernel, events) in enumerate(TRACE_EVENTS):
                ran = t[k, :, 0] > 0
                if not bool(ran.any()) or t0 == float("inf"):
                    continue
                rows = (t[k][ran][:, :len(events)] - t0) / 1e3
                cell = out.setdefault(f"rank {rank}", {}).setdefault(kernel, {"blocks": int(ran.sum())})
                for e, name in enumerate(events):
                    mean_last = cell.setdefault(name, [0.0, 0.0])
                    mean_last[0] += float(rows[:, e].mean()) / iters
                    mean_last[1] += float(rows[:, e].max()) / iters
    return out


def print_trace(by_tokens: dict, origin: str) -> None:
    """The summaries of ``trace_summary`` per tokens-per-rank point, one line per rank and kernel."""
    for tokens, per_rank in by_tokens.items():
        print(f"trace at {tokens} tokens/rank ({origin}; mean over blocks / last block; {TRACE_ITERS} iterations):")
        for rank, kernels in per_rank.items():
            for kernel, cell in kernels.items():
                phases = "  ".join(f"{name} {v[0]:.1f}/{v[1]:.1f}" for name, v in cell.items() if name != "blocks")
                print(f"  {rank} {kernel:<14}({cell['blocks']:>3} blocks)  {phases}")
