import pytest
import torch

from dmvae_lib.core import samplers, toy2d

SHAPES = [(8, 2), (8, 4, 4, 4)]
M, S2 = 1.5, 0.3


def _label_net(calls=None):
    """Velocity that depends only on y (broadcast over x); counts its calls."""

    def net(x, t, y=None):
        if calls is not None:
            calls.append(x.shape[0])
        return x * 0 + y.float().reshape(-1, *([1] * (x.dim() - 1)))

    return net


def test_euler_ode_reaches_gaussian(gen):
    noise = torch.randn(20000, 2, generator=gen)
    x = samplers.euler_ode(toy2d.gaussian_velocity(M, S2), noise, 100)
    assert torch.allclose(x.mean(0), torch.full((2,), M), atol=0.05)
    assert torch.allclose(x.var(0), torch.full((2,), S2), atol=0.05)


def test_euler_ode_shifted_grid_and_few_steps(gen):
    noise = torch.randn(20000, 2, generator=gen)
    v = toy2d.gaussian_velocity(M, S2)
    x = samplers.euler_ode(v, noise, 100, shift=3.0)
    assert torch.allclose(x.mean(0), torch.full((2,), M), atol=0.05)
    assert torch.allclose(x.var(0), torch.full((2,), S2), atol=0.05)
    # one Euler step from t=0: v(x, 0) = E[data] - x, so x + v lands exactly on the data mean
    x1 = samplers.euler_ode(v, noise, 1)
    assert torch.allclose(x1, torch.full_like(x1, M), atol=1e-5)


def test_euler_ode_calls_net_steps_times_with_increasing_t(gen):
    ts = []

    def net(x, t, y=None):
        ts.append(t.clone())
        assert t.shape == (x.shape[0],)
        return torch.ones_like(x)

    noise = torch.randn(8, 4, 4, 4, generator=gen)
    x = samplers.euler_ode(net, noise, 10)
    assert len(ts) == 10
    assert ts[0].eq(0).all() and all((a < b).all() for a, b in zip(ts, ts[1:]))
    assert torch.allclose(x, noise + 1.0, atol=1e-5)  # constant v = 1 integrated over [0, 1]


def test_euler_maruyama_reaches_gaussian(gen):
    noise = torch.randn(20000, 2, generator=gen)
    x = samplers.euler_maruyama(toy2d.gaussian_velocity(M, S2), noise, 200, generator=gen)
    assert torch.isfinite(x).all()
    assert torch.allclose(x.mean(0), torch.full((2,), M), atol=0.05)
    assert torch.allclose(x.var(0), torch.full((2,), S2), atol=0.06)


@pytest.mark.parametrize("shape", SHAPES)
def test_euler_maruyama_deterministic_with_generator(shape):
    v = toy2d.gaussian_velocity(M, S2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    a = samplers.euler_maruyama(v, noise, 20, generator=torch.Generator().manual_seed(7))
    b = samplers.euler_maruyama(v, noise, 20, generator=torch.Generator().manual_seed(7))
    c = samplers.euler_maruyama(v, noise, 20, generator=torch.Generator().manual_seed(8))
    assert a.shape == shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_euler_maruyama_does_not_touch_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    samplers.euler_maruyama(toy2d.gaussian_velocity(M, S2), torch.zeros(4, 2), 5,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_euler_maruyama_nfe_equals_steps():
    calls = []

    def net(x, t, y=None):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    samplers.euler_maruyama(net, torch.zeros(4, 2), 7, last_step=0.1,
                            generator=torch.Generator().manual_seed(0))
    assert len(calls) == 7
    assert calls[0] == 0.0 and calls[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("kw",
                         [dict(steps=1), dict(steps=0), dict(steps=10, last_step=0.0),
                          dict(steps=10, last_step=1.0)])
def test_euler_maruyama_rejects_bad_args(kw):
    with pytest.raises(ValueError):
        samplers.euler_maruyama(toy2d.gaussian_velocity(M, S2), torch.zeros(4, 2), **kw)


@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_scale_one_is_conditional(shape, gen):
    x = torch.randn(shape, generator=gen)
    t = torch.rand(shape[0], generator=gen)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    calls = []
    net = _label_net(calls)
    out = samplers.cfg_velocity(net, x, t, y, scale=1.0, null_label=3)
    assert torch.equal(out, net(x, t, y))
    assert calls[0] == shape[0]  # no null pass: batch not doubled


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.0, 2.5, 4.0])
def test_cfg_formula_single_forward(shape, scale, gen):
    x = torch.randn(shape, generator=gen)
    t = torch.rand(shape[0], generator=gen)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    null = 7
    calls = []
    out = samplers.cfg_velocity(_label_net(calls), x, t, y, scale=scale, null_label=null)
    assert calls == [2 * shape[0]]  # exactly one forward on the concatenated batch
    v_cond = _label_net()(x, t, y)
    v_null = torch.full_like(x, float(null))
    assert torch.allclose(out, v_null + scale * (v_cond - v_null))


@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_guidance_interval(shape, gen):
    b = shape[0]
    x = torch.randn(shape, generator=gen)
    t = torch.linspace(0, 1, b)
    y = torch.randint(0, 3, (b,), generator=gen)
    null, scale, interval = 5, 3.0, (0.3, 0.7)
    out = samplers.cfg_velocity(_label_net(), x, t, y, scale=scale, null_label=null, interval=interval)
    v_cond = _label_net()(x, t, y)
    guided = null + scale * (v_cond - null)
    inside = (t >= 0.3) & (t <= 0.7)
    assert inside.any() and (~inside).any()
    assert torch.allclose(out[inside], guided[inside])
    assert torch.allclose(out[~inside], v_cond[~inside])


def test_guided_wrapper(gen):
    x = torch.randn(8, 2, generator=gen)
    t = torch.rand(8, generator=gen)
    seen = []

    def net(x, t, y=None):
        seen.append(y)
        return x * 0 + (0.0 if y is None else y.float()[:, None])

    v = samplers.guided(net, scale=2.0, null_label=9)
    out = v(x, t)
    assert len(seen) == 1 and seen[0] is None
    assert torch.equal(out, torch.zeros_like(x))
    y = torch.arange(8)
    out = v(x, t, y)
    assert len(seen) == 2 and seen[1].shape == (16,)
    assert torch.allclose(out, 9 + 2.0 * (y.float()[:, None] - 9) + 0 * x)


def test_euler_ode_with_guided_label_net(gen):
    # dx/dt = guided constant velocity -> x(1) = noise + guided value
    v = samplers.guided(_label_net(), scale=2.0, null_label=0)
    noise = torch.randn(6, 2, generator=gen)
    y = torch.tensor([1, 2, 3, 1, 2, 3])
    x = samplers.euler_ode(v, noise, 5, y=y)
    assert torch.allclose(x, noise + 2.0 * y.float()[:, None], atol=1e-5)


def test_euler_ode_on_step_sees_each_step_and_changes_nothing():
    seen = []
    net = lambda x, t, y=None: -x  # noqa: E731
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    plain = samplers.euler_ode(net, noise, 5)
    hooked = samplers.euler_ode(net, noise, 5, on_step=lambda i, t, x, v: seen.append((i, float(t[0]))))
    assert torch.equal(plain, hooked) and [i for i, _ in seen] == list(range(5)) and seen[0][1] == 0.0
