"""Named random streams: each generator the library seeds draws from `seed + OFFSETS[name]`.

The offsets are the ones the workbook has always used, so runs stay bit-identical; a new stream takes a new
name here, never an unnamed `seed + k` at the call site. Offsets are distinct within a prefix (one stage's
run); streams of different stages may share an offset.
"""

from __future__ import annotations

import torch

OFFSETS: dict[str, int] = {
    # notebook 10 (the 2-D toy)
    "toy.sw2": 1,  # the fresh reference samples and random directions of the sliced-W2 score
    "toy.noise_floor": 2,  # the reference samples and directions of the SW2 noise floor
    "toy.init_points": 3,  # the free points' start, uniform in a square
    "toy.align": 4,  # the objectives' t and noise; the fake net's batches, t and noise
    "toy.sample_noise": 5,  # the noise an Euler-ODE sample of a velocity net starts from
    "toy.reference_eval": 10_000,  # the fresh reference points spread and coverage compare against
    # data
    "data.shapes_val": 7919,  # the validation split of the shapes dataset
    # SSL and supervised encoders (the seed of their SSLConfig)
    "ssl.batches": 1,  # batches and augmentations (the model's initialisation uses the seed itself)
    # notebook 20 (stage-1 tokenizer)
    "tokenizer.supervised": 1,  # the supervised classifier's SSLConfig seed (its init; batches at +1 more)
    "tokenizer.init": 5,  # the projector's and decoder's initialisation (global RNG)
    "tokenizer.disc_init": 6,  # the patch discriminator's initialisation (global RNG)
    "tokenizer.batches": 11,  # batches and DiffAug (rank 0: the single-process stream)
    "tokenizer.align_init": 7,  # the semantic-alignment maps' initialisation (global RNG, forked)
    "tokenizer.random_encoder": 8,  # encoder.kind="random": the untrained backbone and its BN calibration
    # velocity-net fitting (the teacher of notebook 30, the generator of notebook 60)
    "velocity.batches": 23,  # reference batches, and t and noise on the CPU (rank 0: one-process stream)
    "velocity.noise": 29,  # t and noise on a non-CPU device
    # notebook 30 (teacher evaluation)
    "teacher.eval": 5,  # the two reference draws the samples and the noise floor are scored against
    "teacher.text_captions": 59,  # the caption template drawn for each image (the `text` reference)
    # notebook 40 (joint DM training)
    "joint.head_init": 3,  # the projection head's initialisation (global RNG)
    "joint.batches": 29,  # the batches only: arms of one seed see the same images (rank 0: one-process)
    "joint.gan": 43,  # DiffAug and the discriminator's consistency draws
    "joint.dm": 47,  # λ's t and noise, and the fake net's label dropout
    "joint.fake_fm": 37,  # the fake net's t and noise (on the training device)
    "joint.refine": 31,  # decoder refinement batches
    "joint.align_init": 53,  # the VA arm's alignment maps (global RNG, forked)
    "joint.ref_floor": 41,  # the second reference draw behind the diagnostics' two-draw floor
    # notebook 60 (generation)
    "generation.sde": 1,  # the SDE sampler's Brownian increments (the start noise uses the seed itself)
    "generation.latent_fit": 5,  # the two latent-cache draws sampled latents are scored against
    "generation.trajectory": 7,  # the start noise of the one trajectory notebook 60 takes apart
    # notebook 80 (the authors' released models)
    "released.grid": 3,  # the grid's start noise (the same for every CFG scale)
    "released.fid": 11,  # the FID samples: part i starts from SeedSequence([this seed, i])
}

# Rank r of a multi-process run draws its data from `stream + RANK_STRIDE·r`; rank 0 keeps the
# single-process stream.
RANK_STRIDE = 1000


def stream_seed(seed: int, name: str) -> int:
    """The seed of stream `name` for a run seeded with `seed`."""
    if name not in OFFSETS:
        raise KeyError(f"unknown random stream {name!r}; known: {', '.join(OFFSETS)}")
    return seed + OFFSETS[name]


def stream(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator for stream `name` on `device`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, name))
