"""A tiny 2-rank intranode dispatch/combine run, for compute-sanitizer
(tests/test_cuda_intranode.py::test_compute_sanitizer_reports_no_errors)::

    python tests/intranode_sanitizer_case.py     # exit status 0: every check passed

Two ranks, spawned with torch.multiprocessing, form a gloo group and share cuda:0 (rank r uses
cuda:(r % device_count)). Each runs the SANITIZER_CASES of tests/test_cuda_intranode.py (17 tokens,
hidden 256, 8 experts, top-2: bf16 with a cached dispatch, FP8 in worst-token mode, a rank with
no tokens; each case twice, each dispatch followed by a combine) on one IntranodeEngine, then
each once more on an engine with a receive pool (peers store into the outputs: the direct
protocol's kernel) and once with combine's inputs in that pool (peers read them in place), with the same oracle checks as the pytest file, so a kernel that is quiet
under the sanitizer but wrong still fails.
"""
from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # spawned ranks inherit sys.path: they import tests.* and moe_ep
    sys.path.insert(0, REPO_ROOT)

WORLD_SIZE = 2
SEED = 20250917


def _rank_main(rank: int, world_size: int, port: int) -> None:
    from tests.sanitizer import finish_rank, shared_gpu_rank
    from tests.test_cuda_intranode import SANITIZER_CASES, SANITIZER_NVL_BYTES, engine_for, run_case

    ctx = shared_gpu_rank(rank, world_size, port)
    engine = engine_for(ctx, SANITIZER_NVL_BYTES)
    for i, case in enumerate(SANITIZER_CASES):
        for rep in range(2):
            run_case(ctx, engine, case, SEED + 101 * i + 7 * rep, f"{case.name} (run {rep + 1} of 2)")
    pooled = engine_for(ctx, SANITIZER_NVL_BYTES, recv_pool_bytes=SANITIZER_NVL_BYTES)
    for i, case in enumerate(SANITIZER_CASES):
        run_case(ctx, pooled, case, SEED + 101 * i + 3, f"{case.name} (receive pool)")
        run_case(ctx, pooled, case, SEED + 101 * i + 5, f"{case.name} (receive pool, combine read in place)", "pool")
    assert pooled.direct_calls > 0, "the receive-pool runs never went direct"
    assert pooled.pull_calls > 0, "no combine was read in place"
    finish_rank(f"rank {rank}: {len(SANITIZER_CASES) * 4} runs checked")


def main() -> int:
    from tests.sanitizer import spawn_ranks
    from tests.test_cuda_intranode import SANITIZER_OK_LINE

    return spawn_ranks(_rank_main, WORLD_SIZE, SANITIZER_OK_LINE)


if __name__ == "__main__":
    sys.exit(main())
