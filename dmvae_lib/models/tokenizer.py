"""The tokenizer: frozen feature encoder → per-token MLP bottleneck → convolutional decoder (paper §3).

    features = E(x)          images in [−1, 1] (B, 3, H, W) → (B, C, h, w); E = DINOv2, frozen in stage 1
    z        = P(features)   per-token MLP C → 2C → SiLU → Cz (1×1 convs); deterministic, no KL
    x̂        = D(z)          Flux-style conv decoder, unbounded output (no tanh)
    latents  = (z − latent_mean) · latent_scale,   z = latents / latent_scale + latent_mean

`latent_scale` is a reciprocal std. `latent_stats` pools all elements of all batches (scale = 1/std); the
reference code averages per-batch 1/(std + 1e-8) instead, which is biased upward (Jensen) and batch-size
dependent. Paper scale: DINOv2 ViT-L/14 run with 16-px patches on 256² images (16×16 tokens × 1024), z of
32 channels, decoder ch=128, ch_mult=(1,2,4,4), 2 res blocks, one nearest×2 + conv on z (≈49.6 M params).
Pretrained encoders load from a local file or the Hugging Face cache; they are downloaded only on request
(DMVAE_FETCH_WEIGHTS=1, `runtime.weights`).

Reference: Ye et al., "Distribution Matching Variational AutoEncoder", arXiv 2512.07778. The decoder layout
follows Flux's autoencoder (black-forest-labs/flux, Apache-2.0), written afresh.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import weights
from .ssl_encoder import SmallResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOKEN_MODULES = ["vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos"]


def init_weights(module: nn.Module) -> None:
    """Reference init: trunc-normal(std 0.02; bounds ±2 are absolute, so ≈ normal) weights, zero biases."""
    for m in module.modules():  # norm layers already start at weight 1, bias 0
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TimmFeatures(nn.Module):
    """One stage of a timm model as a map (B, C, h, w), via `forward_intermediates`; for ViTs that drops
    the prefix tokens, applies the final norm and lays the tokens out row-major on the patch grid."""

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_intermediates(x, indices=[self.stage], norm=True, stop_early=True,
                                                intermediates_only=True)[-1]


class FrozenEncoder(nn.Module):
    """Any extractor `features(x) -> (B, C, h, w)` as an encoder of images in [−1, 1], which are mapped to
    [0, 1] and normalised with `mean`/`std` (mean=None: fed unchanged). Frozen unless `trainable`: no grads,
    the extractor stays in eval mode when a parent calls `.train()`, and the forward builds no graph."""

    def __init__(self, features: nn.Module, out_channels: int, reduction: int, *,
                 mean: Optional[Sequence[float]] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 trainable: bool = False):
        super().__init__()
        self.features, self.out_channels, self.reduction = features, out_channels, reduction
        self.semantic_channels = out_channels  # all of them: the target of a semantic-alignment loss
        for key, val in (("mean", mean), ("std", std)):  # (3, 1, 1) or None
            val = None if mean is None else torch.tensor(val)[:, None, None]
            self.register_buffer(key, val, persistent=False)
        self.set_trainable(trainable)

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = trainable
        self.features.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> FrozenEncoder:
        super().train(mode)
        if not self.trainable:
            self.features.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [−1, 1] → (B, out_channels, H/reduction, W/reduction)."""
        assert x.dim() == 4 and x.shape[1] == 3, f"expected (B, 3, H, W) images, got {tuple(x.shape)}"
        if self.mean is not None:
            x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.features(x)


def timm_encoder(name: str, *, img_size: int, patch_size: Optional[int] = None,
                 weights_path: Optional[str] = None, pretrained: bool = True, feature_stage: int = -1,
                 trainable: bool = False, model_args: Optional[Mapping[str, Any]] = None) -> FrozenEncoder:
    """A `FrozenEncoder` on stage `feature_stage` (default: last) of a timm ViT or CNN, the rest pruned.

    Args:
        img_size: ViT input side (sets the position-embedding grid); CNNs ignore it.
        patch_size: ViT patch override; timm resamples pretrained patch kernels (`vit_large_patch14_dinov2`,
            img_size=256, patch_size=16: 16×16 tokens, as the authors run it).
        model_args: further timm.create_model arguments (e.g. embed_dim, depth for a tiny test ViT).
        weights_path: local .safetensors/.pth/.bin. Without it, the model's file in the Hugging Face cache;
            with none there, DMVAE_FETCH_WEIGHTS=1 (and not HF_HUB_OFFLINE=1) downloads it into that cache
            (`runtime.weights`). Otherwise nothing is downloaded. pretrained=False: random weights (tests).
            The file used is recorded with its SHA-256 in the encoder's `weights_files`.

    Raises:
        RuntimeError: pretrained weights requested and no local copy found (the message says how to add one).
    """
    kwargs: dict = {"num_classes": 0, **dict(model_args or {})}
    if timm.models.is_model_in_modules(name.split(".")[0], _TOKEN_MODULES):
        kwargs.update(img_size=img_size, **({"patch_size": patch_size} if patch_size else {}))
    file, how = Path(weights_path) if weights_path else None, ""
    if pretrained:
        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
        how = (f"timm_encoder({name!r}, pretrained=True) needs local weights; nothing is downloaded unless "
               f"asked. Pass weights_path=<file> (e.g. model.safetensors of the HF repo {hub_id or name}), "
               f"or pre-populate the HF cache (`huggingface-cli download {hub_id or name}` on a machine with "
               "network, copied to $HF_HUB_CACHE or $HF_HOME/hub) and set HF_HUB_OFFLINE=1, or, with "
               f"network, set {weights.FETCH_ENV}=1 to fetch it into the HF cache. "
               "pretrained=False gives random weights.")
        if file is not None and not file.is_file():
            raise RuntimeError(f"no file {file}. {how}")  # fail before any network access
        if file is None and hub_id:
            file = weights.hf_cached(hub_id)
            if file is None and weights.fetch_allowed():
                file = weights.fetch_hf(hub_id)
        if file is None and not (weights.hf_offline() and hub_id):
            raise RuntimeError(how)
        kwargs.update(pretrained=True, **({"pretrained_cfg_overlay": {"file": str(file)}} if file else {}))
    elif file is not None:
        raise ValueError("weights_path given with pretrained=False; pass pretrained=True to load it")
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as exc:  # timm, hub and safetensors raise many types; keep the cause
        raise RuntimeError(f"{how} Loading failed with: {exc}") from exc
    cfg, info = getattr(model, "pretrained_cfg", None) or {}, model.feature_info[feature_stage]
    stage = model.prune_intermediate_layers([feature_stage], prune_norm=False, prune_head=True)[0]
    enc = FrozenEncoder(TimmFeatures(model, stage), info["num_chs"], info["reduction"], trainable=trainable,
                        mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD))
    enc.weights_files = weights.record(f"timm:{name}", file) if pretrained and file is not None else {}
    return enc


class Projector(nn.Module):
    """Per-token MLP (1×1 convs) C·f² → hidden → SiLU → z_channels after an optional f×f pixel_unshuffle."""

    def __init__(self, in_channels: int, z_channels: int, *, hidden_channels: Optional[int] = None,
                 unshuffle: int = 1):
        super().__init__()
        self.unshuffle, c = unshuffle, in_channels * unshuffle**2
        hidden = hidden_channels or 2 * c  # reference: 1024 -> 2048 -> 32
        self.net = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, z_channels, 1))
        init_weights(self)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) → z (B, Cz, h/f, w/f)."""
        if self.unshuffle > 1:
            features = F.pixel_unshuffle(features, self.unshuffle)  # (B, C, h, w) -> (B, C·f², h/f, w/f)
        return self.net(features)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    assert channels % groups == 0, f"{channels} channels do not split into {groups} groups"
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _upsample(channels: int) -> nn.Sequential:
    """Nearest ×2, then a 3×3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(channels, channels, 3, padding=1))


class ResBlock(nn.Module):
    """GN → SiLU → conv3 → GN → SiLU → conv3, plus a 1×1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions (GN, 1×1 q/k/v and output convs), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(3, 4).unbind(1)  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(2, 3).reshape(b, c, h, w))


class Decoder(nn.Module):
    """Flux-style decoder z (B, Cz, s, s) → x̂ (B, out_channels, S, S), S = s·2^n, unbounded output.

    z gets n − (len(ch_mult) − 1) nearest×2 + conv3 doublings (the reference's `post_init`), then conv_in →
    mid [ResBlock, AttnBlock if attn, ResBlock] → len(ch_mult) levels of num_res_blocks + 1 ResBlocks with an
    upsampling between levels → GN → SiLU → conv_out."""

    def __init__(self, z_channels: int, *, latent_size: int, image_size: int, out_channels: int = 3,
                 ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn: bool = True, num_groups: int = 32):
        super().__init__()
        n_up = math.log2(image_size / latent_size)
        n_z_up = round(n_up) - (len(ch_mult) - 1)
        if n_up != round(n_up) or n_z_up < 0:
            raise ValueError(f"{latent_size}→{image_size} needs a power-of-two factor ≥ 2^{len(ch_mult) - 1}")
        self.z_channels, self.latent_size, self.image_size = z_channels, latent_size, image_size
        self.z_up = nn.Sequential(*[_upsample(z_channels) for _ in range(n_z_up)])
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        attn_block = AttnBlock(c, num_groups) if attn else nn.Identity()
        self.mid = nn.Sequential(ResBlock(c, c, num_groups), attn_block, ResBlock(c, c, num_groups))
        levels = []
        for level in reversed(range(len(ch_mult))):  # lowest resolution first, in the order applied
            widths = [c] + [ch * ch_mult[level]] * (num_res_blocks + 1)
            blocks = [ResBlock(c_in, c_out, num_groups) for c_in, c_out in zip(widths[:-1], widths[1:])]
            c = widths[-1]
            levels.append(nn.Sequential(*blocks, *([_upsample(c)] if level > 0 else [])))
        self.up = nn.Sequential(*levels)
        self.norm_out, self.conv_out = _group_norm(c, num_groups), nn.Conv2d(c, out_channels, 3, padding=1)
        init_weights(self)

    def get_last_layer(self) -> nn.Parameter:
        """The output conv weight: the layer the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        assert z.dim() == 4 and z.shape[1] == self.z_channels, f"z must be (B, {self.z_channels}, s, s)"
        h = self.up(self.mid(self.conv_in(self.z_up(z))))
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentStats(NamedTuple):
    mean: float
    scale: float  # 1 / std
    n: int  # elements pooled


def latent_stats(z_batches: Iterable[Tensor]) -> LatentStats:
    """Mean and 1/std over all elements of all batches (float64, Chan's pairwise merge, population std)."""
    n, mean, m2 = 0, 0.0, 0.0
    for z in z_batches:
        z = z.detach().double()
        nb, mb = z.numel(), z.mean().item()
        delta, tot = mb - mean, n + nb
        m2 += ((z - mb) ** 2).sum().item() + delta**2 * n * nb / tot
        mean, n = mean + delta * nb / tot, tot
    if n < 2:
        raise ValueError("latent_stats needs at least two elements")
    return LatentStats(mean=mean, scale=1.0 / math.sqrt(m2 / n), n=n)


class Tokenizer(nn.Module):
    """encoder → projector → z → decoder; `latent_mean`/`latent_scale` are buffers (saved in state_dict).
    `encode` = `project` ∘ `encode_features`, split so training can run from cached encoder features
    (`encoder` may then be None)."""

    def __init__(self, encoder: Optional[nn.Module], projector: nn.Module, decoder: Decoder):
        super().__init__()
        self.encoder, self.projector, self.decoder = encoder, projector, decoder
        self.register_buffer("latent_mean", torch.tensor(0.0))
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def encode_features(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [−1, 1] → encoder features (B, C, h, w)."""
        if self.encoder is None:
            raise RuntimeError("this Tokenizer has no encoder; feed cached features to project()")
        return self.encoder(x)

    def project(self, features: Tensor) -> Tensor:
        """Encoder features (B, C, h, w) → z (B, Cz, h', w')."""
        return self.projector(features)

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) → z (B, Cz, h', w')."""
        return self.project(self.encode_features(x))

    def decode(self, z: Tensor) -> Tensor:
        """z (B, Cz, h', w') → x̂ (B, 3, H, W), unbounded."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images → (x̂, z)."""
        z = self.encode(x)
        return self.decode(z), z

    def trainable_parameters(self, train_encoder: bool) -> list[nn.Parameter]:
        """The parameters a training stage updates, in the optimizer's order: the encoder's (made trainable)
        when `train_encoder`, then the projector's and the decoder's."""
        if not train_encoder:
            return [*self.projector.parameters(), *self.decoder.parameters()]
        if not hasattr(self.encoder, "set_trainable"):
            name = type(self.encoder).__name__
            raise ValueError(f"train.train_encoder=True: the {name} encoder cannot train")
        self.encoder.set_trainable(True)
        return [*self.encoder.parameters(), *self.projector.parameters(), *self.decoder.parameters()]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of z."""
        return (self.decoder.z_channels, self.decoder.latent_size, self.decoder.latent_size)

    def normalize(self, z: Tensor) -> Tensor:
        """latents = (z − latent_mean) · latent_scale."""
        return (z - self.latent_mean) * self.latent_scale

    def denormalize(self, latents: Tensor) -> Tensor:
        """z = latents / latent_scale + latent_mean."""
        return latents / self.latent_scale + self.latent_mean

    @torch.no_grad()
    def measure_latent_stats(self, z_batches: Iterable[Tensor]) -> LatentStats:
        """Set `latent_mean`/`latent_scale` from batches of z (see `latent_stats`); return the stats."""
        stats = latent_stats(z_batches)
        self.latent_mean.fill_(stats.mean)
        self.latent_scale.fill_(stats.scale)
        return stats


class SSLFeatures(nn.Module):
    """A SmallResNet as the tokenizer's encoder: its 8×8 features, plus (side_input) the 16×16 stem folded to
    8×8 by pixel_unshuffle (the stem keeps the colour the SSL features were trained to ignore). Frozen unless
    `set_trainable(True)`; its BatchNorm statistics stay those of SSL training either way (eval mode)."""

    def __init__(self, backbone: SmallResNet, side_input: bool):
        super().__init__()
        self.backbone, self.side_input = backbone.eval().requires_grad_(False), side_input
        self.out_channels = backbone.out_channels + (4 * backbone.width if side_input else 0)
        self.semantic_channels = backbone.out_channels  # the SSL map comes first; the stem is not a target
        self.trainable = False

    def set_trainable(self, trainable: bool) -> None:
        """Let gradients reach the backbone's weights (joint training); the BatchNorm statistics stay put."""
        self.trainable = trainable
        self.backbone.requires_grad_(trainable)

    def train(self, mode: bool = True) -> "SSLFeatures":
        return super().train(False)  # BatchNorm statistics stay frozen

    def forward(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            feats, stem = self.backbone.forward_features(x, return_stem=True)
            out = torch.cat([feats, F.pixel_unshuffle(stem, 2)], 1) if self.side_input else feats
        # contiguous NCHW: a backbone trained in channels-last would otherwise hand that memory format to the
        # projector and decoder, whose GroupNorms run several times slower in it on CPU
        return out.contiguous()
