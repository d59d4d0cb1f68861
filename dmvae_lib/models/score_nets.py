"""Velocity networks with one signature, `net(x_t, t, y=None) -> v` (same shape as x_t).

`ToyScoreMLP` models 2-D points: the authors used a 7.4 M-parameter LightningDiT on one-token "images"
for this; a ~0.1 M-parameter MLP fits the S-shape to the sampling noise floor in seconds on a CPU.

Time embedding: sinusoidal features of 1000·t (t ∈ [0, 1], t = 1 data), cosine half first, followed by a
two-layer MLP. Scaling t by 1000 spreads the frequencies over the unit interval; raw t (as in the reference
code) leaves most frequencies nearly constant.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of times t (B,) -> (B, dim), cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, width): sinusoid then Linear–SiLU–Linear."""

    def __init__(self, width: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class ToyScoreMLP(nn.Module):
    """Residual MLP velocity net for low-dimensional points (B, D).

    x → Linear → `depth` residual blocks [SiLU → Linear(+time) → SiLU → Linear] → SiLU → Linear(D).
    The output layer starts at zero, so an untrained net predicts v = 0.
    """

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 2, num_classes: int = 0):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.inp = nn.Linear(dim, width)
        self.t_embed = TimestepEmbedder(width)
        # num_classes + 1 rows: the last one is the null label (classifier-free guidance).
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(width, width), "cond": nn.Linear(width, width),
                           "fc2": nn.Linear(width, width)})
            for _ in range(depth)
        )
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        c = self.t_embed(t)
        if self.y_embed is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            c = c + self.y_embed(y)
        h = self.inp(x_t)
        for blk in self.blocks:
            z = blk["fc1"](torch.nn.functional.silu(h)) + blk["cond"](c)
            h = h + blk["fc2"](torch.nn.functional.silu(z))
        return self.out(torch.nn.functional.silu(h))


SCORE_NETS: dict[str, type[nn.Module]] = {"mlp-toy": ToyScoreMLP}
