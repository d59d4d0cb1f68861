import math

import numpy as np
import pytest
import scipy.linalg
import torch

from dmvae_lib.metrics.image_metrics import (
    FD,
    INCEPTION_SPACE,
    INCEPTION_URL,
    LPIPSResult,
    fid_inception,
    frechet_distance,
    lpips_distance,
    psnr,
    ssim,
)


def _images(gen, n=3, size=32):
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


# ---------------------------------------------------------------- PSNR, SSIM


def test_psnr_identical_is_capped_not_inf(gen):
    x = _images(gen)
    assert torch.equal(psnr(x, x), torch.full((3,), 100.0))
    assert psnr(x, x, max_db=60.0)[0].item() == pytest.approx(60.0)


@pytest.mark.parametrize("delta", [0.01, 0.1, 0.3])
def test_psnr_of_known_mse(delta):
    x = torch.zeros(2, 3, 8, 8)  # 0.5 on the [0, 1] scale
    x_hat = x + 2 * delta  # a shift of `delta` on [0, 1]: mse = delta²
    assert torch.allclose(psnr(x_hat, x), torch.full((2,), -10 * math.log10(delta**2)), atol=1e-4)


def test_psnr_clamps_to_the_image_range():
    x = torch.ones(1, 3, 4, 4)
    assert psnr(x + 5.0, x).item() == 100.0  # out-of-range reconstruction clamps back to white


def test_ssim_identical_is_one_and_symmetric(gen):
    x, y = _images(gen), _images(gen)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    assert (ssim(noisy, x) < 1).all() and (ssim(noisy, x) > ssim(y, x)).all()


@pytest.mark.parametrize("p,q", [(0.2, 0.7), (0.5, 0.5), (0.9, 0.1)])
def test_ssim_closed_form_for_flat_images(p, q):
    """Flat images have zero variance: SSIM = (2pq + C1)/(p² + q² + C1)."""
    a, b = torch.full((1, 3, 16, 16), 2 * p - 1), torch.full((1, 3, 16, 16), 2 * q - 1)
    c1 = 0.01**2
    assert ssim(a, b).item() == pytest.approx((2 * p * q + c1) / (p * p + q * q + c1), rel=1e-4)


# ---------------------------------------------------------------- LPIPS wrapper


def test_lpips_distance_carries_the_real_lpips_flag(gen):
    class StubLPIPS(torch.nn.Module):
        is_real_lpips, label = False, "LPIPS-VGG-random-backbone (not perceptual)"

        def forward(self, x_hat, x):
            return (x_hat - x).abs().flatten(1).mean(1)

    x, y = _images(gen), _images(gen)
    out = lpips_distance(x, y, StubLPIPS())
    assert isinstance(out, LPIPSResult) and out.values.shape == (3,)
    assert out.is_real_lpips is False and "not perceptual" in out.label


# ---------------------------------------------------------------- Fréchet distance


def test_fd_identical_samples_is_zero_and_labelled(gen):
    a = torch.randn(400, 6, generator=gen)
    fd = frechet_distance(a, a, "test-space")
    assert isinstance(fd, FD) and fd.feature_space == "test-space" and (fd.n_a, fd.n_b) == (400, 400)
    assert abs(fd.value) < 1e-9


def test_fd_mean_shift_equals_squared_shift(gen):
    a = torch.randn(300, 5, generator=gen) @ torch.randn(5, 5, generator=gen)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + shift, "x").value == pytest.approx(shift.pow(2).sum().item(), rel=1e-6)
    # independent Gaussian samples: ‖Δμ‖² plus a small sampling bias
    b = torch.randn(20000, 4, generator=gen)
    c = torch.randn(20000, 4, generator=gen) + torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert frechet_distance(b, c, "x").value == pytest.approx(2.0, abs=0.05)


def test_fd_matches_scipy_sqrtm(gen):
    a = torch.randn(500, 8, generator=gen)
    b = torch.randn(400, 8, generator=gen) @ (0.5 * torch.randn(8, 8, generator=gen)) + 1.0
    A, B = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(A, rowvar=False), np.cov(B, rowvar=False)
    tr_covmean = np.trace(scipy.linalg.sqrtm(ca @ cb).real)
    ref = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_covmean
    assert frechet_distance(a, b, "x").value == pytest.approx(ref, rel=1e-8)


def test_fd_few_samples_form_matches_eigen_form(gen):
    """Zero feature columns change nothing, but push D past N and switch to the (N_a, N_b) SVD form."""
    a, b = torch.randn(20, 8, generator=gen), torch.randn(15, 8, generator=gen) * 1.5 + 0.3

    def pad(t):
        return torch.cat([t, torch.zeros(len(t), 16)], dim=1)

    eigen_form, svd_form = frechet_distance(a, b, "x").value, frechet_distance(pad(a), pad(b), "x").value
    assert svd_form == pytest.approx(eigen_form, rel=1e-9)
    c = torch.randn(10, 64, generator=gen)  # N < D: singular covariances
    assert frechet_distance(c, c + 0.5, "x").value == pytest.approx(64 * 0.25, rel=1e-6)  # float32 input


def test_fd_requires_a_label_and_valid_shapes(gen):
    a = torch.randn(10, 3, generator=gen)
    with pytest.raises(ValueError, match="feature space"):
        frechet_distance(a, a, "")
    with pytest.raises(ValueError):
        frechet_distance(a, torch.randn(10, 4, generator=gen), "x")


# ---------------------------------------------------------------- FID (Inception)


def test_fid_without_weights_fails_fast_with_instructions(tmp_path, gen):
    x = _images(gen)
    with pytest.raises(RuntimeError) as err:
        fid_inception(x, x, weights_path=None)
    assert INCEPTION_URL in str(err.value) and "weights_path" in str(err.value)
    with pytest.raises(RuntimeError):
        fid_inception(x, x, weights_path=tmp_path / "missing.pth")


@pytest.mark.slow
def test_fid_plumbing_with_random_inception_weights(tmp_path, gen, monkeypatch):
    """Random weights (values meaningless): checks loading, uint8 conversion, batching and the label."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as mp:  # build once without any weights to get a state dict of the right shape
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    x, y = _images(gen, n=6), _images(gen, n=6)
    same = fid_inception(x, x, weights_path=path, batch_size=4)
    assert same.feature_space == INCEPTION_SPACE and (same.n_a, same.n_b) == (6, 6)
    assert abs(same.value) < 1e-6
    assert fid_inception(x, y, weights_path=path, batch_size=4).value > 0
