"""The linear (rectified-flow) probability path used by every DMVAE score net.

Time runs from noise to data (paper §3.2, Eq. 5; the convention of LightningDiT's `ICPlan` and of the
DMVAE reference code):

    x_t = t · data + (1 − t) · noise,        t ∈ [0, 1],  t = 0 pure noise,  t = 1 data
    v*(x_t, t) = E[data − noise | x_t]        (velocity target: data − noise)
    data_hat   = x_t + (1 − t) · v            (data prediction, "denoiser")
    noise_hat  = x_t − t · v
    score      = ∇ log p_t(x_t) = (t · v − x_t) / (1 − t) = −noise_hat / (1 − t)

The score is singular at t = 1 (the data end); callers that need it clamp t away from 1.

Timestep sampling: uniform on [t_min, t_max], optionally warped by the SD3-style shift (noise level
σ = 1 − t ↦ s·σ / (1 + (s − 1)·σ); s > 1 spends more time at high noise), or logit-normal. An annealing
schedule moves the lower bound of the range toward the low-noise (high-t) end over training (paper Tab. 2).

Reductions run over all non-batch dimensions (`mean_flat`), so the same code serves (B, 2) points and
(B, C, H, W) latents.

Reference: Ye et al., "Distribution Matching Variational AutoEncoder", arXiv 2512.07778.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

VelocityFn = Callable[..., Tensor]  # net(x_t, t, y=None) -> v, same shape as x_t


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the first (batch): (B, *D) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def expand_t(t: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample times (B,) to broadcast against `like` (B, *D)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(data: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t·data + (1 − t)·noise, with t of shape (B,)."""
    tt = expand_t(t, data)
    return tt * data + (1 - tt) * noise


def velocity_target(data: Tensor, noise: Tensor) -> Tensor:
    """The conditional velocity d x_t / dt = data − noise."""
    return data - noise


def predict_data(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Data prediction x̂ = x_t + (1 − t)·v (exact when v is the true conditional-mean velocity)."""
    return x_t + (1 - expand_t(t, x_t)) * v


def predict_noise(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Noise prediction ε̂ = x_t − t·v."""
    return x_t - expand_t(t, x_t) * v


def score_from_velocity(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Score ∇ log p_t(x_t) = (t·v − x_t)/(1 − t). Singular at t = 1: clamp t before calling."""
    tt = expand_t(t, x_t)
    return (tt * v - x_t) / (1 - tt)


def shift_t(t: Tensor, shift: float) -> Tensor:
    """SD3-style shift of the noise level σ = 1 − t: σ ↦ s·σ/(1 + (s − 1)·σ). shift = 1 is the identity."""
    if shift == 1.0:
        return t
    sigma = 1 - t
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


def sample_t(
    n: int,
    *,
    t_min: float = 0.0,
    t_max: float = 1.0,
    shift: float = 1.0,
    logit_normal: Optional[tuple[float, float]] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw n times in [t_min, t_max] (float32, always; never the model's autocast dtype).

    Args:
        logit_normal: (mean, std) to draw u = sigmoid(N(mean, std²)) instead of U[0, 1].
        shift: SD3-style shift applied to u before it is mapped onto [t_min, t_max].
    """
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if logit_normal is None:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    else:
        mean, std = logit_normal
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device,
                                                   dtype=torch.float32))
    u = shift_t(u, shift)
    return t_min + (t_max - t_min) * u


def annealed_t_range(
    step: int, total_steps: int, start: tuple[float, float], end: tuple[float, float]
) -> tuple[float, float]:
    """Linearly move the timestep range from `start` to `end` over `total_steps` (then hold `end`).

    In this t convention the low-noise end is t → 1, so annealing "toward low noise" (paper Tab. 2,
    noise range [0, 1] → [0, 0.5]) reads start=(0, 1), end=(0.5, 1).
    """
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    lo = start[0] + frac * (end[0] - start[0])
    hi = start[1] + frac * (end[1] - start[1])
    return lo, hi


def flow_matching_loss(
    net: VelocityFn, data: Tensor, t: Tensor, noise: Tensor, y: Optional[Tensor] = None
) -> Tensor:
    """Per-sample flow-matching loss mean_flat((net(x_t, t, y) − (data − noise))²), shape (B,)."""
    x_t = interpolate(data, noise, t)
    return mean_flat((net(x_t, t, y) - velocity_target(data, noise)) ** 2)
