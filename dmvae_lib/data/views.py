"""How the SSL encoder's two views are made: generator-paired renders and batched torch augmentations.

Paired views (label-free): `shapes_dataset.generate(n, seed, nuisance_seed=s)` re-renders the same shape
instances (class, pose, scale, position) with independent colours, background, texture and noise. They are a
data augmentation the generator provides, like a photometric jitter that also redraws the background; no
label is read. On top, each view gets a random resized crop, a full rotation and a flip (one `affine_grid`),
optionally colour jitter and grayscale, all drawn from an explicit `torch.Generator`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import shapes_dataset
from .pixels import u8_to_float

_LUMA = (0.299, 0.587, 0.114)


def augment(x: Tensor, generator: torch.Generator, *, crop_scale: tuple[float, float] = (0.35, 1.0),
            rotate: bool = True, flip: bool = True, color_p: float = 0.8, color_strength: float = 0.4,
            hue: bool = True, gray_p: float = 0.2, max_aspect: float = 4 / 3,
            keep_color: Tensor | None = None) -> Tensor:
    """Random resized crop + rotation + flip (one affine_grid, reflection padding), then colour jitter
    (brightness, contrast, saturation, hue rotation) and grayscale; (B, 3, H, W) in [−1, 1] → same.

    Every draw comes from `generator` (on its own device): a seeded generator makes it deterministic.
    `keep_color` (B,) bool marks images that get the geometric part only.
    """
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float) -> Tensor:  # (B,) uniform draws from `generator`, moved to the images' device
        return (torch.rand(b, generator=generator, device=generator.device) * (hi - lo) + lo).to(dev)

    area, log_ar = u(*crop_scale), u(-math.log(max_aspect), math.log(max_aspect))
    sx, sy = (area * log_ar.exp()).sqrt().clamp(max=1), (area / log_ar.exp()).sqrt().clamp(max=1)
    tx, ty = u(-1, 1) * (1 - sx), u(-1, 1) * (1 - sy)
    angle = u(0, 2 * math.pi) if rotate else torch.zeros(b, device=dev)
    sign = torch.where(u(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * sx * sign, -sin * sy, tx], 1),
                         torch.stack([sin * sx * sign, cos * sy, ty], 1)], 1)  # (B, 2, 3): output → input
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    y = (F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False) + 1) / 2
    keep = torch.zeros(b, dtype=torch.bool, device=dev) if keep_color is None else keep_color.to(dev)
    on, s = (u(0, 1) < color_p) & ~keep, color_strength
    bright, contrast, sat = (torch.where(on, u(1 - s, 1 + s), 1.0) for _ in range(3))
    phi = torch.where(on, u(-math.pi, math.pi), 0.0) if hue else torch.zeros(b, device=dev)
    # per-image colour matrix: hue rotation about the grey axis k (Rodrigues) @ saturation blend toward luma
    luma, eye = torch.tensor(_LUMA, device=dev), torch.eye(3, device=dev)
    k = torch.full((3,), 3 ** -0.5, device=dev)  # the grey axis
    kx = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev) * 3 ** -0.5  # [k]×: [k]× v = k × v
    c, sn = phi.cos()[:, None, None], phi.sin()[:, None, None]
    rot = c * eye + sn * kx + (1 - c) * torch.outer(k, k)
    satm = sat[:, None, None] * eye + (1 - sat)[:, None, None] * luma.expand(3, 3)
    y = torch.einsum("bij,bjhw->bihw", rot @ satm, y) * bright[:, None, None, None]
    mean = torch.einsum("c,bchw->b", luma, y)[:, None, None, None] / (y.shape[2] * y.shape[3])
    y = ((y - mean) * contrast[:, None, None, None] + mean).clamp(0, 1)
    gray = ((u(0, 1) < gray_p) & ~keep)[:, None, None, None]
    y = torch.where(gray, torch.einsum("c,bchw->bhw", luma, y)[:, None].expand_as(y), y)
    return y * 2 - 1


def paired_renders(n: int, seed: int, n_views: int, base: np.ndarray | None = None) -> np.ndarray:
    """uint8 (n_views, n, 32, 32, 3): view 0 is `generate(n, seed)` (make_splits' train images; pass them as
    `base` to skip re-rendering), views 1… re-render the same shape instances with fresh nuisances."""
    views = [shapes_dataset.generate(n, seed)[0] if base is None else np.asarray(base)]
    for v in range(1, n_views):
        nuisance = int(np.random.SeedSequence([seed, 20_000, v]).generate_state(1)[0])
        views.append(shapes_dataset.generate(n, seed, nuisance_seed=nuisance)[0])
    return np.stack(views)


def renders_tensor(renders) -> Tensor:
    """uint8 (V, N, H, W, 3) or (N, H, W, 3), array or tensor → uint8 (V, N, 3, H, W) tensor."""
    t = renders if isinstance(renders, Tensor) else torch.from_numpy(np.asarray(renders))
    t = t[None] if t.dim() == 4 else t
    ok = t.dtype == torch.uint8 and t.dim() == 5 and t.shape[-1] == 3
    assert ok, f"expected uint8 (V, N, H, W, 3) renders, got {t.dtype} {tuple(t.shape)}"
    return t.permute(0, 1, 4, 2, 3).contiguous()


def batch_images(data: Tensor, view: Tensor, idx: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Renders `view[i]` of instances `idx[i]` of uint8 `data` (V, N, 3, H, W) as float."""
    return u8_to_float(data[view, idx].to(device))  # (B, 3, H, W) in [−1, 1]


def sample_views(data: Tensor, generator: torch.Generator, batch: int, paired_frac: float, aug: dict,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Two augmented views of `batch` random instances of uint8 `data` (V, N, 3, H, W); with probability
    `paired_frac` (and V ≥ 2) the second view is another render of the instance and gets no colour jitter
    or grayscale (its colours already differ; the first view gets `aug` in full). Returns (x1, x2, paired)."""
    n_views, n = data.shape[:2]
    idx = torch.randint(n, (batch,), generator=generator)
    v1 = torch.randint(n_views, (batch,), generator=generator)
    paired = (torch.rand(batch, generator=generator) < paired_frac) & (n_views > 1)
    shift = torch.randint(1, max(n_views, 2), (batch,), generator=generator)  # another render, never the same
    v2 = torch.where(paired, (v1 + shift) % n_views, v1)
    x1 = augment(batch_images(data, v1, idx, device), generator, **aug)
    x2 = augment(batch_images(data, v2, idx, device), generator, **aug, keep_color=paired)
    return x1, x2, paired
