"""Pixels: uint8 ↔ float in [−1, 1], the one place the constant lives.

    x = u8 / 127.5 − 1,      u8 = clamp(round((x + 1) · 127.5), 0, 255)

`u8_to_float` / `float_to_u8` keep the layout; `to_float` (NHWC uint8 → NCHW float) and `to_uint8`
(NCHW float → NHWC uint8) also move the channels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def u8_to_float(u8: Tensor) -> Tensor:
    """uint8 of any layout → float32 in [−1, 1], same layout."""
    return u8.float().div(127.5).sub(1.0)


def float_to_u8(x: Tensor) -> Tensor:
    """Floats in [−1, 1] of any layout → uint8 (rounded, clamped), same layout."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_float(u8: Tensor) -> Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [−1, 1]."""
    # contiguous NCHW: the permuted view is channels-last in memory, which makes every conv and GroupNorm
    # downstream run in channels-last (5× slower for the decoder on CPU)
    return u8_to_float(u8.permute(0, 3, 1, 2)).contiguous()


def to_uint8(images: Tensor) -> Tensor:
    """(N, 3, H, W) floats in [−1, 1] → uint8 (N, H, W, 3), rounded as `image_metrics.fid_inception` does."""
    return float_to_u8(images).permute(0, 2, 3, 1).contiguous()
