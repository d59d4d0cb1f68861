"""Loaders for real image datasets on local disk: an ImageFolder tree and the CIFAR-10 python batches.

Nothing here downloads. Every problem with the files (a missing root, an empty class folder, a missing
CIFAR-10 batch, an unreadable image) raises `DatasetError` naming the offending path, at construction time
where possible, so that a broken dataset never surfaces as a bare PIL traceback inside a DataLoader worker.

Preprocessing follows the ADM protocol (Dhariwal & Nichol 2021, openai/guided-diffusion `center_crop_arr`,
MIT licence; re-implemented here, not copied): halve the image with a BOX filter while its short side is at
least twice the target, resize with BICUBIC so the short side equals the target, then centre-crop. Outputs
are float tensors (3, size, size) in [-1, 1], optionally horizontally flipped for training.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.functional import pil_to_tensor

from .pixels import u8_to_float

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer",
                                    "dog", "frog", "horse", "ship", "truck")
# Everything PIL raises for a file that is not a decodable image: UnidentifiedImageError (an OSError),
# truncated data (OSError), broken headers (SyntaxError, ValueError) and decompression bombs.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(RuntimeError):
    """A dataset path, file or image that cannot be used; the message names it."""


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: BOX-halve while the short side ≥ 2·size, BICUBIC-resize short side to size, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; raise `DatasetError` naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode, so truncation is caught here
    except _PIL_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → float32 (3, H, W) in [-1, 1]."""
    return u8_to_float(pil_to_tensor(image))


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> files, ADM-centre-cropped to `resolution`, as (image, label) pairs.

    Class indices follow torchvision's `find_classes` (sorted folder names). With `hflip=True` each item is
    flipped with probability ½, decided by (seed, epoch, index) so that runs repeat exactly; call
    `set_epoch` once per epoch. With `skip_corrupt=False` (the default) an unreadable image raises
    `DatasetError` naming the file. With `skip_corrupt=True` it is logged (once per process) and **replaced
    by a duplicate of the next readable image** in index order (wrapping around): the dataset keeps its
    length and indices, so that sampler still draws, but that neighbour then appears twice as often (with
    its label, and the flip drawn for the requested index). Nothing is dropped; remove broken files to avoid
    the bias.

    Args:
        root: the dataset root folder.
        resolution: output side length in pixels.
        hflip: random horizontal flips (training).
        seed: seeds the flips.
        skip_corrupt: serve an unreadable image's next readable neighbour (a duplicate) instead of raising.
        extensions: file suffixes counted as images (case-insensitive).
    """

    def __init__(self, root: str | os.PathLike, resolution: int, *, hflip: bool = False, seed: int = 0,
                 skip_corrupt: bool = False, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder root {self.root} does not exist or is not a directory")
        try:
            self.classes, self.class_to_idx = find_classes(self.root)
        except FileNotFoundError as exc:
            raise DatasetError(f"image folder root {self.root} has no class sub-folders") from exc
        self.samples: list[tuple[str, int]] = make_dataset(self.root, self.class_to_idx, extensions,
                                                           allow_empty=True)
        counts = np.bincount([label for _, label in self.samples], minlength=len(self.classes))
        empty = [str(self.root / c) for c, k in zip(self.classes, counts) if k == 0]
        if empty:
            raise DatasetError(f"class folder(s) with no images ({', '.join(extensions)}): "
                               f"{', '.join(empty)}")
        self.targets = [label for _, label in self.samples]
        self.resolution, self.hflip, self.seed, self.skip_corrupt = resolution, hflip, seed, skip_corrupt
        self.epoch = 0
        self._bad: set[int] = set()  # indices known to be unreadable (per process)

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of `epoch` (set it in the main process before creating iterators)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _flip(self, index: int) -> bool:
        return bool(np.random.default_rng([self.seed, self.epoch, index]).integers(2))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, label, _ = self.item(index)
        return x, label

    def item(self, index: int) -> tuple[torch.Tensor, int, str]:
        """(image, label, path) of `index`, or of its next readable neighbour when it is unreadable and
        `skip_corrupt` is set: the label and path are the served image's own."""
        n = len(self.samples)
        for offset in range(n):
            j = (index + offset) % n
            if j in self._bad:
                continue
            path, label = self.samples[j]
            try:
                image = load_rgb(path)
            except DatasetError as exc:
                if not self.skip_corrupt:
                    raise
                self._bad.add(j)
                log.warning("skipping unreadable image %s (%s)", path, exc.__cause__)
                continue
            x = to_signed_tensor(center_crop_arr(image, self.resolution))
            if self.hflip and self._flip(index):
                x = x.flip(-1)
            return x, label, str(path)
        raise DatasetError(f"no readable image left in {self.root}")


def _cifar_folder(root: Path) -> Path:
    nested = root / "cifar-10-batches-py"
    return nested if nested.is_dir() else root


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 batch file {path} is missing")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")  # the official format is a pickle: trusted files only
        data, labels = entry[b"data"], entry[b"labels"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DatasetError(f"CIFAR-10 batch file {path} is unreadable: {type(exc).__name__}: {exc}") from exc
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(f"CIFAR-10 batch file {path} has data {data.dtype}{data.shape} and "
                           f"{len(labels)} labels; expected uint8 (N, 3072) and N labels")
    return data, labels


def load_cifar10(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its python-pickle folder, as float32 (N, 3, 32, 32) in [-1, 1] and int64 (N,) labels.

    torchvision's `CIFAR10(download=False)` insists on the official md5 sums and reports any problem as
    "not found or corrupted" without naming the file, so the ~20-line format is read here directly.

    Args:
        root: `cifar-10-batches-py` itself or its parent.
        split: "train" (data_batch_1..5, 50 k images) or "test" (test_batch, 10 k images).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _cifar_folder(Path(root))
    if not folder.is_dir():
        raise DatasetError(f"CIFAR-10 folder {folder} does not exist")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = [_read_cifar_batch(folder / name) for name in names]
    data = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024)
    labels = np.concatenate([y for _, y in batches])
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DatasetError(f"CIFAR-10 labels in {folder} fall outside 0..9")
    return u8_to_float(torch.from_numpy(data)), torch.from_numpy(labels)
