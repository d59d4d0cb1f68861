"""Stage 1 orchestration (notebook 20; paper App. A.1): data → reference encoders → tokenizer pretraining.

One code path for every preset: the embedded shapes data or CIFAR-10 in memory (uint8), or an ImageFolder
streamed through a DataLoader (ImageNet-256 with the ADM centre crop). The frozen encoder runs on the fly
under no_grad (on this CPU it costs ~15 % of a step, less than the memory a feature cache would take).
Only the projector and decoder train; their EMA is what gets evaluated and saved, with the latent mean and
scale measured on validation latents and stored in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.utils import ModelEmaV3

from . import image_metrics, probes, shapes_dataset
from .configs import to_dict
from .configs.tokenizer import TokenizerStageConfig
from .device import autocast_ctx
from .distributed import DistContext, main_only_run, rank_generator, reduce_stats, shard_batch, wrap_ddp
from .loop import train
from .phases import TokenizerParts, disc_step, tokenizer_step
from .recon_losses import PatchDiscriminator, PerceptualLoss, default_vgg16_path
from .runs import RunDir, RunError, atomic_write_bytes, load_checkpoint, load_state_strict, save_checkpoint
from .ssl_encoder import SUPERVISED_OVERRIDES, SmallResNet, train_ssl, train_supervised
from .tokenizer import Decoder, Projector, Tokenizer, timm_encoder


@dataclass
class ImageData:
    train: Optional[Tensor]  # uint8 (V, N, H, W, 3): V renders per instance (V > 1: paired views); None if streamed
    train_labels: Optional[Tensor]
    val: Tensor  # uint8 (N, H, W, 3)
    val_labels: Tensor
    folder: Any = None  # an ImageFolderDataset for streamed training


def to_float(u8: Tensor) -> Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [−1, 1]."""
    # contiguous NCHW: the permuted view is channels-last in memory, which makes every conv and GroupNorm
    # downstream run in channels-last (5× slower for the decoder on CPU)
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _shapes(cfg: TokenizerStageConfig, cache_dir: Path) -> ImageData:
    d = cfg.data
    file = cache_dir / f"shapes_{shapes_dataset.VERSION}_n{d.n_train}_v{d.n_views}_val{d.n_val}_s{cfg.seed}.npz"
    if not file.exists():
        views = [shapes_dataset.generate(d.n_train, cfg.seed, nuisance_seed=1000 + v) for v in range(d.n_views)]
        val, val_y = shapes_dataset.generate(d.n_val, cfg.seed + 7919)
        atomic_write_bytes(file, lambda f: np.savez(f, train=np.stack([v[0] for v in views]), train_y=views[0][1],
                                                    val=val, val_y=val_y))
    z = np.load(file)
    t = {k: torch.from_numpy(z[k]) for k in ("train", "train_y", "val", "val_y")}
    return ImageData(t["train"], t["train_y"], t["val"], t["val_y"])


def load_data(cfg: TokenizerStageConfig, cache_dir: Path) -> ImageData:
    """The configured dataset; shapes renders are cached under `cache_dir` (generated once, ~4k img/s)."""
    from .image_folders import ImageFolderDataset, load_cifar10

    d = cfg.data
    if d.source == "shapes":
        return _shapes(cfg, cache_dir)
    if d.source == "cifar10":
        (x, y), (xv, yv) = load_cifar10(d.root, "train"), load_cifar10(d.root, "test")
        u8 = lambda t: ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # noqa: E731
        return ImageData(u8(x)[None], y, u8(xv)[: d.n_val], yv[: d.n_val])
    root = Path(d.root)
    folder = ImageFolderDataset(root / "train", d.resolution, hflip=True, seed=cfg.seed, skip_corrupt=d.skip_corrupt)
    val = ImageFolderDataset(root / "val", d.resolution, skip_corrupt=d.skip_corrupt)
    idx = torch.linspace(0, len(val) - 1, min(d.n_val, len(val))).long().tolist()
    items = [val[i] for i in idx]
    val_u8 = torch.stack([((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0) for x, _ in items])
    return ImageData(None, None, val_u8, torch.tensor([int(y) for _, y in items]), folder)


class SSLFeatures(nn.Module):
    """A frozen SmallResNet as the tokenizer's encoder: its 8×8 features, plus (side_input) the 16×16 stem
    folded to 8×8 by pixel_unshuffle. The stem keeps the colour that the SSL features were trained to ignore."""

    def __init__(self, backbone: SmallResNet, side_input: bool):
        super().__init__()
        self.backbone, self.side_input = backbone.eval().requires_grad_(False), side_input
        self.out_channels = backbone.out_channels + (4 * backbone.width if side_input else 0)

    def train(self, mode: bool = True) -> "SSLFeatures":
        return super().train(False)  # BatchNorm statistics stay frozen

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        feats, stem = self.backbone.forward_features(x, return_stem=True)
        out = torch.cat([feats, F.pixel_unshuffle(stem, 2)], 1) if self.side_input else feats
        # contiguous NCHW: a backbone trained in channels-last would otherwise hand that memory format to the
        # projector and decoder, whose GroupNorms run several times slower in it on CPU
        return out.contiguous()


def evaluate_features(fn, data: ImageData, device, k: int = 20, n_bank: int = 10000) -> dict:
    """kNN (k, cosine, weighted) and linear-probe val accuracy of pooled features `fn(x)`; labels used here only."""
    bank = data.train[0][:n_bank]
    ftr = probes.extract_features(fn, bank, device=device)
    fva = probes.extract_features(fn, data.val, device=device)
    ytr, yva = data.train_labels[:n_bank], data.val_labels
    return {"knn_acc": probes.knn_accuracy(ftr, ytr, fva, yva, k=k),
            "linear_acc": probes.linear_probe_accuracy(ftr, ytr, fva, yva)}


def reference_encoders(cfg: TokenizerStageConfig, data: ImageData, run: Optional[RunDir], device,
                       scores: bool = True) -> dict:
    """Train (or resume, or load when finished) the SSL encoder and the supervised classifier; return the models
    and, with `scores`, their kNN / linear-probe / val scores."""
    e, out = cfg.encoder, {}
    if e.kind == "timm":
        return out
    ssl = train_ssl(dataclasses.replace(e.ssl, seed=cfg.seed), data.train, device=device, run=run, tag="ssl")
    out["ssl"] = ssl.model.eval()
    if scores:
        out["ssl_scores"] = evaluate_features(out["ssl"], data, device, e.knn_k)
    if e.supervised_steps > 0:
        sup_cfg = dataclasses.replace(e.ssl, **{**SUPERVISED_OVERRIDES, "seed": cfg.seed + 1, "steps": e.supervised_steps,
                                                "batch": e.supervised_batch, "max_seconds": 0.0})
        sup = train_supervised(sup_cfg, data.train[:1], data.train_labels, device=device, run=run, tag="supervised")
        out["supervised"] = sup.model[0].eval()  # the backbone of Sequential(backbone, head)
        if not scores:
            return out
        logits = probes.extract_features(sup.model.eval(), data.val, device=device)
        out["supervised_scores"] = {"val_acc": float((logits.argmax(1) == data.val_labels).float().mean()),
                                    **evaluate_features(out["supervised"], data, device, e.knn_k)}
    return out


def build_tokenizer(cfg: TokenizerStageConfig, encoder: Optional[nn.Module]) -> Tokenizer:
    """Frozen encoder (ssl/supervised backbone wrapped by SSLFeatures, or a timm model) → projector → decoder."""
    e, n = cfg.encoder, cfg.net
    if encoder is None:
        encoder = timm_encoder(e.timm_name, img_size=cfg.data.resolution, patch_size=e.timm_patch_size,
                               weights_path=e.timm_weights or None, pretrained=e.timm_pretrained)
        channels, reduction = encoder.out_channels, encoder.reduction
    else:
        encoder = SSLFeatures(encoder, e.side_input)
        channels, reduction = encoder.out_channels, 4
    latent = cfg.data.resolution // (reduction * n.unshuffle)
    with torch.random.fork_rng(devices=[]):  # the initialisation depends on cfg.seed only
        torch.manual_seed(cfg.seed + 5)
        proj = Projector(channels, n.z_channels, hidden_channels=n.proj_hidden, unshuffle=n.unshuffle)
        dec = Decoder(n.z_channels, latent_size=latent, image_size=cfg.data.resolution, ch=n.dec_ch,
                      ch_mult=n.dec_mult, num_res_blocks=n.dec_res_blocks, attn=n.dec_attn, num_groups=n.dec_groups)
    return Tokenizer(encoder, proj, dec)


def perceptual_loss(mode: str) -> Optional[PerceptualLoss]:
    """"auto": real LPIPS when the VGG16 file is local, else none (logged by the caller via the summary)."""
    if mode == "off" or (mode == "auto" and not default_vgg16_path().is_file()):
        return None
    return PerceptualLoss(allow_random_backbone=mode == "random")


def batches(data: ImageData, batch: int, gen: torch.Generator, workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images in [−1, 1], labels) training batches drawn with replacement by `gen`."""
    if data.folder is None:
        while True:
            idx = torch.randint(data.train.shape[1], (batch,), generator=gen)
            yield to_float(data.train[0][idx]), data.train_labels[idx].long()
    sampler = torch.utils.data.RandomSampler(data.folder, replacement=True, num_samples=10**12, generator=gen)
    for x, y in torch.utils.data.DataLoader(data.folder, batch_size=batch, sampler=sampler, num_workers=workers,
                                            drop_last=True):
        yield x, torch.as_tensor(y).long()


def train_tokenizer(cfg: TokenizerStageConfig, tok: Tokenizer, data: ImageData, run: Optional[RunDir], device,
                    progress: bool = True, ctx: Optional[DistContext] = None) -> tuple[Tokenizer, dict]:
    """Projector + decoder with L1 (+LPIPS) + adaptive hinge GAN from `disc_start`; returns (EMA tokenizer, stats).

    With a multi-process `ctx` (torchrun) each rank draws train.batch / world_size images (and its DiffAug
    draws) from its own generator; the projector + decoder and the discriminator train under DDP (the frozen
    encoder is not wrapped; every parameter is used in every forward, so find_unused_parameters stays off).
    The adaptive GAN weight is that of the global batch (its last-layer gradients are averaged over ranks).
    The discriminator's BatchNorm normalises with per-rank shard statistics, as in multi-GPU PatchGAN
    training; its running statistics are averaged over ranks after each update. A non-finite value on any
    rank makes every rank skip that update (and the loop raise at the same step). Logged numbers are rank
    means; only rank 0 writes. Resuming restores rank 0's checkpoint on every rank, each with its own data
    generator (`loop.train`), under the same world size.
    """
    t, tok, ctx = cfg.train, tok.to(device), ctx or DistContext()
    params = list(tok.projector.parameters()) + list(tok.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    warm = lambda s: min(1.0, (s + 1) / max(t.warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / t.steps, 1)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 6)
        disc = PatchDiscriminator(3, t.disc_ndf, t.disc_layers).to(device)
    dopt = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr, betas=(0.9, 0.95), weight_decay=0.0)
    trainable = TokenizerParts(tok.projector, tok.decoder)
    model, disc_model = wrap_ddp(trainable, ctx), wrap_ddp(disc, ctx)
    # EMA with warm-up (decay 1 − (1 + step)^(−2/3), capped at ema_decay): a short run's EMA is not its init.
    ema = ModelEmaV3(trainable, decay=t.ema_decay, use_warmup=True)
    perceptual = perceptual_loss(t.lpips)
    gen = rank_generator(cfg.seed + 11, ctx)  # rank 0 (or one process): the single-process stream
    stream = batches(data, shard_batch(t.batch, ctx, "train.batch"), gen, cfg.data.workers)
    autocast = lambda: autocast_ctx(torch.device(device), t.precision)  # noqa: E731

    def step(k: int) -> dict:
        images = next(stream)[0].to(device)
        with autocast():
            feats = tok.encode_features(images)
        gan = disc if k >= t.disc_start and t.disc_weight > 0 else None
        stats, x_hat = tokenizer_step(tok, opt, params, images, feats.float(), gen, l1=t.l1, l2=t.l2,
                                      perceptual=perceptual, lpips_weight=t.lpips_weight, disc=gan,
                                      disc_weight=t.disc_weight, scheduler=sched, grad_clip=t.grad_clip,
                                      autocast=autocast, model=model, ctx=ctx)
        if gan is not None:
            d = disc_step(disc_model, dopt, images, x_hat, gen, bcr=t.bcr, grad_clip=t.grad_clip,
                          autocast=autocast, ctx=ctx)
            stats = {**stats, **d, "nonfinite": stats["nonfinite"] + d["nonfinite"]}
        ema.update(trainable, step=k + 1)
        return reduce_stats(stats, ctx)

    state = {"trainable": trainable, "opt": opt, "sched": sched, "disc": disc, "dopt": dopt, "ema": ema, "gen": gen}
    stats = train(step, max_steps=t.steps, state=state, run=main_only_run(run, ctx), tag="tokenizer",
                  log_every=t.log_every, ckpt_every=t.ckpt_every, progress=progress and ctx.is_main, ctx=ctx)
    trainable.load_state_dict(ema.module.state_dict())  # evaluate and save the EMA weights
    return tok.eval(), {**stats, "lpips_in_loss": "off" if perceptual is None else perceptual.label}


@torch.no_grad()
def reconstruct(tok: Tokenizer, images_u8: Tensor, device, batch: int = 500, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """(x̂ float in [−1, 1] clamped, z) for uint8 images, batched."""
    outs, zs = [], []
    for s in range(0, len(images_u8), batch):
        x = to_float(images_u8[s:s + batch]).to(device)
        with autocast_ctx(torch.device(device), precision):
            x_hat, z = tok(x)
        outs.append(x_hat.float().clamp(-1, 1).cpu())
        zs.append(z.float().cpu())
    return torch.cat(outs), torch.cat(zs)


def evaluate_tokenizer(tok: Tokenizer, data: ImageData, device, feature_net: Optional[nn.Module], batch: int = 500) -> dict:
    """Val PSNR, SSIM, LPIPS (labelled) and the Fréchet distance of reconstructions in `feature_net`'s space."""
    x_hat, z = reconstruct(tok, data.val, device, batch)
    x = to_float(data.val)
    out = {"psnr": float(image_metrics.psnr(x_hat, x).mean()), "ssim": float(image_metrics.ssim(x_hat, x).mean())}
    lp = perceptual_loss("auto") or PerceptualLoss(allow_random_backbone=True)
    res = image_metrics.lpips_distance(x_hat[:1000], x[:1000], lp)
    out.update(lpips=float(res.values.mean()), lpips_label=res.label)
    if feature_net is not None:
        fa = probes.extract_features(feature_net, x, device=device)
        fb = probes.extract_features(feature_net, x_hat, device=device)
        fd = image_metrics.frechet_distance(fa, fb, "SSL-encoder pooled features (not Inception; not FID)")
        out.update(fd=fd.value, fd_label=fd.feature_space, fd_n=fd.n_a)
    stats = tok.measure_latent_stats(z.split(batch))
    out.update(latent_mean=stats.mean, latent_scale=stats.scale)
    return out


def save_tokenizer(path: Path, cfg: TokenizerStageConfig, tok: Tokenizer, encoders: dict) -> None:
    """Everything later stages need to rebuild the tokenizer, latent stats included."""
    payload = {"kind": "tokenizer", "config": to_dict(cfg), "projector": tok.projector.state_dict(),
               "decoder": tok.decoder.state_dict(), "latent_mean": float(tok.latent_mean),
               "latent_scale": float(tok.latent_scale)}
    for name in ("ssl", "supervised"):
        if name in encoders:
            payload[name] = encoders[name].state_dict()
    save_checkpoint(path, payload)


def load_tokenizer(path: str | Path, device="cpu") -> tuple[Tokenizer, TokenizerStageConfig, dict]:
    """Rebuild a tokenizer saved by `save_tokenizer` (strict); returns (tokenizer, config, encoders)."""
    from .configs import from_dict

    ck = load_checkpoint(path, required=("kind", "config", "projector", "decoder", "latent_mean", "latent_scale"))
    if ck["kind"] != "tokenizer":
        raise RunError(f"{path} holds a {ck['kind']!r} checkpoint, not a tokenizer")
    cfg = from_dict(TokenizerStageConfig, ck["config"])
    encoders = {}
    for name in ("ssl", "supervised"):
        if name in ck:
            net = SmallResNet(cfg.encoder.ssl.width, cfg.encoder.ssl.arch)
            load_state_strict(net, ck[name], f"{path} [{name}]")
            encoders[name] = net.eval()
    tok = build_tokenizer(cfg, encoders.get("ssl") if cfg.encoder.kind == "ssl" else encoders.get("supervised"))
    load_state_strict(tok.projector, ck["projector"], f"{path} [projector]")
    load_state_strict(tok.decoder, ck["decoder"], f"{path} [decoder]")
    tok.latent_mean.fill_(ck["latent_mean"])
    tok.latent_scale.fill_(ck["latent_scale"])
    return tok.to(device).eval(), cfg, encoders


def encoder_scores(encoders: dict) -> dict[str, dict[str, float]]:
    """{encoder: its label-based scores} (labels are used for evaluation only); only the scores each one has."""
    return {name.removesuffix("_scores"): scores for name, scores in encoders.items() if name.endswith("_scores")}


def encoder_table(encoders: dict):
    """encoder_scores as a table (a score an encoder does not have, e.g. the SSL encoder's val_acc, is NaN)."""
    import pandas as pd

    return pd.DataFrame(encoder_scores(encoders)).T


def loss_curves(run: RunDir, tag: str, keys: tuple[str, ...]):
    """Plotly lines of `keys` against step from the run's metrics.jsonl (records of `tag`)."""
    import plotly.graph_objects as go

    recs = [r for r in run.read_metrics() if r.get("tag") == tag]
    fig = go.Figure([go.Scatter(x=[r["step"] for r in recs if k in r], y=[r[k] for r in recs if k in r],
                                mode="lines+markers", name=k) for k in keys])
    fig.update_layout(title=f"{tag} losses", xaxis_title="step", height=380, width=800)
    return fig
