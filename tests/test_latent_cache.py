import hashlib
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from dmvae_lib.data.latent_cache import (
    CacheError,
    cached_latents,
    encode_latents,
    file_sha256,
    load_cache,
    save_cache,
    tokenizer_meta,
)
from dmvae_lib.runtime.runs import RunError


class PoolTokenizer(nn.Module):
    """Stand-in tokenizer: z = 2×2 average pool of the image; normalize with mean/scale buffers."""

    def __init__(self, mean=0.1, scale=2.0):
        super().__init__()
        self.register_buffer("latent_mean", torch.tensor(mean))
        self.register_buffer("latent_scale", torch.tensor(scale))
        self.calls = 0

    def encode(self, x):
        assert not self.training  # encode_latents must switch to eval mode
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        self.calls += 1
        return F.avg_pool2d(x, 2)

    def normalize(self, z):
        return (z - self.latent_mean) * self.latent_scale


def _images(n=5, side=4):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def _expected(images, tok):
    return tok.normalize(F.avg_pool2d(images.float() / 127.5 - 1, 2))


def test_encode_latents_values_batching_and_mode():
    images, labels = _images()
    tok = PoolTokenizer().train()
    latents, y = encode_latents(tok, images, labels, device="cpu", batch=2, progress=False)
    assert latents.shape == (5, 3, 2, 2) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, _expected(images, tok))
    assert torch.equal(y, labels) and y.dtype == torch.long
    assert tok.training and tok.calls == 3  # mode restored; ceil(5 / 2) batches
    assert not latents.is_inference()  # usable later under autograd
    same, _ = encode_latents(tok, images, labels, device="cpu", batch=500, progress=False)
    torch.testing.assert_close(same, latents)
    none_latents, none_labels = encode_latents(tok, images, None, device="cpu", progress=False)
    assert none_labels is None and torch.equal(none_latents, same)


def test_encode_latents_flip_doubles_n_and_flips_images():
    images, labels = _images()
    tok = PoolTokenizer()
    latents, y = encode_latents(tok, images, labels, device="cpu", batch=2, flip=True, progress=False)
    assert latents.shape == (10, 3, 2, 2)
    assert torch.equal(y, torch.cat([labels, labels]))
    torch.testing.assert_close(latents[5:], _expected(images.flip(-1), tok))
    torch.testing.assert_close(latents[5:], latents[:5].flip(-1))  # pooling commutes with a horizontal flip
    assert not torch.allclose(latents[5:], latents[:5])


def test_encode_latents_rejects_bad_input():
    images, labels = _images()
    with pytest.raises(ValueError, match="permute"):
        encode_latents(PoolTokenizer(), images.permute(0, 2, 3, 1), labels, device="cpu", progress=False)
    with pytest.raises(ValueError, match="uint8"):
        encode_latents(PoolTokenizer(), images.float(), labels, device="cpu", progress=False)
    with pytest.raises(ValueError, match="labels"):
        encode_latents(PoolTokenizer(), images, labels[:3], device="cpu", progress=False)


def test_encode_latents_with_a_real_tokenizer():
    from dmvae_lib.models.tokenizer import Decoder, Projector, Tokenizer

    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 8, 2, stride=2)  # (B, 3, 8, 8) -> (B, 8, 4, 4)
    decoder = Decoder(4, latent_size=4, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=False,
                      num_groups=4)
    tok = Tokenizer(encoder, Projector(8, 4), decoder)
    tok.latent_mean.fill_(0.5)
    tok.latent_scale.fill_(3.0)
    images, labels = _images(n=3, side=8)
    latents, _ = encode_latents(tok, images, labels, device="cpu", precision="bf16", progress=False)
    assert latents.shape == (3, 4, 4, 4) and latents.dtype == torch.float32
    with torch.no_grad():
        ref = tok.normalize(tok.encode(images.float() / 127.5 - 1))
    torch.testing.assert_close(latents, ref, atol=0.1, rtol=0.05)  # bf16 autocast
    assert tokenizer_meta(tok) == {"latent_mean": 0.5, "latent_scale": 3.0}


def test_round_trip(tmp_path):
    latents, labels = torch.randn(6, 2, 3, 3), torch.arange(6)
    path = tmp_path / "sub" / "latents.safetensors"
    stored = save_cache(path, latents, labels, {"latent_mean": 0.25, "split": "val", "flip": False})
    out, y, meta = load_cache(path, {"split": "val", "latent_mean": 0.25})
    assert torch.equal(out, latents) and torch.equal(y, labels) and y.dtype == torch.long
    assert meta == stored and meta["latents_shape"] == [6, 2, 3, 3] and meta["labels"] is True
    save_cache(path, latents, None, {})
    out, y, meta = load_cache(path)
    assert torch.equal(out, latents) and y is None and meta["labels"] is False
    assert os.listdir(path.parent) == ["latents.safetensors"]  # no temp file left behind


def test_tokenizer_meta_hashes_the_checkpoint(tmp_path):
    ckpt = tmp_path / "tokenizer.pt"
    ckpt.write_bytes(b"weights" * 1000)
    meta = tokenizer_meta(PoolTokenizer(0.1, 2.0), ckpt)
    assert meta["tokenizer_sha256"] == hashlib.sha256(b"weights" * 1000).hexdigest() == file_sha256(ckpt)
    assert meta["latent_mean"] == pytest.approx(0.1) and meta["latent_scale"] == 2.0


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "latents.safetensors"
    old = torch.randn(4, 2, 2, 2)
    save_cache(path, old, None, {"version": 1})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_cache(path, torch.randn(9, 2, 2, 2), None, {"version": 2})
    with pytest.raises(OSError, match="disk full"):
        save_cache(tmp_path / "new.safetensors", old, None, {})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors"]  # no temp file, no new file
    out, _, meta = load_cache(path)
    assert torch.equal(out, old) and meta["version"] == 1  # the old cache is intact


def test_missing_file_names_path_and_producer(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CacheError, match="run notebook 30_teacher_fitting first") as err:
        load_cache(path, producer="notebook 30_teacher_fitting")
    assert str(path) in str(err.value)
    assert isinstance(err.value, RunError)


def test_corrupt_files_name_the_path(tmp_path):
    path = tmp_path / "latents.safetensors"
    save_cache(path, torch.randn(50, 4, 4, 4), torch.arange(50), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CacheError, match="unreadable") as err:
        load_cache(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CacheError, match="unreadable"):
        load_cache(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"latents": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(CacheError, match="not a dmvae latent cache") as err:
        load_cache(foreign)
    assert str(foreign) in str(err.value)


def test_metadata_mismatch(tmp_path):
    path = tmp_path / "latents.safetensors"
    save_cache(path, torch.randn(3, 2, 2, 2), None, {"tokenizer_sha256": "abc", "latent_scale": 0.5})
    with pytest.raises(CacheError, match="tokenizer_sha256: cached 'abc', expected 'def'") as err:
        load_cache(path, {"tokenizer_sha256": "def", "latent_scale": 0.5})
    assert str(path) in str(err.value)
    with pytest.raises(CacheError, match="latents_shape"):
        load_cache(path, {"latents_shape": (3, 4, 2, 2)})
    with pytest.raises(CacheError, match="flip: cached '<missing>'"):
        load_cache(path, {"flip": True})
    load_cache(path, {"latents_shape": (3, 2, 2, 2), "latent_scale": 0.5})  # tuples compare as lists


def test_save_cache_rejects_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_cache(tmp_path / "a.safetensors", torch.zeros(2, 1), None, {"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="contradicts"):
        save_cache(tmp_path / "a.safetensors", torch.zeros(2, 1), None, {"latents_shape": [3, 1]})
    assert not (tmp_path / "a.safetensors").exists()


def test_cached_latents_builds_once_and_rebuilds_when_stale(tmp_path):
    path, calls = tmp_path / "latents.safetensors", []

    def build():
        calls.append(1)
        return torch.full((4, 2, 2, 2), float(len(calls))), torch.arange(4)

    a, y, meta = cached_latents(path, build, {"tokenizer_sha256": "abc"})
    assert len(calls) == 1 and path.exists() and meta["tokenizer_sha256"] == "abc"
    b, y2, _ = cached_latents(path, build, {"tokenizer_sha256": "abc"})
    assert len(calls) == 1 and torch.equal(a, b) and torch.equal(y, y2)
    with pytest.warns(UserWarning, match="built for something else"):
        c, _, meta = cached_latents(path, build, {"tokenizer_sha256": "new"})
    assert len(calls) == 2 and float(c[0, 0, 0, 0]) == 2.0 and meta["tokenizer_sha256"] == "new"
    assert load_cache(path, {"tokenizer_sha256": "new"})[2] == meta
