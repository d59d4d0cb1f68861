import math

import pytest
import torch

from dmvae_lib.core import flow, toy2d


def test_s_shape_deterministic_and_bounded():
    a = toy2d.s_shape(4000, torch.Generator().manual_seed(0))
    b = toy2d.s_shape(4000, torch.Generator().manual_seed(0))
    c = toy2d.s_shape(4000, torch.Generator().manual_seed(1))
    assert a.shape == (4000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0
    assert a.mean(0).abs().max() < 0.05
    assert 0.3 < a.std(0).min() and a.std(0).max() < 0.8  # an extended shape, not a blob or a square


def test_s_shape_is_an_s():
    # the skeleton is x = A sin(pi u), y = -(V u - K sin 2 pi u): x and y are anti-correlated in the middle
    # band
    pts = toy2d.s_shape(4000, torch.Generator().manual_seed(0))
    x, y = pts[:, 0], pts[:, 1]
    mid = y.abs() < 0.3
    assert torch.corrcoef(torch.stack([x[mid], y[mid]]))[0, 1] < -0.5
    # the top-right corner of the box stays (almost) empty
    assert ((x > 0.6) & (y > 0.6)).float().mean() < 0.02


def test_ring_of_gaussians():
    means, var, w = toy2d.ring_of_gaussians(k=6, radius=2.0, std=0.1)
    assert means.shape == (6, 2) and var.shape == (6,) and w.shape == (6,)
    assert torch.allclose(means.norm(dim=1), torch.full((6,), 2.0))
    assert torch.allclose(var, torch.full((6,), 0.01)) and w.sum().item() == pytest.approx(1.0)


def test_gmm_sampler_reproduces_components():
    means = torch.tensor([[-3.0, 0.0], [2.0, 1.0], [0.0, 4.0]])
    variances = torch.tensor([0.04, 0.09, 0.01])
    weights = torch.tensor([0.2, 0.5, 0.3])
    sample = toy2d.gmm_sampler(means, variances, weights)
    x = sample(20000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2)
    assert torch.equal(x, sample(20000, generator=torch.Generator().manual_seed(0)))
    k = torch.cdist(x, means).argmin(1)
    for j in range(3):
        sel = x[k == j]
        assert (k == j).float().mean().item() == pytest.approx(weights[j].item(), abs=0.02)
        assert torch.allclose(sel.mean(0), means[j], atol=0.02)
        assert sel.var(0).mean().item() == pytest.approx(variances[j].item(), rel=0.1)


def test_uniform_square_and_draw():
    x = toy2d.uniform_square(5000, half_width=0.5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5000, 2) and x.abs().max() <= 0.5 and x.abs().max() > 0.49
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for name, sampler in toy2d.REFERENCES.items():
        a, b = toy2d.draw(sampler, 64, g1), toy2d.draw(sampler, 64, g2)
        assert a.shape == (64, 2) and torch.equal(a, b), name
    z = toy2d.draw(lambda n: torch.zeros(n, 2), 5, torch.Generator().manual_seed(0))
    assert torch.equal(z, torch.zeros(5, 2))


def test_gmm_velocity_single_component_is_gaussian():
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([0.7, -1.2, 0.3])
    v_gmm = toy2d.gmm_velocity(m[None], torch.tensor([0.4]), torch.tensor([1.0]))
    v_g = toy2d.gaussian_velocity(m, 0.4)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64) * 2
    t = torch.rand(16, generator=g, dtype=torch.float64)
    assert torch.allclose(v_gmm(x, t), v_g(x, t), atol=1e-10)


def _gmm_log_density(x, t, means, variances, weights):
    """log p_t(x) of the mixture of N(t m_k, (t^2 s_k^2 + (1-t)^2) I), written independently."""
    tt = t[:, None]
    comps = []
    for m, s2, w in zip(means, variances, weights):
        var = tt**2 * s2 + (1 - tt) ** 2  # (B, 1)
        d = x.shape[1]
        lp = -0.5 * ((x - tt * m) ** 2).sum(1, keepdim=True) / var - 0.5 * d * torch.log(2 * math.pi * var)
        comps.append(lp[:, 0] + math.log(w))
    return torch.logsumexp(torch.stack(comps, 1), 1)


def test_gmm_velocity_matches_autograd_score_of_mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-1.0, 0.5, 0.0], [1.5, -0.5, 1.0]], dtype=torch.float64)
    variances = torch.tensor([0.2, 0.6], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x = (torch.randn(32, 3, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.85 + 0.1
    score = torch.autograd.grad(_gmm_log_density(x, t, means, variances, weights).sum(), x)[0]
    v = toy2d.gmm_velocity(means, variances, weights)(x.detach(), t)
    assert torch.allclose(flow.score_from_velocity(x.detach(), t, v), score, atol=1e-8)


def test_gmm_velocity_dominant_component():
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    variances = torch.tensor([0.05, 0.05])
    v = toy2d.gmm_velocity(means, variances, torch.tensor([0.5, 0.5]))
    t = torch.full((4,), 0.8)
    x = t[:, None] * means[1] + 0.05 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(v(x, t), toy2d.gaussian_velocity(means[1], 0.05)(x, t), atol=1e-4)
    # at t = 0 nothing is known about the component: v = E[data] - x = weighted mean - x
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    v_w = toy2d.gmm_velocity(means, variances, torch.tensor([0.25, 0.75]))
    assert torch.allclose(v_w(x0, torch.zeros(4)), torch.tensor([1.0, 0.0]) - x0, atol=1e-6)


def test_grid_and_corner_probes():
    g = toy2d.grid(7, half_width=2.0)
    assert g.shape == (49, 2)
    assert torch.allclose(g.min(0).values, torch.tensor([-2.0, -2.0]))
    assert torch.allclose(g.max(0).values, torch.tensor([2.0, 2.0]))
    assert torch.unique(g, dim=0).shape[0] == 49
    p = toy2d.corner_probes()
    assert p.shape == (12, 2)
    assert torch.equal(p[6:], -p[:6]) and (p[:6] < 0).all()
    assert torch.allclose(toy2d.corner_probes(3.0), 2 * p)
