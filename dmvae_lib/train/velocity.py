"""Fitting and sampling a velocity net on a reference distribution
(the teacher of stage 2, the generator of stage 6)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from ..configs.teacher import TeacherStageConfig
from ..core import flow
from ..core.samplers import euler_ode, guided
from ..models.lightning_dit import drop_labels
from ..runtime.device import autocast_ctx
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


def fit_velocity_net(cfg: TeacherStageConfig, reference, run: Optional[RunDir], device, progress: bool = True,
                     ctx: Optional[DistContext] = None, tag: str = "teacher",
                     hooks: Sequence[tuple[int, Hook]] = ()) -> tuple[nn.Module, dict]:
    """Flow matching on fresh reference samples (label dropout → null label for CFG); returns (EMA net,
    stats). Also fits notebook 60's generator (`tag="generator"`). `hooks` [(every, fn(step, ema_net))]
    see the EMA net between steps. With a multi-process `ctx`, DDP as in runtime/distributed.py."""
    f = cfg.fit
    ctx = ctx or DistContext()
    batch = shard_batch(f.batch, ctx, "fit.batch")
    torch.manual_seed(cfg.seed)  # the net's initialisation (the same on every rank)
    net = build_net(cfg, reference.shape, reference.num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=f.lr, betas=(0.9, 0.95), weight_decay=f.weight_decay,
                            fused=torch.device(device).type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, f))
    ema = ModelEmaV3(net, decay=f.ema_decay, use_warmup=True)  # tracks the unwrapped net
    model = wrap_ddp(net, ctx)
    model = torch.compile(model) if f.compile else model
    # rank 0 (or one process): the single-process stream
    gen = rank_generator(stream_seed(cfg.seed, "velocity.batches"), ctx)
    # t and noise are drawn on the training device: a CPU generator cannot draw CUDA tensors.
    on_cpu = torch.device(device).type == "cpu"
    noise_gen = gen if on_cpu else rank_generator(stream_seed(cfg.seed, "velocity.noise"), ctx, device)
    autocast = lambda: autocast_ctx(torch.device(device), f.precision)  # noqa: E731
    logit_normal = (f.t_mean, f.t_std) if f.t_sampling == "logit_normal" else None

    def step(k: int) -> dict:
        x, y = reference.sample(batch, gen)
        x = x.to(device, non_blocking=True)  # a blocking copy would wait for the device: a sync
        if y is not None:
            y = drop_labels(y, cfg.net.label_dropout, reference.num_classes, gen)
            y = y.to(device, non_blocking=True)
        stats = flow_matching_step(model, opt, x, noise_gen, y=y, scheduler=sched, t_shift=f.t_shift,
                                   logit_normal=logit_normal,
                                   grad_clip=f.grad_clip, autocast=autocast,
                                   ctx=ctx if ctx.distributed else None)
        ema.update(net, step=k + 1)
        if ctx.distributed:  # the rank mean, as a tensor on the device (no sync)
            stats.update(reduce_stats({"fm_loss": stats["fm_loss"]}, ctx))
        return stats

    state = {"net": net, "opt": opt, "sched": sched, "ema": ema, "gen": gen}
    if not on_cpu:
        state["noise_gen"] = noise_gen
    stats = train(step, max_steps=f.steps, state=state, run=main_only_run(run, ctx), tag=tag,
                  log_every=f.log_every, ckpt_every=f.ckpt_every, progress=progress and ctx.is_main, ctx=ctx,
                  hooks=[(every, lambda done, fn=fn: fn(done, ema.module)) for every, fn in hooks])
    return ema.module.eval().requires_grad_(False), stats


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
    k = reference.num_classes
    y_all = torch.arange(n) % k if k else None
    velocity = guided(net, cfg_scale, null_label=k) if k else net
    outs = []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        noise = torch.randn(m, *reference.shape, generator=gen).to(device)
        y = None if y_all is None else y_all[s:s + m].to(device)
        outs.append(euler_ode(velocity, noise, steps=steps, y=y).float().cpu())
    return torch.cat(outs), y_all
