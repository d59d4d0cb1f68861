"""How close a step comes to the hardware: FLOPs counted by torch, the same run's GEMM peak, time, memory.

    flops = count_flops(fn)                 FlopCounterMode (torch's own formulas; CPU SDPA added below)
    peak  = gemm_peak(device, dtype, m, k, n)   FLOP/s of one (m×k)·(k×n) matmul, timed in this process
    mfu   = flops / seconds / peak          utilisation against the measured peak (and, on a known GPU,
                                            against its datasheet peak: `datasheet_peak`)

`saved_activation_bytes` counts the bytes autograd keeps for backward while `fn` runs (a
`saved_tensors_hooks` pack hook), on the meta device when the net is built there: no memory, no compute,
so it sizes full-scale nets on any machine. `op_breakdown` splits a step's wall time into operator classes
(matmul/conv, attention, norms, optimizer, other ops) and the time outside any operator (Python).
Nothing here synchronises inside a step: `sync` is called by the timers around it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

# Dense (no sparsity) peaks from the vendors' datasheets, FLOP/s: (bf16 tensor core, fp32 non-tensor).
# Matched by substring of torch.cuda.get_device_name(); SXM figures (PCIe/NVL parts run lower clocks).
DATASHEET_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989.4e12, 66.9e12),
    "H100": (989.4e12, 66.9e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362.05e12, 91.6e12),
    "A10G": (70e12, 31.2e12),
}


def _register_cpu_sdpa_formulas() -> None:
    """torch counts the CUDA flash/efficient attention kernels but not the CPU flash kernel; same formula."""
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
    if bwd is not None and bwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(bwd)
        def _cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                          **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_formulas()


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU); only the timers call it, never a step."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply-add = 2) of the matmuls, convolutions and attention `fn()` runs (forward, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], object], device: torch.device | str) -> float:
    """Wall seconds of `fn()`, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def gemm_peak(device: torch.device | str, dtype: torch.dtype, m: int, k: int, n: int,
              seconds: float = 0.5) -> float:
    """Measured FLOP/s of (m×k)·(k×n) matmuls in `dtype` on `device` (best of three timed bursts)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(m, k, device=dev, generator=gen).to(dtype)
    b = torch.randn(k, n, device=dev, generator=gen).to(dtype)
    out = torch.empty(m, n, device=dev, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up (kernel selection)
    best = 0.0
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        sync(dev)
        while True:
            for _ in range(4 if dev.type == "cuda" else 1):
                torch.mm(a, b, out=out)
                reps += 1
            sync(dev)
            if time.perf_counter() - start >= seconds / 3:
                break
        best = max(best, 2.0 * m * k * n * reps / (time.perf_counter() - start))
    return best


def datasheet_peak(device: torch.device | str, precision: str) -> Optional[float]:
    """The vendor's dense peak FLOP/s of a known GPU in "bf16" (tensor cores) or "fp32"; None otherwise."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for key, (bf16, fp32) in DATASHEET_PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096  # resident pages


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak (reset on entry), or on the CPU the resident set sampled
    every `interval` s by a thread (Linux), minus what was resident on entry. `.peak` in bytes."""

    def __init__(self, device: torch.device | str, interval: float = 0.002):
        self.device, self.interval, self.peak = torch.device(device), interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base, self._max = _rss_bytes(), 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self._base


class _FlashLikeAttention(torch.autograd.Function):
    """SDPA that keeps what a flash kernel keeps for backward (q, k, v, out and the fp32 log-sum-exp), so a
    meta-device count does not include the N×N attention matrix the math fallback would save."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = _SDPA(q, k, v)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - counting only, never differentiated
        raise RuntimeError("_FlashLikeAttention counts saved tensors; it has no backward")


_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def _flash_like_sdpa():
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or scale is not None or kw:
            return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         **kw)
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the storages autograd saves for backward while `fn()` runs, each storage once (views of one
    tensor count once), leaving out those of `exclude` (parameters: counted as weights, not activations).
    Attention counts as a flash kernel's. Works on real, meta and fake (FakeTensorMode) tensors."""
    def key(t: Tensor) -> int:
        return t.untyped_storage()._cdata

    skip = {key(t) for t in exclude}
    seen: dict[int, int] = {}
    held: list[Tensor] = []  # keeps the storages alive, so their keys stay unique while counting

    def pack(t: Tensor) -> Tensor:
        k = key(t)
        if k not in skip and k not in seen:
            seen[k] = t.untyped_storage().nbytes()
            held.append(t)
        return t

    with _flash_like_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


CATEGORIES = (("attention", ("attention", "sdpa", "softmax")),
              ("matmul/conv", ("mm", "linear", "matmul", "conv", "addmm", "bmm", "baddbmm")),
              ("norms", ("norm", "rsqrt", "var_mean")),
              ("optimizer", ("adam", "_foreach", "clip_grad")))


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other ops"


def op_breakdown(fn: Callable[[], object], device: torch.device | str) -> dict[str, float]:
    """Seconds of one `fn()` per operator class (the operators' own time, profiler `self` time) and
    "python/idle": the wall time no operator accounts for (Python, dispatch gaps, waiting)."""
    dev = torch.device(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    sync(dev)
    with torch.profiler.profile(activities=acts) as prof:
        start = time.perf_counter()
        fn()
        sync(dev)
        wall = time.perf_counter() - start
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if not evt.key.startswith("aten::") and dev.type == "cpu":
            continue  # profiler ranges and autograd nodes wrap aten ops, whose self time is counted
        own = (evt.self_device_time_total if dev.type == "cuda" else evt.self_cpu_time_total) / 1e6
        out[_category(evt.key)] += own
    out["python/idle"] = max(wall - sum(out.values()), 0.0)
    out["wall"] = wall
    return dict(out)
