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
