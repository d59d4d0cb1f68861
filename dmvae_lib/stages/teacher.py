"""Notebook 30 (paper §4, App. A.2): latent cache → reference distribution → teacher.

The stage-1 tokenizer encodes the training images once into a latent cache inside this stage's run folder
(normalised with the tokenizer's stored mean/scale). The reference distribution is built from it by name
(`references.make_reference`), and the real (teacher) velocity net, a LightningDiT, is fitted on reference
samples by flow matching with label dropout; its EMA weights are the teacher that notebook 40 loads.
A teacher checkpoint records the reference it was fitted on, so loading it against another reference, a
missing file, or a foreign checkpoint is an error (the authors' script silently trains against a random
teacher, docs/authors-code.md §5.3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..configs.teacher import TeacherStageConfig
from ..metrics.distributions import distribution_distances
from ..runtime.seeds import stream
from ..train.velocity import sample


def evaluate_teacher(cfg: TeacherStageConfig, net: nn.Module, reference, device) -> dict:
    f = cfg.fit
    samples, _ = sample(net, reference, f.eval_samples, f.sample_steps, device, cfg_scale=f.cfg_scale,
                        seed=cfg.seed)
    gen = stream(cfg.seed, "teacher.eval")
    ref_a, _ = reference.sample(f.eval_samples, gen)
    ref_b, _ = reference.sample(f.eval_samples, gen)
    fit = distribution_distances(samples, ref_a, cfg.seed)
    floor = distribution_distances(ref_b, ref_a, cfg.seed)
    return {"samples_vs_reference": fit, "noise_floor": floor,
            "fd_ratio": fit["fd"] / max(floor["fd"], 1e-12),
            "sw2_ratio": fit["sw2"] / max(floor["sw2"], 1e-12), "samples": samples}


# --- checkpoint --------------------------------------------------------------------------------------------


def pca_2d(reference_samples: Tensor, *others: Tensor) -> list[Tensor]:
    """Project flattened sample sets onto the reference's top-2 principal axes (for 2-D pictures)."""
    r = reference_samples.flatten(1).float()
    mean = r.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(r - mean, q=2, center=False)
    return [(x.flatten(1).float() - mean) @ v for x in (reference_samples, *others)]


