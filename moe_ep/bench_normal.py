"""``python -m moe_ep.bench normal``: the normal (prefill) dispatch/combine kernels, timed as DeepEP's
own intranode test times them, beside what the machine itself reaches in the same run.

One process per local GPU (NCCL); with no GPU, 2 CPU ranks over gloo at tiny sizes (a smoke test:
the figures mean nothing there). On one routing (random top-k without duplicates, uniform over
experts, seeded), for every SM count of ``--sms`` and chunk size of ``--chunks``:

* ``dispatch_fp8``, ``dispatch_bf16``: cached dispatch (``handle=``), which is what DeepEP's test
  times; ``dispatch_bf16_routed``: a dispatch from the layout (routing exchange and top-k carried
  along), which is what each MoE layer of a forward pass pays;
* ``combine_bf16``: the dispatched BF16 rows combined with their handle;
* with ``--isolate`` (intranode kernels only), ``dispatch_fp8_no_copy_out`` and
  ``dispatch_bf16_no_copy_out``: the cached dispatches with the receivers' copy-out of the peers'
  rows left out, at every SM count: a diagnostic of what that pass costs (outputs not valid).

Reference rows, not the Buffer: ``all_to_all_single`` of the BF16 dispatch's bytes with the same
per-rank split sizes, and the copy ceiling (GPU r -> GPU (r+1) % R on every rank at once; one GPU:
a local copy counted as read + write bytes).

Bandwidth is counted as DeepEP's test counts it: rows this rank receives, its own included,
x hidden x 2 bytes (x (1 + 4/128) / 2 for FP8, the scales included); combine sends the same rows
back. Times are medians over ``--iters`` (CUDA events; every iteration starts with the ranks
aligned on the GPU and the host ahead, as ``bench.StepTimer`` does), the max over ranks; GB/s is each rank's
bytes over its own median, the min over ranks. Writes ``normal.json`` and ``normal.png`` to
``--out``. A benchmark measures: the one correctness check (combine of the dispatch = x times the
number of ranks the token went to) is printed as PASS/FAIL, and no timing is asserted.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
import torch.distributed as dist

from .bench import (backend_info, import_pyplot, int_list, merge_rows, random_routing, report_header, resolve_defaults,
                    save_plot, StepTimer, write_report)
from .comm import Buffer, Config, per_token_group_quant_fp8
from .comm.backends.intranode import IntranodeKnobs
from .comm.config import default_combine_config, default_dispatch_config
from .launch import launch

# The peer's settings (DeepEP's test_intranode, /work/shared/ANCHORS.md) on GPUs; tiny on CPU ranks.
GPU_DEFAULTS = dict(tokens=4096, hidden=7168, experts=256, top_k=8, iters=20)
CPU_DEFAULTS = dict(tokens=128, hidden=512, experts=16, top_k=4, iters=5)
CPU_RANKS = 2
DEFAULT_SMS = (8, 12, 16, 20, 24, 32)
NVL_RECV_CHUNK = 256          # DeepEP's test: Config(num_sms, nvl_chunk_size, nvl_buffer_size=256)
MIN_NVL_BYTES = int(2e9)
WARMUP = 3
FP8_BYTES_FACTOR = (1 + 4 / 128) / 2   # FP8 payload + float32 scale per 128 elements, relative to BF16
COPY_BYTES = {"cuda": 1 << 30, "cpu": 8 << 20}
# The intranode kernels' tuning knobs (IntranodeKnobs: the engine's, set alike on every rank): the
# sweep runs around the knobs the environment sets (MOE_EP_INTRANODE_*), the defaults where unset.
KNOB_DEFAULTS = {name: getattr(IntranodeKnobs.from_env(), name) for name in IntranodeKnobs.ALLOWED}
# The variants each knob's option sweeps by default (the default value among them is skipped).
KNOB_VARIANTS = (("unroll", (4, 8, 16), "16-byte vectors in flight per lane in the copies"),
                 ("chunk_rows", (4, 8, 16), "rows per flag"),
                 ("send_warps", (4, 6, 8), "dispatch sender warps per 16-warp block"),
                 ("combine_send_warps", (2, 4, 6), "combine sender warps per 16-warp block"),
                 ("combine_staged_vectors", (0, 16, 24), "vectors per lane in the combine's cp.async ring (0: registers)"),
                 ("direct_send_warps", (6, 8, 12), "dispatch sender warps with a receive pool: the --recv-pool rows' "
                                                   "sweep (0: 8 for 2 ranks, 12 for more)"))
DIRECT_KNOB = "direct_send_warps"  # swept by the --recv-pool rows, not beside the plain engine's defaults
assert {key for key, _, _ in KNOB_VARIANTS} == set(IntranodeKnobs.ALLOWED), "every knob needs its option"
OPS = ("dispatch_fp8", "dispatch_bf16", "dispatch_bf16_routed", "combine_bf16")


# ------------------------------------------------------------------------------ options
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only this target reads (the sizes and --iters are shared with ``layer``)."""
    group = parser.add_argument_group("normal")
    group.add_argument("--sms", type=int_list, default=list(DEFAULT_SMS),
                       help="SM counts to sweep, comma-separated, each even (default 8,12,16,20,24,32)")
    group.add_argument("--chunks", type=int_list, default=None,
                       help="tokens per NVLink chunk (Config.num_max_nvl_chunked_send_tokens) to sweep, "
                            "comma-separated, each < 256 (default: the tuned config of each op)")
    group.add_argument("--nvl-bytes", type=int, default=None,
                       help="Buffer num_nvl_bytes (default: 2e9 or the largest config's hint on GPUs, 0 on CPU)")
    group.add_argument("--seed", type=int, default=0, help="routing and data seed (rank r uses seed + r)")
    group.add_argument("--isolate", action="store_true",
                       help="normal and loopback: also time the cached dispatches with the receivers' copy-out of "
                            "peer rows left out (a diagnostic of the intranode kernels: outputs not valid) at every "
                            "--sms, to show what that pass costs")
    group.add_argument("--recv-pool", type=int, default=0, metavar="BYTES",
                       help="normal and loopback: also time the dispatches with a receive pool of BYTES per rank "
                            "(MOE_EP_RECV_POOL_BYTES: peers store rows straight into the outputs), rows *_direct, "
                            "at every --sms with each --direct-send-warps (default 0: not timed)")
    for key, values, what in KNOB_VARIANTS:
        allowed = ", ".join(map(str, IntranodeKnobs.ALLOWED[key]))
        where = ("each timed in the --recv-pool rows" if key == DIRECT_KNOB else
                 f"variants timed at 12 and 24 SMs beside the default {KNOB_DEFAULTS[key]}, the default itself skipped")
        group.add_argument(f"--{key.replace('_', '-')}", type=int_list, default=list(values),
                           help=f"{what} (IntranodeKnobs.{key}), {where} (default {','.join(map(str, values))}; the "
                                f"kernels accept {allowed})")


def check_sms(sms: list[int]) -> None:
    """--sms: every count even and >= 2 (the kernels' SM counts, as DeepEP's Config takes them)."""
    bad = [n for n in sms if n < 2 or n % 2]
    if bad:
        raise SystemExit(f"--sms: every SM count must be even and >= 2, got {bad}")


def knob_variants(args: argparse.Namespace) -> dict[str, list[int]]:
    """Each knob's variants from its option, checked, the default value left out; the direct-receive
    knob's values whole (they sweep the --recv-pool rows instead)."""
    variants = {}
    for key, allowed in IntranodeKnobs.ALLOWED.items():
        values = getattr(args, key)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"--{key.replace('_', '-')}: each value must be one of {allowed}, got {bad}")
        variants[key] = list(values) if key == DIRECT_KNOB else [v for v in values if v != KNOB_DEFAULTS[key]]
    return variants


def _resolve(args: argparse.Namespace, on_gpu: bool) -> dict:
    """Options for the ranks: unset sizes take the peer's settings on GPUs, tiny ones on CPU."""
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    opts = resolve_defaults(args, defaults)
    check_sms(args.sms)
    if args.chunks and any(not 1 <= c < NVL_RECV_CHUNK for c in args.chunks):
        raise SystemExit(f"--chunks: every chunk must be in [1, {NVL_RECV_CHUNK}), got {args.chunks}")
    if opts["top_k"] > opts["experts"]:
        raise SystemExit(f"--top-k {opts['top_k']} exceeds --experts {opts['experts']}")
    variants = knob_variants(args)
    if args.recv_pool < 0:
        raise SystemExit(f"--recv-pool must be >= 0 bytes, got {args.recv_pool}")
    opts.update(recv_pool=args.recv_pool, isolate=args.isolate, sms=list(args.sms),
                chunks=list(args.chunks) if args.chunks else [None], nvl_bytes=args.nvl_bytes, seed=args.seed,
                out=args.out, **{DIRECT_KNOB: variants.pop(DIRECT_KNOB)}, variants=variants)
    return opts


# ------------------------------------------------------------------------------ data and configs
def _configs(num_ranks: int, num_sms: int, chunk: Optional[int]) -> tuple[Config, Config]:
    """(dispatch, combine) configs: DeepEP's test's ``Config(num_sms, chunk, 256)``, or the tuned
    default of each op when no chunk is swept."""
    if chunk is None:
        return default_dispatch_config(num_ranks, num_sms), default_combine_config(num_ranks, num_sms)
    config = Config(num_sms, chunk, NVL_RECV_CHUNK)
    return config, config


def _nvl_bytes(opts: dict, num_ranks: int, device: torch.device) -> int:
    """``num_nvl_bytes``: what was asked, else (GPU) at least 2e9 and every swept config's hint."""
    if opts["nvl_bytes"] is not None:
        return opts["nvl_bytes"]
    if device.type != "cuda":
        return 0
    hints = [cfg.get_nvl_buffer_size_hint(opts["hidden"] * 2, num_ranks)
             for sms in opts["sms"] for chunk in opts["chunks"] for cfg in _configs(num_ranks, sms, chunk)]
    return max([MIN_NVL_BYTES, *hints])


# ------------------------------------------------------------------------------ measurements
def _calls(buffer: Buffer, opts: dict, x, topk_idx, topk_weights, layout, handle, recv_x, num_sms: int,
           chunk: Optional[int]) -> dict:
    """Each op as (call, bytes counted, its config) at one (SMs, chunk)."""
    per_rank, _, per_expert, in_rank, _ = layout
    x_fp8 = per_token_group_quant_fp8(x)
    bf16_bytes = recv_x.shape[0] * opts["hidden"] * 2
    dispatch_cfg, combine_cfg = _configs(buffer.group_size, num_sms, chunk)
    return {
        "dispatch_fp8": (lambda: buffer.dispatch(x_fp8, handle=handle, config=dispatch_cfg),
                         bf16_bytes * FP8_BYTES_FACTOR, dispatch_cfg),
        "dispatch_bf16": (lambda: buffer.dispatch(x, handle=handle, config=dispatch_cfg), bf16_bytes, dispatch_cfg),
        "dispatch_bf16_routed": (lambda: buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_cfg), bf16_bytes, dispatch_cfg),
        "combine_bf16": (lambda: buffer.combine(recv_x, handle, config=combine_cfg), bf16_bytes, combine_cfg),
    }


def _sweep(buffer: Buffer, opts: dict, x, topk_idx, topk_weights, layout, handle, recv_x, timer) -> list[dict]:
    """Every op at every (SMs, chunk) with the default knobs, then each knob's variants (--unroll,
    --chunk-rows, --send-warps, --combine-send-warps, --combine-staged-vectors) at 12 and 24 SMs when the intranode kernels
    run (every rank sets the same ones), then the --isolate rows: this rank's median ms and bytes."""
    group, iters = buffer.group, opts["iters"]
    engine = getattr(buffer.backend, "intranode", None)
    variant_sms = [sms for sms in (12, 24) if sms in opts["sms"]] if engine is not None else []
    points = [(sms, chunk, KNOB_DEFAULTS) for sms in opts["sms"] for chunk in opts["chunks"]]
    points += [(sms, chunk, {**KNOB_DEFAULTS, key: value}) for key, values in opts["variants"].items()
               for value in values for sms in variant_sms for chunk in opts["chunks"]]
    rows = []
    try:
        for num_sms, chunk, knobs in points:
            Buffer.set_num_sms(num_sms)
            if engine is not None:
                engine.knobs = IntranodeKnobs(**knobs)
            calls = _calls(buffer, opts, x, topk_idx, topk_weights, layout, handle, recv_x, num_sms, chunk)
            for op in OPS:
                fn, nbytes, cfg = calls[op]
                ms = timer(fn, iters, WARMUP, group)
                rows.append({"op": op, "sms": num_sms, "chunk": cfg.num_max_nvl_chunked_send_tokens, **knobs,
                             "ms": ms, "bytes": nbytes})
        if opts["isolate"] and engine is not None:  # a diagnostic, last: its outputs are not valid
            engine.knobs, engine.diagnostic_skip_peer_copy = IntranodeKnobs(**KNOB_DEFAULTS), True
            for num_sms in opts["sms"]:
                Buffer.set_num_sms(num_sms)
                calls = _calls(buffer, opts, x, topk_idx, topk_weights, layout, handle, recv_x, num_sms, None)
                for op in ("dispatch_fp8", "dispatch_bf16"):
                    fn, nbytes, cfg = calls[op]
                    ms = timer(fn, iters, WARMUP, group)
                    rows.append({"op": f"{op}_no_copy_out", "sms": num_sms, "chunk": cfg.num_max_nvl_chunked_send_tokens,
                                 **KNOB_DEFAULTS, "ms": ms, "bytes": nbytes})
    finally:
        if engine is not None:
            engine.knobs = IntranodeKnobs(**KNOB_DEFAULTS)
            engine.diagnostic_skip_peer_copy = False
    return rows


def _breakdown(buffer: Buffer, opts: dict, x, topk_idx, topk_weights, layout, handle, recv_x) -> dict:
    """Per-step GPU time of each op at 24 SMs (or the largest swept count below it), from the
    intranode engine's CUDA events: what bounds each op. Empty without the kernels."""
    engine = getattr(buffer.backend, "intranode", None)
    if engine is None:
        return {}
    eligible = [n for n in opts["sms"] if n <= 24] or opts["sms"]
    num_sms = max(eligible)
    Buffer.set_num_sms(num_sms)
    calls = _calls(buffer, opts, x, topk_idx, topk_weights, layout, handle, recv_x, num_sms, None)
    steps: dict = {"sms": num_sms}
    for op in OPS:
        fn = calls[op][0]
        fn()  # warm
        dist.barrier(group=buffer.group)
        engine.profile = []
        fn()
        torch.cuda.synchronize()
        timings: dict[str, float] = {}
        for name, start, end in engine.profile:
            timings[name] = timings.get(name, 0.0) + start.elapsed_time(end) * 1e3
        engine.profile = None
        steps[op] = timings
    return steps


def _all_to_all_row(buffer: Buffer, opts: dict, per_rank: torch.Tensor, timer) -> dict:
    """``all_to_all_single`` moving what the BF16 dispatch moves: the same rows from each rank to
    each rank (its own included), hidden x 2 bytes each."""
    group, hidden = buffer.group, opts["hidden"]
    send_counts = per_rank.to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    send = torch.randn(sum(send_splits), hidden, device=per_rank.device).to(torch.bfloat16)
    recv = send.new_empty((sum(recv_splits), hidden))
    ms = timer(lambda: dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group),
               opts["iters"], WARMUP, group)
    name = dist.get_backend(group)
    return {"op": f"{name} all_to_all_single", "sms": None, "chunk": None, "ms": ms,
            "bytes": sum(recv_splits) * hidden * 2,
            "what": f"{name} all_to_all_single of the BF16 dispatch's bytes, same per-rank split sizes"}


def _copy_row(num_ranks: int, device: torch.device, opts: dict, timer) -> dict:
    """The copy ceiling: GPU r -> GPU (r + 1) % R on every rank at once (copy engine), or with one
    rank / on CPU a local copy counted as read + write bytes."""
    numel = COPY_BYTES[device.type]
    src = torch.empty(numel, dtype=torch.uint8, device=device)
    if device.type == "cuda" and num_ranks > 1:
        peer = torch.device("cuda", (device.index + 1) % min(num_ranks, torch.cuda.device_count()))
        dst = torch.empty(numel, dtype=torch.uint8, device=peer)
        op, what, nbytes = "p2p copy", f"copy_ cuda:r -> cuda:(r+1)%{num_ranks}, all ranks at once", numel
    else:
        dst = torch.empty_like(src)
        where = "one GPU" if device.type == "cuda" else "host memory (CPU smoke test, no P2P)"
        op, what, nbytes = "local copy", f"copy_ within {where}, read + write bytes", 2 * numel
    ms = timer(lambda: dst.copy_(src), opts["iters"], WARMUP, dist.group.WORLD)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"op": op, "sms": None, "chunk": None, "ms": ms, "bytes": nbytes, "what": what}


def _check_combine(buffer: Buffer, x: torch.Tensor, recv_x: torch.Tensor, handle, in_rank: torch.Tensor) -> dict:
    """Combine of the dispatched BF16 rows must give x times the number of ranks each token went to
    (each rank returns its copy unchanged; the sum is in float32, cast to bf16 once)."""
    combined, _, _ = buffer.combine(recv_x, handle)
    expected = x.float() * in_rank.sum(1, keepdim=True).float()
    err = (combined.float() - expected).abs().max().item() if x.numel() else 0.0
    ok = bool(torch.allclose(combined.float(), expected, rtol=1e-2, atol=1e-2))
    return {"pass": ok, "max_abs_err": err}


# ------------------------------------------------------------------------------ one rank
def _bench_rank(rank: int, world_size: int, opts: dict) -> None:
    group = dist.group.WORLD
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    # Ranks aligned on the GPU, host ahead (bench.StepTimer): device time, not launch skew; the same
    # timer times the NCCL and copy reference rows.
    step_timer = StepTimer(device, dist.group.WORLD)
    timer = lambda fn, iters, warmup, group=None: step_timer.time_one(fn, iters, warmup)  # noqa: E731
    x, topk_idx, topk_weights = random_routing(opts, rank, device)
    nvl_bytes = _nvl_bytes(opts, world_size, device)
    buffer = Buffer(group, num_nvl_bytes=nvl_bytes)
    layout = buffer.get_dispatch_layout(topk_idx, opts["experts"])
    per_rank, _, per_expert, in_rank, _ = layout
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                 topk_weights=topk_weights)
    rows = _sweep(buffer, opts, x, topk_idx, topk_weights, layout, handle, recv_x, timer)
    direct = {}
    if opts["recv_pool"] and on_gpu:
        direct = _direct_rows(opts, group, nvl_bytes, x, topk_idx, topk_weights, recv_x, handle, timer)
        rows += direct.pop("rows")
    references = [_all_to_all_row(buffer, opts, per_rank, timer), _copy_row(world_size, device, opts, timer)]
    check = _check_combine(buffer, x, recv_x, handle, in_rank)
    breakdown = _breakdown(buffer, opts, x, topk_idx, topk_weights, layout, handle, recv_x) if on_gpu else {}
    mine = {"rows": rows, "references": references, "check": check, "recv_rows": recv_x.shape[0],
            "breakdown": breakdown, "direct": direct}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    if rank == 0:
        report = _report(gathered, opts, world_size, dist.get_backend(group), device, nvl_bytes, backend_info(buffer))
        _print(report)
        _write(report, opts["out"])


DIRECT_OPS = ("dispatch_fp8", "dispatch_bf16", "dispatch_bf16_routed")


def _direct_rows(opts: dict, group, nvl_bytes: int, x, topk_idx, topk_weights, recv_x, handle, timer) -> dict:
    """--recv-pool: a second Buffer whose intranode engine has a receive pool (peers store rows
    straight into the outputs); its routed and cached dispatch outputs must equal the first
    Buffer's bit for bit, then the dispatches are timed at every --sms with each --direct-send-warps
    (rows ``*_direct``). Empty where the Buffer runs no intranode kernels."""
    from .comm.recv_pool import RECV_POOL_ENV

    previous = os.environ.get(RECV_POOL_ENV)
    os.environ[RECV_POOL_ENV] = str(opts["recv_pool"])
    try:
        buffer = Buffer(group, num_nvl_bytes=nvl_bytes)
    finally:
        if previous is None:
            os.environ.pop(RECV_POOL_ENV, None)
        else:
            os.environ[RECV_POOL_ENV] = previous
    engine = getattr(buffer.backend, "intranode", None)
    if engine is None or engine.recv_pool is None:
        return {"rows": []}
    layout = buffer.get_dispatch_layout(topk_idx, opts["experts"])
    per_rank, _, per_expert, in_rank, _ = layout
    recv_d, _, _, _, handle_d, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                   topk_weights=topk_weights)
    cached_d = buffer.dispatch(x, handle=handle_d)[0]
    # Combine with its input in the pool (as the layer makes it): peers read it in place; it must
    # equal the same Buffer's combine of a copy outside the pool (pushed) bit for bit.
    pull_x = buffer.empty_combine_input(recv_d.shape[0], recv_d.shape[1], recv_d.dtype).copy_(recv_d)
    pulls = engine.pull_calls
    pulled = buffer.combine(pull_x, handle_d)[0]
    pushed = buffer.combine(recv_x.clone(), handle_d)[0]
    equal = (torch.equal(recv_d, recv_x) and torch.equal(cached_d, recv_x) and torch.equal(handle_d[2], handle[2])
             and torch.equal(pulled, pushed) and engine.pull_calls == pulls + 1)
    rows = []
    try:
        for num_sms in opts["sms"]:
            for send_warps in opts[DIRECT_KNOB]:
                knobs = {**KNOB_DEFAULTS, DIRECT_KNOB: send_warps}
                Buffer.set_num_sms(num_sms)
                engine.knobs = IntranodeKnobs(**knobs)
                calls = _calls(buffer, opts, x, topk_idx, topk_weights, layout, handle_d, recv_d, num_sms, None)
                for op in DIRECT_OPS:
                    fn, nbytes, cfg = calls[op]
                    ms = timer(fn, opts["iters"], WARMUP, group)
                    rows.append({"op": f"{op}_direct", "sms": num_sms, "chunk": cfg.num_max_nvl_chunked_send_tokens,
                                 **knobs, "ms": ms, "bytes": nbytes})
            engine.knobs = IntranodeKnobs(**KNOB_DEFAULTS)  # a pulled combine has no senders: one row per SM count
            fn, nbytes, cfg = _calls(buffer, opts, x, topk_idx, topk_weights, layout, handle_d, pull_x, num_sms,
                                     None)["combine_bf16"]
            ms = timer(fn, opts["iters"], WARMUP, group)
            rows.append({"op": "combine_bf16_pull", "sms": num_sms, "chunk": cfg.num_max_nvl_chunked_send_tokens,
                         **KNOB_DEFAULTS, "ms": ms, "bytes": nbytes})
    finally:
        engine.knobs = IntranodeKnobs(**KNOB_DEFAULTS)
    return {"rows": rows, "equal": bool(equal), "direct_calls": engine.direct_calls, "pull_calls": engine.pull_calls,
            "overflows": engine.recv_pool.overflows}


# ------------------------------------------------------------------------------ report
def _report(gathered: list[dict], opts: dict, world_size: int, dist_backend: str, device: torch.device,
            nvl_bytes: int, backend: dict) -> dict:
    checks = [g["check"] for g in gathered]
    return {
        **report_header("normal", world_size, dist_backend, device, backend),
        "settings": {key: opts[key] for key in ("tokens", "hidden", "experts", "top_k", "iters", "seed", "sms")}
                    | {"chunks": opts["chunks"] if opts["chunks"] != [None] else "tuned default per op",
                       "nvl_bytes": nvl_bytes, "warmup": WARMUP},
        "timing": "CUDA events around each call; every iteration starts with synchronize + barrier, a GPU delay "
                  "and a one-element all-reduce, so the ranks start together and the host is ahead (bench.StepTimer): "
                  "device time, host launch skew excluded; a host wait inside a call (routed dispatch) still counts",
        "counting": "GB/s = rows received by the rank (local included) x hidden x 2 bytes (x (1+4/128)/2 for FP8) "
                    "/ that rank's median; gbps is the min over ranks, us the max over ranks of the median",
        "ops": {"dispatch_fp8": "cached dispatch (handle=) of (x_fp8, 1x128 scales), as DeepEP's test times it",
                "dispatch_bf16": "cached dispatch (handle=) of bf16 x, as DeepEP's test times it",
                "dispatch_bf16_routed": "dispatch from the layout, top-k carried along (what each layer pays)",
                "combine_bf16": "combine of the dispatched bf16 rows with their handle",
                "*_direct": "(--recv-pool) the dispatch on a Buffer with a receive pool: peers store rows straight "
                            "into the outputs",
                "combine_bf16_pull": "(--recv-pool) combine on that Buffer with its input from empty_combine_input "
                                     "(in the pool): peers read the rows in place, nothing is sent",
                "*_no_copy_out": "(--isolate) the cached dispatch with the receivers' copy-out of peer rows left out: "
                                 "a diagnostic of what that pass costs, outputs not valid"},
        "recv_rows_per_rank": [g["recv_rows"] for g in gathered],
        "correctness": {"pass": all(c["pass"] for c in checks), "max_abs_err": max(c["max_abs_err"] for c in checks),
                        "what": "combine(dispatch(x)) == x * ranks the token went to (bf16 tolerance)"},
        "rows": (rows := merge_rows([g["rows"] for g in gathered])),
        "best_within_sms": best_within_sms(rows),
        "reference_rows": merge_rows([g["references"] for g in gathered]),
        "direct": ({"equal": all(g["direct"].get("equal", False) for g in gathered),
                    "direct_calls": [g["direct"].get("direct_calls") for g in gathered],
                    "pull_calls": [g["direct"].get("pull_calls") for g in gathered],
                    "overflows": [g["direct"].get("overflows") for g in gathered],
                    "what": "--recv-pool: outputs of a Buffer with a receive pool equal the plain Buffer's bit for "
                            "bit, and its combine read in place equals its pushed one; direct_calls: its dispatches "
                            "whose outputs were all in the pool; pull_calls: its combines read in place"}
                   if any(g["direct"] for g in gathered) else None),
        "breakdown_per_rank": [g["breakdown"] for g in gathered],
        "breakdown_what": "GPU µs of each engine step (notify + host wait, transfer; barrier, combine) in one "
                          "call of each op, per rank (empty without the intranode kernels)",
    }


# DeepEP V1's own test on 2 x H200 (/work/shared/ANCHORS.md: quoted, not measured here), GB/s at the
# peer's settings with its best chunk size per SM count. Printed beside our best at the same SM
# budget only when a run uses those settings on 2 ranks.
PEER_SETTINGS = {"tokens": 4096, "hidden": 7168, "top_k": 8, "experts": 256}
PEER_GBPS = {8: {"dispatch_fp8": 93.3, "dispatch_bf16": 120.5, "combine_bf16": 117.8},
             12: {"dispatch_fp8": 135.9, "dispatch_bf16": 160.6, "combine_bf16": 170.5},
             24: {"dispatch_fp8": 248.7, "dispatch_bf16": 341.4, "combine_bf16": 293.1},
             32: {"dispatch_fp8": 314.7, "dispatch_bf16": 405.1, "combine_bf16": 367.2}}
# Our op -> the peer's op it is compared with (the receive pool's rows do the same job).
PEER_OP = {"dispatch_fp8": "dispatch_fp8", "dispatch_fp8_direct": "dispatch_fp8", "dispatch_bf16": "dispatch_bf16",
           "dispatch_bf16_direct": "dispatch_bf16", "combine_bf16": "combine_bf16", "combine_bf16_pull": "combine_bf16"}


def best_within_sms(rows: list[dict]) -> dict[int, dict[str, dict]]:
    """{SM budget: {op: the fastest row (GB/s, min over ranks) with at most that many SMs}} over the
    SM counts swept, any chunk size and knob (what a user who gives the kernels that many SMs gets);
    the --isolate diagnostics, whose outputs are not valid, are left out."""
    timed = [r for r in rows if r.get("sms") is not None and not r["op"].endswith("_no_copy_out")]
    best: dict[int, dict[str, dict]] = {}
    for budget in sorted({r["sms"] for r in timed}):
        per_op: dict[str, dict] = {}
        for row in timed:
            if row["sms"] <= budget and row["gbps"] > per_op.get(row["op"], {}).get("gbps", -1.0):
                per_op[row["op"]] = row
        best[budget] = {op: {"gbps": r["gbps"], "us": r["us"], "sms": r["sms"], "chunk": r["chunk"]}
                        for op, r in per_op.items()}
    return best


def _print_best(report: dict) -> None:
    best = report.get("best_within_sms") or {}
    if not best:
        return
    s = report["settings"]
    peer = report["world_size"] == 2 and all(s[k] == v for k, v in PEER_SETTINGS.items())
    budgets = sorted(best)
    ops = sorted({op for per_op in best.values() for op in per_op})
    print("best within an SM budget, GB/s (min over ranks)" +
          (", beside DeepEP V1 on 2 x H200 at the same SMs (ANCHORS.md, quoted, not measured here)" if peer else ""))
    print(f"{'op':<28}" + "".join(f"{f'<= {b} SMs':>20}" for b in budgets))
    for op in ops:
        cells = []
        for b in budgets:
            row = best[b].get(op)
            quoted = PEER_GBPS.get(b, {}).get(PEER_OP.get(op, "")) if peer else None
            cell = "-" if row is None else f"{row['gbps']:.1f}" + (f" (peer {quoted:.0f})" if quoted else "")
            cells.append(f"{cell:>20}")
        print(f"{op:<28}" + "".join(cells))


KNOB_HEADER = f"{'unroll':>7}{'rows':>6}{'send':>6}{'csend':>7}{'cstage':>7}{'dsend':>7}"


def knob_cells(row: dict) -> str:
    """A row's knobs under KNOB_HEADER ('-' where it has none: the reference rows)."""
    widths = {"unroll": 7, "chunk_rows": 6, "send_warps": 6, "combine_send_warps": 7, "combine_staged_vectors": 7,
              "direct_send_warps": 7}
    return "".join(f"{'-' if row.get(key) is None else row[key]:>{width}}" for key, width in widths.items())


def _line(op: str, sms, chunk, us: float, gbps: float, row: Optional[dict] = None) -> str:
    dash = lambda v: "-" if v is None else v  # noqa: E731
    return f"{op:<28}{dash(sms):>5}{dash(chunk):>7}{knob_cells(row or {})}{us:>12.1f}{gbps:>12.1f}"


def _print(report: dict) -> None:
    s = report["settings"]
    verdict = "PASS" if report["correctness"]["pass"] else "FAIL"
    print(f"normal benchmark: {report['world_size']} ranks ({report['dist_backend']}, {report['device']}), "
          f"buffer backend={report['buffer_backend']}; {s['tokens']} tokens/rank, hidden {s['hidden']}, "
          f"top-{s['top_k']} of {s['experts']} experts, median of {s['iters']}, chunks: {s['chunks']}", flush=True)
    if report["buffer_backend_describe"]:
        print(report["buffer_backend_describe"])
    print(f"correctness (combine of dispatched x == x * ranks reached): {verdict} "
          f"(max abs err {report['correctness']['max_abs_err']:.3g})")
    if report.get("direct"):
        d = report["direct"]
        print(f"receive pool: outputs equal the plain Buffer's: {'PASS' if d['equal'] else 'FAIL'}; dispatches with "
              f"every output in the pool per rank {d['direct_calls']}, combines read in place {d['pull_calls']}, "
              f"arena overflows {d['overflows']}")
    print(f"{'op':<28}{'SMs':>5}{'chunk':>7}{KNOB_HEADER}{'µs (max)':>12}{'GB/s (min)':>12}")
    for row in report["rows"]:
        print(_line(row["op"], row["sms"], row["chunk"], row["us"], row["gbps"], row))
    for rank, steps in enumerate(report["breakdown_per_rank"]):
        if steps:
            print(f"rank {rank} steps at {steps['sms']} SMs (GPU µs): " + "; ".join(
                f"{op}: " + ", ".join(f"{name} {us:.1f}" for name, us in timings.items())
                for op, timings in steps.items() if op != "sms"))
    print("reference (not the Buffer):")
    for row in report["reference_rows"]:
        print(_line(row["op"], row["sms"], row["chunk"], row["us"], row["gbps"]) + f"   {row['what']}")
    _print_best(report)
    print(flush=True)


def _write(report: dict, out_dir: str) -> None:
    write_report(report, out_dir, "normal", _plot)


def _plot(report: dict, path: str) -> str:
    """GB/s vs SMs per op (best chunk at each SM count, as DeepEP reports), with the reference rows
    as horizontal lines. matplotlib is optional."""
    plt = import_pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install '.[plot]'): normal.png skipped"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    direct_ops = sorted({row["op"] for row in report["rows"] if row["op"].endswith("_direct")})
    for op in (*OPS, *direct_ops):  # a direct op's best at each SM count is over its sender counts
        best: dict[int, float] = {}
        for row in report["rows"]:
            if row["op"] == op:
                best[row["sms"]] = max(best.get(row["sms"], 0.0), row["gbps"])
        sms = sorted(best)
        ax.plot(sms, [best[n] for n in sms], marker="o", label=op)
    for row, style in zip(report["reference_rows"], ("--", ":")):
        ax.axhline(row["gbps"], linestyle=style, color="gray", label=f"{row['op']} ({row['gbps']:.0f} GB/s)")
    s = report["settings"]
    ax.set(xlabel="SMs", ylabel="GB/s (min over ranks)",
           title=f"normal dispatch/combine, {report['world_size']} ranks, {report['buffer_backend']} backend, "
                 f"{s['tokens']} tok, H={s['hidden']}")
    return save_plot(plt, fig, ax, path)


# ------------------------------------------------------------------------------ entry point
def rank_count(args: argparse.Namespace, on_gpu: bool) -> int:
    """One rank per local GPU; without GPUs, ``--ranks`` gloo ranks (default CPU_RANKS), so the
    benchmarks' own logic (tables, JSON, plots, byte counting) runs at any rank count on a machine
    without GPUs, before a 4- or 8-GPU machine is at hand."""
    ranks = getattr(args, "ranks", None)
    if on_gpu:
        count = torch.cuda.device_count()
        if ranks is not None and ranks != count:
            raise SystemExit(f"--ranks {ranks}: normal and ll run one rank per local GPU ({count} here); --ranks "
                             "sets the CPU ranks of a machine without GPUs (and loopback's threads)")
        return count
    ranks = CPU_RANKS if ranks is None else ranks
    if not 1 <= ranks <= 8:
        raise SystemExit(f"--ranks must be in [1, 8] for CPU ranks, got {ranks}")
    return ranks


def bench_normal(args: argparse.Namespace) -> None:
    """Start one rank per local GPU (NCCL), or ``--ranks`` gloo ranks without GPUs, and run the sweep."""
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    opts = _resolve(args, on_gpu)
    nproc = rank_count(args, on_gpu)
    os.makedirs(opts["out"], exist_ok=True)
    launch(_bench_rank, nproc, "nccl" if on_gpu else "gloo", args=(opts,))
