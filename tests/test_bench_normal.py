"""``python -m moe_ep.bench normal`` runs end to end on 2 CPU ranks at tiny sizes: every swept op
and both reference rows land in normal.json, and its correctness guard passes. No timing is
asserted (a benchmark measures)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = {"dispatch_fp8", "dispatch_bf16", "dispatch_bf16_routed", "combine_bf16"}


def _bench(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "moe_ep.bench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_list_names_every_target_one_per_line():
    proc = _bench(["--list"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["layer", "normal", "ll", "loopback"]


def test_loopback_without_gpu_says_why():
    """The loopback target needs one GPU (its ranks are threads on it): without one (this helper
    hides the GPUs) it exits non-zero with the reason."""
    proc = _bench(["loopback", "--out", "/nonexistent-never-written"])
    assert proc.returncode != 0
    assert "loopback needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("args,message", [(["--ranks", "1"], "--ranks must be in [2, 8], got 1"),
                                          (["--sms", "7"], "--sms: every SM count must be even"),
                                          (["--send-warps", "5"], "--send-warps: each value must be one of"),
                                          (["--direct-send-warps", "16"], "--direct-send-warps: each value must be one of"),
                                          (["--recv-pool", "-1"], "--recv-pool must be >= 0 bytes"),
                                          (["--experts", "255"], "--experts must be divisible by --ranks 2")])
def test_loopback_names_a_bad_option(args, message):
    proc = _bench(["loopback", "--out", "/nonexistent-never-written", *args])
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


def test_normal_cpu_smoke(tmp_path):
    # --recv-pool is for the intranode kernels: on CPU ranks (reference backend) it adds nothing.
    proc = _bench(["normal", "--out", str(tmp_path), "--tokens", "64", "--hidden", "256", "--experts", "16",
                   "--top-k", "4", "--sms", "4,8", "--chunks", "6", "--iters", "2", "--recv-pool", str(1 << 20)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS" in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "normal.json").read_text())
    assert report["world_size"] == 2 and report["dist_backend"] == "gloo"
    assert report["buffer_backend"] == "reference" and report["direct"] is None
    assert report["correctness"]["pass"] is True
    assert report["settings"]["tokens"] == 64 and report["settings"]["chunks"] == [6]
    rows = report["rows"]
    assert {(row["op"], row["sms"]) for row in rows} == {(op, sms) for op in OPS for sms in (4, 8)}
    for row in rows:
        assert row["chunk"] == 6
        assert len(row["us_per_rank"]) == len(row["gbps_per_rank"]) == 2
        assert row["us"] == pytest.approx(max(row["us_per_rank"]))
        assert row["gbps"] == pytest.approx(min(row["gbps_per_rank"]))
    # FP8 moves (1 + 4/128) / 2 of the BF16 bytes: the same rows, counted DeepEP's way.
    by_op = {row["op"]: row for row in rows if row["sms"] == 4}
    recv_rows = report["recv_rows_per_rank"]
    assert by_op["dispatch_bf16"]["bytes_per_rank"] == [n * 256 * 2 for n in recv_rows]
    assert by_op["combine_bf16"]["bytes_per_rank"] == by_op["dispatch_bf16"]["bytes_per_rank"]
    assert by_op["dispatch_fp8"]["bytes_per_rank"] == [int(n * 256 * 2 * (1 + 4 / 128) / 2) for n in recv_rows]
    refs = {row["op"]: row for row in report["reference_rows"]}
    assert set(refs) == {"gloo all_to_all_single", "local copy"}
    assert refs["gloo all_to_all_single"]["bytes_per_rank"] == by_op["dispatch_bf16"]["bytes_per_rank"]
    assert all(row["gbps"] > 0 for row in report["reference_rows"])
    # The summary: per SM budget, each op's fastest row within it (JSON keys are strings).
    best = report["best_within_sms"]
    assert sorted(int(b) for b in best) == [4, 8]
    for op in OPS:
        assert best["4"][op]["gbps"] == max(r["gbps"] for r in rows if r["op"] == op and r["sms"] <= 4)
        assert best["8"][op]["gbps"] == max(r["gbps"] for r in rows if r["op"] == op)
    assert "best within an SM budget" in proc.stdout and "peer" not in proc.stdout.split("best within")[1]


def test_best_within_sms_picks_the_fastest_valid_row_per_budget(capsys):
    from moe_ep.bench_normal import _print_best, best_within_sms

    def row(op, sms, gbps, chunk=4):
        return {"op": op, "sms": sms, "chunk": chunk, "gbps": gbps, "us": 1e3 / gbps}
    rows = [row("dispatch_bf16", 12, 300.0), row("dispatch_bf16", 12, 320.0, chunk=8), row("dispatch_bf16", 24, 310.0),
            row("dispatch_bf16", 24, 500.0), row("dispatch_bf16_no_copy_out", 12, 900.0),
            row("dispatch_bf16_direct", 24, 700.0), {"op": "local copy", "sms": None, "chunk": None, "gbps": 4000.0,
                                                     "us": 1.0}]
    best = best_within_sms(rows)
    assert sorted(best) == [12, 24]
    assert best[12] == {"dispatch_bf16": {"gbps": 320.0, "us": 1e3 / 320.0, "sms": 12, "chunk": 8}}
    assert best[24]["dispatch_bf16"]["gbps"] == 500.0 and best[24]["dispatch_bf16_direct"]["gbps"] == 700.0
    assert "dispatch_bf16_no_copy_out" not in best[24]  # a diagnostic with invalid outputs
    # The peer's quoted figures appear only at its settings on 2 ranks.
    settings = {"tokens": 4096, "hidden": 7168, "top_k": 8, "experts": 256}
    _print_best({"best_within_sms": best, "settings": settings, "world_size": 2})
    out = capsys.readouterr().out
    assert "320.0 (peer 161)" in out and "700.0 (peer 341)" in out and "DeepEP V1" in out
    _print_best({"best_within_sms": best, "settings": {**settings, "tokens": 64}, "world_size": 2})
    assert "peer" not in capsys.readouterr().out


def test_normal_cpu_at_four_ranks(tmp_path):
    """Issue 6 runs the benchmarks on 4 and 8 GPUs: their own logic (rows, byte counts per rank,
    the summary) at more than 2 ranks, here with 4 gloo CPU ranks."""
    proc = _bench(["normal", "--ranks", "4", "--out", str(tmp_path), "--tokens", "32", "--hidden", "256",
                   "--experts", "16", "--top-k", "4", "--sms", "4", "--chunks", "6", "--iters", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "normal.json").read_text())
    assert report["world_size"] == 4 and report["correctness"]["pass"] is True
    recv_rows = report["recv_rows_per_rank"]
    assert len(recv_rows) == 4
    for row in report["rows"]:
        assert len(row["us_per_rank"]) == len(row["gbps_per_rank"]) == 4
    bf16 = next(r for r in report["rows"] if r["op"] == "dispatch_bf16")
    assert bf16["bytes_per_rank"] == [n * 256 * 2 for n in recv_rows]


@pytest.mark.parametrize("target", ["normal", "ll"])
def test_cpu_ranks_bound(target):
    proc = _bench([target, "--ranks", "9", "--out", "/nonexistent-never-written"])
    assert proc.returncode != 0
    assert "--ranks must be in [1, 8] for CPU ranks, got 9" in proc.stderr, proc.stderr[-2000:]
