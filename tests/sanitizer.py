"""compute-sanitizer runs of small multi-rank drivers, shared by the kernel families' GPU tests.

A driver (e.g. tests/intranode_sanitizer_case.py) spawns its ranks with :func:`spawn_ranks`; each
rank calls :func:`shared_gpu_rank` to join a gloo group on cuda:(rank % device_count), runs its
checks, and leaves through :func:`finish_rank`. A test calls :func:`assert_sanitizer_clean` with
the driver's path and the line the driver prints when every check passed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Optional

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZER_TIMEOUT_S = 900


def find_compute_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidate = os.path.join(root, "bin", "compute-sanitizer")
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def _text(output) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def assert_sanitizer_clean(tool: str, script: str, ok_line: str, timeout_s: float = SANITIZER_TIMEOUT_S) -> None:
    """Run ``python script`` under ``compute-sanitizer --tool tool`` (every process) and assert no
    errors, a clean exit, and the driver's OK line. Skips when compute-sanitizer is missing."""
    sanitizer = find_compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    # --require-cuda-init no: the parent process only spawns the ranks and never initializes CUDA.
    command = [sanitizer, "--tool", tool, "--target-processes", "all", "--require-cuda-init", "no",
               sys.executable, script]
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:  # its captured output is bytes whatever text= says
        tail = "\n".join(_text(part)[-4000:] for part in (exc.stdout, exc.stderr))
        pytest.fail(f"{' '.join(command)} ran past {timeout_s} s; output tail:\n{tail}")
    output = proc.stdout + proc.stderr
    # The sanitizer's first reports say where; the tail says how the run ended.
    first = [line for line in output.splitlines() if line.startswith("=========") and "Host Frame" not in line][:60]
    report = f"--- {' '.join(command)}: exit {proc.returncode}\n--- first sanitizer lines\n" + "\n".join(first) + \
             f"\n--- stdout (tail)\n{proc.stdout[-6000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"
    # memcheck ends with "ERROR SUMMARY: N errors"; racecheck with
    # "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)".
    pattern = r"ERROR SUMMARY: (\d+) errors?" if tool == "memcheck" else \
        r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?"
    summaries = re.findall(pattern, output)
    assert summaries, f"no summary line from compute-sanitizer {tool}:\n{report}"
    assert all(int(n) == 0 for n in summaries), f"compute-sanitizer {tool} found errors:\n{report}"
    assert proc.returncode == 0, f"the sanitized run failed:\n{report}"
    assert ok_line in proc.stdout, report


def shared_gpu_rank(rank: int, world_size: int, port: int):
    """Join the driver's gloo group on cuda:(rank % device_count): a tests.dist_pool.RankContext."""
    import torch
    import torch.distributed as dist

    from tests.dist_pool import RankContext

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return RankContext(rank, world_size, device, dist.group.WORLD, "gloo")


def finish_rank(message: str) -> None:
    """Synchronize, barrier (no rank unmaps its buffer while a peer may still use it), print, and
    leave without interpreter teardown, as moe_ep.launch does (tearing down gloo groups at exit
    sometimes aborts after all work is done; every rank has passed the barrier)."""
    import torch
    import torch.distributed as dist

    torch.cuda.synchronize()
    dist.barrier()
    print(message, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(rank_main: Callable[[int, int, int], None], world_size: int, ok_line: str) -> int:
    """Run ``rank_main(rank, world_size, port)`` on world_size spawned ranks; print ok_line after."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    # The parent hosts the rendezvous store, so no rank's exit can pull it from under the others.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    mp.start_processes(rank_main, args=(world_size, store.port), nprocs=world_size, start_method="spawn")
    del store
    print(ok_line, flush=True)
    return 0
