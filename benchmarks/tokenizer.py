"""Benchmark: tokenizer training throughput (images/s) per preset, fp32 and bf16 autocast, on this machine.

For each preset the stage's own builders make the tokenizer (random-initialised encoder: a SmallResNet for
`smoke`/`cpu`, DINOv2-L at patch 16 / 256 px for `imagenet256`) and the PatchGAN, then time the two kinds of
step the stage runs: reconstruction only (frozen encoder forward + projector/decoder forward and backward +
AdamW) and reconstruction + adaptive GAN + discriminator step (from `train.disc_start` on). Figures are the
median of `--repeats` steps after one warm-up step. The 1-minute load average is printed beside them: on a
shared CPU read the figures taken at load ≈ 0. `imagenet256` runs at `--big-batch` (default 2) on a CPU: it
exists to check the full-size path and give an order of magnitude, not a GPU figure.

    .venv/bin/python benchmarks/tokenizer.py [--presets smoke cpu imagenet256] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dmvae_lib.configs import PRESETS, make_config
from dmvae_lib.models.recon_losses import PatchDiscriminator
from dmvae_lib.models.ssl_encoder import SmallResNet
from dmvae_lib.runtime.device import autocast_ctx
from dmvae_lib.train.artifacts import build_tokenizer
from dmvae_lib.train.phases import disc_step, tokenizer_step


def build(preset: str):
    over = {"encoder.timm_pretrained": False} if preset == "imagenet256" else {}
    cfg = make_config("tokenizer", preset, over)
    encoder = None if cfg.encoder.kind == "timm" else SmallResNet(cfg.encoder.ssl.width, cfg.encoder.ssl.arch)
    return cfg, build_tokenizer(cfg, encoder)


def time_steps(cfg, tok, batch: int, precision: str, gan: bool, repeats: int) -> float:
    t = cfg.train
    gen = torch.Generator().manual_seed(0)
    params = list(tok.projector.parameters()) + list(tok.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    disc = PatchDiscriminator(3, t.disc_ndf, t.disc_layers)
    dopt = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.9, 0.95))
    res = cfg.data.resolution
    images = torch.rand(batch, 3, res, res, generator=gen) * 2 - 1
    autocast = lambda: autocast_ctx(torch.device("cpu"), precision)  # noqa: E731
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with autocast():
            feats = tok.encode_features(images)
        rec = {"l1": t.l1, "l2": t.l2, "perceptual": None, "lpips_weight": 0.0}
        _, decoded = tokenizer_step(tok, opt, params, images, feats.float(), gen, rec=rec,
                                    disc=disc if gan else None, disc_weight=t.disc_weight,
                                    grad_clip=t.grad_clip, autocast=autocast)
        if gan:
            disc_step(disc, dopt, images, decoded, gen, bcr=t.bcr, grad_clip=t.grad_clip, autocast=autocast)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--big-batch", type=int, default=2, help="batch for imagenet256 on a CPU")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'preset':12s} {'batch':>5s} {'precision':9s} {'step':9s} {'ms/step':>9s} {'img/s':>8s}")
    for preset in a.presets:
        cfg, tok = build(preset)
        batch = a.big_batch if preset == "imagenet256" else cfg.train.batch
        repeats = 1 if preset == "imagenet256" else a.repeats
        for precision in ("fp32", "bf16"):
            for gan in (False, True):
                sec = time_steps(cfg, tok, batch, precision, gan, repeats)
                print(f"{preset:12s} {batch:5d} {precision:9s} {'rec+GAN' if gan else 'rec':9s} "
                      f"{sec * 1e3:9.1f} {batch / sec:8.1f}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
