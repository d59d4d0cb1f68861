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
fixture in tests/fixtures/released/ (tiny) and was measured at full size (its README). The architectures
are `configs.released`'s (the released files' by default; the fixture's tiny ones at notebook 80's `smoke`,
which `write_fixture_files` turns into files in the authors' format).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import safetensors
import torch
from torch import Tensor, nn

from ..configs import to_dict
from ..configs.released import GENERATOR_FILES, GeneratorArch, TokenizerArch
from ..models.lightning_dit import LightningDiT
from ..models.released import (
    AUTHORS_DIT_SETTINGS,
    ConversionError,
    dit_state_from_authors,
    tokenizer_state_from_authors,
)
from ..models.tokenizer import Decoder, Projector, Tokenizer, timm_encoder
from ..runtime import weights
from ..runtime.runs import RunError, atomic_write_bytes, check_zip_crc, load_state_strict

log = logging.getLogger(__name__)
RELEASED_REPO = "sen-ye/dmvae"
TOKENIZER_FILE = "vae.pt"
# the tiny authors-format fixture (made with their code; tests/fixtures/released/README.md)
FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "released" / "authors_tiny.safetensors"
FIXTURE_GENERATOR = "ep_tiny.pt"
TOKENIZER_ENTRIES = {"ema": "vae_ema", "raw": "vae_wo_ddp"}  # our name -> the entry of vae.pt
GENERATOR_ENTRIES = {"ema": "ema", "raw": "model"}  # our name -> the entry of ep*.pt


def released_file(name: str, path: str | os.PathLike | None = None) -> Path:
    """The released file `name` (vae.pt, ep64.pt, ep400.pt or ep800.pt): `path` when given (then `name` only
    words the messages), else its copy in the Hugging Face cache, else (DMVAE_FETCH_WEIGHTS=1, not
    HF_HUB_OFFLINE=1) downloaded into that cache.

    Raises:
        ValueError: an unknown name to look up.
        RunError: no such file here (the message says where to put it).
    """
    how = (f"Pass the path of your copy of {name} (huggingface.co/{RELEASED_REPO}), or put it into the "
           f"Hugging Face cache (`huggingface-cli download {RELEASED_REPO} {name}` on a machine with "
           f"network, copied to $HF_HUB_CACHE), or, with network, set {weights.FETCH_ENV}=1 to fetch it "
           "into that cache.")
    if path is not None and str(path):
        file = Path(path).expanduser()
        if not file.is_file():
            raise RunError(f"no file {file} (the authors' {name}). {how}")
        return file
    if name not in (TOKENIZER_FILE, *GENERATOR_FILES):
        raise ValueError(f"unknown released file {name!r}; the authors released "
                         f"{', '.join((TOKENIZER_FILE, *GENERATOR_FILES))}")
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


def _entry(entries: dict[str, str], weights_name: str) -> str:
    if weights_name not in entries:
        raise ValueError(f"weights_name={weights_name!r} unknown; use one of {', '.join(entries)}")
    return entries[weights_name]


def _load_converted(model: nn.Module, convert, found: Path, entry: str, config: dict) -> dict:
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
            "config": config}


def build_released_tokenizer(arch: TokenizerArch) -> Tokenizer:
    """Our Tokenizer shaped like the authors' VAE `arch` (random weights, DINOv2 not loaded: the released file
    carries the encoder the authors trained)."""
    enc = timm_encoder(arch.timm_name, img_size=arch.image_size, patch_size=arch.patch_size, pretrained=False,
                       model_args=arch.vit_args)
    proj = Projector(enc.out_channels, arch.z_channels, hidden_channels=arch.mlp_hidden)
    dec = Decoder(arch.z_channels, latent_size=arch.image_size // enc.reduction, image_size=arch.image_size,
                  ch=arch.dec_ch, ch_mult=arch.dec_mult, num_res_blocks=arch.dec_res_blocks, attn=True,
                  num_groups=32)
    return Tokenizer(enc, proj, dec)


def build_released_generator(arch: GeneratorArch, latent_shape: tuple[int, int, int]) -> LightningDiT:
    """Our LightningDiT shaped like the authors' `arch` on latents (C, H, H), with their time embedding and
    position-table order (`AUTHORS_DIT_SETTINGS`)."""
    c, h, w = latent_shape
    if h != w:
        raise ValueError(f"the LightningDiT needs a square latent grid, got {latent_shape}")
    return LightningDiT(h, c, arch.hidden, arch.depth, arch.heads, arch.num_classes,
                        patch_size=arch.patch_size, **AUTHORS_DIT_SETTINGS)


def latent_shape(arch: TokenizerArch) -> tuple[int, int, int]:
    """(C, H, W) of the latents the tokenizer `arch` makes (one token per patch)."""
    side = arch.image_size // arch.patch_size
    return arch.z_channels, side, side


def load_released_generator(path: str | os.PathLike | None = None, *, file: str = "ep800.pt",
                            arch: GeneratorArch = GeneratorArch(),
                            latents: tuple[int, int, int] = latent_shape(TokenizerArch()),
                            weights_name: str = "ema", device="cpu",
                            trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """The authors' LightningDiT `file` (at `path`, or found by `released_file`) as our LightningDiT of
    `arch` on `latents` (default: XL/1 on 32×16×16), frozen in eval mode; `weights_name` "ema" (what they
    sample with) or "raw". Returns (net, info) with info = {file, sha256, entry, config}; the net carries the
    file's weights record.

    Raises:
        RunError naming the file (and every offending key when the weights do not convert).
    """
    entry = _entry(GENERATOR_ENTRIES, weights_name)
    found = released_file(file, path)
    state = read_released(found, entry, trust_pickle=trust_pickle)
    net = build_released_generator(arch, latents)
    info = _load_converted(net, lambda like: dit_state_from_authors(state, like), found, entry,
                           {"arch": to_dict(arch), "latent_shape": list(latents), **AUTHORS_DIT_SETTINGS})
    return net.to(device).eval().requires_grad_(False), info


def load_released_tokenizer(path: str | os.PathLike | None = None, *, arch: TokenizerArch = TokenizerArch(),
                            weights_name: str = "ema", device="cpu",
                            trust_pickle: bool = False) -> tuple[Tokenizer, dict]:
    """The authors' tokenizer vae.pt (at `path`, or found by `released_file`) as our Tokenizer of `arch`
    (default: theirs at full size) in eval mode, with their latent stats (`arch.latent_mean/scale`);
    `weights_name` "ema" (what they sample with) or "raw". Returns (tokenizer, info) with info = {file,
    sha256, entry, config}; the tokenizer carries the file's weights record.

    Raises:
        RunError naming the file (and every offending key when the weights do not convert).
    """
    entry = _entry(TOKENIZER_ENTRIES, weights_name)
    found = released_file(TOKENIZER_FILE, path)
    state = read_released(found, entry, trust_pickle=trust_pickle)
    tok = build_released_tokenizer(arch)
    info = _load_converted(tok, lambda like: tokenizer_state_from_authors(
        state, like, latent_mean=arch.latent_mean, latent_scale=arch.latent_scale), found, entry,
        {"arch": to_dict(arch)})
    return tok.to(device).eval(), info


def write_fixture_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """The tiny authors-format fixture as *their* files in `folder`: vae.pt {vae_ema, vae_wo_ddp} and
    ep_tiny.pt {ema, model} (each pair the same float32 weights), for notebook 80's `smoke`/`cpu` presets.
    Returns (tokenizer file, generator file); files already there are replaced atomically.

    Raises:
        RunError: the fixture is not there (an installed copy without the repository's tests/ folder).
    """
    if not FIXTURE.is_file():
        raise RunError(f"no fixture {FIXTURE}: the tiny authors-format stand-in lives in the repository's "
                       "tests/fixtures/released/; run from a checkout, or pass the released files")
    with safetensors.safe_open(FIXTURE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, entries in ((TOKENIZER_FILE, {"vae_ema": part("vae."), "vae_wo_ddp": part("vae.")}),
                          (FIXTURE_GENERATOR, {"ema": part("dit."), "model": part("dit.")})):
        atomic_write_bytes(folder / name, lambda f, e=entries: torch.save(e, f))
        out.append(folder / name)
    return out[0], out[1]
