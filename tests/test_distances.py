import pytest
import torch

from dmvae_lib.core import distances


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_directions_unit():
    d = distances.random_directions(500, 5, _g())
    assert d.shape == (500, 5)
    assert torch.allclose(d.norm(dim=1), torch.ones(500), atol=1e-5)
    assert d.mean(0).abs().max() < 0.1


def test_sliced_w2_self_is_zero(gen):
    a = torch.randn(300, 2, generator=gen)
    assert distances.sliced_w2(a, a, generator=_g()) == 0.0
    shuffled = a[torch.randperm(300, generator=gen)]
    assert distances.sliced_w2(a, shuffled, generator=_g()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dim", [2, 8])
def test_sliced_w2_of_shift(dim, gen):
    a = torch.randn(500, dim, generator=gen)
    c = torch.zeros(dim)
    c[0], c[-1] = 1.0, -0.5
    expected = c.norm().item() / dim**0.5  # sqrt(E (theta . c)^2) = |c| / sqrt(D)
    got = distances.sliced_w2(a, a + c, n_directions=4000, generator=_g(1))
    assert got == pytest.approx(expected, rel=0.03)


def test_sliced_w2_symmetric_and_different_sizes(gen):
    a = torch.randn(4000, 2, generator=gen)
    b = torch.randn(2500, 2, generator=gen) + torch.tensor([1.0, 0.0])
    ab = distances.sliced_w2(a, b, generator=_g(3))
    ba = distances.sliced_w2(b, a, generator=_g(3))
    assert ab == pytest.approx(ba, rel=1e-6)
    assert ab == pytest.approx(2**-0.5, abs=0.07)
    # duplicating every point keeps the empirical distribution: distance stays near 0
    assert distances.sliced_w2(a, torch.cat([a, a]), generator=_g()) < 0.03
    # same distribution, different sizes: small; shifted: large
    c = torch.randn(1000, 2, generator=gen)
    assert distances.sliced_w2(a, c, generator=_g()) < 0.1


def test_sliced_w2_flattens_and_detaches(gen):
    a = torch.randn(100, 2, 2, generator=gen, requires_grad=True)
    d = distances.sliced_w2(a, a.detach() + 1.0, n_directions=4000, generator=_g())
    assert isinstance(d, float) and d == pytest.approx(1.0, rel=0.03)  # |(1,1,1,1)| / sqrt(4)


def test_noise_floor_small_positive():
    sampler = lambda n, g: torch.randn(n, 2, generator=g)  # noqa: E731
    nf = distances.noise_floor(sampler, 2000, repeats=3, n_directions=128)
    assert 0 < nf < 0.1
    assert nf == distances.noise_floor(sampler, 2000, repeats=3, n_directions=128)  # seeded
    assert distances.noise_floor(sampler, 200, repeats=3, n_directions=128) > nf  # fewer points, higher floor


def test_mean_sliced_w2(gen):
    sampler = lambda n, g: torch.randn(n, 2, generator=g)  # noqa: E731
    good = distances.mean_sliced_w2(torch.randn(1000, 2, generator=gen), sampler, repeats=4)
    bad = distances.mean_sliced_w2(torch.randn(1000, 2, generator=gen) * 2, sampler, repeats=4)
    assert good < 0.1 < bad


def test_coverage(gen):
    ref = torch.randn(1000, 2, generator=gen)
    assert distances.coverage(ref, ref) == 1.0
    assert distances.coverage(ref, torch.randn(1000, 2, generator=gen)) > 0.9
    assert distances.coverage(ref, torch.zeros(100, 2)) < 0.05
    # half the modes dropped: only the left half of the reference is covered
    left = ref[ref[:, 0] < 0]
    assert 0.35 < distances.coverage(ref, left) < 0.65


def test_spread(gen):
    pts = torch.randn(20000, 2, generator=gen) * torch.tensor([1.0, 3.0])
    assert distances.spread(pts) == pytest.approx(2.0, rel=0.02)
    assert distances.spread(torch.zeros(10, 2)) == 0.0


def test_coverage_knn_radius_by_hand():
    # reference on a line at 0, 1, 3, 7: k=1 radii (nearest other point) 1, 1, 2, 4; k=2 radii 3, 2, 3, 6
    ref = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]])
    s = torch.tensor([[5.5, 0.0]])  # distances 5.5, 4.5, 2.5, 1.5
    assert distances.coverage(ref, s, k=1) == 0.25
    assert distances.coverage(ref, s, k=2) == 0.5
