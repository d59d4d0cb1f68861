"""Benchmark: teacher fitting and joint DM training, steps/s per preset in fp32 and bf16, and the number of
velocity-net forward passes per joint step.

The stage functions run as they do in notebooks 30 and 40 (`fit_velocity_net`,
`joint_stage.train_joint`), on random stand-ins of the right shapes: random uint8 images, a random-initialised
tokenizer of the preset (SmallResNet encoder for `smoke`/`cpu`; DINOv2-L at 256 px for `imagenet256`) and a
Gaussian-bank reference of the latent shape with 10 classes. A global forward hook counts LightningDiT calls
(and the batch each call sees): with CFG on both nets, a tokenizer turn should cost 2 DM forwards of batch 2B
(cond and null batched, not 4 of batch B), plus the fake net's flow-matching forward every step.
`imagenet256` runs a few steps at `--big-batch` on a CPU: an order of magnitude and a check of the path.

    .venv/bin/python benchmarks/joint.py [--presets smoke cpu imagenet256] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from dmvae_lib.configs import make_config
from dmvae_lib.data.images import ImageData
from dmvae_lib.data.references import TensorReference
from dmvae_lib.models.lightning_dit import LightningDiT
from dmvae_lib.models.ssl_encoder import SmallResNet
from dmvae_lib.stages import joint as joint_stage
from dmvae_lib.train.artifacts import build_net, build_tokenizer
from dmvae_lib.train.velocity import fit_velocity_net

CALLS: list[int] = []


def _count(module, args, output):
    if isinstance(module, LightningDiT):
        CALLS.append(args[0].shape[0])


def setup(preset: str, big_batch: int):
    over = {"encoder.timm_pretrained": False} if preset == "imagenet256" else {}
    tcfg = make_config("tokenizer", preset, over)
    enc = None if tcfg.encoder.kind == "timm" else SmallResNet(tcfg.encoder.ssl.width, tcfg.encoder.ssl.arch)
    tok = build_tokenizer(tcfg, enc).eval()
    res = tcfg.data.resolution
    n = 256
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, n, res, res, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    data = ImageData(images, labels, images[0, :64], labels[:64])
    latent = (tok.decoder.z_channels, tok.decoder.latent_size, tok.decoder.latent_size)
    ref = TensorReference(torch.randn(n, *latent, generator=gen), labels, name="ssl", num_classes=10)
    teacher_cfg = make_config("teacher", preset)
    joint_cfg = make_config("joint", preset,
                            {"train.eval_every": 0, "train.ckpt_every": 0, "train.control": False})
    if preset == "imagenet256":
        teacher_cfg = dataclasses.replace(teacher_cfg,
                                          fit=dataclasses.replace(teacher_cfg.fit, batch=big_batch))
        joint_cfg = dataclasses.replace(joint_cfg,
                                        train=dataclasses.replace(joint_cfg.train, batch=big_batch))
    return tok, data, ref, teacher_cfg, joint_cfg


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["smoke", "cpu", "imagenet256"])
    p.add_argument("--steps", type=int, default=20, help="steps timed per measurement (imagenet256: 2)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--big-batch", type=int, default=2)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.nn.modules.module.register_module_forward_hook(_count)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'preset':12s} {'what':8s} {'prec':5s} {'batch':>5s} {'steps/s':>8s}  forwards per step (batch "
          "each)")
    for preset in a.presets:
        tok, data, ref, tcfg, jcfg = setup(preset, a.big_batch)
        steps = 2 if preset == "imagenet256" else a.steps
        for prec in ("fp32", "bf16"):
            fit = dataclasses.replace(tcfg.fit, steps=steps, precision=prec, log_every=10**9, ckpt_every=0)
            cfg = dataclasses.replace(tcfg, fit=fit)
            sec = timed(lambda: fit_velocity_net(cfg, ref, None, "cpu", progress=False))
            print(f"{preset:12s} {'teacher':8s} {prec:5s} {fit.batch:5d} {steps / sec:8.2f}", flush=True)
            teacher = build_net(cfg, ref.shape, ref.num_classes)
            for prm in teacher.parameters():  # non-zero outputs (adaLN-Zero starts at v = 0)
                prm.data.normal_(0, 0.02)
            train = dataclasses.replace(jcfg.train, steps=steps, precision=prec, log_every=10**9,
                                        disc_start=0, tokenizer_every=jcfg.train.tokenizer_every)
            jc = dataclasses.replace(jcfg, train=train)
            CALLS.clear()
            sec = timed(lambda: joint_stage.train_joint(jc, tok, teacher, ref, data, None, "cpu",
                                                        dm_weight=10.0,
                                               progress=False))
            turn = [c for c in CALLS]  # all calls over `steps` global steps
            k = train.tokenizer_every
            turns = len(range(0, steps, k))
            print(f"{preset:12s} {'joint':8s} {prec:5s} {train.batch:5d} {steps / sec:8.2f}  "
                  f"{len(turn) / steps:.2f} per global step; {turns} tokenizer turns, {len(turn)} calls, "
                  f"batches seen {sorted(set(turn))} (B = {train.batch}, CFG {train.cfg_scale})", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
