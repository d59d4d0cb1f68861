"""Distribution-matching objectives: DMVAE's DM loss and the alternatives of the paper's toy study.

Every objective has one signature,

    objective(latents, real_net, fake_net, t, noise, y=None) -> (loss, ObjectiveStats)

where `latents` (B, *D) carry the gradient, the nets are plain velocity callables `net(x_t, t, y) -> v`
(frozen by the caller: their parameters get no gradient here), and t (B,), noise (B, *D) are drawn by the
caller. x_t = t·latents + (1 − t)·noise (t = 1 data; see `flow.py`); ∂x_t/∂latents = t. N = latents.numel().
`sg` is stop-gradient. x̂ = x_t + (1 − t)·v is a data prediction, s = (t·v − x_t)/(1 − t) a score.

DM (paper Eq. 9, DMD of Yin et al. 2024): per-sample direction
    g = (x̂_fake − x̂_real) / w,     w = mean_flat |latents − x̂_real|     (DMD normalisation)
through the surrogate L = ½·mean((latents − sg(latents − g))²), so ∂L/∂latents = g / N exactly and a
descent step moves latents toward the real denoiser and away from the fake one. With the linear path
x̂_real − x̂_fake = ((1 − t)²/t)·(s_real − s_fake): the score difference of Eq. 9, weighted by σ²/α.

The alternatives (paper §3.3, Fig. 3; names of the reference code in brackets):
  real-score maximisation [loss_teacher1/2/3]: minimise the real net's flow-matching loss on latents,
      gradient through the net's input only / through the target only / both;
  fake-score maximisation [loss_student1/2/3]: the same with the fake net (self-reinforcing);
  score-difference minimisation [score_teacher_student1/2/3]: mean((v_real − v_fake)²), gradient through
      the fake's input / the real's input / both;
  loss-difference minimisation [loss_teacher_student1]: FM_real − FM_fake, through both nets' inputs;
  score-ascent surrogates [score_teacher, score_student, score_student_minus]: ∂L/∂latents = −s_real/N,
      −s_fake/N, +s_fake/N.

Non-finite values are never zeroed: they are counted in `ObjectiveStats.nonfinite` and the caller decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .flow import VelocityFn, interpolate, mean_flat, predict_data, score_from_velocity, velocity_target


class ObjectiveStats(NamedTuple):
    """0-dim tensors on the latents' device: a training step never waits to read them (`float()` to see)."""

    nonfinite: Tensor  # int64: non-finite entries in the direction (surrogates) or the elementwise loss terms
    direction_norm: Tensor  # mean per-sample L2 norm of the update direction (surrogates); nan otherwise


def _count(x: Tensor) -> Tensor:
    return (~torch.isfinite(x)).sum()


def _surrogate(latents: Tensor, direction: Tensor) -> tuple[Tensor, ObjectiveStats]:
    """L = ½·mean((latents − sg(latents − direction))²): gradient direction/N, value ½·mean(direction²)."""
    # DMD2's trick: the loss is a square whose stopped target sits `direction` away, so autograd
    # delivers exactly `direction / N` to the latents without backpropagating through any net.
    loss = 0.5 * ((latents - (latents - direction).detach()) ** 2).mean()
    norm = direction.reshape(direction.shape[0], -1).float().norm(dim=1).mean()
    return loss, ObjectiveStats(_count(direction), norm.detach())


def _direct(loss_terms: Tensor) -> tuple[Tensor, ObjectiveStats]:
    terms = loss_terms.detach()
    nan = terms.new_full((), float("nan"), dtype=torch.float32)
    return loss_terms.mean(), ObjectiveStats(_count(terms), nan)


# ---------------------------------------------------------------------------------------------------
# DM (ours)
# ---------------------------------------------------------------------------------------------------


def dm_direction(latents: Tensor, x_t: Tensor, t: Tensor, v_real: Tensor, v_fake: Tensor,
                 normalize: bool = True) -> Tensor:
    """g = (x̂_fake − x̂_real) / mean_flat|latents − x̂_real| (no normalisation when normalize=False)."""
    data_real, data_fake = predict_data(x_t, t, v_real), predict_data(x_t, t, v_fake)
    g = data_fake - data_real
    if normalize:
        w = mean_flat((latents - data_real).abs()).reshape(-1, *([1] * (latents.dim() - 1)))
        g = g / w
    return g


def dm(latents, real_net, fake_net, t, noise, y=None):
    """DMVAE's DM loss (Eq. 9): gradient = g/N on latents only (surrogate), nets never differentiated."""
    with torch.no_grad():
        x_t = interpolate(latents, noise, t)
        g = dm_direction(latents, x_t, t, real_net(x_t, t, y), fake_net(x_t, t, y))
    return _surrogate(latents, g)


def dm_unnormalized(latents, real_net, fake_net, t, noise, y=None):
    """DM without the per-sample normalisation (what the reference toy does): gradient (x̂_F − x̂_R)/N."""
    with torch.no_grad():
        x_t = interpolate(latents, noise, t)
        g = dm_direction(latents, x_t, t, real_net(x_t, t, y), fake_net(x_t, t, y), normalize=False)
    return _surrogate(latents, g)


# ---------------------------------------------------------------------------------------------------
# Flow-matching-loss minimisation on one net (real-score / fake-score maximisation)
# ---------------------------------------------------------------------------------------------------


def _fm_through_input(net, latents, t, noise, y):
    """½·(v(x_t) − sg(target))²: gradient only through the net's input x_t (a Jacobian path)."""
    x_t = interpolate(latents, noise, t)
    return _direct(0.5 * (net(x_t, t, y) - velocity_target(latents, noise).detach()) ** 2)


def _fm_through_target(net, latents, t, noise, y):
    """½·(target − sg(v(sg x_t)))²: gradient only through target = latents − noise: (x − x̂)/((1−t)N)."""
    with torch.no_grad():
        v = net(interpolate(latents, noise, t), t, y)
    return _direct(0.5 * (velocity_target(latents, noise) - v) ** 2)


def _fm_through_both(net, latents, t, noise, y):
    """½·(v(x_t) − target)²: gradient through the net's input and the target."""
    x_t = interpolate(latents, noise, t)
    return _direct(0.5 * (net(x_t, t, y) - velocity_target(latents, noise)) ** 2)


def real_fm_input(latents, real_net, fake_net, t, noise, y=None):
    """Real-score maximisation (Fig. 3d): real net's FM loss, gradient through its input x_t only."""
    return _fm_through_input(real_net, latents, t, noise, y)


def real_fm_target(latents, real_net, fake_net, t, noise, y=None):
    """Real-score maximisation (Fig. 3e): real net's FM loss, gradient through the target only."""
    return _fm_through_target(real_net, latents, t, noise, y)


def real_fm_both(latents, real_net, fake_net, t, noise, y=None):
    """Real-score maximisation (Fig. 3f): real net's FM loss, gradient through input and target."""
    return _fm_through_both(real_net, latents, t, noise, y)


def fake_fm_input(latents, real_net, fake_net, t, noise, y=None):
    """Fake-score maximisation (Fig. 3g): fake net's FM loss, gradient through its input x_t only."""
    return _fm_through_input(fake_net, latents, t, noise, y)


def fake_fm_target(latents, real_net, fake_net, t, noise, y=None):
    """Fake-score maximisation (Fig. 3h): fake net's FM loss, gradient through the target only."""
    return _fm_through_target(fake_net, latents, t, noise, y)


def fake_fm_both(latents, real_net, fake_net, t, noise, y=None):
    """Fake-score maximisation (Fig. 3i): fake net's FM loss, gradient through input and target."""
    return _fm_through_both(fake_net, latents, t, noise, y)


# ---------------------------------------------------------------------------------------------------
# Score-difference and loss-difference minimisation
# ---------------------------------------------------------------------------------------------------


def score_diff_fake_input(latents, real_net, fake_net, t, noise, y=None):
    """(sg(v_real(sg x_t)) − v_fake(x_t))²: gradient through the fake net's input only."""
    x_t = interpolate(latents, noise, t)
    with torch.no_grad():
        v_real = real_net(x_t, t, y)
    return _direct((v_real - fake_net(x_t, t, y)) ** 2)


def score_diff_real_input(latents, real_net, fake_net, t, noise, y=None):
    """(v_real(x_t) − sg(v_fake(sg x_t)))²: gradient through the real net's input only."""
    x_t = interpolate(latents, noise, t)
    with torch.no_grad():
        v_fake = fake_net(x_t, t, y)
    return _direct((real_net(x_t, t, y) - v_fake) ** 2)


def score_diff_both(latents, real_net, fake_net, t, noise, y=None):
    """(v_real(x_t) − v_fake(x_t))²: gradient through both nets' inputs."""
    x_t = interpolate(latents, noise, t)
    return _direct((real_net(x_t, t, y) - fake_net(x_t, t, y)) ** 2)


def loss_diff(latents, real_net, fake_net, t, noise, y=None):
    """½(v_real(x_t) − sg target)² − ½(v_fake(x_t) − sg target)²: through both nets' inputs."""
    x_t = interpolate(latents, noise, t)
    target = velocity_target(latents, noise).detach()
    return _direct(0.5 * (real_net(x_t, t, y) - target) ** 2 - 0.5 * (fake_net(x_t, t, y) - target) ** 2)


# ---------------------------------------------------------------------------------------------------
# Score-ascent surrogates
# ---------------------------------------------------------------------------------------------------


def _score(net, latents, t, noise, y):
    with torch.no_grad():
        x_t = interpolate(latents, noise, t)
        return score_from_velocity(x_t, t, net(x_t, t, y))


def real_score_ascent(latents, real_net, fake_net, t, noise, y=None):
    """Surrogate with gradient −s_real/N: descent climbs the real score ("flow prior", mode-seeking)."""
    return _surrogate(latents, -_score(real_net, latents, t, noise, y))


def fake_score_ascent(latents, real_net, fake_net, t, noise, y=None):
    """Surrogate with gradient −s_fake/N: descent climbs the fake score (self-reinforcing contraction)."""
    return _surrogate(latents, -_score(fake_net, latents, t, noise, y))


def fake_score_descent(latents, real_net, fake_net, t, noise, y=None):
    """Surrogate with gradient +s_fake/N: descent follows −s_fake (the repulsion/entropy half of DM)."""
    return _surrogate(latents, _score(fake_net, latents, t, noise, y))


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

Objective = Callable[..., tuple[Tensor, ObjectiveStats]]


@dataclass(frozen=True)
class ObjectiveInfo:
    fn: Objective
    family: str  # the paper's grouping (Fig. 3)
    panel: str  # Fig. 3 panel, "" when the paper shows none
    gradient: str  # where the gradient reaches the latents
    uses_fake: bool  # False: the fake net is never evaluated, so it need not be trained
    reference_name: str  # the name in the authors' code


OBJECTIVES: dict[str, ObjectiveInfo] = {
    "dm": ObjectiveInfo(dm, "distribution matching", "b", "surrogate: (x̂_fake − x̂_real)/w, no net Jacobian",
                        True, "dmd (+ImageNet normalisation)"),
    "dm_unnormalized": ObjectiveInfo(dm_unnormalized, "distribution matching", "",
                                     "surrogate: x̂_fake − x̂_real", True, "dmd (toy)"),
    "real_fm_input": ObjectiveInfo(real_fm_input, "real-score maximisation", "d", "real net input (Jacobian)",
                                   False, "loss_teacher1"),
    "real_fm_target": ObjectiveInfo(real_fm_target, "real-score maximisation", "e", "FM target only", False,
                                    "loss_teacher2"),
    "real_fm_both": ObjectiveInfo(real_fm_both, "real-score maximisation", "f", "real net input + target",
                                  False, "loss_teacher3"),
    "fake_fm_input": ObjectiveInfo(fake_fm_input, "fake-score maximisation", "g", "fake net input (Jacobian)",
                                   True, "loss_student1"),
    "fake_fm_target": ObjectiveInfo(fake_fm_target, "fake-score maximisation", "h", "FM target only", True,
                                    "loss_student2"),
    "fake_fm_both": ObjectiveInfo(fake_fm_both, "fake-score maximisation", "i", "fake net input + target",
                                  True, "loss_student3"),
    "score_diff_fake_input": ObjectiveInfo(score_diff_fake_input, "score-difference minimisation", "j",
                                           "fake net input (Jacobian)", True, "score_teacher_student1"),
    "score_diff_real_input": ObjectiveInfo(score_diff_real_input, "score-difference minimisation", "k",
                                           "real net input (Jacobian)", True, "score_teacher_student2"),
    "score_diff_both": ObjectiveInfo(score_diff_both, "score-difference minimisation", "l",
                                     "both nets' inputs", True, "score_teacher_student3"),
    "loss_diff": ObjectiveInfo(loss_diff, "loss-difference minimisation", "", "both nets' inputs", True,
                               "loss_teacher_student1"),
    "real_score_ascent": ObjectiveInfo(real_score_ascent, "score ascent", "", "surrogate: −s_real", False,
                                       "score_teacher"),
    "fake_score_ascent": ObjectiveInfo(fake_score_ascent, "score ascent", "", "surrogate: −s_fake", True,
                                       "score_student"),
    "fake_score_descent": ObjectiveInfo(fake_score_descent, "score ascent", "", "surrogate: +s_fake", True,
                                        "score_student_minus"),
}


def get_objective(name: str) -> ObjectiveInfo:
    """Look up an objective by name; unknown names raise with the list of known ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None


def update_direction(objective: Objective, latents: Tensor, real_net: VelocityFn, fake_net: VelocityFn,
                     t: float, draws: int, generator: Optional[torch.Generator] = None,
                     y: Optional[Tensor] = None) -> Tensor:
    """The per-sample update direction −N·∂L/∂latents at a fixed t, averaged over `draws` noise draws.

    This is what a descent step moves each latent along (paper App. B, Fig. 7); latents (P, *D) -> (P, *D).
    Only the latents are differentiated (`autograd.grad`), so net parameters accumulate no gradient.
    """
    x = latents.detach().repeat_interleave(draws, dim=0).requires_grad_(True)
    t_vec = torch.full((x.shape[0],), float(t), device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    yy = None if y is None else y.repeat_interleave(draws, dim=0)
    loss, _ = objective(x, real_net, fake_net, t_vec, noise, yy)
    (grad,) = torch.autograd.grad(loss, x)
    return -(grad * x.numel()).reshape(latents.shape[0], draws, *latents.shape[1:]).mean(dim=1)
