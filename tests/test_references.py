import pytest
import torch

from dmvae_lib.core import flow, toy2d
from dmvae_lib.data.references import (
    REFERENCES,
    GaussianReference,
    GMMReference,
    NoiseStateReference,
    TensorReference,
    class_subset,
    make_reference,
    moments,
)

SHAPE = (2, 3, 3)


def _bank(n=40, shape=SHAPE, classes=4):
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % classes


def _all_refs():
    bank, labels = _bank()
    return [
        TensorReference(bank, labels, "ssl"),
        TensorReference(bank, None, "ssl_unlabelled"),
        GaussianReference(SHAPE),
        GMMReference(SHAPE, seed=1),
        GMMReference(SHAPE, seed=1, conditional=True),
        NoiseStateReference(bank, labels, t=0.3),
    ]


@pytest.mark.parametrize("ref", _all_refs(), ids=lambda r: f"{type(r).__name__}-{r.name}-{r.num_classes}")
def test_sample_shapes_dtypes_and_determinism(ref):
    x, y = ref.sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, *ref.shape) and x.dtype == torch.float32
    if ref.num_classes == 0:
        assert y is None
    else:
        assert y.shape == (7,) and y.dtype == torch.long
        assert 0 <= int(y.min()) and int(y.max()) < ref.num_classes
    torch.manual_seed(1)  # the global RNG must not matter ...
    x1, y1 = ref.sample(7, torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    state = torch.get_rng_state()
    x2, y2 = ref.sample(7, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be touched
    assert torch.equal(x1, x2) and torch.equal(x, x1)
    assert (y1 is None and y2 is None) or torch.equal(y1, y2)
    x3, _ = ref.sample(7, torch.Generator().manual_seed(5))
    assert not torch.equal(x3, x1)


def test_tensor_reference_draws_bank_rows_with_their_labels():
    bank, labels = _bank()
    ref = TensorReference(bank, labels)
    x, y = ref.sample(200, torch.Generator().manual_seed(0))
    rows = (x[:, None] == bank[None]).flatten(2).all(-1)  # (200, N): which bank row each draw is
    assert (rows.sum(1) == 1).all()
    assert torch.equal(labels[rows.float().argmax(1)], y)
    assert ref.num_classes == 4 and len(ref) == 40


def test_class_subset_keeps_only_those_classes():
    bank, labels = _bank()
    sub = class_subset(TensorReference(bank, labels, "ssl"), [1, 3])
    assert len(sub) == 20 and set(sub.labels.tolist()) == {1, 3}
    assert sub.num_classes == 4  # labels keep their meaning
    _, y = sub.sample(100, torch.Generator().manual_seed(0))
    assert set(y.tolist()) <= {1, 3}
    assert torch.equal(bank[labels == 1], sub.bank[sub.labels == 1])


def test_class_subset_errors():
    bank, labels = _bank()
    with pytest.raises(ValueError, match=r"\[7\]"):
        class_subset(TensorReference(bank, labels), [1, 7])
    with pytest.raises(ValueError, match="labelled"):
        class_subset(TensorReference(bank), [1])
    with pytest.raises(ValueError, match="at least one"):
        class_subset(TensorReference(bank, labels), [])


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 0.999, 1.0])
def test_gaussian_velocity_closed_form_and_flow_convention(t):
    ref = GaussianReference(SHAPE)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, *SHAPE, generator=g)
    tt = torch.full((5,), t)
    v = ref.velocity(x_t, tt)
    assert torch.isfinite(v).all()
    denom = t**2 + (1 - t) ** 2
    # flow.predict_data turns the exact velocity into E[data | x_t] = t·x_t / (t² + (1 − t)²)
    torch.testing.assert_close(flow.predict_data(x_t, tt, v), t * x_t / denom)
    torch.testing.assert_close(v, toy2d.gaussian_velocity(0.0, 1.0)(x_t, tt))
    torch.testing.assert_close(ref.velocity(x_t, t), v)  # a float t broadcasts


@pytest.mark.parametrize("t", [0.15, 0.5, 0.8])
def test_gaussian_velocity_is_the_regression_of_the_flow_target(t):
    """Monte Carlo: v*(x_t) = E[data − noise | x_t], so the residual is uncorrelated with x_t."""
    g = torch.Generator().manual_seed(0)
    ref = GaussianReference((1,))
    data, _ = ref.sample(200_000, g)
    noise = torch.randn(data.shape, generator=g)
    tt = torch.full((len(data),), t)
    x_t = flow.interpolate(data, noise, tt)
    target = flow.velocity_target(data, noise)
    residual = target - ref.velocity(x_t, tt)
    assert abs(float((residual * x_t).mean())) < 0.01
    slope = float((target * x_t).mean() / (x_t * x_t).mean())
    assert slope == pytest.approx((2 * t - 1) / (t**2 + (1 - t) ** 2), abs=0.01)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 0.99])
def test_gmm_with_one_standard_component_is_the_gaussian(t):
    gmm = GMMReference(SHAPE, components=1, radius=0.0, std=1.0)
    x_t = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    tt = torch.full((6,), t)
    torch.testing.assert_close(gmm.velocity(x_t, tt), GaussianReference(SHAPE).velocity(x_t, tt))


def test_gmm_velocity_matches_toy2d_oracle_and_conditioning():
    gmm = GMMReference((2,), components=5, seed=3, radius=1.2, std=0.3, conditional=True)
    g = torch.Generator().manual_seed(0)
    x_t, tt = 2 * torch.randn(64, 2, generator=g), torch.rand(64, generator=g)
    k = len(gmm.means)
    oracle = toy2d.gmm_velocity(gmm.means, torch.full((k,), 0.3**2), torch.full((k,), 1 / k))
    torch.testing.assert_close(gmm.velocity(x_t, tt), oracle(x_t, tt), atol=1e-5, rtol=1e-4)
    y = torch.randint(k, (64,), generator=g)
    one = toy2d.gaussian_velocity(gmm.means[y], 0.3**2)  # a per-sample mean broadcasts
    torch.testing.assert_close(gmm.velocity(x_t, tt, y), one(x_t, tt), atol=1e-5, rtol=1e-4)
    gmm.means = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, -0.5], [2.0, 2.0], [-0.3, 0.2]])  # unequal norms
    oracle = toy2d.gmm_velocity(gmm.means, torch.full((k,), 0.3**2), torch.full((k,), 1 / k))
    torch.testing.assert_close(gmm.velocity(x_t, tt), oracle(x_t, tt), atol=1e-5, rtol=1e-4)


def test_gmm_samples_have_the_component_means_and_spread():
    gmm = GMMReference(SHAPE, components=10, seed=0, conditional=True)
    assert gmm.means.shape == (10, 18)
    torch.testing.assert_close(gmm.means.pow(2).mean(1).sqrt(), torch.full((10,), 0.8))
    torch.testing.assert_close(gmm.means, GMMReference(SHAPE, seed=0).means)  # fixed by the seed
    assert not torch.equal(gmm.means, GMMReference(SHAPE, seed=1).means)
    x, y = gmm.sample(20_000, torch.Generator().manual_seed(0))
    flat = x.reshape(len(x), -1)
    assert set(y.tolist()) == set(range(10))
    for k in range(10):
        members = flat[y == k]
        torch.testing.assert_close(members.mean(0), gmm.means[k], atol=0.08, rtol=0)
    within = (flat - gmm.means[y]).std()
    assert float(within) == pytest.approx(0.6, abs=0.01)
    mean, std = moments(GMMReference(SHAPE, seed=0), 20_000, torch.Generator().manual_seed(1))
    assert (mean**2 + std**2) == pytest.approx(1.0, abs=0.05)  # unit second moment by default


def test_noise_states_of_a_constant_bank():
    bank = torch.full((8, *SHAPE), 2.0)
    ref = NoiseStateReference(bank, None, t=0.25)
    x, y = ref.sample(20_000, torch.Generator().manual_seed(0))
    assert y is None
    assert float(x.mean()) == pytest.approx(0.25 * 2.0, abs=0.01)
    assert float(x.std()) == pytest.approx(0.75, abs=0.01)
    x2, _ = ref.sample(20_000, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x2)  # fresh noise per draw
    with pytest.raises(ValueError, match="t must"):
        NoiseStateReference(bank, None, t=1.5)


def test_make_reference_registry():
    latents, labels = _bank()
    features = torch.randn(30, 16)
    kinds = {
        "ssl": (TensorReference, SHAPE, 4),
        "supervised": (TensorReference, (16,), 0),
        "text": (TensorReference, (16,), 0),
        "gaussian": (GaussianReference, SHAPE, 0),
        "gmm": (GMMReference, SHAPE, 0),
        "class_subset": (TensorReference, SHAPE, 4),
        "noise_states": (NoiseStateReference, SHAPE, 4),
    }
    assert set(kinds) == set(REFERENCES)
    for name, (cls, shape, classes) in kinds.items():
        ref = make_reference(name, latents=latents, labels=labels, features=features, classes=[0, 2], t=0.4)
        assert isinstance(ref, cls) and ref.name == name and ref.shape == shape and ref.num_classes == classes
    sub = make_reference("class_subset", latents=latents, labels=labels, classes=[0, 2])
    assert set(sub.labels.tolist()) == {0, 2}
    assert make_reference("noise_states", latents=latents, t=0.4).t == 0.4


def test_make_reference_errors():
    latents, labels = _bank()
    with pytest.raises(KeyError, match="gaussian"):  # the message lists the known names
        make_reference("dino", latents=latents, labels=labels)
    with pytest.raises(ValueError, match="`features`"):
        make_reference("supervised", latents=latents, labels=labels)
    with pytest.raises(ValueError, match="`latents`"):
        make_reference("gaussian")
    with pytest.raises(ValueError, match="`classes`"):
        make_reference("class_subset", latents=latents, labels=labels)
    with pytest.raises(ValueError, match="`labels`"):
        make_reference("class_subset", latents=latents, classes=[1])


def test_gmm_velocity_stays_float32_under_autocast():
    gmm = GMMReference((8, 8, 8), seed=0)
    m = gmm.means
    tt = torch.full((4,), 0.9)
    # midpoints between two components: responsibilities ≈ ½/½ hinge on logits of size ~D that bf16 rounds
    noise = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    x_t = (0.9 * (m[:4] + m[4:8]) / 2 + 0.01 * noise).reshape(4, 8, 8, 8)
    k = len(m)
    exact = toy2d.gmm_velocity(m, torch.full((k,), 0.36), torch.full((k,), 1 / k))(x_t.reshape(4, -1), tt)
    exact = exact.reshape(x_t.shape)
    torch.testing.assert_close(gmm.velocity(x_t, tt), exact, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gmm.velocity(x_t, tt)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact, atol=1e-4, rtol=1e-4)
    assert gmm.velocity(x_t.bfloat16(), tt).dtype == torch.bfloat16
