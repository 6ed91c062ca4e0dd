"""Benchmarks: ``python -m moe_ep.bench <target> [--out DIR]``; ``--list`` names the targets.

``layer``: one DeepSeek-V3-sized MoE layer forward (hidden 7168, 256 experts, top-8,
moe_intermediate 2048; 4096 tokens/rank prefill, 128 decode) on 1 GPU and on every local GPU,
BF16 and FP8, beside a naive baseline timed in the same process run: Hugging Face's
``DeepseekV3MoE`` (its per-expert loop) on 1 GPU, and ``all_to_all_single`` + a per-expert loop on
several. Prints a table and writes ``layer.json``.

``normal``: the normal dispatch/combine calls (FP8/BF16 dispatch, BF16 combine) over an SM-count
sweep at DeepEP's test settings, beside ``all_to_all_single`` and the P2P copy ceiling
(``moe_ep/bench_normal.py``). Writes ``normal.json`` and ``normal.png``.

``loopback``: both kernel families with the link taken out: ranks as threads of one process on ONE
GPU, their kernels running at once (``moe_ep/bench_loopback.py``): an upper bound of the kernels at
each SM count, where only one GPU is at hand. Writes ``loopback.json`` and ``loopback.png``.

``ll``: the low-latency (decode) calls at DeepEP's low-latency test settings: dispatch, combine,
the hook-mode send/receive split and CUDA-graph replay, over a tokens-per-rank sweep, beside the
reference backend on the same data (``moe_ep/bench_ll.py``). Writes ``ll.json`` and ``ll.png``.

Helpers shared by the targets (timers, routing, per-rank merging, report writing) live here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

TARGETS = ("layer", "normal", "ll", "loopback")
DSV3 = dict(hidden_size=7168, moe_intermediate_size=2048, num_experts=256, top_k=8, rule="deepseek_v3", n_group=8,
            topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, num_shared_experts=1)


def time_cuda(fn: Callable[[], object], iters: int, warmup: int = 2, group=None) -> float:
    """Median milliseconds of ``fn`` (CUDA events; ranks start each iteration together)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_host(fn: Callable[[], object], iters: int, warmup: int = 3, group=None) -> float:
    """Median milliseconds of ``fn`` on CPU ranks (wall clock): time_cuda's twin where there are no
    CUDA events, so the CPU smoke tests run the same code path."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


HEAD_US = 2000      # GPU delay before each timed iteration: the host enqueues the calls meanwhile
GAP_US = 200        # hook mode: untimed pause between a send and its hook()


# ------------------------------------------------------------------------------ timing
class StepTimer:
    """Median milliseconds of each of a sequence of steps run once per iteration (and of their sum).

    GPU: CUDA events around each step; every iteration starts with synchronize + barrier, a GPU
    delay of ``head_us`` and a one-element all-reduce (so the host is ahead and the GPUs start
    together), and a step may ask for an untimed ``gap_us`` pause before it. CPU: wall clock after
    a barrier, the pause a host sleep."""

    def __init__(self, device: torch.device, group, head_us: float = HEAD_US, gap_us: float = GAP_US) -> None:
        self.cuda = device.type == "cuda"
        self.group, self.head_us, self.gap_us = group, head_us, gap_us
        if self.cuda:
            self.token = torch.ones(1, device=device)
            self.cycles_per_us = self._calibrate()

    @staticmethod
    def _calibrate() -> float:
        """Cycles of ``torch.cuda._sleep`` per microsecond on this GPU (measured)."""
        cycles, rate = 1 << 20, 0.0
        for _ in range(2):  # the first call warms up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize()
            rate = cycles / max(start.elapsed_time(end) * 1e3, 1e-3)
        return rate

    def _pause(self, us: float) -> None:
        if self.cuda:
            torch.cuda._sleep(int(us * self.cycles_per_us))
        else:
            time.sleep(us / 1e6)

    def _once(self, steps: list[tuple[Callable[[], object], bool]]) -> list[float]:
        if not self.cuda:
            dist.barrier(group=self.group)
            times = []
            for fn, pause in steps:
                if pause:
                    self._pause(self.gap_us)
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        torch.cuda.synchronize()
        dist.barrier(group=self.group)
        self._pause(self.head_us)
        dist.all_reduce(self.token, op=dist.ReduceOp.MAX, group=self.group)
        events = []
        for fn, pause in steps:
            if pause:
                self._pause(self.gap_us)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    def __call__(self, steps: list[tuple[Callable[[], object], bool]], iters: int, warmup: int = 3) -> list[float]:
        """``steps``: (fn, pause before it). Returns each step's median ms, then the median of the sums."""
        samples: list[list[float]] = []
        for i in range(warmup + iters):
            times = self._once(steps)
            if i >= warmup:
                samples.append(times + [sum(times)])
        return [statistics.median(column) for column in zip(*samples)]

    def kernel_times(self, steps: list[tuple[Callable[[], object], bool]], iters: int,
                     warmup: int = 3) -> tuple[list[float], list[list[str]]]:
        """Each step's median milliseconds of GPU *kernel* time per iteration, then the median of the
        sums, and the names of the kernels counted for each step. Read from torch.profiler (CUPTI)
        as DeepEP's ``bench_kineto`` reads its kernels: the durations of the kernels a step ran,
        without the launch latency and gaps that CUDA events include. The profiler does not tie an
        extension's launches (or a graph replay's kernels) to a Python range, so each step is
        bracketed on the GPU instead: a marker kernel (``torch.cuda._sleep(1)``) goes before every
        step and after the last, and a step's kernels are the device activities between its marker
        and the next ``_sleep`` kernel (see ``step_kernels``). Iterations run as in ``__call__``. GPU only."""
        if not self.cuda:
            raise RuntimeError("kernel_times needs CUDA (the profiler's kernel records)")
        from torch.profiler import ProfilerActivity, profile

        def marked(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                torch.cuda._sleep(1)
                fn()
            return run

        end_marker = (lambda: torch.cuda._sleep(1), False)
        wrapped = [(marked(fn), pause) for fn, pause in steps] + [end_marker]
        for _ in range(warmup):
            self._once(wrapped)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                self._once(wrapped)
        pattern = ["head"]
        for i, (_, pause) in enumerate(steps):
            pattern += (["pause"] if pause else []) + [i]
        pattern.append("end")
        per_step = step_kernels(device_activities(prof.events()), pattern, iters)
        durations = [[total for total, _ in per_step[i]] for i in range(len(steps))]
        names = [sorted({name for _, found in per_step[i] for name in found}) for i in range(len(steps))]
        sums = [sum(column) for column in zip(*durations)]
        return [statistics.median(d) / 1e3 for d in durations] + [statistics.median(sums) / 1e3], names

    def time_one(self, fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
        """Median milliseconds of one call (``time_cuda``'s signature, ranks aligned on the GPU)."""
        return self([(fn, False)], iters, warmup)[0]


MARKER_KERNEL = "spin_kernel"  # what torch.cuda._sleep runs (aten/src/ATen/cuda/Sleep.cu)


def device_activities(events) -> list[tuple[float, float, str]]:
    """(start µs, duration µs, name) of every GPU activity (kernels, memsets, copies) among the
    profiler's events, in start order; the GPU-side copies of Python ranges are left out."""
    found = [(float(e.time_range.start), float(e.time_range.elapsed_us()), e.name) for e in events
             if str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False)
             and not e.name.startswith("gpu_user_annotation")]
    return sorted(found)


def step_kernels(activities: list[tuple[float, float, str]], pattern: list, iters: int) -> dict:
    """Splits the GPU timeline into steps at the marker kernels. ``pattern`` names what follows each
    ``_sleep`` kernel of one iteration, in order ("head": the aligning delay, "pause": an untimed gap,
    an int: that step's marker, "end": after the last step); activities before the first marker are
    ignored. Returns {step: [(total µs, names) per iteration]}. A count of markers that does not
    match ``iters`` x the pattern raises (a step ran a ``_sleep`` itself, or the profiler lost
    records): no figure is better than a wrong one."""
    markers = [i for i, (_, _, name) in enumerate(activities) if MARKER_KERNEL in name]
    if len(markers) != iters * len(pattern):
        raise RuntimeError(f"kernel_times: found {len(markers)} marker kernels ({MARKER_KERNEL}), expected "
                           f"{iters} iterations x {len(pattern)}; cannot split the timeline into steps")
    out: dict = {what: [] for what in pattern if isinstance(what, int)}
    for n, start in enumerate(markers):
        what = pattern[n % len(pattern)]
        if not isinstance(what, int):
            continue
        stop = markers[n + 1] if n + 1 < len(markers) else len(activities)
        inside = activities[start + 1:stop]
        out[what].append((sum(duration for _, duration, _ in inside), [name for _, _, name in inside]))
    return out


def timer_for(device: torch.device) -> Callable[..., float]:
    """time_cuda on GPUs, time_host on CPU ranks."""
    return time_cuda if device.type == "cuda" else time_host


# ------------------------------------------------------------------------------ shared by the targets
def int_list(text: str) -> list[int]:
    """``"8,12,16"`` -> [8, 12, 16] (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def resolve_defaults(args: argparse.Namespace, defaults: dict) -> dict:
    """``defaults`` with every option the command line set (not None) taking its place."""
    return {key: getattr(args, key, None) if getattr(args, key, None) is not None else value
            for key, value in defaults.items()}


def random_routing(opts: dict, rank: int, device: torch.device):
    """x [T, H] bf16, topk_idx [T, K] int64 (K distinct experts per token, uniform), topk_weights
    [T, K] float32 in [0, 1), for ``opts`` tokens/hidden/experts/top_k. Drawn on the CPU from
    seed + rank, so a run is reproducible on any device."""
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"] + rank)
    tokens, hidden, experts, top_k = opts["tokens"], opts["hidden"], opts["experts"], opts["top_k"]
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    topk_idx = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    return x.to(device), topk_idx.to(device), topk_weights.to(device)


def backend_info(buffer) -> dict:
    """Which backend a Buffer runs (kernels or the reference), so a reader of the JSON can tell."""
    backend = buffer.backend
    describe = getattr(backend, "describe", None)
    return {"name": backend.name, "describe": describe() if callable(describe) else None}


def merge_rows(per_rank_rows: list[list[dict]]) -> list[dict]:
    """One row per measurement from every rank's rows (same order on every rank): µs = max over
    ranks of the median, GB/s = min over ranks of each rank's bytes over its own median (None where
    a row has ``bytes`` None); the per-rank figures kept beside them."""
    merged = []
    for i, row in enumerate(per_rank_rows[0]):
        ranks = [rows[i] for rows in per_rank_rows]
        counted = row["bytes"] is not None
        gbps = [r["bytes"] / r["ms"] / 1e6 if r["ms"] > 0 else 0.0 for r in ranks] if counted else None
        out = {k: v for k, v in row.items() if k not in ("ms", "bytes")}
        out.update(us=max(r["ms"] for r in ranks) * 1e3, gbps=min(gbps) if counted else None,
                   us_per_rank=[r["ms"] * 1e3 for r in ranks], gbps_per_rank=gbps,
                   bytes_per_rank=[int(r["bytes"]) for r in ranks] if counted else None)
        merged.append(out)
    return merged


def import_pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def report_header(target: str, world_size: int, dist_backend: str, device: torch.device, backend: dict) -> dict:
    """The fields every benchmark report starts with: what ran, where, on which backend."""
    return {
        "target": target,
        "world_size": world_size,
        "dist_backend": dist_backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "buffer_backend": backend["name"],
        "buffer_backend_describe": backend["describe"],
    }


def save_plot(plt, fig, ax, path: str, grid_which: str = "major") -> str:
    """The benchmarks' common plot ending: legend, grid, tight layout, PNG at 120 dpi, close."""
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which=grid_which)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def write_report(report: dict, out_dir: str, stem: str, plot: Callable[[dict, str], str]) -> None:
    """Write ``stem.json`` to ``out_dir`` and let ``plot(report, path)`` draw ``stem.png`` (it returns
    the line to print: the path written, or why it was skipped)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    print(plot(report, os.path.join(out_dir, f"{stem}.png")), flush=True)


# ------------------------------------------------------------------------------ naive baselines
def _hf_block(dims: dict, device: torch.device):
    """Hugging Face's DeepseekV3MoE at these sizes, random weights, bf16; None without transformers."""
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        return None
    cfg = DeepseekV3Config(hidden_size=dims["hidden_size"], moe_intermediate_size=dims["moe_intermediate_size"],
                           n_routed_experts=dims["num_experts"], num_experts_per_tok=dims["top_k"],
                           n_group=dims["n_group"], topk_group=dims["topk_group"], n_shared_experts=1,
                           routed_scaling_factor=dims["routed_scaling_factor"], norm_topk_prob=True,
                           intermediate_size=4 * dims["hidden_size"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: a float32 copy would double the peak
    try:
        with torch.device(device):
            block = DeepseekV3MoE(cfg)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
        for name, buf in block.named_buffers():
            if "bias" in name:
                buf.normal_(0, 1e-3)
    return block.eval()


def naive_ep_forward(moe, x: torch.Tensor) -> torch.Tensor:
    """The obvious EP forward: route, all_to_all_single the (token, expert) copies with split
    sizes (one host read), a Python loop over local experts, all_to_all_single back, weighted sum."""
    group, ranks, local = moe.group, moe.ep_size, moe.num_local_experts
    topk_idx, topk_weights, _ = moe.router(x)
    flat_expert = topk_idx.flatten()
    order = torch.argsort(flat_expert, stable=True)
    send_x = x.index_select(0, order // topk_idx.shape[1])
    send_expert = flat_expert[order]
    send_counts = torch.bincount(send_expert // local, minlength=ranks)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    recv_x = x.new_empty((sum(recv_splits), x.shape[1]))
    dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=group)
    recv_expert = send_expert.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv_expert, send_expert, recv_splits, send_splits, group=group)
    recv_local = recv_expert - moe.ep_rank * local
    out = torch.empty_like(recv_x)
    w13, w2 = moe.experts.w13, moe.experts.w2
    inter = moe.moe_intermediate_size
    for e in range(local):
        rows = (recv_local == e).nonzero(as_tuple=True)[0]
        if rows.numel():
            h = recv_x[rows] @ w13[e].t()
            out[rows] = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].t()
    back = x.new_empty(send_x.shape)
    dist.all_to_all_single(back, out, send_splits, recv_splits, group=group)
    unsorted = torch.empty_like(back)
    unsorted[order] = back
    weighted = unsorted.float().view(*topk_idx.shape, x.shape[1]) * topk_weights.unsqueeze(-1)
    result = weighted.sum(1)
    if moe.shared_experts is not None:
        result = result + moe.shared_experts(x).float()
    return result.to(x.dtype)


# ------------------------------------------------------------------------------ layer benchmark
def _bench_layer_rank(rank: int, world_size: int, opts: dict) -> None:
    from .layers.moe import ExpertParallelMoE

    device = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD if world_size > 1 else None
    dims = dict(DSV3, num_experts=opts["experts"], top_k=opts["top_k"], hidden_size=opts["hidden"])
    rows = []
    gen = torch.Generator(device=device).manual_seed(rank)
    x_prefill = torch.randn(opts["tokens"], dims["hidden_size"], generator=gen, device=device).bfloat16()
    x_decode = torch.randn(opts["decode_tokens"], dims["hidden_size"], generator=gen, device=device).bfloat16()
    hf = _hf_block(dims, device) if world_size == 1 and not opts.get("no_hf") else None
    ceilings = _layer_ceilings(dims, x_prefill.shape[0], world_size, device, opts["iters"])
    bf16_baseline: dict[str, Optional[float]] = {}
    for fp8 in (False, True):
        moe_kwargs = dict(dims, fp8=fp8, dtype=torch.bfloat16, device=device, group=group,
                          low_latency_max_tokens=opts["decode_tokens"])
        if hf is not None:
            from .layers.hf import from_hf_block
            moe = from_hf_block(hf, group=None, fp8=fp8, low_latency_max_tokens=opts["decode_tokens"])
        else:
            moe = ExpertParallelMoE(**moe_kwargs).init_weights(0)
        moe.quantize_fp8_()
        for phase, x in (("prefill", x_prefill), ("decode", x_decode)):
            moe.phase = phase
            with torch.no_grad():
                ours = time_cuda(lambda: moe(x), opts["iters"], group=group)
                if world_size == 1:
                    baseline_name = "HF DeepseekV3MoE" if hf is not None else "none"
                    baseline = time_cuda(lambda: hf(x.unsqueeze(0)), opts["iters"]) if hf is not None and not fp8 else None
                else:
                    baseline_name = "all_to_all_single + expert loop"
                    baseline = time_cuda(lambda: naive_ep_forward(moe, x), opts["iters"], group=group) if not fp8 else None
            if fp8:
                baseline = bf16_baseline.get(phase)  # FP8 is compared with the same BF16 baseline
            else:
                bf16_baseline[phase] = baseline
            rows.append({"gpus": world_size, "phase": phase, "tokens_per_rank": x.shape[0],
                         "precision": "fp8" if fp8 else "bf16", "ms": ours, "baseline": baseline_name,
                         "baseline_ms": baseline, "ceiling": ceilings[phase][0], "ceiling_ms": ceilings[phase][1]})
        del moe
        torch.cuda.empty_cache()
    gathered: list = [None] * world_size
    if group is not None:
        dist.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if rank == 0:
        out_path = os.path.join(opts["out"], f"layer_{world_size}gpu.json")
        with open(out_path, "w") as f:
            json.dump(gathered, f, indent=1)
        for i, row in enumerate(rows):
            row["ms"] = max(g[i]["ms"] for g in gathered)
            if row["baseline_ms"] is not None:
                row["baseline_ms"] = max(g[i]["baseline_ms"] for g in gathered)
            print(_layer_line(row), flush=True)


def _layer_ceilings(dims: dict, num_tokens: int, world_size: int, device: torch.device, iters: int):
    """What the routed experts cost at best on one GPU, measured in the same run:
    prefill: the same GEMM work (tokens * top_k rows) as one dense BF16 matmul chain;
    decode: reading this rank's BF16 expert weights once at the measured copy bandwidth."""
    hidden, inter = dims["hidden_size"], dims["moe_intermediate_size"]
    rows = num_tokens * dims["top_k"]
    a = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    w13 = torch.randn(hidden, 2 * inter, device=device, dtype=torch.bfloat16) / hidden ** 0.5
    w2 = torch.randn(inter, hidden, device=device, dtype=torch.bfloat16) / inter ** 0.5

    def dense_chain():
        h = a @ w13
        return (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2

    prefill_ms = time_cuda(dense_chain, iters)
    del a
    probe = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(probe)
    copy_ms = time_cuda(lambda: target.copy_(probe), iters)
    read_bytes_per_ms = 2 * probe.numel() / copy_ms   # a copy reads and writes every byte
    del probe, target, w13, w2
    torch.cuda.empty_cache()
    weight_bytes = 3 * hidden * inter * 2 * (dims["num_experts"] // world_size)
    return {"prefill": ("dense GEMM, same rows", prefill_ms),
            "decode": ("expert weights read once", weight_bytes / read_bytes_per_ms)}


def _layer_line(row: dict) -> str:
    base = f"{row['baseline_ms']:.3f}" if row["baseline_ms"] is not None else "-"
    ratio = f"{row['baseline_ms'] / row['ms']:.2f}x" if row["baseline_ms"] is not None else "-"
    return (f"layer gpus={row['gpus']} {row['phase']:<8} tokens/rank={row['tokens_per_rank']:<5} "
            f"{row['precision']:<5} ours_ms={row['ms']:.3f} baseline_ms={base} speedup={ratio} "
            f"ceiling_ms={row['ceiling_ms']:.3f} ({row['ceiling']}) baseline={row['baseline']}")


def bench_layer(args) -> None:
    from .launch import launch

    if not torch.cuda.is_available():
        raise SystemExit("the layer benchmark needs CUDA GPUs")
    opts = {"tokens": args.tokens, "decode_tokens": args.decode_tokens, "hidden": args.hidden,
            "experts": args.experts, "top_k": args.top_k, "iters": args.iters, "out": args.out,
            "no_hf": args.no_hf}
    os.makedirs(args.out, exist_ok=True)
    print(f"layer benchmark: hidden={args.hidden} experts={args.experts} top-{args.top_k} "
          f"moe_intermediate=2048, prefill {args.tokens} tokens/rank, decode {args.decode_tokens}", flush=True)
    available = torch.cuda.device_count()
    gpu_counts = args.gpu_counts or ([1] + ([available] if available > 1 else []))
    too_many = [c for c in gpu_counts if not 1 <= c <= available]
    if too_many:
        raise SystemExit(f"--gpu-counts: each count must be in [1, {available}] (GPUs visible), got {too_many}")
    for count in gpu_counts:
        if count == 1:
            torch.cuda.set_device(0)
            _bench_layer_rank(0, 1, opts)
            torch.cuda.empty_cache()
        else:
            launch(_bench_layer_rank, count, "nccl", args=(opts,))


# Sizes left unset on the command line take the target's defaults (normal: bench_normal's).
LAYER_DEFAULTS = dict(tokens=4096, hidden=7168, experts=256, top_k=8, iters=10)


def _bench_layer_with_defaults(args) -> None:
    for key, value in LAYER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bench_layer(args)


def main(argv=None) -> None:
    from . import bench_ll, bench_loopback, bench_normal  # imported here: they import helpers from this module

    parser = argparse.ArgumentParser(prog="python -m moe_ep.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", choices=TARGETS)
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--out", default=os.environ.get("OUT", "moe_ep_out"))
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per rank (default 4096; normal on CPU: 128; ll 128, on CPU 8)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=None, help="default 7168 (CPU: normal 512, ll 256)")
    parser.add_argument("--experts", type=int, default=None, help="default 256, ll 288 (CPU: normal 16, ll 8)")
    parser.add_argument("--top-k", type=int, default=None, help="default 8 (CPU: 4)")
    parser.add_argument("--iters", type=int, default=None, help="default: layer 10, normal 20, ll 50 (CPU: 5, ll 3)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline on 1 GPU")
    parser.add_argument("--gpu-counts", type=int_list, default=None,
                        help="layer: GPU counts to run, comma-separated (default: 1 and every visible GPU)")
    bench_normal.add_arguments(parser)
    bench_ll.add_arguments(parser)
    bench_loopback.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(TARGETS))
        return
    if args.target is None:
        parser.error("name a target (or --list)")
    {"layer": _bench_layer_with_defaults, "normal": bench_normal.bench_normal, "ll": bench_ll.bench_ll,
     "loopback": bench_loopback.bench_loopback}[args.target](args)


if __name__ == "__main__":
    main()
