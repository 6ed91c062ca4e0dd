"""A tiny 2-rank low-latency dispatch/combine run, for compute-sanitizer
(tests/test_cuda_low_latency.py::test_compute_sanitizer_reports_no_errors)::

    python tests/ll_sanitizer_case.py     # exit status 0 and an OK line: every check passed

Two ranks, spawned with torch.multiprocessing, form a gloo group and share cuda:0 (rank r uses
cuda:(r % device_count)). Each runs the SANITIZER_CASES of tests/test_cuda_low_latency.py (M = 8,
8 experts, top-2: bf16 at hidden 256, FP8 at 256, UE8M0 at 512 with a rank that has no tokens;
each case REPS times on one LowLatencyEngine, so both result buffers are used and the receive
hooks and combine modes (plain, zero-copy, out=, strided out=) cycle), then two dispatches in
flight, with the same oracle checks as the pytest file, so a kernel that is quiet under the
sanitizer but wrong still fails.
"""
from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # spawned ranks inherit sys.path: they import tests.* and moe_ep
    sys.path.insert(0, REPO_ROOT)

WORLD_SIZE = 2
SEED = 20250923


def _rank_main(rank: int, world_size: int, port: int) -> None:
    from tests.sanitizer import finish_rank, shared_gpu_rank
    from tests.test_cuda_low_latency import REPS, SANITIZER_BYTES, SANITIZER_CASES, engine_for, run_case

    ctx = shared_gpu_rank(rank, world_size, port)
    engine = engine_for(ctx, SANITIZER_BYTES)
    runs = 0
    for i, case in enumerate(SANITIZER_CASES):
        for rep in range(REPS):
            run_case(ctx, engine, case, SEED + 101 * i + 7 * rep, rep, f"{case.name} (run {rep + 1} of {REPS})")
            runs += 1
    # Two micro-batches in flight: both buffers hold live results at once, hooks in reverse order.
    from tests import oracle
    from tests.test_cuda_low_latency import (FORMATS, case_world, check_recv, check_within_limits, ensure_layout,
                                             expected_combine, on, sync)

    case = SANITIZER_CASES[1]
    use_fp8, round_scale, use_ue8m0 = FORMATS[case.fmt]
    worlds = [case_world(case, world_size, SEED + 999 + j) for j in range(2)]
    for w in worlds:
        check_within_limits(w, case.m)
    ensure_layout(ctx, engine, (case.m, case.hidden, worlds[0].num_experts, case.num_topk, use_fp8, use_ue8m0))
    inputs = [on(ctx, (w.xs[rank], w.topk_idx[rank], w.topk_weights[rank])) for w in worlds]
    got = [engine.dispatch(x, idx, case.m, w.num_experts, None, use_fp8, round_scale, use_ue8m0, True)
           for w, (x, idx, _) in zip(worlds, inputs)]
    for j in (1, 0):
        got[j][3]()
    sync(ctx)
    for j, (w, (recv_x, recv_count, handle, _)) in enumerate(zip(worlds, got)):
        check_recv(ctx, w, case.m, (recv_x, recv_count, handle), case.fmt, f"in flight {j}: dispatch")
        outputs = oracle.ll_expert_outputs(recv_x, recv_count.cpu(), rank, w.num_local_experts, use_fp8, use_ue8m0)
        expected = expected_combine(ctx, w, outputs, handle[1], case.fmt)
        combined, _ = engine.combine(on(ctx, outputs), inputs[j][1], inputs[j][2], handle, None, False)
        sync(ctx)
        oracle.assert_close(combined, expected, f"in flight {j}: combined_x")
        runs += 1
    finish_rank(f"rank {rank}: {runs} low-latency runs checked")


def main() -> int:
    from tests.sanitizer import spawn_ranks
    from tests.test_cuda_low_latency import SANITIZER_OK_LINE

    return spawn_ranks(_rank_main, WORLD_SIZE, SANITIZER_OK_LINE)


if __name__ == "__main__":
    sys.exit(main())
