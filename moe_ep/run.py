"""The main job: ``python -m moe_ep run --config configs/demo.yaml [--nproc N] [--plot load.png]``.

Launches N ranks, builds a small stack of pre-norm residual layers whose MoE blocks are
ExpertParallelMoE (sharded over the ranks), runs one prefill batch and then decode steps, checks
every output against the same stack run densely (all experts in one process), and prints a table:
phase, tokens, time, tokens/s, max error, expert load balance.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import config as config_mod
from .launch import launch
from .layers.moe import ExpertParallelMoE, set_phase


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class MoELayer(nn.Module):
    """``h += proj(norm(h)); h += moe(norm(h))``: a token-wise dense sublayer stands where
    attention would be (the job checks the MoE path, which attention would not change)."""

    def __init__(self, moe: ExpertParallelMoE, seed: int) -> None:
        super().__init__()
        hidden, device = moe.hidden_size, moe.router.weight.device
        self.norm1, self.norm2 = RMSNorm(hidden, device=device), RMSNorm(hidden, device=device)
        self.proj = nn.Linear(hidden, hidden, bias=False, device=device, dtype=moe.dtype)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(hidden, hidden, generator=gen, device=device) / hidden ** 0.5)
        self.moe = moe

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.proj(self.norm1(h))
        return h + self.moe(self.norm2(h))


def build_stack(cfg, group, device: torch.device, seed: int) -> nn.Sequential:
    """The demo model; ``group=None`` gives the dense copy (identical weights, every expert local)."""
    layers = []
    for layer in range(cfg.model.num_layers):
        if group is None:
            moe = ExpertParallelMoE.dense_from_config(cfg, device=device)
        else:
            moe = ExpertParallelMoE.from_config(cfg, group=group, device=device)
        moe.init_weights(seed + 1000 * layer).quantize_fp8_()
        layers.append(MoELayer(moe, seed + 1000 * layer + 7))
    return nn.Sequential(*layers)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.float().norm().item()
    return (out.float() - ref.float()).norm().item() / denom if denom > 0 else 0.0


def _run_rank(rank: int, world_size: int, cfg, plot: Optional[str], json_path: Optional[str]) -> None:
    use_cuda = "nccl" in str(dist.get_backend()).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    group = dist.group.WORLD
    run, dtype = cfg.run, cfg.precision.torch_dtype
    model = build_stack(cfg, group, device, run.seed)
    dense = build_stack(cfg, None, device, run.seed)
    gen = torch.Generator(device="cpu").manual_seed(run.seed * 7919 + rank)

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()
        dist.barrier()

    rows = []
    total_load = torch.zeros(cfg.model.num_experts, dtype=torch.int64, device=device)

    def step(phase: str, x: torch.Tensor) -> None:
        set_phase(model, phase)
        set_phase(dense, "prefill" if phase == "prefill" else "decode")
        for layer in model:
            layer.moe.expert_load.zero_()
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model(x)
        sync()
        elapsed = time.perf_counter() - start
        load = sum(layer.moe.expert_load[:-1] for layer in model)
        dist.all_reduce(load, group=group)  # each rank counted its own tokens' choices
        total_load.add_(load)
        # Check each layer against its dense twin on the same input: comparing whole stacks would
        # let a bf16-sized difference flip a near-tied routing choice in a later layer.
        layer_errs, h = [], x
        with torch.no_grad():
            for layer, dense_layer in zip(model, dense):
                out_layer = layer(h)
                layer_errs.append(_rel_err(out_layer, dense_layer(h)))
                h = out_layer
        rows.append({"phase": phase, "tokens": x.shape[0], "seconds": elapsed, "rel_err": max(layer_errs),
                     "balance": _balance(load)})

    hidden = cfg.model.hidden_size
    with torch.no_grad():  # warm-up: the first call of each phase allocates its buffers
        for phase in ("prefill", "decode"):
            set_phase(model, phase)
            model(torch.randn(min(4, run.decode_batch), hidden, generator=gen).to(device, dtype))
    step("prefill", torch.randn(run.prefill_tokens, hidden, generator=gen).to(device, dtype))
    for i in range(run.decode_steps):
        step("decode", torch.randn(run.decode_batch, hidden, generator=gen).to(device, dtype))
        if rank == 0 and run.decode_steps >= 20 and (i + 1) % max(1, run.decode_steps // 10) == 0:
            print(f"  decode step {i + 1}/{run.decode_steps}", file=sys.stderr, flush=True)  # progress

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, rows)
    if rank != 0:
        return
    load_list = total_load.cpu().tolist()
    print(f"moe_ep run: {world_size} ranks ({dist.get_backend()}), {cfg.model.num_layers} layers, "
          f"hidden={hidden}, experts={cfg.model.num_experts} top-{cfg.model.top_k}, "
          f"{cfg.gating.rule}, dtype={cfg.precision.dtype}, fp8={cfg.precision.fp8}")
    print("max err: the largest relative error of a layer against the dense layer on the same input")
    print(f"{'phase':<9}{'tokens':>8}{'time ms':>10}{'tokens/s':>12}{'max err':>11}{'load max/mean':>15}")
    summary = []
    for i, row in enumerate(rows):
        tokens = sum(g[i]["tokens"] for g in gathered)
        seconds = max(g[i]["seconds"] for g in gathered)
        err = max(g[i]["rel_err"] for g in gathered)
        summary.append({"phase": row["phase"], "tokens": tokens, "ms": seconds * 1e3,
                        "tokens_per_s": tokens / seconds, "max_rel_err": err, "load_max_over_mean": row["balance"]})
        print(f"{row['phase']:<9}{tokens:>8}{seconds * 1e3:>10.2f}{tokens / seconds:>12.0f}{err:>11.2e}{row['balance']:>15.2f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": cfg.to_dict(), "steps": summary, "expert_load": load_list}, f, indent=1)
    if plot:
        _plot_load(load_list, plot)
        print(f"per-expert load plotted to {plot}")


def _balance(load: torch.Tensor) -> float:
    """Expert load balance: the busiest expert's tokens over the mean (1.0 is perfect)."""
    mean = load.double().mean().item()
    return load.max().item() / mean if mean > 0 else 0.0


def _plot_load(load: list[int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, len(load) / 8), 3))
    ax.bar(range(len(load)), load)
    ax.axhline(sum(load) / len(load), color="red", linestyle="--", label="mean")
    ax.set_title("tokens routed to each expert (all layers, all steps)")
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens routed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_ep run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML config (see configs/)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks to launch (default: parallel.ep_size)")
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    parser.add_argument("--plot", default=None, help="write a PNG of the per-expert load")
    parser.add_argument("--json", default=None, help="write the table as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        raise SystemExit(f"error: {exc}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("error: --plot needs matplotlib: pip install 'moe_ep[plot]'")
    nproc = args.nproc or cfg.parallel.ep_size
    if nproc != cfg.parallel.ep_size:
        try:
            cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep_size=nproc))
        except (ValueError, config_mod.ConfigError) as exc:
            raise SystemExit(f"error: --nproc {nproc}: {exc}")
    launch(_run_rank, nproc, args.backend, args=(cfg, args.plot, args.json))


if __name__ == "__main__":
    main()
