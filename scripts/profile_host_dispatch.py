"""Host time of a routed (non-cached) normal dispatch, a cached one and a combine through ``Buffer``,
one rank on one GPU: where the Python and launch time goes (cProfile, then torch.profiler's table
of ops and kernels), since the GPU idles for whatever the host does after the dispatch's host wait.

    python scripts/profile_host_dispatch.py [--tokens 4096] [--hidden 7168] [--recv-pool BYTES]

Prints the host µs per call (with a synchronize after each, so the host is never ahead) next to the
GPU µs of the same call; a host timeline of each call (when the kernels' launchers were entered and
left, when the dispatch's host wait returned: the time from there to the transfer's launch is GPU
idle time); then cProfile's top functions by their own time and torch.profiler's ops.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from collections import defaultdict

import torch
import torch.distributed as dist


class _TimedLaunchers:
    """Stands in for the engine's extension module: records host timestamps around the launchers'
    calls (and the engine's host wait), everything else passes through."""

    TIMED = ("intranode_notify", "intranode_transfer", "intranode_combine")

    def __init__(self, ext, engine) -> None:
        self._ext, self.marks = ext, []
        wait = engine._wait_sizes

        def timed_wait(*args, **kwargs):
            result = wait(*args, **kwargs)
            self.marks.append(("wait returned", time.perf_counter()))
            return result
        engine._wait_sizes = timed_wait

    def __getattr__(self, name):
        target = getattr(self._ext, name)
        if name not in self.TIMED:
            return target

        def timed(*args, **kwargs):
            self.marks.append((f"{name} entered", time.perf_counter()))
            result = target(*args, **kwargs)
            self.marks.append((f"{name} left", time.perf_counter()))
            return result
        return timed


def print_timeline(name: str, call, timed: _TimedLaunchers, calls: int) -> None:
    """Median µs from the call's start to each mark, and between consecutive marks."""
    at = defaultdict(list)
    for _ in range(calls):
        torch.cuda.synchronize()
        timed.marks.clear()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        for mark, t in timed.marks + [("returned", t1)]:
            at[mark].append((t - t0) * 1e6)
    order = sorted(at, key=lambda m: sorted(at[m])[len(at[m]) // 2])
    print(f"host timeline of {name} (µs from the call, median of {calls}):", flush=True)
    previous = 0.0
    for mark in order:
        median = sorted(at[mark])[len(at[mark]) // 2]
        print(f"  {mark:<28} {median:8.1f}   (+{median - previous:6.1f})", flush=True)
        previous = median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--recv-pool", type=int, default=0)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    torch.cuda.set_device(0)
    from moe_ep.bench import random_routing
    from moe_ep.comm import Buffer
    from moe_ep.comm.backends.intranode import intranode_size_hint

    opts = {"tokens": args.tokens, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k, "seed": 1}
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=intranode_size_hint(args.tokens, args.hidden, 1, args.top_k),
                    recv_pool_bytes=args.recv_pool)
    x, topk_idx, topk_weights = random_routing(opts, 0, torch.device("cuda", 0))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, args.experts)

    def dispatch():
        return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)

    def combine(recv_x, handle):
        return buffer.combine(recv_x, handle)

    def cached_dispatch():
        return buffer.dispatch(x, handle=handle)

    for _ in range(5):
        recv_x, _, _, _, handle, _ = dispatch()
        combine(recv_x, handle)
    torch.cuda.synchronize()
    calls = (("dispatch (routed)", dispatch), ("dispatch (cached)", cached_dispatch),
             ("combine", lambda: combine(recv_x, handle)))
    for name, call in calls:
        host, gpu = [], []
        for _ in range(args.calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            call()
            end.record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host.append((t1 - t0) * 1e6)
            gpu.append(start.elapsed_time(end) * 1e3)
        host.sort(), gpu.sort()
        print(f"{name:<20} host µs per call (median) {host[len(host) // 2]:8.1f}   "
              f"GPU µs start->end (median) {gpu[len(gpu) // 2]:8.1f}", flush=True)
    engine = buffer.backend.intranode
    timed = _TimedLaunchers(engine.ext, engine)
    engine.ext = timed
    # Then with the outputs allocated by a torch.empty per tensor (the path before
    # ext.empty_tensors), and again as built: a comparison on the same host.
    def torch_empty_per_output(specs, device):
        return [None if s is None else torch.empty(s[0], dtype=s[1], device=torch.device("cuda", device))
                for s in specs]
    for variant in ("", ", torch.empty per output", ", again"):
        if variant == ", torch.empty per output":
            timed.empty_tensors = torch_empty_per_output
        elif "empty_tensors" in vars(timed):
            del timed.empty_tensors
        for name, call in calls:
            print_timeline(name + variant, call, timed, args.calls)
    engine.ext = timed._ext
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        recv_x, _, _, _, handle, _ = dispatch()
        combine(recv_x, handle)
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(30)
    # torch.profiler: each torch op's host time and each kernel's GPU time in one routed call + combine.
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            recv_x, _, _, _, handle, _ = dispatch()
            combine(recv_x, handle)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
