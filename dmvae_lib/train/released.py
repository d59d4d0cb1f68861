"""The DMVAE authors' released models (Hugging Face `sen-ye/dmvae`) as this project's `imagenet256` models.

    vae.pt                      {"vae_ema", "vae_wo_ddp"}: the tokenizer (their sampling uses vae_ema)
    ep64.pt, ep400.pt, ep800.pt {"ema", "model", …}: LightningDiT-XL/1 generators after 64/400/800 epochs
                                (their sampling uses ema: SDE, 250 steps, no CFG)

Their generator samples latents = (z − 0.0685)·0.1763 (the README's stats, which the loaded tokenizer carries
in its latent_mean/latent_scale buffers). The files come from a local path, else the Hugging Face cache, else,
only with DMVAE_FETCH_WEIGHTS=1 (and not HF_HUB_OFFLINE=1), a download into that cache (`runtime.weights`);
a missing file is an error saying where to put it. Each file is CRC-checked, read without unpickling code
(`trust_pickle` opts out), and recorded with its SHA-256 on the model it yields (`weights_files`). The key
maps and their checks are `models/released.py`; the equivalence with the authors' modules is measured by the
fixture in tests/fixtures/released/ (tiny) and was measured at full size (its README).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..configs import make_config, to_dict
from ..configs.generation import GenerationStageConfig
from ..configs.tokenizer import TokenizerStageConfig
from ..models.released import (
    AUTHORS_DIT_SETTINGS,
    ConversionError,
    dit_state_from_authors,
    tokenizer_state_from_authors,
)
from ..models.tokenizer import Tokenizer
from ..runtime import weights
from ..runtime.runs import RunError, check_zip_crc, load_state_strict
from .artifacts import build_net, build_tokenizer

log = logging.getLogger(__name__)
RELEASED_REPO = "sen-ye/dmvae"
TOKENIZER_FILE = "vae.pt"
GENERATOR_FILES = ("ep64.pt", "ep400.pt", "ep800.pt")
LATENT_MEAN, LATENT_SCALE = 0.0685, 0.1763  # the authors' README (sample50k.sh)
LATENT_SHAPE, NUM_CLASSES = (32, 16, 16), 1000
TOKENIZER_ENTRIES = {"ema": "vae_ema", "raw": "vae_wo_ddp"}  # our name -> the entry of vae.pt
GENERATOR_ENTRIES = {"ema": "ema", "raw": "model"}  # our name -> the entry of ep*.pt


def released_file(name: str, path: str | os.PathLike | None = None) -> Path:
    """The released file `name` (vae.pt, ep64.pt, ep400.pt or ep800.pt): `path` when given, else its copy in
    the Hugging Face cache, else (DMVAE_FETCH_WEIGHTS=1, not HF_HUB_OFFLINE=1) downloaded into that cache.

    Raises:
        ValueError: an unknown name.  RunError: no such file here (the message says where to put it).
    """
    if name not in (TOKENIZER_FILE, *GENERATOR_FILES):
        raise ValueError(f"unknown released file {name!r}; the authors released "
                         f"{', '.join((TOKENIZER_FILE, *GENERATOR_FILES))}")
    how = (f"Pass the path of your copy of {name} (huggingface.co/{RELEASED_REPO}), or put it into the "
           f"Hugging Face cache (`huggingface-cli download {RELEASED_REPO} {name}` on a machine with "
           f"network, copied to $HF_HUB_CACHE), or, with network, set {weights.FETCH_ENV}=1 to fetch it "
           "into that cache.")
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise RunError(f"no file {file} (the authors' {name}). {how}")
        return file
    hit = weights.hf_cached(RELEASED_REPO, (name,))
    if hit is not None:
        return hit
    if not weights.fetch_allowed():
        raise RunError(f"the authors' {name} is not in the Hugging Face cache. {how}")
    log.warning("fetching %s from %s into the Hugging Face cache (%s=1)", name, RELEASED_REPO,
                weights.FETCH_ENV)
    return weights.fetch_hf(RELEASED_REPO, (name,))


def read_released(path: str | os.PathLike, entry: str, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict stored under `entry` of a released torch file (memory-mapped; the other entries are
    never read into memory). Without `trust_pickle` the file is read as tensors and plain containers only.

    Raises:
        RunError naming the file: missing, corrupt (CRC), truncated or not a torch file, holding code objects
        (without trust_pickle), or without `entry` (its entries listed).
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no file {path}")
    check_zip_crc(path)
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_pickle)
    except Exception as exc:  # pickle, zip and torch raise many types for truncated or foreign files
        if "Weights only load failed" in str(exc):
            raise RunError(f"{path} holds Python objects besides tensors; load it with trust_pickle=True "
                           f"only if you trust where it came from ({str(exc)[:300]})") from exc
        raise RunError(f"{path} is unreadable (truncated or not a torch file): {exc}") from exc
    if not isinstance(ckpt, Mapping) or entry not in ckpt:
        held = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise RunError(f"{path} has no entry {entry!r} (it holds {held}): not the authors' file?")
    state = ckpt[entry]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RunError(f"{path} [{entry}] is not a state dict of tensors")
    return dict(state)


def released_generator_config() -> GenerationStageConfig:
    """Our `imagenet256` generator config with the authors' time embedding and position-table order."""
    settings = {f"net.{k}": v for k, v in AUTHORS_DIT_SETTINGS.items()}
    return make_config("generation", "imagenet256", {"net.grad_checkpoint": False, **settings})


def released_tokenizer_config() -> TokenizerStageConfig:
    """Our `imagenet256` tokenizer config, its DINOv2 built without pretrained weights (the released file
    carries the encoder the authors trained in their DM stage)."""
    return make_config("tokenizer", "imagenet256", {"encoder.timm_pretrained": False})


def _entry(entries: dict[str, str], weights_name: str) -> str:
    if weights_name not in entries:
        raise ValueError(f"weights_name={weights_name!r} unknown; use one of {', '.join(entries)}")
    return entries[weights_name]


def _load_converted(model: nn.Module, convert, found: Path, entry: str, cfg) -> dict:
    """Load `convert(model.state_dict())` (the authors' weights in our names) into `model` strictly, record
    the file's SHA-256 on it, and return info = {file, sha256, entry, config}; errors name the file."""
    try:
        converted = convert(model.state_dict())
    except ConversionError as exc:
        raise RunError(f"{found} [{entry}]: {exc}") from exc
    load_state_strict(model, converted, f"{found} [{entry}]")
    name = f"released:{found.name}"
    model.weights_files = weights.record(name, found)
    return {"file": str(found), "sha256": model.weights_files[name]["sha256"], "entry": entry,
            "config": to_dict(cfg)}


def load_released_generator(path: str | os.PathLike | None = None, *, file: str = "ep800.pt",
                            weights_name: str = "ema", device="cpu",
                            trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """The authors' LightningDiT-XL/1 `file` (at `path`, or found by `released_file`) as our LightningDiT,
    frozen in eval mode; `weights_name` "ema" (what they sample with) or "raw". Returns (net, info) with
    info = {file, sha256, entry, config}; the net carries the file's weights record.

    Raises:
        RunError naming the file (and every offending key when the weights do not convert).
    """
    entry = _entry(GENERATOR_ENTRIES, weights_name)
    found = released_file(file, path)
    state = read_released(found, entry, trust_pickle=trust_pickle)
    cfg = released_generator_config()
    net = build_net(cfg, LATENT_SHAPE, NUM_CLASSES)
    info = _load_converted(net, lambda like: dit_state_from_authors(state, like), found, entry, cfg)
    return net.to(device).eval().requires_grad_(False), info


def load_released_tokenizer(path: str | os.PathLike | None = None, *, weights_name: str = "ema", device="cpu",
                            trust_pickle: bool = False) -> tuple[Tokenizer, dict]:
    """The authors' tokenizer vae.pt (at `path`, or found by `released_file`) as our Tokenizer in eval mode,
    with their latent stats; `weights_name` "ema" (what they sample with) or "raw". Returns (tokenizer,
    info) with info = {file, sha256, entry, config}; the tokenizer carries the file's weights record.

    Raises:
        RunError naming the file (and every offending key when the weights do not convert).
    """
    entry = _entry(TOKENIZER_ENTRIES, weights_name)
    found = released_file(TOKENIZER_FILE, path)
    state = read_released(found, entry, trust_pickle=trust_pickle)
    cfg = released_tokenizer_config()
    tok = build_tokenizer(cfg, None)
    info = _load_converted(tok, lambda like: tokenizer_state_from_authors(
        state, like, latent_mean=LATENT_MEAN, latent_scale=LATENT_SCALE), found, entry, cfg)
    return tok.to(device).eval(), info

