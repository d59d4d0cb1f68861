"""Images in memory: the uint8 ↔ float conversions, the configured dataset, and its training batches."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..configs.tokenizer import TokenizerStageConfig
from ..runtime.runs import RunError
from ..runtime.seeds import stream_seed
from . import shapes_dataset
from .image_folders import CIFAR10_CLASSES, ImageFolderDataset, load_cifar10
from .integrity import IntegrityError, read_npz, write_npz
from .pixels import float_to_u8, to_float, to_uint8

_FIRST_VIEW = 1000  # the nuisance seed of the shapes' first training view (the one cached as latents)


@dataclass
class ImageData:
    train: Optional[Tensor]  # uint8 (V, N, H, W, 3): V renders per instance
                             # (V > 1: paired views); None if streamed
    train_labels: Optional[Tensor]
    val: Tensor  # uint8 (N, H, W, 3)
    val_labels: Tensor
    folder: Any = None  # an ImageFolderDataset for streamed training
    class_names: tuple[str, ...] = ()  # one per label (captions of the `text` reference); () if unknown
    describe_train: Optional[Callable[[], list[str]]] = None  # shapes: what each training instance shows,
                                                              # a phrase per image (built on demand)
    cache_dir: Optional[Path] = None  # where derived files may be cached (the text reference's embeddings)


def _read_shapes(file: Path, layout: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """The verified arrays of the shapes cache `file`, or None (with a warning naming it) when it is
    unreadable, has no digest (older code), fails its digest, or does not hold `layout` (name → shape): every
    stage trains on these pixels, so a damaged file is regenerated rather than trusted."""
    try:
        arrays = read_npz(file)
        found = {k: tuple(v.shape) for k, v in arrays.items()}
        if found != layout or arrays["train"].dtype != np.uint8 or arrays["val"].dtype != np.uint8:
            raise IntegrityError(file, f"holds {found}, expected uint8 images in {layout}")
    except IntegrityError as exc:
        warnings.warn(f"regenerating the shapes cache: {exc}", stacklevel=4)  # the caller of load_data
        return None
    return arrays


def _shapes(cfg: TokenizerStageConfig, cache_dir: Path) -> ImageData:
    d = cfg.data
    file = cache_dir / (f"shapes_{shapes_dataset.VERSION}_n{d.n_train}_v{d.n_views}_val{d.n_val}"
                        f"_s{cfg.seed}.npz")
    size = (shapes_dataset.SIZE, shapes_dataset.SIZE, 3)
    layout = {"train": (d.n_views, d.n_train, *size), "train_y": (d.n_train,), "val": (d.n_val, *size),
              "val_y": (d.n_val,)}
    arrays = _read_shapes(file, layout) if file.exists() else None
    if arrays is None:
        views = [shapes_dataset.generate(d.n_train, cfg.seed,
                                         nuisance_seed=_FIRST_VIEW + v) for v in range(d.n_views)]
        val, val_y = shapes_dataset.generate(d.n_val, stream_seed(cfg.seed, "data.shapes_val"))
        arrays = {"train": np.stack([v[0] for v in views]), "train_y": views[0][1],
                  "val": val, "val_y": val_y}
        write_npz(file, arrays)
    t = {k: torch.from_numpy(arrays[k]) for k in ("train", "train_y", "val", "val_y")}
    describe = functools.partial(shapes_dataset.describe, d.n_train, cfg.seed, nuisance_seed=_FIRST_VIEW)
    return ImageData(t["train"], t["train_y"], t["val"], t["val_y"], class_names=shapes_dataset.CLASS_NAMES,
                     describe_train=describe, cache_dir=cache_dir)


def load_data(cfg: TokenizerStageConfig, cache_dir: Path) -> ImageData:
    """The configured dataset; shapes renders are cached under `cache_dir` (generated once, ~4k img/s; a
    cache file that fails its digest, or was written without one, is regenerated with a warning)."""
    d = cfg.data
    if d.source == "shapes":
        return _shapes(cfg, cache_dir)
    if d.source == "cifar10":
        (x, y), (xv, yv) = load_cifar10(d.root, "train"), load_cifar10(d.root, "test")
        return ImageData(to_uint8(x)[None], y, to_uint8(xv)[: d.n_val], yv[: d.n_val],
                         class_names=CIFAR10_CLASSES, cache_dir=cache_dir)
    root = Path(d.root)
    folder = ImageFolderDataset(root / "train", d.resolution, hflip=True, seed=cfg.seed,
                                skip_corrupt=d.skip_corrupt)
    val = ImageFolderDataset(root / "val", d.resolution, skip_corrupt=d.skip_corrupt)
    idx = torch.linspace(0, len(val) - 1, min(d.n_val, len(val))).long().tolist()
    items = [val[i] for i in idx]
    val_u8 = torch.stack([float_to_u8(x).permute(1, 2, 0) for x, _ in items])
    return ImageData(None, None, val_u8, torch.tensor([int(y) for _, y in items]), folder,
                     class_names=tuple(folder.classes), cache_dir=cache_dir)


def batches(data: ImageData, batch: int, gen: torch.Generator, workers: int,
            pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images in [−1, 1], labels) training batches drawn with replacement by `gen`.

    An ImageFolder streams through a DataLoader: `workers` processes kept alive for the whole run
    (persistent_workers), batches in page-locked memory with `pin_memory` (a CUDA device: the copy to it
    can then overlap compute, `.to(device, non_blocking=True)`)."""
    if data.folder is None:
        while True:
            idx = torch.randint(data.train.shape[1], (batch,), generator=gen)
            yield to_float(data.train[0][idx]), data.train_labels[idx].long()
    sampler = torch.utils.data.RandomSampler(data.folder, replacement=True, num_samples=10**12, generator=gen)
    for x, y in torch.utils.data.DataLoader(data.folder, batch_size=batch, sampler=sampler,
                                            num_workers=workers, drop_last=True, pin_memory=pin_memory,
                                            persistent_workers=workers > 0):
        yield x, torch.as_tensor(y).long()


def train_images(data: ImageData) -> tuple[Tensor, Tensor]:
    """The first render of every training instance, (N, H, W, 3) uint8, and its labels."""
    if data.train is None:
        raise RunError("the latent cache needs in-memory training images (shapes or cifar10); for an "
                       "ImageFolder use the cache writer on a DataLoader (not wired at this scale)")
    return data.train[0], data.train_labels
