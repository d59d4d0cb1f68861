"""Pretrained weights: found in each library's own cache, fetched only on request, hashed into the run.

Three files come from outside: DINOv2 (timm, through the Hugging Face cache), torchvision's VGG16 for LPIPS
and torch-fidelity's Inception-v3, both in torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints).
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
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
    """Every weights record found in `sources`: modules (their submodules' `RECORD_KEY` attributes) and
    stats (the `RECORD_KEY` entries of nested mappings and sequences). None entries are skipped."""
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


def hf_cached(repo_id: str) -> Optional[Path]:
    """The weights file of Hugging Face repo `repo_id` already in the local HF cache, or None."""
    for filename in HF_FILENAMES:
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def fetch_hf(repo_id: str) -> Path:
    """Download repo `repo_id`'s weights file into the Hugging Face cache (safetensors first); its path."""
    errors = []
    for filename in HF_FILENAMES:
        try:
            path = hf_hub_download(repo_id, filename)
            _fetched.add(str(path))
            return Path(path)
        except Exception as exc:  # hub errors have many types (missing entry, network, auth); try the next
            errors.append(f"{filename}: {exc}")
    raise RuntimeError(f"could not fetch the weights of {repo_id} from the Hugging Face hub: {errors}")
