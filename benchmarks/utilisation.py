"""Benchmark: how close the LightningDiT train step and the tokenizer step come to this machine's matmul peak.

In one process: an fp32 and a bf16 GEMM of the DiT's shape (tokens × D → 4D) give the peak; then each step at
its `cpu` preset size (teacher: LightningDiT-Micro/4, batch 256; tokenizer: SmallResNet encoder, Flux-style
decoder, batch 128, reconstruction + GAN + discriminator step) runs in fp32 and in bf16 autocast (forced,
emulated where the CPU has no bf16), with FLOPs counted by FlopCounterMode, the achieved FLOP/s as a fraction
of the same-precision peak, and the step's wall time split by operator class (profiler self time; "python/
idle" is the time no operator accounts for). Timings are medians of `--repeats` steps after `--warmup`
untimed ones; read them at load ≈ 0 (printed). `--compile` adds a row per step and precision with
`torch.compile` applied as the presets' switches apply it (`fit.compile`: the DiT; `train.compile`: the
decoder); its FLOPs are the eager step's, and its "compiled kernels + python" share is the time no aten
operator accounts for (the compiled kernels are not aten operators to the profiler).

    .venv/bin/python benchmarks/utilisation.py [--repeats 5] [--warmup 3] [--threads 2] [--compile]
                                               [--steps teacher tokenizer] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from dmvae_lib.configs import make_config
from dmvae_lib.models.lightning_dit import DIT_SIZES, lightning_dit
from dmvae_lib.models.recon_losses import PatchDiscriminator
from dmvae_lib.models.ssl_encoder import SmallResNet
from dmvae_lib.runtime.perf import count_flops, gemm_peak, op_breakdown
from dmvae_lib.train.artifacts import build_tokenizer
from dmvae_lib.train.phases import disc_step, flow_matching_step, tokenizer_step


def autocast(precision: str):
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def teacher_step(precision: str, compiled: bool = False):
    cfg = make_config("teacher", "cpu")
    torch.manual_seed(0)
    net = lightning_dit(cfg.net.size, input_size=8, in_channels=4, num_classes=10,
                        patch_size=cfg.net.patch_size)
    if compiled:
        net.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    data, y = torch.randn(cfg.fit.batch, 4, 8, 8), torch.randint(0, 10, (cfg.fit.batch,))
    ac = autocast(precision)
    return cfg.fit.batch, lambda: flow_matching_step(net, opt, data, gen, y=y, autocast=ac)


def tokenizer_step_fn(precision: str, compiled: bool = False):
    cfg = make_config("tokenizer", "cpu")
    t = cfg.train
    tok = build_tokenizer(cfg, SmallResNet(cfg.encoder.ssl.width, cfg.encoder.ssl.arch))
    if compiled:
        tok.decoder.compile()
    params = [*tok.projector.parameters(), *tok.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    disc = PatchDiscriminator(3, t.disc_ndf, t.disc_layers)
    dopt = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    res = cfg.data.resolution
    images = torch.rand(t.batch, 3, res, res, generator=gen) * 2 - 1
    ac = autocast(precision)
    rec = {"l1": t.l1, "l2": t.l2, "perceptual": None, "lpips_weight": 0.0}

    def step():
        with ac():
            feats = tok.encode_features(images)
        _, x_hat = tokenizer_step(tok, opt, params, images, feats.float(), gen, rec=rec, disc=disc,
                                  disc_weight=t.disc_weight, grad_clip=t.grad_clip, autocast=ac)
        disc_step(disc, dopt, images, x_hat, gen, bcr=t.bcr, grad_clip=t.grad_clip, autocast=ac)

    return t.batch, step


STEPS = {"teacher": teacher_step, "tokenizer": tokenizer_step_fn}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="add rows with torch.compile")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = make_config("teacher", "cpu")
    hidden = DIT_SIZES[cfg.net.size][1]
    tokens = cfg.fit.batch * (8 // cfg.net.patch_size) ** 2
    m, k, n = max(tokens, 256), hidden, 4 * hidden
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    peaks = {"fp32": gemm_peak("cpu", torch.float32, m, k, n, seconds=1.0),
             "bf16": gemm_peak("cpu", torch.bfloat16, m, k, n, seconds=1.0)}
    print(f"GEMM {m}×{k}×{n}: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    print(f"{'step':10s} {'prec':7s} {'batch':>5s} {'ms/step':>9s} {'GFLOP':>7s} {'GFLOP/s':>8s} "
          f"{'of peak':>8s}  time by operator class (share of the step)")
    variants = [(prec, False) for prec in a.precisions] + [(prec, True) for prec in a.precisions if a.compile]
    for name in a.steps:
        flops_of = {}
        for prec, compiled in variants:
            batch, step = STEPS[name](prec, compiled)
            if compiled:  # FLOPs of the same step run eagerly
                flops = flops_of.get(prec) or count_flops(STEPS[name](prec)[1])
            else:
                flops = flops_of[prec] = count_flops(step)  # also the first warm-up call
            for _ in range(a.warmup):  # oneDNN builds its bf16 primitives, torch.compile compiles
                step()
            times = []
            for _ in range(a.repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            sec = statistics.median(times)
            split = op_breakdown(step, "cpu")
            wall = split.pop("wall")
            if compiled:
                split["compiled kernels + python"] = split.pop("python/idle", 0.0)
            parts = ", ".join(f"{k} {v / wall:.0%}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]))
            label = prec + ("+c" if compiled else "")
            print(f"{name:10s} {label:7s} {batch:5d} {sec * 1e3:9.1f} {flops / 1e9:7.2f} "
                  f"{flops / sec / 1e9:8.1f} {flops / sec / peaks[prec]:8.1%}  {parts}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
