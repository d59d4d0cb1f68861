"""Image-quality metrics for reconstructions, each labelled with what it actually measured.

Images are in [−1, 1] (the tokenizer's convention); PSNR and SSIM map them to [0, 1] and clamp both sides.

    PSNR(x̂, x) = −10·log10(mean (x̂ − x)²)        per image; capped at `max_db` (default 100 dB) when x̂ = x
    SSIM       = mean over 11×11 Gaussian (σ 1.5) windows of
                 (2μ_a μ_b + C1)(2σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2)),  C1 = 0.01², C2 = 0.03²
                 ("valid" windows only, channels averaged; Wang et al. 2004)
    FD(a, b)   = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2·tr (Σ_a^½ Σ_b Σ_a^½)^½     (Fréchet distance of Gaussians)

FD is computed in float64 with symmetric eigendecompositions, which stay real and stable when the
covariances are singular; with fewer samples than dimensions an exact (N_a, N_b) SVD form is used.
Every FD carries the name of its feature space: only `fid_inception` (the TF-ported Inception-v3 pool3
weights, through torch-fidelity; `load_inception` + `inception_features` expose the same network, also for the
Inception score's logits, and `frechet_distance_from_moments` scores against precomputed reference statistics)
is "FID"; an FD in any other space must not be reported as FID. The
reference computes rFID with torchmetrics on the same Inception network after a bicubic resize to 299;
torch-fidelity resizes uint8 images itself (TF-style bilinear), so the two differ slightly on non-299
inputs. The reference PSNR does not clamp x̂ (bf16), so it can differ for out-of-range reconstructions.

Reference: Ye et al., "Distribution Matching Variational AutoEncoder", arXiv 2512.07778; the authors'
evaluation: docs/authors-code.md §6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dmvae_lib.models.recon_losses import PerceptualLoss

from ..data.pixels import float_to_u8
from ..runtime import weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SPACE = "inception-v3-pool3-2048 (FID; torch-fidelity TF-ported weights)"
Images = Union[Tensor, Iterable[Tensor]]  # (N, 3, H, W) in [−1, 1], or batches of it


class FD(NamedTuple):
    value: float
    feature_space: str  # what the features are; "FID" only for INCEPTION_SPACE
    n_a: int
    n_b: int


class LPIPSResult(NamedTuple):
    values: Tensor  # (B,)
    is_real_lpips: bool  # False: random VGG backbone, not a perceptual metric
    label: str


def _unit(x: Tensor) -> Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x_hat: Tensor, x: Tensor, *, max_db: float = 100.0) -> Tensor:
    """Per-image PSNR in dB on [0, 1] (B,); identical images give `max_db` instead of inf."""
    mse = ((_unit(x_hat) - _unit(x)) ** 2).reshape(x.shape[0], -1).mean(dim=1)
    return -10 * torch.log10(mse.clamp_min(10 ** (-max_db / 10)))


def ssim(x_hat: Tensor, x: Tensor, *, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM on [0, 1] with a Gaussian window (B,); 1 for identical images."""
    a, b = _unit(x_hat).double(), _unit(x).double()  # float64: E[a²] − μ² cancels badly in float32
    k = min(window_size, a.shape[-2], a.shape[-1])
    coords = torch.arange(k, dtype=a.dtype, device=a.device) - (k - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    c = a.shape[1]
    rows, cols = g.view(1, 1, k, 1).expand(c, 1, k, 1), g.view(1, 1, 1, k).expand(c, 1, 1, k)

    def blur(t: Tensor) -> Tensor:  # the k×k Gaussian g gᵀ, depthwise, as two 1-D passes (k/2 × fewer ops)
        return F.conv2d(F.conv2d(t, rows, groups=c), cols, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(s.shape[0], -1).mean(dim=1).float()


@torch.no_grad()
def lpips_distance(x_hat: Tensor, x: Tensor, net: PerceptualLoss) -> LPIPSResult:
    """Per-image LPIPS (B,) with the flag saying whether it is real LPIPS (VGG weights present)."""
    return LPIPSResult(net(x_hat, x).float(), net.is_real_lpips, net.label)


def _sqrt_psd(m: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(m)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor, feature_space: str) -> FD:
    """Fréchet distance between Gaussians fitted to features (N_a, D) and (N_b, D) (unbiased covariances).

    Args:
        feature_space: the name of the features (e.g. INCEPTION_SPACE, "tokenizer-latents"); required.
    """
    if not feature_space:
        raise ValueError("name the feature space: an unlabelled Fréchet distance cannot be interpreted")
    a, b = (f.detach().double().reshape(len(f), -1) for f in (feats_a, feats_b))  # (N, D)
    if min(len(a), len(b)) < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need ≥ 2 samples of equal dimension, got {tuple(a.shape)} and {tuple(b.shape)}")
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    if max(len(a), len(b)) <= a.shape[1]:
        # Few samples: with centred A, B, Σ_a Σ_b ∝ AᵀA BᵀB shares its nonzero eigenvalues with (ABᵀ)(ABᵀ)ᵀ,
        # so tr (Σ_a Σ_b)^½ = ‖ABᵀ‖_* / sqrt((N_a − 1)(N_b − 1)): an (N_a, N_b) SVD instead of (D, D) work.
        a_c, b_c = a - a.mean(0), b - b.mean(0)
        tr_covmean = torch.linalg.svdvals(a_c @ b_c.T).sum() / ((len(a) - 1) * (len(b) - 1)) ** 0.5
    else:  # tr (Σ_a^½ Σ_b Σ_a^½)^½: square roots of the eigenvalues of a symmetric PSD matrix
        root_a = _sqrt_psd(cov_a)
        tr_covmean = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = ((a.mean(0) - b.mean(0)) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return FD(float(value), feature_space, len(a), len(b))


def _batches(images: Images, batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
    else:
        yield from images


def _check_inception_file(weights_path: Optional[str | Path], caller: str) -> Path:
    """The weights file (fetched to `weights_path` only with DMVAE_FETCH_WEIGHTS=1), else a RuntimeError."""
    path = None if weights_path is None else weights.ensure_file(weights_path, INCEPTION_URL, "FID Inception")
    if path is None:
        raise RuntimeError(
            f"{caller} needs the FID Inception weights as a local file (got {weights_path!r}); nothing "
            f"is downloaded unless asked. Fetch {INCEPTION_URL} on a machine with network and pass "
            f"weights_path=<that file> (or set {weights.FETCH_ENV}=1 to fetch it there). Without it, use "
            "frechet_distance in another, labelled feature space.")
    return path


def load_inception(weights_path: Optional[str | Path], features: tuple[str, ...] = ("2048",),
                   device: Optional[torch.device | str] = None):
    """torch-fidelity's Inception-v3 ("inception-v3-compat") from a local weights file, returning `features`
    ("2048": pool3, FID and precision/recall; "logits_unbiased": the Inception score's logits).

    Raises:
        RuntimeError: no weights file; the message says where to get it (DMVAE_FETCH_WEIGHTS=1 fetches it).
    """
    path = _check_inception_file(weights_path, "load_inception")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                      feature_extractor_weights_path=str(path))
    net.weights_files = weights.record("inception_v3_fid", path)
    return net.to(device or "cpu")


@torch.no_grad()
def inception_features(net, images: Images, batch_size: int = 64) -> tuple[Tensor, ...]:
    """The net's features (float64, CPU), one (N, D) tensor per requested feature.

    Images are (N, 3, H, W) floats in [−1, 1] (quantised to uint8 as the reference does) or uint8 already;
    torch-fidelity resizes them to 299² (TF1-style bilinear).
    """
    device = next(net.parameters()).device
    outs = []
    for batch in _batches(images, batch_size):
        if batch.dtype != torch.uint8:
            batch = float_to_u8(batch)
        outs.append([f.double().cpu() for f in net(batch.to(device))])
    return tuple(torch.cat(parts) for parts in zip(*outs))


def frechet_distance_from_moments(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor,
                                  feature_space: str, n_a: int = 0, n_b: int = 0) -> FD:
    """FD between N(mu_a, cov_a) and N(mu_b, cov_b) (e.g. against precomputed reference statistics)."""
    if not feature_space:
        raise ValueError("name the feature space: an unlabelled Fréchet distance cannot be interpreted")
    mu_a, mu_b, cov_a, cov_b = (torch.as_tensor(m).double() for m in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (len(mu_a), len(mu_a)):
        raise ValueError(f"moments do not match: {tuple(mu_a.shape)}, {tuple(cov_a.shape)} vs "
                         f"{tuple(mu_b.shape)}, {tuple(cov_b.shape)}")
    root_a = _sqrt_psd((cov_a + cov_a.T) / 2)
    tr_covmean = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = ((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return FD(float(value), feature_space, n_a, n_b)


def fid_inception(images_a: Images, images_b: Images, *, weights_path: Optional[str | Path],
                  batch_size: int = 64, device: Optional[torch.device | str] = None) -> FD:
    """FID: FD of Inception-v3 pool3 features (torch-fidelity's network, local weights only).

    Images (N, 3, H, W) in [−1, 1] are quantised to uint8 as the reference does; torch-fidelity resizes
    them to 299². For rFID pass the originals as `images_a` and the reconstructions as `images_b`.

    Raises:
        RuntimeError: no weights file; the message says where to get it (DMVAE_FETCH_WEIGHTS=1 fetches it).
    """
    _check_inception_file(weights_path, "fid_inception")
    net = load_inception(weights_path, ("2048",), device)
    (fa,), (fb,) = inception_features(net, images_a, batch_size), inception_features(net, images_b,
                                                                                     batch_size)
    return frechet_distance(fa, fb, INCEPTION_SPACE)
