"""``python -m moe_ep.bench ll`` runs end to end on 2 CPU ranks at tiny sizes: every (tokens,
backend, mode, op) row lands in ll.json, counted as DeepEP's low-latency test counts, the run
records which backend ran, and its correctness guard passes. No timing is asserted (a benchmark
measures)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.autograd.profiler_util import Kernel

from moe_ep.bench import StepTimer, step_kernels
from tests.test_bench_normal import _bench

HIDDEN, TOP_K = 128, 2
OPS = {"eager": {"dispatch", "combine", "dispatch+combine"},
       "hook": {"dispatch_send", "dispatch_recv", "combine_send", "combine_recv"}}


def test_ll_cpu_smoke(tmp_path):
    proc = _bench(["ll", "--out", str(tmp_path), "--tokens", "3", "--hidden", str(HIDDEN), "--experts", "8",
                   "--top-k", str(TOP_K), "--iters", "2", "--sweep", "1,4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS" in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "ll.json").read_text())
    assert report["target"] == "ll" and report["world_size"] == 2 and report["dist_backend"] == "gloo"
    assert report["buffer_backend"] == "reference"
    assert report["buffer_uses_kernel"] == {"low_latency_dispatch": False, "low_latency_combine": False}
    assert "low_latency" in report["experimental_kernels_env"]["MOE_EP_EXPERIMENTAL_KERNELS"]
    assert report["baseline"]["backend"] == "reference" and report["baseline"]["how"]
    assert report["correctness"]["pass"] is True and report["correctness"]["recv_count_equal"] is True
    settings = report["settings"]
    assert settings["fp8"] is True and settings["sweep"] == [1, 4]
    assert settings["num_max_dispatch_tokens_per_rank"] == 4
    assert report["graph"].startswith("skipped")  # no CUDA graphs on CPU ranks

    points = (1, 3, 4)  # the sweep and --tokens
    rows = report["rows"]
    expected = {(t, backend, mode, op) for t in points for backend in ("buffer", "reference")
                for mode, ops in OPS.items() for op in ops}
    assert {(r["tokens"], r["backend"], r["mode"], r["op"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        assert len(row["us_per_rank"]) == 2 and row["us"] == pytest.approx(max(row["us_per_rank"]))
        if row["mode"] == "hook":
            assert row["gbps"] is None and row["bytes_per_rank"] is None
        else:
            assert row["gbps"] == pytest.approx(min(row["gbps_per_rank"]))

    # DeepEP's count: num_selections x (hidden + hidden/128 x 4) for FP8 dispatch, x hidden x 2 for combine.
    selections = {entry["tokens"]: entry["per_rank"] for entry in report["num_selections_per_rank"]}
    assert set(selections) == set(points)
    by_key = {(r["tokens"], r["backend"], r["op"]): r for r in rows if r["mode"] == "eager"}
    for t in points:
        assert all(0 < n < t * TOP_K for n in selections[t])  # at least one entry is set to -1
        for backend in ("buffer", "reference"):
            dispatch = by_key[t, backend, "dispatch"]["bytes_per_rank"]
            combine = by_key[t, backend, "combine"]["bytes_per_rank"]
            assert dispatch == [n * (HIDDEN + HIDDEN // 128 * 4) for n in selections[t]]
            assert combine == [n * HIDDEN * 2 for n in selections[t]]
            assert by_key[t, backend, "dispatch+combine"]["bytes_per_rank"] == [d + c for d, c in zip(dispatch, combine)]
    assert report["kernel_names"] == {}  # kernel-duration rows need the profiler's GPU records


class _Event:
    """A stand-in for torch.profiler's FunctionEvent: a name, where it ran, its kernels, its children."""

    def __init__(self, name, kernels=(), children=(), device_type="DeviceType.CPU"):
        self.name, self.device_type = name, device_type
        self.kernels = [Kernel(k, 0, us) for k, us in kernels]
        self.cpu_children = list(children)


def test_step_kernels_sums_each_range_and_its_children():
    """bench ll's kernel-duration rows: a step's time is its kernels' durations at any depth under
    its range, once per occurrence; the GPU-side copy of a range and other ranges are not counted."""
    launch = _Event("aten::empty", kernels=[("fill", 1.5)], children=[_Event("inner", kernels=[("copy", 0.25)])])
    events = [_Event("step_0", kernels=[("dispatch_kernel", 10.0)], children=[launch]),
              _Event("step_0", device_type="DeviceType.CUDA", kernels=[("dispatch_kernel", 10.0)]),
              _Event("other", kernels=[("nccl", 99.0)]),
              _Event("step_1", kernels=[("combine_kernel", 20.0)]),
              _Event("step_0", kernels=[("dispatch_kernel", 11.0)]),
              _Event("step_1")]  # a range whose kernels the profiler could not link
    found = step_kernels(events, ["step_0", "step_1"])
    assert found["step_0"] == [(11.75, ["dispatch_kernel", "fill", "copy"]), (11.0, ["dispatch_kernel"])]
    assert found["step_1"] == [(20.0, ["combine_kernel"]), (0.0, [])]


def test_kernel_times_needs_cuda():
    timer = StepTimer(torch.device("cpu"), None)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        timer.kernel_times([(lambda: None, False)], 1)
