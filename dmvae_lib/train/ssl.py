"""Training the embedded reference encoders: the SSL
encoder (NT-Xent on paired views) and the supervised one."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs.ssl import SSLConfig
from ..data.views import augment, batch_images, renders_tensor, sample_views
from ..models.ssl_encoder import OBJECTIVES, SmallResNet, projector
from ..runtime.device import autocaster, fused_adamw
from ..runtime.runs import RunDir
from ..runtime.seeds import stream
from . import loop
from .phases import update

SMOKE_OVERRIDES: dict[str, Any] = {"steps": 150, "warmup_steps": 10}  # 10 s; kNN only 15–19 %


SUPERVISED_OVERRIDES: dict[str, Any] = {"batch": 256, "steps": 480, "color_p": 0.8, "gray_p": 0.2}  # 1 min


def ssl_step(encoder: nn.Module, proj: nn.Module, optimizer: torch.optim.Optimizer, x1: Tensor, x2: Tensor, *,
             objective: str = "ntxent", temperature: float = 0.2, grad_clip: float = 3.0,
             autocast: Callable = contextlib.nullcontext, channels_last: bool = False) -> dict[str, Tensor]:
    """One update of encoder + projector on the objective between the views x1, x2 (B, 3, H, W); its numbers
    as 0-dim tensors (no host sync: see `phases`)."""
    x = torch.cat([x1, x2])  # one forward: BatchNorm sees both views, as in SimCLR
    with autocast():
        z = proj(encoder(x.contiguous(memory_format=torch.channels_last) if channels_last else x))
    loss = OBJECTIVES[objective](z[: len(x1)], z[len(x1):], temperature)
    return {"loss": loss.detach(),
            **update(loss, optimizer, [*encoder.parameters(), *proj.parameters()], grad_clip=grad_clip)}


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
                    grad_clip: float = 3.0, autocast: Callable = contextlib.nullcontext,
                    channels_last: bool = False) -> dict[str, Tensor]:
    """One cross-entropy update of `model` (images → logits) on (x, y); 0-dim tensors, as `ssl_step`."""
    with autocast():
        logits = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float()
    loss = F.cross_entropy(logits, y)
    return {"loss": loss.detach(), **update(loss, optimizer, model.parameters(), grad_clip=grad_clip),
            "train_acc": (logits.argmax(1) == y).float().mean()}


class Trained(NamedTuple):
    model: nn.Module  # the SSL backbone, or the supervised Sequential(backbone, head); in eval mode
    stats: dict  # the last step's numbers (loss, lr, seconds of steps, …)


def _bind(hooks: Sequence, model: nn.Module) -> list:
    """[(every, fn(step, model))] → loop hooks [(every, fn(step))]; `model` returns to train mode after."""
    return [(every, lambda step, fn=fn: (fn(step, model), model.train())) for every, fn in hooks]


def _aug(cfg: SSLConfig) -> dict:
    return {"crop_scale": cfg.crop_scale, "rotate": cfg.rotate, "flip": cfg.flip, "color_p": cfg.color_p,
            "color_strength": cfg.color_strength, "hue": cfg.hue, "gray_p": cfg.gray_p}


@dataclass
class _TimedSteps:
    """The SSL fits' step function: AdamW's LR by linear warm-up then a cosine over `cfg.steps` or
    `cfg.max_seconds` of step time (whichever ends first), then `one_step(gen, step, optimizer, autocast)`.
    `clock` = [step seconds so far] is checkpointed (evaluation hooks excluded); once the time budget is
    spent the remaining steps are no-ops that report the last step's numbers (`last`). On a GPU a step is
    timed as queued (no sync): the clock trails the device by the few steps in flight, a bounded lag."""

    cfg: SSLConfig
    opt: torch.optim.Optimizer
    gen: torch.Generator
    one_step: Callable
    autocast: Callable
    clock: list = field(default_factory=lambda: [0.0])
    last: dict = field(default_factory=dict)

    def __call__(self, step: int) -> dict:
        cfg = self.cfg
        if cfg.max_seconds > 0 and self.clock[0] >= cfg.max_seconds:
            return {**self.last, "idle": 1.0}
        start = time.perf_counter()
        done = max(step / cfg.steps, self.clock[0] / cfg.max_seconds if cfg.max_seconds > 0 else 0.0)
        warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        stats = self.one_step(self.gen, step, self.opt, self.autocast)
        self.clock[0] += time.perf_counter() - start
        self.last = {**stats, "lr": self.opt.param_groups[0]["lr"], "seconds": self.clock[0], "idle": 0.0}
        return self.last


def _fit(cfg: SSLConfig, modules: dict, params: list, one_step: Callable, *, device, **loop_kwargs) -> dict:
    """`_TimedSteps` run by `loop.train` with a fresh AdamW; all state resumes on restart."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_adamw(device))
    autocast = autocaster(device, cfg.precision)
    steps = _TimedSteps(cfg, opt, stream(cfg.seed, "ssl.batches"), one_step, autocast)
    for m in modules.values():
        m.to(device).train()
    state = {**modules, "opt": opt, "gen": steps.gen, "clock": steps.clock}
    return loop.train(steps, max_steps=cfg.steps, state=state, **loop_kwargs)


def _ssl_update(cfg: SSLConfig, data: Tensor, encoder: nn.Module, proj: nn.Module, device, gen, step: int,
                opt, autocast) -> dict:
    """One SSL step on two views of a batch (the paired fraction ramped over `paired_ramp_steps`)."""
    ramp = min(1.0, step / cfg.paired_ramp_steps) if cfg.paired_ramp_steps else 1.0
    x1, x2, paired = sample_views(data, gen, cfg.batch, cfg.paired_frac * ramp, _aug(cfg), device)
    stats = ssl_step(encoder, proj, opt, x1, x2, objective=cfg.objective, temperature=cfg.temperature,
                     grad_clip=cfg.grad_clip, autocast=autocast, channels_last=cfg.channels_last)
    return {**stats, "paired_frac": paired.float().mean()}


def _supervised_update(cfg: SSLConfig, data: Tensor, y_all: Tensor, model: nn.Module, device, gen, step: int,
                       opt, autocast) -> dict:
    """One cross-entropy step on an augmented batch."""
    idx = torch.randint(data.shape[1], (cfg.batch,), generator=gen)
    x = augment(batch_images(data, torch.zeros_like(idx), idx, device), gen, **_aug(cfg))
    return supervised_step(model, opt, x, y_all[idx].to(device), grad_clip=cfg.grad_clip,
                           autocast=autocast, channels_last=cfg.channels_last)


def train_ssl(cfg: SSLConfig, renders, *, device: str | torch.device = "cpu", run: RunDir | None = None,
              tag: str = "ssl", progress: bool = True, hooks: Sequence = (), log_every: int = 25,
              ckpt_every: int = 0) -> Trained:
    """Self-supervised training, no labels, on uint8 renders (V, N, 32, 32, 3) (V ≥ 2: paired views); resumes
    from `run`. `hooks` [(every, fn(step, encoder))] run between steps, e.g. a kNN evaluation (it may switch
    the encoder to eval mode; training mode is restored after it)."""
    data = renders_tensor(renders)
    with torch.random.fork_rng(devices=[]):  # deterministic init; the caller's global RNG is untouched
        torch.manual_seed(cfg.seed)
        encoder = SmallResNet(cfg.width, cfg.arch)
        proj = projector(encoder.out_channels, cfg.proj_hidden, cfg.proj_out)
    encoder = encoder.to(memory_format=torch.channels_last) if cfg.channels_last else encoder
    one_step = functools.partial(_ssl_update, cfg, data, encoder, proj, device)
    stats = _fit(cfg, {"encoder": encoder, "projector": proj}, [*encoder.parameters(), *proj.parameters()],
                 one_step, device=device, run=run, tag=tag, progress=progress, hooks=_bind(hooks, encoder),
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
    one_step = functools.partial(_supervised_update, cfg, data, y_all, model, device)
    stats = _fit(cfg, {"model": model}, list(model.parameters()), one_step, device=device, run=run, tag=tag,
                 progress=progress, hooks=_bind(hooks, model), log_every=log_every, ckpt_every=ckpt_every)
    return Trained(model.eval(), stats)
