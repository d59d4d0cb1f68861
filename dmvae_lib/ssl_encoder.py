"""Self-supervised encoder for the embedded shapes (NT-Xent on generator-paired views) + supervised reference.

    x1, x2 = A(render_a(s)), A(render_b(s)), a ≠ b    two renders of instance s: same class and pose, new
             colours/background/texture/noise (label-free: an augmentation the generator provides, views.py);
             A = random resized crop + 0–360° rotation + flip
    z = g(f(x))   f: SmallResNet, (B, 3, 32, 32) → (B, 4w, 8, 8) → pooled (B, 4w); g: MLP projector
    L = −(1/2B) Σ_i log[exp(cos(z_i, z_i⁺)/T) / Σ_{k≠i} exp(cos(z_i, z_k)/T)]  over the 2B views (NT-Xent)

Why (kNN k=20 cosine, 10 k labelled train images vs the 5 k val split / linear probe, %; 20 k instances; seed
0 unless noted): paired views also redraw background texture and noise, the shortcuts that held plain SimCLR
at ≈ 50 % (calibration-cpu.md §2); given them, colour jitter hurts, and small batches win at equal compute.

    r4, B=256, T=0.5, jitter, 300 steps: 50 % paired 79.7/84.0; 100 % 85.8/89.2; + no jitter 87.8/89.9
    r3 (2× cheaper), 100 % paired, B=256, 300 steps: jitter 73.3/77.8; none 78.6/83.0; VICReg 73.9/76.8
    r3, no jitter, B=256 × 600: T=0.5 96.6 (seed 1: 93.2); T=0.2 97.3 (seed 1: 96.3); 2 renders 97.7/98.5
    r3, T=0.2, 2 renders, compute of 300 × 256: B=128 × 600 93.7; B=64 × 1200 97.2; B=32 × 2400 97.0
    defaults, B=64 × 1800 (2.2 min on 2 free cores): seeds 0–3 99.2/99.6, 96.7/98.4, 98.8/99.4, 98.6/99.5;
    ≥ 90 % from step ≈ 600 (44 s); seed 1 starts slowly (21 % at step 300, seed 0 74 %) but never stalls
    supervised (labels, jitter), B=256 × 480 steps (62 s): val accuracy 95.7–96.3; kNN on its features 98.5

Colour: invariance to the nuisance colours makes the 8×8 map colour-blind (1×1 linear read-out of the pixel
colour: R² 0.01–0.05; random init 0.87). The stem (one conv + BN + ReLU) keeps it (R² 0.93–0.97), so a
tokenizer should call `forward_features(x, return_stem=True)` and take the 16×16 stem as a side input.
Labels are read only by `probes.py` and `train_supervised`. References: SimCLR (Chen et al. 2020, arXiv
2002.05709); VICReg (Bardes et al. 2022, arXiv 2105.04906); weighted kNN (Wu et al. 2018); DMVAE (2512.07778).
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
from .runs import RunDir, RunError, load_checkpoint, load_state_strict, save_checkpoint
from .views import augment, batch_images, paired_renders, renders_tensor, sample_views  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class SSLConfig:
    seed: int = 0  # model init (seed) and the batch/augmentation generator (seed + 1)
    width: int = 32  # stem channels w; the last block has 4w → an 8×8×4w feature map
    arch: str = "r3"  # a key of ARCHS; r3 is 2× cheaper per step than r4 and better per second
    objective: str = "ntxent"  # a key of OBJECTIVES (VICReg: 4.7 points lower at 300 steps)
    steps: int = 1800  # optimizer steps = the cosine schedule's length (2.2 min at 74 ms/step, 2 free cores)
    max_seconds: float = 0.0  # >0: the schedule and training also end after this much step time
    batch: int = 64  # instances per step, two views each; at equal compute 64 beat 32, 128 and 256
    lr: float = 2e-3  # AdamW peak LR
    weight_decay: float = 1e-4  # AdamW, on all parameters
    warmup_steps: int = 30  # linear warm-up, then cosine to 0
    grad_clip: float = 3.0  # max global grad norm (0: off)
    temperature: float = 0.2  # NT-Xent temperature (0.5 was 0.7–3 points lower at 600 steps)
    proj_hidden: int = 512  # projector 4w → hidden (BN, ReLU) → out; discarded after training
    proj_out: int = 128  # projection dim the loss sees
    paired_frac: float = 1.0  # share of pairs whose 2nd view is another render (needs V ≥ 2)
    paired_ramp_steps: int = 0  # >0: ramp paired_frac up from 0 (200: seed 1 stuck at 16 % kNN at step 600)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random-resized-crop area range
    rotate: bool = True  # full 0–360° rotation: the classes are rotation invariant
    flip: bool = True  # random horizontal flip
    color_p: float = 0.0  # probability of colour jitter per view (0.8 cost 2–5 points with paired views)
    color_strength: float = 0.4  # brightness/contrast/saturation factors in 1 ± strength
    hue: bool = True  # jitter includes a full hue rotation about the grey axis
    gray_p: float = 0.0  # probability of grayscale per view
    precision: str = "bf16"  # "fp32" | "bf16" autocast (1.6× faster on CPU; 1.75–1.9× with channels_last)
    channels_last: bool = True  # NHWC convolutions: another 12–14 % on CPU

    def validate(self) -> None:  # called by configs.make_config: unknown names raise ValueError
        for name, value, known in (("arch", self.arch, ARCHS), ("objective", self.objective, OBJECTIVES),
                                   ("precision", self.precision, ("fp32", "bf16"))):
            if value not in known:
                raise ValueError(f"SSLConfig.{name}={value!r} is unknown; known: {', '.join(known)}")


SMOKE_OVERRIDES: dict[str, Any] = {"steps": 150, "warmup_steps": 10}  # 10 s; kNN only 15–19 %
SUPERVISED_OVERRIDES: dict[str, Any] = {"batch": 256, "steps": 480, "color_p": 0.8, "gray_p": 0.2}  # 1 min


# --- Backbone ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
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
        w, c, blocks = width, width, []
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())  # 16²
        for mult, stride in ARCHS[arch]:
            blocks.append(BasicBlock(c, mult * w, stride))
            c = mult * w
        self.blocks = nn.Sequential(*blocks)
        self.width, self.arch, self.out_channels = w, arch, c

    def forward_features(self, x: Tensor, return_stem: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, 3, 32, 32) → (B, 4w, 8, 8); return_stem: also the colour-keeping (B, w, 16, 16) stem map."""
        assert x.dim() == 4 and x.shape[1] == 3, f"expected (B, 3, H, W) images, got {tuple(x.shape)}"
        stem = self.stem(x)
        return (self.blocks(stem), stem) if return_stem else self.blocks(stem)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def projector(c_in: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


# --- Objectives -------------------------------------------------------------------------------------------
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent: each of the 2B projections must pick its partner among the other 2B − 1."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device))


def vicreg(z1: Tensor, z2: Tensor, temperature: float = 0.0, sim_w: float = 25.0, var_w: float = 25.0,
           cov_w: float = 1.0) -> Tensor:
    """VICReg: invariance MSE + hinge on per-dim std + off-diagonal covariance (`temperature` is unused)."""
    loss = sim_w * F.mse_loss(z1.float(), z2.float())
    for z in (z1.float() - z1.float().mean(0), z2.float() - z2.float().mean(0)):
        cov = z.T @ z / (z.shape[0] - 1)
        loss = loss + var_w * F.relu(1 - (cov.diagonal() + 1e-4).sqrt()).mean() / 2
        loss = loss + cov_w * (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    return loss


OBJECTIVES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {"ntxent": nt_xent, "vicreg": vicreg}


# --- Step functions ---------------------------------------------------------------------------------------
def ssl_step(encoder: nn.Module, proj: nn.Module, optimizer: torch.optim.Optimizer, x1: Tensor, x2: Tensor, *,
             objective: str = "ntxent", temperature: float = 0.2, grad_clip: float = 3.0,
             autocast: Callable = contextlib.nullcontext, channels_last: bool = False) -> dict[str, float]:
    """One update of encoder + projector on the objective between the views x1, x2 (B, 3, H, W)."""
    x = torch.cat([x1, x2])  # one forward: BatchNorm sees both views, as in SimCLR
    with autocast():
        z = proj(encoder(x.contiguous(memory_format=torch.channels_last) if channels_last else x))
    loss = OBJECTIVES[objective](z[: len(x1)], z[len(x1):], temperature)
    bad = int(not torch.isfinite(loss))
    norm = apply_update(loss, optimizer, [*encoder.parameters(), *proj.parameters()], grad_clip, bad)
    return {"loss": float(loss.detach()), "grad_norm": norm, "nonfinite": bad}


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
                    grad_clip: float = 3.0, autocast: Callable = contextlib.nullcontext,
                    channels_last: bool = False) -> dict[str, float]:
    """One cross-entropy update of `model` (images → logits) on (x, y)."""
    with autocast():
        logits = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float()
    loss = F.cross_entropy(logits, y)
    bad = int(not torch.isfinite(loss))
    norm = apply_update(loss, optimizer, model.parameters(), grad_clip, bad)
    return {"loss": float(loss.detach()), "grad_norm": norm, "nonfinite": bad,
            "train_acc": float((logits.argmax(1) == y).float().mean())}


# --- Training drivers and the saved artifact ------------------------------------------------------------
class Trained(NamedTuple):
    model: nn.Module  # the SSL backbone, or the supervised Sequential(backbone, head); in eval mode
    stats: dict  # the last step's numbers (loss, lr, seconds of steps, …)


def _bind(hooks: Sequence, model: nn.Module) -> list:
    """[(every, fn(step, model))] → loop hooks [(every, fn(step))]; `model` returns to train mode after."""
    return [(every, lambda step, fn=fn: (fn(step, model), model.train())) for every, fn in hooks]


def _aug(cfg: SSLConfig) -> dict:
    return {"crop_scale": cfg.crop_scale, "rotate": cfg.rotate, "flip": cfg.flip, "color_p": cfg.color_p,
            "color_strength": cfg.color_strength, "hue": cfg.hue, "gray_p": cfg.gray_p}


def _fit(cfg: SSLConfig, modules: dict, params: list, update: Callable, *, device, **loop_kwargs) -> dict:
    """AdamW, linear warm-up then cosine over `cfg.steps` or `cfg.max_seconds` (whichever ends first), run
    by `loop.train`; `update(gen, step, optimizer, autocast)` does one step. All state resumes on restart."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches + augmentations
    clock, last = [0.0], {}  # step seconds so far (evaluation hooks excluded; survives resume); last stats

    def step_fn(step: int) -> dict:
        nonlocal last
        if cfg.max_seconds > 0 and clock[0] >= cfg.max_seconds:
            return {**last, "idle": 1.0}  # time budget spent: the remaining steps are no-ops
        start = time.perf_counter()
        done = max(step / cfg.steps, clock[0] / cfg.max_seconds if cfg.max_seconds > 0 else 0.0)
        warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        stats = update(gen, step, opt, lambda: autocast_ctx(torch.device(device), cfg.precision))
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
    data = renders_tensor(renders)
    with torch.random.fork_rng(devices=[]):  # deterministic init; the caller's global RNG is untouched
        torch.manual_seed(cfg.seed)
        encoder = SmallResNet(cfg.width, cfg.arch)
        proj = projector(encoder.out_channels, cfg.proj_hidden, cfg.proj_out)
    encoder = encoder.to(memory_format=torch.channels_last) if cfg.channels_last else encoder

    def update(gen, step, opt, autocast):
        ramp = min(1.0, step / cfg.paired_ramp_steps) if cfg.paired_ramp_steps else 1.0
        x1, x2, paired = sample_views(data, gen, cfg.batch, cfg.paired_frac * ramp, _aug(cfg), device)
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
    and labels (N,), one augmented view per image; see `SUPERVISED_OVERRIDES`. Reads cfg's backbone,
    optimiser, schedule, augmentation and precision fields. `model[0]` is the backbone."""
    data, y_all = renders_tensor(images)[:1], torch.as_tensor(np.asarray(labels)).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = SmallResNet(cfg.width, cfg.arch)
        model = nn.Sequential(encoder, nn.Linear(encoder.out_channels, int(y_all.max()) + 1))
    model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model

    def update(gen, step, opt, autocast):
        idx = torch.randint(data.shape[1], (cfg.batch,), generator=gen)
        x = augment(batch_images(data, torch.zeros_like(idx), idx, device), gen, **_aug(cfg))
        return supervised_step(model, opt, x, y_all[idx].to(device), grad_clip=cfg.grad_clip,
                               autocast=autocast, channels_last=cfg.channels_last)

    stats = _fit(cfg, {"model": model}, list(model.parameters()), update, device=device, run=run, tag=tag,
                 progress=progress, hooks=_bind(hooks, model), log_every=log_every, ckpt_every=ckpt_every)
    return Trained(model.eval(), stats)


def save_encoder(path, encoder: SmallResNet, cfg: SSLConfig, metrics: dict | None = None) -> None:
    """Write the backbone (no projector) with its config and evaluation numbers, atomically."""
    weights = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_checkpoint(path, {"kind": "ssl_encoder", "config": dataclasses.asdict(cfg), "model": weights,
                           "metrics": dict(metrics or {})})


def load_encoder(path, device: str | torch.device = "cpu") -> tuple[SmallResNet, SSLConfig, dict]:
    """(encoder in eval mode, its config, its metrics); a missing file, a foreign config or mismatched
    weights raise RunError naming the file."""
    from .configs import ConfigError, from_dict  # local: the config registry imports this module
    ckpt = load_checkpoint(path, required=("config", "model"))
    try:
        cfg = from_dict(SSLConfig, ckpt["config"])
    except ConfigError as exc:
        raise RunError(f"checkpoint {path}: its config does not fit SSLConfig: {exc}") from exc
    encoder = SmallResNet(cfg.width, cfg.arch)
    load_state_strict(encoder, ckpt["model"], str(path))
    return encoder.to(device).eval(), cfg, ckpt.get("metrics", {})
