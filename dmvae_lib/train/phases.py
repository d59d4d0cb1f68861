"""Step functions: one optimisation step each, returning a dict of 0-dim tensors for the loop to log.

No equations live here (they are in `flow.py` and `dmd.py`); this module draws t and noise, runs the
forward under autocast, and applies the update unless the step produced non-finite values.

No host-device sync: nothing here reads a tensor's value on the host (no `.item()`, `float(t)`, `if t`), so
a GPU step is queued without waiting for the last one. The stats stay on the device until the loop logs
them (`loop.to_host`); whether an update is skipped is decided on the device as well (`update`).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ..core import flow
from ..core.dmd import Objective
from ..models import recon_losses
from ..models.recon_losses import adaptive_gan_weight, bcr_loss, d_hinge_loss, g_loss
from ..runtime.distributed import DistContext, all_reduce_tensor_max, all_reduce_tensor_mean, average_buffers


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


def _nonfinite(x: Tensor) -> Tensor:
    """1 (int64, on x's device) when x holds a non-finite value, else 0."""
    return (~torch.isfinite(x.detach())).any().long()


def _step_unless(skip: Tensor, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    """optimizer.step() and scheduler.step(), unless `skip` (a 0-dim bool tensor).

    A fused optimizer (every stage's AdamW on CUDA: `runtime.device.fused_adamw`) takes the flag as
    `found_inf`, as under torch.amp.GradScaler: its kernel leaves weights and moments alone and takes the step
    count back, on the device. The host-side LR scheduler then advances on a skipped step too (as under
    GradScaler); under `on_nonfinite="raise"`, the default, the run stops there anyway. Other optimizers read
    the flag on the host: free on CPU (the `cpu` presets' arithmetic, the scheduler skipped as well), one sync
    per step on an accelerator.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        if scheduler is not None:
            scheduler.step()
    elif not skip:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _update(loss: Tensor, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], grad_clip: float,
            nonfinite: int | Tensor, scheduler, ctx: Optional[DistContext]) -> tuple[Tensor, Tensor]:
    """zero_grad → backward → clip → step unless non-finite; (grad norm, the step's non-finite count).

    No update when `nonfinite` (this rank's count, reported) or the loss is non-finite (the norm is then nan),
    nor when the gradient norm is (an overflow with a finite loss: count 1). A step function returns that
    count as its `nonfinite`, the loop's only signal to stop or count the step. Backward runs on every rank
    whatever the loss; under DDP one all-reduce (max) on the device then makes every rank skip together.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # also for a non-finite loss: deciding not to would read the flag on the host
    norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip if grad_clip > 0 else float("inf"))
    count = torch.zeros((), dtype=torch.long, device=loss.device) + nonfinite
    no_grad = (count > 0) | ~torch.isfinite(loss.detach())  # the update is dropped before its gradient
    overflow = ~no_grad & ~torch.isfinite(norm)
    if ctx is not None and ctx.distributed:
        count, no_grad, overflow = all_reduce_tensor_max(
            torch.stack([count, no_grad.long(), overflow.long()]), ctx).unbind()
        no_grad, overflow = no_grad > 0, overflow > 0
    _step_unless(no_grad | overflow, optimizer, scheduler)
    norm = torch.where(no_grad, float("nan"), norm)
    return norm, torch.where(count > 0, count, (~torch.isfinite(norm)).long())


def apply_update(loss: Tensor, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], grad_clip: float,
                 nonfinite: int | Tensor = 0, scheduler=None) -> Tensor:
    """zero_grad → backward → clip → step; returns the grad norm, a 0-dim tensor (nan when the update was
    dropped for the loss or `nonfinite`, inf/nan for an overflowing gradient). See `update`."""
    return _update(loss, optimizer, params, grad_clip, nonfinite, scheduler, None)[0]


def flow_matching_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensor,
    generator: torch.Generator,
    *,
    y: Optional[Tensor] = None,
    t_range: tuple[float, float] = (0.0, 1.0),
    t_shift: float = 1.0,
    logit_normal: Optional[tuple[float, float]] = None,
    scheduler=None,
    grad_clip: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ctx: Optional[DistContext] = None,
) -> dict[str, Tensor]:
    """One flow-matching step of `net` on `data` (stop-gradient: data is detached); t is drawn by
    `flow.sample_t` (uniform on `t_range`, or logit-normal, then shifted by `t_shift`).

    Under DDP (`net` wrapped, `ctx` given) the skip decision for a non-finite loss is taken by all ranks
    together (`update`), so all ranks keep the same weights."""
    data = data.detach()
    t = flow.sample_t(data.shape[0], t_min=t_range[0], t_max=t_range[1], shift=t_shift,
                      logit_normal=logit_normal, generator=generator, device=data.device)
    noise = torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
    with autocast():
        loss = flow.flow_matching_loss(net, data, t, noise, y).float().mean()
    done = update(loss, optimizer, net.parameters(), grad_clip=grad_clip, scheduler=scheduler, ctx=ctx)
    return {"fm_loss": loss.detach(), "fm_grad_norm": done["grad_norm"], "nonfinite": done["nonfinite"]}


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
) -> dict[str, Tensor]:
    """One step of a distribution-matching objective on free latents (the 2-D toy's points)."""
    n = latents.shape[0]
    t = flow.sample_t(n, t_min=t_range[0], t_max=t_range[1], generator=generator, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    with frozen(real_net, fake_net):
        loss, stats = objective(latents, real_net, fake_net, t, noise, y)
        norm, bad = _update(loss, optimizer, [latents], grad_clip, stats.nonfinite, None, None)
    return {"obj_loss": loss.detach(), "obj_grad_norm": norm, "direction_norm": stats.direction_norm,
            "nonfinite": bad}


def reconstruction_loss(decoded: Tensor, images: Tensor, *, l1: float, l2: float = 0.0,
                        perceptual: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                        lpips_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """L_rec = l1·|decoded − x| + l2·(decoded − x)² (+ lpips_weight·LPIPS), batch means; returns (L_rec, its
    parts)."""
    err = decoded - images
    rec = l1 * err.abs().mean() + l2 * (err ** 2).mean()
    stats = {"l1": err.abs().mean().detach()}
    if perceptual is not None and lpips_weight > 0:
        lp = perceptual(decoded, images).mean()
        rec, stats["lpips"] = rec + lpips_weight * lp, lp.detach()
    return rec, stats


def generator_gan_loss(disc: nn.Module, decoded: Tensor, generator: torch.Generator,
                       autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Tensor:
    """L_GAN = hinge generator loss on DiffAug(decoded); the discriminator is frozen, only `decoded` gets
    gradients."""
    with frozen(disc), autocast():
        return g_loss(disc(recon_losses.diff_augment(decoded, generator)).float())


def gan_weight(rec: Tensor, gan: Tensor, last_layer: Tensor, ctx: Optional[DistContext] = None) -> Tensor:
    """The adaptive weight ‖∇L_rec‖/‖∇L_GAN‖ on the decoder's last layer, of the global batch under DDP."""
    grad_mean = (lambda g: all_reduce_tensor_mean(g, ctx)) if ctx and ctx.distributed else None
    return adaptive_gan_weight(rec, gan, last_layer, grad_mean=grad_mean)


def update(loss: Tensor, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], *, grad_clip: float,
           scheduler=None, nonfinite: int | Tensor = 0,
           ctx: Optional[DistContext] = None) -> dict[str, Tensor]:
    """One update on `loss`, dropped on every rank together when any rank's loss, `nonfinite` count or
    gradient norm is non-finite; {"grad_norm", "nonfinite"} as 0-dim tensors, read by nobody here."""
    norm, bad = _update(loss, optimizer, params, grad_clip, _nonfinite(loss) + nonfinite, scheduler, ctx)
    return {"grad_norm": norm, "nonfinite": bad}


class TokenizerParts(nn.Module):
    """The tokenizer's trainable parts, features → (z, decoded, alignment), as the one module DDP wraps.

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
    Returns (stats, sg(decoded))."""
    model = TokenizerParts(tokenizer.projector, tokenizer.decoder) if model is None else model
    with autocast():
        _, decoded, aligned = model(features)
    decoded = decoded.float()
    l_rec, stats = reconstruction_loss(decoded, images, **rec)
    loss = l_rec
    if disc is not None:
        l_gan = generator_gan_loss(disc, decoded, generator, autocast)
        w = gan_weight(l_rec, l_gan, tokenizer.decoder.get_last_layer(), ctx)
        loss = l_rec + disc_weight * w * l_gan
        stats.update(g_loss=l_gan.detach(), gan_weight=w)
    if aligned is not None:  # on z only: reaches the projector (and the alignment maps), never the decoder
        l_align, align_stats = aligned
        loss = loss + l_align
        stats.update(align_stats, align_loss=l_align.detach())
    stats["rec_loss"] = l_rec.detach()
    stats.update(update(loss, optimizer, params, grad_clip=grad_clip, scheduler=scheduler, ctx=ctx))
    return stats, decoded.detach()


def disc_step(disc: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, fakes: Tensor,
              generator: torch.Generator, *, bcr: float = 1.0, grad_clip: float = 1.0,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              ctx: Optional[DistContext] = None) -> dict[str, Tensor]:
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
    done = update(loss, optimizer, disc.parameters(), grad_clip=grad_clip, ctx=ctx)
    if ctx is not None:
        average_buffers(disc, ctx)
    return {"d_loss": hinge.detach(), "d_real_acc": (real > 0).float().mean(),
            "d_fake_acc": (fake < 0).float().mean(), "d_grad_norm": done["grad_norm"],
            "nonfinite": done["nonfinite"]}
