"""Samplers for the linear flow path (t = 0 noise → t = 1 data) and classifier-free guidance.

ODE (probability-flow):  dx/dt = v(x, t)                                  — `euler_ode`
SDE (Euler–Maruyama):    dx = [v + w(t)·score(x, t)] dt + sqrt(2·w(t)) dW   — `euler_maruyama`
    with the "sigma" diffusion w(t) = norm·(1 − t) of SiT/LightningDiT. Using score = (t·v − x)/(1 − t)
    the drift is v + norm·(t·v − x) (no division, so no singularity at t = 1). Integration stops at
    t = 1 − last_step and takes one deterministic "mean" step of size last_step to t = 1
    (250 steps, norm 1, last_step 0.04 in the DMVAE evaluation).

Classifier-free guidance (all channels, not the legacy first-3-channels DiT variant):
    v_guided = v_null + s·(v_cond − v_null)
computed with ONE forward on the concatenated [cond; null] batch (`cfg_velocity`), optionally only inside
a t-interval (guidance interval, Kynkäänniemi et al. 2024).

Every sampler takes a `torch.Generator` for its noise; none touches the global RNG.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .flow import VelocityFn, shift_t


def cfg_velocity(
    net: VelocityFn,
    x_t: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    scale: float,
    null_label: int,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Guided velocity v_null + scale·(v_cond − v_null), cond and null batched into one forward.

    Outside `interval` (per-sample t) the conditional velocity is returned unguided. scale = 1 skips the
    null pass entirely.
    """
    if scale == 1.0:
        return net(x_t, t, y)
    v = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    v_cond, v_null = v.chunk(2)
    guided = v_null + scale * (v_cond - v_null)
    inside = ((t >= interval[0]) & (t <= interval[1])).reshape(-1, *([1] * (x_t.dim() - 1)))
    return torch.where(inside, guided, v_cond)


def guided(
    net: VelocityFn, scale: float, null_label: int, interval: tuple[float, float] = (0.0, 1.0)
) -> VelocityFn:
    """Wrap `net` into a velocity callable that applies CFG whenever y is given."""

    def velocity(x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if y is None:
            return net(x_t, t, None)
        return cfg_velocity(net, x_t, t, y, scale=scale, null_label=null_label, interval=interval)

    return velocity


def _time_grid(steps: int, t_end: float, shift: float, device: torch.device) -> Tensor:
    return shift_t(torch.linspace(0.0, t_end, steps + 1, device=device), shift)


@torch.no_grad()
def euler_ode(
    velocity: VelocityFn,
    noise: Tensor,
    steps: int,
    *,
    y: Optional[Tensor] = None,
    shift: float = 1.0,
    progress: Optional[Callable] = None,
    on_step: Optional[Callable[[int, Tensor, Tensor, Tensor], None]] = None,
) -> Tensor:
    """Integrate dx/dt = v from t=0 (noise) to t=1 with `steps` Euler steps. Returns data samples.

    `on_step(i, t, x_t, v)` sees every step before it is taken (e.g. to record x̂ = x_t + (1 − t)·v)."""
    x = noise
    grid = _time_grid(steps, 1.0, shift, noise.device)
    rng = range(steps) if progress is None else progress(range(steps))
    for i in rng:
        t = grid[i].expand(x.shape[0])
        v = velocity(x, t, y)
        if on_step is not None:
            on_step(i, t, x, v)
        x = x + (grid[i + 1] - grid[i]) * v
    return x


@torch.no_grad()
def euler_maruyama(
    velocity: VelocityFn,
    noise: Tensor,
    steps: int,
    *,
    y: Optional[Tensor] = None,
    diffusion_norm: float = 1.0,
    last_step: float = 0.04,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable] = None,
) -> Tensor:
    """Euler–Maruyama on the SDE above: steps−1 stochastic steps to 1 − last_step, then a mean step.

    The total number of network evaluations is `steps`.
    """
    if not 0.0 < last_step < 1.0 or steps < 2:
        raise ValueError(f"need steps >= 2 and 0 < last_step < 1, got steps={steps}, last_step={last_step}")
    x = noise
    grid = torch.linspace(0.0, 1.0 - last_step, steps, device=noise.device)
    rng = range(steps - 1) if progress is None else progress(range(steps - 1))
    for i in rng:
        t, dt = grid[i], grid[i + 1] - grid[i]
        v = velocity(x, t.expand(x.shape[0]), y)
        w = diffusion_norm * (1 - t)
        drift = v + diffusion_norm * (t * v - x)
        dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * dt.sqrt()
        x = x + drift * dt + (2 * w).sqrt() * dw
    t = grid[-1]
    v = velocity(x, t.expand(x.shape[0]), y)
    return x + (v + diffusion_norm * (t * v - x)) * last_step
