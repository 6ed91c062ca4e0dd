"""CPU: the low-latency phase-trace summary (``bench loopback --trace``, ``bench ll --trace``) on
fabricated traces, whose answer is known: µs after the first dispatch block started (of any rank on
one clock, else of each rank), mean over the blocks that ran and the last block, averaged over
iterations; kernels no block ran are left out."""
from __future__ import annotations

import pytest
import torch

from moe_ep.bench_trace import TRACE_EVENTS, trace_summary

SHAPE = (4, 160, 5)  # csrc/low_latency.h: kTraceKernels, kTraceBlocks, kTraceEvents


def _trace(base_ns: int, blocks: int, step_ns: int, skip_kernel: int = -1) -> torch.Tensor:
    t = torch.zeros(SHAPE, dtype=torch.int64)
    for k, (_, events) in enumerate(TRACE_EVENTS):
        if k == skip_kernel:
            continue
        for b in range(blocks):
            for e in range(len(events)):
                # kernel k starts 10 µs after kernel k-1; block b 1 µs after block b-1; events step_ns apart
                t[k, b, e] = base_ns + k * 10_000 + b * 1_000 + e * step_ns
    return t


def test_trace_summary_means_and_last_blocks():
    rank0 = [_trace(5_000_000, 3, 500), _trace(9_000_000, 3, 500)]
    rank1 = [_trace(5_002_000, 2, 1_000, skip_kernel=3), _trace(9_002_000, 2, 1_000, skip_kernel=3)]
    got = trace_summary([rank0, rank1], shared_clock=True)
    r0, r1 = got["rank 0"], got["rank 1"]
    assert r0["dispatch send"]["blocks"] == 3 and r1["dispatch send"]["blocks"] == 2
    # rank 0, dispatch send start: blocks at 0, 1, 2 µs: mean 1, last 2
    assert r0["dispatch send"]["start"] == pytest.approx([1.0, 2.0])
    # rank 0, combine send published (event 4): kernel 2 -> +20 µs, 4 x 0.5 µs -> +2
    assert r0["combine send"]["published"] == pytest.approx([23.0, 24.0])
    # rank 1 starts 2 µs later; blocks at 0, 1 µs; events 1 µs apart: dispatch recv "copied" = 2 + 10 + 3 + [0.5, 1]
    assert r1["dispatch recv"]["copied"] == pytest.approx([15.5, 16.0])
    assert "combine recv" not in r1 and "combine recv" in r0
    assert set(r0["combine recv"]) == {"blocks", "start", "flags in", "written"}


def test_trace_summary_per_rank_clocks():
    """Several GPUs: each rank from its own first dispatch block (rank 1's clock is 1 s ahead)."""
    rank0 = [_trace(5_000_000, 3, 500)]
    rank1 = [_trace(1_005_002_000, 2, 1_000)]
    got = trace_summary([rank0, rank1], shared_clock=False)
    assert got["rank 0"]["dispatch send"]["start"] == pytest.approx([1.0, 2.0])
    assert got["rank 1"]["dispatch send"]["start"] == pytest.approx([0.5, 1.0])
    assert got["rank 1"]["dispatch recv"]["copied"] == pytest.approx([13.5, 14.0])
