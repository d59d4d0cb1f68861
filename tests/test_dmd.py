import math

import pytest
import torch

from dmvae_lib.core import dmd, flow, toy2d
from dmvae_lib.models.score_nets import ToyScoreMLP

SHAPES = [(8, 2), (8, 4, 4, 4)]
NAMES = list(dmd.OBJECTIVES)
SURROGATES = ["dm", "dm_unnormalized", "real_score_ascent", "fake_score_ascent", "fake_score_descent"]
REAL = toy2d.gaussian_velocity(1.5, 0.3)
FAKE = toy2d.gaussian_velocity(-0.5, 0.3)


def _toy_net(seed, requires_grad=False):
    torch.manual_seed(seed)
    net = ToyScoreMLP(dim=2, width=32, depth=1)
    with torch.no_grad():
        net.out.weight.normal_(0, 0.3)  # the zero-initialised head would make every net v = 0
        net.out.bias.normal_(0, 0.3)
    return net.requires_grad_(requires_grad)


def _inputs(shape, gen, t_max=0.999):
    latents = torch.randn(shape, generator=gen).requires_grad_(True)
    noise = torch.randn(shape, generator=gen)
    t = torch.rand(shape[0], generator=gen) * t_max
    return latents, noise, t


def _grad(name, latents, real, fake, t, noise, y=None):
    loss, stats = dmd.OBJECTIVES[name].fn(latents, real, fake, t, noise, y)
    loss.backward()
    return loss, stats, latents.grad


def test_registry_complete():
    assert set(SURROGATES) <= set(NAMES)
    for name, info in dmd.OBJECTIVES.items():
        assert dmd.get_objective(name) is info
        assert callable(info.fn) and info.family and info.reference_name
    assert {n for n, i in dmd.OBJECTIVES.items() if not i.uses_fake} == {
        "real_fm_input", "real_fm_target", "real_fm_both", "real_score_ascent"}


@pytest.mark.parametrize("name", NAMES)
def test_objective_2d_toy_nets(name, gen):
    real, fake = _toy_net(0), _toy_net(1)
    latents, noise, t = _inputs((8, 2), gen)
    loss, stats, grad = _grad(name, latents, real, fake, t, noise)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert isinstance(stats, dmd.ObjectiveStats) and stats.nonfinite == 0
    assert (math.isfinite(stats.direction_norm) and stats.direction_norm > 0) == (name in SURROGATES)
    assert grad is not None and grad.shape == latents.shape and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in [*real.parameters(), *fake.parameters()])


@pytest.mark.parametrize("name", NAMES)
def test_objective_4d_analytic_nets(name, gen):
    # different variances: with equal ones the nets' Jacobians coincide and score_diff_both has zero gradient
    latents, noise, t = _inputs((8, 4, 4, 4), gen)
    loss, stats, grad = _grad(name, latents, REAL, toy2d.gaussian_velocity(-0.5, 0.8), t, noise)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert isinstance(stats, dmd.ObjectiveStats) and stats.nonfinite == 0
    assert grad is not None and grad.shape == latents.shape and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("name", SURROGATES)
def test_surrogates_never_differentiate_nets(name, gen):
    real, fake = _toy_net(0, requires_grad=True), _toy_net(1, requires_grad=True)
    latents, noise, t = _inputs((8, 2), gen)
    _grad(name, latents, real, fake, t, noise)
    assert all(p.grad is None for p in [*real.parameters(), *fake.parameters()])


@pytest.mark.parametrize("name", ["real_fm_input", "fake_fm_input", "score_diff_both", "loss_diff"])
def test_direct_objectives_differentiate_through_unfrozen_nets(name, gen):
    # sanity check that the previous test can fail: Jacobian-path objectives do touch net parameters
    real, fake = _toy_net(0, requires_grad=True), _toy_net(1, requires_grad=True)
    latents, noise, t = _inputs((8, 2), gen)
    _grad(name, latents, real, fake, t, noise)
    assert any(p.grad is not None for p in [*real.parameters(), *fake.parameters()])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_dm_surrogate_gradient(shape, normalize, gen):
    real = lambda x, t, y=None: 0.5 * x + 1.0  # noqa: E731
    fake = lambda x, t, y=None: -x + 0.25  # noqa: E731
    latents, noise, t = _inputs(shape, gen)
    name = "dm" if normalize else "dm_unnormalized"
    loss, stats, grad = _grad(name, latents, real, fake, t, noise)
    x = latents.detach()
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    x_t = tt * x + (1 - tt) * noise
    xr, xf = x_t + (1 - tt) * real(x_t, t), x_t + (1 - tt) * fake(x_t, t)
    g = xf - xr
    if normalize:
        g = g / (x - xr).abs().reshape(shape[0], -1).mean(1).reshape(tt.shape)
    n = x.numel()
    assert torch.allclose(grad, g / n, rtol=1e-4, atol=1e-7)
    lib = dmd.dm_direction(x, x_t, t, real(x_t, t), fake(x_t, t), normalize=normalize)
    assert torch.allclose(grad, lib / n, rtol=1e-4, atol=1e-7)
    assert loss.item() == pytest.approx(0.5 * (g**2).mean().item(), rel=1e-4)
    assert stats.direction_norm == pytest.approx(g.reshape(shape[0], -1).norm(dim=1).mean().item(), rel=1e-4)


@pytest.mark.parametrize("name", ["dm", "dm_unnormalized", "score_diff_fake_input", "score_diff_real_input",
                                  "score_diff_both", "loss_diff"])
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_nets_give_zero_gradient(name, shape, gen):
    net = _toy_net(0) if len(shape) == 2 else REAL
    latents, noise, t = _inputs(shape, gen)
    loss, stats, grad = _grad(name, latents, net, net, t, noise)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("name", ["dm", "dm_unnormalized"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dm_descends_toward_real_gaussian(name, shape, gen):
    latents, noise, t = _inputs(shape, gen, t_max=0.999)
    _, _, grad = _grad(name, latents, REAL, FAKE, t, noise)
    m_diff = torch.full(shape[1:], 1.5 - (-0.5))
    per_sample = (-grad * m_diff).reshape(shape[0], -1).sum(1)
    assert (per_sample > 0).all()


@pytest.mark.parametrize("name", ["dm", "dm_unnormalized"])
@pytest.mark.parametrize("tval", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("shape", SHAPES)
def test_dm_sign_fixed_t(name, tval, shape, gen):
    latents, noise, _ = _inputs(shape, gen)
    t = torch.full((shape[0],), tval)
    _, _, grad = _grad(name, latents, REAL, FAKE, t, noise)
    assert ((-grad * 2.0).reshape(shape[0], -1).sum(1) > 0).all()
    # and the reverse pairing flips the sign
    lat2 = latents.detach().clone().requires_grad_(True)
    _, _, grad2 = _grad(name, lat2, FAKE, REAL, t, noise)
    assert ((-grad2 * 2.0).reshape(shape[0], -1).sum(1) < 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_dm_finite_near_data_end(shape, gen):
    latents, noise, _ = _inputs(shape, gen)
    latents = (latents.detach() * 100).requires_grad_(True)
    t = torch.full((shape[0],), 0.999)
    loss, stats, grad = _grad("dm", latents, REAL, FAKE, t, noise)
    assert torch.isfinite(loss) and stats.nonfinite == 0
    assert math.isfinite(stats.direction_norm) and torch.isfinite(grad).all()


def _nan_real(mask):
    def net(x, t, y=None):
        return torch.where(mask, torch.full_like(x, float("nan")), 0.1 * x)

    return net


@pytest.mark.parametrize("shape", SHAPES)
def test_nonfinite_counted_not_zeroed(shape, gen):
    latents, noise, t = _inputs(shape, gen)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[[0, 5]] = True  # two entries in sample 0
    real = _nan_real(mask)
    loss, stats = dmd.dm(latents, real, FAKE, t, noise)
    assert stats.nonfinite > 0 and not torch.isfinite(loss)
    # without normalisation only the poisoned entries are non-finite
    _, stats = dmd.dm_unnormalized(latents, real, FAKE, t, noise)
    assert stats.nonfinite == 2
    loss, stats = dmd.real_fm_both(latents, real, FAKE, t, noise)
    assert stats.nonfinite == 2 and not torch.isfinite(loss)
    loss, stats = dmd.real_score_ascent(latents, real, FAKE, t, noise)
    assert stats.nonfinite == 2 and not torch.isfinite(loss)


@pytest.mark.parametrize("shape", SHAPES)
def test_score_ascent_gradients(shape, gen):
    latents, noise, t = _inputs(shape, gen, t_max=0.95)
    x_t = flow.interpolate(latents.detach(), noise, t)
    n = latents.numel()
    _, _, grad = _grad("real_score_ascent", latents, REAL, FAKE, t, noise)
    s_real = flow.score_from_velocity(x_t, t, REAL(x_t, t))
    assert torch.allclose(grad, -s_real / n, rtol=1e-4, atol=1e-7)
    s_fake = flow.score_from_velocity(x_t, t, FAKE(x_t, t))
    for name, sign in [("fake_score_ascent", -1), ("fake_score_descent", 1)]:
        lat = latents.detach().clone().requires_grad_(True)
        _, _, grad = _grad(name, lat, REAL, FAKE, t, noise)
        assert torch.allclose(grad, sign * s_fake / n, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_real_fm_target_gradient(shape, gen):
    latents, noise, t = _inputs(shape, gen, t_max=0.95)
    _, _, grad = _grad("real_fm_target", latents, REAL, FAKE, t, noise)
    x = latents.detach()
    x_t = flow.interpolate(x, noise, t)
    x_hat = flow.predict_data(x_t, t, REAL(x_t, t))
    expected = (x - x_hat) / ((1 - flow.expand_t(t, x)) * x.numel())
    assert torch.allclose(grad, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_real_fm_input_gradient_is_jacobian_path(shape, gen):
    # v_real = a*x_t + b: grad = (v - (x - noise)) * a * t / N
    a, b = 0.7, 0.2
    real = lambda x, t, y=None: a * x + b  # noqa: E731
    latents, noise, t = _inputs(shape, gen)
    _, _, grad = _grad("real_fm_input", latents, real, FAKE, t, noise)
    x = latents.detach()
    tt = flow.expand_t(t, x)
    x_t = flow.interpolate(x, noise, t)
    expected = (real(x_t, t) - (x - noise)) * a * tt / x.numel()
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)


def _raising_fake(x, t, y=None):
    raise AssertionError("fake net must not be evaluated")


@pytest.mark.parametrize("name", [n for n, i in dmd.OBJECTIVES.items() if not i.uses_fake])
@pytest.mark.parametrize("shape", SHAPES)
def test_uses_fake_false_never_calls_fake(name, shape, gen):
    latents, noise, t = _inputs(shape, gen)
    loss, _, grad = _grad(name, latents, REAL, _raising_fake, t, noise)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", [n for n, i in dmd.OBJECTIVES.items() if i.uses_fake])
def test_uses_fake_true_does_call_fake(name, gen):
    latents, noise, t = _inputs((8, 2), gen)
    with pytest.raises(AssertionError, match="fake net"):
        dmd.OBJECTIVES[name].fn(latents, REAL, _raising_fake, t, noise)


def test_y_is_forwarded(gen):
    seen = []

    def net(x, t, y=None):
        seen.append(y)
        return 0 * x

    latents, noise, t = _inputs((8, 2), gen)
    y = torch.arange(8)
    for name in NAMES:
        dmd.OBJECTIVES[name].fn(latents, net, net, t, noise, y)
    assert seen and all(s is y for s in seen)


def test_get_objective_unknown():
    with pytest.raises(KeyError) as err:
        dmd.get_objective("nope")
    msg = str(err.value)
    assert "nope" in msg and all(name in msg for name in NAMES)
