"""Fitting and sampling a velocity net on a reference distribution
(notebook 30's teacher, notebook 60's generator)."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from ..configs.teacher import TeacherStageConfig
from ..core import flow
from ..core.samplers import euler_ode, guided
from ..models.lightning_dit import drop_labels
from ..runtime.device import autocaster
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
from .artifacts import build_net
from .loop import train
from .phases import flow_matching_step

Hook = Callable[[int, nn.Module], None]  # fn(step, ema_net), run between steps


def lr_factor(step: int, f) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based): linear warm-up over f.warmup_steps,
    then constant or a cosine down to 0 at f.steps."""
    warm = min(1.0, (step + 1) / max(f.warmup_steps, 1))
    if f.lr_schedule == "constant" or step < f.warmup_steps:
        return warm
    frac = (step - f.warmup_steps) / max(f.steps - f.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


@dataclass
class VelocityState:
    """What a flow-matching fit's step reads and changes (`fit_velocity_net`). `model` is the net as the
    step calls it (DDP-wrapped and/or compiled); `net` the plain module the EMA tracks."""

    net: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    ema: ModelEmaV3
    reference: object
    batch: int  # this rank's share of fit.batch
    label_dropout: float
    fit: object  # the stage's FitConfig
    gen: torch.Generator  # reference samples and label dropout
    noise_gen: torch.Generator  # t and noise: `gen` on CPU, a device generator elsewhere
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    ctx: DistContext


def velocity_step(s: VelocityState, k: int) -> dict:
    """One flow-matching step on fresh reference samples (labels dropped to the null class for CFG), then
    the EMA."""
    f = s.fit
    x, y = s.reference.sample(s.batch, s.gen)
    x = x.to(s.device, non_blocking=True)  # a blocking copy would wait for the device: a sync
    if y is not None:
        y = drop_labels(y, s.label_dropout, s.reference.num_classes, s.gen).to(s.device, non_blocking=True)
    logit_normal = (f.t_mean, f.t_std) if f.t_sampling == "logit_normal" else None
    stats = flow_matching_step(s.model, s.opt, x, s.noise_gen, y=y, scheduler=s.sched, t_shift=f.t_shift,
                               logit_normal=logit_normal, grad_clip=f.grad_clip, autocast=s.autocast,
                               ctx=s.ctx if s.ctx.distributed else None)
    s.ema.update(s.net, step=k + 1)
    if s.ctx.distributed:  # the rank mean, as a tensor on the device (no sync)
        stats.update(reduce_stats({"fm_loss": stats["fm_loss"]}, s.ctx))
    return stats


def fit_velocity_net(cfg: TeacherStageConfig, reference, run: Optional[RunDir], device, progress: bool = True,
                     ctx: Optional[DistContext] = None, tag: str = "teacher",
                     hooks: Sequence[tuple[int, Hook]] = ()) -> tuple[nn.Module, dict]:
    """Flow matching on fresh reference samples (label dropout → null label for CFG); returns (EMA net,
    stats). Also fits notebook 60's generator (`tag="generator"`). `hooks` [(every, fn(step, ema_net))]
    see the EMA net between steps. With a multi-process `ctx`, DDP as in runtime/distributed.py."""
    f, ctx, dev = cfg.fit, ctx or DistContext(), torch.device(device)
    with torch.random.fork_rng(devices=[]):  # the initialisation depends on cfg.seed only (every rank alike)
        torch.manual_seed(cfg.seed)
        net = build_net(cfg, reference.shape, reference.num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=f.lr, betas=(0.9, 0.95), weight_decay=f.weight_decay,
                            fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, f=f))
    ema = ModelEmaV3(net, decay=f.ema_decay, use_warmup=True)  # tracks the unwrapped net
    model = wrap_ddp(net, ctx)
    gen = rank_generator(stream_seed(cfg.seed, "velocity.batches"), ctx)  # rank 0: the one-process stream
    # t and noise are drawn on the training device: a CPU generator cannot draw CUDA tensors.
    noise_gen = (gen if dev.type == "cpu"
                 else rank_generator(stream_seed(cfg.seed, "velocity.noise"), ctx, dev))
    s = VelocityState(net=net, model=torch.compile(model) if f.compile else model, opt=opt, sched=sched,
                      ema=ema,
                      reference=reference, batch=shard_batch(f.batch, ctx, "fit.batch"),
                      label_dropout=cfg.net.label_dropout, fit=f, gen=gen, noise_gen=noise_gen,
                      autocast=autocaster(dev, f.precision), device=dev, ctx=ctx)
    state = {"net": net, "opt": opt, "sched": sched, "ema": ema, "gen": gen}
    if dev.type != "cpu":
        state["noise_gen"] = noise_gen
    stats = train(functools.partial(velocity_step, s), max_steps=f.steps, state=state,
                  run=main_only_run(run, ctx), tag=tag, log_every=f.log_every, ckpt_every=f.ckpt_every,
                  progress=progress and ctx.is_main, ctx=ctx,
                  hooks=[(every, functools.partial(_with_ema, fn, ema)) for every, fn in hooks])
    return ema.module.eval().requires_grad_(False), stats


def _with_ema(fn: Hook, ema: ModelEmaV3, done: int) -> None:
    fn(done, ema.module)


@torch.no_grad()
def fm_loss_per_t_bin(net: nn.Module, reference, n: int, bins: int, device, seed: int = 0) -> list[dict]:
    """Held-out flow-matching loss of `net` on fresh
    reference samples at the centre of each of `bins` t-bins."""
    gen = torch.Generator().manual_seed(seed)
    x, y = reference.sample(n, gen)
    x, y = x.to(device), None if y is None else y.to(device)
    out = []
    for i in range(bins):
        t = torch.full((n,), (i + 0.5) / bins, device=device)
        noise = torch.randn(x.shape, generator=gen).to(device)
        out.append({"t": (i + 0.5) / bins,
                    "fm_loss": float(flow.flow_matching_loss(net, x, t, noise, y).mean())})
    return out


@torch.no_grad()
def sample(net: nn.Module, reference, n: int, steps: int, device, *, cfg_scale: float = 1.0, seed: int = 0,
           batch: int = 500) -> tuple[Tensor, Optional[Tensor]]:
    """n Euler-ODE samples (class-balanced labels when the reference is conditional)."""
    gen = torch.Generator().manual_seed(seed)
    classes = reference.num_classes
    y_all = torch.arange(n) % classes if classes else None
    velocity = guided(net, cfg_scale, null_label=classes) if classes else net
    outs = []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        noise = torch.randn(m, *reference.shape, generator=gen).to(device)
        y = None if y_all is None else y_all[s:s + m].to(device)
        outs.append(euler_ode(velocity, noise, steps=steps, y=y).float().cpu())
    return torch.cat(outs), y_all
