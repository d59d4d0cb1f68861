"""Stage 2 orchestration (notebook 30; paper §4, App. A.2): latent cache → reference distribution → teacher.

The stage-1 tokenizer encodes the training images once into a latent cache inside this stage's run folder
(normalised with the tokenizer's stored mean/scale). The reference distribution is built from it by name
(`references.make_reference`), and the real (teacher) velocity net, a LightningDiT, is fitted on reference
samples by flow matching with label dropout; its EMA weights are the teacher that stage 3 loads.
A teacher checkpoint records the reference it was fitted on, so loading it against another reference, a
missing file, or a foreign checkpoint is an error (the authors' script silently trains against a random
teacher, reference note §5.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from . import flow, image_metrics, latent_cache
from .configs import to_dict
from .configs.teacher import TeacherStageConfig
from .device import autocast_ctx
from .distances import sliced_w2
from .distributed import (
    DistContext,
    all_reduce_mean,
    main_only_run,
    rank_generator,
    shard_batch,
    wrap_ddp,
)  # fmt: skip
from .lightning_dit import drop_labels, lightning_dit
from .loop import train
from .phases import flow_matching_step
from .references import make_reference
from .runs import RunDir, RunError, load_checkpoint, load_state_strict, save_checkpoint
from .samplers import euler_ode, guided
from .tokenizer import Tokenizer
from .tokenizer_stage import ImageData, load_tokenizer


def file_digest(path: Path) -> str:
    """Short content hash of a file (identifies the upstream checkpoint a cache or teacher came from)."""
    return latent_cache.file_sha256(path)[:16]


def train_images(data: ImageData) -> tuple[Tensor, Tensor]:
    """The first render of every training instance, (N, H, W, 3) uint8, and its labels."""
    if data.train is None:
        raise RunError("the latent cache needs in-memory training images (shapes or cifar10); for an ImageFolder "
                       "use the cache writer on a DataLoader (not wired at this scale)")
    return data.train[0], data.train_labels


def latents_for(tok: Tokenizer, tokenizer_file: Path, data: ImageData, run: RunDir, device, *,
                flip: bool = False, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Normalised training latents (N, C, h, w) and labels, from `run`'s cache or encoded once into it."""
    images, labels = train_images(data)
    meta = {"tokenizer": file_digest(tokenizer_file), "n": len(images) * (2 if flip else 1), "flip": flip}

    def build():
        x = images.permute(0, 3, 1, 2).contiguous()
        return latent_cache.encode_latents(tok, x, labels, device=device, batch=batch, flip=flip)

    lat, lab, _ = latent_cache.cached_latents(run.path / "latents.safetensors", build,
                                              {**meta, "latent_mean": float(tok.latent_mean),
                                               "latent_scale": float(tok.latent_scale)})
    return lat, lab


def supervised_features(encoder: nn.Module, images_u8: Tensor, device, batch: int = 500) -> Tensor:
    """The supervised backbone's 8×8 feature map average-pooled to 4×4, (N, C, 4, 4), standardised per channel."""
    from .tokenizer_stage import to_float

    outs = []
    with torch.no_grad():
        for s in range(0, len(images_u8), batch):
            f = encoder.to(device).eval().forward_features(to_float(images_u8[s:s + batch]).to(device))
            outs.append(F.adaptive_avg_pool2d(f.float(), 4).cpu())
    f = torch.cat(outs)
    mean, std = f.mean((0, 2, 3), keepdim=True), f.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (f - mean) / std


def build_reference(cfg: TeacherStageConfig, latents: Tensor, labels: Tensor, encoders: dict, data: ImageData, device):
    r = cfg.reference
    features = None
    if r.name == "supervised":
        if "supervised" not in encoders:
            raise RunError("reference 'supervised' needs the supervised encoder saved by notebook 20 "
                           "(encoder.supervised_steps > 0 there)")
        features = supervised_features(encoders["supervised"], train_images(data)[0], device)
    return make_reference(r.name, latents=latents, labels=labels, features=features,
                          feature_labels=labels if features is not None else None, classes=r.classes, t=r.noise_t,
                          seed=cfg.seed)


def build_net(cfg: TeacherStageConfig, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = shape
    if h != w:
        raise RunError(f"the LightningDiT needs a square grid, the reference has {shape}")
    return lightning_dit(cfg.net.size, input_size=h, in_channels=c, num_classes=num_classes,
                         patch_size=cfg.net.patch_size, grad_checkpoint=cfg.net.grad_checkpoint)


def fit_teacher(cfg: TeacherStageConfig, reference, run: Optional[RunDir], device, progress: bool = True,
                ctx: Optional[DistContext] = None, tag: str = "teacher") -> tuple[nn.Module, dict]:
    """Flow matching on fresh reference samples (label dropout → null label for CFG); returns the EMA net.

    Also fits the final generator of notebook 60 (`tag="generator"`): `cfg` may be any config with `seed`, a
    `net` (DiTConfig) and a `fit` holding the training fields read here (configs.generation.GeneratorFitConfig).

    With a multi-process `ctx` (`distributed.init_distributed` under torchrun) each rank draws
    fit.batch / world_size samples from its own generator, gradients are averaged by DDP, the logged fm_loss
    is the mean over ranks, and only rank 0 writes to `run` (the other ranks may pass any `run` or None).
    Resuming works as in one process: every rank restores rank 0's `last.pt`, with its own generator
    states (`loop.train`), under the same world size. A non-finite loss on any rank makes all ranks skip the
    update together and raise NonFiniteError at the same step (`phases.flow_matching_step` with `ctx`).
    """
    f = cfg.fit
    ctx = ctx or DistContext()
    batch = shard_batch(f.batch, ctx, "fit.batch")
    torch.manual_seed(cfg.seed)  # the net's initialisation (the same on every rank)
    net = build_net(cfg, reference.shape, reference.num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=f.lr, betas=(0.9, 0.95), weight_decay=f.weight_decay,
                            fused=torch.device(device).type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(f.warmup_steps, 1)))
    ema = ModelEmaV3(net, decay=f.ema_decay, use_warmup=True)  # tracks the unwrapped net
    model = wrap_ddp(net, ctx)
    model = torch.compile(model) if f.compile else model
    gen = rank_generator(cfg.seed + 23, ctx)  # rank 0 (or one process): the single-process stream
    # t and noise are drawn on the training device: a CPU generator cannot draw CUDA tensors.
    on_cpu = torch.device(device).type == "cpu"
    noise_gen = gen if on_cpu else rank_generator(cfg.seed + 29, ctx, device)
    autocast = lambda: autocast_ctx(torch.device(device), f.precision)  # noqa: E731

    def step(k: int) -> dict:
        x, y = reference.sample(batch, gen)
        if y is not None:
            y = drop_labels(y, cfg.net.label_dropout, reference.num_classes, gen).to(device)
        stats = flow_matching_step(model, opt, x.to(device), noise_gen, y=y, scheduler=sched, grad_clip=f.grad_clip,
                                   autocast=autocast, ctx=ctx if ctx.distributed else None)
        ema.update(net, step=k + 1)
        if ctx.distributed:
            stats["fm_loss"] = all_reduce_mean(stats["fm_loss"], ctx)
        return stats

    state = {"net": net, "opt": opt, "sched": sched, "ema": ema, "gen": gen}
    if not on_cpu:
        state["noise_gen"] = noise_gen
    stats = train(step, max_steps=f.steps, state=state, run=main_only_run(run, ctx), tag=tag,
                  log_every=f.log_every, ckpt_every=f.ckpt_every, progress=progress and ctx.is_main, ctx=ctx)
    return ema.module.eval().requires_grad_(False), stats


@torch.no_grad()
def fm_loss_per_t_bin(net: nn.Module, reference, n: int, bins: int, device, seed: int = 0) -> list[dict]:
    """Held-out flow-matching loss of `net` on fresh reference samples at the centre of each of `bins` t-bins."""
    gen = torch.Generator().manual_seed(seed)
    x, y = reference.sample(n, gen)
    x, y = x.to(device), None if y is None else y.to(device)
    out = []
    for i in range(bins):
        t = torch.full((n,), (i + 0.5) / bins, device=device)
        noise = torch.randn(x.shape, generator=gen).to(device)
        out.append({"t": (i + 0.5) / bins, "fm_loss": float(flow.flow_matching_loss(net, x, t, noise, y).mean())})
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


def distribution_distances(a: Tensor, b: Tensor, seed: int = 0) -> dict:
    """Fréchet distance and sliced-W2 between two sample sets of the same shape (flattened), labelled."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    fd = image_metrics.frechet_distance(fa, fb, "flattened latents / reference samples (not Inception; not FID)")
    sw = sliced_w2(fa.float(), fb.float(), 256, generator=torch.Generator().manual_seed(seed))
    return {"fd": fd.value, "fd_label": fd.feature_space, "sw2": sw, "n": len(a)}


def evaluate_teacher(cfg: TeacherStageConfig, net: nn.Module, reference, device) -> dict:
    f = cfg.fit
    samples, _ = sample(net, reference, f.eval_samples, f.sample_steps, device, cfg_scale=f.cfg_scale, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    ref_a, _ = reference.sample(f.eval_samples, gen)
    ref_b, _ = reference.sample(f.eval_samples, gen)
    fit = distribution_distances(samples, ref_a, cfg.seed)
    floor = distribution_distances(ref_b, ref_a, cfg.seed)
    return {"samples_vs_reference": fit, "noise_floor": floor,
            "fd_ratio": fit["fd"] / max(floor["fd"], 1e-12), "sw2_ratio": fit["sw2"] / max(floor["sw2"], 1e-12),
            "samples": samples}


# --- checkpoint --------------------------------------------------------------------------------------------
def save_teacher(path: Path, cfg: TeacherStageConfig, net: nn.Module, reference, tokenizer_file: Path) -> None:
    save_checkpoint(path, {
        "kind": "teacher", "config": to_dict(cfg), "net": net.state_dict(),
        "reference": {"name": reference.name, "shape": list(reference.shape), "num_classes": reference.num_classes},
        "tokenizer": {"path": str(tokenizer_file), "digest": file_digest(tokenizer_file)},
    })


def load_teacher(path: str | Path, device="cpu", expect_reference: Optional[str] = None) -> tuple[nn.Module, dict]:
    """The frozen teacher from `save_teacher` (strict); wrong kind, missing file or reference mismatch raise."""
    from .configs import from_dict

    ck = load_checkpoint(path, required=("kind", "config", "net", "reference", "tokenizer"))
    if ck["kind"] != "teacher":
        raise RunError(f"{path} holds a {ck['kind']!r} checkpoint, not a teacher")
    ref = ck["reference"]
    if expect_reference is not None and ref["name"] != expect_reference:
        raise RunError(f"{path} was fitted on reference {ref['name']!r}, not {expect_reference!r}")
    cfg = from_dict(TeacherStageConfig, ck["config"])
    net = build_net(cfg, tuple(ref["shape"]), ref["num_classes"])
    load_state_strict(net, ck["net"], f"{path} [net]")
    return net.to(device).eval().requires_grad_(False), ck


def pca_2d(reference_samples: Tensor, *others: Tensor) -> list[Tensor]:
    """Project flattened sample sets onto the reference's top-2 principal axes (for 2-D pictures)."""
    r = reference_samples.flatten(1).float()
    mean = r.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(r - mean, q=2, center=False)
    return [(x.flatten(1).float() - mean) @ v for x in (reference_samples, *others)]


def upstream_tokenizer(folder: Path, device, name: str = "tokenizer.pt") -> tuple[Tokenizer, object, dict, Path]:
    """A tokenizer saved in a run folder (stage 1's, or notebook 40's DM/control one): (tokenizer, its stage-1
    config, encoders, file)."""
    file = Path(folder) / name
    tok, tcfg, encoders = load_tokenizer(file, device)
    return tok, tcfg, encoders, file

