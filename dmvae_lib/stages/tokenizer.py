"""Notebook 20 (paper App. A.1): data → reference encoders → stage-1 tokenizer pretraining.

One code path for every preset: the embedded shapes data or CIFAR-10 in memory (uint8), or an ImageFolder
streamed through a DataLoader (ImageNet-256 with the ADM centre crop). The frozen encoder runs on the fly
under no_grad (on this CPU it costs ~15 % of a step, less than the memory a feature cache would take).
Only the projector and decoder train; their EMA is what gets evaluated and saved, with the latent mean and
scale measured on validation latents and stored in the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from ..configs.tokenizer import TokenizerStageConfig, TrainConfig, gan_on
from ..data.images import ImageData, batches
from ..data.pixels import to_float
from ..metrics import image_metrics, probes
from ..metrics.reconstruction import reconstruct
from ..models.alignment import SemanticAlignment, seeded_alignment
from ..models.recon_losses import PatchDiscriminator, PerceptualLoss, perceptual_loss
from ..models.ssl_encoder import SmallResNet, calibrate_batchnorm
from ..models.tokenizer import Tokenizer
from ..runtime import weights
from ..runtime.device import autocaster, compile_in_place, fused_adamw
from ..runtime.distributed import (
    DistContext,
    main_only_run,
    rank_generator,
    reduce_stats,
    shard_batch,
    wrap_ddp,
)
from ..runtime.runs import RunDir
from ..runtime.seeds import stream_seed
from ..train.loop import train
from ..train.phases import TokenizerParts, disc_step, tokenizer_step
from ..train.ssl import SUPERVISED_OVERRIDES, train_ssl, train_supervised


def evaluate_features(fn, data: ImageData, device, k: int = 20, n_bank: int = 10000) -> dict:
    """kNN (k, cosine, weighted) and linear-probe val accuracy
    of pooled features `fn(x)`; labels used here only."""
    bank = data.train[0][:n_bank]
    ftr = probes.extract_features(fn, bank, device=device)
    fva = probes.extract_features(fn, data.val, device=device)
    ytr, yva = data.train_labels[:n_bank], data.val_labels
    return {"knn_acc": probes.knn_accuracy(ftr, ytr, fva, yva, k=k),
            "linear_acc": probes.linear_probe_accuracy(ftr, ytr, fva, yva)}


def reference_encoders(cfg: TokenizerStageConfig, data: ImageData, run: Optional[RunDir], device,
                       scores: bool = True) -> dict:
    """Train (or resume, or load when finished) the SSL encoder and the supervised classifier; return the
    models and, with `scores`, their kNN / linear-probe / val scores."""
    e, out = cfg.encoder, {}
    if e.kind == "timm":
        return out
    if e.kind == "random":
        out["random"] = random_encoder(cfg, data, device)
    ssl = train_ssl(dataclasses.replace(e.ssl, seed=cfg.seed), data.train, device=device, run=run, tag="ssl")
    out["ssl"] = ssl.model.eval()
    if scores:
        out["ssl_scores"] = evaluate_features(out["ssl"], data, device, e.knn_k)
    if e.supervised_steps > 0:
        sup_cfg = dataclasses.replace(e.ssl, **{**SUPERVISED_OVERRIDES,
                                                "seed": stream_seed(cfg.seed, "tokenizer.supervised"),
                                                "steps": e.supervised_steps, "batch": e.supervised_batch,
                                                "max_seconds": 0.0})
        sup = train_supervised(sup_cfg, data.train[:1], data.train_labels, device=device, run=run,
                               tag="supervised")
        out["supervised"] = sup.model[0].eval()  # the backbone of Sequential(backbone, head)
        out["supervised_head"] = sup.model[1].eval()  # its linear head: with it, the classifier
        if not scores:
            return out
        logits = probes.extract_features(sup.model.eval(), data.val, device=device)
        out["supervised_scores"] = {"val_acc": float((logits.argmax(1) == data.val_labels).float().mean()),
                                    **evaluate_features(out["supervised"], data, device, e.knn_k)}
    return out


def random_encoder(cfg: TokenizerStageConfig, data: ImageData, device, calibration_batches: int = 8,
                   batch: int = 256) -> nn.Module:
    """The SSL backbone untrained (`encoder.kind="random"`): seeded weights, BatchNorm statistics averaged
    over a few training batches so its eval-mode features are normalised. No image labels are read."""
    e, images = cfg.encoder, data.train[0] if data.train is not None else data.val
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, "tokenizer.random_encoder"))
        net = SmallResNet(e.ssl.width, e.ssl.arch)
        order = torch.randperm(len(images))[:calibration_batches * batch]
    net = net.to(device)
    calibrate_batchnorm(net, (to_float(images[order[i:i + batch]]).to(device) for i in range(0, len(order),
                                                                                              batch)))
    return net.eval().requires_grad_(False)


def semantic_alignment(cfg: TokenizerStageConfig, tok: Tokenizer) -> Optional[SemanticAlignment]:
    """The VF-loss module for `tok` (None when both alignment weights are 0); seeded by cfg.seed alone."""
    c = cfg.train
    align = seeded_alignment(stream_seed(cfg.seed, "tokenizer.align_init"), cfg.net.z_channels,
                             tok.decoder.latent_size, tok.encoder.semantic_channels,
                             token_weight=c.align_token, global_weight=c.align_global,
                             margin_cos=c.align_margin_cos, margin_dist=c.align_margin_dist)
    return None if align is None else align.to(tok.latent_mean.device)


@dataclass
class TokenizerState:
    """What stage 1's step reads and changes (`train_tokenizer`). `model` (projector + decoder + alignment),
    `encoder` and `disc_model` are DDP-wrapped under a multi-process `ctx`; `trainable` is what the EMA
    averages."""

    tok: Tokenizer
    model: nn.Module
    encoder: nn.Module
    params: list
    opt: torch.optim.Optimizer
    sched: object
    disc: nn.Module
    disc_model: nn.Module
    dopt: torch.optim.Optimizer
    trainable: nn.Module
    ema: ModelEmaV3
    rec: dict  # reconstruction_loss's keywords
    train: TrainConfig
    batches: Iterator[tuple[Tensor, Tensor]]
    gen: torch.Generator  # batches and GAN augmentation
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    ctx: DistContext


def tokenizer_stage_step(s: TokenizerState, k: int) -> dict:
    """Step k of stage 1: L_rec (+ w·L_GAN once the GAN is on), the discriminator's step, the EMA."""
    c = s.train
    images = next(s.batches)[0].to(s.device, non_blocking=s.device.type == "cuda")
    with s.autocast(), torch.set_grad_enabled(c.train_encoder):
        feats = s.encoder(images)
    gan = s.disc if gan_on(c, k) else None
    stats, decoded = tokenizer_step(s.tok, s.opt, s.params, images, feats.float(), s.gen, rec=s.rec, disc=gan,
                                    disc_weight=c.disc_weight, scheduler=s.sched, grad_clip=c.grad_clip,
                                    autocast=s.autocast, model=s.model, ctx=s.ctx)
    if gan is not None:
        d = disc_step(s.disc_model, s.dopt, images, decoded, s.gen, bcr=c.bcr, grad_clip=c.grad_clip,
                      autocast=s.autocast, ctx=s.ctx)
        stats = {**stats, **d, "nonfinite": stats["nonfinite"] + d["nonfinite"]}
    s.ema.update(s.trainable, step=k + 1)
    return reduce_stats(stats, s.ctx)


def _cosine_with_warmup(steps: int, warmup: int, s: int) -> float:
    """The tokenizer's LR multiplier at optimizer step s: linear warm-up times a cosine to 0 at `steps`."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))
    return min(1.0, (s + 1) / max(warmup, 1)) * cosine


def train_tokenizer(cfg: TokenizerStageConfig, tok: Tokenizer, data: ImageData, run: Optional[RunDir], device,
                    progress: bool = True, ctx: Optional[DistContext] = None) -> tuple[Tokenizer, dict]:
    """Projector + decoder (+ the encoder with `train.train_encoder`) on L1 (+LPIPS) + adaptive hinge GAN from
    `disc_start`; returns (EMA tokenizer, stats). With a multi-process `ctx` every trained part and the
    discriminator train under DDP, as in runtime/distributed.py."""
    c, tok, ctx, dev = cfg.train, tok.to(device), ctx or DistContext(), torch.device(device)
    align = semantic_alignment(cfg, tok)
    params = [*tok.trainable_parameters(c.train_encoder), *(align.parameters() if align else [])]
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay,
                            fused=fused_adamw(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_cosine_with_warmup, c.steps,
                                                                     c.warmup_steps))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, "tokenizer.disc_init"))
        disc = PatchDiscriminator(3, c.disc_ndf, c.disc_layers).to(device)
    if c.channels_last:  # NHWC convolutions (GPU, bf16); opt-in, the CPU presets keep NCHW
        tok.decoder.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    dopt = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, betas=(0.9, 0.95), weight_decay=0.0,
                             fused=fused_adamw(device))
    parts = TokenizerParts(tok.projector, tok.decoder, align)
    model, disc_model = wrap_ddp(parts, ctx), wrap_ddp(disc, ctx)
    encoder = wrap_ddp(tok.encoder, ctx) if c.train_encoder else tok.encoder
    # what the EMA averages and the checkpoint holds: the trained parts (and the encoder when it trains)
    trainable = nn.ModuleDict({"parts": parts, "encoder": tok.encoder}) if c.train_encoder else parts
    # EMA with warm-up (decay 1 − (1 + step)^(−2/3), capped at ema_decay): a short run's EMA is not its init.
    ema = ModelEmaV3(trainable, decay=c.ema_decay, use_warmup=True)
    compile_in_place(tok.decoder, c.compile)  # after the EMA's deep copy, which stays uncompiled
    perceptual = perceptual_loss(c.lpips)
    gen = rank_generator(stream_seed(cfg.seed, "tokenizer.batches"), ctx)  # rank 0: the one-process stream
    s = TokenizerState(
        tok=tok, model=model, encoder=encoder, params=params, opt=opt, sched=sched, disc=disc,
        disc_model=disc_model, dopt=dopt,
        trainable=trainable, ema=ema, train=c, gen=gen, autocast=autocaster(dev, c.precision), device=dev,
        rec={"l1": c.l1, "l2": c.l2, "perceptual": perceptual, "lpips_weight": c.lpips_weight}, ctx=ctx,
        batches=batches(data, shard_batch(c.batch, ctx, "train.batch"), gen, cfg.data.workers,
                        pin_memory=dev.type == "cuda"))
    state = {"trainable": trainable, "opt": opt, "sched": sched, "disc": disc, "dopt": dopt, "ema": ema,
             "gen": gen}
    stats = train(functools.partial(tokenizer_stage_step, s), max_steps=c.steps, state=state,
                  run=main_only_run(run, ctx), tag="tokenizer", log_every=c.log_every,
                  ckpt_every=c.ckpt_every, progress=progress and ctx.is_main, ctx=ctx)
    trainable.load_state_dict(ema.module.state_dict())  # evaluate and save the EMA weights (align is dropped)
    if c.train_encoder:
        tok.encoder.set_trainable(False)
    return tok.eval(), {**stats, "lpips_in_loss": "off" if perceptual is None else perceptual.label,
                        **weights.provenance(perceptual)}


def evaluate_tokenizer(tok: Tokenizer, data: ImageData, device, feature_net: Optional[nn.Module],
                       batch: int = 500) -> dict:
    """Val PSNR, SSIM, LPIPS (labelled) and the Fréchet
    distance of reconstructions in `feature_net`'s space."""
    x_hat, z = reconstruct(tok, data.val, device, batch)
    x = to_float(data.val)
    out = {"psnr": float(image_metrics.psnr(x_hat, x).mean()),
           "ssim": float(image_metrics.ssim(x_hat, x).mean())}
    lp = perceptual_loss("auto") or PerceptualLoss(allow_random_backbone=True)
    res = image_metrics.lpips_distance(x_hat[:1000], x[:1000], lp)
    out.update(lpips=float(res.values.mean()), lpips_label=res.label, **weights.provenance(lp))
    if feature_net is not None:
        fa = probes.extract_features(feature_net, x, device=device)
        fb = probes.extract_features(feature_net, x_hat, device=device)
        fd = image_metrics.frechet_distance(fa, fb, "SSL-encoder pooled features (not Inception; not FID)")
        out.update(fd=fd.value, fd_label=fd.feature_space, fd_n=fd.n_a)
    stats = tok.measure_latent_stats(z.split(batch))
    out.update(latent_mean=stats.mean, latent_scale=stats.scale)
    return out


def latent_probe(tok: Tokenizer, data: ImageData, device, n_train: int = 10000, k: int = 20) -> dict:
    """Class structure of the stage-1 latents: linear probe and kNN (k, cosine, weighted) on flattened
    normalised latents, fit on up to `n_train` labelled train images and scored on the val split (labels used
    here only). A streamed dataset (no in-memory train split) fits on val's first half, scores the second."""
    fn = lambda x: tok.normalize(tok.encode(x)).flatten(1)  # noqa: E731
    if data.train is not None:
        xtr, ytr, xva, yva = data.train[0][:n_train], data.train_labels[:n_train], data.val, data.val_labels
        split = "train/val"
    else:
        half = len(data.val) // 2
        xtr, ytr, xva, yva = data.val[:half], data.val_labels[:half], data.val[half:], data.val_labels[half:]
        split = "val halves"
    ftr = probes.extract_features(fn, xtr, device=device)
    fva = probes.extract_features(fn, xva, device=device)
    return {"linear_acc": probes.linear_probe_accuracy(ftr, ytr, fva, yva),
            "knn_acc": probes.knn_accuracy(ftr, ytr, fva, yva, k=k), "dim": ftr.shape[1], "n_train": len(ftr),
            "n_val": len(fva), "split": split}


def encoder_scores(encoders: dict) -> dict[str, dict[str, float]]:
    """{encoder: its label-based scores} (labels are used
    for evaluation only); only the scores each one has."""
    return {name.removesuffix("_scores"): scores for name,
            scores in encoders.items() if name.endswith("_scores")}


def encoder_table(encoders: dict):
    """encoder_scores as a table (a score an encoder does
    not have, e.g. the SSL encoder's val_acc, is NaN)."""
    import pandas as pd

    return pd.DataFrame(encoder_scores(encoders)).T
