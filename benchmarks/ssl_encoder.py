"""Benchmark: SSL encoder throughput (fp32 vs bf16 vs bf16 + channels_last) and kNN accuracy vs wall-clock.

Part 1 times full SSL steps (paired-view sampling + augmentation + forward + NT-Xent + backward + AdamW) and
prints ms/step and images/s through the net (2 × batch per step), median of `--repeats` after a warm-up.
Part 2 trains the default `SSLConfig` (or `--steps`) on the embedded data and prints the weighted kNN
accuracy (k=20, cosine, T=0.07; 10 k labelled train images against the 5 k val split) every `--eval-every`
steps against the training seconds (evaluations excluded), then a linear probe. The 1-minute load average is
printed beside the figures: on a shared CPU, read the figures at load ≈ 0 as the uncontended cost.

    .venv/bin/python benchmarks/ssl_encoder.py [--threads 2] [--steps 1800] [--eval-every 300] [--skip-train]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

from dmvae_lib.configs.ssl import SSLConfig
from dmvae_lib.data import shapes_dataset
from dmvae_lib.data.views import paired_renders, renders_tensor, sample_views
from dmvae_lib.metrics.probes import extract_features, knn_accuracy, linear_probe_accuracy
from dmvae_lib.models.ssl_encoder import SmallResNet, projector
from dmvae_lib.runtime.device import autocast_ctx
from dmvae_lib.train.ssl import ssl_step, train_ssl


def throughput(cfg: SSLConfig, renders, batches: list[int], repeats: int) -> None:
    data, cpu = renders_tensor(renders), torch.device("cpu")
    aug = {"crop_scale": cfg.crop_scale, "rotate": cfg.rotate, "flip": cfg.flip, "color_p": cfg.color_p,
           "color_strength": cfg.color_strength, "hue": cfg.hue, "gray_p": cfg.gray_p}
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        start = time.perf_counter()
        for _ in range(repeats):
            sample_views(data, gen, batch, cfg.paired_frac, aug)
        aug_ms = (time.perf_counter() - start) / repeats * 1000
        print(f"batch {batch} pairs: view sampling + augmentation {aug_ms:.0f} ms/step")
        for precision, channels_last in (("fp32", False), ("bf16", False), ("bf16", True)):
            encoder = SmallResNet(cfg.width, cfg.arch)
            proj = projector(encoder.out_channels, cfg.proj_hidden, cfg.proj_out)
            if channels_last:
                encoder = encoder.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW([*encoder.parameters(), *proj.parameters()], lr=cfg.lr)
            times = []
            for _ in range(repeats + 1):  # the first step warms up the kernels and is dropped
                start = time.perf_counter()
                x1, x2, _ = sample_views(data, gen, batch, cfg.paired_frac, aug)
                ssl_step(encoder, proj, opt, x1, x2, temperature=cfg.temperature,
                         autocast=lambda p=precision: autocast_ctx(cpu, p), channels_last=channels_last)
                times.append(time.perf_counter() - start)
            ms = statistics.median(times[1:]) * 1000
            name = f"{precision} + channels_last" if channels_last else precision
            rate = 2 * batch / ms * 1000
            print(f"  {cfg.arch} w={cfg.width} {name:22s} {ms:6.0f} ms/step {rate:7,.0f} img/s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)


def knn_curve(cfg: SSLConfig, splits, renders, eval_every: int) -> None:
    x_eval, y_eval, y_val = splits.train.images[:10_000], splits.train.labels[:10_000], splits.val.labels
    spent = {"eval": 0.0}
    t0 = time.perf_counter()

    def knn(encoder) -> tuple[float, torch.Tensor, torch.Tensor]:
        with autocast_ctx(torch.device("cpu"), cfg.precision):
            ftr, fva = extract_features(encoder.eval(), x_eval), extract_features(encoder, splits.val.images)
        return knn_accuracy(ftr, y_eval, fva, y_val), ftr, fva

    def hook(step: int, encoder) -> None:
        start = time.perf_counter()
        train_s = start - t0 - spent["eval"]  # wall time minus the evaluations so far
        acc = knn(encoder)[0]
        spent["eval"] += time.perf_counter() - start
        print(f"step {step:5d}  train {train_s:6.1f} s ({train_s / 60:.2f} min)  kNN {acc * 100:5.2f} %  "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)

    out = train_ssl(cfg, renders, progress=False, hooks=[(eval_every, hook)], log_every=10**9)
    acc, ftr, fva = knn(out.model)
    probe = linear_probe_accuracy(ftr, y_eval, fva, y_val)
    print(f"final: kNN {acc * 100:.2f} %, linear probe {probe * 100:.2f} %; {cfg.steps} steps in "
          f"{out.stats['seconds']:.1f} s = {out.stats['seconds'] / cfg.steps * 1000:.0f} ms/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=0, help="SSL steps for part 2 (0: SSLConfig default)")
    parser.add_argument("--eval-every", type=int, default=300, help="steps between kNN evaluations")
    parser.add_argument("--batches", default="", help="pair batches for part 1, e.g. 64,256")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per throughput setting")
    parser.add_argument("--n-train", type=int, default=20_000, help="train instances")
    parser.add_argument("--views", type=int, default=2, help="renders per instance (1: no paired views)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "shapes_cache"))
    parser.add_argument("--skip-train", action="store_true", help="throughput only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SSLConfig() if not args.steps else dataclasses.replace(SSLConfig(), steps=args.steps)

    start = time.perf_counter()
    splits = shapes_dataset.make_splits(args.n_train, 5_000, seed=0, cache_dir=args.cache_dir)
    base = (splits.train.images.permute(0, 2, 3, 1) * 127.5 + 127.5).round().to(torch.uint8).numpy()
    renders = paired_renders(args.n_train, 0, args.views, base=base)
    seconds = time.perf_counter() - start
    print(f"data: {args.views} renders × {args.n_train} instances + 5 k val: {seconds:.1f} s")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [cfg.batch]
    throughput(cfg, renders, batches, args.repeats)
    if not args.skip_train:
        knn_curve(cfg, splits, renders, args.eval_every)


if __name__ == "__main__":
    main()
