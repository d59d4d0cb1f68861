"""Reconstruction and adversarial terms for training the tokenizer (kept apart from the DMD math).

    L_rec  = l1·|x̂ − x| + l2·(x̂ − x)² + lpips·LPIPS(x̂, x)          (reference weights 1, 0, 1; means)
    L_D    = ½·[mean relu(1 − D(A(x))) + mean relu(1 + D(A(sg x̂)))]  hinge, A = DiffAug
    L_bcr  = w_bcr · mean (D(A'(·)) − D(A(·)))²                        balanced consistency, fresh draw A'
    L_G    = −mean D(A(x̂))
    w_adv  = clamp(‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-6), 0, 1e4),  W = decoder's last conv weight
    L_gen  = L_rec + disc_weight · w_adv · L_G                          (disc_weight 0.5 after disc_start)

LPIPS is Zhang et al. 2018 (v0.1, VGG16, via the `lpips` package, BSD-2). Its linear heads ship inside the
package; the VGG16 backbone is the torchvision ImageNet checkpoint, read from torchvision's cache file
(fetched there only with DMVAE_FETCH_WEIGHTS=1, `runtime.weights`). With no file,
`PerceptualLoss(allow_random_backbone=True)` runs a random backbone: a pipeline stand-in, not a perceptual
metric, flagged by `is_real_lpips`.

DiffAug (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"; the StyleGAN-T
settings the reference uses): colour (brightness + U(−½, ½), saturation × U(0, 2), contrast × U(½, 3/2)),
integer translation up to ±12.5 % with zero fill, and a zeroed square of side 0.2·H; all drawn per sample
from an explicit generator. BCR: Zhao et al. 2021, "Improved Consistency Regularization for GANs".
Adaptive weight: Esser et al. 2021 (VQGAN), Eq. 7.

Reference: Ye et al., "Distribution Matching Variational AutoEncoder", arXiv 2512.07778.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Callable, Optional

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import weights

log = logging.getLogger(__name__)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16 ImageNet checkpoint, as lpips expects it
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


def l1_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean absolute error over all elements (scalar)."""
    return (x_hat - x).abs().mean()


def l2_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean squared error over all elements (scalar)."""
    return ((x_hat - x) ** 2).mean()


def default_vgg16_path() -> Path:
    """$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth (where torchvision would cache it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


RANDOM_BACKBONE_SEED = 0  # the random VGG16 of `allow_random_backbone` (a stand-in, not LPIPS)


class PerceptualLoss(nn.Module):
    """LPIPS (VGG16) between images in [−1, 1]: `forward(x_hat, x) -> (B,)` per-image distances.

    Frozen and always in eval mode (the lpips heads contain dropout). Gradients flow to the inputs.

    Args:
        vgg_path: torchvision VGG16 checkpoint; default `default_vgg16_path()`.
        allow_random_backbone: without the file, build a random VGG16 (logs a WARNING; `is_real_lpips`
            False) instead of raising.
    """

    def __init__(self, *, vgg_path: Optional[str | Path] = None, allow_random_backbone: bool = False):
        super().__init__()
        path = Path(vgg_path) if vgg_path else default_vgg16_path()
        self.is_real_lpips = weights.ensure_file(path, VGG16_URL, "LPIPS VGG16") is not None
        if not self.is_real_lpips and not allow_random_backbone:
            raise FileNotFoundError(
                f"LPIPS needs the VGG16 ImageNet weights at {path}; nothing is downloaded unless asked. "
                f"Fetch {VGG16_URL} on a machine with network and put it there "
                f"($TORCH_HOME/hub/checkpoints/) or pass vgg_path=, or set {weights.FETCH_ENV}=1 to fetch "
                "it there. allow_random_backbone=True runs a random backbone (a pipeline stand-in, not a "
                "perceptual metric).")
        # pnet_rand=True makes torchvision build VGG16 without weights, so construction never touches the
        # network; the real backbone is copied in from the local file below.
        # under a fixed seed, apart from the caller's RNG: a random backbone is the same function in every
        # process and at every call site, and building one changes no other draw
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation notice
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        self.weights_files = weights.record("lpips_vgg16", path) if self.is_real_lpips else {}
        if self.is_real_lpips:
            self._load_backbone(path)
        else:
            log.warning("PerceptualLoss: no VGG16 weights at %s; using a RANDOM backbone. This is not LPIPS "
                        "and not a perceptual metric; label any number from it as such.", path)
        self.net.requires_grad_(False).eval()

    @property
    def label(self) -> str:
        return "LPIPS-VGG" if self.is_real_lpips else "LPIPS-VGG-random-backbone (not perceptual)"

    def _load_backbone(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for i in range(1, self.net.net.N_slices + 1):
                for idx, layer in getattr(self.net.net, f"slice{i}").named_children():  # names = VGG indices
                    if isinstance(layer, nn.Conv2d):
                        try:
                            layer.weight.copy_(state[f"features.{idx}.weight"])
                            layer.bias.copy_(state[f"features.{idx}.bias"])
                        except (KeyError, RuntimeError) as exc:
                            raise RuntimeError(f"{path} is not a torchvision VGG16 file: {exc}") from exc

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [−1, 1] → LPIPS distances (B,)."""
        return self.net(x_hat, x).reshape(x.shape[0])


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN (NLayer): logits (B, 1, h', w'); ndf 64, n_layers 3 gives 30×30 on 256² (≈2.77 M).

    conv4 s2 → LReLU(0.2), then n_layers convs (stride 2, the last stride 1) + norm + LReLU, channels
    ndf·min(2^n, 8), then conv4 s1 → 1. `norm`: "batch" (BatchNorm2d, local statistics) or "group".
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ndf
        for n in range(1, n_layers + 1):
            c_next = ndf * min(2**n, 8)
            groups = math.gcd(32, c_next)  # GroupNorm(32) where the width allows it
            norm_layer = nn.BatchNorm2d(c_next) if norm == "batch" else nn.GroupNorm(groups, c_next)
            layers += [nn.Conv2d(c, c_next, 4, 2 if n < n_layers else 1, 1), norm_layer, nn.LeakyReLU(0.2)]
            c = c_next
        self.net = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def d_hinge_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½·[mean relu(1 − D(real)) + mean relu(1 + D(fake))] (the reference's ½ keeps it on the G scale)."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def g_loss(logits_fake: Tensor) -> Tensor:
    """Generator adversarial loss −mean D(fake)."""
    return -logits_fake.mean()


# A CPU generator's draws reach the GPU by an asynchronous copy: a blocking one waits for the device to drain.
def _uniform(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device, like.dtype,
                                                                               non_blocking=True)


def _randint(high: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device,
                                                                                         non_blocking=True)


def diff_augment(x: Tensor, generator: torch.Generator, *, color: bool = True, translation: float = 0.125,
                 cutout: float = 0.2) -> Tensor:
    """DiffAug of a batch (B, C, H, W): colour, translation, cutout, each with per-sample parameters.

    Draws come from `generator` (on its own device) in a fixed order, so a seeded generator reproduces
    the batch exactly. The output keeps x's shape and dtype and is differentiable in x.
    """
    b, _, h, w = x.shape
    if color:
        x = x + (_uniform((b, 1, 1, 1), generator, x) - 0.5)  # brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (2 * _uniform((b, 1, 1, 1), generator, x)) + mean  # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (_uniform((b, 1, 1, 1), generator, x) + 0.5) + mean  # contrast
    if translation > 0:
        sh, sw = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = _randint(2 * sh + 1, b, generator, x.device) - sh
        dx = _randint(2 * sw + 1, b, generator, x.device) - sw
        # output pixel (i, j) reads input (i − dy, j − dx) of the zero-padded batch
        rows = (torch.arange(h, device=x.device)[None] + sh - dy[:, None])[:, :, None]  # (B, H, 1)
        cols = (torch.arange(w, device=x.device)[None] + sw - dx[:, None])[:, None, :]  # (B, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = F.pad(x, (sw, sw, sh, sh))[batch, :, rows, cols]  # (B, H, W, C): advanced indices go first
        x = x.permute(0, 3, 1, 2)
    if cutout > 0:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        top = _randint(h, b, generator, x.device)[:, None] - ch // 2  # square centred on a uniform pixel
        left = _randint(w, b, generator, x.device)[:, None] - cw // 2
        ys, xs = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
        inside = ((ys >= top) & (ys < top + ch))[:, :, None] & ((xs >= left) & (xs < left + cw))[:, None, :]
        x = x * (~inside)[:, None].to(x.dtype)
    return x


def bcr_loss(disc: Callable[[Tensor], Tensor], images: Tensor, logits_aug: Tensor, *,
             generator: torch.Generator, weight: float = 1.0, **aug_kwargs: float) -> Tensor:
    """Balanced consistency regularisation: weight · MSE(D(DiffAug'(images)), logits_aug).

    Args:
        images: the un-augmented batch the discriminator saw (reference: real and sg(fake) concatenated).
        logits_aug: D(DiffAug(images)) from the hinge term. Neither side is detached (as in the reference).
        aug_kwargs: forwarded to `diff_augment` for the fresh augmentation.
    """
    return weight * F.mse_loss(disc(diff_augment(images, generator, **aug_kwargs)), logits_aug)


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, *,
                        max_weight: float = 1e4, eps: float = 1e-6,
                        grad_mean: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """‖∇_W rec_loss‖ / (‖∇_W gan_loss‖ + eps), clamped to [0, max_weight] and detached (VQGAN Eq. 7).

    Uses torch.autograd.grad(retain_graph=True), so both losses can still be backpropagated afterwards.
    autograd.grad bypasses DDP's gradient averaging; under data parallelism `grad_mean` averages the
    stacked (∇_W rec_loss, ∇_W gan_loss) over ranks first. For batch-mean losses on equal shards that mean
    is the gradient of the global-batch loss, so the weight is the single-process one, not a per-rank one.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    if grad_mean is not None:
        rec_grad, gan_grad = grad_mean(torch.stack([rec_grad, gan_grad])).unbind(0)
    return (rec_grad.norm() / (gan_grad.norm() + eps)).clamp(0.0, max_weight).detach()


def perceptual_loss(mode: str) -> Optional[PerceptualLoss]:
    """"auto": real LPIPS when the VGG16 file is local (or may be fetched: DMVAE_FETCH_WEIGHTS=1), else none
    (logged by the caller via the summary)."""
    if mode == "off" or (mode == "auto" and not (default_vgg16_path().is_file() or weights.fetch_allowed())):
        return None
    return PerceptualLoss(allow_random_backbone=mode == "random")
