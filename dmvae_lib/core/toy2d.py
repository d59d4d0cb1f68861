"""2-D toy distributions, probe grids, and closed-form velocities of Gaussians (test oracles).

Reference samplers are callables `n -> (n, 2)`; those here also take `generator=` so they never touch the
global RNG.

S-shape (the paper's Fig. 3 target; parameters of the authors' `SShapeDistribution2D`): u ~ U(−1, 1),
skeleton (A·sin πu, V·u − K·sin 2πu) with A = V = 0.85, K = 0.15; a per-point offset N(0, 0.06²) along the
unit normal; isotropic noise of std 0.03·(0.4 + 0.6|u|); y flipped; both coordinates clipped to [−1, 1].

Closed-form velocity for Gaussian-mixture data under x_t = t·data + (1 − t)·noise: each isotropic
component N(m_k, s_k² I) makes x_t ~ N(t·m_k, (t²s_k² + (1 − t)²) I), and within it
    E[data | x_t]  = m_k + t·s_k²·(x_t − t·m_k) / (t²s_k² + (1 − t)²)
    E[noise | x_t] = (1 − t)·(x_t − t·m_k) / (t²s_k² + (1 − t)²)
The exact velocity is the responsibility-weighted sum of E[data − noise | x_t, k].
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

Sampler = Callable[..., Tensor]


def s_shape(
    n: int,
    generator: Optional[torch.Generator] = None,
    *,
    thickness: float = 0.06,
    edge_noise: float = 0.03,
    amplitude: float = 0.85,
    vertical_scale: float = 0.85,
    skew: float = 0.15,
) -> Tensor:
    """n points of the S-shape, (n, 2), float32 in [−1, 1]²."""
    u = torch.rand(n, generator=generator) * 2 - 1
    x = amplitude * torch.sin(math.pi * u)
    y = vertical_scale * u - skew * torch.sin(2 * math.pi * u)
    tangent = torch.stack([amplitude * math.pi * torch.cos(math.pi * u),
                           vertical_scale - 2 * math.pi * skew * torch.cos(2 * math.pi * u)], dim=1)
    tangent = tangent / (tangent.norm(dim=1, keepdim=True) + 1e-8)
    normal = torch.stack([-tangent[:, 1], tangent[:, 0]], dim=1)
    pts = torch.stack([x, y], dim=1) + thickness * torch.randn(n, 1, generator=generator) * normal
    pts = pts + edge_noise * (0.4 + 0.6 * u.abs())[:, None] * torch.randn(n, 2, generator=generator)
    pts[:, 1] = -pts[:, 1]
    return pts.clamp(-1.0, 1.0)


def ring_of_gaussians(k: int = 8, radius: float = 1.0, std: float = 0.08) -> tuple[Tensor, Tensor, Tensor]:
    """Means (k, 2), variances (k,), weights (k,) of k equal Gaussians on a circle."""
    angle = torch.arange(k) * 2 * math.pi / k
    means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return means, torch.full((k,), std**2), torch.full((k,), 1.0 / k)


def gmm_sampler(means: Tensor, variances: Tensor, weights: Tensor) -> Sampler:
    """A sampler `n -> (n, D)` for an isotropic Gaussian mixture."""

    def sample(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, means.shape[1], generator=generator)
        return means[k] + variances[k].sqrt()[:, None] * eps

    return sample


def uniform_square(n: int, half_width: float = 1.5, generator: Optional[torch.Generator] = None) -> Tensor:
    """n points i.i.d. U[−half_width, half_width]² (the toy's initial latents)."""
    return (torch.rand(n, 2, generator=generator) * 2 - 1) * half_width


REFERENCES: dict[str, Sampler] = {
    "s_shape": s_shape,
    "gmm8": gmm_sampler(*ring_of_gaussians()),
}


def draw(sampler: Sampler, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Call a reference sampler, passing the generator only to samplers that accept one."""
    try:
        return sampler(n, generator=generator)
    except TypeError:
        return sampler(n)


# ---------------------------------------------------------------------------------------------------
# Closed-form velocities (oracles)
# ---------------------------------------------------------------------------------------------------


def gmm_velocity(means: Tensor, variances: Tensor, weights: Tensor) -> Callable[..., Tensor]:
    """Exact velocity v(x_t, t) for data from an isotropic GMM in R^D; x_t of shape (B, D)."""

    def velocity(x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        m, s2 = means.to(x_t), variances.to(x_t)
        tt = t.to(x_t).reshape(-1, 1, 1)
        var_t = tt**2 * s2[None, :, None] + (1 - tt) ** 2  # (B, K, 1)
        centred = x_t[:, None, :] - tt * m[None]  # (B, K, D)
        log_p = -0.5 * (centred**2 / var_t).sum(-1) - 0.5 * x_t.shape[1] * var_t[..., 0].log()
        resp = torch.softmax(log_p + weights.to(x_t).log()[None], dim=1)[..., None]  # (B, K, 1)
        v_k = m[None] + (tt * s2[None, :, None] - (1 - tt)) * centred / var_t
        return (resp * v_k).sum(1)

    return velocity


def gaussian_velocity(mean: float | Tensor, var: float) -> Callable[..., Tensor]:
    """Exact velocity for data N(mean, var·I) of any shape (B, *D); `mean` broadcasts against x_t."""

    def velocity(x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        tt = t.to(x_t).reshape(-1, *([1] * (x_t.dim() - 1)))
        centred = x_t - tt * mean
        return mean + (tt * var - (1 - tt)) * centred / (tt**2 * var + (1 - tt) ** 2)

    return velocity


# ---------------------------------------------------------------------------------------------------
# Probe points for direction fields (paper App. B, Fig. 7)
# ---------------------------------------------------------------------------------------------------


def grid(n: int = 15, half_width: float = 1.5) -> Tensor:
    """An n×n grid of points over [−half_width, half_width]², (n², 2)."""
    axis = torch.linspace(-half_width, half_width, n)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def corner_probes(half_width: float = 1.5) -> Tensor:
    """The authors' 6 lower-left "triangle" probes and their point reflections (12, 2)."""
    base: Sequence[tuple[float, float]] = [(-1, -1), (-0.75, -1), (-0.5, -1), (-1, -0.75), (-1, -0.5),
                                           (-0.75, -0.75)]
    lower = torch.tensor(base) * (half_width / 1.5)
    return torch.cat([lower, -lower])
