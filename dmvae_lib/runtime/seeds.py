"""Named random streams: each generator the library seeds draws from `seed + OFFSETS[name]`.

The offsets are the ones the workbook has always used, so runs stay bit-identical; a new stream takes a new
name here, never an unnamed `seed + k` at the call site.
"""

from __future__ import annotations

import torch

OFFSETS: dict[str, int] = {
    # stage 3 (joint DM training)
    "joint.head_init": 3,  # the projection head's initialisation (global RNG)
    "joint.batches": 29,  # batches, DiffAug, DM t and noise, label dropout (rank 0: one-process stream)
    "joint.fake_fm": 37,  # the fake net's t and noise on a non-CPU device
    "joint.refine": 31,  # decoder refinement batches
}


def stream_seed(seed: int, name: str) -> int:
    """The seed of stream `name` for a run seeded with `seed`."""
    if name not in OFFSETS:
        raise KeyError(f"unknown random stream {name!r}; known: {', '.join(OFFSETS)}")
    return seed + OFFSETS[name]


def stream(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator for stream `name` on `device`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, name))
