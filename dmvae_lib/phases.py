"""Step functions: one optimisation step each, returning a dict of floats for the loop to log.

No equations live here (they are in `flow.py` and `dmd.py`); this module draws t and noise, runs the
forward under autocast, and applies the update unless the step produced non-finite values.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from . import flow
from .dmd import Objective


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Temporarily turn off requires_grad (and train mode) of `modules`, so a loss differentiates only its inputs."""
    saved = [(m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    for m in modules:
        m.eval().requires_grad_(False)
    try:
        yield
    finally:
        for m, (training, flags) in zip(modules, saved):
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def apply_update(loss: Tensor, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], grad_clip: float,
                 nonfinite: int = 0, scheduler=None) -> float:
    """zero_grad → backward → clip → step (skipped when the loss or the gradient is non-finite). Returns the grad norm."""
    optimizer.zero_grad(set_to_none=True)
    if nonfinite or not torch.isfinite(loss):
        return float("nan")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(norm):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return float(norm)


def flow_matching_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensor,
    generator: torch.Generator,
    *,
    y: Optional[Tensor] = None,
    t_range: tuple[float, float] = (0.0, 1.0),
    scheduler=None,
    grad_clip: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """One flow-matching step of `net` on `data` (stop-gradient: data is detached)."""
    data = data.detach()
    t = flow.sample_t(data.shape[0], t_min=t_range[0], t_max=t_range[1], generator=generator, device=data.device)
    noise = torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
    with autocast():
        loss = flow.flow_matching_loss(net, data, t, noise, y).float().mean()
    bad = int(not torch.isfinite(loss))
    norm = apply_update(loss, optimizer, net.parameters(), grad_clip, bad, scheduler)
    return {"fm_loss": float(loss.detach()), "fm_grad_norm": norm, "nonfinite": bad}


def objective_step(
    latents: nn.Parameter,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    real_net: nn.Module,
    fake_net: nn.Module,
    generator: torch.Generator,
    *,
    y: Optional[Tensor] = None,
    t_range: tuple[float, float] = (0.02, 0.98),
    grad_clip: float = 0.0,
) -> dict[str, float]:
    """One step of a distribution-matching objective on free latents (the 2-D toy's points)."""
    n = latents.shape[0]
    t = flow.sample_t(n, t_min=t_range[0], t_max=t_range[1], generator=generator, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    with frozen(real_net, fake_net):
        loss, stats = objective(latents, real_net, fake_net, t, noise, y)
        norm = apply_update(loss, optimizer, [latents], grad_clip, stats.nonfinite)
    return {"obj_loss": float(loss.detach()), "obj_grad_norm": norm, "direction_norm": stats.direction_norm,
            "nonfinite": stats.nonfinite}


def tokenizer_step(
    tokenizer: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list,
    images: Tensor,
    features: Tensor,
    generator: torch.Generator,
    *,
    l1: float,
    l2: float,
    perceptual: Optional[Callable[[Tensor, Tensor], Tensor]],
    lpips_weight: float,
    disc: Optional[nn.Module],
    disc_weight: float,
    scheduler=None,
    grad_clip: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    latent_loss: Optional[Callable[[Tensor], tuple[Tensor, dict]]] = None,
) -> tuple[dict[str, float], Tensor]:
    """Projector + decoder step on L_rec (+ adaptive hinge-GAN term when `disc` is given). Returns (stats, x̂).

    `latent_loss(z) -> (loss, stats)` adds a term on the projector's output z (joint training: λ·L_DM through
    the projection head); it reaches the projector/encoder only, never the decoder.
    """
    from .recon_losses import adaptive_gan_weight, diff_augment, g_loss

    with autocast():
        z = tokenizer.project(features)
        x_hat = tokenizer.decode(z)
    x_hat32 = x_hat.float()
    rec = l1 * (x_hat32 - images).abs().mean() + l2 * ((x_hat32 - images) ** 2).mean()
    stats = {"l1": float((x_hat32 - images).abs().mean().detach())}
    if perceptual is not None and lpips_weight > 0:
        lp = perceptual(x_hat32, images).mean()
        rec, stats["lpips"] = rec + lpips_weight * lp, float(lp.detach())
    loss = rec
    if disc is not None:
        with frozen(disc), autocast():
            gl = g_loss(disc(diff_augment(x_hat32, generator)).float())
        w = adaptive_gan_weight(rec, gl, tokenizer.decoder.get_last_layer())
        loss = rec + disc_weight * w * gl
        stats.update(g_loss=float(gl.detach()), gan_weight=float(w))
    if latent_loss is not None:
        extra, extra_stats = latent_loss(z)
        loss, stats = loss + extra, {**stats, **extra_stats}
    bad = int(not torch.isfinite(loss)) + int(stats.pop("nonfinite", 0))
    stats.update(rec_loss=float(rec.detach()), grad_norm=apply_update(loss, optimizer, params, grad_clip, bad, scheduler),
                 nonfinite=bad)
    return stats, x_hat32.detach()


def disc_step(disc: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, fakes: Tensor,
              generator: torch.Generator, *, bcr: float = 1.0, grad_clip: float = 1.0,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Hinge loss on DiffAug([real; sg(fake)]) + balanced consistency regularisation (reference §4.5)."""
    from .recon_losses import bcr_loss, d_hinge_loss, diff_augment

    both = torch.cat([images, fakes.detach()])
    with autocast():
        logits = disc(diff_augment(both, generator)).float()
        real, fake = logits.chunk(2)
        hinge = d_hinge_loss(real, fake)
        reg = bcr_loss(lambda x: disc(x).float(), both, logits, generator=generator, weight=bcr) if bcr > 0 else 0.0
    loss = hinge + reg
    bad = int(not torch.isfinite(loss))
    norm = apply_update(loss, optimizer, disc.parameters(), grad_clip, bad)
    return {"d_loss": float(hinge.detach()), "d_real_acc": float((real > 0).float().mean()),
            "d_fake_acc": float((fake < 0).float().mean()), "d_grad_norm": norm, "nonfinite": bad}
