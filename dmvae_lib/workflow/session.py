"""The setup cell of every notebook in one call: config, run directory, device, figure store.

    s = start("toy", "10_toy_gradient_fields", preset, overrides, seed=seed, device=device,
              run_root=run_root, run_name=run_name)

`run_root=""` resolves to $DMVAE_RUNS, else the repository's `runs/` (never the notebook's own folder, so
executed notebooks and artifacts stay out of nbval's test path).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..configs import make_config, to_dict
from ..runtime import weights
from ..runtime.device import resolve_device, seed_all, set_threads
from ..runtime.runs import SUMMARY, RunDir, RunError, default_run_name, is_finished
from ..viz.figures import FigureStore, in_notebook

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_run_root(run_root: str = "") -> Path:
    if run_root:
        return Path(run_root).expanduser().resolve()
    if os.environ.get("DMVAE_RUNS"):
        return Path(os.environ["DMVAE_RUNS"]).expanduser().resolve()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "runs"
    return Path.cwd() / "runs"


@dataclass
class Session:
    cfg: Any
    run: RunDir
    device: torch.device
    figures: FigureStore
    preset: str

    def finish(self, summary: Mapping[str, Any], models: Sequence[Any] = ()) -> dict:
        """Write summary.json (with the figure paths and, under `weights`, the path and SHA-256 of every
        pretrained weights file behind the summary's numbers and the `models` — modules, or anything carrying
        weights records, e.g. a `text` reference built on a text tower: `runtime.weights.files_of`) and
        return it."""
        paths = self.figures.flush()
        out = {"preset": self.preset, **dict(summary),
               "figures": [str(p.relative_to(self.run.path)) for p in paths]}
        found = weights.files_of(summary, *models)
        if found:
            out["weights"] = found
        self.run.write_summary(json.loads(json.dumps(out, default=float)))
        return out


def resolve_config(stage: str, preset: str, overrides: Mapping[str, Any] | None = None, *,
                   seed: int = 0) -> Any:
    """The config a notebook's `start` builds (strict); the pipeline builds it too, before any kernel
    starts."""
    return make_config(stage, preset, {"seed": seed, **dict(overrides or {})})


def config_record(stage: str, preset: str, cfg: Any) -> dict:
    """What `start` records as the run's config (config.json's "config"; a reopen must match it)."""
    return {"stage": stage, "preset": preset, **to_dict(cfg)}


def start(stage: str, notebook: str, preset: str, overrides: Mapping[str, Any] | None = None, *,
          seed: int = 0, device: str = "auto", run_root: str = "", run_name: str = "") -> Session:
    """Resolve the config (strictly), pick the device, and create or reopen the run directory.

    The session's RunDir holds the run folder's lock (`runs.FolderLock`) while the kernel lives: another
    process that starts the same run fails with RunLockedError naming the folder and this process's PID."""
    cfg = resolve_config(stage, preset, overrides, seed=seed)
    if in_notebook():
        notes_on_stdout()
    seed_all(seed)  # anything left on the global RNG is reproducible too
    dev = resolve_device(device)
    if getattr(cfg, "threads", 0):
        set_threads(cfg.threads)
    root = resolve_run_root(run_root)
    run = RunDir.create(root, notebook, run_name or default_run_name(preset, seed),
                        config_record(stage, preset, cfg), device=str(dev))
    return Session(cfg, run, dev, FigureStore(run.figures), preset)


def notes_on_stdout() -> None:
    """The library's log warnings (a random LPIPS backbone, a regenerated cache, a skipped image) as plain
    `note:` lines on stdout: in a notebook a red stderr box is kept for errors."""
    log = logging.getLogger("dmvae_lib")
    if not any(getattr(h, "dmvae_notes", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.dmvae_notes = True
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def upstream_run(notebook: str, artifact: str, *, path: str = "", run_name: str = "", run_root: str = "",
                 preset: str = "", accept: Optional[Callable[[dict], bool]] = None) -> Path:
    """The finished run folder of `notebook` holding `artifact`: `path` (a folder or the artifact), else the
    run named `run_name`, else the newest at `preset` whose recorded config `accept` takes (default: any).
    RunError, naming the producing notebook, if missing."""
    producer = f"notebooks/{notebook}.ipynb"
    if path:
        p = Path(path).expanduser().resolve()
        folder = p.parent if p.is_file() else p
        if not (folder / artifact).is_file():
            raise RunError(f"{folder} holds no {artifact}; pass the folder of a finished {producer} run")
        return folder
    base = resolve_run_root(run_root) / notebook
    if run_name and (base / run_name / artifact).is_file():
        return base / run_name
    finished = []
    for cfg_file in base.glob("*/config.json") if base.is_dir() else []:
        folder = cfg_file.parent
        if (folder / artifact).is_file() and is_finished(folder):
            config = json.loads(cfg_file.read_text())["config"]
            if (not preset or config.get("preset") == preset) and (accept is None or accept(config)):
                finished.append(folder)
    if not finished:
        where = f"{base / run_name}" if run_name else f"{base} (preset {preset or 'any'})"
        raise RunError(f"no finished run of {producer} with {artifact} at {where}; run {producer} first "
                       f"(e.g. `python -m dmvae_lib --only {notebook[:2]}`) or pass its run folder")
    return max(finished, key=lambda f: (f / SUMMARY).stat().st_mtime)
