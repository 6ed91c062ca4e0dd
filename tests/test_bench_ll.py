"""``python -m moe_ep.bench ll`` runs end to end on 2 CPU ranks at tiny sizes: every (tokens,
backend, mode, op) row lands in ll.json, counted as DeepEP's low-latency test counts, the run
records which backend ran, and its correctness guard passes. No timing is asserted (a benchmark
measures)."""
from __future__ import annotations

import json

import pytest
from types import SimpleNamespace

import torch

from moe_ep.bench import MARKER_KERNEL, StepTimer, device_activities, step_kernels
from moe_ep.bench_ll import PEER, PEER_SETTINGS, TARGET_US, against_peer
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
    assert "MOE_EP_EXPERIMENTAL_KERNELS" in report["experimental_kernels_env"]  # recorded as the ranks had it
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
    assert report["against_peer"]["comparable"] is False  # 2 CPU ranks at tiny sizes
    assert [r["meets_target"] for r in report["against_peer"]["rows"]] == [None, None]
    assert "vs the peer at 3 tokens/rank" in proc.stdout


class _Event:
    """A stand-in for torch.profiler's FunctionEvent: a name, where it ran, when."""

    def __init__(self, name, start, duration, device_type="DeviceType.CUDA"):
        self.name, self.device_type, self.is_user_annotation = name, device_type, False
        self.time_range = SimpleNamespace(start=start, elapsed_us=lambda: duration)


def test_step_kernels_splits_the_timeline_at_the_markers():
    """bench ll's kernel-duration rows: a step's time is the GPU activities between its marker and
    the next _sleep kernel, per iteration; the head's all-reduce, pauses, host events and anything
    before the first marker are not counted; a marker count that does not fit the pattern raises."""
    spin = MARKER_KERNEL
    events = [_Event("ncclBarrier", 0, 5),                                   # before the first marker
              _Event("aten::add", 1, 3, device_type="DeviceType.CPU"),      # host event: ignored
              _Event(spin, 10, 100), _Event("ncclAllReduce", 111, 4),       # head
              _Event(spin, 120, 1), _Event("dispatch_kernel", 122, 18.5), _Event("Memset (Device)", 141, 0.5),
              _Event(spin, 150, 50),                                        # pause: nothing counted
              _Event(spin, 201, 1), _Event("recv_kernel", 203, 7),
              _Event(spin, 211, 1),                                         # end
              _Event(spin, 300, 100), _Event("ncclAllReduce", 401, 4),
              _Event(spin, 410, 1), _Event("dispatch_kernel", 412, 17.0),
              _Event(spin, 430, 50), _Event(spin, 481, 1), _Event("recv_kernel", 483, 6),
              _Event(spin, 490, 1), _Event("ncclBarrier", 492, 5)]
    activities = device_activities(reversed(events))  # sorted by start
    assert [a[2] for a in activities][:3] == ["ncclBarrier", spin, "ncclAllReduce"]
    pattern = ["head", 0, "pause", 1, "end"]
    found = step_kernels(activities, pattern, iters=2)
    assert found[0] == [(19.0, ["dispatch_kernel", "Memset (Device)"]), (17.0, ["dispatch_kernel"])]
    assert found[1] == [(7.0, ["recv_kernel"]), (6.0, ["recv_kernel"])]
    with pytest.raises(RuntimeError, match="marker kernels"):
        step_kernels(activities, pattern, iters=3)


def test_kernel_times_needs_cuda():
    timer = StepTimer(torch.device("cpu"), None)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        timer.kernel_times([(lambda: None, False)], 1)


def _report_with(world_size: int, tokens: int, us: dict) -> dict:
    settings = dict(PEER_SETTINGS, tokens=tokens)
    rows = [{"tokens": tokens, "backend": "buffer", "mode": mode, "op": op, "us": value}
            for (mode, op), value in us.items()]
    rows.append({"tokens": tokens, "backend": "reference", "mode": "kernels", "op": "dispatch", "us": 1.0})
    return {"world_size": world_size, "settings": settings, "rows": rows, "peer": PEER}


def test_against_peer_reads_the_kernel_rows_and_the_target():
    """The issue-5 summary: kernel durations (eager and graph) against the target, events beside
    them; only the peer's settings on 2 ranks are comparable; the reference's rows never count."""
    us = {("kernels", "dispatch"): 16.0, ("kernels-graph", "dispatch"): 15.8, ("eager", "dispatch"): 18.5,
          ("graph", "dispatch"): 18.1, ("kernels", "combine"): 27.0, ("kernels-graph", "combine"): 28.5,
          ("eager", "combine"): 30.0}
    summary = against_peer(_report_with(2, 128, us))
    assert summary["comparable"] is True and summary["tokens"] == 128
    dispatch, combine = summary["rows"]
    assert dispatch == {"op": "dispatch", "kernels_us": 16.0, "kernels_graph_us": 15.8, "eager_events_us": 18.5,
                        "graph_events_us": 18.1, "peer_us": PEER["dispatch_us"], "target_us": TARGET_US["dispatch"],
                        "meets_target": True}
    assert combine["meets_target"] is False  # graph replay over 28 µs
    assert combine["graph_events_us"] is None and combine["peer_us"] == PEER["combine_us"]
    assert against_peer(_report_with(1, 128, us))["comparable"] is False
    assert against_peer(_report_with(2, 32, us))["comparable"] is False
    no_kernels = against_peer(_report_with(2, 128, {("eager", "dispatch"): 18.5}))
    assert [r["meets_target"] for r in no_kernels["rows"]] == [None, None]


def test_ll_cpu_at_four_ranks(tmp_path):
    """The ll benchmark's rows and DeepEP-style byte counts at 4 ranks (gloo CPU ranks: issue 6
    runs it on 4 and 8 GPUs)."""
    proc = _bench(["ll", "--ranks", "4", "--out", str(tmp_path), "--tokens", "3", "--hidden", str(HIDDEN),
                   "--experts", "8", "--top-k", str(TOP_K), "--iters", "2", "--sweep", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS" in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "ll.json").read_text())
    assert report["world_size"] == 4 and report["correctness"]["pass"] is True
    selections = {entry["tokens"]: entry["per_rank"] for entry in report["num_selections_per_rank"]}
    assert all(len(per_rank) == 4 for per_rank in selections.values())
    for row in report["rows"]:
        assert len(row["us_per_rank"]) == 4
        if row["mode"] == "eager" and row["op"] == "combine":
            assert row["bytes_per_rank"] == [n * HIDDEN * 2 for n in selections[row["tokens"]]]
    assert report["against_peer"]["comparable"] is False
