"""Data layer: the embedded shapes dataset (determinism, balance, paired views, cache) and the real-image
loaders (ImageFolder with the ADM crop, CIFAR-10 pickles) including their error paths."""

from __future__ import annotations

import logging
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae_lib.data import shapes_dataset
from dmvae_lib.data.image_folders import DatasetError, ImageFolderDataset, center_crop_arr, load_cifar10

N_CLASSES = len(shapes_dataset.CLASS_NAMES)


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, np.ndarray]:
    return shapes_dataset.generate(400, seed=0)


# ------------------------------------------------------------------------------------------- shapes dataset

def test_generate_shapes_dtypes_and_balance(shapes):
    images, labels = shapes
    assert images.shape == (400, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (400,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels, minlength=N_CLASSES), np.full(N_CLASSES, 40))
    assert images.min() < 30 and images.max() > 225  # uses the range, not a grey wash


def test_generate_is_deterministic_and_seed_dependent(shapes):
    images, labels = shapes_dataset.generate(400, seed=0)
    assert images.tobytes() == shapes[0].tobytes() and np.array_equal(labels, shapes[1])
    other, other_labels = shapes_dataset.generate(400, seed=1)
    assert not np.array_equal(other, images) and not np.array_equal(other_labels, labels)


def test_generate_spans_several_chunks_deterministically(monkeypatch):
    monkeypatch.setattr(shapes_dataset, "CHUNK", 16)  # per-chunk streams must differ from one another
    a, _ = shapes_dataset.generate(37, seed=3)
    b, _ = shapes_dataset.generate(37, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a[:5], a[16:21]) and not np.array_equal(a[:5], a[32:])


def test_paired_views_share_class_and_pose_but_not_pixels(shapes):
    images, labels = shapes
    paired, paired_labels = shapes_dataset.generate(400, seed=0, nuisance_seed=99)
    assert np.array_equal(paired_labels, labels)
    assert (np.abs(paired.astype(int) - images.astype(int)).mean(axis=(1, 2, 3)) > 5).all()
    # Same pose: the shape's edge map (where the image changes the most) lines up far better with its own
    # paired view than with another instance of the same class.
    def edges(x: np.ndarray) -> np.ndarray:
        g = x.astype(np.float32).mean(-1)
        return np.abs(np.diff(g, axis=1))[:, :, :-1] + np.abs(np.diff(g, axis=2))[:, :-1]
    e, p = edges(images), edges(paired)
    own = [np.corrcoef(e[i].ravel(), p[i].ravel())[0, 1] for i in range(50)]
    shuffled = [np.corrcoef(e[i].ravel(), p[(i + N_CLASSES) % 400].ravel())[0, 1] for i in range(50)]
    assert np.median(own) > np.median(shuffled) + 0.2


def test_class_mean_images_differ(shapes):
    # Mean foreground-vs-background contrast per class: average |x − per-image median| over each class.
    images, labels = shapes
    x = images.astype(np.float32).mean(-1)
    contrast = np.abs(x - np.median(x, axis=(1, 2), keepdims=True))
    means = np.stack([contrast[labels == c].mean(0) for c in range(N_CLASSES)])
    dist = np.abs(means[:, None] - means[None]).mean(axis=(2, 3))
    assert dist[~np.eye(N_CLASSES, dtype=bool)].min() > 1.0  # observed ≥ 2.3 over seeds 0–2


def test_labels_in_range_and_shuffled():
    labels = shapes_dataset.make_labels(1000, seed=5)
    assert labels.min() == 0 and labels.max() == N_CLASSES - 1
    assert not np.array_equal(labels, np.arange(1000) % N_CLASSES)


def test_make_splits_tensors_and_cache_round_trip(tmp_path, monkeypatch):
    splits = shapes_dataset.make_splits(60, 20, seed=0, cache_dir=tmp_path)
    x, y = splits.train.images, splits.train.labels
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= x.min() and x.max() <= 1.0 and len(splits.val) == 20
    assert not torch.equal(splits.train.images[:20], splits.val.images)  # independent val stream
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob(".*tmp*"))

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of loading the cache")
    monkeypatch.setattr(shapes_dataset, "generate", fail)
    again = shapes_dataset.make_splits(60, 20, seed=0, cache_dir=tmp_path)
    assert torch.equal(again.train.images, x) and torch.equal(again.val.labels, splits.val.labels)


def test_corrupt_cache_is_regenerated_with_warning(tmp_path, caplog):
    first = shapes_dataset.make_splits(30, 10, seed=1, cache_dir=tmp_path)
    path = shapes_dataset.cache_path(tmp_path, 30, 10, 1)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger=shapes_dataset.__name__):
        second = shapes_dataset.make_splits(30, 10, seed=1, cache_dir=tmp_path)
    assert str(path) in caplog.text and "regenerating" in caplog.text
    assert torch.equal(first.train.images, second.train.images)
    assert shapes_dataset._load_cache(path, 30, 10) is not None  # rewritten, readable again


def test_shapes_dataset_item():
    ds = shapes_dataset.ShapesDataset.generate(10, seed=0)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < N_CLASSES and len(ds) == 10


# ------------------------------------------------------------------------------------------- image folders

def _write_png(path, size=(48, 40), value=128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _write_png(root / "cat" / "a.png", value=1)
    _write_png(root / "cat" / "b.png", size=(20, 64), value=2)
    _write_png(root / "dog" / "c.png", size=(130, 70), value=3)
    return root


def test_center_crop_arr_sizes():
    for size in [(300, 200), (64, 64), (17, 50)]:
        out = center_crop_arr(Image.new("RGB", size, (10, 20, 30)), 16)
        assert out.size == (16, 16)
        assert np.abs(np.asarray(out).astype(int) - [10, 20, 30]).max() <= 1


def test_image_folder_outputs(folder):
    ds = ImageFolderDataset(folder, 16, hflip=True, seed=0)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [label for _, label in items] == [0, 0, 1]
    for x, _ in items:
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(items, [ds[i] for i in range(3)]))  # repeatable


def test_image_folder_flip_follows_seed_and_epoch(folder):
    plain = ImageFolderDataset(folder, 16)[0][0]
    ds = ImageFolderDataset(folder, 16, hflip=True, seed=0)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        x = ds[0][0]
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
        seen.add(torch.equal(x, plain))
    assert seen == {True, False}


def test_missing_root_names_path(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", 16)


def test_empty_class_folder_names_folder(folder):
    (folder / "empty_class").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(folder / "empty_class"))):
        ImageFolderDataset(folder, 16)


def test_corrupt_image_raises_naming_file(folder):
    bad = folder / "cat" / "aa_bad.png"
    bad.write_bytes(b"this is not a png" * 10)
    ds = ImageFolderDataset(folder, 16)
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DatasetError, match="aa_bad.png"):
        ds[index]


def test_corrupt_image_skipped_with_warning(folder, caplog):
    valid = ImageFolderDataset(folder, 16)
    expected = {valid[i][0].numpy().tobytes() for i in range(len(valid))}
    bad = folder / "cat" / "aa_bad.png"  # sorts first in its class: skipping must move to the next item
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    ds = ImageFolderDataset(folder, 16, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="dmvae_lib.data.image_folders"):
        items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 4 and all(x.numpy().tobytes() in expected for x, _ in items)
    assert str(bad) in caplog.text and caplog.text.count("aa_bad.png") == 1


# ------------------------------------------------------------------------------------------- CIFAR-10

def _write_cifar(root, n: int = 4, names=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar_loader_reads_real_format(tmp_path):
    folder = _write_cifar(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1 <= x.min() and x.max() <= 1
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.allclose((x[0, :, 0, 1] + 1) * 127.5, torch.tensor(raw[b"data"][0, [1, 1025, 2049]]).float())
    xt, yt = load_cifar10(folder, "test")  # the batches folder itself works too
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == [int(v) for v in yt]


def test_cifar_missing_batch_names_file(tmp_path):
    _write_cifar(tmp_path, names=["data_batch_1", "data_batch_2", "test_batch"])
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")


def test_cifar_corrupt_batch_names_file(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_cifar10(tmp_path, "test")
