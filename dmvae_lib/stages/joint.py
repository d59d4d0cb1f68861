"""Notebook 40 (paper §3.2, App. A.3): joint distribution-matching training of the tokenizer.

Global step k (`joint_step`, over a `JointState` built once by `joint_state`):
  * tokenizer turn (`tokenizer_turn`, k % tokenizer_every == 0): features → (z, decoded);
    latents = head(normalize(z)); L = L_rec + w·L_GAN (adaptive w, from disc_start) + λ·L_DM(latents),
    with CFG on both nets when the reference is conditional; one update; then the discriminator's step.
    Gradient routing: decoder ← L_rec, L_GAN (never L_DM); head ← L_DM; projector (+ encoder) ← both.
  * every step (`fake_turn`): the fake net takes a flow-matching step on sg(latents) with label dropout (on a
    tokenizer turn it reuses that turn's latents: no extra encoder pass).
The teacher is loaded strictly; DM timesteps stay in [t_min, t_max] (optionally annealed toward t → 1); the
λ = 0 control runs the same step with no fake net and no DM forward pass. The authors' step and what
we do differently: docs/authors-code.md §5.3 and §8.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..configs import from_dict
from ..configs.joint import JointStageConfig, JointTrainConfig
from ..configs.teacher import TeacherStageConfig
from ..configs.tokenizer import gan_on
from ..core import dmd, flow
from ..core.samplers import guided
from ..data.images import ImageData, batches, load_data
from ..data.latents import build_reference, latents_for
from ..data.pixels import to_float
from ..metrics import image_metrics
from ..metrics.distributions import distribution_distances
from ..metrics.reconstruction import reconstruct
from ..models.alignment import seeded_alignment
from ..models.lightning_dit import drop_labels
from ..models.projection_heads import make_head
from ..models.recon_losses import PatchDiscriminator, perceptual_loss
from ..models.tokenizer import Tokenizer
from ..runtime import weights
from ..runtime.device import autocaster, fused_adamw
from ..runtime.distributed import (
    DistContext,
    main_only_run,
    rank_generator,
    reduce_stats,
    shard_batch,
    wrap_ddp,
)
from ..runtime.runs import RunDir, RunError, load_checkpoint, load_state_strict
from ..runtime.seeds import stream_seed
from ..train.artifacts import file_digest, load_teacher, upstream_tokenizer
from ..train.loop import train
from ..train.phases import (
    TokenizerParts,
    disc_step,
    flow_matching_step,
    frozen,
    gan_weight,
    generator_gan_loss,
    reconstruction_loss,
    update,
)


def dm_nets(real: nn.Module, fake: nn.Module, num_classes: int, cfg_scale: float):
    """Velocity callables for the DM loss: CFG (all channels, cond + null batched) on both nets when the
    reference is conditional."""
    if num_classes == 0 or cfg_scale == 1.0:
        return real, fake
    return guided(real, cfg_scale, num_classes), guided(fake, cfg_scale, num_classes)


def _warmup(opt: torch.optim.Optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(steps, 1)))


@torch.no_grad()
def latent_diagnostics(tok: Tokenizer, head: nn.Module, images_u8: Tensor, reference, device, *, n: int,
                       seed: int, val_u8: Optional[Tensor] = None) -> dict:
    """Distances between the aggregate posterior head(latents) and the reference (FD, SW2), and val PSNR."""
    lat = []
    for s in range(0, min(n, len(images_u8)), 500):
        x = to_float(images_u8[s:min(s + 500, n)]).to(device)
        lat.append(head(tok.normalize(tok.encode(x))).float().cpu())
    lat = torch.cat(lat)
    ref, _ = reference.sample(len(lat), torch.Generator().manual_seed(seed))
    out = {f"ref_{k}": v for k, v in distribution_distances(lat, ref, seed).items() if k != "fd_label"}
    # the floor of that FD: two independent reference draws of the same size (the study's drift gate)
    ref2, _ = reference.sample(len(lat), torch.Generator().manual_seed(stream_seed(seed, "joint.ref_floor")))
    out["ref_fd_floor"] = distribution_distances(ref2, ref, seed)["fd"]
    out["latent_std"] = float(lat.std())
    if val_u8 is not None:
        out["val_psnr"] = val_psnr(tok, val_u8, device)
    return out


def val_psnr(tok: Tokenizer, val_u8: Tensor, device) -> float:
    """Mean PSNR of the reconstructions of `val_u8`, in eval mode (the tokenizer's mode is kept)."""
    was_training = tok.training
    x_hat, _ = reconstruct(tok.eval(), val_u8, device)
    tok.train(was_training)
    return float(image_metrics.psnr(x_hat, to_float(val_u8)).mean())


def dm_loss(latents: Tensor, y: Optional[Tensor], real, fake: nn.Module, t: Tensor, noise: Tensor,
            autocast=contextlib.nullcontext, fake_velocity=None):
    """L_DM on `latents` (paper Eq. 9): gradient (x̂_fake − x̂_real)/N on `latents` only, the real and fake
    nets (`real`, `fake_velocity`, default `fake`; e.g. their CFG callables) never differentiated."""
    with frozen(fake), autocast():
        return dmd.dm(latents, real, fake if fake_velocity is None else fake_velocity, t, noise, y)


def dm_mechanism(cfg: JointStageConfig, tok: Tokenizer, teacher: nn.Module, reference, images_u8: Tensor,
                 labels: Tensor, device, *, fake_steps: int = 50, seed: int = 0) -> dict:
    """One DM step on a batch, on copies (nothing the run uses is changed): the fake net is a copy of the
    teacher fitted `fake_steps` flow-matching steps on the batch's latents (at step 0 fake = real and g = 0);
    returns g per sample, |g|, t, and the gradient norm λ·L_DM puts on each tokenizer part."""
    c, gen = cfg.train, torch.Generator().manual_seed(seed)
    tok = copy.deepcopy(tok).to(device).train()
    tok.trainable_parameters(c.train_encoder)  # makes a trainable encoder's parameters require gradients
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = make_head(tok.latent_shape, tuple(reference.shape)).to(device)
    images, classes = to_float(images_u8).to(device), reference.num_classes
    y = labels.to(device) if classes else None
    with torch.no_grad():
        latents0 = head(tok.normalize(tok.encode(images).float()))
    fake = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
    fopt = torch.optim.AdamW(fake.parameters(), lr=c.fake_lr, betas=(0.9, 0.95))
    for _ in range(fake_steps):
        flow_matching_step(fake, fopt, latents0, gen, y=y, grad_clip=c.grad_clip)
    real_v, fake_v = dm_nets(teacher.to(device).eval(), fake, classes, c.cfg_scale)
    latents = head(tok.normalize(tok.encode(images).float()))
    latents.retain_grad()
    t = flow.sample_t(len(latents), t_min=c.t_min, t_max=c.t_max, generator=gen).to(device)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    loss, st = dm_loss(latents, y, real_v, fake, t, noise, fake_velocity=fake_v)
    lam = c.dm_weight or 1.0  # the λ = 0 control still shows the direction it leaves out
    (lam * loss).backward()
    g = latents.grad * latents.numel() / lam  # ∂L_DM/∂latents = g/N (the surrogate's design)
    parts = {"encoder": tok.encoder, "projector": tok.projector, "decoder": tok.decoder, "head": head}
    reach = {name: float(torch.linalg.vector_norm(torch.stack(
        [q.grad.norm() for q in m.parameters() if q.grad is not None] or [torch.zeros(())]))) for name, m in
        parts.items()}
    return {"g": g.detach().cpu(), "g_norm": g.flatten(1).norm(dim=1).cpu(), "t": t.cpu(), "grad_norm": reach,
            "nonfinite": int(st.nonfinite)}


@dataclass
class JointState:
    """Everything the joint stage's step reads and changes, built once by `joint_state`.

    `encoder`, `parts` (projector + decoder), `head_model`, `disc_model` and `fake_model` are the modules the
    step calls: DDP-wrapped under a multi-process `ctx`, else `tok.encoder`, …, `fake` themselves. Without
    DM (`dm_weight == 0`, the control) the fake net and its optimizer are None.
    """

    train: JointTrainConfig
    dm_weight: float
    tok: Tokenizer
    head: nn.Module
    params: list
    opt: torch.optim.Optimizer
    sched: object
    disc: nn.Module
    dopt: torch.optim.Optimizer
    real_velocity: Optional[Callable]
    fake: Optional[nn.Module]
    fake_velocity: Optional[Callable]
    fopt: Optional[torch.optim.Optimizer]
    fsched: object
    num_classes: int
    perceptual: Optional[nn.Module]
    batches: Iterator[tuple[Tensor, Tensor]]
    # one stream per consumer, so that arms of one seed differ only where their configs do: the batches
    # (their own generator, inside `batches`), the GAN's draws, λ's draws and label dropout, the fake net's
    # t and noise (on the training device: a CPU generator cannot draw CUDA tensors)
    batch_gen: torch.Generator
    gan_gen: torch.Generator
    dm_gen: torch.Generator
    fm_gen: torch.Generator
    align: Optional[nn.Module]  # the alignment maps (the VA arm), None when off
    align_model: Optional[nn.Module]  # `align`, DDP-wrapped under a multi-process ctx
    align_target: Optional[nn.Module]  # the frozen stage-1 encoder, when the encoder trains and align is on
    autocast: Callable[[], contextlib.AbstractContextManager]
    ctx: DistContext
    device: torch.device
    encoder: nn.Module
    parts: nn.Module
    head_model: nn.Module
    disc_model: nn.Module
    fake_model: Optional[nn.Module]

    @property
    def use_dm(self) -> bool:
        return self.dm_weight > 0

    def checkpointed(self) -> dict:
        """What must survive an interruption (the loop's `state`)."""
        tok = self.tok
        parts = {"projector": tok.projector, "decoder": tok.decoder, "encoder": tok.encoder}
        state = {"tokenizer": nn.ModuleDict(parts), "head": self.head, "opt": self.opt, "sched": self.sched,
                 "disc": self.disc, "dopt": self.dopt, "batch_gen": self.batch_gen, "gan_gen": self.gan_gen}
        if self.use_dm:
            state.update(fake=self.fake, fopt=self.fopt, fsched=self.fsched, dm_gen=self.dm_gen,
                         fm_gen=self.fm_gen)
        if self.align is not None:
            state["align"] = self.align
        return state


def joint_state(cfg: JointStageConfig, tokenizer: Tokenizer, teacher: nn.Module, reference, data: ImageData,
                device, *, dm_weight: float, disc_state: Optional[dict], disc_arch: tuple[int, int],
                ctx: DistContext, align_state: Optional[dict] = None) -> JointState:
    """A copy of the stage-1 tokenizer, the projection head, the discriminator (stage 1's `disc_state` or
    fresh), the alignment maps when the term is on (stage 1's `align_state` or fresh), the frozen real net
    and the fake net (a copy of the teacher), their optimizers and generators."""
    c, dev = cfg.train, torch.device(device)
    tok = copy.deepcopy(tokenizer).to(device).train()
    with torch.random.fork_rng(devices=[]):  # the head and a fresh discriminator depend on cfg.seed only
        torch.manual_seed(stream_seed(cfg.seed, "joint.head_init"))
        head = make_head(tok.latent_shape, tuple(reference.shape)).to(device)
        disc = PatchDiscriminator(3, *disc_arch)
    if disc_state is not None:
        load_state_strict(disc, disc_state, "stage-1 discriminator")
    disc = disc.to(device)
    align = seeded_alignment(stream_seed(cfg.seed, "joint.align_init"), tok.decoder.z_channels,
                             tok.decoder.latent_size, tok.encoder.semantic_channels,
                             token_weight=c.align_token, global_weight=c.align_global,
                             margin_cos=c.align_margin_cos, margin_dist=c.align_margin_dist)
    if align is not None and align_state is not None:  # the maps of the terms that are on (stage 1 may have
        keep = align.state_dict().keys()                # trained more)
        load_state_strict(align, {k: v for k, v in align_state.items() if k in keep},
                          "stage-1 alignment maps (train.align_init='stage1'; the joint stage's "
                          "align_token/align_global must switch on only terms stage 1 trained)")
    align = None if align is None else align.to(device)
    params = [*tok.trainable_parameters(c.train_encoder), *head.parameters(),
              *(align.parameters() if align is not None else [])]
    fused = fused_adamw(dev)  # True on CUDA; None (torch's default) keeps the CPU numbers
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay, fused=fused)
    dopt = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, betas=(0.9, 0.95), weight_decay=5e-4,
                             fused=fused)
    real = teacher.to(device).eval().requires_grad_(False)
    fake = fopt = fsched = None
    if dm_weight > 0:
        fake = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
        fopt = torch.optim.AdamW(fake.parameters(), lr=c.fake_lr, betas=(0.9, 0.95),
                                 weight_decay=c.weight_decay, fused=fused)
        fsched = _warmup(fopt, c.warmup_steps)
    real_v, fake_v = dm_nets(real, fake, reference.num_classes, c.cfg_scale) if fake else (None, None)
    streams = {name: rank_generator(stream_seed(cfg.seed, f"joint.{name}"), ctx)
               for name in ("batches", "gan", "dm")}  # rank 0: the single-process streams
    head_trains = fake is not None and any(q.requires_grad for q in head.parameters())
    return JointState(
        train=c, dm_weight=dm_weight, tok=tok, head=head, params=params, opt=opt,
        sched=_warmup(opt, c.warmup_steps), disc=disc, dopt=dopt, real_velocity=real_v, fake=fake,
        fake_velocity=fake_v, fopt=fopt, fsched=fsched, num_classes=reference.num_classes,
        perceptual=perceptual_loss(c.lpips),
        batches=batches(data, shard_batch(c.batch, ctx, "train.batch"), streams["batches"], 0),
        batch_gen=streams["batches"], gan_gen=streams["gan"], dm_gen=streams["dm"],
        fm_gen=rank_generator(stream_seed(cfg.seed, "joint.fake_fm"), ctx, dev),
        align=align, align_model=wrap_ddp(align, ctx) if align is not None else None,
        align_target=(copy.deepcopy(tokenizer.encoder).to(device).eval().requires_grad_(False)
                      if align is not None and c.train_encoder else None),
        autocast=autocaster(dev, c.precision), ctx=ctx, device=dev,
        encoder=wrap_ddp(tok.encoder, ctx) if c.train_encoder else tok.encoder,
        parts=wrap_ddp(TokenizerParts(tok.projector, tok.decoder), ctx),
        head_model=wrap_ddp(head, ctx) if head_trains else head, disc_model=wrap_ddp(disc, ctx),
        fake_model=wrap_ddp(fake, ctx) if fake is not None else None)


def dm_term(s: JointState, latents: Tensor, y: Tensor, k: int):
    """λ's loss at step k: t in the (annealed) DM range and noise from λ's stream, both nets under CFG
    when the reference is conditional. Returns (L_DM, its DMStats)."""
    lo, hi = _t_range(s.train, k)
    # CPU draws, copied without waiting for the device (a blocking copy is a sync)
    t = flow.sample_t(len(latents), t_min=lo, t_max=hi, generator=s.dm_gen).to(s.device, non_blocking=True)
    noise = torch.randn(latents.shape, generator=s.dm_gen).to(s.device, non_blocking=True)
    y = y if s.num_classes else None
    return dm_loss(latents, y, s.real_velocity, s.fake, t, noise, s.autocast, fake_velocity=s.fake_velocity)


def align_term(s: JointState, z: Tensor, images: Tensor, features: Tensor) -> tuple[Tensor, dict]:
    """Stage 1's alignment of z with the stage-1 encoder's features (the VA arm): a frozen copy when the
    encoder trains, else the encoder's own features. Reaches the projector, a trainable encoder and the
    maps; never the decoder or the target. Returns (L_align, stats)."""
    if s.align_target is None:
        target = features.detach()
    else:
        with torch.no_grad(), s.autocast():
            target = s.align_target(images)
    with s.autocast():
        loss, stats = s.align_model(z, target.float())
    return loss, {**stats, "align_loss": loss.detach()}


def tokenizer_turn(s: JointState, images: Tensor, y: Tensor, k: int) -> tuple[dict, Optional[Tensor]]:
    """One tokenizer update on L = L_rec + w·L_GAN + λ·L_DM (paper Eq. 9, App. A.3; the VA arm adds stage 1's
    L_align), then the discriminator's. Returns (stats, the latents matched to the reference, or None).

    Routing: the decoder gets L_rec and L_GAN, the head L_DM, the projector and a trainable encoder all."""
    c = s.train
    with s.autocast(), torch.set_grad_enabled(c.train_encoder):
        features = s.encoder(images)
    with s.autocast():
        z, decoded, _ = s.parts(features.float())
    decoded = decoded.float()
    l_rec, stats = reconstruction_loss(decoded, images, l1=c.l1, perceptual=s.perceptual,
                                       lpips_weight=c.lpips_weight)
    loss, dm_nonfinite, gan, latents = l_rec, 0, gan_on(c, k), None
    if s.align is not None:
        l_align, a = align_term(s, z, images, features)
        loss, stats = loss + l_align, {**stats, **a}
    if gan:
        l_gan = generator_gan_loss(s.disc, decoded, s.gan_gen, s.autocast)
        w = gan_weight(l_rec, l_gan, s.tok.decoder.get_last_layer(), s.ctx)
        loss = loss + c.disc_weight * w * l_gan
        stats.update(g_loss=l_gan.detach(), gan_weight=w)
    if s.use_dm:
        latents = s.head_model(s.tok.normalize(z.float()))
        l_dm, dm = dm_term(s, latents, y, k)
        loss, dm_nonfinite = loss + s.dm_weight * l_dm, dm.nonfinite
        stats.update(dm_loss=l_dm.detach(), dm_grad_norm=dm.direction_norm)
    stats["rec_loss"] = l_rec.detach()
    stats.update(update(loss, s.opt, s.params, grad_clip=c.grad_clip, scheduler=s.sched,
                        nonfinite=dm_nonfinite, ctx=s.ctx))
    if gan:
        d = disc_step(s.disc_model, s.dopt, images, decoded.detach(), s.gan_gen, bcr=c.bcr,
                      grad_clip=c.grad_clip, autocast=s.autocast, ctx=s.ctx)
        stats = {**stats, **d, "nonfinite": stats["nonfinite"] + d["nonfinite"]}
    return stats, latents


@torch.no_grad()
def current_latents(s: JointState, images: Tensor) -> Tensor:
    """head(normalize(E(images))) under the current weights, without gradients: the fake net's data on the
    steps without a tokenizer turn."""
    with s.autocast():
        return s.head(s.tok.normalize(s.tok.encode(images).float())).float()


def fake_turn(s: JointState, latents: Tensor, y_cpu: Tensor) -> dict:
    """The fake net tracks the current latents: one flow-matching step on sg(latents), labels dropped at
    `label_dropout` for CFG (drawn on the CPU copy: reading labels back from the device is a sync)."""
    c = s.train
    y = (drop_labels(y_cpu, c.label_dropout, s.num_classes, s.dm_gen).to(s.device, non_blocking=True)
         if s.num_classes else None)
    f = flow_matching_step(s.fake_model, s.fopt, latents.detach(), s.fm_gen, y=y, scheduler=s.fsched,
                           grad_clip=c.grad_clip, autocast=s.autocast,
                           ctx=s.ctx if s.ctx.distributed else None)
    return {"fake_fm_loss": f["fm_loss"], "nonfinite": f["nonfinite"]}


def joint_step(s: JointState, k: int) -> dict:
    """Global step k: a tokenizer turn every `tokenizer_every` steps, a fake-net turn every step (with DM).

    A step without a tokenizer turn reports only the fake net's numbers (the loop carries the others); the
    control (no DM) still draws its batch, so both runs see the same images at the same steps."""
    images_cpu, y_cpu = next(s.batches)
    images, y = (b.to(s.device, non_blocking=True) for b in (images_cpu, y_cpu))
    stats, latents = {"nonfinite": 0}, None
    if k % s.train.tokenizer_every == 0:
        stats, latents = tokenizer_turn(s, images, y, k)
    elif s.use_dm:
        latents = current_latents(s, images)
    if s.use_dm:
        f = fake_turn(s, latents, y_cpu)
        stats = {**stats, "fake_fm_loss": f["fake_fm_loss"], "nonfinite": stats["nonfinite"] + f["nonfinite"]}
    return reduce_stats(stats, s.ctx)


def train_joint(cfg: JointStageConfig, tokenizer: Tokenizer, teacher: nn.Module, reference, data: ImageData,
                run: Optional[RunDir], device, *, dm_weight: float, tag: str = "joint",
                disc_state: Optional[dict] = None, disc_arch: tuple[int, int] = (32, 2),
                align_state: Optional[dict] = None, progress: bool = True,
                ctx: Optional[DistContext] = None) -> tuple[Tokenizer, nn.Module, dict]:
    """Joint DM training of a copy of the stage-1 tokenizer; returns (tokenizer, projection head, last stats).

    The discriminator starts from `disc_state` (stage 1's) or fresh with `disc_arch` = (ndf, layers), the
    alignment maps (when train.align_* switch the term on) from `align_state` (stage 1's) or fresh;
    a multi-process `ctx` shards train.batch over ranks (runtime/distributed.py)."""
    c, ctx = cfg.train, ctx or DistContext()
    s = joint_state(cfg, tokenizer, teacher, reference, data, device, dm_weight=dm_weight,
                    disc_state=disc_state, disc_arch=disc_arch, ctx=ctx, align_state=align_state)
    hooks, run = [], main_only_run(run, ctx)
    if c.eval_every and ctx.is_main:
        hooks.append((c.eval_every, functools.partial(_log_diagnostics, s, cfg, reference, data, run, tag)))
    stats = train(functools.partial(joint_step, s), max_steps=c.steps, state=s.checkpointed(), run=run,
                  tag=tag, log_every=c.log_every, ckpt_every=c.ckpt_every, hooks=hooks, carry=True,
                  progress=progress and ctx.is_main, ctx=ctx)
    if c.refine_steps:  # App. A.4, PSNR on the diagnostics' val images before and after
        before = val_psnr(s.tok, data.val[:500], device)
        refine_decoder(cfg, s.tok, data, run, device, tag=f"{tag}_refine", progress=progress, ctx=ctx)
        stats["refine"] = {"steps": c.refine_steps, "val_psnr_before": before,
                           "val_psnr_after": val_psnr(s.tok, data.val[:500], device)}
    return s.tok.eval(), s.head.eval(), {**stats, **weights.provenance(s.perceptual)}


def _log_diagnostics(s: JointState, cfg: JointStageConfig, reference, data: ImageData, run: Optional[RunDir],
                     tag: str, done: int) -> None:
    """`latent_diagnostics` of the current tokenizer, logged as a `<tag>_eval` record (an eval-mode pass)."""
    images_u8 = data.train[0] if data.train is not None else data.val
    s.tok.eval()
    rec = latent_diagnostics(s.tok, s.head, images_u8, reference, s.device, n=s.train.eval_samples,
                             seed=cfg.seed, val_u8=data.val[:500])
    s.tok.train()
    if run is not None:
        run.log_metrics({"tag": f"{tag}_eval", "step": done, **rec})


def _t_range(c, k: int) -> tuple[float, float]:
    """DM timesteps' range at global step k: [t_min, t_max], or annealed toward the low-noise end (t → 1)."""
    if c.anneal_steps:
        return flow.annealed_t_range(k, c.anneal_steps, (c.t_min, c.t_max), (c.anneal_t_min, c.t_max))
    return c.t_min, c.t_max


def refine_decoder(cfg: JointStageConfig, tok: Tokenizer, data: ImageData, run: Optional[RunDir], device, *,
                   tag: str, progress: bool = True, ctx: Optional[DistContext] = None) -> dict:
    """Decoder-only refinement, encoder and projector frozen (reconstruction loss; DDP as in train_joint)."""
    c, ctx = cfg.train, ctx or DistContext()
    params = list(tok.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay,
                            fused=fused_adamw(device))
    gen = rank_generator(stream_seed(cfg.seed, "joint.refine"), ctx)
    s = RefineState(tok=tok, decoder=wrap_ddp(tok.decoder, ctx), params=params, opt=opt, l1=c.l1,
                    lpips_weight=c.lpips_weight, perceptual=perceptual_loss(c.lpips), grad_clip=c.grad_clip,
                    batches=batches(data, shard_batch(c.batch, ctx, "train.batch"), gen, 0),
                    autocast=autocaster(device, c.precision), device=torch.device(device), ctx=ctx)
    return train(functools.partial(refine_step, s), max_steps=c.refine_steps,
                 state={"decoder": tok.decoder, "opt": opt, "gen": gen}, run=main_only_run(run, ctx), tag=tag,
                 log_every=c.log_every, ckpt_every=c.ckpt_every, progress=progress and ctx.is_main, ctx=ctx)


@dataclass
class RefineState:
    """The decoder refinement's step state (`refine_decoder`)."""

    tok: Tokenizer
    decoder: nn.Module  # tok.decoder, DDP-wrapped under a multi-process ctx
    params: list
    opt: torch.optim.Optimizer
    l1: float
    lpips_weight: float
    perceptual: Optional[nn.Module]
    grad_clip: float
    batches: Iterator[tuple[Tensor, Tensor]]
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    ctx: DistContext


def refine_step(s: RefineState, k: int) -> dict:
    """L = l1·|D(z) − x| (+ lpips_weight·LPIPS) with z = P(E(x)) frozen; one decoder update."""
    images = next(s.batches)[0].to(s.device)
    with torch.no_grad(), s.autocast():
        z = s.tok.project(s.tok.encode_features(images)).float()
    with s.autocast():
        decoded = s.decoder(z).float()
    loss = s.l1 * (decoded - images).abs().mean()
    if s.perceptual is not None:
        loss = loss + s.lpips_weight * s.perceptual(decoded, images).mean()
    stats = update(loss, s.opt, s.params, grad_clip=s.grad_clip, ctx=s.ctx)  # the ranks skip together
    return reduce_stats({"l1": loss.detach(), **stats}, s.ctx)


def eval_history(run: RunDir, tag: str) -> list[dict]:
    return [r for r in run.read_metrics() if r.get("tag") == f"{tag}_eval"]


@dataclass
class Upstream:
    """What notebook 40 loads from notebooks 20 and 30."""

    tokenizer: Tokenizer
    tokenizer_cfg: object
    encoders: dict
    tokenizer_file: Path
    teacher: nn.Module
    teacher_ckpt: dict
    data: ImageData
    latents: Tensor
    reference: object
    disc_arch: tuple[int, int]
    disc_state: Optional[dict]  # stage 1's final discriminator, when its training checkpoint is there
    align_state: Optional[dict] = None  # stage 1's final alignment maps (EMA), when it trained some

    def joint_kwargs(self, cfg: JointStageConfig) -> dict:
        """The discriminator's and the alignment maps' arguments of `train_joint` for cfg.train.disc_init and
        cfg.train.align_init (the maps only matter when train.align_token/align_global switch the term on)."""
        t = cfg.train
        if t.disc_init == "stage1" and self.disc_state is None:
            raise RunError("train.disc_init='stage1' but the stage-1 run has no ckpt/tokenizer/last.pt; "
                           "use train.disc_init='fresh'")
        align_on = t.align_token > 0 or t.align_global > 0
        if align_on and t.align_init == "stage1" and self.align_state is None:
            raise RunError("train.align_init='stage1' but the stage-1 run has no alignment maps (it trained "
                           "with train.align_token = align_global = 0, or its ckpt/tokenizer/last.pt is "
                           "missing); use train.align_init='fresh'")
        return {"disc_arch": self.disc_arch,
                "disc_state": self.disc_state if t.disc_init == "stage1" else None,
                "align_state": self.align_state if align_on and t.align_init == "stage1" else None}


def load_upstream(tokenizer_dir: Path, teacher_dir: Path, device, cache_dir: Path) -> Upstream:
    """Stage-1 tokenizer, the teacher (strict; it must have been fitted on this tokenizer's latents) and the
    reference it was fitted on, rebuilt from notebook 30's latent cache."""
    tok, tok_cfg, encoders, tok_file = upstream_tokenizer(tokenizer_dir, device)
    teacher, ck = load_teacher(teacher_dir / "teacher.pt", device)
    if ck["tokenizer"]["digest"] != file_digest(tok_file):
        raise RunError(f"{teacher_dir / 'teacher.pt'} was fitted on latents of another tokenizer "
                       f"({ck['tokenizer']['path']}), not {tok_file}; refit it with "
                       "notebooks/30_teacher_fitting")
    tcfg = from_dict(TeacherStageConfig, ck["config"])
    data = load_data(tok_cfg, cache_dir)
    latents, labels = latents_for(tok, tok_file, data, RunDir(teacher_dir), device, flip=tcfg.reference.flip)
    ref = build_reference(tcfg, latents, labels, encoders, data, device)
    has_ckpt = (tokenizer_dir / "ckpt" / "tokenizer" / "last.pt").is_file()
    state = stage1_state(tokenizer_dir) if has_ckpt else None
    return Upstream(tok, tok_cfg, encoders, tok_file, teacher, ck, data, latents, ref,
                    (tok_cfg.train.disc_ndf, tok_cfg.train.disc_layers),
                    stage1_discriminator(tokenizer_dir, state) if has_ckpt else None,
                    stage1_alignment(state) if has_ckpt else None)


def stage1_state(tokenizer_dir: Path) -> dict:
    """The training state stage 1 ended with (its ckpt/tokenizer/last.pt)."""
    return load_checkpoint(tokenizer_dir / "ckpt" / "tokenizer" / "last.pt", required=("state",))["state"]


def stage1_discriminator(tokenizer_dir: Path, state: Optional[dict] = None) -> dict:
    """The PatchGAN weights at the end of stage 1 (from its training checkpoint, or its already loaded
    `state`), for `disc_init="stage1"`."""
    state = stage1_state(tokenizer_dir) if state is None else state
    if "disc" not in state:
        raise RunError(f"{tokenizer_dir / 'ckpt/tokenizer/last.pt'} holds no discriminator state")
    return state["disc"]


def stage1_alignment(state: dict) -> Optional[dict]:
    """Stage 1's alignment maps from its training `state`, EMA-averaged like the tokenizer it saved (the
    maps that fit its projector); None when stage 1 trained none. The EMA's keys are `module.align.*`
    (`module.parts.align.*` when stage 1 also trained the encoder)."""
    for prefix in ("module.align.", "module.parts.align."):
        maps = {k.removeprefix(prefix): v for k, v in state.get("ema", {}).items() if k.startswith(prefix)}
        if maps:
            return maps
    return None
