"""A dispatch/combine demo: routes random tokens through every Buffer call, checks each result
against what the call must produce, times it, and prints one table (rank 0)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from .comm import Buffer, per_token_group_dequant_fp8, per_token_group_quant_fp8
from .comm.config import auto_num_nvl_bytes
from .launch import launch


def _timed(fn: Callable, device: torch.device, iters: int):
    """Median wall time (ms) of ``fn`` over ``iters`` runs after one warm-up; returns (ms, last result)."""
    result = fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def _demo_rank(rank: int, world_size: int, opts: dict) -> None:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    tokens, hidden, top_k = opts["tokens"], opts["hidden"], opts["top_k"]
    num_experts = opts["experts_per_rank"] * world_size
    ll_tokens = min(tokens, opts["ll_tokens"])
    # GPU ranks get an NVLink buffer, so dispatch/combine run the intranode kernels (CPU ranks: none).
    nvl_bytes = auto_num_nvl_bytes(hidden * 2, world_size) if device.type == "cuda" else 0
    buffer = Buffer(None, num_nvl_bytes=nvl_bytes, low_latency_mode=True,
                    num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(ll_tokens, hidden, world_size, num_experts))
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
    scores = torch.rand(tokens, num_experts, generator=gen)
    topk_idx = scores.topk(top_k, dim=1).indices.to(device)
    topk_idx[:: 7, -1] = -1                      # some masked entries
    topk_weights = torch.rand(tokens, top_k, generator=gen).to(device)
    rows = []

    def record(op: str, ms: float, bytes_moved: int, err: float) -> None:
        rows.append({"op": op, "tokens_per_rank": tokens if not op.startswith("ll") else ll_tokens,
                     "ms": ms, "GB/s": bytes_moved / ms / 1e6 if ms > 0 else 0.0, "max_err": err})

    ms, layout = _timed(lambda: buffer.get_dispatch_layout(topk_idx, num_experts), device, opts["iters"])
    per_rank, _, per_expert, in_rank, _ = layout
    record("layout", ms, topk_idx.numel() * 8, 0.0)

    def dispatch(payload):
        return buffer.dispatch(payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)

    ms, out = _timed(lambda: dispatch(x), device, opts["iters"])
    recv_x, recv_idx, recv_w, counts, handle, _ = out
    record("dispatch bf16", ms, recv_x.numel() * 2, 0.0)

    ms, combined = _timed(lambda: buffer.combine(recv_x, handle), device, opts["iters"])
    # Each token comes back once from every rank it went to: x times that count.
    expected = x.float() * in_rank.sum(1, keepdim=True)
    record("combine bf16", ms, recv_x.numel() * 2, (combined[0].float() - expected).abs().max().item())

    x_fp8 = per_token_group_quant_fp8(x)
    ms, out = _timed(lambda: dispatch(x_fp8), device, opts["iters"])
    recv_fp8 = per_token_group_dequant_fp8(*out[0])
    record("dispatch fp8", ms, out[0][0].numel() + out[0][1].numel() * 4,
           (recv_fp8.float() - recv_x.float()).abs().max().item() / max(recv_x.float().abs().max().item(), 1e-9))

    ms, out = _timed(lambda: buffer.dispatch(x, handle=handle), device, opts["iters"])
    record("dispatch cached", ms, out[0].numel() * 2, (out[0].float() - recv_x.float()).abs().max().item())

    x_ll, idx_ll, w_ll = x[:ll_tokens], topk_idx[:ll_tokens], topk_weights[:ll_tokens]
    ms, out = _timed(lambda: buffer.low_latency_dispatch(x_ll, idx_ll, ll_tokens, num_experts, use_fp8=False),
                     device, opts["iters"])
    recv_ll, recv_count, ll_handle, _, _ = out
    record("ll dispatch bf16", ms, int(recv_count.sum()) * hidden * 2, 0.0)
    # Identity experts: the weighted sum of a token's copies is x * sum of its valid weights.
    ms, out = _timed(lambda: buffer.low_latency_combine(recv_ll, idx_ll, w_ll, ll_handle), device, opts["iters"])
    expected_ll = x_ll.float() * torch.where(idx_ll >= 0, w_ll, 0.0).sum(1, keepdim=True)
    err = ((out[0].float() - expected_ll).norm() / expected_ll.norm()).item()
    record("ll combine bf16", ms, int(recv_count.sum()) * hidden * 2, err)

    gathered = [None] * world_size
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        print(f"moe_ep demo: {world_size} ranks ({dist.get_backend()}), backend={buffer.backend.name}, "
              f"hidden={hidden}, experts={num_experts}, top-{top_k}")
        print(f"{'op':<18}{'tokens/rank':>12}{'ms (max rank)':>15}{'GB/s (rank 0)':>15}{'max err':>12}")
        for i, row in enumerate(rows):
            slowest = max(g[i]["ms"] for g in gathered)
            worst = max(g[i]["max_err"] for g in gathered)
            print(f"{row['op']:<18}{row['tokens_per_rank']:>12}{slowest:>15.3f}{row['GB/s']:>15.2f}{worst:>12.2e}")
        if opts.get("json"):
            with open(opts["json"], "w") as f:
                json.dump({"world_size": world_size, "per_rank": gathered}, f, indent=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_ep demo", description=__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--ll-tokens", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    opts = {"tokens": args.tokens, "hidden": args.hidden, "top_k": args.top_k, "experts_per_rank": args.experts_per_rank,
            "ll_tokens": args.ll_tokens, "iters": args.iters, "json": args.json}
    launch(_demo_rank, args.nproc, args.backend, args=(opts,))


if __name__ == "__main__":
    main()
