"""How torch._grouped_mm's speed depends on group count and evenness (DeepSeek-V3 gate+up shape:
hidden 7168 -> 4096), beside one dense matmul of the same rows. Explains the prefill gap in
benchmarks/RESULTS.md. Usage: python benchmarks/grouped_mm_shapes.py"""
from __future__ import annotations

import torch

from moe_ep.bench import time_cuda


def main() -> None:
    device = torch.device("cuda")
    hidden, out = 7168, 4096
    total_rows = 32768
    dense_a = torch.randn(total_rows, hidden, device=device, dtype=torch.bfloat16)
    dense_b = torch.randn(hidden, out, device=device, dtype=torch.bfloat16)
    dense_ms = time_cuda(lambda: dense_a @ dense_b, 10)
    flops = 2 * total_rows * hidden * out
    print(f"{'case':<44}{'ms':>8}{'TFLOP/s':>10}")
    print(f"{'dense matmul, 32768 rows':<44}{dense_ms:>8.3f}{flops / dense_ms / 1e9:>10.0f}")
    gen = torch.Generator().manual_seed(0)
    for groups, even in ((256, True), (256, False), (128, True), (128, False), (32, True)):
        if even:
            counts = torch.full((groups,), total_rows // groups)
        else:  # multinomial routing: what top-k of random scores gives
            counts = torch.bincount(torch.randint(0, groups, (total_rows,), generator=gen), minlength=groups)
        offs = counts.cumsum(0).to(torch.int32).to(device)
        w = torch.randn(groups, out, hidden, device=device, dtype=torch.bfloat16)
        ms = time_cuda(lambda: torch._grouped_mm(dense_a, w.transpose(-2, -1), offs=offs), 10)
        name = f"grouped, {groups} groups, {'even' if even else 'uneven'} (max {int(counts.max())})"
        print(f"{name:<44}{ms:>8.3f}{flops / ms / 1e9:>10.0f}")
        del w


if __name__ == "__main__":
    main()
