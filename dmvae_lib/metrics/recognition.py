"""Recognisability of generated images: how often a classifier trained on real labelled images names the class
each image was generated for.

    accuracy   = mean_i [argmax f(x_i) = y_i]          x_i generated for class y_i (class-balanced labels)
    per class  = the same mean over the images generated for one class
    ceiling    = the same classifier's accuracy on real held-out images (what a perfect generator would get)

Not Inception, not IS: the classifier is the embedded supervised one (notebook 20, trained on the train split
with labels), so the number says whether *this data set's* classes are drawn recognisably. An image that fools
the classifier is not proof of quality, but a generator whose samples it cannot name draws no class.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .probes import extract_features

CLASSIFIER_LABEL = ("class accuracy under the embedded supervised classifier (trained here on real labelled "
                    "train images; not Inception, not IS)")


@torch.no_grad()
def class_accuracy(classifier: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, num_classes: int,
                   *, batch: int = 500, device: torch.device | str = "cpu") -> dict:
    """{"value": overall accuracy, "per_class": [accuracy of class c] (NaN where no image has label c), "n",
    "classifier": what it is}; `images` uint8 (N, H, W, 3) or float (N, 3, H, W) in [−1, 1], `labels` (N,)."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (≥ 1), got {len(images)} images, "
                         f"{len(labels)} labels")
    pred = extract_features(classifier, images, batch=batch, device=device).argmax(1)
    hit = (pred == labels.long().cpu()).float()
    per_class = [float(hit[labels == c].mean()) if bool((labels == c).any()) else math.nan
                 for c in range(num_classes)]
    return {"value": float(hit.mean()), "per_class": per_class, "n": len(labels),
            "classifier": CLASSIFIER_LABEL}
