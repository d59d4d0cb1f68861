"""Learnable projection heads P: latents (B, C, H, W) → the reference's sample shape (paper §3.1).

When the latent shape differs from the reference's, DMVAE matches P(latents) instead of the latents:

    latents = normalize(E(x))      feeds the decoder (reconstruction) and P
    x_ref   = P(latents)           (B, *ref_shape); noised and scored by the real/fake nets in L_DM

P is trained by L_DM only; its gradient also reaches the encoder through the latents. The paper uses a
two-layer MLP for a spatially aligned reference and a two-layer transformer decoder with learnable queries
(DETR-style) otherwise. Here:

    nn.Identity        shapes equal (the authors' setting: the reference is the stage-1 latents themselves).
    MLPHead            a (C', H', W') reference on the same grid, or on a grid an integer factor f finer or
                       coarser (same f on both axes). Per-token MLP as 1×1 convs C → width → SiLU → C'. A
                       finer grid is reached by predicting C'·f² channels per token and `pixel_shuffle` (each
                       latent token writes its own f×f block); a coarser one by `pixel_unshuffle` of the
                       latents first (each output token sees its f×f block of latent tokens). Both keep every
                       token tied to the same image region, which interpolation would blur, and lose no
                       information.
    QueryDecoderHead   any other reference shape. One learnable query per output token cross-attends to the
                       latent tokens through a pre-norm `nn.TransformerDecoder` (self-attention among queries,
                       cross-attention, MLP; no dropout), then a linear map to the output channels.

Shape convention: a reference shape is (C', H', W') (a spatial feature map, channels first, as the latents)
or (D,) (one flat vector per image: a pooled feature or a text embedding). A flat reference is one output
token of D channels, i.e. one query (attention pooling), and the head returns (B, D).

Positions in QueryDecoderHead are fixed 2-D sin-cos codes of each token's cell centre in image-relative
coordinates [0, 1]², shared by the latent grid and the output grid, so a query and the latent tokens covering
the same image region start with matching codes even when the grids differ. The flat query has no position.

Reference: Ye et al., "Distribution Matching Variational AutoEncoder", arXiv 2512.07778, §3.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shape = tuple[int, ...]


def _grid_factor(in_hw: Sequence[int], out_hw: Sequence[int]) -> tuple[int, int] | None:
    """(down, up) integer factors that take grid `in_hw` to `out_hw`, or None if there are none."""
    (h, w), (oh, ow) = in_hw, out_hw
    if (h, w) == (oh, ow):
        return 1, 1
    if oh % h == 0 and ow % w == 0 and oh // h == ow // w:
        return 1, oh // h
    if h % oh == 0 and w % ow == 0 and h // oh == w // ow:
        return h // oh, 1
    return None


def sincos_2d(h: int, w: int, dim: int, max_freq: float = 64.0) -> Tensor:
    """Fixed 2-D sin-cos codes (h·w, dim) of the cell centres ((i + ½)/h, (j + ½)/w), row-major.

    dim/4 frequencies per axis, geometric from π to π·max_freq (resolves grids up to ~max_freq cells)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    freqs = math.pi * torch.logspace(0, math.log2(max_freq), dim // 4, base=2.0)  # (dim/4,)
    ys = ((torch.arange(h) + 0.5) / h)[:, None].expand(h, w).reshape(-1, 1) * freqs  # (h·w, dim/4)
    xs = ((torch.arange(w) + 0.5) / w)[None, :].expand(h, w).reshape(-1, 1) * freqs
    return torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=1)


class MLPHead(nn.Module):
    """Per-token two-layer MLP (1×1 convs) latents (B, C, H, W) → (B, C', H', W'), H'/H = W'/W = f or 1/f."""

    def __init__(self, latent_shape: Sequence[int], ref_shape: Sequence[int], *, width: int = 256):
        super().__init__()
        (c, h, w), (out_c, oh, ow) = latent_shape, ref_shape
        factors = _grid_factor((h, w), (oh, ow))
        if factors is None:
            raise ValueError("MLPHead needs grids that are equal or integer multiples with one factor on "
                             f"both axes; got {h}×{w} → {oh}×{ow} (use QueryDecoderHead)")
        self.down, self.up = factors
        self.latent_shape, self.ref_shape = (c, h, w), (out_c, oh, ow)
        self.net = nn.Sequential(nn.Conv2d(c * self.down**2, width, 1), nn.SiLU(),
                                 nn.Conv2d(width, out_c * self.up**2, 1))

    def forward(self, latents: Tensor) -> Tensor:
        assert latents.shape[1:] == self.latent_shape, \
            f"expected (B, {self.latent_shape}), got {latents.shape}"
        if self.down > 1:
            latents = F.pixel_unshuffle(latents, self.down)  # (B, C, H, W) -> (B, C·f², H/f, W/f)
        out = self.net(latents)
        if self.up > 1:
            out = F.pixel_shuffle(out, self.up)  # (B, C'·f², H, W) -> (B, C', H·f, W·f)
        return out


class QueryDecoderHead(nn.Module):
    """Learnable queries cross-attending to the latent tokens: (B, C, H, W) → (B, *ref_shape).

    Args:
        latent_shape: (C, H, W).
        ref_shape: (C', H', W') (H'·W' queries) or (D,) (one query).
        width: token width; depth: decoder layers (paper: 2); heads: attention heads.
    """

    def __init__(self, latent_shape: Sequence[int], ref_shape: Sequence[int], *, width: int = 256,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        c, h, w = latent_shape
        self.latent_shape, self.ref_shape = (c, h, w), tuple(ref_shape)
        if len(self.ref_shape) == 3:
            out_c, oh, ow = self.ref_shape
            query_pos = sincos_2d(oh, ow, width)
        elif len(self.ref_shape) == 1:
            out_c, query_pos = self.ref_shape[0], torch.zeros(1, width)
        else:
            raise ValueError(f"reference shape must be (C, H, W) or (D,), got {self.ref_shape}")
        self.in_proj = nn.Linear(c, width)
        self.queries = nn.Parameter(0.02 * torch.randn(len(query_pos), width))
        self.register_buffer("memory_pos", sincos_2d(h, w, width), persistent=False)
        self.register_buffer("query_pos", query_pos, persistent=False)
        layer = nn.TransformerDecoderLayer(width, heads, int(mlp_ratio * width), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        # pre-norm needs a final norm
        self.decoder = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(width))
        self.out_proj = nn.Linear(width, out_c)

    def forward(self, latents: Tensor) -> Tensor:
        assert latents.shape[1:] == self.latent_shape, \
            f"expected (B, {self.latent_shape}), got {latents.shape}"
        b = latents.shape[0]
        memory = self.in_proj(latents.flatten(2).transpose(1, 2)) + self.memory_pos  # (B, H·W, width)
        queries = (self.queries + self.query_pos).expand(b, -1, -1)  # (B, Q, width)
        out = self.out_proj(self.decoder(queries, memory))  # (B, Q, C')
        if len(self.ref_shape) == 1:
            return out[:, 0]  # (B, D)
        return out.transpose(1, 2).reshape(b, *self.ref_shape)  # (B, Q, C') -> (B, C', H', W')


def make_head(latent_shape: Sequence[int], ref_shape: Sequence[int], *, width: int = 256, depth: int = 2,
              heads: int = 4, kind: str = "auto") -> nn.Module:
    """The projection head from latents of `latent_shape` (C, H, W) onto a reference of `ref_shape`.

    kind="auto": nn.Identity if the shapes are equal; MLPHead if `ref_shape` is (C', H', W') on the same grid
    or an integer multiple of it (one factor on both axes); otherwise QueryDecoderHead. kind="mlp" / "query"
    forces one (MLPHead raises if the grids are not aligned).
    """
    latent_shape, ref_shape = tuple(latent_shape), tuple(ref_shape)
    if len(latent_shape) != 3:
        raise ValueError(f"latent shape must be (C, H, W), got {latent_shape}")
    if kind not in ("auto", "mlp", "query"):
        raise ValueError(f"kind must be 'auto', 'mlp' or 'query', got {kind!r}")
    if kind == "auto":
        if ref_shape == latent_shape:
            return nn.Identity()
        aligned = len(ref_shape) == 3 and _grid_factor(latent_shape[1:], ref_shape[1:]) is not None
        kind = "mlp" if aligned else "query"
    if kind == "mlp":
        if len(ref_shape) != 3:
            raise ValueError(f"MLPHead needs a (C, H, W) reference shape, got {ref_shape}")
        return MLPHead(latent_shape, ref_shape, width=width)
    return QueryDecoderHead(latent_shape, ref_shape, width=width, depth=depth, heads=heads)
