"""Sampling a fitted velocity net into latents, and decoding latents into images: the code every generator
notebook shares (60 on its own DiT, 80 on the authors' released one).

    latents, labels = sample_latents(net, (C, H, W), num_classes, sample_cfg, seed, device)
    images_u8 = decode_latents(tokenizer, latents, device)       # decode(denormalize(latents))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..configs.generation import SampleConfig
from ..core.samplers import euler_maruyama, euler_ode, guided
from ..data.pixels import to_uint8
from ..models.tokenizer import Tokenizer
from ..runtime.device import autocast_ctx, denormals_flushed
from ..runtime.seeds import stream


def class_balanced_labels(n: int, num_classes: int) -> Tensor | None:
    """Labels i mod num_classes (each class n / num_classes times, as the authors' sample_50k.py); None if
    unconditional."""
    return torch.arange(n) % num_classes if num_classes else None


@torch.no_grad()
def sample_latents(net: nn.Module, shape: tuple[int, ...], num_classes: int, s: SampleConfig, seed: int,
                   device, progress: bool = True,
                   labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """s.n latents (CPU float32) from noise seeded by `seed`, batch by batch, and their labels (`labels`, s.n
    of them, when given; else class-balanced)."""
    dev = torch.device(device)
    noise_gen = torch.Generator().manual_seed(seed)
    sde_gen = stream(seed, "generation.sde", dev)
    if labels is not None and (not num_classes or len(labels) != s.n):
        raise ValueError(f"labels: {len(labels)} given for s.n = {s.n} samples of a net with {num_classes} "
                         "classes")
    labels = class_balanced_labels(s.n, num_classes) if labels is None else labels.long().cpu()
    velocity = guided(net, s.cfg_scale, num_classes, tuple(s.cfg_interval)) if num_classes else net
    out = []
    for start in tqdm(range(0, s.n, s.batch), desc="sampling (batches)", disable=not progress, leave=False):
        m = min(s.batch, s.n - start)
        noise = torch.randn(m, *shape, generator=noise_gen).to(dev)
        y = None if labels is None else labels[start:start + m].to(dev)
        with autocast_ctx(dev, s.precision), denormals_flushed():
            if s.sampler == "ode":
                x = euler_ode(velocity, noise, s.steps, y=y, shift=s.shift)
            else:
                x = euler_maruyama(velocity, noise, s.steps, y=y, diffusion_norm=s.diffusion_norm,
                                   last_step=s.last_step, generator=sde_gen)
        out.append(x.float().cpu())
    return torch.cat(out), labels


@torch.no_grad()
def decode_latents(tok: Tokenizer, latents: Tensor, device, batch: int = 500, precision: str = "fp32",
                   progress: bool = True) -> Tensor:
    """Normalised latents → uint8 (N, H, W, 3) images: decode(denormalize(latents)), clamped and rounded."""
    dev, out = torch.device(device), []
    for start in tqdm(range(0, len(latents), batch), desc="decoding (batches)", disable=not progress,
                      leave=False):
        with autocast_ctx(dev, precision), denormals_flushed():
            x = tok.decode(tok.denormalize(latents[start:start + batch].to(dev)))
        out.append(to_uint8(x.float().clamp(-1, 1).cpu()))
    return torch.cat(out)
