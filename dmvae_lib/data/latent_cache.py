"""Encode a dataset once and keep its normalized latents in a cache file inside a run directory.

    latents = tokenizer.normalize(tokenizer.encode(x)),   x = uint8 / 127.5 − 1 ∈ [−1, 1]

(the paper extracts ImageNet latents once before fitting the reference score net; the official code re-encodes
every step). With `flip=True` the horizontally flipped images are encoded too: rows N … 2N − 1 are the flips
of rows 0 … N − 1, and the labels repeat.

File format: safetensors with tensors "latents" (N, C, H, W) float32 and, if labelled, "labels" (N,) int64.
The header metadata holds one JSON object under "dmvae_latent_cache": the caller's `meta` (e.g.
`tokenizer_meta`: latent_mean, latent_scale and the SHA-256 of the tokenizer checkpoint file) plus keys
written here (schema, latents_shape, dtype, labels). Beside it, "dmvae_latent_cache_blake2b" holds the
`integrity.digest` of the tensors and that JSON string: safetensors checks only its header, so bytes flipped
in the tensor data would otherwise load as NaN or 1e37 latents without a word (issue 25). Files are written
atomically (temp file, fsync, rename; the temp file is removed if anything fails), so a reader sees the old
file or the new one, never a partial one. Loading is strict: a missing, truncated or foreign file, a file
without a digest (older code), whose tensors or metadata do not match the digest, or that holds NaN/inf, or
metadata that disagrees with what the caller expects, raises `CacheError` naming the file; `cached_latents`
then rebuilds it with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..runtime.device import autocast_ctx
from ..runtime.runs import RunError, atomic_write_bytes
from .integrity import digest, problem, refuse_nonfinite
from .pixels import u8_to_float

META_KEY = "dmvae_latent_cache"
DIGEST_KEY = "dmvae_latent_cache_blake2b"  # header metadata: integrity.digest(tensors, extra=meta JSON)
SCHEMA = 1


class CacheError(RunError):
    """A latent cache that is missing, unreadable, or built for something else."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Short content hash of a file (identifies the upstream checkpoint a cache or teacher came from)."""
    return file_sha256(path)[:16]


def tokenizer_meta(tokenizer: nn.Module, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The metadata that ties a cache to its tokenizer: latent_mean, latent_scale and, given the checkpoint
    file the tokenizer was loaded from, its SHA-256 (`tokenizer_sha256`)."""
    meta: dict[str, Any] = {"latent_mean": float(tokenizer.latent_mean),
                            "latent_scale": float(tokenizer.latent_scale)}
    if checkpoint is not None:
        meta["tokenizer_sha256"] = file_sha256(checkpoint)
    return meta


def encode_latents(tokenizer: nn.Module, images_u8: Tensor, labels: Tensor | None = None, *,
                   device: torch.device | str, batch: int = 500, precision: str = "fp32", flip: bool = False,
                   progress: bool = True) -> tuple[Tensor, Tensor | None]:
    """Normalized latents of uint8 images, batched, under inference mode (and bf16 autocast if asked).

    Args:
        tokenizer: has `encode(x) -> z` and `normalize(z) -> latents`; already on `device`. It runs in eval
            mode and its previous mode is restored.
        images_u8: (N, 3, H, W) uint8. `ImageData` arrays are (N, H, W, 3): pass `.permute(0, 3, 1, 2)`.
        labels: (N,) or None.
        flip: also encode the horizontal flips (rows N … 2N − 1; labels repeated).

    Returns:
        latents (N·(1 + flip), C, h, w) float32 on the CPU, labels (N·(1 + flip),) int64 or None.
    """
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"images_u8 must be uint8 (N, 3, H, W), got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}"
                         " (channels-last arrays: pass images.permute(0, 3, 1, 2))")
    n = len(images_u8)
    if n == 0:
        raise ValueError("images_u8 is empty")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    device, views = torch.device(device), (False, True) if flip else (False,)
    was_training, chunks = tokenizer.training, []
    tokenizer.eval()
    try:
        with tqdm(total=n * len(views), desc="encode latents", unit="img", disable=not progress) as bar:
            for flipped in views:
                for start in range(0, n, batch):
                    x = u8_to_float(images_u8[start:start + batch].to(device))
                    if flipped:
                        x = x.flip(-1)
                    with torch.inference_mode(), autocast_ctx(device, precision):
                        chunks.append(tokenizer.normalize(tokenizer.encode(x)).float().cpu())
                    bar.update(len(x))
    finally:
        tokenizer.train(was_training)
    latents = torch.cat(chunks)  # outside inference mode: an ordinary tensor, usable later with autograd
    return latents, None if labels is None else labels.long().cpu().repeat(len(views))


def _json(value: Any) -> Any:
    """Round-trip through JSON (tuples become lists) so stored and expected values compare alike."""
    return json.loads(json.dumps(value))


def _own_meta(latents: Tensor, labels: Tensor | None) -> dict[str, Any]:
    return {"schema": SCHEMA, "latents_shape": list(latents.shape),
            "dtype": str(latents.dtype).split(".")[-1], "labels": labels is not None}


def save_cache(path: str | os.PathLike, latents: Tensor, labels: Tensor | None,
               meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write latents (N, …), labels (N,) or None and JSON-able `meta` atomically; return the stored metadata.

    Raises:
        ValueError: `meta` is not JSON-serialisable, labels do not match N, `meta` sets one of the keys
            written here (schema, latents_shape, dtype, labels) to a value the tensors contradict, or the
            latents hold NaN/inf (a cache that every load would refuse; nothing is written).
    """
    if labels is not None and labels.shape != (len(latents),):
        raise ValueError(f"labels must be ({len(latents)},), got {tuple(labels.shape)}")
    try:
        given = _json(dict(meta))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cache metadata must be JSON-serialisable: {exc}") from exc
    own = _own_meta(latents, labels)
    clash = {k: (given[k], v) for k, v in own.items() if k in given and given[k] != v}
    if clash:
        raise ValueError(f"metadata contradicts the tensors being saved to {path}: {clash}")
    stored = {**given, **own}
    tensors = {"latents": latents.detach().cpu().contiguous()}
    if labels is not None:
        tensors["labels"] = labels.detach().long().cpu().contiguous()
    refuse_nonfinite(path, tensors)
    text = json.dumps(stored)
    # serialise before touching disk
    data = safetensors_bytes(tensors, metadata={META_KEY: text, DIGEST_KEY: digest(tensors, text.encode())})
    atomic_write_bytes(Path(path), lambda f: f.write(data))
    return stored


def load_cache(path: str | os.PathLike, expect_meta: Mapping[str, Any] | None = None, *,
               producer: str | None = None) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Read a cache written by `save_cache` → (latents, labels or None, metadata).

    Args:
        expect_meta: key → value that the stored metadata must hold (e.g. `tokenizer_meta(...)`).
        producer: what builds this file, for the error message (e.g. "notebook 30_teacher_fitting").

    Raises:
        CacheError: naming `path`, when the file is missing, unreadable (truncated, not safetensors, not a
            latent cache, inconsistent), unverified (no digest: written by older code), altered (tensors or
            metadata differ from the digest), non-finite, or its metadata differs from `expect_meta`.
    """
    path = Path(path)
    rebuild = f"delete it and rerun {producer}" if producer else "delete it to rebuild"
    if not path.is_file():
        hint = f"; run {producer} first" if producer else ""
        raise CacheError(f"latent cache {path} does not exist{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            names = f.keys()  # safe_open has no __iter__
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise CacheError(f"latent cache {path} is unreadable (truncated or not a safetensors file): {exc}; "
                         f"{rebuild}") from exc
    if META_KEY not in header:
        raise CacheError(f"{path} is a safetensors file but not a dmvae latent cache (no {META_KEY!r} "
                         "metadata)")
    reason = problem(tensors, header.get(DIGEST_KEY), header[META_KEY].encode())
    if reason:  # before anything else is read from the tensors or the metadata
        raise CacheError(f"latent cache {path} {reason}; {rebuild}")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CacheError(f"latent cache {path} has corrupt metadata: {exc}; {rebuild}") from exc
    latents, labels = tensors.get("latents"), tensors.get("labels")
    own = _own_meta(latents, labels) if latents is not None else {}
    if not isinstance(meta, dict) or not own or any(meta.get(k) != v for k, v in own.items()):
        raise CacheError(f"latent cache {path} is inconsistent (schema {SCHEMA} expected): tensors "
                         f"{sorted(tensors)}, metadata {meta}; {rebuild}")
    if expect_meta:
        wanted = _json(dict(expect_meta))
        diff = [f"{k}: cached {meta.get(k, '<missing>')!r}, expected {v!r}"
                for k, v in wanted.items() if meta.get(k, object()) != v]
        if diff:
            raise CacheError(f"latent cache {path} was built for something else ({'; '.join(diff)}); "
                             + rebuild)
    return latents, labels, meta


def cached_latents(path: str | os.PathLike, build_fn: Callable[[], tuple[Tensor, Tensor | None]],
                   expect_meta: Mapping[str, Any] | None = None, *,
                   producer: str | None = None) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Load the cache at `path` if it exists and matches `expect_meta`; otherwise call `build_fn()` →
    (latents, labels), save them with `expect_meta` as metadata, and return them.

    A file that exists but is unreadable, unverified, altered, non-finite or stale is rebuilt and
    overwritten, with a warning naming it and giving the reason.
    """
    path = Path(path)
    try:
        return load_cache(path, expect_meta, producer=producer)
    except CacheError as exc:
        if path.exists():
            warnings.warn(f"rebuilding the latent cache: {exc}", stacklevel=2)
    latents, labels = build_fn()
    meta = save_cache(path, latents, labels, expect_meta or {})
    return latents, labels, meta
