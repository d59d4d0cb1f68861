"""Distances between two sample sets (latents, reference samples): labelled Fréchet distance and sliced-W2."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.distances import sliced_w2
from . import image_metrics


def distribution_distances(a: Tensor, b: Tensor, seed: int = 0) -> dict:
    """Fréchet distance and sliced-W2 between two sample sets of the same shape (flattened), labelled."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    fd = image_metrics.frechet_distance(fa, fb,
                                        "flattened latents / reference samples (not Inception; not FID)")
    sw = sliced_w2(fa.float(), fb.float(), 256, generator=torch.Generator().manual_seed(seed))
    return {"fd": fd.value, "fd_label": fd.feature_space, "sw2": sw, "n": len(a)}
