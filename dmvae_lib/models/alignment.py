"""Semantic alignment of the tokenizer's latents with its frozen encoder's features (VA-VAE's VF loss).

A reconstruction loss alone lets the projector route everything through whatever input reconstructs best
(here the colour-keeping stem), so z can lose the semantics of the encoder. VA-VAE (Yao et al.,
"Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models", arXiv 2501.01423,
§3.2) aligns z with a frozen foundation model's features through a linear map W, discarded after training:

    token term  L_tok  = mean_ij relu(1 − m_cos − cos(W z_ij, f_ij))                       (marginal cosine)
                       + mean_(i,j),(k,l) relu(|cos(z'_ij, z'_kl) − cos(f_ij, f_kl)| − m_dist)   (distances)
    global term L_glob = 1 − cos(G · vec(z), mean_ij f_ij)                                 (pooled feature)

z' = W z; the distance matrix compares the tokens of each image among themselves (as in VA-VAE). The global
term (this workbook's addition) asks the pooled semantic feature to be a *linear* function of the whole
latent, which is what a linear probe on flattened latents measures. f is the semantic part of the encoder's
output (the SSL backbone's map without the stem side input), average-pooled to z's grid if coarser.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def marginal_cosine_loss(pred: Tensor, target: Tensor, margin: float) -> Tensor:
    """mean relu(1 − margin − cos) over tokens; pred and target (B, C, h, w)."""
    return F.relu(1 - margin - F.cosine_similarity(pred, target, dim=1)).mean()


def distance_matrix_loss(pred: Tensor, target: Tensor, margin: float) -> Tensor:
    """mean relu(|cos-sim matrix(pred) − cos-sim matrix(target)| − margin) over each image's token pairs."""
    p = F.normalize(pred.flatten(2), dim=1)  # (B, C, hw)
    t = F.normalize(target.flatten(2), dim=1)
    return F.relu((p.transpose(1, 2) @ p - t.transpose(1, 2) @ t).abs() - margin).mean()


class SemanticAlignment(nn.Module):
    """The VF loss's trainable maps: W (1×1 conv Cz → C) per token and G (vec(z) → C) for the pooled feature.

    `forward(z, features)` returns (weighted loss, stats); `features` (B, ≥ semantic_channels, H, W), of
    which the first `semantic_channels` are the target."""

    def __init__(self, z_channels: int, grid: int, semantic_channels: int, *, token_weight: float,
                 global_weight: float, margin_cos: float = 0.0, margin_dist: float = 0.0):
        super().__init__()
        self.semantic_channels, self.grid = semantic_channels, grid
        self.token_weight, self.global_weight = token_weight, global_weight
        self.margin_cos, self.margin_dist = margin_cos, margin_dist
        self.token = nn.Conv2d(z_channels, semantic_channels, 1) if token_weight > 0 else None
        self.pooled = nn.Linear(z_channels * grid * grid, semantic_channels) if global_weight > 0 else None

    def forward(self, z: Tensor, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = z.float()
        f = features[:, : self.semantic_channels].float()
        if f.shape[-1] != z.shape[-1]:
            f = F.adaptive_avg_pool2d(f, z.shape[-2:])
        loss, stats = z.new_zeros(()), {}
        if self.token is not None:
            zp = self.token(z)
            cos = marginal_cosine_loss(zp, f, self.margin_cos)
            dist = distance_matrix_loss(zp, f, self.margin_dist)
            loss = loss + self.token_weight * (cos + dist)
            stats.update(align_cos=cos.detach(), align_dist=dist.detach())
        if self.pooled is not None:
            glob = 1 - F.cosine_similarity(self.pooled(z.flatten(1)), f.mean((2, 3)), dim=1).mean()
            loss = loss + self.global_weight * glob
            stats["align_global"] = glob.detach()
        return loss, stats


def seeded_alignment(seed: int, z_channels: int, grid: int, semantic_channels: int, *, token_weight: float,
                     global_weight: float, margin_cos: float = 0.0,
                     margin_dist: float = 0.0) -> Optional[SemanticAlignment]:
    """A `SemanticAlignment` initialised under `seed` apart from the caller's RNG, or None when both weights
    are 0 (no alignment)."""
    if token_weight <= 0 and global_weight <= 0:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SemanticAlignment(z_channels, grid, semantic_channels, token_weight=token_weight,
                                 global_weight=global_weight, margin_cos=margin_cos, margin_dist=margin_dist)
