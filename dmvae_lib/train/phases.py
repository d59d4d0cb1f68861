"""Step functions: one optimisation step each, returning a dict of floats for the loop to log.

No equations live here (they are in `flow.py` and `dmd.py`); this module draws t and noise, runs the
forward under autocast, and applies the update unless the step produced non-finite values.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ..core import flow
from ..core.dmd import Objective
from ..models import recon_losses
from ..models.recon_losses import adaptive_gan_weight, bcr_loss, d_hinge_loss, g_loss
from ..runtime.distributed import DistContext, all_reduce_tensor_mean, average_buffers, reduce_stats
from .loop import note_nonfinite_gradient


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Turn off requires_grad (and train mode) of `modules` for a while: a loss differentiates its inputs."""
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


def _agreed(nonfinite: int, ctx: Optional[DistContext]) -> int:
    """The largest non-finite count over ranks: under DDP all ranks skip an update together (a rank that skips
    backward would leave the others waiting in the gradient all-reduce)."""
    return nonfinite if ctx is None else reduce_stats({"nonfinite": nonfinite}, ctx)["nonfinite"]


def apply_update(loss: Tensor, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], grad_clip: float,
                 nonfinite: int = 0, scheduler=None) -> float:
    """zero_grad → backward → clip → step. Returns the grad norm (nan when no backward ran).

    No update when `nonfinite` (agreed over ranks by the caller) or the loss is non-finite, and none when the
    gradient norm is non-finite (an overflow with a finite loss, e.g. a huge learning rate). The last case is
    a non-finite step as well: the returned norm is inf/nan (callers report `nonfinite` from it, `_bad_step`)
    and the loop is told directly (`loop.note_nonfinite_gradient`), so a step function that does not report
    it still raises or counts a skip. Under DDP the gradients are all-reduced before the norm, so every rank
    sees the same norm and skips together. The finite path is unchanged (no extra draws, same op order).
    """
    optimizer.zero_grad(set_to_none=True)
    if nonfinite or not torch.isfinite(loss):
        return float("nan")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(norm):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    else:
        note_nonfinite_gradient()
    return float(norm)


def _bad_step(nonfinite: int, norm: float) -> int:
    """A step's non-finite count: the loss's (`nonfinite`), else 1 for a non-finite gradient norm."""
    return nonfinite if nonfinite else int(not math.isfinite(norm))


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
    ctx: Optional[DistContext] = None,
) -> dict[str, float]:
    """One flow-matching step of `net` on `data` (stop-gradient: data is detached).

    Under DDP (`net` wrapped, `ctx` given) the skip decision for a non-finite loss is taken by all ranks
    together (`_agreed`), so no rank waits in the gradient all-reduce for one that skipped backward."""
    data = data.detach()
    t = flow.sample_t(data.shape[0], t_min=t_range[0], t_max=t_range[1], generator=generator,
                      device=data.device)
    noise = torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
    with autocast():
        loss = flow.flow_matching_loss(net, data, t, noise, y).float().mean()
    bad = _agreed(int(not torch.isfinite(loss)), ctx)
    norm = apply_update(loss, optimizer, net.parameters(), grad_clip, bad, scheduler)
    return {"fm_loss": float(loss.detach()), "fm_grad_norm": norm, "nonfinite": _bad_step(bad, norm)}


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
            "nonfinite": _bad_step(stats.nonfinite, norm)}


def reconstruction_loss(x_hat: Tensor, images: Tensor, *, l1: float, l2: float = 0.0,
                        perceptual: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                        lpips_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """L_rec = l1·|x̂ − x| + l2·(x̂ − x)² (+ lpips_weight·LPIPS), batch means; returns (L_rec, its parts)."""
    err = x_hat - images
    rec = l1 * err.abs().mean() + l2 * (err ** 2).mean()
    stats = {"l1": float(err.abs().mean().detach())}
    if perceptual is not None and lpips_weight > 0:
        lp = perceptual(x_hat, images).mean()
        rec, stats["lpips"] = rec + lpips_weight * lp, float(lp.detach())
    return rec, stats


def generator_gan_loss(disc: nn.Module, x_hat: Tensor, generator: torch.Generator,
                       autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Tensor:
    """L_GAN = hinge generator loss on DiffAug(x̂); the discriminator is frozen, only x̂ gets gradients."""
    with frozen(disc), autocast():
        return g_loss(disc(recon_losses.diff_augment(x_hat, generator)).float())


def gan_weight(rec: Tensor, gan: Tensor, last_layer: Tensor, ctx: Optional[DistContext] = None) -> Tensor:
    """The adaptive weight ‖∇L_rec‖/‖∇L_GAN‖ on the decoder's last layer, of the global batch under DDP."""
    grad_mean = (lambda g: all_reduce_tensor_mean(g, ctx)) if ctx and ctx.distributed else None
    return adaptive_gan_weight(rec, gan, last_layer, grad_mean=grad_mean)


def update(loss: Tensor, optimizer: torch.optim.Optimizer, params: list, *, grad_clip: float, scheduler=None,
           nonfinite: int = 0, ctx: Optional[DistContext] = None) -> dict[str, float]:
    """`apply_update`, skipped on every rank together when any rank's loss (or `nonfinite`) is non-finite."""
    bad = _agreed(int(not torch.isfinite(loss)) + int(nonfinite), ctx)
    norm = apply_update(loss, optimizer, params, grad_clip, bad, scheduler)
    return {"grad_norm": norm, "nonfinite": _bad_step(bad, norm)}


class TokenizerParts(nn.Module):
    """The tokenizer's trainable parts, encoder features → (z, x̂, alignment), as the one module DDP wraps.

    Its state_dict keys are `projector.*` and `decoder.*` (those of nn.ModuleDict(projector=…, decoder=…)),
    plus `align.*` with a semantic-alignment module (`models.alignment.SemanticAlignment`, trained with the
    projector and discarded afterwards); its (loss, stats) is the third output, None without one.
    """

    def __init__(self, projector: nn.Module, decoder: nn.Module, align: Optional[nn.Module] = None):
        super().__init__()
        self.projector, self.decoder, self.align = projector, decoder, align

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, dict]]]:
        z = self.projector(features)
        return z, self.decoder(z), None if self.align is None else self.align(z, features)


def tokenizer_step(tokenizer: nn.Module, optimizer: torch.optim.Optimizer, params: list, images: Tensor,
                   features: Tensor, generator: torch.Generator, *, rec: dict, disc: Optional[nn.Module],
                   disc_weight: float, scheduler=None, grad_clip: float = 1.0,
                   autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                   model: Optional[nn.Module] = None,
                   ctx: Optional[DistContext] = None) -> tuple[dict, Tensor]:
    """Stage 1: one projector + decoder update on L_rec (+ adaptive-weighted L_GAN when `disc` is given).

    `rec` holds `reconstruction_loss`'s keywords; `model` is the DDP-wrapped `TokenizerParts` under `ctx`.
    Returns (stats, sg(x̂))."""
    model = TokenizerParts(tokenizer.projector, tokenizer.decoder) if model is None else model
    with autocast():
        _, x_hat, aligned = model(features)
    x_hat = x_hat.float()
    l_rec, stats = reconstruction_loss(x_hat, images, **rec)
    loss = l_rec
    if disc is not None:
        l_gan = generator_gan_loss(disc, x_hat, generator, autocast)
        w = gan_weight(l_rec, l_gan, tokenizer.decoder.get_last_layer(), ctx)
        loss = l_rec + disc_weight * w * l_gan
        stats.update(g_loss=float(l_gan.detach()), gan_weight=float(w))
    if aligned is not None:  # on z only: reaches the projector (and the alignment maps), never the decoder
        l_align, align_stats = aligned
        loss = loss + l_align
        stats.update(align_stats, align_loss=float(l_align.detach()))
    stats["rec_loss"] = float(l_rec.detach())
    stats.update(update(loss, optimizer, params, grad_clip=grad_clip, scheduler=scheduler, ctx=ctx))
    return stats, x_hat.detach()


def disc_step(disc: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, fakes: Tensor,
              generator: torch.Generator, *, bcr: float = 1.0, grad_clip: float = 1.0,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              ctx: Optional[DistContext] = None) -> dict[str, float]:
    """Hinge loss on DiffAug([real; sg(fake)]) + balanced consistency regularisation
    (docs/authors-code.md §4.5).

    Data parallel (`ctx`, `disc` DDP-wrapped): BatchNorm normalises each rank's shard with its own statistics
    (as multi-GPU PatchGAN training does; SyncBatchNorm has no CPU path); the running statistics are averaged
    over ranks after the step, so the ranks stay identical.
    """
    both = torch.cat([images, fakes.detach()])
    with autocast():
        logits = disc(recon_losses.diff_augment(both, generator)).float()
        real, fake = logits.chunk(2)
        hinge = d_hinge_loss(real, fake)
        reg = 0.0
        if bcr > 0:
            reg = bcr_loss(lambda x: disc(x).float(), both, logits, generator=generator, weight=bcr)
    loss = hinge + reg
    bad = _agreed(int(not torch.isfinite(loss)), ctx)
    norm = apply_update(loss, optimizer, disc.parameters(), grad_clip, bad)
    if ctx is not None:
        average_buffers(disc, ctx)
    return {"d_loss": float(hinge.detach()), "d_real_acc": float((real > 0).float().mean()),
            "d_fake_acc": float((fake < 0).float().mean()), "d_grad_norm": norm,
            "nonfinite": _bad_step(bad, norm)}
