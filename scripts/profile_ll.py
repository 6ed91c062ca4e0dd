"""Per-kernel GPU time of the low-latency dispatch/combine (torch.profiler, CUDA activity) on every
local GPU: where the microseconds of ``python -m moe_ep.bench ll`` go. A diagnostic, not a test.

    python3 scripts/profile_ll.py [--tokens 1,128] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MOE_EP_EXPERIMENTAL_KERNELS", "low_latency")

from moe_ep.bench import random_routing  # noqa: E402
from moe_ep.comm import Buffer  # noqa: E402
from moe_ep.launch import launch  # noqa: E402

HIDDEN, EXPERTS, TOP_K, MAX_TOKENS, ITERS = 7168, 288, 8, 256, 30


def _rank(rank: int, world_size: int, tokens_list: list[int], out: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda", torch.cuda.current_device())
    group = dist.new_group(list(range(world_size)))
    buffer = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, world_size, EXPERTS),
                    low_latency_mode=True, num_qps_per_rank=EXPERTS // world_size, explicitly_destroy=True)
    lines = []
    for tokens in tokens_list:
        opts = dict(tokens=tokens, hidden=HIDDEN, experts=EXPERTS, top_k=TOP_K, seed=0)
        x, topk_idx, topk_weights = random_routing(opts, rank, device)

        def step():
            recv_x, _count, handle, _e, _h = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, EXPERTS, use_fp8=True)
            y = torch.empty((EXPERTS // world_size, world_size * MAX_TOKENS, HIDDEN), dtype=torch.bfloat16, device=device)
            y.fill_(0.5)
            buffer.low_latency_combine(y, topk_idx, topk_weights, handle)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        dist.barrier(group=group)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(ITERS):
                torch.cuda._sleep(2_000_000)  # the host enqueues ahead: no launch gaps inside a step
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        lines.append(f"--- rank {rank}, {tokens} tokens/rank, {ITERS} iterations (device time per call in 'CUDA time avg')\n{table}")
    gathered = [None] * world_size
    dist.all_gather_object(gathered, "\n".join(lines), group=group)
    if rank == 0:
        text = "\n".join(gathered)
        print(text)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "profile_ll.txt"), "w") as f:
            f.write(text)
    buffer.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,128")
    parser.add_argument("--out", default=os.environ.get("OUT", "moe_ep_out"))
    args = parser.parse_args()
    launch(_rank, max(1, torch.cuda.device_count()), "nccl", args=([int(t) for t in args.tokens.split(",")], args.out))


if __name__ == "__main__":
    main()
