"""``python -m moe_ep.bench loopback``: the kernels' own speed with the link taken out of the
measurement, on ONE GPU.

Why: the targets are NVLink figures on two GPUs, but what a kernel can move is also bounded by its
own instructions, flags and fences at a given SM count. Here ``--ranks`` ranks (default 2) are
threads of one process on one GPU, each with its own CUDA stream and its own engine
(``IntranodeEngine.in_process`` / ``LowLatencyEngine.in_process``: the same kernels and protocol,
the peers' buffers are regions of the same GPU). Their kernels run at once (separate processes on
one GPU would time-slice instead). A store to a "peer" lands in this GPU's HBM, so:

* a figure here is an upper bound of the same kernel over NVLink at the same SM count: when it is
  below a target, the kernel (not the link) is what bounds it;
* the ranks share one GPU's HBM (a local copy rate is printed beside); the low-latency calls get
  an R-th of the SMs per rank (a receive kernel on every SM could leave no room for a peer's send
  kernel on the one GPU), fewer than a rank has alone.

``--recv-pool BYTES`` adds dispatch rows (``*_direct``) on engines with a receive pool of that many
bytes per rank (peers store rows straight into the outputs; moe_ep/comm/recv_pool.py) and combine
rows ``combine_bf16_pull`` (its input in the pool: peers read it in place), after a
bit-for-bit check of their outputs against the plain engine's, at every ``--sms`` with each
``--direct-send-warps`` (default 6, 8, 12), and the host cost of allocating the outputs from the pool and from torch's default.

``--isolate`` adds cached FP8/BF16 dispatch rows (``*_no_copy_out``) at every ``--sms`` with the
receivers' copy-out of the peers' rows left out (``IntranodeEngine.diagnostic_skip_peer_copy``;
their outputs are not valid): beside the full rows, what that pass costs at each SM count.

Normal calls (``IntranodeEngine``), at the peer's settings (4096 tokens/rank, hidden 7168, top-8 of
256), for every ``--sms`` and each knob variant (``--unroll``, ``--chunk-rows``, ``--send-warps``,
``--combine-send-warps``, ``--combine-staged-vectors``) at 12 and 24 SMs: cached FP8 and BF16 dispatch, routed BF16 dispatch, BF16 combine. GB/s counted as
``bench normal`` counts it (rows received incl. local x hidden x 2; FP8 x (1+4/128)/2).
Low-latency calls (``LowLatencyEngine``) over ``--sweep`` tokens per rank (default 1, 32, 128; 288
experts): FP8 dispatch and BF16 combine, µs.

CUDA modules load eagerly here (``CUDA_MODULE_LOADING=EAGER``, set before CUDA starts): a kernel
loaded lazily at its first launch may wait for the whole device, while a peer's kernel waits for
this rank.

The routed dispatch has a host wait; after it the GPU idles while the rank's thread runs Python,
and the rank threads share one interpreter lock (handed over every 50 µs here): its figure holds
that contention, which ranks in separate processes do not have.

Timing: each iteration, the threads meet (host barrier, a device synchronize), then each enqueues a
GPU delay and a device barrier of the ranks (``IpcBuffer.barrier``) on its stream, so the ranks'
calls start together on the GPU with the host ahead; CUDA events around each call; medians over
``--iters``; µs is the max over ranks, GB/s the min. Checks (printed, not asserted): normal
``combine(dispatch(x)) == x * ranks reached``; low-latency BF16 ``combine(dispatch(x), w) == x *
sum(valid w)``. Writes ``loopback.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from typing import Callable, Optional

import torch

from .bench import (HEAD_US, StepTimer, import_pyplot, merge_rows, random_routing, resolve_defaults, save_plot,
                    write_report)
from .bench_ll import ll_routing
from .bench_trace import print_trace, trace_summary, traced_iterations
from .bench_normal import DIRECT_KNOB, FP8_BYTES_FACTOR, KNOB_DEFAULTS, KNOB_HEADER, WARMUP, check_sms, knob_cells, knob_variants
from .comm import per_token_group_quant_fp8
from .comm.backends.intranode import IntranodeKnobs, intranode_size_hint

NORMAL_DEFAULTS = dict(tokens=4096, hidden=7168, experts=256, top_k=8, iters=20)
LL_DEFAULTS = dict(experts=288, sweep=(1, 32, 128), iters=50)
LL_CHECK_TOL = 2e-2     # bf16 rows summed over up to top-k experts, relative to the row scale
COPY_BYTES = 1 << 30
SWITCH_INTERVAL_S = 5e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loopback")
    group.add_argument("--ranks", type=int, default=None,
                       help="loopback: ranks as threads on the one GPU (default 2); normal/ll on a machine without "
                            "GPUs: gloo CPU ranks (default 2; with GPUs those run one rank per GPU)")
    group.add_argument("--skip", choices=("normal", "ll"), default=None, help="loopback: leave one family out")
    group.add_argument("--profile", action="store_true",
                       help="loopback: per-kernel GPU time of the low-latency calls (torch.profiler) at each --sweep point")
    group.add_argument("--trace", action="store_true",
                       help="loopback, ll: the low-latency kernels' phase boundaries (in-kernel %%globaltimer) at each "
                            "--sweep point")


class ThreadRanks:
    """``num_ranks`` ranks as threads of this process, each on its own stream of one device."""

    def __init__(self, num_ranks: int, device: torch.device) -> None:
        self.num_ranks, self.device = num_ranks, device
        self.streams = [torch.cuda.Stream(device) for _ in range(num_ranks)]
        self.barrier = threading.Barrier(num_ranks)
        self.cycles_per_us = StepTimer._calibrate()
        # The rank threads share one interpreter lock: hand it over often, so a rank whose host wait
        # returned does not sit for the default 5 ms while another rank's thread runs Python.
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    def run(self, body: Callable[[int], object]) -> list:
        """``body(rank)`` on every rank's thread at once; raises one error naming every rank that failed."""
        results: list = [None] * self.num_ranks
        errors: list[Optional[BaseException]] = [None] * self.num_ranks

        def main(rank: int) -> None:
            try:
                torch.cuda.set_device(self.device)
                with torch.cuda.stream(self.streams[rank]):
                    results[rank] = body(rank)
                self.streams[rank].synchronize()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors[rank] = exc
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,), name=f"loopback-rank{r}") for r in range(self.num_ranks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed = [(rank, exc) for rank, exc in enumerate(errors)
                  if exc is not None and not isinstance(exc, threading.BrokenBarrierError)]
        if failed:  # every rank's error: the first in rank order may only be the echo of another's
            raise RuntimeError("loopback: " + "; ".join(f"rank {rank} failed: {type(exc).__name__}: "
                                                        f"{' '.join(str(exc).split())[:300]}" for rank, exc in failed)
                               ) from failed[0][1]
        if any(errors):
            raise RuntimeError("loopback: a rank broke the barrier")
        return results

    def time_steps(self, rank: int, ipc, steps: list[Callable[[], object]], iters: int, warmup: int) -> list[float]:
        """Median ms of each step (one iteration runs them in order) on this rank's stream; call from
        every rank's thread with the same ``iters``. ``ipc``: this rank's IpcBuffer (device barrier)."""
        samples: list[list[float]] = []
        for i in range(warmup + iters):
            self.barrier.wait()
            torch.cuda.synchronize(self.device)
            self.barrier.wait()
            torch.cuda._sleep(int(HEAD_US * self.cycles_per_us))
            ipc.barrier()  # the ranks' streams leave this together; the host is ahead of them
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(steps) + 1)]
            events[0].record()
            for step, event in zip(steps, events[1:]):
                step()
                event.record()
            events[-1].synchronize()
            if i >= warmup:
                samples.append([a.elapsed_time(b) for a, b in zip(events, events[1:])])
        return [statistics.median(column) for column in zip(*samples)]


# ------------------------------------------------------------------------------ normal
def _normal_points(opts: dict) -> list[tuple[int, dict]]:
    points = [(sms, dict(KNOB_DEFAULTS)) for sms in opts["sms"]]
    variant_sms = [sms for sms in (12, 24) if sms in opts["sms"]]
    points += [(sms, {**KNOB_DEFAULTS, key: value}) for key, values in opts["variants"].items() for value in values
               for sms in variant_sms]
    return points


def _normal(ranks: ThreadRanks, opts: dict) -> dict:
    from .comm.backends.intranode import IntranodeEngine

    R, device = ranks.num_ranks, ranks.device
    hint = intranode_size_hint(opts["tokens"], opts["hidden"], R, opts["top_k"])
    engines = IntranodeEngine.in_process(R, device, hint)
    ext = engines[0].ext
    points = _normal_points(opts)

    def body(rank: int) -> dict:
        engine = engines[rank]
        x, topk_idx, topk_weights = random_routing(opts, rank, device)
        _, per_expert, in_rank = ext.get_dispatch_layout(topk_idx, opts["experts"], R)
        recv_x, _, _, _, handle = engine.dispatch(x, None, in_rank, per_expert, topk_idx, topk_weights, 1, 0,
                                                  opts["experts"])
        combined, _ = engine.combine(recv_x, handle, None, [])
        expected = x.float() * in_rank.sum(1, keepdim=True).float()
        err = (combined.float() - expected).abs().max().item() if x.numel() else 0.0
        x_fp8 = per_token_group_quant_fp8(x)
        bf16_bytes = recv_x.shape[0] * opts["hidden"] * 2
        ops = {
            "dispatch_fp8": (lambda: engine.dispatch(x_fp8, handle, None, None, None, None, 1, 0, opts["experts"]),
                             bf16_bytes * FP8_BYTES_FACTOR),
            "dispatch_bf16": (lambda: engine.dispatch(x, handle, None, None, None, None, 1, 0, opts["experts"]),
                              bf16_bytes),
            "dispatch_bf16_routed": (lambda: engine.dispatch(x, None, in_rank, per_expert, topk_idx, topk_weights, 1, 0,
                                                             opts["experts"]), bf16_bytes),
            "combine_bf16": (lambda: engine.combine(recv_x, handle, None, []), bf16_bytes),
        }
        rows = []
        for sms, knobs in points:
            engine.num_sms, engine.knobs = sms, IntranodeKnobs(**knobs)
            for op, (fn, nbytes) in ops.items():
                ms = ranks.time_steps(rank, engine.ipc, [fn], opts["iters"], WARMUP)[0]
                rows.append({"op": op, "sms": sms, **knobs, "ms": ms, "bytes": nbytes})
        if opts["isolate"]:  # the copy-out pass left out: a diagnostic, last, so no valid output is needed after
            engine.knobs, engine.diagnostic_skip_peer_copy = IntranodeKnobs(**KNOB_DEFAULTS), True
            try:
                for sms in opts["sms"]:
                    engine.num_sms = sms
                    for op in ("dispatch_fp8", "dispatch_bf16"):
                        fn, nbytes = ops[op]
                        ms = ranks.time_steps(rank, engine.ipc, [fn], opts["iters"], WARMUP)[0]
                        rows.append({"op": f"{op}_no_copy_out", "sms": sms, **KNOB_DEFAULTS, "ms": ms, "bytes": nbytes})
            finally:
                engine.diagnostic_skip_peer_copy = False
        direct = {}
        if direct_engines is not None:
            direct = _direct_rows(ranks, rank, direct_engines[rank], opts, (x, topk_idx, topk_weights, in_rank,
                                  per_expert, x_fp8), (recv_x, handle, combined))
            rows += direct.pop("rows")
        return {"rows": rows, "max_abs_err": err, "pass": bool(torch.allclose(combined.float(), expected, rtol=1e-2,
                                                                                atol=1e-2)), "direct": direct}

    direct_engines = (IntranodeEngine.in_process(R, device, hint, recv_pool_bytes=opts["recv_pool"])
                      if opts["recv_pool"] else None)
    per_rank = ranks.run(body)
    rows = merge_rows([r["rows"] for r in per_rank])
    del engines, direct_engines
    torch.cuda.empty_cache()
    report = {"settings": {k: opts[k] for k in ("tokens", "hidden", "experts", "top_k", "iters")} | {"nvl_bytes": hint},
              "check": {"pass": all(r["pass"] for r in per_rank),
                        "max_abs_err": max(r["max_abs_err"] for r in per_rank),
                        "what": "combine(dispatch(x)) == x * ranks the token went to (bf16 tolerance)"},
              "rows": rows}
    if opts["recv_pool"]:
        report["direct"] = {"equal": all(r["direct"]["equal"] for r in per_rank),
                            "direct_calls": [r["direct"]["direct_calls"] for r in per_rank],
                            "pull_calls": [r["direct"]["pull_calls"] for r in per_rank],
                            "alloc_us": [r["direct"]["alloc_us"] for r in per_rank],
                            "overflows": [r["direct"]["overflows"] for r in per_rank],
                            "what": "routed and cached dispatches with the receive pool, and a combine with its "
                                    "input there, equal the plain engine's outputs bit for bit; direct_calls: "
                                    "dispatches whose outputs were all in the pool; pull_calls: combines read in place"}
    return report


STAGED_KNOB = "combine_staged_vectors"  # the pulled combine's rows sweep it (--combine-staged-vectors)


def _direct_rows(ranks: "ThreadRanks", rank: int, engine, opts: dict, inputs: tuple, plain: tuple) -> dict:
    """The dispatches on an engine with a receive pool (peers store into the outputs) and its
    combine with the input in the pool (peers read it in place): first a bit-for-bit comparison
    with the plain engine's outputs, then the timed rows ``*_direct`` and ``combine_bf16_pull``."""
    x, topk_idx, topk_weights, in_rank, per_expert, x_fp8 = inputs
    plain_recv_x, plain_handle, plain_combined = plain
    experts = opts["experts"]
    recv_x, recv_idx, recv_w, _, handle = engine.dispatch(x, None, in_rank, per_expert, topk_idx, topk_weights, 1, 0,
                                                          experts)
    cached_x = engine.dispatch(x, handle, None, None, None, None, 1, 0, experts)[0]
    # Combine's input as a layer makes it (moe_ep.layers: the expert outputs written into it).
    pull_x = engine.empty_combine_input(recv_x.shape[0], recv_x.shape[1], recv_x.dtype).copy_(recv_x)
    pulls = engine.pull_calls
    pulled = engine.combine(pull_x, handle, None, [])[0]
    equal = (torch.equal(recv_x, plain_recv_x) and torch.equal(cached_x, plain_recv_x)
             and torch.equal(handle[2], plain_handle[2]) and torch.equal(pulled, plain_combined)
             and engine.pull_calls > pulls)
    ops = {
        "dispatch_fp8_direct": lambda: engine.dispatch(x_fp8, handle, None, None, None, None, 1, 0, experts),
        "dispatch_bf16_direct": lambda: engine.dispatch(x, handle, None, None, None, None, 1, 0, experts),
        "dispatch_bf16_routed_direct": lambda: engine.dispatch(x, None, in_rank, per_expert, topk_idx, topk_weights, 1,
                                                               0, experts),
    }
    nbytes = recv_x.shape[0] * opts["hidden"] * 2
    alloc_us = _allocation_cost(engine, recv_x, recv_idx)
    rows = []
    for sms in opts["sms"]:
        for send_warps in opts[DIRECT_KNOB]:
            knobs = {**KNOB_DEFAULTS, DIRECT_KNOB: send_warps}
            engine.num_sms, engine.knobs = sms, IntranodeKnobs(**knobs)
            for op, fn in ops.items():
                ms = ranks.time_steps(rank, engine.ipc, [fn], opts["iters"], WARMUP)[0]
                scale = FP8_BYTES_FACTOR if "fp8" in op else 1.0
                rows.append({"op": op, "sms": sms, **knobs, "ms": ms, "bytes": nbytes * scale})
        # A pulled combine has no senders: one row per SM count and combine ring size.
        for staged in (KNOB_DEFAULTS[STAGED_KNOB], *opts["variants"].get(STAGED_KNOB, ())):
            knobs = {**KNOB_DEFAULTS, STAGED_KNOB: staged}
            engine.knobs = IntranodeKnobs(**knobs)
            ms = ranks.time_steps(rank, engine.ipc, [lambda: engine.combine(pull_x, handle, None, [])], opts["iters"],
                                  WARMUP)[0]
            rows.append({"op": "combine_bf16_pull", "sms": sms, **knobs, "ms": ms, "bytes": nbytes})
    return {"rows": rows, "equal": bool(equal), "direct_calls": engine.direct_calls, "pull_calls": engine.pull_calls,
            "overflows": engine.recv_pool.overflows, "alloc_us": alloc_us}


def _allocation_cost(engine, recv_x: torch.Tensor, recv_idx: torch.Tensor, reps: int = 200) -> dict:
    """Host µs to allocate one dispatch's outputs (recv_x, top-k ids and weights, source index),
    from the receive pool and from torch's default pool: the pool's part of a routed dispatch's
    critical path (the GPU waits for it after the host wait)."""
    import time

    rows, hidden, k = recv_x.shape[0], recv_x.shape[1], recv_idx.shape[1]
    specs = [((rows, hidden), recv_x.dtype), None, ((rows, k), torch.int64), ((rows, k), torch.float32),
             ((rows,), torch.int32)]
    result = {}
    for name, allocate in (("pool", lambda: engine.recv_pool.empty(specs)),
                           ("default", lambda: [None if s is None else torch.empty(s[0], dtype=s[1], device=recv_x.device)
                                                for s in specs])):
        allocate()
        start = time.perf_counter()
        for _ in range(reps):
            allocate()
        result[name] = (time.perf_counter() - start) / reps * 1e6
    return result


# ------------------------------------------------------------------------------ low latency
def _ll_steps(engine, x, topk_idx, topk_weights, m: int, experts: int) -> list[Callable[[], None]]:
    """The timed pair: FP8 dispatch, then BF16 combine of random expert outputs with its handle."""
    R = engine.num_ranks
    expert_out = torch.randn((experts // R, R * m, x.shape[1]), device=x.device).to(torch.bfloat16)
    state: dict = {}

    def dispatch() -> None:
        state["handle"] = engine.dispatch(x, topk_idx, m, experts, None, True, False, False, False)[2]

    def combine() -> None:
        engine.combine(expert_out, topk_idx, topk_weights, state["handle"], None, False)

    return [dispatch, combine]


def _ll(ranks: ThreadRanks, opts: dict) -> dict:
    from .comm.backends.low_latency import LowLatencyEngine, ll_size_hint

    R, device = ranks.num_ranks, ranks.device
    experts, hidden, top_k = opts["ll_experts"], opts["hidden"], opts["top_k"]
    m = max(opts["sweep"])
    # Each rank gets an R-th of the SMs: a receive kernel on every SM could leave no room for a peer's
    # send kernel on this one GPU (two GPUs never share SMs), and the receive would wait for it forever.
    sms = torch.cuda.get_device_properties(device).multi_processor_count // R
    engines = LowLatencyEngine.in_process(R, device, ll_size_hint(m, hidden, R, experts, top_k), num_sms=sms)
    ll_opts = dict(opts, experts=experts)

    def body(rank: int) -> dict:
        engine = engines[rank]
        out: dict = {"rows": [], "checks": []}
        for tokens in opts["sweep"]:
            x, topk_idx, topk_weights = ll_routing(ll_opts, tokens, rank, device)
            # Check (BF16): every received row combined with the source's weights gives x * sum(valid w).
            recv, _, handle, _ = engine.dispatch(x, topk_idx, m, experts, None, False, False, False, False)
            combined, _ = engine.combine(recv, topk_idx, topk_weights, handle, None, False)
            expected = x.float() * torch.where(topk_idx >= 0, topk_weights, 0).sum(1, keepdim=True)
            err = ((combined.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
            out["checks"].append({"tokens": tokens, "rel_err": err, "pass": err <= LL_CHECK_TOL})
            steps = _ll_steps(engine, x, topk_idx, topk_weights, m, experts)
            d_ms, c_ms = ranks.time_steps(rank, engine.ipc, steps, opts["ll_iters"], WARMUP)
            out["rows"].append({"tokens": tokens, "dispatch_ms": d_ms, "combine_ms": c_ms})
            if opts["trace"]:  # after the timed iterations, so the timings never include the trace
                out.setdefault("traces", []).append(
                    traced_iterations(engine, lambda: ranks.time_steps(rank, engine.ipc, steps, 1, 0)))
        return out

    per_rank = ranks.run(body)
    profile = _ll_profile(ranks, engines, ll_opts, m) if opts["profile"] else {}
    rows = []
    for i, first in enumerate(per_rank[0]["rows"]):
        mine = [r["rows"][i] for r in per_rank]
        d_us, c_us = max(r["dispatch_ms"] for r in mine) * 1e3, max(r["combine_ms"] for r in mine) * 1e3
        rows.append({"tokens": first["tokens"], "dispatch_us": d_us, "combine_us": c_us})
    checks = [c for r in per_rank for c in r["checks"]]
    trace = {str(tokens): trace_summary([r["traces"][i] for r in per_rank], shared_clock=True)
             for i, tokens in enumerate(opts["sweep"])} if opts["trace"] else {}
    del engines
    torch.cuda.empty_cache()
    return {"settings": {"hidden": hidden, "experts": experts, "top_k": top_k, "max_tokens": m,
                         "iters": opts["ll_iters"], "sms_per_rank": sms, "dispatch": "FP8 (1x128 scales)",
                         "combine": "BF16"},
            "check": {"pass": all(c["pass"] for c in checks), "max_rel_err": max(c["rel_err"] for c in checks),
                      "what": "BF16 dispatch, combine of the received rows == x * sum of the valid weights"},
            "rows": rows, "profile": profile, "trace": trace}


PROFILE_ITERS = 20


def _ll_profile(ranks: ThreadRanks, engines: list, opts: dict, m: int) -> dict:
    """Per-kernel GPU µs (mean per call, both ranks' kernels pooled) of FP8 dispatch + BF16 combine
    at each sweep point, from torch.profiler's CUDA activity: which kernel the microseconds are in.
    A receive kernel's time includes its wait for the peer's send."""
    from torch.profiler import ProfilerActivity, profile

    experts = opts["experts"]
    device = ranks.device
    result = {}
    for tokens in opts["sweep"]:
        def body(rank: int, tokens: int = tokens) -> None:
            engine = engines[rank]
            x, topk_idx, topk_weights = ll_routing(opts, tokens, rank, device)
            ranks.time_steps(rank, engine.ipc, _ll_steps(engine, x, topk_idx, topk_weights, m, experts),
                             PROFILE_ITERS, 0)

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ranks.run(body)
        kernels = {}
        for event in prof.key_averages():
            device_us = getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
            if event.count and device_us > 0 and "sleep" not in event.key.lower():
                kernels[event.key[:60]] = {"calls": event.count, "us_per_call": device_us / event.count}
        result[str(tokens)] = kernels
    return result


def _copy_rate(device: torch.device, iters: int) -> dict:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(WARMUP + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times[WARMUP:])
    return {"op": "local copy", "us": ms * 1e3, "gbps": 2 * COPY_BYTES / (ms * 1e-3) / 1e9,
            "what": "copy_ within the GPU, read + write bytes (the HBM the ranks' traffic shares)"}


# ------------------------------------------------------------------------------ entry point
def _resolve(args: argparse.Namespace) -> dict:
    opts = resolve_defaults(args, NORMAL_DEFAULTS)
    args.ranks = 2 if args.ranks is None else args.ranks
    if not 2 <= args.ranks <= 8:
        raise SystemExit(f"--ranks must be in [2, 8], got {args.ranks}")
    check_sms(args.sms)
    experts = args.experts or LL_DEFAULTS["experts"]
    if opts["experts"] % args.ranks or experts % args.ranks:
        raise SystemExit(f"--experts must be divisible by --ranks {args.ranks}")
    if args.recv_pool < 0:
        raise SystemExit(f"--recv-pool must be >= 0 bytes, got {args.recv_pool}")
    variants = knob_variants(args)
    opts.update(recv_pool=args.recv_pool, profile=args.profile, trace=args.trace, isolate=args.isolate, ranks=args.ranks, sms=list(args.sms), seed=args.seed, out=args.out, skip=args.skip,
                variants=variants, **{DIRECT_KNOB: variants.pop(DIRECT_KNOB)},
                sweep=sorted(set(args.sweep or LL_DEFAULTS["sweep"])), ll_experts=experts,
                ll_iters=args.iters or LL_DEFAULTS["iters"])
    return opts


def _print(report: dict) -> None:
    print(f"loopback benchmark: {report['ranks']} ranks as threads on one {report['device']} "
          "(peer stores land in this GPU's HBM: an upper bound of the kernels, not an NVLink figure)")
    copy = report["copy"]
    print(f"reference: {copy['op']} {copy['gbps']:.0f} GB/s ({copy['what']})")
    normal = report.get("normal")
    if normal:
        s = normal["settings"]
        verdict = "PASS" if normal["check"]["pass"] else "FAIL"
        print(f"normal: {s['tokens']} tokens/rank, hidden {s['hidden']}, top-{s['top_k']} of {s['experts']}; "
              f"check {verdict} (max abs err {normal['check']['max_abs_err']:.3g})")
        if normal.get("direct"):
            d = normal["direct"]
            print(f"receive pool: outputs equal the plain engine's: {'PASS' if d['equal'] else 'FAIL'}; calls with "
                  f"every output in the pool per rank {d['direct_calls']}, combines read in place "
                  f"{d['pull_calls']}, arena overflows {d['overflows']}")
            print("host µs to allocate a dispatch's outputs (pool / default), per rank: " + ", ".join(
                f"{a['pool']:.1f} / {a['default']:.1f}" for a in d["alloc_us"]))
        print(f"{'op':<28}{'SMs':>5}{KNOB_HEADER}{'µs (max)':>12}{'GB/s (min)':>12}")
        for r in normal["rows"]:
            print(f"{r['op']:<28}{r['sms']:>5}{knob_cells(r)}{r['us']:>12.1f}{r['gbps']:>12.1f}")
    ll = report.get("ll")
    if ll:
        s = ll["settings"]
        verdict = "PASS" if ll["check"]["pass"] else "FAIL"
        print(f"low latency: hidden {s['hidden']}, top-{s['top_k']} of {s['experts']}, {s['dispatch']} dispatch, "
              f"{s['combine']} combine, M={s['max_tokens']}, {s['sms_per_rank']} SMs per rank; check {verdict} "
              f"(max rel err {ll['check']['max_rel_err']:.3g})")
        print(f"{'tokens':>8}{'dispatch µs':>14}{'combine µs':>14}{'both µs':>10}")
        for r in ll["rows"]:
            print(f"{r['tokens']:>8}{r['dispatch_us']:>14.1f}{r['combine_us']:>14.1f}"
                  f"{r['dispatch_us'] + r['combine_us']:>10.1f}")
        print_trace(ll.get("trace", {}), "µs after the first dispatch block of any rank started: one GPU, one clock")
        for tokens, kernels in ll.get("profile", {}).items():
            print(f"profile at {tokens} tokens/rank (GPU µs per call, both ranks pooled; a receive waits for the peer):")
            for name, k in sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_call"] * kv[1]["calls"]):
                print(f"  {name:<60}{k['calls']:>6}{k['us_per_call']:>10.1f}")
    print(flush=True)


def bench_loopback(args: argparse.Namespace) -> None:
    """Needs one GPU and the extension; the ranks are threads of this process."""
    # Before CUDA starts: a kernel loaded lazily at its first launch may wait for the whole device
    # while a peer's kernel waits for this rank (moe_ep.comm.ipc.adopt_in_process checks).
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    opts = _resolve(args)  # bad options are reported on any machine
    if not torch.cuda.is_available():
        raise SystemExit("loopback needs a CUDA GPU (its ranks are threads on one GPU); none is visible")
    try:
        from moe_ep import _C  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"loopback needs the CUDA extension moe_ep._C ({exc}); build it with "
                         "`python3 setup.py build_ext --inplace`") from exc
    os.makedirs(opts["out"], exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device())
    ranks = ThreadRanks(opts["ranks"], device)
    report = {"target": "loopback", "ranks": opts["ranks"], "device": torch.cuda.get_device_name(device),
              "timing": "host barrier + synchronize, then per rank a GPU delay and a device barrier of the ranks; "
                        "CUDA events per call; median over iters; µs max over ranks, GB/s min over ranks",
              "copy": _copy_rate(device, 10)}
    # Printed and written after each family, so a failure in the second keeps the first's figures.
    for family, measure in (("normal", _normal), ("ll", _ll)):
        if opts["skip"] != family:
            report[family] = measure(ranks, opts)
            _print({**report, **{other: None for other in ("normal", "ll") if other != family}})
            write_report(report, opts["out"], "loopback", _plot)


def _plot(report: dict, path: str) -> str:
    """Normal calls' GB/s vs SMs (default knobs), the local copy rate as a line. matplotlib optional."""
    plt = import_pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install '.[plot]'): loopback.png skipped"
    if not report.get("normal"):
        return "no normal rows: loopback.png skipped"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = report["normal"]["rows"]
    defaults = [r for r in rows if all(r.get(k) == v for k, v in KNOB_DEFAULTS.items())]
    for op in dict.fromkeys(r["op"] for r in defaults):
        mine = sorted((r["sms"], r["gbps"]) for r in defaults if r["op"] == op)
        ax.plot([a for a, _ in mine], [b for _, b in mine], marker="o", label=op)
    for op in dict.fromkeys(r["op"] for r in rows if r["op"].endswith("_direct")):  # best over sender counts
        best: dict[int, float] = {}
        for r in rows:
            if r["op"] == op:
                best[r["sms"]] = max(best.get(r["sms"], 0.0), r["gbps"])
        ax.plot(sorted(best), [best[n] for n in sorted(best)], marker="s", linestyle="--", label=f"{op} (best)")
    ax.axhline(report["copy"]["gbps"], linestyle="--", color="gray", label=f"local copy ({report['copy']['gbps']:.0f})")
    ax.set(xlabel="SMs per rank", ylabel="GB/s (min over ranks)",
           title=f"loopback: {report['ranks']} ranks as threads on one GPU (no link)")
    return save_plot(plt, fig, ax, path)
