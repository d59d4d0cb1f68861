"""Reconstructions of uint8 images through a tokenizer, batched, as float images in [−1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.pixels import to_float
from ..models.tokenizer import Tokenizer
from ..runtime.device import autocast_ctx


@torch.no_grad()
def reconstruct(tok: Tokenizer, images_u8: Tensor, device, batch: int = 500,
                precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """(x̂ float in [−1, 1] clamped, z) for uint8 images, batched."""
    outs, zs = [], []
    for s in range(0, len(images_u8), batch):
        x = to_float(images_u8[s:s + batch]).to(device)
        with autocast_ctx(torch.device(device), precision):
            x_hat, z = tok(x)
        outs.append(x_hat.float().clamp(-1, 1).cpu())
        zs.append(z.float().cpu())
    return torch.cat(outs), torch.cat(zs)
