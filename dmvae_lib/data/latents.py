"""Latents for notebooks 30 and 40: a tokenizer's cached training latents and the reference built on them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs.teacher import TeacherStageConfig
from ..models.tokenizer import Tokenizer
from ..runtime.runs import RunDir, RunError
from . import latent_cache
from .images import ImageData, train_images
from .latent_cache import file_digest
from .pixels import to_float
from .references import make_reference


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
    """The supervised backbone's 8×8 feature map average-pooled
    to 4×4, (N, C, 4, 4), standardised per channel."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(images_u8), batch):
            f = encoder.to(device).eval().forward_features(to_float(images_u8[s:s + batch]).to(device))
            outs.append(F.adaptive_avg_pool2d(f.float(), 4).cpu())
    f = torch.cat(outs)
    mean, std = f.mean((0, 2, 3), keepdim=True), f.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (f - mean) / std


def build_reference(cfg: TeacherStageConfig, latents: Tensor, labels: Tensor, encoders: dict, data: ImageData,
                    device):
    r = cfg.reference
    features = None
    if r.name == "supervised":
        if "supervised" not in encoders:
            raise RunError("reference 'supervised' needs the supervised encoder saved by notebook 20 "
                           "(encoder.supervised_steps > 0 there)")
        features = supervised_features(encoders["supervised"], train_images(data)[0], device)
    return make_reference(r.name, latents=latents, labels=labels, features=features,
                          feature_labels=labels if features is not None else None, classes=r.classes,
                          t=r.noise_t, seed=cfg.seed)
