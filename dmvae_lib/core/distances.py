"""Sample-based distances between point sets (N, D): sliced Wasserstein-2, coverage, spread.

sliced_w2(a, b) = sqrt( E_θ W2²(θ·a, θ·b) ), θ uniform on the unit sphere, each 1-D W2 computed from
sorted projections (quantiles are interpolated when the sets differ in size). Two independent samples of
the same distribution are not at distance 0: `noise_floor` measures that floor for a reference sampler,
so a distance can be read as a multiple of it.

coverage(reference, samples, k) (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics"): the
fraction of reference points whose k-NN ball (radius = distance to the k-th nearest other reference point)
contains at least one sample. Mode dropping lowers it; a perfect fit gives about 1 − (1 − 1/(k+1))^… ≈ 0.95+.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def random_directions(n: int, dim: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """n unit vectors uniform on the sphere in R^dim, (n, dim)."""
    d = torch.randn(n, dim, generator=generator)
    return d / d.norm(dim=1, keepdim=True)


def _quantiles(x: Tensor, m: int) -> Tensor:
    """Sorted columns of x (N, P) resampled to m quantile levels, (m, P)."""
    xs = x.sort(dim=0).values
    if xs.shape[0] == m:
        return xs
    pos = (torch.arange(m, dtype=x.dtype) + 0.5) / m * xs.shape[0] - 0.5
    lo = pos.floor().clamp(0, xs.shape[0] - 1).long()
    hi = (lo + 1).clamp(max=xs.shape[0] - 1)
    w = (pos - lo.to(x.dtype)).clamp(0, 1)[:, None]
    return xs[lo] * (1 - w) + xs[hi] * w


def sliced_w2(a: Tensor, b: Tensor, n_directions: int = 256,
              generator: Optional[torch.Generator] = None) -> float:
    """Sliced Wasserstein-2 distance between point sets a (N, D) and b (M, D)."""
    a, b = a.detach().float().cpu().reshape(a.shape[0], -1), b.detach().float().cpu().reshape(b.shape[0], -1)
    dirs = random_directions(n_directions, a.shape[1], generator)
    m = max(a.shape[0], b.shape[0])
    qa, qb = _quantiles(a @ dirs.T, m), _quantiles(b @ dirs.T, m)
    return float(((qa - qb) ** 2).mean().sqrt())


def noise_floor(
    sampler: Callable[[int, torch.Generator], Tensor], n: int, repeats: int = 10, n_directions: int = 256,
    seed: int = 0
) -> float:
    """Median sliced-W2 between pairs of independent n-point samples of one distribution."""
    g = torch.Generator().manual_seed(seed)
    vals = [sliced_w2(sampler(n, g), sampler(n, g), n_directions, g) for _ in range(repeats)]
    return float(torch.tensor(vals).median())


def mean_sliced_w2(
    points: Tensor, sampler: Callable[[int, torch.Generator], Tensor], repeats: int = 10,
    n_directions: int = 256, seed: int = 1
) -> float:
    """Mean sliced-W2 from `points` to `repeats` fresh samples of the same size (lower variance)."""
    g = torch.Generator().manual_seed(seed)
    vals = [sliced_w2(points, sampler(points.shape[0], g), n_directions, g) for _ in range(repeats)]
    return float(torch.tensor(vals).mean())


def coverage(reference: Tensor, samples: Tensor, k: int = 5) -> float:
    """Fraction of reference points with a sample inside their k-NN ball (Naeem et al. 2020)."""
    reference, samples = reference.detach().float().cpu(), samples.detach().float().cpu()
    radius = torch.cdist(reference, reference).kthvalue(k + 1, dim=1).values  # +1 skips the point itself
    nearest = torch.cdist(reference, samples).min(dim=1).values
    return float((nearest <= radius).float().mean())


def spread(points: Tensor) -> float:
    """Mean per-axis standard deviation of a point set (N, D)."""
    return float(points.detach().float().std(dim=0).mean())
