"""The one training loop of the workbook.

    train(step_fn, max_steps=…, state={…}, run=…, tag=…)

`step_fn(step) -> dict[str, float | Tensor]` does one optimisation step (fetching its own batch) and returns
its numbers. The loop owns everything around it: resume from `ckpt/<tag>/last.pt`, progress bar, metrics to
`metrics.jsonl`, periodic and final checkpoints (atomic), hooks (snapshots, evaluation), and the policy for
non-finite steps: a step function reports `nonfinite > 0` (and applies no update; `phases.update` counts a
non-finite loss and an overflowing gradient alike and returns that count); the loop then raises with the
step and the last good checkpoint named, or counts the skip when `on_nonfinite="skip"`. The step's returned
dict is the only channel from a step to the loop. With `carry=True` a step may return only the numbers it
computed; a logged record keeps the latest value of every other number (e.g. the joint stage's
reconstruction loss on the steps where only the fake net trains).

No host-device sync per step. The step functions return 0-dim tensors (their `nonfinite` count included)
and the loop reads them on the host only where it needs numbers: when it logs, runs a hook, checkpoints or
finishes (`to_host`, one transfer per device). Until then the steps' counts wait in a short queue; the
loop settles them in order, so `on_nonfinite="raise"` names the first non-finite step and the checkpoint
before it, and never writes a checkpoint after it. A count already on the host (a CPU run, a plain number)
is settled at its own step, which is free. On a GPU a non-finite step is found up to `log_every` steps
late; those steps still ran (the skipped update left the weights alone), and the run stops before its next
log, hook or checkpoint.

`state` maps names to what must survive an interruption: modules, optimizers, schedulers, EMA models,
`torch.Generator`s and plain picklable lists/dicts (restored in place).

Several processes (`ctx`, `run` on rank 0 only; see runtime/distributed.py): every rank calls `train` with
the same arguments. Each rank's generators are saved in rank 0's checkpoint (`rank_generators`); all other
state is rank 0's. A finished checkpoint loads under any world size (how a notebook picks up a `ddp_fit` run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..runtime.distributed import (
    DistContext,
    all_reduce_max,
    all_reduce_tensor_max,
    broadcast_object,
    gather_objects,
)
from ..runtime.runs import RunDir, RunError, load_checkpoint, load_state_strict, save_checkpoint


class NonFiniteError(RuntimeError):
    """A training step produced non-finite values."""


_MAX_PENDING = 1000  # steps whose counts may wait on the device before the loop reads them anyway


def to_host(stats: Mapping[str, Any]) -> dict[str, Any]:
    """`stats` with every tensor replaced by its Python number (float, or int for an integer tensor): one
    device-to-host transfer per device, so the only sync of a logging step."""
    out = dict(stats)
    by_device: dict[torch.device, list[str]] = {}
    for key, value in stats.items():
        if torch.is_tensor(value):
            by_device.setdefault(value.device, []).append(key)
    for keys in by_device.values():
        # float64 holds every float32 and every count exactly: the numbers are those float() would give
        values = torch.stack([stats[k].detach().reshape(()).to(torch.float64) for k in keys]).tolist()
        for key, value in zip(keys, values):
            out[key] = value if stats[key].is_floating_point() else int(value)
    return out


def _on_host(value: Any) -> bool:
    return not torch.is_tensor(value) or value.device.type == "cpu"


def _capture(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, obj in state.items():
        if isinstance(obj, torch.Generator):
            out[name] = obj.get_state()
        elif hasattr(obj, "state_dict"):
            out[name] = obj.state_dict()
        else:
            out[name] = obj
    return out


def _restore(state: Mapping[str, Any], saved: Mapping[str, Any], source: str) -> None:
    missing = [k for k in state if k not in saved]
    if missing:
        raise RunError(f"{source} lacks state {missing}; it has {sorted(saved)}")
    for name, obj in state.items():
        if isinstance(obj, torch.Generator):
            obj.set_state(saved[name])
        elif isinstance(obj, torch.nn.Module):
            load_state_strict(obj, saved[name], f"{source} [{name}]")
        elif hasattr(obj, "load_state_dict"):
            obj.load_state_dict(saved[name])
        elif isinstance(obj, list):
            obj[:] = saved[name]
        elif isinstance(obj, dict):
            obj.clear()
            obj.update(saved[name])
        else:
            raise RunError(f"cannot restore state {name!r} of type {type(obj).__name__}")


def _resume_point(run: RunDir | None, tag: str, ctx: DistContext, max_steps: int) -> tuple[dict | None,
                                                                                           Path | None]:
    """(checkpoint or None, rank 0's checkpoint path) on every rank; one no rank can read raises on all. Every
    rank reads the file rank 0 names (one node or a shared filesystem), which keeps a full-scale checkpoint
    out of a broadcast through every GPU's memory."""
    file = None if run is None else run.ckpt_path(tag)
    exists = file is not None and file.exists()
    if ctx.distributed:  # the other ranks have no run: they wait for rank 0's answer
        file, exists = broadcast_object((file, exists), ctx)
    saved, error = None, None
    if exists:
        try:
            saved = load_checkpoint(file, required=("step", "state"))
        except RunError as exc:
            if not ctx.distributed:
                raise
            error = f"rank {ctx.rank}: {exc}"
    if ctx.distributed:
        if all_reduce_max(float(error is not None), ctx) > 0:
            raise RunError(error or f"another rank could not read {file} (see its error); every rank reads "
                                    "the checkpoint itself: one node, or the run folder on a shared "
                                    "filesystem")
        step = -1 if saved is None else saved["step"]
        if all_reduce_max(step, ctx) != -all_reduce_max(-step, ctx):  # e.g. a stale network-filesystem cache
            raise RunError(f"the ranks read different checkpoints at {file} (this rank: step {step})")
    writers = len(saved.get("rank_generators", [None])) if saved else ctx.world_size
    if writers != ctx.world_size and saved["step"] < max_steps:  # a finished fit loads under any world size
        raise RunError(f"{file} was written by {writers} process(es); resume it with {writers}, not "
                       f"{ctx.world_size} (each rank's data generator is part of the state)")
    return saved, file


@dataclass
class _Ledger:
    """What the loop knows about past steps: those whose non-finite counts are not read yet, the skips
    counted, and the last checkpoint written (named when a run stops)."""

    tag: str
    on_nonfinite: str
    last_ckpt: Optional[Path] = None
    skipped: int = 0
    pending: list = field(default_factory=list)  # (step, its stats)

    def settle(self) -> None:
        """Read the waiting steps' counts (one transfer), in order: raise at the first non-finite step, or
        count the skips."""
        counts = to_host({str(i): s.get("nonfinite", 0) for i, (_, s) in enumerate(self.pending)})
        for (step, step_stats), count in zip(self.pending, counts.values()):
            if count > 0:
                if self.on_nonfinite == "raise":
                    raise NonFiniteError(f"{self.tag}: non-finite values at step {step} "
                                         f"({to_host(step_stats)}); last good checkpoint: "
                                         f"{self.last_ckpt or 'none'}")
                self.skipped += 1
        self.pending.clear()


def _agreed_count(count: int | Tensor, ctx: DistContext) -> int | Tensor:
    """The step's non-finite count, one decision for all ranks (a rank may be the only one to report)."""
    if not ctx.distributed:
        return count
    return all_reduce_tensor_max(count, ctx) if torch.is_tensor(count) else int(all_reduce_max(count, ctx))


def _save(run: Optional[RunDir], tag: str, state: Mapping[str, Any], step: int, stats: Mapping[str, Any],
          ctx: DistContext, keep_every: int) -> None:
    """Rank 0 writes `ckpt/<tag>/last.pt` (and a kept copy every `keep_every` steps). Under DDP a collective:
    every rank's generators are gathered into rank 0's checkpoint."""
    generators = None
    if ctx.distributed:
        mine = {k: v.get_state() for k, v in state.items() if isinstance(v, torch.Generator)}
        generators = gather_objects(mine, ctx)
    if run is None:
        return
    payload = {"step": step, "tag": tag, "state": _capture(state), "stats": to_host(stats)}
    if generators is not None:
        payload["rank_generators"] = generators
    save_checkpoint(run.ckpt_path(tag), payload)
    if keep_every and step % keep_every == 0:
        save_checkpoint(run.ckpt_path(tag, step), payload)


def train(
    step_fn: Callable[[int], Mapping[str, float | Tensor]],
    *,
    max_steps: int,
    state: Mapping[str, Any],
    run: Optional[RunDir] = None,
    tag: str = "train",
    log_every: int = 50,
    ckpt_every: int = 0,
    keep_every: int = 0,
    hooks: Sequence[tuple[int, Callable[[int], None]]] = (),
    on_nonfinite: str = "raise",
    carry: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Run `step_fn` from the last checkpoint (or 0) to `max_steps`; return the last step's numbers."""
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    ctx, book, start, stats = ctx or DistContext(), _Ledger(tag, on_nonfinite), 0, {}
    saved, ckpt_file = _resume_point(run, tag, ctx, max_steps)
    if saved is not None:
        book.last_ckpt = ckpt_file
        _restore(state, saved["state"], str(ckpt_file))
        if ctx.distributed and "rank_generators" in saved:
            for name, gen_state in saved["rank_generators"][ctx.rank].items():
                state[name].set_state(gen_state)
        start, stats = saved["step"], saved.get("stats", {})
    bar = tqdm(range(start, max_steps), desc=tag, disable=not progress, leave=False, initial=start,
               total=max_steps)
    for step in bar:
        new = dict(step_fn(step))
        count = _agreed_count(new.get("nonfinite", 0), ctx)
        stats = {**{k: v for k, v in stats.items() if k != "nonfinite"}, **new} if carry else new
        if "nonfinite" in new or ctx.distributed:
            stats["nonfinite"] = count
        book.pending.append((step, stats))
        done = step + 1
        log = done % log_every == 0 or done == max_steps
        due = [hook for every, hook in hooks if done % every == 0 or done == max_steps]
        save = ckpt_every and done % ckpt_every == 0 and done != max_steps
        if log or due or save or _on_host(count) or len(book.pending) >= _MAX_PENDING:
            book.settle()  # before anything reads the weights or writes: a raise names the last checkpoint
        if log:
            stats = to_host(stats)
            if run is not None:
                run.log_metrics({"tag": tag, "step": done, "skipped": book.skipped, **stats})
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if isinstance(v, float)}, refresh=False)
        for hook in due:
            hook(done)
        if save:
            _save(run, tag, state, done, stats, ctx, keep_every)
            book.last_ckpt = ckpt_file
    if start < max_steps:
        _save(run, tag, state, max_steps, stats, ctx, keep_every)
    return to_host(stats)
