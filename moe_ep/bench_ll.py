"""``python -m moe_ep.bench ll``: the low-latency (decode) calls ``low_latency_dispatch`` and
``low_latency_combine``, timed as DeepEP's own low-latency test times them, beside the reference
backend on the same data, in one run.

One process per local GPU (NCCL); with no GPU, 2 CPU ranks over gloo at tiny sizes (a smoke test:
the figures mean nothing there). Defaults are the peer's settings (DeepEP's test_low_latency,
/work/shared/ANCHORS.md): 128 tokens/rank, hidden 7168, top-8 of 288 experts, FP8 dispatch, BF16
combine. The low-latency kernels are a verified family (on by default where the extension has
them); the JSON records what actually ran (``backend.describe()``, ``backend.uses_kernel(...)``)
and the ``MOE_EP_EXPERIMENTAL_KERNELS`` value the ranks had.

For every tokens-per-rank count of ``--sweep`` (and ``--tokens``), on one routing (random top-k
without duplicates, uniform over experts, about 1% of the entries set to -1 as DeepEP's test does,
seeded), and one Buffer (``num_max_dispatch_tokens_per_rank`` = the largest count), for the Buffer
under test and for the baseline:

* ``eager``: dispatch and combine timed inside a dispatch + combine iteration, each with CUDA
  events; ``dispatch+combine`` is their sum in the same iteration;
* ``hook``: ``return_recv_hook=True``: the send call and ``hook()`` timed separately, with an
  untimed pause between them (DeepEP puts a large GEMM there) so the receive finds its data;
* ``graph``: dispatch and combine (no hook: the calls a decode step captures, one kernel each)
  captured as CUDA graphs (after warm-up on a side stream, as torch requires) and replayed (GPUs
  only); ``graph-hook``: the same with dispatch + hook() and combine + hook() (two kernels each);
* ``kernels``, ``kernels-hook``, ``kernels-graph`` (GPUs): the eager, hook and graph steps again,
  each timed by the summed durations of the GPU kernels it launched, read from torch.profiler.
  That is how DeepEP's test times the per-kernel figures ANCHORS.md quotes (``bench_kineto``:
  28-31 µs dispatch, 39.7 µs combine, the send/recv split), so these rows are the like-for-like
  comparison; the CUDA-event rows add the launch latency and gaps between a call's kernels, and
  stay the stricter figure. The JSON names the kernels each step counted (``kernel_names``).

Timing (GPU): each iteration starts with a barrier, then a GPU delay (``torch.cuda._sleep``) and a
one-element all-reduce, as DeepEP's ``barrier_comm_profiling`` does with a GEMM and an all-reduce:
the host enqueues the calls while the GPU sleeps and the all-reduce lines the GPUs up, so the
events measure device time, not the Python launch overhead (graph replays have none anyway).
Times are medians over ``--iters`` after warm-up, the max over ranks. Bandwidth is counted as
DeepEP's test counts it: num_selections (this rank's valid top-k entries) x bytes per token
(FP8: hidden + hidden/128 x 4 scale bytes; BF16: hidden x 2) for dispatch, x hidden x 2 for
combine; GB/s is each rank's bytes over its own median, the min over ranks.

The baseline is a second Buffer built in the same processes whose backend is the reference
(``ReferenceBackend``: torch.distributed ``all_to_all_single``), called through the same API. One
correctness guard (not a test): the combine of a known toy expert output
(the dispatched rows dequantized to BF16, times a factor per expert) is checked against the
expected sum and against the baseline's result, printed as PASS/FAIL. Writes ``ll.json`` and
``ll.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
import torch.distributed as dist

from .bench import (GAP_US, HEAD_US, StepTimer, import_pyplot, int_list, merge_rows, random_routing, report_header, resolve_defaults, save_plot,
                    write_report)
from .bench_normal import WARMUP, rank_count
from .bench_trace import print_trace, trace_summary, traced_iterations
from .comm import Buffer, per_token_group_dequant_fp8
from .comm.backends.cuda import EXPERIMENTAL_ENV
from .comm.backends.low_latency import PARTIALS_ENV, partials_setting
from .comm.backends.reference import ReferenceBackend
from .comm.fp8 import FP8_GROUP_SIZE
from .launch import launch

SEND_ENV = "MOE_EP_LL_SEND"  # the kernels' FP8 send variant: direct (default) or staged
# The peer's settings (DeepEP's test_low_latency, /work/shared/ANCHORS.md) on GPUs; tiny on CPU ranks.
GPU_DEFAULTS = dict(tokens=128, hidden=7168, experts=288, top_k=8, iters=50)
CPU_DEFAULTS = dict(tokens=8, hidden=256, experts=8, top_k=4, iters=3)
GPU_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CPU_SWEEP = (1, 2, 4, 8)
MASKED_PER_MILLE = 10  # top-k entries set to -1: 10 of 128 x 8 = 1024 at the peer's settings, as DeepEP's test
EXPERT_FACTORS = 4  # toy expert e multiplies its rows by 1 + (e % 4) / 4
BACKENDS = ("buffer", "reference")
OPS = {"eager": ("dispatch", "combine", "dispatch+combine"),
       "hook": ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"),
       "graph": ("dispatch", "combine", "dispatch+combine"),
       "graph-hook": ("dispatch", "combine", "dispatch+combine"),
       # Kernel durations from torch.profiler, as DeepEP's bench_kineto reads its figures (GPU only).
       "kernels": ("dispatch", "combine", "dispatch+combine"),
       "kernels-hook": ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"),
       "kernels-graph": ("dispatch", "combine", "dispatch+combine")}
COUNTED = {"eager", "graph", "graph-hook", "kernels", "kernels-graph"}  # modes whose rows carry bytes (GB/s)
# DeepEP V1 on 2 x H200 (/work/shared/ANCHORS.md), quoted, not measured here.
PEER = {"what": "DeepEP V1 test_low_latency on 2 x H200 (NVSHMEM NVLink path), quoted from /work/shared/ANCHORS.md",
        "settings": "128 tokens/rank, hidden 7168, top-8 of 288 experts, FP8 dispatch, BF16 combine",
        "dispatch_us": "28-31", "combine_us": 39.7, "dispatch+combine_us": 71.8,
        "dispatch_gbps": "244-267", "combine_gbps": 365, "dispatch+combine_gbps": 307,
        "hook_us": {"dispatch_send": 20.2, "dispatch_recv": 8.1, "combine_send": 32.2, "combine_recv": 9.7},
        "by_tokens_us": {"32": {"dispatch": 20.6, "combine": 18.5}, "128": {"dispatch": "28-31", "combine": 39.7},
                         "256": {"dispatch": 47.0, "combine": 77.7}}}


# The settings the quoted figures and issue 5's targets are for: a run elsewhere prints ours alone.
PEER_SETTINGS = {"tokens": 128, "hidden": 7168, "experts": 288, "top_k": 8, "fp8": True}
PEER_WORLD_SIZE = 2
TARGET_US = {"dispatch": 20.0, "combine": 28.0}  # issue 5, on nvidia-h200-x2, eager and under graph replay


def against_peer(report: dict) -> dict:
    """Our dispatch and combine at --tokens beside the peer's quoted µs and issue 5's targets, timed
    as the peer times them (kernel durations: ``kernels`` and ``kernels-graph``), with the CUDA-event
    figures beside them. ``comparable``: the run used the peer's settings on its 2 ranks (else the
    quoted figures are for other sizes). ``meets_target``: both kernel figures within the target
    (None without kernel rows, e.g. CPU ranks)."""
    s = report["settings"]
    comparable = report["world_size"] == PEER_WORLD_SIZE and all(s[k] == v for k, v in PEER_SETTINGS.items())
    rows = []
    for op, target in TARGET_US.items():
        def us(mode: str) -> Optional[float]:
            row = _find(report, s["tokens"], "buffer", mode, op)
            return row["us"] if row else None

        kernel, graph = us("kernels"), us("kernels-graph")
        meets = None if kernel is None or graph is None else kernel <= target and graph <= target
        rows.append({"op": op, "kernels_us": kernel, "kernels_graph_us": graph, "eager_events_us": us("eager"),
                     "graph_events_us": us("graph"), "peer_us": report["peer"][f"{op}_us"], "target_us": target,
                     "meets_target": meets})
    return {"comparable": comparable, "tokens": s["tokens"], "rows": rows}


def _print_against_peer(summary: dict) -> None:
    def cell(value) -> str:
        return f"{value:>9.1f}" if isinstance(value, float) else f"{'-' if value is None else value:>9}"

    where = ("the peer's settings on 2 ranks: DeepEP V1 quoted from ANCHORS.md (not measured here), issue 5's target"
             if summary["comparable"] else "NOT the peer's settings or ranks: the quoted figures and targets do not apply")
    print(f"\nvs the peer at {summary['tokens']} tokens/rank, µs ({where})")
    print(f"{'op':<10}{'kernels':>9}{'k-graph':>9}{'events':>9}{'e-graph':>9}{'peer':>9}{'target':>9}  meets")
    for r in summary["rows"]:
        verdict = "-" if r["meets_target"] is None or not summary["comparable"] else ("yes" if r["meets_target"] else "no")
        print(f"{r['op']:<10}{cell(r['kernels_us'])}{cell(r['kernels_graph_us'])}{cell(r['eager_events_us'])}"
              f"{cell(r['graph_events_us'])}{cell(r['peer_us'])}{cell(r['target_us'])}  {verdict}")


# ------------------------------------------------------------------------------ options
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only this target reads (sizes, --iters and --seed are shared with the others)."""
    group = parser.add_argument_group("ll")
    group.add_argument("--sweep", type=int_list, default=None,
                       help="tokens per rank to sweep, comma-separated (default 1,2,4,...,256; CPU: 1,2,4,8); "
                            "num_max_dispatch_tokens_per_rank is the largest of these and --tokens")
    group.add_argument("--no-fp8", action="store_true", help="ll: dispatch BF16 instead of FP8")


def _resolve(args: argparse.Namespace, on_gpu: bool, world_size: int) -> dict:
    """Options for the ranks: unset sizes take the peer's settings on GPUs, tiny ones on CPU."""
    opts = resolve_defaults(args, GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)
    sweep = list(args.sweep) if args.sweep else list(GPU_SWEEP if on_gpu else CPU_SWEEP)
    fp8 = not args.no_fp8
    if min(sweep + [opts["tokens"]]) < 1:
        raise SystemExit(f"--tokens/--sweep: token counts must be >= 1, got {opts['tokens']} and {sweep}")
    if opts["iters"] < 1:
        raise SystemExit(f"--iters must be >= 1, got {opts['iters']}")
    if opts["experts"] % world_size:
        raise SystemExit(f"--experts {opts['experts']} must be divisible by the {world_size} ranks")
    if not 1 <= opts["top_k"] <= opts["experts"]:
        raise SystemExit(f"--top-k {opts['top_k']} must be in [1, --experts {opts['experts']}]")
    if fp8 and opts["hidden"] % FP8_GROUP_SIZE:
        raise SystemExit(f"--hidden {opts['hidden']} must be a multiple of {FP8_GROUP_SIZE} for FP8 (or pass --no-fp8)")
    points = sorted(set(sweep) | {opts["tokens"]})
    opts.update(sweep=sorted(set(sweep)), points=points, max_tokens=max(points), fp8=fp8, seed=getattr(args, "seed", 0),
                out=args.out, trace=bool(getattr(args, "trace", False)))
    return opts


# ------------------------------------------------------------------------------ data and buffers
def ll_routing(opts: dict, tokens: int, rank: int, device: torch.device):
    """``random_routing`` at ``tokens`` tokens, with about 1% of the top-k entries (at least one) set
    to -1 at seeded random places, as DeepEP's low-latency test does."""
    x, topk_idx, topk_weights = random_routing(dict(opts, tokens=tokens), rank, device)
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"] + 7919 * (rank + 1) + tokens)
    masked = max(1, tokens * opts["top_k"] * MASKED_PER_MILLE // 1024)
    rows = torch.randint(0, tokens, (masked,), generator=gen)
    cols = torch.randint(0, opts["top_k"], (masked,), generator=gen)
    topk_idx[rows.to(device), cols.to(device)] = -1
    return x, topk_idx, topk_weights


def dispatch_bytes_per_selection(hidden: int, fp8: bool) -> int:
    """DeepEP's count: FP8 = hidden bytes + a float32 scale per 128; BF16 = hidden x 2."""
    return hidden + hidden // FP8_GROUP_SIZE * 4 if fp8 else hidden * 2


def _uses(backend, call: str) -> bool:
    uses_kernel = getattr(backend, "uses_kernel", None)
    return bool(uses_kernel(call)) if callable(uses_kernel) else False


def _describe(buffer: Buffer) -> dict:
    backend = buffer.backend
    describe = getattr(backend, "describe", None)
    return {"name": backend.name, "describe": describe() if callable(describe) else None,
            "uses_kernel": {call: _uses(backend, call) for call in ("low_latency_dispatch", "low_latency_combine")}}


def _build_buffers(group, opts: dict, world_size: int):
    """(buffer under test, baseline, how the baseline was made, num_rdma_bytes, the ranks'
    MOE_EP_EXPERIMENTAL_KERNELS). The baseline's backend is replaced by the reference."""
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(opts["max_tokens"], opts["hidden"], world_size,
                                                           opts["experts"])
    kwargs = dict(num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                  num_qps_per_rank=max(1, opts["experts"] // world_size))
    buffer = Buffer(group, **kwargs)
    baseline = Buffer(group, **kwargs)
    if type(baseline.backend) is not ReferenceBackend:  # the kernels' backend (a ReferenceBackend subclass)
        baseline.backend = baseline.runtime = ReferenceBackend(baseline.group, baseline.device)
    how = ("a second Buffer (same arguments) whose backend is ReferenceBackend(group, device): its "
           "low_latency_dispatch/combine run torch.distributed all_to_all_single, through the same API")
    return buffer, baseline, how, num_rdma_bytes, os.environ.get(EXPERIMENTAL_ENV, "")


# ------------------------------------------------------------------------------ measurements
class _Calls:
    """The low-latency calls of one Buffer on one routing, as zero-argument steps; each dispatch
    leaves its handle for the combine after it, each send its hook for the ``recv`` step."""

    def __init__(self, buffer: Buffer, opts: dict, x, topk_idx, topk_weights, expert_out: torch.Tensor) -> None:
        self.buffer, self.opts = buffer, opts
        self.x, self.topk_idx, self.topk_weights, self.expert_out = x, topk_idx, topk_weights, expert_out
        self.handle, self.hook = None, None

    def dispatch(self, return_recv_hook: bool = False) -> None:
        _, _, self.handle, _, self.hook = self.buffer.low_latency_dispatch(
            self.x, self.topk_idx, self.opts["max_tokens"], self.opts["experts"], use_fp8=self.opts["fp8"],
            return_recv_hook=return_recv_hook)

    def combine(self, return_recv_hook: bool = False) -> None:
        _, _, self.hook = self.buffer.low_latency_combine(self.expert_out, self.topk_idx, self.topk_weights,
                                                          self.handle, return_recv_hook=return_recv_hook)

    def recv(self) -> None:
        self.hook()

    def dispatch_send(self) -> None:
        self.dispatch(True)

    def combine_send(self) -> None:
        self.combine(True)

    def dispatch_hooked(self) -> None:
        self.dispatch(True)
        self.recv()

    def combine_hooked(self) -> None:
        self.combine(True)
        self.recv()


def _capture(calls: _Calls, group, hooked: bool):
    """CUDA graphs of dispatch and of combine, plain or with their hooks (warm-up on a side stream first)."""
    dispatch, combine = (calls.dispatch_hooked, calls.combine_hooked) if hooked else (calls.dispatch, calls.combine)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            dispatch()
            combine()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier(group=group)
    dispatch_graph, combine_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(dispatch_graph):
        dispatch()
    with torch.cuda.graph(combine_graph):
        combine()
    torch.cuda.synchronize()
    return dispatch_graph, combine_graph


def _trace_engine(buffer: Buffer):
    """The Buffer's low-latency kernels' engine when it can record a phase trace, else None."""
    engine = getattr(buffer.backend, "low_latency", None)
    return engine if hasattr(engine, "enable_trace") else None


def _measure(name: str, buffer: Buffer, opts: dict, data, expert_out, timer: StepTimer, group,
             graph_errors: dict, traces: dict, kernel_names: dict) -> list[dict]:
    """This rank's rows (median ms and bytes) for one Buffer at one token count; with --trace, the
    kernels' phase trace of eager dispatch + combine into ``traces[tokens]`` (after the timed runs).
    On GPUs the ``kernels*`` rows time the same steps by their kernels' durations (profiler), and
    ``kernel_names`` records which kernels each of those steps counted (or, where the profile could
    not be split into steps on some rank, every rank's error, and those rows are left out)."""
    x, topk_idx, topk_weights = data
    tokens, iters = x.shape[0], opts["iters"]
    selections = int((topk_idx >= 0).sum().item())
    d_bytes = selections * dispatch_bytes_per_selection(opts["hidden"], opts["fp8"])
    c_bytes = selections * opts["hidden"] * 2
    calls = _Calls(buffer, opts, x, topk_idx, topk_weights, expert_out)

    def rows(mode: str, times: list[float]) -> list[dict]:
        nbytes = (d_bytes, c_bytes, d_bytes + c_bytes) if mode in COUNTED else (None,) * len(OPS[mode])
        return [{"tokens": tokens, "backend": name, "mode": mode, "op": op, "ms": ms, "bytes": b}
                for op, ms, b in zip(OPS[mode], times, nbytes)]

    def kernel_rows(mode: str, steps: list) -> list[dict]:
        # A profile that cannot be split into steps (lost records) costs these rows on every rank
        # alike (rows must line up across ranks), recorded, not the whole run.
        error = None
        try:
            times, names = timer.kernel_times(steps, iters)
        except RuntimeError as exc:
            error = f"{type(exc).__name__}: {exc}"
        errors: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        key = f"{name} {mode} tokens={tokens}"
        if any(errors):
            kernel_names[key] = {"error": errors}
            return []
        kernel_names[key] = dict(zip(OPS[mode], names))
        return rows(mode, times)

    eager_steps = [(calls.dispatch, False), (calls.combine, False)]
    hook_steps = [(calls.dispatch_send, False), (calls.recv, True), (calls.combine_send, False), (calls.recv, True)]
    out = rows("eager", timer(eager_steps, iters))
    engine = _trace_engine(buffer) if opts["trace"] and timer.cuda else None
    if engine is not None:
        traces[str(tokens)] = traced_iterations(
            engine, lambda: timer(eager_steps, 1))
    out += rows("hook", timer(hook_steps, iters)[:4])
    if timer.cuda:
        out += kernel_rows("kernels", eager_steps)
        out += kernel_rows("kernels-hook", hook_steps)
    for mode, hooked in (("graph", False), ("graph-hook", True)):
        if not timer.cuda:
            break
        error = None
        try:
            graphs = _capture(calls, group, hooked)
        except Exception as exc:  # recorded (every rank skips these graph rows alike), not fatal
            graphs, error = None, f"{type(exc).__name__}: {exc}"
        errors: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        if any(errors):
            graph_errors[f"{name} {mode} tokens={tokens}"] = errors
        else:
            dispatch_graph, combine_graph = graphs
            replays = [(dispatch_graph.replay, False), (combine_graph.replay, False)]
            out += rows(mode, timer(replays, iters))
            if not hooked:
                out += kernel_rows("kernels-graph", replays)
        del graphs
        torch.cuda.synchronize()
    return out


def _toy_factor(expert: torch.Tensor) -> torch.Tensor:
    """What toy expert e multiplies its input by: 1 + (e % 4) / 4 (exact in bf16)."""
    return 1 + (expert % EXPERT_FACTORS).float() / EXPERT_FACTORS


def _check(buffer: Buffer, baseline: Buffer, opts: dict, data, rank: int, world_size: int) -> dict:
    """Combine of a known toy expert output, from the Buffer under test, against the expected sum
    sum_k w[t, k] x factor(e_k) x x[t] (FP8/BF16 tolerance) and against the baseline's combine."""
    x, topk_idx, topk_weights = data
    num_local = opts["experts"] // world_size
    local_factor = _toy_factor(rank * num_local + torch.arange(num_local, device=x.device)).view(-1, 1, 1)
    results = {}
    for name, buf in (("buffer", buffer), ("reference", baseline)):
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, opts["max_tokens"], opts["experts"],
                                                                    use_fp8=opts["fp8"])
        rows = per_token_group_dequant_fp8(*recv_x) if opts["fp8"] else recv_x
        expert_out = (rows.float() * local_factor).to(torch.bfloat16)
        combined, _, _ = buf.low_latency_combine(expert_out, topk_idx, topk_weights, handle)
        results[name] = (combined.float(), recv_count.clone())
    valid = topk_idx >= 0
    coeff = torch.where(valid, topk_weights * _toy_factor(topk_idx.clamp(min=0)), 0.0)
    expected = x.float() * coeff.sum(1, keepdim=True)
    # FP8 e4m3 keeps 3 mantissa bits (relative error <= 1/16 per element) + bf16 roundings; BF16: roundings.
    rtol = 0.07 if opts["fp8"] else 0.01
    bound = rtol * coeff.abs().sum(1, keepdim=True) * x.float().abs() + 1e-2
    ours, ours_count = results["buffer"]
    ref, ref_count = results["reference"]
    err_expected = (ours - expected).abs()
    err_reference = (ours - ref).abs()
    violations = {"beyond_bound_vs_expected": int((err_expected > bound).sum()),
                  "beyond_bound_vs_reference": int((err_reference > bound).sum()),
                  "non_finite": int((~torch.isfinite(ours)).sum())}
    ok = not any(violations.values()) and torch.equal(ours_count, ref_count)
    return {"pass": ok, "violations": violations, "max_abs_err_expected": err_expected.max().item() if x.numel() else 0.0,
            "max_abs_err_reference": err_reference.max().item() if x.numel() else 0.0,
            "recv_count_equal": bool(torch.equal(ours_count, ref_count))}


# ------------------------------------------------------------------------------ one rank
def _bench_rank(rank: int, world_size: int, opts: dict) -> None:
    group = dist.group.WORLD
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    buffer, baseline, how, num_rdma_bytes, env_value = _build_buffers(group, opts, world_size)
    timer = StepTimer(device, group)
    num_local = opts["experts"] // world_size
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"] + 104729 + rank)
    expert_out = torch.randn(num_local, world_size * opts["max_tokens"], opts["hidden"], generator=gen)
    expert_out = expert_out.to(torch.bfloat16).to(device)
    rows, selections, graph_errors, traces, kernel_names = [], [], {}, {}, {}
    for tokens in opts["points"]:
        data = ll_routing(opts, tokens, rank, device)
        selections.append(int((data[1] >= 0).sum().item()))
        for name, buf in zip(BACKENDS, (buffer, baseline)):
            rows += _measure(name, buf, opts, data, expert_out, timer, group, graph_errors,
                             traces if name == "buffer" else {}, kernel_names)
    check = _check(buffer, baseline, opts, ll_routing(opts, opts["tokens"], rank, device), rank, world_size)
    mine = {"rows": rows, "selections": selections, "check": check, "traces": traces, "kernel_names": kernel_names}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    if rank == 0:
        info = {"buffer": _describe(buffer), "baseline": _describe(baseline), "baseline_how": how,
                "num_rdma_bytes": num_rdma_bytes, "env": env_value, "graph_errors": graph_errors,
                "graphs": on_gpu, "head_us": HEAD_US if on_gpu else None}
        report = _report(gathered, opts, world_size, dist.get_backend(group), device, info)
        report["against_peer"] = against_peer(report)
        _print(report)
        write_report(report, opts["out"], "ll", _plot)


# ------------------------------------------------------------------------------ report
def _report(gathered: list[dict], opts: dict, world_size: int, dist_backend: str, device: torch.device,
            info: dict) -> dict:
    checks = [g["check"] for g in gathered]
    if not info["graphs"]:
        graph_note = "skipped: no CUDA (CPU ranks)"
    elif info["graph_errors"]:
        graph_note = "captured and replayed, except where graph_errors says the capture failed"
    else:
        graph_note = ("graph: dispatch and combine (no hook: one kernel each) captured as two CUDA graphs after "
                      "warm-up on a side stream; graph-hook: dispatch + hook() and combine + hook() "
                      "(return_recv_hook=True: two kernels each) likewise; replays timed as eager calls are")
    timing = ("GPU: per iteration synchronize + barrier, a GPU delay (torch.cuda._sleep, head_us) and a one-element "
              "all-reduce, then CUDA events around each call: device time, host launch overhead excluded (the GPU's "
              "launch latency included; a host slower than head_us to enqueue an iteration would show in the times); "
              if info["graphs"] else "CPU: wall clock after a barrier per iteration; ")
    timing += (f"median of iters after {WARMUP} warm-up iterations; us = max over ranks of the medians. eager: "
               "dispatch then combine in one iteration (dispatch+combine = their sum); hook: send call and hook() "
               "timed separately with an untimed pause of gap_us before each hook()")
    if info["graphs"]:
        timing += ("; kernels, kernels-hook, kernels-graph: the same steps under torch.profiler, each step's time = "
                   "the summed durations of the GPU kernels it launched (as DeepEP's bench_kineto times the figures "
                   "quoted in ANCHORS.md), median over iters; kernel_names lists the kernels counted (rank 0)")
    return {
        **report_header("ll", world_size, dist_backend, device, info["buffer"]),
        "experimental_kernels_env": {EXPERIMENTAL_ENV: info["env"]},
        "send_variant": {SEND_ENV: os.environ.get(SEND_ENV) or "direct",
                         PARTIALS_ENV: partials_setting()},
        "buffer_uses_kernel": info["buffer"]["uses_kernel"],
        "baseline": {"backend": "reference", "how": info["baseline_how"], "buffer_backend": info["baseline"]["name"],
                     "describe": info["baseline"]["describe"], "uses_kernel": info["baseline"]["uses_kernel"]},
        "settings": {key: opts[key] for key in ("tokens", "hidden", "experts", "top_k", "iters", "seed", "fp8", "sweep")}
                    | {"num_max_dispatch_tokens_per_rank": opts["max_tokens"], "num_rdma_bytes": info["num_rdma_bytes"],
                       "warmup": WARMUP, "head_us": info["head_us"], "gap_us": GAP_US,
                       "masked_topk_entries": f"max(1, tokens x top_k x {MASKED_PER_MILLE} // 1024) set to -1"},
        "counting": "dispatch bytes = num_selections x (FP8: hidden + hidden/128 x 4; BF16: hidden x 2), combine bytes "
                    "= num_selections x hidden x 2, num_selections = this rank's valid top-k entries (DeepEP's test); "
                    "gbps = min over ranks of that rank's bytes / its median; hook rows carry no bytes",
        "timing": timing,
        "graph": graph_note,
        "graph_errors": info["graph_errors"],
        "num_selections_per_rank": [{"tokens": t, "per_rank": [g["selections"][i] for g in gathered]}
                                    for i, t in enumerate(opts["points"])],
        "correctness": {"pass": all(c["pass"] for c in checks),
                        "max_abs_err_expected": max(c["max_abs_err_expected"] for c in checks),
                        "max_abs_err_reference": max(c["max_abs_err_reference"] for c in checks),
                        "recv_count_equal": all(c["recv_count_equal"] for c in checks),
                        "violations": {key: sum(c["violations"][key] for c in checks) for key in checks[0]["violations"]},
                        "what": f"at {opts['tokens']} tokens/rank: combine of the dispatched rows dequantized to bf16, "
                                f"times 1 + (expert % 4)/4 per expert, == sum_k w x factor x x within "
                                f"{'FP8 (7%)' if opts['fp8'] else 'BF16 (1%)'} of sum_k |w x factor x x| + 0.01, and "
                                f"== the baseline's combine within the same bound; recv_count equal"},
        "rows": merge_rows([g["rows"] for g in gathered]),
        "kernel_names": gathered[0]["kernel_names"],
        # One GPU per rank: each rank's clock, so each rank is measured from its own start.
        "trace": {tokens: trace_summary([g["traces"][tokens] for g in gathered], shared_clock=False)
                  for tokens in gathered[0]["traces"] if all(tokens in g["traces"] for g in gathered)},
        "peer": PEER,
    }


def _find(report: dict, tokens: int, backend: str, mode: str, op: str) -> Optional[dict]:
    for row in report["rows"]:
        if (row["tokens"], row["backend"], row["mode"], row["op"]) == (tokens, backend, mode, op):
            return row
    return None


def _cell(row: Optional[dict], gbps: bool = True) -> str:
    if row is None:
        return f"{'-':>10}" + (f"{'-':>8}" if gbps else "")
    text = f"{row['us']:>10.1f}"
    if gbps:
        text += f"{row['gbps']:>8.1f}" if row["gbps"] is not None else f"{'-':>8}"
    return text


def _print(report: dict) -> None:
    s = report["settings"]
    verdict = "PASS" if report["correctness"]["pass"] else "FAIL"
    used = report["buffer_uses_kernel"]
    print(f"ll benchmark: {report['world_size']} ranks ({report['dist_backend']}, {report['device']}); "
          f"{s['tokens']} tokens/rank, hidden {s['hidden']}, top-{s['top_k']} of {s['experts']} experts, "
          f"{'FP8' if s['fp8'] else 'BF16'} dispatch, BF16 combine, median of {s['iters']}, "
          f"num_max_dispatch_tokens_per_rank {s['num_max_dispatch_tokens_per_rank']}", flush=True)
    print(f"buffer backend={report['buffer_backend']} ({EXPERIMENTAL_ENV}={report['experimental_kernels_env'][EXPERIMENTAL_ENV]}, "
          f"{SEND_ENV}={report['send_variant'][SEND_ENV]}, "
          f"{PARTIALS_ENV}={report['send_variant'][PARTIALS_ENV]}): "
          f"low-latency kernels ran for dispatch: {'yes' if used['low_latency_dispatch'] else 'no'}, "
          f"combine: {'yes' if used['low_latency_combine'] else 'no'}")
    if report["buffer_backend_describe"]:
        print(report["buffer_backend_describe"])
    print(f"baseline: {report['baseline']['how']}")
    c = report["correctness"]
    print(f"correctness (combine of a toy expert output vs expected and vs baseline): {verdict} "
          f"(max abs err {c['max_abs_err_expected']:.3g} vs expected, {c['max_abs_err_reference']:.3g} vs baseline; "
          f"elements beyond the bound, all ranks: {c['violations']}; recv_count equal: {c['recv_count_equal']})")
    print(f"graphs: {report['graph']}")
    for where, errors in report["graph_errors"].items():
        print(f"  graph capture failed for {where}: {errors}")
    for where, names in report.get("kernel_names", {}).items():
        if "error" in names:
            print(f"  kernel durations not measured for {where}: {names['error']}")
    tokens = s["tokens"]
    print(f"\nat {tokens} tokens/rank          {'ours µs':>10}{'GB/s':>8}{'ref µs':>10}{'GB/s':>8}{'ref/ours':>10}")
    for mode, ops in OPS.items():
        for op in ops:
            ours, ref = (_find(report, tokens, b, mode, op) for b in BACKENDS)
            if ours is None and ref is None:
                continue
            ratio = f"{ref['us'] / ours['us']:>9.2f}x" if ours and ref and ours["us"] > 0 else f"{'-':>10}"
            print(f"{op:<18}{mode:<11}{_cell(ours)}{_cell(ref)}{ratio}")
    modes = [m for m in ("eager", "graph", "kernels") if any(r["mode"] == m for r in report["rows"])]
    print("\nlatency vs tokens per rank (µs, max over ranks): dispatch / combine / dispatch+combine")
    label = {"buffer": "ours", "reference": "reference"}
    print(f"{'tokens':>6}" + "".join(f"{label[b] + ' ' + m:>27}" for b in BACKENDS for m in modes))
    for t in sorted({row["tokens"] for row in report["rows"]}):
        cells = []
        for b in BACKENDS:
            for m in modes:
                rows = [_find(report, t, b, m, op) for op in OPS[m]]
                cells.append(" / ".join(f"{r['us']:.1f}" if r else "-" for r in rows))
        print(f"{t:>6}" + "".join(f"{cell:>27}" for cell in cells))
    if "against_peer" in report:
        _print_against_peer(report["against_peer"])
    print_trace(report.get("trace", {}), "µs after this rank's first dispatch block started: each GPU has its own clock")
    if report["device"] != "cpu":
        p = report["peer"]
        print(f"peer, quoted (not measured here): {p['what']}: dispatch {p['dispatch_us']} µs, combine "
              f"{p['combine_us']} µs, dispatch+combine {p['dispatch+combine_us']} µs at {p['settings']}")
    print(flush=True)


def _plot(report: dict, path: str) -> str:
    """Latency vs tokens per rank (log2 axis): ours and the baseline, eager and graph replay.
    matplotlib is optional."""
    plt = import_pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install '.[plot]'): ll.png skipped"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = [("buffer", "eager", "dispatch", "-"), ("buffer", "eager", "combine", "-"),
             ("buffer", "eager", "dispatch+combine", "-"), ("buffer", "graph", "dispatch+combine", "-."),
             ("buffer", "kernels", "dispatch+combine", "-"),
             ("reference", "eager", "dispatch+combine", "--"), ("reference", "graph", "dispatch+combine", ":")]
    for backend, mode, op, style in lines:
        points = sorted((r["tokens"], r["us"]) for r in report["rows"]
                        if (r["backend"], r["mode"], r["op"]) == (backend, mode, op))
        if points:
            label = f"{'ours' if backend == 'buffer' else 'reference'} {op} ({mode})"
            ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    s = report["settings"]
    ax.set(xlabel="tokens per rank", ylabel="µs (max over ranks)",
           title=f"low-latency dispatch/combine, {report['world_size']} ranks, {report['buffer_backend']} backend\n"
                 f"H={s['hidden']}, top-{s['top_k']} of {s['experts']}, {'FP8' if s['fp8'] else 'BF16'} dispatch")
    return save_plot(plt, fig, ax, path, grid_which="both")


# ------------------------------------------------------------------------------ entry point
def bench_ll(args: argparse.Namespace) -> None:
    """Start one rank per local GPU (NCCL), or ``--ranks`` gloo ranks without GPUs, and run it all."""
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    nproc = rank_count(args, on_gpu)
    opts = _resolve(args, on_gpu, nproc)
    os.makedirs(opts["out"], exist_ok=True)
    launch(_bench_rank, nproc, "nccl" if on_gpu else "gloo", args=(opts,))
