"""Stage 3 orchestration (notebook 40; paper §3.2, App. A.3): joint distribution-matching training.

Per global step k (reference note §5.3, with its bugs fixed):
  * tokenizer turn (k % tokenizer_every == 0): L = L_rec + L_GAN(adaptive, from disc_start) + λ·L_DM, where
    L_DM = dmd.dm(head(latents), real, fake) with CFG on both nets (one batched cond+null forward each).
    Gradient routing: decoder ← L_rec and L_GAN only (L_DM never reaches it); projection head ← L_DM only
    (it sits after the latents); projector (+ encoder when `train_encoder`) ← both. Then the discriminator.
  * every step: the fake net takes a flow-matching step on sg(head(latents)) with label dropout. On
    tokenizer turns it reuses that turn's (pre-update) latents, so no extra encoder pass.
The teacher is loaded strictly (a missing or wrong teacher is an error, never a random net), DM timesteps are
clamped to [t_min, t_max] (optionally annealed toward the low-noise end, t → 1), and the λ = 0 control runs
the same function without the fake net or any DM forward pass (nothing it would compute is used).
"""

from __future__ import annotations

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
from ..data.images import ImageData, batches, load_data, to_float
from ..data.latents import build_reference, latents_for
from ..metrics import image_metrics
from ..metrics.distributions import distribution_distances
from ..metrics.reconstruction import reconstruct
from ..models.lightning_dit import drop_labels
from ..models.projection_heads import make_head
from ..models.recon_losses import PatchDiscriminator, perceptual_loss
from ..models.tokenizer import Tokenizer
from ..runtime.device import autocast_ctx
from ..runtime.distributed import (
    DistContext,
    main_only_run,
    rank_generator,
    reduce_stats,
    shard_batch,
    wrap_ddp,
)
from ..runtime.runs import RunDir, RunError, load_checkpoint, load_state_strict
from ..train.artifacts import file_digest, load_teacher, upstream_tokenizer
from ..train.loop import train
from ..train.phases import TokenizerParts, apply_update, disc_step, flow_matching_step, frozen, tokenizer_step


def dm_nets(real: nn.Module, fake: nn.Module, num_classes: int, cfg_scale: float):
    """Velocity callables for the DM loss: CFG (all channels, cond + null batched) on both nets when conditional."""
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
    out["latent_std"] = float(lat.std())
    if val_u8 is not None:
        x_hat, _ = reconstruct(tok, val_u8, device)
        out["val_psnr"] = float(image_metrics.psnr(x_hat, to_float(val_u8)).mean())
    return out


def train_joint(cfg: JointStageConfig, tokenizer: Tokenizer, teacher: nn.Module, reference, data: ImageData,
                run: Optional[RunDir], device, *, dm_weight: float, tag: str = "joint",
                disc_state: Optional[dict] = None, disc_arch: tuple[int, int] = (32, 2),
                progress: bool = True,
                ctx: Optional[DistContext] = None) -> tuple[Tokenizer, nn.Module, dict]:
    """Joint DM training from a copy of the stage-1 tokenizer; returns (tokenizer, projection head, last stats).

    `disc_state`: the stage-1 discriminator's weights (`stage1_discriminator`), else a fresh PatchGAN of
    `disc_arch` = (ndf, layers) (stage 1's `train.disc_ndf`, `train.disc_layers`).
    A multi-process `ctx` (torchrun) works as in `tokenizer_stage.train_tokenizer`: train.batch is sharded
    over ranks with per-rank generators; projector + decoder, the encoder when trained, a learnable head,
    the fake net and the discriminator train under DDP; the teacher and the frozen uses of the fake net
    (DM term) and of the discriminator (generator term) stay unwrapped; diagnostics and writes on rank 0."""
    t, dev, ctx = cfg.train, torch.device(device), ctx or DistContext()
    tok = copy.deepcopy(tokenizer).to(device).train()
    torch.manual_seed(cfg.seed + 3)  # the projection head's initialisation
    latent_shape = (tok.decoder.z_channels, tok.decoder.latent_size, tok.decoder.latent_size)
    head = make_head(latent_shape, tuple(reference.shape)).to(device)
    if t.train_encoder:
        if not hasattr(tok.encoder, "set_trainable"):
            raise ValueError("train.train_encoder=True needs a timm encoder (encoder.kind='timm' in stage 1); "
                             f"the {type(tok.encoder).__name__} encoder stays frozen")
        tok.encoder.set_trainable(True)
    enc_params = list(tok.encoder.parameters()) if t.train_encoder else []
    tok_params = enc_params + list(tok.projector.parameters()) + list(tok.decoder.parameters())
    params = tok_params + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    sched = _warmup(opt, t.warmup_steps)
    disc = PatchDiscriminator(3, *disc_arch)  # initialised under the seed above
    if disc_state is not None:
        load_state_strict(disc, disc_state, "stage-1 discriminator")
    disc = disc.to(device)
    dopt = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr, betas=(0.9, 0.95), weight_decay=5e-4)
    use_dm = dm_weight > 0
    fake = copy.deepcopy(teacher).to(device).train().requires_grad_(True) if use_dm else None
    real = teacher.to(device).eval().requires_grad_(False)
    fopt = torch.optim.AdamW(fake.parameters(), lr=t.fake_lr, betas=(0.9, 0.95), weight_decay=t.weight_decay) if use_dm else None
    fsched = _warmup(fopt, t.warmup_steps) if use_dm else None
    k_classes = reference.num_classes
    perceptual = perceptual_loss(t.lpips)
    gen = rank_generator(cfg.seed + 29, ctx)  # rank 0 (or one process): the single-process stream
    # the fake net's t and noise are drawn on the training device (a CPU generator cannot draw CUDA tensors)
    fm_gen = gen if dev.type == "cpu" else rank_generator(cfg.seed + 37, ctx, dev)
    stream = batches(data, shard_batch(t.batch, ctx, "train.batch"), gen, 0)
    model, disc_model = wrap_ddp(TokenizerParts(tok.projector, tok.decoder), ctx), wrap_ddp(disc, ctx)
    encoder = wrap_ddp(tok.encoder, ctx) if t.train_encoder else tok.encoder
    head_model = wrap_ddp(head, ctx) if use_dm and any(p.requires_grad for p in head.parameters()) else head
    fake_model = wrap_ddp(fake, ctx) if use_dm else None
    autocast = lambda: autocast_ctx(dev, t.precision)  # noqa: E731

    def dm_term(z: Tensor, y: Optional[Tensor], k: int):
        target = head_model(tok.normalize(z.float()))
        lo, hi = (t.t_min, t.t_max)
        if t.anneal_steps:
            lo, hi = flow.annealed_t_range(k, t.anneal_steps, (t.t_min, t.t_max), (t.anneal_t_min, t.t_max))
        tt = flow.sample_t(len(z), t_min=lo, t_max=hi, generator=gen).to(device)
        noise = torch.randn(target.shape, generator=gen).to(device)
        r, f = dm_nets(real, fake, k_classes, t.cfg_scale)
        with frozen(fake), autocast():
            loss, st = dmd.dm(target, r, f, tt, noise, y if k_classes else None)
        holder["target"] = target.detach()
        return dm_weight * loss, {"dm_loss": float(loss.detach()), "dm_grad_norm": st.direction_norm,
                                  "nonfinite": st.nonfinite}

    holder: dict = {}
    last_turn: dict = {}

    def step(k: int) -> dict:
        images, y = next(stream)
        images, y = images.to(device), y.to(device)
        stats: dict = {}
        if k % t.tokenizer_every == 0:
            with autocast(), torch.set_grad_enabled(t.train_encoder):
                feats = encoder(images)
            gan = disc if k >= t.disc_start and t.disc_weight > 0 else None
            stats, x_hat = tokenizer_step(tok, opt, params, images, feats.float(), gen, l1=t.l1, l2=0.0,
                                          perceptual=perceptual, lpips_weight=t.lpips_weight, disc=gan,
                                          disc_weight=t.disc_weight, scheduler=sched, grad_clip=t.grad_clip,
                                          autocast=autocast, model=model, ctx=ctx,
                                          latent_loss=(lambda z: dm_term(z, y, k)) if use_dm else None)
            if gan is not None:
                d = disc_step(disc_model, dopt, images, x_hat, gen, bcr=t.bcr, grad_clip=t.grad_clip,
                              autocast=autocast, ctx=ctx)
                stats = {**stats, **d, "nonfinite": stats["nonfinite"] + d["nonfinite"]}
            target = holder.pop("target", None)
            last_turn.clear()
            last_turn.update({key: v for key, v in stats.items() if key != "nonfinite"})
        elif use_dm:
            with torch.no_grad(), autocast():
                target = head(tok.normalize(tok.encode(images).float())).float()
        else:
            return reduce_stats({**last_turn, "nonfinite": 0}, ctx)
        stats = {**last_turn, **stats}  # logged records carry the latest tokenizer turn's numbers
        if use_dm:
            yy = drop_labels(y.cpu(), t.label_dropout, k_classes, gen).to(device) if k_classes else None
            kw = {"y": yy, "scheduler": fsched, "grad_clip": t.grad_clip, "autocast": autocast}
            f = flow_matching_step(fake_model, fopt, target, fm_gen, ctx=ctx if ctx.distributed else None, **kw)
            stats = {**stats, "fake_fm_loss": f["fm_loss"], "nonfinite": stats.get("nonfinite", 0) + f["nonfinite"]}
        return reduce_stats(stats, ctx)

    images_u8 = data.train[0] if data.train is not None else data.val
    hooks, run = [], main_only_run(run, ctx)
    if t.eval_every and ctx.is_main:
        def diag(done: int) -> None:
            tok.eval()
            rec = latent_diagnostics(tok, head, images_u8, reference, device, n=t.eval_samples, seed=cfg.seed,
                                     val_u8=data.val[:500])
            tok.train()
            if run is not None:
                run.log_metrics({"tag": f"{tag}_eval", "step": done, **rec})
        hooks.append((t.eval_every, diag))
    state = {"tokenizer": nn.ModuleDict({"projector": tok.projector, "decoder": tok.decoder, "encoder": tok.encoder}),
             "head": head, "opt": opt, "sched": sched, "disc": disc, "dopt": dopt, "gen": gen}
    if use_dm:
        state.update(fake=fake, fopt=fopt, fsched=fsched)
    if fm_gen is not gen:
        state["fm_gen"] = fm_gen
    stats = train(step, max_steps=t.steps, state=state, run=run, tag=tag, log_every=t.log_every,
                  ckpt_every=t.ckpt_every, hooks=hooks, progress=progress and ctx.is_main, ctx=ctx)
    if t.refine_steps:
        refine_decoder(cfg, tok, data, run, device, tag=f"{tag}_refine", progress=progress, ctx=ctx)
    return tok.eval(), head.eval(), stats


def refine_decoder(cfg: JointStageConfig, tok: Tokenizer, data: ImageData, run: Optional[RunDir], device, *,
                   tag: str, progress: bool = True, ctx: Optional[DistContext] = None) -> dict:
    """Decoder-only refinement, encoder and projector frozen (reconstruction loss; DDP as in train_joint)."""
    t, ctx = cfg.train, ctx or DistContext()
    params = list(tok.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    gen = rank_generator(cfg.seed + 31, ctx)
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
        bad = reduce_stats({"nonfinite": int(not torch.isfinite(loss))}, ctx)["nonfinite"]  # all ranks agree
        norm = apply_update(loss, opt, params, t.grad_clip, bad)
        return reduce_stats({"l1": float(loss.detach()), "grad_norm": norm, "nonfinite": bad}, ctx)

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
        return {"disc_arch": self.disc_arch, "disc_state": self.disc_state if cfg.train.disc_init == "stage1" else None}


def load_upstream(tokenizer_dir: Path, teacher_dir: Path, device, cache_dir: Path) -> Upstream:
    """Stage-1 tokenizer, the teacher (strict; it must have been fitted on this tokenizer's latents) and the
    reference it was fitted on, rebuilt from stage 2's latent cache."""
    tok, tok_cfg, encoders, tok_file = upstream_tokenizer(tokenizer_dir, device)
    teacher, ck = load_teacher(teacher_dir / "teacher.pt", device)
    if ck["tokenizer"]["digest"] != file_digest(tok_file):
        raise RunError(f"{teacher_dir / 'teacher.pt'} was fitted on latents of another tokenizer "
                       f"({ck['tokenizer']['path']}), not {tok_file}; refit it with notebooks/30_teacher_fitting")
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
