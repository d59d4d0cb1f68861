"""Stage 3 (notebook 40; paper §3.2, App. A.3): joint distribution-matching training of the tokenizer.

Global step k, as `train_joint`'s `step` spells it out:
  * tokenizer turn (k % tokenizer_every == 0): features → (z, x̂); target = head(normalize(z));
    L = L_rec + w·L_GAN (adaptive w, from disc_start) + λ·L_DM(target), with CFG on both nets when the
    reference is conditional; one update; then the discriminator's step.
    Gradient routing: decoder ← L_rec, L_GAN (never L_DM); head ← L_DM; projector (+ encoder) ← both.
  * every step: the fake net takes a flow-matching step on sg(target) with label dropout (on a tokenizer turn
    it reuses that turn's latents: no extra encoder pass).
The teacher is loaded strictly; DM timesteps stay in [t_min, t_max] (optionally annealed toward t → 1); the
λ = 0 control runs the same function with no fake net and no DM forward pass. The authors' step and what
we do differently: docs/authors-code.md §5.3 and §8.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..configs import from_dict
from ..configs.joint import JointStageConfig
from ..configs.teacher import TeacherStageConfig
from ..core import dmd, flow
from ..core.samplers import guided
from ..data.images import ImageData, batches, load_data
from ..data.latents import build_reference, latents_for
from ..data.pixels import to_float
from ..metrics import image_metrics
from ..metrics.distributions import distribution_distances
from ..metrics.reconstruction import reconstruct
from ..models.lightning_dit import drop_labels
from ..models.projection_heads import make_head
from ..models.recon_losses import PatchDiscriminator, perceptual_loss
from ..models.tokenizer import Tokenizer
from ..runtime.device import autocast_ctx, fused_adamw
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
        x_hat, _ = reconstruct(tok, val_u8, device)
        out["val_psnr"] = float(image_metrics.psnr(x_hat, to_float(val_u8)).mean())
    return out


def dm_loss(target: Tensor, y: Optional[Tensor], real, fake: nn.Module, t: Tensor, noise: Tensor,
            autocast=contextlib.nullcontext, fake_velocity=None):
    """L_DM on the latents `target` (paper Eq. 9): gradient (x̂_fake − x̂_real)/N on `target` only, the real and
    fake nets (`real`, `fake_velocity`, default `fake`; e.g. their CFG callables) never differentiated."""
    with frozen(fake), autocast():
        return dmd.dm(target, real, fake if fake_velocity is None else fake_velocity, t, noise, y)


def dm_mechanism(cfg: JointStageConfig, tok: Tokenizer, teacher: nn.Module, reference, images_u8: Tensor,
                 labels: Tensor, device, *, fake_steps: int = 50, seed: int = 0) -> dict:
    """One DM step on a batch, on copies (nothing the run uses is changed): the fake net is a copy of the
    teacher fitted `fake_steps` flow-matching steps on the batch's latents (at step 0 fake = real and g = 0);
    returns g per sample, |g|, t, and the gradient norm λ·L_DM puts on each tokenizer part."""
    c, gen = cfg.train, torch.Generator().manual_seed(seed)
    tok = copy.deepcopy(tok).to(device).train()
    if c.train_encoder and hasattr(tok.encoder, "set_trainable"):
        tok.encoder.set_trainable(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = make_head(tok.latent_shape, tuple(reference.shape)).to(device)
    images, k = to_float(images_u8).to(device), reference.num_classes
    y = labels.to(device) if k else None
    with torch.no_grad():
        target0 = head(tok.normalize(tok.encode(images).float()))
    fake = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
    fopt = torch.optim.AdamW(fake.parameters(), lr=c.fake_lr, betas=(0.9, 0.95))
    for _ in range(fake_steps):
        flow_matching_step(fake, fopt, target0, gen, y=y, grad_clip=c.grad_clip)
    real_v, fake_v = dm_nets(teacher.to(device).eval(), fake, k, c.cfg_scale)
    target = head(tok.normalize(tok.encode(images).float()))
    target.retain_grad()
    t = flow.sample_t(len(target), t_min=c.t_min, t_max=c.t_max, generator=gen).to(device)
    noise = torch.randn(target.shape, generator=gen).to(device)
    loss, st = dm_loss(target, y, real_v, fake, t, noise, fake_velocity=fake_v)
    lam = c.dm_weight or 1.0  # the λ = 0 control still shows the direction it leaves out
    (lam * loss).backward()
    g = target.grad * target.numel() / lam  # ∂L_DM/∂target = g/N (the surrogate's design)
    parts = {"encoder": tok.encoder, "projector": tok.projector, "decoder": tok.decoder, "head": head}
    reach = {name: float(torch.linalg.vector_norm(torch.stack(
        [q.grad.norm() for q in m.parameters() if q.grad is not None] or [torch.zeros(())]))) for name, m in
        parts.items()}
    return {"g": g.detach().cpu(), "g_norm": g.flatten(1).norm(dim=1).cpu(), "t": t.cpu(), "grad_norm": reach,
            "nonfinite": int(st.nonfinite)}


def train_joint(cfg: JointStageConfig, tokenizer: Tokenizer, teacher: nn.Module, reference, data: ImageData,
                run: Optional[RunDir], device, *, dm_weight: float, tag: str = "joint",
                disc_state: Optional[dict] = None, disc_arch: tuple[int, int] = (32, 2),
                progress: bool = True,
                ctx: Optional[DistContext] = None) -> tuple[Tokenizer, nn.Module, dict]:
    """Joint DM training of a copy of the stage-1 tokenizer; returns (tokenizer, projection head, last stats).

    The discriminator starts from `disc_state` (stage 1's) or fresh with `disc_arch` = (ndf, layers);
    a multi-process `ctx` shards train.batch over ranks (runtime/distributed.py)."""
    c, dev, ctx = cfg.train, torch.device(device), ctx or DistContext()
    tok = copy.deepcopy(tokenizer).to(device).train()
    torch.manual_seed(stream_seed(cfg.seed, "joint.head_init"))
    head = make_head(tok.latent_shape, tuple(reference.shape)).to(device)
    if c.train_encoder:
        if not hasattr(tok.encoder, "set_trainable"):
            name = type(tok.encoder).__name__
            raise ValueError(f"train.train_encoder=True: the {name} encoder cannot train")
        tok.encoder.set_trainable(True)
    enc_params = list(tok.encoder.parameters()) if c.train_encoder else []
    params = [*enc_params, *tok.projector.parameters(), *tok.decoder.parameters(), *head.parameters()]
    fused = fused_adamw(dev)  # True on CUDA; None (torch's default) keeps the CPU numbers
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay, fused=fused)
    sched = _warmup(opt, c.warmup_steps)
    disc = PatchDiscriminator(3, *disc_arch)  # initialised under the seed above
    if disc_state is not None:
        load_state_strict(disc, disc_state, "stage-1 discriminator")
    disc = disc.to(device)
    dopt = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, betas=(0.9, 0.95), weight_decay=5e-4,
                             fused=fused)
    use_dm = dm_weight > 0
    real = teacher.to(device).eval().requires_grad_(False)
    fake = copy.deepcopy(teacher).to(device).train().requires_grad_(True) if use_dm else None
    fopt = torch.optim.AdamW(fake.parameters(), lr=c.fake_lr, betas=(0.9, 0.95),
                             weight_decay=c.weight_decay, fused=fused) if use_dm else None
    fsched = _warmup(fopt, c.warmup_steps) if use_dm else None
    k_classes = reference.num_classes
    real_v, fake_v = dm_nets(real, fake, k_classes, c.cfg_scale) if use_dm else (None, None)
    perceptual = perceptual_loss(c.lpips)
    gen = rank_generator(stream_seed(cfg.seed, "joint.batches"), ctx)  # rank 0: the single-process stream
    # the fake net's t and noise are drawn on the training device (a CPU generator cannot draw CUDA tensors)
    fm_gen = gen if dev.type == "cpu" else rank_generator(stream_seed(cfg.seed, "joint.fake_fm"), ctx, dev)
    stream = batches(data, shard_batch(c.batch, ctx, "train.batch"), gen, 0)
    parts, disc_model = wrap_ddp(TokenizerParts(tok.projector, tok.decoder), ctx), wrap_ddp(disc, ctx)
    encoder = wrap_ddp(tok.encoder, ctx) if c.train_encoder else tok.encoder
    head_model = wrap_ddp(head, ctx) if use_dm and any(p.requires_grad for p in head.parameters()) else head
    fake_model = wrap_ddp(fake, ctx) if use_dm else None
    autocast = lambda: autocast_ctx(dev, c.precision)  # noqa: E731
    last_turn: dict = {}  # the latest tokenizer turn's numbers, carried by the records in between

    def dm_term(target: Tensor, y: Tensor, k: int) -> tuple[Tensor, dict]:
        lo, hi = _t_range(c, k)
        # CPU draws, copied without waiting for the device (a blocking copy is a sync)
        t = flow.sample_t(len(target), t_min=lo, t_max=hi, generator=gen).to(device, non_blocking=True)
        noise = torch.randn(target.shape, generator=gen).to(device, non_blocking=True)
        y = y if k_classes else None
        return dm_loss(target, y, real_v, fake, t, noise, autocast, fake_velocity=fake_v)

    def step(k: int) -> dict:
        images_cpu, y_cpu = next(stream)
        images, y = (b.to(device, non_blocking=True) for b in (images_cpu, y_cpu))
        if k % c.tokenizer_every == 0:  # tokenizer turn: encode, decode, L = L_rec + w·L_GAN + λ·L_DM
            with autocast(), torch.set_grad_enabled(c.train_encoder):
                features = encoder(images)
            with autocast():
                z, x_hat, _ = parts(features.float())
            x_hat = x_hat.float()
            l_rec, stats = reconstruction_loss(x_hat, images, l1=c.l1, perceptual=perceptual,
                                               lpips_weight=c.lpips_weight)
            loss, dm_bad, gan_on = l_rec, 0, k >= c.disc_start and c.disc_weight > 0
            if gan_on:
                l_gan = generator_gan_loss(disc, x_hat, gen, autocast)
                w = gan_weight(l_rec, l_gan, tok.decoder.get_last_layer(), ctx)
                loss = loss + c.disc_weight * w * l_gan
                stats.update(g_loss=l_gan.detach(), gan_weight=w)
            if use_dm:
                target = head_model(tok.normalize(z.float()))  # the latents the reference is matched on
                l_dm, st = dm_term(target, y, k)
                loss, dm_bad = loss + dm_weight * l_dm, st.nonfinite
                stats.update(dm_loss=l_dm.detach(), dm_grad_norm=st.direction_norm)
            stats["rec_loss"] = l_rec.detach()
            stats.update(update(loss, opt, params, grad_clip=c.grad_clip, scheduler=sched, nonfinite=dm_bad,
                                ctx=ctx))
            if gan_on:
                d = disc_step(disc_model, dopt, images, x_hat.detach(), gen, bcr=c.bcr, grad_clip=c.grad_clip,
                              autocast=autocast, ctx=ctx)
                stats = {**stats, **d, "nonfinite": stats["nonfinite"] + d["nonfinite"]}
            last_turn.clear()
            last_turn.update({key: v for key, v in stats.items() if key != "nonfinite"})
            stats = {**last_turn, **stats}
        elif use_dm:  # a fake-net-only step still needs the current latents
            with torch.no_grad(), autocast():
                target = head(tok.normalize(tok.encode(images).float())).float()
            stats = dict(last_turn)
        else:
            return reduce_stats({**last_turn, "nonfinite": 0}, ctx)
        if use_dm:  # the fake net tracks the current latents: flow matching on sg(target)
            yy = (drop_labels(y_cpu, c.label_dropout, k_classes, gen).to(device, non_blocking=True)
                  if k_classes else None)  # on the CPU copy: reading y back from the device is a sync
            f = flow_matching_step(fake_model, fopt, target.detach(), fm_gen, y=yy, scheduler=fsched,
                                   grad_clip=c.grad_clip, autocast=autocast,
                                   ctx=ctx if ctx.distributed else None)
            stats.update(fake_fm_loss=f["fm_loss"], nonfinite=stats.get("nonfinite", 0) + f["nonfinite"])
        return reduce_stats(stats, ctx)

    images_u8 = data.train[0] if data.train is not None else data.val
    hooks, run = [], main_only_run(run, ctx)
    if c.eval_every and ctx.is_main:
        def diag(done: int) -> None:
            tok.eval()
            rec = latent_diagnostics(tok, head, images_u8, reference, device, n=c.eval_samples, seed=cfg.seed,
                                     val_u8=data.val[:500])
            tok.train()
            if run is not None:
                run.log_metrics({"tag": f"{tag}_eval", "step": done, **rec})
        hooks.append((c.eval_every, diag))
    parts_dict = {"projector": tok.projector, "decoder": tok.decoder, "encoder": tok.encoder}
    state = {"tokenizer": nn.ModuleDict(parts_dict),
             "head": head, "opt": opt, "sched": sched, "disc": disc, "dopt": dopt, "gen": gen}
    if use_dm:
        state.update(fake=fake, fopt=fopt, fsched=fsched)
    if fm_gen is not gen:
        state["fm_gen"] = fm_gen
    stats = train(step, max_steps=c.steps, state=state, run=run, tag=tag, log_every=c.log_every,
                  ckpt_every=c.ckpt_every, hooks=hooks, progress=progress and ctx.is_main, ctx=ctx)
    if c.refine_steps:
        refine_decoder(cfg, tok, data, run, device, tag=f"{tag}_refine", progress=progress, ctx=ctx)
    return tok.eval(), head.eval(), stats


def _t_range(c, k: int) -> tuple[float, float]:
    """DM timesteps' range at global step k: [t_min, t_max], or annealed toward the low-noise end (t → 1)."""
    if c.anneal_steps:
        return flow.annealed_t_range(k, c.anneal_steps, (c.t_min, c.t_max), (c.anneal_t_min, c.t_max))
    return c.t_min, c.t_max


def refine_decoder(cfg: JointStageConfig, tok: Tokenizer, data: ImageData, run: Optional[RunDir], device, *,
                   tag: str, progress: bool = True, ctx: Optional[DistContext] = None) -> dict:
    """Decoder-only refinement, encoder and projector frozen (reconstruction loss; DDP as in train_joint)."""
    t, ctx = cfg.train, ctx or DistContext()
    params = list(tok.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay,
                            fused=fused_adamw(device))
    gen = rank_generator(stream_seed(cfg.seed, "joint.refine"), ctx)
    stream = batches(data, shard_batch(t.batch, ctx, "train.batch"), gen, 0)
    decoder = wrap_ddp(tok.decoder, ctx)
    perceptual = perceptual_loss(t.lpips)
    autocast = lambda: autocast_ctx(torch.device(device), t.precision)  # noqa: E731

    def step(k: int) -> dict:
        images = next(stream)[0].to(device)
        with torch.no_grad(), autocast():
            z = tok.project(tok.encode_features(images)).float()
        with autocast():
            x_hat = decoder(z).float()
        loss = t.l1 * (x_hat - images).abs().mean()
        if perceptual is not None:
            loss = loss + t.lpips_weight * perceptual(x_hat, images).mean()
        stats = update(loss, opt, params, grad_clip=t.grad_clip, ctx=ctx)  # the ranks skip together
        return reduce_stats({"l1": loss.detach(), **stats}, ctx)

    return train(step, max_steps=t.refine_steps, state={"decoder": tok.decoder, "opt": opt, "gen": gen},
                 run=main_only_run(run, ctx), tag=tag, log_every=t.log_every, ckpt_every=t.ckpt_every,
                 progress=progress and ctx.is_main, ctx=ctx)


def eval_history(run: RunDir, tag: str) -> list[dict]:
    return [r for r in run.read_metrics() if r.get("tag") == f"{tag}_eval"]


@dataclass
class Upstream:
    """What stage 3 loads from stages 1 and 2."""

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

    def joint_kwargs(self, cfg: JointStageConfig) -> dict:
        """The discriminator arguments of `train_joint` for cfg.train.disc_init."""
        if cfg.train.disc_init == "stage1" and self.disc_state is None:
            raise RunError("train.disc_init='stage1' but the stage-1 run has no ckpt/tokenizer/last.pt; "
                           "use train.disc_init='fresh'")
        state = self.disc_state if cfg.train.disc_init == "stage1" else None
        return {"disc_arch": self.disc_arch, "disc_state": state}


def load_upstream(tokenizer_dir: Path, teacher_dir: Path, device, cache_dir: Path) -> Upstream:
    """Stage-1 tokenizer, the teacher (strict; it must have been fitted on this tokenizer's latents) and the
    reference it was fitted on, rebuilt from stage 2's latent cache."""
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
    has_disc = (tokenizer_dir / "ckpt" / "tokenizer" / "last.pt").is_file()
    return Upstream(tok, tok_cfg, encoders, tok_file, teacher, ck, data, latents, ref,
                    (tok_cfg.train.disc_ndf, tok_cfg.train.disc_layers),
                    stage1_discriminator(tokenizer_dir) if has_disc else None)


def stage1_discriminator(tokenizer_dir: Path) -> dict:
    """The PatchGAN weights at the end of stage 1 (from its training checkpoint), for `disc_init="stage1"`."""
    ck = load_checkpoint(tokenizer_dir / "ckpt" / "tokenizer" / "last.pt", required=("state",))
    if "disc" not in ck["state"]:
        raise RunError(f"{tokenizer_dir / 'ckpt/tokenizer/last.pt'} holds no discriminator state")
    return ck["state"]["disc"]
