"""A tiny 2-rank intranode dispatch/combine run, for compute-sanitizer
(tests/test_cuda_intranode.py::test_compute_sanitizer_reports_no_errors)::

    python tests/intranode_sanitizer_case.py     # exit status 0: every check passed

Two ranks, spawned with torch.multiprocessing, form a gloo group and share cuda:0 (rank r uses
cuda:(r % device_count)). Each runs the SANITIZER_CASES of tests/test_cuda_intranode.py (17 tokens,
hidden 256, 8 experts, top-2: bf16 with a cached dispatch, FP8 in worst-token mode, a rank with
no tokens; each case twice, each dispatch followed by a combine) on one IntranodeEngine, with the
same oracle checks as the pytest file, so a kernel that is quiet under the sanitizer but wrong
still fails.
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
    import torch
    import torch.distributed as dist

    from tests.dist_pool import RankContext
    from tests.test_cuda_intranode import SANITIZER_CASES, SANITIZER_NVL_BYTES, engine_for, run_case

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    ctx = RankContext(rank, world_size, device, dist.group.WORLD, "gloo")
    engine = engine_for(ctx, SANITIZER_NVL_BYTES)
    for i, case in enumerate(SANITIZER_CASES):
        for rep in range(2):
            run_case(ctx, engine, case, SEED + 101 * i + 7 * rep, f"{case.name} (run {rep + 1} of 2)")
    torch.cuda.synchronize()
    dist.barrier()  # no rank unmaps its buffer while a peer may still read it
    print(f"rank {rank}: {len(SANITIZER_CASES) * 2} runs checked", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown, as moe_ep.launch does: tearing down gloo groups at exit sometimes
    # aborts after all work is done. Every rank has passed the barrier, so nothing is in flight.
    os._exit(0)


def main() -> int:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests.test_cuda_intranode import SANITIZER_OK_LINE

    # The parent hosts the rendezvous store, so no rank's exit can pull it from under the others.
    store = dist.TCPStore("127.0.0.1", 0, WORLD_SIZE, is_master=True, wait_for_workers=False)
    mp.start_processes(_rank_main, args=(WORLD_SIZE, store.port), nprocs=WORLD_SIZE, start_method="spawn")
    del store
    print(SANITIZER_OK_LINE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
