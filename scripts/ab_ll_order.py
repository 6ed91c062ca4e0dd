"""Interleaved A/B of the fused low-latency dispatch's two block orders (MOE_EP_LL_FUSED_ORDER):
"publish_first" (a block publishes its rows, then lays out its receive) against "layout_first" (the
layout between its stores and its publish). Runs of the same code differ by about 1 us between
processes (benchmarks/RESULTS.md), the size of the effect sought, so both orders run in ONE process,
alternating in rounds; each round times ``--iters`` dispatches by their kernels' durations (as
``bench ll``'s kernel rows do). A diagnostic, not a test. GPUs only; one rank per GPU.

    python3 scripts/ab_ll_order.py [--tokens 128] [--rounds 8] [--iters 30] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.bench import StepTimer  # noqa: E402
from moe_ep.bench_ll import ll_routing  # noqa: E402
from moe_ep.comm import Buffer  # noqa: E402
from moe_ep.launch import launch  # noqa: E402

ORDERS = ("publish_first", "layout_first")
ORDER_ENV = "MOE_EP_LL_FUSED_ORDER"
SIZES = dict(hidden=7168, experts=288, top_k=8)  # the peer's settings (issue 5)


def _received(recv_x, count: torch.Tensor) -> tuple:
    """The dispatch's defined output: counts, and each local expert's first count rows and scales."""
    rows, scales = recv_x
    counts = count.tolist()
    return (count.clone(), torch.cat([rows[e, :c].view(torch.uint8).flatten() for e, c in enumerate(counts)]),
            torch.cat([scales[e, :c].flatten() for e, c in enumerate(counts)]))


def _rank(rank: int, world_size: int, opts: dict) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    m = opts["tokens"]
    buffer = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(m, SIZES["hidden"], world_size,
                                                                               SIZES["experts"]),
                    low_latency_mode=True, num_qps_per_rank=SIZES["experts"] // world_size)
    x, topk_idx, _ = ll_routing(dict(SIZES, tokens=m, seed=0), m, rank, device)
    timer = StepTimer(device, group)
    reference = None

    def dispatch():
        return buffer.low_latency_dispatch(x, topk_idx, m, SIZES["experts"], use_fp8=True)

    times: dict[str, list[float]] = {order: [] for order in ORDERS}
    for round_ in range(opts["rounds"]):
        for order in (ORDERS if round_ % 2 == 0 else ORDERS[::-1]):
            os.environ[ORDER_ENV] = order  # read at every launch
            got = _received(*dispatch()[:2])  # each order's output equals the first's, exactly
            if reference is None:
                reference = got
            elif not all(torch.equal(a, b) for a, b in zip(got, reference)):
                raise SystemExit(f"rank {rank}: {order} gave another dispatch output than the first run")
            kernel_ms, _names = timer.kernel_times([(dispatch, False)], opts["iters"])
            times[order].append(kernel_ms[0] * 1e3)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, times, group=group)
    if rank == 0:
        per_round = {order: [max(g[order][i] for g in gathered) for i in range(opts["rounds"])] for order in ORDERS}
        report = {"tokens": m, **SIZES, "rounds": opts["rounds"], "iters": opts["iters"], "per_rank_us": gathered,
                  "median_us": {order: statistics.median(values) for order, values in per_round.items()}}
        print(f"fused LL dispatch, {m} tokens/rank, kernel us (max over ranks), {opts['rounds']} interleaved rounds "
              f"of {opts['iters']}:")
        for order in ORDERS:
            print(f"  {order:14s} median {report['median_us'][order]:6.2f}  rounds " +
                  " ".join(f"{v:5.2f}" for v in per_round[order]))
        os.makedirs(opts["out"], exist_ok=True)
        with open(os.path.join(opts["out"], "ab_ll_order.json"), "w") as f:
            json.dump(report, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise SystemExit("ab_ll_order: needs two GPUs (one rank per GPU)")
    launch(_rank, torch.cuda.device_count(), backend="nccl", args=(vars(args),))


if __name__ == "__main__":
    main()
