"""The one training loop of the workbook.

    train(step_fn, max_steps=…, state={…}, run=…, tag=…)

`step_fn(step) -> dict[str, float]` does one optimisation step (fetching its own batch) and returns its
numbers. The loop owns everything around it: resume from `ckpt/<tag>/last.pt`, progress bar, metrics to
`metrics.jsonl`, periodic and final checkpoints (atomic), hooks (snapshots, evaluation), and the policy for
non-finite steps: a step function reports `nonfinite > 0` (and applies no update); the loop then raises
with the step and the last good checkpoint named, or counts the skip when `on_nonfinite="skip"`.

`state` maps names to what must survive an interruption: modules, optimizers, schedulers, EMA models,
`torch.Generator`s and plain picklable lists/dicts (restored in place).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .runs import RunDir, RunError, load_checkpoint, load_state_strict, save_checkpoint


class NonFiniteError(RuntimeError):
    """A training step produced non-finite values."""


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


def train(
    step_fn: Callable[[int], Mapping[str, float]],
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
    progress: bool = True,
) -> dict[str, float]:
    """Run `step_fn` from the last checkpoint (or 0) to `max_steps`; return the last step's numbers."""
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    start, last_ckpt, skipped, stats = 0, None, 0, {}
    if run is not None and run.ckpt_path(tag).exists():
        last_ckpt = run.ckpt_path(tag)
        saved = load_checkpoint(last_ckpt, required=("step", "state"))
        _restore(state, saved["state"], str(last_ckpt))
        start, stats = saved["step"], saved.get("stats", {})

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        if run is None:
            return
        payload = {"step": step, "tag": tag, "state": _capture(state), "stats": dict(stats)}
        save_checkpoint(run.ckpt_path(tag), payload)
        if keep_every and step % keep_every == 0:
            save_checkpoint(run.ckpt_path(tag, step), payload)
        last_ckpt = run.ckpt_path(tag)

    bar = tqdm(range(start, max_steps), desc=tag, disable=not progress, leave=False, initial=start, total=max_steps)
    for step in bar:
        stats = dict(step_fn(step))
        if stats.get("nonfinite", 0) > 0:
            if on_nonfinite == "raise":
                raise NonFiniteError(f"{tag}: non-finite values at step {step} ({stats}); "
                                     f"last good checkpoint: {last_ckpt or 'none'}")
            skipped += 1
        done = step + 1
        if done % log_every == 0 or done == max_steps:
            record = {"tag": tag, "step": done, "skipped": skipped, **stats}
            if run is not None:
                run.log_metrics(record)
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if isinstance(v, float)}, refresh=False)
        for every, hook in hooks:
            if done % every == 0 or done == max_steps:
                hook(done)
        if ckpt_every and done % ckpt_every == 0 and done != max_steps:
            checkpoint(done)
    if start < max_steps:
        checkpoint(max_steps)
    return stats
