"""The one place that chooses hardware and numerics.

`resolve_device("auto")` picks CUDA, then Apple MPS, then CPU. `autocast_ctx` returns a bf16 autocast
context for the device's own type (never a hard-coded one) where the hardware has bf16, else a no-op.
Seeds go into explicit `torch.Generator`s; helpers never reseed the global RNG.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from typing import Callable, Optional

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
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:  # torch: "Expected one of cpu, cuda, … device type at start"
        raise ValueError(f"device={name!r} is not a device; use {DEVICE_NAMES}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise ValueError(f"device={name!r} requested but MPS is not available; use device='auto' or 'cpu'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r}: {device.type} is not supported here; use {DEVICE_NAMES}")
    return device


DEVICE_NAMES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware. A CPU without AVX512-BF16 or AMX emulates it, 5–60× slower
    than fp32 (measured on an AVX2 machine); `DMVAE_CPU_BF16=1` forces bf16 there anyway (e.g. to reproduce a
    bf16 run bit for bit), and `DMVAE_CPU_BF16=0` turns it off on a CPU that has it (fp32 everywhere, e.g. to
    compare runs across machines)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        forced = os.environ.get("DMVAE_CPU_BF16")
        if forced in ("0", "1"):
            return forced == "1"
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return True  # mps and others: as the backend's autocast decides


def effective_precision(device: torch.device, precision: str) -> str:
    """The numerics a config's `precision` runs at on `device`: "bf16" only where bf16 is native."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return "bf16" if precision == "bf16" and bf16_native(device) else "fp32"


def autocast_ctx(device: torch.device, precision: str = "fp32"):
    """bf16 autocast on `device` when precision == "bf16" and the device has native bf16, else a no-op."""
    if effective_precision(device, precision) == "fp32":
        if precision == "bf16":
            _warn_emulated(device)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def autocaster(device: torch.device | str,
               precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """`autocast_ctx(device, precision)` as a zero-argument callable, the `autocast` of every step."""
    return functools.partial(autocast_ctx, torch.device(device), precision)


def fused_adamw(device: torch.device | str) -> Optional[bool]:
    """AdamW's `fused=` for parameters on `device`: True on CUDA (one kernel for the whole update, no launch
    per parameter), None elsewhere, torch's default: the CPU update keeps its for-loop arithmetic, so the
    `cpu` preset's numbers do not move."""
    return True if torch.device(device).type == "cuda" else None


def compile_in_place(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`module.compile()` when `enabled` (GPU-oriented; a no-op otherwise). In place, so the state_dict keys,
    the EMA copy and the checkpoints stay those of the plain module."""
    if enabled:
        module.compile()
    return module


@functools.cache
def _warn_emulated(device: torch.device) -> None:
    """A note, once per process and device, on stdout: the fallback is the expected behaviour of a CPU
    without bf16 (this workbook's presets ask for bf16), not a fault to flag in a notebook's stderr."""
    if os.environ.get("DMVAE_CPU_BF16") == "0":
        print(f"note: precision 'bf16' requested, DMVAE_CPU_BF16=0: running fp32 on {device}", flush=True)
        return
    print(f"note: precision 'bf16' requested, but {device} has no native bf16: running fp32 (set "
          "DMVAE_CPU_BF16=1 to emulate bf16 anyway)", flush=True)


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
