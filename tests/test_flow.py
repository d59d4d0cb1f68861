import pytest
import torch

from dmvae_lib.core import flow, toy2d

SHAPES = [(8, 2), (8, 4, 4, 4)]


def _draw(shape, gen):
    data = torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    t = torch.rand(shape[0], generator=gen) * 0.9 + 0.05
    return data, noise, t


@pytest.mark.parametrize("shape", SHAPES)
def test_interpolate_endpoints(shape, gen):
    data, noise, _ = _draw(shape, gen)
    b = shape[0]
    assert torch.equal(flow.interpolate(data, noise, torch.zeros(b)), noise)
    assert torch.equal(flow.interpolate(data, noise, torch.ones(b)), data)
    mid = flow.interpolate(data, noise, torch.full((b,), 0.5))
    assert torch.allclose(mid, 0.5 * (data + noise))


@pytest.mark.parametrize("shape", SHAPES)
def test_velocity_target_is_time_derivative(shape, gen):
    data, noise, t = _draw(shape, gen)
    data, noise, t = data.double(), noise.double(), t.double()
    h = 1e-6
    fd = (flow.interpolate(data, noise, t + h) - flow.interpolate(data, noise, t - h)) / (2 * h)
    assert torch.allclose(fd, flow.velocity_target(data, noise), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_predict_data_and_noise_from_conditional_velocity(shape, gen):
    data, noise, t = _draw(shape, gen)
    x_t = flow.interpolate(data, noise, t)
    v = flow.velocity_target(data, noise)
    assert torch.allclose(flow.predict_data(x_t, t, v), data, atol=1e-5)
    assert torch.allclose(flow.predict_noise(x_t, t, v), noise, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m,s2", [(1.5, 0.3), (-0.7, 2.0)])
def test_score_from_velocity_matches_gaussian_score(shape, m, s2, gen):
    x_t = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    t = torch.rand(shape[0], generator=gen, dtype=torch.float64) * 0.9 + 0.05
    v = toy2d.gaussian_velocity(m, s2)(x_t, t)
    tt = flow.expand_t(t, x_t)
    expected = -(x_t - tt * m) / (tt**2 * s2 + (1 - tt) ** 2)
    assert torch.allclose(flow.score_from_velocity(x_t, t, v), expected, atol=1e-8)


def test_expand_t_and_mean_flat_shapes(gen):
    x = torch.randn(8, 4, 4, 4, generator=gen)
    assert flow.expand_t(torch.rand(8), x).shape == (8, 1, 1, 1)
    assert flow.mean_flat(x).shape == (8,)
    assert torch.allclose(flow.mean_flat(x), x.mean(dim=(1, 2, 3)))
    assert flow.mean_flat(torch.randn(8, 2, generator=gen)).shape == (8,)


def test_sample_t_range_dtype_determinism():
    t = flow.sample_t(4000, t_min=0.2, t_max=0.7, generator=torch.Generator().manual_seed(3))
    assert t.dtype == torch.float32 and t.shape == (4000,)
    assert t.min() >= 0.2 and t.max() <= 0.7
    assert t.min() < 0.21 and t.max() > 0.69  # fills the range
    t2 = flow.sample_t(4000, t_min=0.2, t_max=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, t2)
    t3 = flow.sample_t(4000, t_min=0.2, t_max=0.7, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(t, t3)


def test_sample_t_float32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert flow.sample_t(16, generator=torch.Generator().manual_seed(0)).dtype == torch.float32


def test_sample_t_float32_under_float64_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        t = flow.sample_t(16, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(old)
    assert t.dtype == torch.float32


def test_sample_t_rejects_bad_range():
    with pytest.raises(ValueError):
        flow.sample_t(4, t_min=0.6, t_max=0.5)
    with pytest.raises(ValueError):
        flow.sample_t(4, t_max=1.5)


def test_sample_t_shift_moves_toward_noise():
    kw = dict(t_min=0.1, t_max=0.9)
    base = flow.sample_t(20000, generator=torch.Generator().manual_seed(0), **kw)
    shifted = flow.sample_t(20000, shift=3.0, generator=torch.Generator().manual_seed(0), **kw)
    assert shifted.mean() < base.mean() - 0.1
    assert shifted.min() >= 0.1 and shifted.max() <= 0.9
    assert (shifted <= base + 1e-6).all()  # same u, elementwise lower


def test_sample_t_logit_normal():
    t = flow.sample_t(20000, logit_normal=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    assert t.std() < 0.25  # uniform has std 0.289; logit-normal(0, 1) about 0.21
    hi = flow.sample_t(20000, logit_normal=(1.5, 1.0), generator=torch.Generator().manual_seed(0))
    assert hi.mean() > t.mean() + 0.15
    ranged = flow.sample_t(2000, t_min=0.3, t_max=0.6, logit_normal=(0.0, 1.0),
                           generator=torch.Generator().manual_seed(0))
    assert ranged.min() >= 0.3 and ranged.max() <= 0.6


def test_shift_t_identity_monotone_endpoints():
    t = torch.linspace(0, 1, 101)
    assert torch.equal(flow.shift_t(t, 1.0), t)
    for s in (0.5, 3.0):
        st = flow.shift_t(t, s)
        assert (st[1:] > st[:-1]).all()
        assert torch.allclose(st[[0, -1]], torch.tensor([0.0, 1.0]))
    assert (flow.shift_t(t[1:-1], 3.0) < t[1:-1]).all()
    assert (flow.shift_t(t[1:-1], 0.5) > t[1:-1]).all()
    # sigma = 1 - t = 0.5 with shift 3 -> 1.5 / 2 = 0.75
    assert torch.allclose(flow.shift_t(torch.tensor([0.5]), 3.0), torch.tensor([0.25]))


def test_annealed_t_range():
    start, end = (0.0, 1.0), (0.5, 0.9)
    assert flow.annealed_t_range(0, 100, start, end) == pytest.approx(start)
    assert flow.annealed_t_range(100, 100, start, end) == pytest.approx(end)
    assert flow.annealed_t_range(50, 100, start, end) == pytest.approx((0.25, 0.95))
    assert flow.annealed_t_range(500, 100, start, end) == pytest.approx(end)
    assert flow.annealed_t_range(-5, 100, start, end) == pytest.approx(start)


@pytest.mark.parametrize("shape", [(4096, 2), (256, 4, 4, 4)])
def test_flow_matching_loss_oracle_beats_zero_net(shape, gen):
    m, s2 = 1.5, 0.3
    data = m + s2**0.5 * torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    t = torch.rand(shape[0], generator=gen)
    oracle = flow.flow_matching_loss(toy2d.gaussian_velocity(m, s2), data, t, noise)
    zero = flow.flow_matching_loss(lambda x, t, y=None: torch.zeros_like(x), data, t, noise)
    assert oracle.shape == zero.shape == (shape[0],)
    assert (oracle >= 0).all()
    assert oracle.mean() < 0.7 * zero.mean()
    # the zero net's loss is exactly mean_flat((data - noise)^2)
    assert torch.allclose(zero, flow.mean_flat((data - noise) ** 2))


def test_flow_matching_loss_passes_y(gen):
    data, noise, t = _draw((8, 2), gen)
    y = torch.arange(8)
    seen = {}

    def net(x, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x)

    flow.flow_matching_loss(net, data, t, noise, y)
    assert seen["y"] is y
