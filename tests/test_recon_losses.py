import logging

import pytest
import torch

from dmvae_lib.models.recon_losses import (
    VGG16_FILE,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    bcr_loss,
    d_hinge_loss,
    diff_augment,
    g_loss,
    l1_loss,
    l2_loss,
)


def _images(gen, n=4, size=16):
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


# ---------------------------------------------------------------- pixel and adversarial terms


def test_pixel_losses(gen):
    x = _images(gen)
    assert l1_loss(x, x) == 0 and l2_loss(x, x) == 0
    assert l1_loss(x + 0.5, x).item() == pytest.approx(0.5)
    assert l2_loss(x + 0.5, x).item() == pytest.approx(0.25)


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 − r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    assert d_hinge_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert d_hinge_loss(torch.full((5,), 3.0), torch.full((5,), -3.0)).item() == 0  # confident and right
    assert g_loss(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(-2.0)


def test_adaptive_weight_matches_closed_form_on_linear_decoder(gen):
    """x̂ = z Wᵀ, L_rec = mean (x̂ − x)², D(x̂) = x̂·v, L_G = −mean D:
    ∇_W L_rec = 2/(3B)·(x̂ − x)ᵀ z and ∇_W L_G = −v ⊗ mean(z)."""
    b, k = 8, 5
    w = torch.randn(3, k, generator=gen, requires_grad=True)
    z, x = torch.randn(b, k, generator=gen), torch.randn(b, 3, generator=gen)
    v = torch.randn(3, generator=gen)
    x_hat = z @ w.T
    rec, gan = ((x_hat - x) ** 2).mean(), g_loss(x_hat @ v)
    weight = adaptive_gan_weight(rec, gan, w)
    grad_rec = 2 / (3 * b) * (x_hat - x).T @ z
    grad_gan = -torch.outer(v, z.mean(0))
    expected = grad_rec.norm() / (grad_gan.norm() + 1e-6)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    (rec + weight * gan).backward()  # graph retained: both terms still backpropagate
    assert w.grad is not None
    w.grad = None
    x_hat = z @ w.T
    tiny = adaptive_gan_weight(((x_hat - x) ** 2).mean(), 0.0 * g_loss(x_hat @ v), w)
    assert tiny.item() == 1e4  # zero GAN gradient -> clamped at max_weight


# ---------------------------------------------------------------- discriminator, DiffAug, BCR


def test_patchgan_reference_size_and_tiny_variant(gen):
    disc = PatchDiscriminator()
    assert 2.75e6 < sum(p.numel() for p in disc.parameters()) < 2.78e6  # reference: ≈ 2.77 M
    with torch.device("meta"):
        assert PatchDiscriminator()(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    tiny = PatchDiscriminator(ndf=16, n_layers=2, norm="group")
    assert tiny(_images(gen, size=32)).shape == (4, 1, 6, 6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny.modules())
    with pytest.raises(ValueError):
        PatchDiscriminator(norm="sync")


def test_diffaug_deterministic_shape_preserving_and_differentiable(gen):
    x = _images(gen).requires_grad_()
    out = diff_augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, diff_augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, diff_augment(x, torch.Generator().manual_seed(2)))
    out.sum().backward()
    assert x.grad is not None


def test_diffaug_translation_is_a_per_sample_zero_filled_shift(gen):
    x = _images(gen, n=6, size=16).add(2)  # strictly positive, so zero fill is recognisable
    out = diff_augment(x, torch.Generator().manual_seed(0), color=False, cutout=0.0)
    shifts = []
    for i in range(len(x)):
        for dy in range(-2, 3):  # 12.5 % of 16 px
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                ref[:, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)] = \
                    x[i][:, max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)]
                if torch.equal(out[i], ref):
                    shifts.append((dy, dx))
    assert len(shifts) == len(x)
    assert len(set(shifts)) > 1  # drawn per sample


def test_diffaug_cutout_zeroes_one_square_per_sample(gen):
    x = torch.ones(8, 3, 20, 20)
    out = diff_augment(x, torch.Generator().manual_seed(0), color=False, translation=0.0)
    zeros = (out[:, 0] == 0).flatten(1).sum(1)
    assert (zeros > 0).all() and (zeros <= 4 * 4).all()  # side round(0.2·20) = 4, clipped at borders
    assert torch.equal(out[:, 0], out[:, 1])


def test_bcr_zero_for_constant_discriminator_positive_otherwise(gen):
    images = _images(gen, size=32)

    def const(t):
        return torch.full((t.shape[0], 1, 2, 2), 0.3)

    g = torch.Generator().manual_seed(0)
    assert bcr_loss(const, images, const(images), generator=g).item() == 0
    disc = PatchDiscriminator(ndf=16, n_layers=2, norm="group")
    logits = disc(diff_augment(images, g))
    loss = bcr_loss(disc, images, logits, generator=g, weight=2.0)
    assert loss.item() > 0 and loss.requires_grad


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips(tmp_path_factory):
    """One random-backbone PerceptualLoss (construction takes seconds), built with TORCH_HOME empty."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dmvae_lib.models.recon_losses")
    logger.addHandler(handler)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        net = PerceptualLoss(allow_random_backbone=True)
    logger.removeHandler(handler)
    return net, records


def test_a_random_backbone_is_one_function_whatever_the_global_rng(random_lpips, tmp_path):
    """Built under a fixed seed apart from the caller's RNG: the same numbers in every process and at every
    call site (the value once depended on what had drawn from the global RNG before), no draw consumed."""
    net, _ = random_lpips
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    again = PerceptualLoss(vgg_path=tmp_path / "absent.pth", allow_random_backbone=True)
    assert torch.equal(torch.random.get_rng_state(), before)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(x, y), again(x, y))


def test_random_backbone_lpips_is_labelled_and_warns(random_lpips):
    net, records = random_lpips
    assert net.is_real_lpips is False and "not perceptual" in net.label
    assert any(r.levelno == logging.WARNING and "RANDOM backbone" in r.getMessage() for r in records)


def test_lpips_forward_zero_on_identical_and_grad_flows(random_lpips, gen):
    net, _ = random_lpips
    x, y = _images(gen, size=32), _images(gen, size=32).requires_grad_()
    d = net(y, x)
    assert d.shape == (4,) and (d > 0).all()
    assert torch.allclose(net(x, x), torch.zeros(4))
    d.mean().backward()
    assert y.grad is not None and not any(p.requires_grad for p in net.parameters())
    net.train()  # a parent's .train() must not switch on the heads' dropout
    assert not net.net.training and torch.equal(net(y, x), d)


def test_missing_vgg_weights_raise_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        PerceptualLoss()
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILE) in str(err.value)
    assert "allow_random_backbone" in str(err.value)


@pytest.mark.slow
def test_vgg_weights_load_from_local_file(random_lpips, tmp_path):
    net, _ = random_lpips
    g = torch.Generator().manual_seed(0)
    fake_ckpt = {}
    for i in range(1, 6):
        for idx, layer in getattr(net.net.net, f"slice{i}").named_children():
            if isinstance(layer, torch.nn.Conv2d):
                fake_ckpt[f"features.{idx}.weight"] = torch.randn(layer.weight.shape, generator=g) * 0.01
                fake_ckpt[f"features.{idx}.bias"] = torch.randn(layer.bias.shape, generator=g) * 0.01
    path = tmp_path / VGG16_FILE
    torch.save(fake_ckpt, path)
    real = PerceptualLoss(vgg_path=path)
    assert real.is_real_lpips and real.label == "LPIPS-VGG"
    assert torch.equal(getattr(real.net.net.slice5, "28").weight, fake_ckpt["features.28.weight"])
