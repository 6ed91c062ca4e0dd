"""Where a DeepSeek-V3-sized ExpertParallelMoE forward spends its time on one GPU (EP size 1).

Times each stage with CUDA events (router, pair sort + gather, expert GEMMs, weighting + scatter,
shared experts) for prefill, and prints the profiler's top kernels for prefill and decode.
Usage: python benchmarks/profile_layer.py [--tokens 4096] [--fp8]
"""
from __future__ import annotations

import argparse
import torch

from moe_ep.bench import DSV3, time_cuda
from moe_ep.layers.moe import ExpertParallelMoE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--fp8", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    moe = ExpertParallelMoE(**DSV3, dtype=torch.bfloat16, device=device, fp8=args.fp8).init_weights(0).quantize_fp8_()
    x = torch.randn(args.tokens, DSV3["hidden_size"], device=device).bfloat16()
    with torch.no_grad():
        idx, w, _ = moe.router(x)
        payload = moe._activations(x)
        stages = {
            "whole forward (prefill)": lambda: moe(x),
            "router": lambda: moe.router(x),
            "activations (fp8 quant if any)": lambda: moe._activations(x),
            "routed experts on rows": lambda: moe._local_experts_on_rows(payload, idx, w, x.shape[0]),
            "shared experts": lambda: moe.shared_experts(x),
        }
        # The pieces of _local_experts_on_rows, separately.
        k = idx.shape[1]
        flat = idx.flatten()
        pair = (flat >= 0).nonzero().squeeze(1)
        expert = flat[pair]
        pair = pair[torch.argsort(expert, stable=True)]
        counts = torch.bincount(expert, minlength=moe.num_local_experts).tolist()
        row = pair // k
        pairs_x = x.index_select(0, row) if not args.fp8 else (payload[0].index_select(0, row), payload[1].index_select(0, row))
        y = moe.experts.forward_contiguous(pairs_x, counts)

        def reduce_rows():
            by_slot = torch.zeros((x.shape[0] * k, x.shape[1]), dtype=y.dtype, device=device)
            by_slot.index_copy_(0, pair, y)
            return torch.bmm(w.to(y.dtype).view(-1, 1, k), by_slot.view(-1, k, x.shape[1]))

        stages.update({
            "  pairs: nonzero+argsort+bincount": lambda: torch.bincount(torch.argsort(idx[(idx >= 0)], stable=True), minlength=256).tolist(),
            "  gather pair rows": lambda: x.index_select(0, row),
            "  expert GEMMs (forward_contiguous)": lambda: moe.experts.forward_contiguous(pairs_x, counts),
            "  back to (row, k) + weighted bmm": reduce_rows,
        })
        for name, fn in stages.items():
            print(f"{name:<40}{time_cuda(fn, 10):>10.3f} ms", flush=True)
        moe.phase = "prefill"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            moe(x)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        moe.phase = "decode"
        xd = x[:128].contiguous()
        print(f"{'whole forward (decode 128)':<40}{time_cuda(lambda: moe(xd), 10):>10.3f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            moe(xd)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
