"""Self-supervised encoder for the embedded shapes data (DRAFT docstring; finalised after measurements)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import loop
from .device import autocast_ctx
from .phases import apply_update
from .runs import RunDir, load_checkpoint, load_state_strict, save_checkpoint


@dataclass(frozen=True)
class SSLConfig:
    seed: int = 0  # model init and the augmentation/batch generator
    width: int = 32  # stem channels w; the last block has 4w → an 8×8×4w feature map
    arch: str = "r4"  # a key of ARCHS (block plan after the stride-2 stem)
    objective: str = "ntxent"  # a key of OBJECTIVES
    steps: int = 900  # optimizer steps (the cosine schedule's length)
    max_seconds: float = 0.0  # >0: also end (schedule and training) after this much step time; steps caps it
    batch: int = 256  # instances per step; each gives two views
    lr: float = 2e-3  # AdamW peak LR
    weight_decay: float = 1e-4
    warmup_steps: int = 30  # linear warm-up, then cosine to 0
    grad_clip: float = 3.0
    temperature: float = 0.5  # NT-Xent temperature
    proj_hidden: int = 512  # projector 4w → hidden (BN, ReLU) → out
    proj_out: int = 128
    paired_frac: float = 0.5  # share of pairs whose 2nd view is another generator render of the same instance
    paired_ramp_steps: int = 0  # ramp paired_frac up linearly from 0 over this many steps
    paired_color: bool = False  # also colour-jitter paired views (their colours already differ)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random-resized-crop area range
    rotate: bool = True  # full 0–360° rotation (classes are rotation invariant)
    flip: bool = True
    color_p: float = 0.8  # probability of colour jitter per view
    color_strength: float = 0.4  # brightness/contrast/saturation factors in 1 ± strength
    hue: bool = True  # full hue rotation about the grey axis
    gray_p: float = 0.2  # probability of grayscale per view
    precision: str = "bf16"  # "fp32" | "bf16" (autocast)
    channels_last: bool = True  # 15–20 % faster convolutions on CPU


# --- Backbone ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


# Block plans after the stride-2 3×3 stem (3 → w, 32² → 16²): (channels as a multiple of w, stride) per block.
ARCHS: dict[str, tuple[tuple[int, int], ...]] = {
    "r4": ((1, 1), (2, 1), (4, 2), (4, 1)),  # 0.60 M params at w=32
    "r3": ((1, 1), (2, 2), (4, 1)),  # 0.31 M params, ≈ 2× cheaper: one block less at 16²
}


class SmallResNet(nn.Module):
    """32×32 images in [−1, 1] → (B, 4w, 8, 8) via `forward_features`, (B, 4w) pooled via `forward`."""

    def __init__(self, width: int = 32, arch: str = "r4"):
        super().__init__()
        w, c = width, width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())  # 16²
        blocks = []
        for mult, stride in ARCHS[arch]:
            blocks.append(BasicBlock(c, mult * w, stride))
            c = mult * w
        self.blocks = nn.Sequential(*blocks)
        self.width, self.arch, self.out_channels = w, arch, c

    def forward_features(self, x: Tensor, return_stem: bool = False):
        assert x.dim() == 4 and x.shape[1] == 3, f"expected (B, 3, H, W) images, got {tuple(x.shape)}"
        stem = self.stem(x)
        out = self.blocks(stem)
        return (out, stem) if return_stem else out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def projector(c_in: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


# --- Augmentations ----------------------------------------------------------------------------------------
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (hi - lo) + lo


def augment(x: Tensor, generator: torch.Generator, *, crop_scale: tuple[float, float] = (0.35, 1.0),
            rotate: bool = True, flip: bool = True, color_p: float = 0.8, color_strength: float = 0.4,
            hue: bool = True, gray_p: float = 0.2, max_aspect: float = 4 / 3,
            keep_color: Optional[Tensor] = None) -> Tensor:
    """Random resized crop + rotation + flip (one affine_grid), colour jitter, grayscale; (B, 3, H, W) → same.

    All draws come from `generator` (on its own device), so a seeded generator makes it deterministic.
    `keep_color` (B,) bool: those images get the geometric part only.
    """
    b, dev = x.shape[0], x.device
    u = lambda lo, hi: _uniform(b, lo, hi, generator).to(dev)  # noqa: E731
    area, log_ar = u(*crop_scale), u(-math.log(max_aspect), math.log(max_aspect))
    sx, sy = (area * log_ar.exp()).sqrt().clamp(max=1), (area / log_ar.exp()).sqrt().clamp(max=1)
    tx, ty = u(-1, 1) * (1 - sx), u(-1, 1) * (1 - sy)
    angle = u(0, 2 * math.pi) if rotate else torch.zeros(b, device=dev)
    sign = torch.where(u(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * sx * sign, -sin * sy, tx], 1),
                         torch.stack([sin * sx * sign, cos * sy, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = (x + 1) / 2
    keep = torch.zeros(b, dtype=torch.bool, device=dev) if keep_color is None else keep_color.to(dev)
    on = (u(0, 1) < color_p) & ~keep
    s = color_strength
    bright = torch.where(on, u(1 - s, 1 + s), 1.0)
    contrast = torch.where(on, u(1 - s, 1 + s), 1.0)
    sat = torch.where(on, u(1 - s, 1 + s), 1.0)
    phi = torch.where(on, u(-math.pi, math.pi), 0.0) if hue else torch.zeros(b, device=dev)
    luma = torch.tensor(_LUMA, device=dev, dtype=y.dtype)
    # colour matrix = hue rotation about the grey axis (Rodrigues) @ saturation blend toward luma
    k = torch.full((3,), 1 / math.sqrt(3), device=dev)
    kx = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev, dtype=y.dtype) / math.sqrt(3)
    eye = torch.eye(3, device=dev)
    rot = (phi.cos()[:, None, None] * eye + phi.sin()[:, None, None] * kx
           + (1 - phi.cos())[:, None, None] * torch.outer(k, k))
    satm = sat[:, None, None] * eye + (1 - sat)[:, None, None] * torch.ones(3, 1, device=dev) * luma
    y = torch.einsum("bij,bjhw->bihw", (rot @ satm).to(y.dtype), y) * bright[:, None, None, None]
    mean = torch.einsum("c,bchw->b", luma, y)[:, None, None, None] / (y.shape[2] * y.shape[3])
    y = ((y - mean) * contrast[:, None, None, None] + mean).clamp(0, 1)
    gray = (u(0, 1) < gray_p) & ~keep
    y = torch.where(gray[:, None, None, None], torch.einsum("c,bchw->bhw", luma, y)[:, None].expand_as(y), y)
    return y * 2 - 1


# --- Objectives -------------------------------------------------------------------------------------------
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent: each of the 2B projections must pick its partner among the other 2B − 1."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def vicreg(z1: Tensor, z2: Tensor, temperature: float = 0.0, sim_w: float = 25.0, var_w: float = 25.0,
           cov_w: float = 1.0) -> Tensor:
    """VICReg (Bardes et al. 2022): invariance MSE + hinge on per-dim std + off-diagonal covariance."""
    z1, z2 = z1.float(), z2.float()
    loss = sim_w * F.mse_loss(z1, z2)
    for z in (z1, z2):
        z = z - z.mean(0)
        loss = loss + var_w * F.relu(1 - (z.var(0) + 1e-4).sqrt()).mean() / 2
        cov = z.T @ z / (z.shape[0] - 1)
        loss = loss + cov_w * (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    return loss


OBJECTIVES: dict[str, Callable[..., Tensor]] = {"ntxent": nt_xent, "vicreg": vicreg}


# --- Training ---------------------------------------------------------------------------------------------
def _as_u8(renders) -> Tensor:
    """uint8 (V, N, H, W, 3) / (N, H, W, 3) / sequence of those → uint8 (V, N, 3, H, W) tensor."""
    if isinstance(renders, (list, tuple)):
        renders = np.stack([np.asarray(r) for r in renders])
    t = torch.as_tensor(np.asarray(renders) if not isinstance(renders, Tensor) else renders)
    if t.dim() == 4:
        t = t[None]
    assert t.dtype == torch.uint8 and t.shape[-1] == 3, f"expected uint8 (V, N, H, W, 3), got {t.dtype} {tuple(t.shape)}"
    return t.permute(0, 1, 4, 2, 3).contiguous()


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Trained(NamedTuple):
    model: nn.Module
    stats: dict


def _fit(cfg, model: nn.Module, loss_fn, params, *, device, run, tag, progress, hooks, log_every, ckpt_every,
         extra_state) -> dict:
    """Shared driver: AdamW, warm-up + cosine over steps (or max_seconds), `loop.train` with resumable state."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    clock = [0.0]  # training seconds so far (step time only; evaluation hooks excluded)
    last: dict = {}
    autocast = lambda: autocast_ctx(torch.device(device), cfg.precision)  # noqa: E731

    def step_fn(step: int) -> dict:
        nonlocal last
        if cfg.max_seconds > 0 and clock[0] >= cfg.max_seconds:
            return {**last, "idle": 1.0}  # time budget spent: the remaining steps are no-ops
        start = time.perf_counter()
        progress_ = max(step / cfg.steps, clock[0] / cfg.max_seconds if cfg.max_seconds > 0 else 0.0)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(progress_, step, cfg.warmup_steps)
        with autocast():
            loss, stats = loss_fn(gen, step)
        bad = int(not torch.isfinite(loss))
        norm = apply_update(loss, opt, params, cfg.grad_clip, bad)
        clock[0] += time.perf_counter() - start
        last = {"loss": float(loss.detach()), "grad_norm": norm, "lr": opt.param_groups[0]["lr"],
                "seconds": clock[0], "nonfinite": bad, **stats}
        return last

    state = {**extra_state, "opt": opt, "gen": gen, "clock": clock}
    model.train()
    return loop.train(step_fn, max_steps=cfg.steps, state=state, run=run, tag=tag, log_every=log_every,
                      ckpt_every=ckpt_every, hooks=hooks, progress=progress)


def _batch(data: Tensor, idx: Tensor, view: Tensor, device, channels_last: bool) -> Tensor:
    x = data[view, idx].to(device).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _init(fn, seed: int):
    with torch.random.fork_rng(devices=[]):  # deterministic init, caller's global RNG untouched
        torch.manual_seed(seed)
        return fn()


def train_ssl(cfg: SSLConfig, renders, *, device: str | torch.device = "cpu", run: Optional[RunDir] = None,
              tag: str = "ssl", progress: bool = True, hooks: Sequence = (), log_every: int = 25,
              ckpt_every: int = 0) -> Trained:
    """Self-supervised training (no labels) on uint8 renders (V, N, 32, 32, 3); V ≥ 2 enables paired views."""
    data = _as_u8(renders)
    n_views, n = data.shape[:2]
    encoder, proj = _init(lambda: (SmallResNet(cfg.width, cfg.arch), projector(ARCHS[cfg.arch][-1][0] * cfg.width, cfg.proj_hidden,
                                                                     cfg.proj_out)), cfg.seed)
    encoder, proj = encoder.to(device), proj.to(device)
    if cfg.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    objective = OBJECTIVES[cfg.objective]
    aug = dict(crop_scale=cfg.crop_scale, rotate=cfg.rotate, flip=cfg.flip, color_p=cfg.color_p,
               color_strength=cfg.color_strength, hue=cfg.hue, gray_p=cfg.gray_p)

    def loss_fn(gen: torch.Generator, step: int):
        b = cfg.batch
        idx = torch.randint(n, (b,), generator=gen)
        v1 = torch.randint(n_views, (b,), generator=gen)
        frac = cfg.paired_frac * min(1.0, step / cfg.paired_ramp_steps) if cfg.paired_ramp_steps else cfg.paired_frac
        paired = (torch.rand(b, generator=gen) < frac) & (n_views > 1)
        v2 = torch.where(paired, (v1 + torch.randint(1, max(n_views, 2), (b,), generator=gen)) % n_views, v1)
        x1 = augment(_batch(data, idx, v1, device, False), gen, **aug)
        x2 = augment(_batch(data, idx, v2, device, False), gen, **aug, keep_color=None if cfg.paired_color else paired)
        x = torch.cat([x1, x2])
        x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
        z = proj(encoder(x))
        loss = objective(z[:b], z[b:], cfg.temperature)
        return loss, {"paired_frac": float(paired.float().mean())}

    params = list(encoder.parameters()) + list(proj.parameters())
    stats = _fit(cfg, encoder, loss_fn, params, device=device, run=run, tag=tag, progress=progress, hooks=hooks,
                 log_every=log_every, ckpt_every=ckpt_every, extra_state={"encoder": encoder, "projector": proj})
    encoder.eval()
    return Trained(encoder, stats)


class Classifier(nn.Module):
    """The same backbone with a linear head: the supervised reference ("ResNet features")."""

    def __init__(self, encoder: SmallResNet, n_classes: int = 10):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.out_channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def train_supervised(cfg: SSLConfig, images, labels, *, device: str | torch.device = "cpu",
                     run: Optional[RunDir] = None, tag: str = "supervised", progress: bool = True,
                     hooks: Sequence = (), log_every: int = 25, ckpt_every: int = 0) -> Trained:
    """Cross-entropy training of `Classifier(SmallResNet(cfg.width, cfg.arch))` on uint8 (N, 32, 32, 3) + labels (N,).

    Reads the backbone, optimiser, schedule, augmentation and precision fields of `cfg` (the SSL-only
    fields are ignored); one augmented view per image.
    """
    data = _as_u8(images)[:1]
    y_all = torch.as_tensor(np.asarray(labels)).long()
    n = data.shape[1]
    model = _init(lambda: Classifier(SmallResNet(cfg.width, cfg.arch), int(y_all.max()) + 1), cfg.seed).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    aug = dict(crop_scale=cfg.crop_scale, rotate=cfg.rotate, flip=cfg.flip, color_p=cfg.color_p,
               color_strength=cfg.color_strength, hue=cfg.hue, gray_p=cfg.gray_p)

    def loss_fn(gen: torch.Generator, step: int):
        idx = torch.randint(n, (cfg.batch,), generator=gen)
        x = augment(_batch(data, idx, torch.zeros_like(idx), device, False), gen, **aug)
        x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
        logits = model(x)
        y = y_all[idx].to(device)
        return F.cross_entropy(logits.float(), y), {"train_acc": float((logits.argmax(1) == y).float().mean())}

    stats = _fit(cfg, model, loss_fn, list(model.parameters()), device=device, run=run, tag=tag,
                 progress=progress, hooks=hooks, log_every=log_every, ckpt_every=ckpt_every,
                 extra_state={"model": model})
    model.eval()
    return Trained(model, stats)


# --- Artifact ---------------------------------------------------------------------------------------------
def save_encoder(path, encoder: SmallResNet, cfg: SSLConfig, metrics: Optional[dict] = None) -> None:
    """Write the backbone (no projector) with its config and evaluation numbers, atomically."""
    save_checkpoint(path, {"kind": "ssl_encoder", "config": dataclasses.asdict(cfg),
                           "model": {k: v.contiguous() for k, v in encoder.state_dict().items()},
                           "metrics": dict(metrics or {})})


def load_encoder(path, device: str | torch.device = "cpu") -> tuple[SmallResNet, SSLConfig, dict]:
    """(encoder in eval mode, its config, its metrics); a missing file or mismatched weights raise RunError."""
    ckpt = load_checkpoint(path, required=("config", "model"))
    cfg = SSLConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    encoder = SmallResNet(cfg.width, cfg.arch)
    load_state_strict(encoder, ckpt["model"], str(path))
    return encoder.to(device).eval(), cfg, ckpt.get("metrics", {})
