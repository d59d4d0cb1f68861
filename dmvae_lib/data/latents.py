"""Latents for notebooks 30 and 40: a tokenizer's cached training latents and the reference built on them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs.teacher import ReferenceConfig, TeacherStageConfig
from ..models.text_encoder import TextEncoder, as_grid, embed
from ..models.tokenizer import Tokenizer
from ..runtime import weights
from ..runtime.runs import RunDir, RunError
from ..runtime.seeds import stream
from . import latent_cache
from .captions import captions, load_class_names
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


def _tower_source(r: ReferenceConfig) -> tuple[str, Path, str]:
    """(kind, model folder, record name) of the text tower `reference.text_encoder` names, without loading it
    (RuntimeError naming the package, or the key and folder, when its weights are not here)."""
    if r.text_encoder == "minilm":
        return "minilm", weights.minilm_dir(), "minilm:sentence-transformers/all-MiniLM-L6-v2"
    folder = weights.hf_model_dir(r.text_model, r.text_weights, key="reference.text_weights")
    return "siglip", folder, f"siglip:{r.text_weights or r.text_model}"


def text_encoder(r: ReferenceConfig) -> TextEncoder:
    """The text tower `reference.text_encoder` names, loaded offline (`runtime.weights`)."""
    kind, folder, name = _tower_source(r)
    tokenize, tower = weights.text_tower(kind, folder, name)
    return TextEncoder(tokenize, tower, pooling="mean" if kind == "minilm" else "pooler")


def text_embeddings(r: ReferenceConfig, texts: list[str], device,
                    cache_dir: Path | None = None) -> tuple[Tensor, dict]:
    """Embeddings (N, D) of `texts` and the tower's weights record. With `cache_dir`, they are kept there in a
    file keyed by the captions and the weights' SHA-256 (the `latent_cache` format, verified on every read),
    so reruns and notebook 40 skip the tower (≈ 20 k captions take minutes on a CPU)."""
    kind, folder, name = _tower_source(r)
    rec = weights.record(name, weights.model_file(folder))

    def build():
        return embed(text_encoder(r), texts, device=device), None

    if cache_dir is None:
        return build()[0], rec
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    meta = {"kind": "text_embeddings", "captions_sha256": key, "weights_sha256": rec[name]["sha256"]}
    emb, _, _ = latent_cache.cached_latents(Path(cache_dir) / f"text_{kind}_{key[:16]}.safetensors", build,
                                            meta)
    return emb, rec


def text_features(embeddings: Tensor, dims: int = 64) -> Tensor:
    """Caption embeddings (N, D) in their top `dims` principal axes, scaled by one factor to unit mean square
    per entry, laid out as (N, dims/16, 4, 4) maps (the 4×4 grid of `supervised_features`).

    Why not the D raw dimensions standardised one by one: the embeddings fill a thin subspace (on the 20 k
    `cpu` shapes captions, 99 % of the variance lies in 72 of all-MiniLM-L6-v2's 384 dimensions, 98.9 % in
    the top 64), so every teacher error off it counts in FD and SW2, and a smoke-size teacher stays 8× the
    SW2 floor (top 64 axes: 1.8×).
    A rotation, a truncation and one scale keep the embedding's geometry. Each axis's sign makes its largest
    loading positive, so notebooks 30 and 40 build the same reference on any machine.
    """
    f = embeddings.double()
    if not 0 < dims <= f.shape[1]:
        raise ValueError(f"reference.text_dims={dims}: the text tower gives {f.shape[1]}-D embeddings")
    f = f - f.mean(0)
    var, axes = torch.linalg.eigh(f.T @ f / len(f))  # ascending eigenvalues of the (D, D) covariance
    axes = axes[:, var.argsort(descending=True)[:dims]]  # (D, dims)
    axes = axes * torch.sign(axes[axes.abs().argmax(0), torch.arange(dims)])
    z = f @ axes  # (N, dims)
    return as_grid((z / z.pow(2).mean().sqrt()).float(), 4)


def class_names_for(r: ReferenceConfig, data: ImageData, num_classes: int) -> tuple[str, ...]:
    """The caption names of the labels: `reference.text_class_names`'s file, else the dataset's names."""
    if r.text_class_names:
        return load_class_names(r.text_class_names, num_classes)
    if len(data.class_names) < num_classes:
        raise RunError(f"reference 'text' needs a name for each of the {num_classes} classes and the dataset "
                       f"names {len(data.class_names)}; set reference.text_class_names=<a file, one a line>")
    return data.class_names


def build_reference(cfg: TeacherStageConfig, latents: Tensor, labels: Tensor, encoders: dict, data: ImageData,
                    device):
    """The reference `cfg.reference.name` on the normalised training `latents` and their `labels`. The `text`
    reference carries its text tower's weights record (`weights_files`, for `runtime.weights.provenance`)."""
    r = cfg.reference
    features, record = None, {}
    if r.name == "supervised":
        if "supervised" not in encoders:
            raise RunError("reference 'supervised' needs the supervised encoder saved by notebook 20 "
                           "(encoder.supervised_steps > 0 there)")
        features = supervised_features(encoders["supervised"], train_images(data)[0], device)
    if r.name == "text":  # a names file replaces the dataset's own descriptions too
        names = class_names_for(r, data, int(labels.max()) + 1)
        subjects = data.describe_train() if data.describe_train and not r.text_class_names else ()
        texts = captions(labels, names, stream(cfg.seed, "teacher.text_captions"), subjects)
        embeddings, record = text_embeddings(r, texts, device, data.cache_dir)
        features = text_features(embeddings, r.text_dims)
    ref = make_reference(r.name, latents=latents, labels=labels, features=features,
                         feature_labels=labels if features is not None else None, classes=r.classes,
                         t=r.noise_t, seed=cfg.seed)
    ref.weights_files = record
    return ref
