"""The one place that chooses hardware and numerics.

`resolve_device("auto")` picks CUDA, then Apple MPS, then CPU. `autocast_ctx` returns a bf16 autocast
context for the device's own type (never a hard-coded one) or a no-op. Seeds go into explicit
`torch.Generator`s; helpers never reseed the global RNG.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" → cuda (if available) → mps → cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return device


def autocast_ctx(device: torch.device, precision: str = "fp32"):
    """bf16 autocast on `device` when precision == "bf16", else a no-op context."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def denormals_flushed():
    """Flush denormal floats to zero on the CPU inside the block (then back to the default, off).

    Trained nets produce denormals (SiLU of large negative inputs, softmax tails) that can slow fp32 CPU
    inference several-fold; flushing them changes values below 1e-38 only.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)


def seed_all(seed: int) -> torch.Generator:
    """Seed python, numpy and torch once at the start of a run; return a CPU generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return make_generator(seed)


def set_threads(n: int = 0) -> int:
    """Use n intra-op CPU threads (0: all cores the process may use). Returns the count in force."""
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()
