"""Embedded image dataset: procedurally rendered 32×32 RGB shapes in 10 classes.

Each image is one foreground shape composited over a cluttered background,

    image = alpha · foreground + (1 − alpha) · background + pixel noise,

where `alpha` is the shape mask rendered on a 64×64 grid and box-averaged to 32×32 (2×2 supersampling
antialias). The class is the only thing the label depends on; everything else is a nuisance:

* pose (drawn from the *shape stream*): scale 0.45–0.85 of the half-width, ±10 % aspect jitter, full
  0–360° rotation, a random centre that keeps the shape mostly inside the frame;
* appearance (drawn from the *nuisance stream*): background colour + linear gradient + bilinearly
  upsampled 4×4 low-frequency noise + (for 40 % of images) an oriented sinusoid texture; a foreground
  colour at least `MIN_CONTRAST` RGB distance from the background colour, with a faint gradient of its own;
  Gaussian pixel noise with σ up to 0.05.

The shape is kept the dominant signal on purpose (large foreground, contrasted colour, moderate clutter) so
that a small self-supervised CNN can discover the classes in a few CPU minutes.

Paired views: `generate(n, seed, nuisance_seed=s)` keeps the labels and poses of `generate(n, seed)` (same
shape stream) and redraws every nuisance from stream `s`, so the same shape instance is rendered with
independent colours, background and noise.

Determinism: images depend only on (n, seed, nuisance_seed). Draws happen per chunk of `CHUNK` images from
`np.random.default_rng([seed, stream, chunk])`; the global RNG is never touched. Speed (measured on
CPU): class masks are computed only on that class's images, and upsampling uses matrix products, not einsum.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .integrity import IntegrityError, read_npz, write_npz
from .pixels import to_float

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross",
                                "ring", "ellipse", "striped_square", "heart", "crescent")
VERSION = "shapes-v1"  # bump whenever rendering changes: it keys the on-disk cache
SIZE = 32              # output resolution
SUPERSAMPLE = 2        # masks are rendered at SIZE·SUPERSAMPLE and box-averaged (antialias)
CHUNK = 2048           # images per random-draw chunk; part of the determinism contract, do not change
MIN_CONTRAST = 0.6     # minimum RGB distance (in [0, 1] units) between foreground and background colours
_STREAM_SHAPE, _STREAM_NUISANCE, _STREAM_NOISE, _STREAM_LABELS = 0, 1, 2, 3


# --- Class masks ------------------------------------------------------------------------------------------
# Each maps local coordinates (u, v), shape (m, H, W), to a boolean mask; the shape's "radius" is 1 there.

def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.42) -> np.ndarray:
    # Fold the angle into one half-sector [0, π/points]; inside iff on the origin side of the edge that joins
    # the outer vertex (1, 0) and the inner vertex at angle π/points.
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(v, u), sector)
    phi = np.minimum(phi, sector - phi)
    r = np.hypot(u, v)
    qx, qy = r * np.cos(phi), r * np.sin(phi)
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    return (bx - 1.0) * qy - by * (qx - 1.0) >= 0


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):  # equilateral: three half-planes
        a = np.pi / 2 + 2 * np.pi * k / 3 + np.pi / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= 0.55  # circumradius 1.1: similar area to the others
    return inside


def _striped_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    box = np.maximum(np.abs(u), np.abs(v))
    band = np.floor((u + 0.8) / 0.32).astype(np.int32) % 2 == 0  # 3 filled stripes and 2 gaps
    return (box <= 0.8) & (band | (box >= 0.62))                   # plus a frame, unlike a few loose bars


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Two lobes (circles) over a downward wedge; a deep top notch keeps it distinct from a disc at 32×32.
    x, y = u, -v - 0.05  # y up, centred vertically
    lobes = ((np.abs(x) - 0.5) ** 2 + (y - 0.35) ** 2) <= 0.25
    wedge = (y <= 0.35) & (np.abs(x) <= 0.97 * (y + 0.95) / 1.3)
    return lobes | wedge


_MASKS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u * u + v * v <= 1.0,                                                        # circle
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,                                     # square
    _triangle,
    _star,
    lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55 ** 2),                      # ring
    lambda u, v: u * u + (v / 0.45) ** 2 <= 1.0,                                              # ellipse
    _striped_square,
    _heart,
    lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.8 ** 2),              # crescent
)
assert len(_MASKS) == len(CLASS_NAMES)


# --- Rendering helpers --------------------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], (size, size) each; y grows downwards."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="xy")


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix W so that W @ L @ W.T bilinearly upsamples an (n_in, n_in) grid L."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo, rows = np.floor(pos).astype(int), np.arange(n_out)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(w, (rows, lo), 1 - (pos - lo))
    np.add.at(w, (rows, np.minimum(lo + 1, n_in - 1)), pos - lo)
    return w


(_X, _Y), (_XS, _YS) = _grid(SIZE), _grid(SIZE * SUPERSAMPLE)
_UPSAMPLE = _bilinear_matrix(SIZE, 4)


def _draw_poses(rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
    scale, aspect = rng.uniform(0.45, 0.85, m), rng.uniform(0.9, 1.1, m)
    room = 1.05 - scale  # keeps most of the shape inside the frame
    return {"scale": scale, "aspect": aspect, "angle": rng.uniform(0, 2 * np.pi, m),
            "cx": rng.uniform(-1, 1, m) * room, "cy": rng.uniform(-1, 1, m) * room}


def _draw_nuisances(rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
    bg, fg = rng.uniform(0, 1, (2, m, 3))
    for _ in range(4):  # rejection rounds, vectorised; survivors get a per-channel complement below
        close = np.linalg.norm(fg - bg, axis=1) < MIN_CONTRAST
        fg[close] = rng.uniform(0, 1, (int(close.sum()), 3))
    close = np.linalg.norm(fg - bg, axis=1) < MIN_CONTRAST
    # stays in [0, 1]; distance ≥ 0.87
    fg[close] = np.where(bg[close] > 0.5, bg[close] - 0.5, bg[close] + 0.5)
    return {"bg": bg, "fg": fg,
            "bg_grad": rng.uniform(-0.2, 0.2, (m, 2, 3)), "fg_grad": rng.uniform(-0.06, 0.06, (m, 2, 3)),
            "lowfreq_sigma": rng.uniform(0.0, 0.1, m), "lowfreq": rng.standard_normal((m, 3, 4, 4)),
            "texture_on": rng.random(m) < 0.4, "texture_amp": rng.uniform(0.04, 0.1, m),
            "texture_freq": rng.uniform(0.15, 0.45, m) * SIZE, "texture_dir": rng.uniform(0, np.pi, m),
            "texture_phase": rng.uniform(0, 2 * np.pi, m), "texture_color": rng.uniform(0.5, 1.0, (m, 3)),
            "noise_sigma": rng.uniform(0.0, 0.05, m)}


def _alpha(label: int, pose: dict[str, np.ndarray]) -> np.ndarray:
    """Antialiased coverage (m, SIZE, SIZE) in [0, 1] of class `label` for poses of m images."""
    p = {k: v.astype(np.float32)[:, None, None] for k, v in pose.items()}
    dx, dy = _XS[None] - p["cx"], _YS[None] - p["cy"]
    cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
    u = (cos * dx + sin * dy) / (p["scale"] * p["aspect"])
    v = (-sin * dx + cos * dy) / (p["scale"] / p["aspect"])
    mask, s = _MASKS[label](u, v).astype(np.float32), SUPERSAMPLE
    return sum(mask[:, i::s, j::s] for i in range(s) for j in range(s)) / (s * s)  # box filter, strided views


def _backgrounds(nz: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colour fields, each (m, SIZE, SIZE, 3) float32."""
    f = {k: v.astype(np.float32) for k, v in nz.items()}
    m = f["bg"].shape[0]
    ramp = np.stack([_X, _Y], axis=-1).reshape(SIZE * SIZE, 2)
    bg = f["bg"][:, None, None] + (ramp @ f["bg_grad"]).reshape(m, SIZE, SIZE, 3)  # (HW,2)@(m,2,3)
    fg = f["fg"][:, None, None] + (ramp @ f["fg_grad"]).reshape(m, SIZE, SIZE, 3)
    low = (_UPSAMPLE @ f["lowfreq"].reshape(m * 3, 4, 4) @ _UPSAMPLE.T).reshape(m, 3, SIZE, SIZE)
    bg += low.transpose(0, 2, 3, 1) * f["lowfreq_sigma"][:, None, None, None]
    on = nz["texture_on"]
    if on.any():
        d, ph = f["texture_dir"][on, None, None], f["texture_phase"][on, None, None]
        wave = np.sin(f["texture_freq"][on, None, None] * (np.cos(d) * _X + np.sin(d) * _Y) + ph)
        amp = f["texture_amp"][on, None, None, None] * f["texture_color"][on, None, None]
        bg[on] += wave[..., None] * amp
    return bg, fg


def _render_chunk(labels: np.ndarray, seed: int, nuisance_seed: int, chunk: int) -> np.ndarray:
    m = labels.shape[0]
    pose = _draw_poses(np.random.default_rng([seed, _STREAM_SHAPE, chunk]), m)
    nz = _draw_nuisances(np.random.default_rng([nuisance_seed, _STREAM_NUISANCE, chunk]), m)
    noise_rng = np.random.default_rng([nuisance_seed, _STREAM_NOISE, chunk])
    alpha = np.empty((m, SIZE, SIZE), dtype=np.float32)
    for label in np.unique(labels):  # each class's mask only on that class's images
        idx = np.flatnonzero(labels == label)
        alpha[idx] = _alpha(int(label), {k: v[idx] for k, v in pose.items()})
    bg, fg = _backgrounds(nz)
    img = bg + alpha[..., None] * (fg - bg)
    sigma = nz["noise_sigma"].astype(np.float32)[:, None, None, None]  # float64 here would upcast the image
    img += noise_rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


# --- Public API ---------------------------------------------------------------------------------------------
def make_labels(n: int, seed: int) -> np.ndarray:
    """Balanced labels: arange(n) % 10, shuffled by `seed`. Returns int64 (n,)."""
    labels = np.arange(n, dtype=np.int64) % len(CLASS_NAMES)
    return np.random.default_rng([seed, _STREAM_LABELS]).permutation(labels)


def generate(n: int, seed: int, *, nuisance_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render n labelled shape images.

    Args:
        n: number of images.
        seed: seeds the labels and the shape stream (class, pose, scale, position).
        nuisance_seed: seeds colours, background and noise; None → `seed`. Two calls with the same
            (n, seed) and different nuisance seeds are paired views of the same shape instances.

    Returns:
        images: uint8 (n, 32, 32, 3) in HWC order; labels: int64 (n,) indices into `CLASS_NAMES`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    nuisance_seed = seed if nuisance_seed is None else nuisance_seed
    labels = make_labels(n, seed)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for chunk, start in enumerate(range(0, n, CHUNK)):
        stop = min(start + CHUNK, n)
        images[start:stop] = _render_chunk(labels[start:stop], seed, nuisance_seed, chunk)
    return images, labels


# the colour words of saturated colours by hue (upper edges in degrees)
_HUE_EDGES = np.array([15, 40, 70, 160, 200, 255, 290, 345, 361])
_HUE_WORDS = np.array(["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "red"])


def colour_names(rgb: np.ndarray) -> np.ndarray:
    """Colour words for RGB triples (m, 3) in [0, 1]: black, white or gray by HSV value and saturation, else a
    hue word, "dark " below value 0.5 and "light " when every channel is above 0.6."""
    rgb = np.clip(rgb, 0.0, 1.0)
    hi, lo = rgb.max(1), rgb.min(1)
    r, g, b, c = rgb[:, 0], rgb[:, 1], rgb[:, 2], np.maximum(hi - lo, 1e-12)
    sector = np.where(hi == r, ((g - b) / c) % 6, np.where(hi == g, (b - r) / c + 2, (r - g) / c + 4))
    words = _HUE_WORDS[np.searchsorted(_HUE_EDGES, sector * 60, side="right")].astype(object)
    words = np.where(hi < 0.5, "dark " + words, np.where(lo > 0.6, "light " + words, words))
    grey = np.where(hi > 0.8, "white", "gray")
    return np.where(hi < 0.25, "black", np.where(hi - lo < 0.25 * hi, grey, words))


def describe(n: int, seed: int, *, nuisance_seed: int | None = None) -> list[str]:
    """What each image of `generate(n, seed, nuisance_seed=…)` shows, as a noun phrase ("large light green
    star on a striped blue background"): size, foreground and background base colours, background texture
    and class. It re-draws the per-chunk streams `generate` renders from, without rendering."""
    nuisance_seed = seed if nuisance_seed is None else nuisance_seed
    labels, out = make_labels(n, seed), []
    for chunk, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        pose = _draw_poses(np.random.default_rng([seed, _STREAM_SHAPE, chunk]), m)
        nz = _draw_nuisances(np.random.default_rng([nuisance_seed, _STREAM_NUISANCE, chunk]), m)
        scale = pose["scale"]  # 0.45–0.85 of the half-width
        size = np.where(scale < 0.58, "small ", np.where(scale > 0.72, "large ", ""))
        texture = np.where(nz["texture_on"], "striped ", "")
        fg, bg = colour_names(nz["fg"]), colour_names(nz["bg"])
        names = [CLASS_NAMES[y].replace("_", " ") for y in labels[start:start + m]]
        out += [f"{size[i]}{fg[i]} {names[i]} on a {texture[i]}{bg[i]} background" for i in range(m)]
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W) in [-1, 1]."""
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, images.shape
    return to_float(torch.from_numpy(images))


class ShapesDataset(torch.utils.data.Dataset):
    """Labelled shape images held in memory: `images` float (N, 3, 32, 32) in [-1, 1], `labels` int64 (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        assert len(images) == len(labels), (images.shape, labels.shape)
        self.images = to_tensor(images)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    @classmethod
    def generate(cls, n: int, seed: int, *, nuisance_seed: int | None = None) -> ShapesDataset:
        """`generate(n, seed, nuisance_seed=…)` wrapped as a dataset (no cache)."""
        return cls(*generate(n, seed, nuisance_seed=nuisance_seed))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class Splits(NamedTuple):
    """The labelled train and val splits returned by `make_splits`."""
    train: ShapesDataset
    val: ShapesDataset


def val_seed(seed: int) -> int:
    """The seed of the validation split: an independent stream derived from the train `seed`."""
    return int(np.random.SeedSequence([seed, 10_000]).generate_state(1)[0])


def cache_path(cache_dir: str | os.PathLike, n_train: int, n_val: int, seed: int) -> Path:
    """The .npz that `make_splits` reads and writes; the name carries VERSION, the sizes and the seed."""
    return Path(cache_dir) / f"{VERSION}_train{n_train}_val{n_val}_seed{seed}.npz"


def _load_cache(path: Path, n_train: int, n_val: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (with a warning naming the file) when it is unreadable, has no digest
    (written by older code), fails its digest, or does not match: bytes changed on disk must never reach
    training as wrong pixels, and regenerating is always safe."""
    try:
        arrays = read_npz(path)
    except IntegrityError as exc:  # all mean "regenerate"
        log.warning("shapes cache %s; regenerating it", exc)
        return None
    keys = {"x_train", "y_train", "x_val", "y_val", "version"}
    ok = (set(arrays) == keys and str(arrays.pop("version")) == VERSION
          and arrays["x_train"].shape == (n_train, SIZE, SIZE, 3) and arrays["x_train"].dtype == np.uint8
          and arrays["x_val"].shape == (n_val, SIZE, SIZE, 3) and arrays["x_val"].dtype == np.uint8)
    if not ok:
        log.warning("shapes cache %s does not match %s (n=%d/%d); regenerating it", path, VERSION, n_train,
                    n_val)
    return arrays if ok else None


def make_splits(n_train: int, n_val: int, seed: int, cache_dir: str | os.PathLike | None = None) -> Splits:
    """Labelled train/val splits, generated once and cached as uint8 in `cache_dir/<VERSION>_….npz`.

    Train is `generate(n_train, seed)`; val is `generate(n_val, val_seed(seed))`, an independent stream.
    A cache file that is unreadable (e.g. truncated), has no digest (older code), fails its digest (bytes
    changed on disk) or does not match is regenerated and overwritten, with a logged warning naming it: the
    cache is derived data, so regeneration is always safe. Writes are atomic and store the digest. Memory: the
    float tensors take 12 KiB per image (≈ 737 MB for 60 k images; the .npz holds uint8, 3 KiB per image).
    """
    path = cache_path(cache_dir, n_train, n_val, seed) if cache_dir is not None else None
    arrays = _load_cache(path, n_train, n_val) if path is not None and path.exists() else None
    if arrays is None:
        x_train, y_train = generate(n_train, seed)
        x_val, y_val = generate(n_val, val_seed(seed))
        arrays = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
        if path is not None:
            write_npz(path, {"version": np.array(VERSION), **arrays})
    return Splits(ShapesDataset(arrays["x_train"], arrays["y_train"]),
                  ShapesDataset(arrays["x_val"], arrays["y_val"]))
