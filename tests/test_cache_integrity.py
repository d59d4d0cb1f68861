"""Issue 25, case 2: corrupted cache contents are never trained on.

Every cache a stage trains on (the latent cache of notebooks 30/40/60, the shapes renders of `load_data`, the
`make_splits` shapes cache) stores a digest of its arrays and is verified on load: bytes flipped in the
payload, a consistent file holding NaN, or a file written before digests existed are rebuilt with a warning
naming the file (or refused with an error naming it where nothing can rebuild them); an intact file is loaded
as is, without a warning and without being rewritten.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from dmvae_lib.configs.tokenizer import DataConfig, TokenizerStageConfig
from dmvae_lib.data import images, integrity, latent_cache, shapes_dataset
from dmvae_lib.data.integrity import IntegrityError, digest, read_npz, write_npz
from dmvae_lib.data.latent_cache import (
    DIGEST_KEY,
    META_KEY,
    CacheError,
    cached_latents,
    load_cache,
    save_cache,
)

META = {"tokenizer": "abc123", "latent_mean": 0.25, "latent_scale": 2.0}


# ------------------------------------------------------------------------------------------------ helpers

def _flip_safetensors_payload(path: Path, count: int = 64) -> None:
    """XOR `count` bytes in the middle of the tensor data (after the 8-byte length and the JSON header)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    mid = start + (len(data) - start) // 2 - count // 2
    assert mid > start
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_npz_payload(path: Path, count: int = 64) -> None:
    """XOR `count` bytes in the middle of the largest member's array data (not the zip or .npy headers)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    local = info.header_offset
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") \
        + int.from_bytes(data[local + 28:local + 30], "little")
    mid = start + info.compress_size // 2 - count // 2
    assert mid > start + 128  # past the .npy header
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_npz(path: Path, edit) -> None:
    """Rewrite an .npz with `edit(arrays)` applied, keeping every other member (the stored digest too): a
    file whose zip CRCs are all valid but whose data no longer matches its digest, or lacks one."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(path, **arrays)


def _builder(seed: int = 0):
    calls = []

    def build():
        calls.append(1)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(64, 4, 4, 4, generator=g), torch.arange(64) % 10

    return build, calls


def _write_latent_file(path: Path, latents, labels, meta, *, with_digest: bool) -> None:
    """A latent cache in the on-disk format, written by hand: old code (no digest) or a consistent file."""
    tensors = {"latents": latents.contiguous(), "labels": labels.long().contiguous()}
    stored = {**meta, "schema": latent_cache.SCHEMA, "latents_shape": list(latents.shape), "dtype": "float32",
              "labels": True}
    text = json.dumps(stored)
    header = {META_KEY: text}
    if with_digest:
        header[DIGEST_KEY] = digest(tensors, text.encode())
    path.write_bytes(safetensors_bytes(tensors, metadata=header))


@contextlib.contextmanager
def _no_warnings():
    """Any warning (e.g. "rebuilding the latent cache") fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ----------------------------------------------------------------------------------------------- integrity

def test_digest_covers_bytes_names_dtypes_shapes_and_extra():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    base = digest({"x": x})
    assert base == digest({"x": torch.from_numpy(x)}) == digest({"x": x.copy()})  # numpy ≡ torch
    y = x.copy()
    y.reshape(-1).view(np.uint8)[5] ^= 1
    assert digest({"x": y}) != base
    assert digest({"z": x}) != base and digest({"x": x.reshape(4, 3)}) != base
    assert digest({"x": x.view(np.int32)}) != base and digest({"x": x}, b"meta") != base
    assert digest({"a": x[:1], "b": x[1:]}) != digest({"a": x[:2], "b": x[2:]})  # framing
    assert integrity.nonfinite({"x": x, "y": np.array([np.nan, np.inf, 1.0]), "i": np.arange(3)}) == {"y": 2}


def test_read_npz_refuses_nonfinite_and_write_npz_refuses_to_store_it(tmp_path):
    path = tmp_path / "c.npz"
    bad = {"x": np.array([1.0, np.nan], dtype=np.float32)}
    with pytest.raises(ValueError, match="non-finite") as err:
        write_npz(path, bad)
    assert str(path) in str(err.value) and not path.exists()
    np.savez(path, **bad, **{integrity.DIGEST_ENTRY: np.array(digest(bad))})  # consistent, but NaN
    with pytest.raises(IntegrityError, match="non-finite") as err:
        read_npz(path)
    assert err.value.path == path and str(path) in str(err.value)
    path.write_bytes(b"not an npz")
    with pytest.raises(IntegrityError, match="unreadable") as err:
        read_npz(path)
    assert str(path) in str(err.value)


# -------------------------------------------------------------------------------------------- latent cache

def test_latent_cache_with_flipped_payload_bytes_is_rebuilt_and_equals_the_original(tmp_path):
    path, (build, calls) = tmp_path / "latents.safetensors", _builder()
    original, labels, _ = cached_latents(path, build, META)
    _flip_safetensors_payload(path)
    with pytest.raises(CacheError, match="does not match its content digest") as err:  # cannot rebuild
        load_cache(path, META, producer="notebook 30_teacher_fitting")
    assert str(path) in str(err.value) and "rerun notebook 30_teacher_fitting" in str(err.value)
    with pytest.warns(UserWarning, match="does not match its content digest") as record:
        again, labels2, _ = cached_latents(path, build, META)
    assert str(path) in str(record[0].message)
    assert len(calls) == 2 and torch.equal(again, original) and torch.equal(labels2, labels)
    assert torch.equal(load_cache(path, META)[0], original)  # the rewritten file verifies


def test_latent_cache_with_edited_metadata_is_rebuilt(tmp_path):
    path, (build, calls) = tmp_path / "latents.safetensors", _builder()
    original, _, _ = cached_latents(path, build, META)
    data = path.read_bytes()
    assert data.count(b"abc123") == 1
    path.write_bytes(data.replace(b"abc123", b"abc124"))  # same length: the header still parses
    with pytest.warns(UserWarning, match=f"{path}.*does not match its content digest"):
        again, _, meta = cached_latents(path, build, {**META, "tokenizer": "abc124"})
    assert len(calls) == 2 and torch.equal(again, original) and meta["tokenizer"] == "abc124"


def test_consistent_latent_cache_holding_nan_is_refused_and_rebuilt(tmp_path):
    path, (build, calls) = tmp_path / "latents.safetensors", _builder()
    latents, labels = build()
    poisoned = latents.clone()
    poisoned[3, 1, 2, 2] = float("nan")
    poisoned[7, 0, 0, 0] = float("inf")
    _write_latent_file(path, poisoned, labels, META, with_digest=True)  # digest matches the NaN payload
    with pytest.raises(CacheError, match="non-finite values") as err:
        load_cache(path, META)
    assert str(path) in str(err.value)
    with pytest.warns(UserWarning, match=f"{path}.*non-finite values"):
        again, _, _ = cached_latents(path, build, META)
    assert len(calls) == 2 and torch.equal(again, latents) and torch.isfinite(load_cache(path, META)[0]).all()


def test_save_cache_refuses_nonfinite_latents(tmp_path):
    path = tmp_path / "latents.safetensors"
    with pytest.raises(ValueError, match="non-finite") as err:
        save_cache(path, torch.tensor([[1.0, float("nan")]]), None, {})
    assert str(path) in str(err.value) and not path.exists()


def test_latent_cache_without_digest_is_rebuilt_once_then_accepted(tmp_path):
    path, (build, calls) = tmp_path / "latents.safetensors", _builder()
    latents, labels = build()
    _write_latent_file(path, latents, labels, META, with_digest=False)  # as written before digests existed
    with pytest.warns(UserWarning, match=f"{path}.*no content digest"):
        first, _, _ = cached_latents(path, build, META)
    assert len(calls) == 2 and torch.equal(first, latents)
    mtime = path.stat().st_mtime_ns
    with _no_warnings():
        second, _, _ = cached_latents(path, build, META)
    assert len(calls) == 2 and torch.equal(second, latents) and path.stat().st_mtime_ns == mtime


def test_intact_latent_cache_is_loaded_without_rebuild_or_rewrite(tmp_path):
    path, (build, calls) = tmp_path / "latents.safetensors", _builder()
    original, _, _ = cached_latents(path, build, META)
    mtime, data = path.stat().st_mtime_ns, path.read_bytes()
    with _no_warnings():
        again, _, _ = cached_latents(path, build, META)
    assert len(calls) == 1 and torch.equal(again, original)
    assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data


# ------------------------------------------------------------------- shapes renders of load_data (images)

def _shapes_cfg():
    return TokenizerStageConfig(seed=3, data=DataConfig(n_train=24, n_val=8, n_views=2))


def _shapes_file(cache_dir: Path) -> Path:
    (file,) = cache_dir.glob("shapes_*.npz")
    return file


def _same(a, b) -> bool:
    keys = ("train", "train_labels", "val", "val_labels")
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in keys)


def test_shapes_cache_with_flipped_payload_bytes_is_regenerated(tmp_path):
    original = images.load_data(_shapes_cfg(), tmp_path)
    file = _shapes_file(tmp_path)
    _flip_npz_payload(file)
    with pytest.warns(UserWarning, match="regenerating the shapes cache") as record:
        again = images.load_data(_shapes_cfg(), tmp_path)
    assert str(file) in str(record[0].message)
    assert _same(again, original)
    read_npz(file)  # rewritten, verified


def test_shapes_cache_altered_with_valid_zip_crcs_is_regenerated(tmp_path):
    original = images.load_data(_shapes_cfg(), tmp_path)
    file = _shapes_file(tmp_path)

    def edit(arrays):
        arrays["train"][1, 5, 10, 10] ^= 0x40  # one pixel changed, the stored digest kept

    _rewrite_npz(file, edit)
    with pytest.warns(UserWarning, match=f"{file}.*does not match its content digest"):
        again = images.load_data(_shapes_cfg(), tmp_path)
    assert _same(again, original)


def test_shapes_cache_without_digest_is_regenerated_once_then_accepted(tmp_path, monkeypatch):
    original = images.load_data(_shapes_cfg(), tmp_path)
    file = _shapes_file(tmp_path)
    _rewrite_npz(file, lambda arrays: arrays.pop(integrity.DIGEST_ENTRY, None))  # the old format
    with pytest.warns(UserWarning, match=f"{file}.*no content digest"):
        first = images.load_data(_shapes_cfg(), tmp_path)
    assert _same(first, original)
    mtime = file.stat().st_mtime_ns
    monkeypatch.setattr(shapes_dataset, "generate", lambda *a, **k: pytest.fail("regenerated again"))
    with _no_warnings():
        second = images.load_data(_shapes_cfg(), tmp_path)
    assert _same(second, original) and file.stat().st_mtime_ns == mtime


def test_intact_shapes_cache_is_loaded_without_regeneration_or_rewrite(tmp_path, monkeypatch):
    original = images.load_data(_shapes_cfg(), tmp_path)
    file = _shapes_file(tmp_path)
    mtime, data = file.stat().st_mtime_ns, file.read_bytes()
    monkeypatch.setattr(shapes_dataset, "generate", lambda *a, **k: pytest.fail("regenerated"))
    with _no_warnings():
        again = images.load_data(_shapes_cfg(), tmp_path)
    assert _same(again, original) and file.stat().st_mtime_ns == mtime and file.read_bytes() == data


# -------------------------------------------------------------------------- make_splits (shapes_dataset)

def _splits_equal(a, b) -> bool:
    pairs = [(getattr(a, s).images, getattr(b, s).images) for s in ("train", "val")]
    pairs += [(getattr(a, s).labels, getattr(b, s).labels) for s in ("train", "val")]
    return all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("damage", ["flip", "altered", "no_digest"])
def test_make_splits_cache_damage_is_regenerated_with_a_warning(tmp_path, caplog, damage):
    original = shapes_dataset.make_splits(20, 10, seed=2, cache_dir=tmp_path)
    path = shapes_dataset.cache_path(tmp_path, 20, 10, 2)
    if damage == "flip":
        _flip_npz_payload(path)
    elif damage == "altered":
        _rewrite_npz(path, lambda arrays: arrays["y_train"].__setitem__(0, (arrays["y_train"][0] + 1) % 10))
    else:
        _rewrite_npz(path, lambda arrays: arrays.pop(integrity.DIGEST_ENTRY, None))
    with caplog.at_level(logging.WARNING, logger=shapes_dataset.__name__):
        again = shapes_dataset.make_splits(20, 10, seed=2, cache_dir=tmp_path)
    assert str(path) in caplog.text and "regenerating" in caplog.text
    assert _splits_equal(again, original)
    caplog.clear()
    mtime = path.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger=shapes_dataset.__name__):
        third = shapes_dataset.make_splits(20, 10, seed=2, cache_dir=tmp_path)
    assert caplog.text == "" and path.stat().st_mtime_ns == mtime and _splits_equal(third, original)
