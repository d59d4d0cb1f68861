"""Benchmark: LightningDiT sampling throughput (no-grad forwards), fp32 vs bf16 autocast, at a preset's
generator size.

`sample_latents` integrates the ODE with one forward per step (two under CFG, batched as one call of 2B). On
the CPU these forwards are compute-bound matmuls, so bf16 (AVX512-BF16/AMX) should beat fp32 — but only while
the residual stream is a contiguous (B, N, D) tensor: the patch embedding's transposed view, carried through
every elementwise op, made nn.Linear under no-grad fall back to a batched matmul with the weight expanded per
sample: before the fix (2026-12-07, 2-core EPYC, batch 1000) fp32 775 ms and bf16 1,595 ms a forward; after
it fp32 ≈ 700 ms and bf16 ≈ 400 ms. Prints ms per forward, µs per sample and samples/s of a full CFG
sampling run (`--steps` Euler steps).

    .venv/bin/python benchmarks/sampling.py [--preset cpu] [--batch 500] [--steps 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from dmvae_lib.configs import make_config
from dmvae_lib.models.lightning_dit import lightning_dit


def time_forward(net, x, t, y, precision: str, repeats: int) -> float:
    """Mean ms of one no-grad forward (2 warm-up calls first)."""
    ctx = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for i in range(repeats + 2):
            if i == 2:
                start = time.perf_counter()
            net(x, t, y)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=["smoke", "cpu"])
    p.add_argument("--batch", type=int, default=500, help="samples per sampling batch (CFG doubles it)")
    p.add_argument("--steps", type=int, default=25, help="Euler steps of the sampling run the rate is for")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = make_config("generation", a.preset)
    size, ch = 8, 8  # the embedded tokenizer's 8×8×8 latents
    net = lightning_dit(cfg.net.size, input_size=size, in_channels=ch, num_classes=10,
                        patch_size=cfg.net.patch_size).eval()
    cfg_on = cfg.sample.cfg_scale > 1
    b = a.batch * (2 if cfg_on else 1)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(b, ch, size, size, generator=g), torch.rand(b, generator=g), torch.arange(b) % 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LightningDiT {cfg.net.size}/"
          f"{cfg.net.patch_size} on {ch}×{size}×{size}, forward batch {b} (CFG {cfg.sample.cfg_scale})")
    print(f"{'prec':5} {'ms/forward':>11} {'µs/sample':>10} {'samples/s (full run)':>21}")
    for precision in ("fp32", "bf16"):
        ms = time_forward(net, x, t, y, precision, a.repeats)
        print(f"{precision:5} {ms:11.1f} {ms / b * 1e3:10.1f} {a.batch / (ms / 1e3 * a.steps):21.1f}")


if __name__ == "__main__":
    main()
