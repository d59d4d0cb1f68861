"""Data-parallel training (PyTorch DDP) under torchrun: the process group, sharding, seeding, who writes.

    ctx = init_distributed("auto")            # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    n_local = shard_batch(cfg.fit.batch, ctx)  # each rank draws its share of the global batch
    gen = rank_generator(seed, ctx)            # data seed differs per rank; model init must not
    model = wrap_ddp(net, ctx)                 # gradients are averaged over ranks in backward
    train(..., run=main_only_run(run, ctx), ctx=ctx)  # rank 0 writes; every rank resumes from its checkpoint
    cleanup(ctx)                               # barrier, then leave the group

`with process_group(…) as ctx:` does init_distributed and cleanup, and skips the barrier if the block raised.

Without the torchrun variables (a notebook, pytest, `python script.py`) everything degrades to one process:
world_size 1, no process group, `wrap_ddp` returns the module itself, and the helpers are no-ops, so a
stage has one code path. The backend is NCCL on CUDA and gloo otherwise (CPU tests run two gloo processes).

How a stage trains under DDP (the stages point here instead of repeating it):
  * Sharding. Each rank draws `n_global / world_size` samples (and their augmentations, t and noise) from
    its own `rank_generator`; rank 0 keeps the single-process stream. DDP averages the per-rank gradients,
    and for a loss that is a mean over the batch the mean of per-shard means over equal shards is the mean
    over the global batch, so a step on the shards equals the single-process step up to float summation
    order (tests/test_distributed.py checks this to 1e-6). The model's initialisation uses the same seed on
    every rank. Quantities that must be those of the global batch (the adaptive GAN weight's gradients) go
    through `all_reduce_tensor_mean`; BatchNorm normalises with per-rank shard statistics, and its running
    statistics are averaged over ranks after each update (`average_buffers`).
  * Agreeing on skips. A step's stats go through `reduce_stats`: logged numbers are rank means and
    `nonfinite` is the maximum over ranks, so a non-finite value on any rank makes every rank skip that
    update (and the loop raise at the same step). Tensor stats are reduced as tensors on the device (one
    all-reduce, no host sync: the loop reads them only when it logs); the skip flag itself is agreed on by
    `train.phases.update` with `all_reduce_tensor_max`.
  * Writing. Only rank 0 writes metrics and checkpoints (`main_only_run`); the other ranks may pass any run.
  * Resuming. Every rank restores rank 0's `last.pt` (`loop.train`), each with its own data generator
    state, under the same world size (an unfinished checkpoint of another world size is refused).

`launch(nproc, target, args)` starts a stage under `torchrun --standalone` from a notebook cell or the
pipeline (single node). Multi-node: run `python -m torch.distributed.run --nnodes … --rdzv-endpoint …` by
hand on each node; the code path is the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .device import resolve_device
from .runs import RunDir
from .seeds import RANK_STRIDE


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its global `rank` among
    `world_size`, its `local_rank` on the node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto") -> DistContext:
    """This process's context; joins the process group (NCCL on GPU LOCAL_RANK, else gloo) when
    WORLD_SIZE > 1. Harmless when called again; ValueError without MASTER_ADDR/MASTER_PORT or with
    RANK/LOCAL_RANK out of range."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world_size}")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    ctx = DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size == 1:
        return ctx
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; start the processes with "
                         "torchrun (or distributed.launch)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return ctx


def shard_batch(n_global: int, ctx: DistContext, name: str = "batch") -> int:
    """The per-rank share of a global batch of `n_global`
    samples (`name` is the config key, for the error)."""
    if n_global % ctx.world_size:
        raise ValueError(f"{name}={n_global} is not divisible by the world size {ctx.world_size}; "
                         f"choose a multiple of {ctx.world_size}")
    return n_global // ctx.world_size


def rank_generator(seed: int, ctx: DistContext, device: torch.device | str = "cpu") -> torch.Generator:
    """This rank's data generator, seeded seed + RANK_STRIDE·rank (rank 0 keeps `seed`, the single-process
    stream); for data, t and noise draws only, never the model's initialisation."""
    return torch.Generator(device=device).manual_seed(seed + RANK_STRIDE * ctx.rank)


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """`module` (already on `ctx.device`) under DistributedDataParallel; itself when world_size is 1. Keep the
    unwrapped module for EMA, checkpoints and sampling."""
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def main_only_run(run: RunDir | None, ctx: DistContext) -> RunDir | None:
    """`run` on rank 0 and None on the other ranks, so that only rank 0 writes metrics and checkpoints."""
    return run if ctx.is_main else None


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if ctx.distributed:
        dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _all_reduce(value: float, ctx: DistContext, op) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=op)
    return float(t)


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """The mean of `value` over ranks, for logging (every rank must call it; identity in one process)."""
    if not ctx.distributed:
        return float(value)
    return _all_reduce(value, ctx, dist.ReduceOp.SUM) / ctx.world_size


def all_reduce_max(value: float, ctx: DistContext) -> float:
    """The largest `value` over ranks, so every rank takes the same decision (identity in one process)."""
    return _all_reduce(value, ctx, dist.ReduceOp.MAX) if ctx.distributed else float(value)


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Rank `src`'s `obj` (any picklable object, tensors
    included) on every rank; `obj` itself in one process."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


def gather_objects(obj, ctx: DistContext, dst: int = 0) -> list | None:
    """[obj of rank 0, obj of rank 1, …] on rank `dst` and None on the others; [obj] in one process."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def cleanup(ctx: DistContext, *, sync: bool = True) -> None:
    """Leave the process group (no-op in one process). With `sync`, first wait at a barrier: a gloo peer whose
    connections vanish while it finishes can abort. Pass `sync=False` on an error path (as `process_group`
    does), where the peers may never reach the barrier."""
    if ctx.distributed and dist.is_initialized():
        if sync:
            barrier(ctx)
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """`init_distributed(device)` for a `with` block (`with process_group("auto") as ctx: ...`); leaves the
    group at its end, synchronised unless the block raised."""
    ctx = init_distributed(device)
    try:
        yield ctx
    except BaseException:
        cleanup(ctx, sync=False)
        raise
    cleanup(ctx)


def launch(nproc: int, module_or_script: str, args: Sequence[str] = (), *,
           env: Mapping[str, str] | None = None, timeout: float | None = None,
           tail: int = 40) -> subprocess.CompletedProcess:
    """Run `module_or_script` (a .py file or existing path as a script, else `-m`) in `nproc` processes under
    this venv's `torchrun --standalone`, with `env` added; the finished process, or RuntimeError with the exit
    code and the last `tail` lines of stderr."""
    if nproc < 1:
        raise ValueError(f"nproc must be ≥ 1, got {nproc}")
    is_script = module_or_script.endswith(".py") or Path(module_or_script).is_file()
    target = [module_or_script] if is_script else ["-m", module_or_script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *target, *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **dict(env or {})}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        last = "\n".join(proc.stderr.splitlines()[-tail:])
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {' '.join(cmd)}\n--- stderr (tail) "
                           f"---\n{last}")
    return proc


def all_reduce_tensor_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of `tensor` over ranks as a new detached tensor (`tensor` itself in one process); every rank
    must call it with the same shape."""
    if not ctx.distributed:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(ctx.world_size)


def all_reduce_tensor_max(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The elementwise maximum of `tensor` over ranks as a new tensor on the collective's device (`tensor`
    itself in one process). A device collective: no host sync, so a skip flag can be agreed on in the step."""
    if not ctx.distributed:
        return tensor
    out = tensor.detach().to(_collective_device(ctx), copy=True, non_blocking=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def _collective_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def _as_float64(value, device: torch.device) -> torch.Tensor:
    """A 0-dim float64 tensor on `device`, without a host sync (a Python number is written by a fill kernel,
    not copied from host memory)."""
    if torch.is_tensor(value):
        return value.detach().reshape(()).to(device, torch.float64, non_blocking=True)
    return torch.full((), float(value), dtype=torch.float64, device=device)


def reduce_stats(stats: Mapping[str, float], ctx: DistContext,
                 max_keys: Sequence[str] = ("nonfinite",)) -> dict:
    """A step's numbers averaged over ranks, counts in `max_keys` their maximum (ints stay ints), so every
    rank logs and decides alike; every rank must pass the same keys. The identity in one process.

    With any tensor among the values the result holds 0-dim tensors (float64 means, int64 counts) and nothing
    is read on the host; with plain numbers, plain numbers."""
    if not ctx.distributed:
        return dict(stats)
    lazy = any(torch.is_tensor(v) for v in stats.values())
    device = _collective_device(ctx)
    out = {}
    for keys, op in (([k for k in stats if k not in max_keys], dist.ReduceOp.SUM),
                     ([k for k in stats if k in max_keys], dist.ReduceOp.MAX)):
        if not keys:
            continue
        t = torch.stack([_as_float64(stats[k], device) for k in keys])
        dist.all_reduce(t, op=op)
        for k, v in zip(keys, t.unbind() if lazy else t.tolist()):
            if op == dist.ReduceOp.SUM:
                out[k] = v / ctx.world_size
            else:
                out[k] = v.round().long() if lazy else round(v)
    return {k: out[k] for k in stats}  # the caller's key order


def average_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Average `module`'s floating-point buffers (BatchNorm running statistics, updated from each rank's
    shard) over ranks in place, so every rank holds what rank 0 checkpoints; no-op in one process."""
    if not ctx.distributed:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(ctx.world_size)
