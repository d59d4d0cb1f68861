"""Benchmark: SDPA forward + backward on the CPU, flash vs math backend, at the CPU presets' token counts.

The LightningDiT's `attention` sends bf16 on the CPU to SDPA's math backend: at 4–64 tokens the CPU flash
kernel's bf16 backward is the slower one (measured here; fp32, printed for comparison, keeps the default).
Prints ms per call for q, k, v of shape (batch, heads, tokens, head_dim).

    .venv/bin/python benchmarks/attention.py [--batch 256] [--heads 3] [--head-dim 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend, repeats: int) -> float:
    """Mean ms of one SDPA forward + backward on `backend` (3 warm-up calls first)."""
    with sdpa_kernel(backend):
        for i in range(repeats + 3):
            if i == 3:
                start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v).float().sum().backward()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="*", default=[4, 16, 64])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'tokens':>6} {'dtype':>8} {'flash ms':>9} {'math ms':>8} {'math speed-up':>14}")
    for n in args.tokens:
        for dtype in (torch.bfloat16, torch.float32):
            qkv = [torch.randn(args.batch, args.heads, n, args.head_dim, dtype=dtype, requires_grad=True)
                   for _ in range(3)]
            flash = time_call(*qkv, SDPBackend.FLASH_ATTENTION, args.repeats)
            math_ = time_call(*qkv, SDPBackend.MATH, args.repeats)
            print(f"{n:>6} {str(dtype).removeprefix('torch.'):>8} {flash:>9.2f} {math_:>8.2f} "
                  f"{flash / math_:>13.2f}×")


if __name__ == "__main__":
    main()
