"""Content digests for cached arrays: written with a cache, recomputed from what is read back.

Why: a derived-data cache whose payload bytes changed on disk (bit rot, a bad copy, another tool writing
into it) still parses. safetensors checks only its header, so flipped bytes reached notebook 40 as NaN
latents or values of 1e37 without a word (issue 25). A digest stored in the same file and recomputed from
the very arrays a loader returns catches any such change; `nonfinite` catches a file that is consistent but
holds NaN/inf (written by a diverged encoder, or edited with its digest recomputed). A cache written before
digests existed has none and is treated as unverifiable, so it is rebuilt once by its owner.

The digest is BLAKE2b-256 (hashlib, ≈ 1 GB/s on one core): first `extra` (e.g. a cache's JSON metadata),
then the arrays in name order, each framed by its name, dtype and shape, then its raw C-order bytes. numpy
arrays and torch tensors of the same dtype, shape and values hash alike.

`.npz` caches: `write_npz` stores the digest as one more member (`DIGEST_ENTRY`); `read_npz` returns the
arrays only after the digest and finiteness checks pass, else raises `IntegrityError` naming the file. (zip
members carry a CRC-32 that numpy checks while reading; the digest also covers names, dtypes and shapes,
files rewritten with fresh CRCs, and tells a cache without a digest from a verified one.)
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from ..runtime.runs import atomic_write_bytes

Array = Union[np.ndarray, Tensor]
ALGORITHM = "blake2b-256"
DIGEST_ENTRY = "_dmvae_blake2b"  # the .npz member holding the digest (a 0-d unicode array)


class IntegrityError(ValueError):
    """A cache file that cannot be trusted: unreadable, without a digest, altered, or non-finite.

    `path` is the file and `reason` a phrase that completes "<path> <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} {reason}")


def _raw(array: Array) -> tuple[str, list[int], np.ndarray]:
    """(dtype name, shape, the bytes as a flat uint8 view) without copying contiguous CPU data."""
    if isinstance(array, Tensor):
        t = array.detach().cpu().contiguous()
        return str(t.dtype).removeprefix("torch."), list(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    a = np.ascontiguousarray(array)
    return a.dtype.name, list(a.shape), a.reshape(-1).view(np.uint8)


def digest(arrays: Mapping[str, Array], extra: bytes = b"") -> str:
    """Hex BLAKE2b-256 of `extra` and every array's name, dtype, shape and bytes (module docstring)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(len(extra).to_bytes(8, "little"))
    h.update(extra)
    for name in sorted(arrays):
        dtype, shape, raw = _raw(arrays[name])
        h.update(json.dumps([name, dtype, shape]).encode() + b"\0")
        h.update(raw)
    return h.hexdigest()


def nonfinite(arrays: Mapping[str, Array]) -> dict[str, int]:
    """name → number of NaN/±inf elements, for the floating-point arrays that hold any."""
    bad = {}
    for name, a in arrays.items():
        if isinstance(a, Tensor):
            count = int(a.numel() - torch.isfinite(a).sum()) if a.is_floating_point() else 0
        else:
            a = np.asarray(a)
            inexact = np.issubdtype(a.dtype, np.inexact)
            count = int(a.size - np.count_nonzero(np.isfinite(a))) if inexact else 0
        if count:
            bad[name] = count
    return bad


def problem(arrays: Mapping[str, Array], stored: str | None, extra: bytes = b"") -> str | None:
    """Why `arrays` read from a cache must not be used, or None when they are verified and finite.

    The reason completes "<file> <reason>": no stored digest (written by older code), a digest that differs
    from the arrays' (bytes changed after writing), or NaN/inf values. Hashes the arrays once."""
    if not stored:
        return f"has no content digest ({ALGORITHM}; written by older code), so it cannot be verified"
    actual = digest(arrays, extra)
    if actual != stored:
        return (f"does not match its content digest ({ALGORITHM} stored {stored[:16]}…, computed "
                f"{actual[:16]}…): its bytes changed after it was written")
    bad = nonfinite(arrays)
    return f"holds non-finite values ({_counts(bad)})" if bad else None


def _counts(bad: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {n} NaN/inf" for k, n in sorted(bad.items()))


def refuse_nonfinite(path: str | os.PathLike, arrays: Mapping[str, Array]) -> None:
    """Raise ValueError naming `path` when `arrays` hold NaN/inf: such data must not be cached (every load
    would refuse it) nor trained on."""
    bad = nonfinite(arrays)
    if bad:
        raise ValueError(f"refusing to write {path}: non-finite values ({_counts(bad)})")


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> str:
    """Write `arrays` and their digest (member `DIGEST_ENTRY`) to the .npz `path` atomically; the digest.

    Raises:
        ValueError: naming `path`, for a member called `DIGEST_ENTRY` or non-finite float data."""
    path = Path(path)
    if DIGEST_ENTRY in arrays:
        raise ValueError(f"{path}: the member name {DIGEST_ENTRY!r} is reserved for the digest")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    refuse_nonfinite(path, arrays)
    value = digest(arrays)
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays, **{DIGEST_ENTRY: np.array(value)}))
    return value


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a .npz written by `write_npz`, read fully into memory and verified (digest, finiteness).

    Raises:
        IntegrityError: naming `path`, when it is unreadable (truncated, bad zip CRC, not an .npz), has no
            digest, does not match it, or holds NaN/inf.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    # np.load returns a bare ndarray (no context manager: TypeError) for a .npy file
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        raise IntegrityError(path, f"is unreadable ({type(exc).__name__}: {exc})") from exc
    stored = arrays.pop(DIGEST_ENTRY, None)
    stored = str(stored) if stored is not None and stored.shape == () and stored.dtype.kind == "U" else None
    reason = problem(arrays, stored)
    if reason:
        raise IntegrityError(path, reason)
    return arrays
