"""Self-supervised encoder for the embedded shapes: a small ResNet trained without labels by SimCLR's NT-Xent
on generator-paired views (`views.py`), plus the supervised reference of the same backbone.

    x1 = A(render_a(s)),  x2 = A(render_b(s)),  a ≠ b      two renders of shape instance s (same class and pose,
                                                           independent colours/background/texture/noise);
                                                           A = random resized crop + 0–360° rotation + flip
    z  = g(f(x)),  f: SmallResNet, (B, 3, 32, 32) → (B, 4w, 8, 8) → mean-pooled (B, 4w);  g: MLP projector
    L  = −(1/2B) Σ_i log[exp(cos(z_i, z_i⁺)/T) / Σ_{k≠i} exp(cos(z_i, z_k)/T)]   over the 2B views (NT-Xent)

Why (kNN k=20 cosine on 10 k labelled train images vs the 5 k val split; 20 k train instances; one seed unless
noted; cosine LR over the steps; "img" = images through the net, 2 per pair). The generator's paired views are
the decisive ingredient: unlike colour jitter they also redraw the background texture and noise, the instance
shortcuts that capped plain SimCLR at ≈ 50 % (calibration-cpu.md §2). With them, extra colour jitter only
hurts, and small batches with many steps beat big batches at equal compute:

    r4 (0.60 M), B=256, T=0.5, jitter, 50 % paired, 300 steps (154 k img) ........ kNN 79.7, linear 84.0
      same, 100 % paired ......................................................... 85.8 / 89.2
      100 % paired, no colour jitter/grayscale ................................... 87.8 / 89.9
    r3 (0.31 M, 2× cheaper), 100 % paired, with jitter, 300 steps ................. 73.3 / 77.8
      no jitter, 300 steps: NT-Xent T=0.5 78.6 / 83.0; VICReg 73.9 / 76.8
      no jitter, 600 steps (307 k img): T=0.5 96.6 (seed 1: 93.2); T=0.2 97.3 (seed 1: 96.3)
      T=0.2, 4 → 2 renders per instance, 600 steps ................................ 97.7 / 98.5
      T=0.2, 2 renders, B=128 × 600 steps (154 k img) .............................. 93.7 / 95.2
      T=0.2, 2 renders, B=64 × 1200 steps (154 k img) .............................. 97.2 / 98.3
      T=0.2, 2 renders, B=32 × 2400 steps (154 k img) .............................. 97.0 / 97.9
      T=0.2, 2 renders, B=64, 2400-step schedule: 98.2 at step 900, 99.2 at 1500 (K1)
    supervised (same r3, labels, jitter), B=256 × 480 steps: val accuracy 96.3, kNN on its features 98.5

Plain paired views did not stall here (the calibration's first attempt did, with colour jitter and T=0.2 on
another encoder), so no ramp from ordinary pairs is needed; `paired_frac`/`paired_ramp_steps` keep the option.

Colour: the paired views teach invariance to the nuisance colours, so the final map is colour-blind: a 1×1
linear read-out of the (4×4-pooled) pixel colour from the 8×8 map has R² 0.03 (random init: 0.87). The stem
map (one conv + BN + ReLU of the pixels) keeps it: R² 0.91 from the 16×16 stem (random init 0.97). The
tokenizer should therefore take `forward_features(x, return_stem=True)` and use the stem as a side input.

Speed (2 free Zen 4 cores, 2 threads, r3, w=32): bf16 + channels_last 2,080 img/s, bf16 1,650, fp32 1,085;
B=64: 67 ms/step. Labels are read only by `probes.py` and `train_supervised`, never by `train_ssl`.

References: Chen et al. 2020, SimCLR, arXiv 2002.05709; Bardes et al. 2022, VICReg, arXiv 2105.04906; Wu et
al. 2018 (weighted kNN monitor); Ye et al., DMVAE, arXiv 2512.07778 (the tokenizer this encoder feeds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import loop
from .device import autocast_ctx
from .phases import apply_update
from .runs import RunDir, load_checkpoint, load_state_strict, save_checkpoint
from .views import _as_u8, _images, augment, paired_renders, sample_views  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class SSLConfig:
    seed: int = 0  # model init (seed) and the batch/augmentation generator (seed + 1)
    width: int = 32  # stem channels w; the last block has 4w → an 8×8×4w feature map
    arch: str = "r3"  # a key of ARCHS: "r3" is 2× cheaper per step than "r4" and reached 96.6 % (r4: 87.8 %)
    objective: str = "ntxent"  # a key of OBJECTIVES (VICReg: 73.9 % against NT-Xent's 78.6 % at 300 steps)
    steps: int = 600  # optimizer steps = the cosine schedule's length (≈ 2.5 min at 246 ms/step, 2 free cores)
    max_seconds: float = 0.0  # >0: also end (schedule and training) after this much step time; steps caps it
    batch: int = 256  # instances per step; each gives two views (512 images through the net)
    lr: float = 2e-3  # AdamW peak LR
    weight_decay: float = 1e-4
    warmup_steps: int = 30  # linear warm-up, then cosine to 0
    grad_clip: float = 3.0
    temperature: float = 0.5  # NT-Xent temperature
    proj_hidden: int = 512  # projector 4w → hidden (BN, ReLU) → out; discarded after training
    proj_out: int = 128
    paired_frac: float = 1.0  # share of pairs whose 2nd view is another generator render (needs V ≥ 2)
    paired_ramp_steps: int = 0  # >0: ramp paired_frac up linearly from 0 over this many steps
    paired_color: bool = False  # also colour-jitter the 2nd view of paired pairs (their colours already differ)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random-resized-crop area range
    rotate: bool = True  # full 0–360° rotation: the classes are rotation invariant
    flip: bool = True
    color_p: float = 0.0  # probability of colour jitter per view (0.8 cost 12 points with paired views)
    color_strength: float = 0.4  # brightness/contrast/saturation factors in 1 ± strength
    hue: bool = True  # jitter includes a full hue rotation about the grey axis
    gray_p: float = 0.0  # probability of grayscale per view
    precision: str = "bf16"  # "fp32" | "bf16" (autocast; 1.5× faster here, 2× with channels_last)
    channels_last: bool = True  # NHWC convolutions, ≈ 25 % faster on CPU


SMOKE_OVERRIDES: dict[str, Any] = {"steps": 30, "batch": 64, "warmup_steps": 5}  # ≈ 10 s; not a good encoder


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
    "r3": ((1, 1), (2, 2), (4, 1)),  # 0.31 M params at w=32: 16² × w, then 8² × 2w, 8² × 4w
    "r4": ((1, 1), (2, 1), (4, 2), (4, 1)),  # 0.60 M params: one more block at 16², ≈ 2× the compute
}


class SmallResNet(nn.Module):
    """32×32 images in [−1, 1] → (B, 4w, 8, 8) via `forward_features`, (B, 4w) pooled via `forward`."""

    def __init__(self, width: int = 32, arch: str = "r3"):
        super().__init__()
        w, c = width, width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())  # 16²
        blocks = []
        for mult, stride in ARCHS[arch]:
            blocks.append(BasicBlock(c, mult * w, stride))
            c = mult * w
        self.blocks = nn.Sequential(*blocks)
        self.width, self.arch, self.out_channels = w, arch, c

    def forward_features(self, x: Tensor, return_stem: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, 3, 32, 32) → (B, 4w, 8, 8); with return_stem also the colour-preserving (B, w, 16, 16) stem map."""
        assert x.dim() == 4 and x.shape[1] == 3, f"expected (B, 3, H, W) images, got {tuple(x.shape)}"
        stem = self.stem(x)
        out = self.blocks(stem)
        return (out, stem) if return_stem else out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def projector(c_in: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


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
    """VICReg (Bardes et al. 2022): invariance MSE + hinge on per-dim std + off-diagonal covariance.
    `temperature` is unused (it keeps the OBJECTIVES signature)."""
    z1, z2 = z1.float(), z2.float()
    loss = sim_w * F.mse_loss(z1, z2)
    for z in (z1 - z1.mean(0), z2 - z2.mean(0)):
        cov = z.T @ z / (z.shape[0] - 1)
        loss = loss + var_w * F.relu(1 - (cov.diagonal() + 1e-4).sqrt()).mean() / 2
        loss = loss + cov_w * (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    return loss


OBJECTIVES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {"ntxent": nt_xent, "vicreg": vicreg}


# --- Step functions ---------------------------------------------------------------------------------------
def ssl_step(encoder: nn.Module, proj: nn.Module, optimizer: torch.optim.Optimizer, x1: Tensor, x2: Tensor, *,
             objective: str = "ntxent", temperature: float = 0.5, grad_clip: float = 3.0,
             autocast: Callable = contextlib.nullcontext, channels_last: bool = False) -> dict[str, float]:
    """One update of encoder + projector on the objective between the views x1, x2 (B, 3, H, W)."""
    x = torch.cat([x1, x2])  # one forward: BatchNorm sees both views, as in SimCLR
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with autocast():
        z = proj(encoder(x))
    loss = OBJECTIVES[objective](z[: len(x1)], z[len(x1):], temperature)
    bad = int(not torch.isfinite(loss))
    norm = apply_update(loss, optimizer, [*encoder.parameters(), *proj.parameters()], grad_clip, bad)
    return {"loss": float(loss.detach()), "grad_norm": norm, "nonfinite": bad}


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
                    grad_clip: float = 3.0, autocast: Callable = contextlib.nullcontext,
                    channels_last: bool = False) -> dict[str, float]:
    """One cross-entropy update of `model` (images → logits) on (x, y)."""
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with autocast():
        logits = model(x).float()
    loss = F.cross_entropy(logits, y)
    bad = int(not torch.isfinite(loss))
    norm = apply_update(loss, optimizer, model.parameters(), grad_clip, bad)
    return {"loss": float(loss.detach()), "grad_norm": norm, "nonfinite": bad,
            "train_acc": float((logits.argmax(1) == y).float().mean())}


# --- Training drivers -------------------------------------------------------------------------------------
class Trained(NamedTuple):
    model: nn.Module  # the SSL backbone, or the supervised Sequential(backbone, head); in eval mode
    stats: dict  # the last step's numbers (loss, lr, seconds, …)


def _init(build: Callable[[], Any], seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):  # deterministic init; the caller's global RNG is untouched
        torch.manual_seed(seed)
        return build()


def _bind(hooks: Sequence, model: nn.Module) -> list:
    """[(every, fn(step, model))] → loop hooks [(every, fn(step))]; `model` is put back in train mode after."""
    def call(fn):
        return lambda step: (fn(step, model), model.train())
    return [(every, call(fn)) for every, fn in hooks]


def _aug(cfg: SSLConfig) -> dict:
    return {"crop_scale": cfg.crop_scale, "rotate": cfg.rotate, "flip": cfg.flip, "color_p": cfg.color_p,
                "color_strength": cfg.color_strength, "hue": cfg.hue, "gray_p": cfg.gray_p}


def _fit(cfg: SSLConfig, modules: dict, params: list, update: Callable, *, device, **loop_kwargs) -> dict:
    """AdamW, linear warm-up then cosine over `cfg.steps` or `cfg.max_seconds` (whichever ends first), run by
    `loop.train`; `update(gen, step, optimizer, autocast)` does one step. All state resumes from checkpoints."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches + augmentations
    clock = [0.0]  # step seconds so far (evaluation hooks excluded); survives resume
    last: dict = {}
    autocast = lambda: autocast_ctx(torch.device(device), cfg.precision)

    def step_fn(step: int) -> dict:
        nonlocal last
        if cfg.max_seconds > 0 and clock[0] >= cfg.max_seconds:
            return {**last, "idle": 1.0}  # time budget spent: the remaining steps are no-ops
        start = time.perf_counter()
        done = max(step / cfg.steps, clock[0] / cfg.max_seconds if cfg.max_seconds > 0 else 0.0)
        warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        stats = update(gen, step, opt, autocast)
        clock[0] += time.perf_counter() - start
        last = {**stats, "lr": opt.param_groups[0]["lr"], "seconds": clock[0], "idle": 0.0}
        return last

    for m in modules.values():
        m.to(device).train()
    state = {**modules, "opt": opt, "gen": gen, "clock": clock}
    return loop.train(step_fn, max_steps=cfg.steps, state=state, **loop_kwargs)


def train_ssl(cfg: SSLConfig, renders, *, device: str | torch.device = "cpu", run: RunDir | None = None,
              tag: str = "ssl", progress: bool = True, hooks: Sequence = (), log_every: int = 25,
              ckpt_every: int = 0) -> Trained:
    """Self-supervised training, no labels, on uint8 renders (V, N, 32, 32, 3) (V ≥ 2: paired views).

    Resumes from `run`'s ckpt/<tag>/last.pt. `hooks` [(every, fn(step, encoder))] run between steps, e.g. a
    kNN evaluation (it may switch the encoder to eval mode; training mode is restored after it)."""
    data = _as_u8(renders)
    encoder = _init(lambda: SmallResNet(cfg.width, cfg.arch), cfg.seed)
    proj = _init(lambda: projector(encoder.out_channels, cfg.proj_hidden, cfg.proj_out), cfg.seed + 2)
    if cfg.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)

    def update(gen, step, opt, autocast):
        ramp = min(1.0, step / cfg.paired_ramp_steps) if cfg.paired_ramp_steps else 1.0
        x1, x2, paired = sample_views(data, gen, cfg.batch, cfg.paired_frac * ramp, _aug(cfg), cfg.paired_color,
                                      device)
        stats = ssl_step(encoder, proj, opt, x1, x2, objective=cfg.objective, temperature=cfg.temperature,
                         grad_clip=cfg.grad_clip, autocast=autocast, channels_last=cfg.channels_last)
        return {**stats, "paired_frac": float(paired.float().mean())}

    stats = _fit(cfg, {"encoder": encoder, "projector": proj}, [*encoder.parameters(), *proj.parameters()],
                 update, device=device, run=run, tag=tag, progress=progress, hooks=_bind(hooks, encoder),
                 log_every=log_every, ckpt_every=ckpt_every)
    return Trained(encoder.eval(), stats)


def train_supervised(cfg: SSLConfig, images, labels, *, device: str | torch.device = "cpu",
                     run: RunDir | None = None, tag: str = "supervised", progress: bool = True,
                     hooks: Sequence = (), log_every: int = 25, ckpt_every: int = 0) -> Trained:
    """The supervised reference: `Sequential(SmallResNet, Linear)` by cross-entropy on uint8 (N, 32, 32, 3)
    and labels (N,), one augmented view per image. Reads cfg's backbone, optimiser, schedule, augmentation
    and precision fields (the SSL-only ones are ignored). `model[0]` is the backbone; hooks get (step, model)."""
    data, y_all = _as_u8(images)[:1], torch.as_tensor(np.asarray(labels)).long()
    encoder = _init(lambda: SmallResNet(cfg.width, cfg.arch), cfg.seed)
    model = nn.Sequential(encoder, _init(lambda: nn.Linear(encoder.out_channels, int(y_all.max()) + 1), cfg.seed))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def update(gen, step, opt, autocast):
        idx = torch.randint(data.shape[1], (cfg.batch,), generator=gen)
        x = augment(_images(data, torch.zeros_like(idx), idx, device), gen, **_aug(cfg))
        return supervised_step(model, opt, x, y_all[idx].to(device), grad_clip=cfg.grad_clip, autocast=autocast,
                               channels_last=cfg.channels_last)

    stats = _fit(cfg, {"model": model}, list(model.parameters()), update, device=device, run=run, tag=tag,
                 progress=progress, hooks=_bind(hooks, model), log_every=log_every, ckpt_every=ckpt_every)
    return Trained(model.eval(), stats)


# --- Artifact ---------------------------------------------------------------------------------------------
def save_encoder(path, encoder: SmallResNet, cfg: SSLConfig, metrics: dict | None = None) -> None:
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
