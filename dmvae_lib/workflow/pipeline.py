"""Run the workbook's notebooks in order through papermill: `python -m dmvae_lib --preset cpu`.

Each notebook `notebooks/NN_name.ipynb` executes into `runs/NN_name/<name>/executed.ipynb` with parameters
`preset`, `run_name=<name>` and `run_root`. Before the run name is claimed or any kernel starts, every
notebook's parameters are checked against its parameters cell (names and types), and its config (preset, seed,
`overrides`, and the parameters that become config keys) is built with `configs.make_config`, so a misspelled
or wrongly typed key fails with nothing written. A stage whose run folder already holds a `summary.json` is
skipped only if its recorded config (`config.json`) equals the requested one; an interrupted stage resumes
from its checkpoints (the notebooks reopen a run with the same config); a stage folder that holds another
config, or that another process holds (`runs.FolderLock`), is refused up front. A run name is tied to its
preset and parameters (`runs/pipeline/<name>/pipeline.json`): reusing it with others is an error, never a
silent overwrite, and one pipeline at a time holds the lock of `runs/pipeline/<name>/`. Parameters come from
the command line or a YAML file (`--params`). A Markdown report (each stage's status and headline numbers,
metrics with their protocol records, figures; the claim study's verdict first) is written to
`runs/pipeline/<name>/report.md` and its path printed. The whole pipeline runs notebook 70 reduced.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..configs import ConfigError, make_config
from ..configs.study import CLAIM_FIXED
from ..runtime.runs import FolderLock, RunError, RunLockedError, atomic_write_bytes
from .session import REPO_ROOT, config_record, resolve_config, resolve_run_root

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# The main job runs the claim study (notebook 70) reduced: one generator seed, no extra λ (≈ 2 h in full at
# `cpu`). Its SSL teacher and C1 run are the job's own notebook-30 and notebook-40 runs. Name 70 with --only
# for the full study.
REDUCED = {"70": {"claim.extra_weights": []}}  # plus the preset's first generator seed (`_main_job`)


def notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (NN_*.ipynb), in order."""
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb"))


# The config stage each notebook's `start(...)` builds (tests/test_pipeline.py checks it against the sources).
STAGE_OF = {"10": "toy", "20": "tokenizer", "30": "teacher", "40": "joint", "50": "latents",
            "60": "generation", "70": "study"}
# Notebook parameters that the notebook passes into its config as a key (besides seed and overrides) ...
CONFIG_PARAMS = {"30": {"reference": "reference.name"}, "60": {"tokenizer_file": "tokenizer_file"}}
# ... and those naming an upstream run folder, which the notebook resolves (`session.upstream_run`) and
# records.
UPSTREAM_PARAMS = ("tokenizer_run", "teacher_run", "joint_run")
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,),
          "list": (list,)}


def check_parameters(nb: Path, params: dict) -> None:
    """Raise if `params` names a parameter that the notebook's parameters cell does not declare, or gives one
    a value of another type than its declared one (an int is a float too)."""
    import papermill

    declared = papermill.inspect_notebook(str(nb))
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise SystemExit(f"error: {nb.name} has no parameter(s) {unknown}; it declares {sorted(declared)}")
    for name, value in params.items():
        types = _TYPES.get(declared[name].get("inferred_type_name") or "")
        if types and not (isinstance(value, types) and (bool in types or not isinstance(value, bool))):
            raise SystemExit(f"error: {nb.name} parameter {name!r} is "
                             f"{declared[name]['inferred_type_name']}, "
                             f"got {value!r} ({type(value).__name__})")


def _notebook_params(nb: Path, params: dict) -> dict:
    """`params` over the defaults of the notebook's parameters cell."""
    import papermill

    out = {}
    for name, p in papermill.inspect_notebook(str(nb)).items():
        try:
            out[name] = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            out[name] = None
    return {**out, **params}


def requested_record(nb: Path, params: dict) -> dict:
    """The config record (`config.json`'s "config") that `nb` will build from `params`, without a kernel.

    Builds the config as the notebook's `start(...)` does (strictly: unknown keys, wrong types and invalid
    combinations raise ConfigError); upstream-run keys keep the parameter's value ("" when the notebook
    resolves them by run name)."""
    prefix = nb.stem[:2]
    if prefix not in STAGE_OF:
        raise ConfigError(f"{nb.name}: no config stage known for it (pipeline.STAGE_OF)")
    p = _notebook_params(nb, params)
    overrides = p.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{nb.name}: overrides must be a mapping of dotted config keys, got {overrides!r}")
    keys = {key: p[name] for name, key in CONFIG_PARAMS.get(prefix, {}).items()}
    keys.update({name: p[name] for name in UPSTREAM_PARAMS if name in p and p[name]})
    stage, preset = STAGE_OF[prefix], p.get("preset")
    cfg = resolve_config(stage, preset, {**keys, **overrides}, seed=p.get("seed", 0))
    if stage == "study":  # its teacher / joint / generation overrides go to notebooks 30, 40 and 60
        for sub in ("teacher", "joint", "generation"):
            try:
                make_config(sub, preset, getattr(cfg, sub))
            except ConfigError as e:
                raise ConfigError(f"overrides[{sub!r}] (for the study's {sub} runs): {e}") from e
        for sub in ("tokenizer", "teacher", "joint", "generation"):  # the claim study's runs
            over = getattr(cfg.claim, sub)
            try:
                make_config(sub, preset, {**over, **CLAIM_FIXED.get(sub, {})})
            except ConfigError as e:
                raise ConfigError(f"overrides['claim.{sub}'] (for the claim study's {sub} runs): {e}") from e
    return json.loads(json.dumps(config_record(stage, preset, cfg)))


def check_config(nb: Path, params: dict) -> dict:
    """`requested_record`, with a ConfigError turned into the pipeline's error exit naming the notebook."""
    try:
        return requested_record(nb, params)
    except ConfigError as e:
        raise SystemExit(f"error: {nb.name}: {e}") from e


def _same_folder(recorded: Any, requested: str) -> bool:
    if not isinstance(recorded, str) or not recorded:
        return False
    p = Path(requested).expanduser().resolve()
    return Path(recorded) in (p, p.parent)  # a folder, or the artifact inside it (as session.upstream_run)


def recorded_differences(nb: Path, out_dir: Path, params: dict) -> list[str] | None:
    """None when `out_dir` holds no config.json; else the config keys whose recorded value differs from the
    requested one ([] when they agree). Upstream-run keys count only when the request names the folder."""
    file = out_dir / "config.json"
    if not file.is_file():
        return None
    try:
        recorded = json.loads(file.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{file} is unreadable ({e}); delete {out_dir} or choose another run name") from e
    requested = requested_record(nb, params)
    diffs = []
    for key in sorted(set(recorded) | set(requested),
                      key=lambda k: (k not in ("stage", "preset", "seed"), k)):
        old, new = recorded.get(key, "<absent>"), requested.get(key, "<absent>")
        if key in UPSTREAM_PARAMS:
            if new and not _same_folder(old, new):
                diffs.append(f"{key}: recorded {old!r}, requested {new!r}")
            continue
        if isinstance(old, dict) and isinstance(new, dict) and key not in ("teacher", "joint", "generation"):
            diffs += [f"{key}.{k}: recorded {old.get(k, '<absent>')!r}, requested {new.get(k, '<absent>')!r}"
                      for k in sorted(set(old) | set(new))
                      if old.get(k, "<absent>") != new.get(k, "<absent>")]
        elif old != new:
            diffs.append(f"{key}: recorded {old!r}, requested {new!r}")
    return diffs


def check_stage_folder(nb: Path, out_dir: Path, params: dict) -> bool:
    """Before a stage runs: True if it is finished with the requested config (skip it); False if it may run
    (a new or interrupted run of this config). Raises RunError for a folder that holds another config and
    RunLockedError for one that another process holds; nothing is written either way."""
    diffs = recorded_differences(nb, out_dir, params)
    finished = (out_dir / "summary.json").exists()
    if finished and diffs is None:
        raise RunError(f"{out_dir} holds a summary.json but no config.json, so what made it is unknown; "
                       f"delete {out_dir} or choose another run name")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; … {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise RunError(f"{out_dir} already holds a {'finished' if finished else 'started'} run of {nb.stem} "
                       f"with other settings ({shown}); re-run it with the same ones, pick another run name, "
                       f"or delete {out_dir}")
    if finished:
        return True
    FolderLock.probe(out_dir)
    return False


SKIPPED = "skipped (already finished)"  # execute's status for a stage whose run folder holds summary.json


def _ipc_kernel_manager() -> type:
    """A local kernel manager on IPC sockets: no TCP ports, and none of ipykernel's stderr warning about
    unencrypted TCP in the output of a notebook (notebook 70) that runs others."""
    from jupyter_client.manager import KernelManager
    from traitlets import default

    class IPCKernelManager(KernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

    return IPCKernelManager


def execute(nb: Path, out_dir: Path, params: dict) -> str:
    """Execute `nb` into `out_dir/executed.ipynb` unless `out_dir` holds a finished run; return what happened.

    `check_stage_folder` decides first, so a finished run of this config is skipped, and a folder with another
    config, or one that another process holds, raises (RunError) before papermill writes anything.
    A failing cell raises papermill's PapermillExecutionError; the partly executed notebook stays in
    out_dir."""
    import papermill

    if check_stage_folder(nb, out_dir, params):
        return SKIPPED
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    papermill.execute_notebook(str(nb), str(out_dir / "executed.ipynb"), parameters=params,
                               kernel_name="python3", cwd=str(nb.parent), progress_bar=False,
                               kernel_manager_class=_ipc_kernel_manager())
    return f"ran in {time.perf_counter() - t0:.0f} s"


def load_params_file(path: str | Path) -> dict:
    """A YAML parameter file: `preset`, `name`, `params` (every notebook) and `notebooks` (per prefix, e.g.
    `"40": {overrides: {train.dm_weight: 1.0}}`; README has an example). Unknown top-level keys raise; the
    notebooks' parameters are checked like command-line ones."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: cannot read parameter file {path}: {e}") from e
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping with keys {sorted(PARAM_FILE_KEYS)}")
    unknown = sorted(set(data) - PARAM_FILE_KEYS)
    if unknown:
        raise SystemExit(f"error: {path} has unknown key(s) {unknown}; allowed: {sorted(PARAM_FILE_KEYS)}")
    for key in ("params", "notebooks"):
        if not isinstance(data.get(key, {}), dict):
            raise SystemExit(f"error: {path}: {key!r} must be a mapping")
    data["notebooks"] = {str(k): v for k, v in data.get("notebooks", {}).items()}
    return data


PARAM_FILE_KEYS = {"preset", "name", "params", "notebooks"}


def _check_claim(record_file: Path, identity: dict) -> None:
    """Raise if the pipeline run name is tied to other settings (reads only)."""
    if record_file.exists():
        old = json.loads(record_file.read_text())
        if old != identity:
            raise SystemExit(f"error: pipeline run {record_file.parent.name!r} already exists with other "
                             f"settings ({old}); re-run it with the same ones to resume, or pick another "
                             "--name "
                             f"(or delete {record_file.parent} and the stage folders of that name)")


def _claim(record_file: Path, identity: dict) -> None:
    """Tie a pipeline run name to its preset and parameters: reusing the name with others raises."""
    _check_claim(record_file, identity)
    if record_file.exists():
        return
    record_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(record_file,
                       lambda f: f.write(json.dumps(identity, indent=1, sort_keys=True).encode()))


def run(preset: str, name: str, run_root: Path, extra: dict, only: list[str] | None = None,
        per_notebook: dict[str, dict] | None = None, nproc: int = 1) -> Path:
    """Run the stages in order (validated first); write and return the Markdown report. `nproc` > 1 goes to
    the notebooks that declare an `nproc` parameter (their fits then run under torchrun on this node)."""
    import papermill

    per_notebook = per_notebook or {}
    stages = [nb for nb in notebooks() if not only or any(nb.stem.startswith(o) for o in only)]
    if not stages:
        raise SystemExit(f"error: no notebook matches {only} in {NOTEBOOK_DIR}")
    stray = sorted(k for k in per_notebook if not any(nb.stem.startswith(k) for nb in notebooks()))
    if stray:
        raise SystemExit(f"error: per-notebook parameters for {stray}: no such notebook in {NOTEBOOK_DIR}")
    base = {"preset": preset, "run_name": name, "run_root": str(run_root), **extra}
    params = {nb: {**base, **next((v for k, v in per_notebook.items() if nb.stem.startswith(k)), {})}
              for nb in stages}
    if not only:
        _main_job(preset, params)
    if nproc < 1:
        raise SystemExit(f"error: --nproc must be at least 1, got {nproc}")
    for nb in stages:
        if nproc > 1 and "nproc" in papermill.inspect_notebook(str(nb)):
            params[nb]["nproc"] = nproc
    for nb in stages:  # validate everything before claiming the name or starting any kernel
        check_parameters(nb, params[nb])
        check_config(nb, params[nb])
    record = run_root / "pipeline" / name / "pipeline.json"
    identity = json.loads(json.dumps({"preset": preset, "params": extra, "notebooks": per_notebook},
                                     default=str))
    _check_claim(record, identity)
    for nb in stages:  # a stage folder of other settings, or one in use, refuses before anything is written
        try:
            check_stage_folder(nb, run_root / nb.stem / name, params[nb])
        except RunError as e:
            raise SystemExit(f"error: {e}") from e
    try:
        lock = FolderLock.acquire(record.parent)  # one pipeline per name; released when this process ends
    except RunLockedError as e:
        raise SystemExit(f"error: pipeline run {name!r}: {e}") from e
    try:
        _claim(record, identity)
        rows = []
        for nb in stages:
            out_dir = run_root / nb.stem / name
            mark = "skip" if (out_dir / "summary.json").exists() else "run "
            print(f"[{mark}] {nb.stem} -> {out_dir}", flush=True)
            rows.append((nb.stem, execute(nb, out_dir, params[nb]), out_dir))
        return write_report(record.parent / "report.md", name, preset, rows)
    finally:
        lock.release()


def _main_job(preset: str, params: dict[Path, dict]) -> None:
    """The whole pipeline's notebook 70 runs the claim study reduced (`REDUCED`); the user's own `claim.*`
    overrides still win."""
    seed = make_config("study", preset).claim.seeds[0]
    for nb, p in params.items():
        for prefix, reduced in REDUCED.items():
            if nb.stem.startswith(prefix):
                p["overrides"] = {"claim.seeds": [seed], **reduced, **p.get("overrides", {})}


def _numbers(d, prefix: str = "", depth: int = 0) -> list[tuple[str, float]]:
    """(dotted key, value) of the numeric leaves of a summary (lists, protocol records and paths left out)."""
    out = []
    if isinstance(d, dict) and depth < 4:
        for k, v in d.items():
            if k in ("figures", "protocol", "cells", "tables", "table", "claim", "runs", "grid") \
                    or k.endswith(("_run", "_label")):
                continue
            key = f"{prefix}{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                label = d.get(f"{k}_label") or (d.get("feature_space") if k == "value" else None)
                out.append((f"{key} [{label}]" if isinstance(label, str) else key, float(v)))
            elif isinstance(v, dict):
                out += _numbers(v, key + ".", depth + 1)
    return out


def _protocol_rows(out_dir: Path) -> list[str]:
    file = out_dir / "evaluation.json"
    if not file.exists():
        return []
    rows = ["| metric | value | feature space | N | sampler × steps | CFG | EMA | seed "
            "| SHA-256 (first 12) |",
            "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in json.loads(file.read_text()):
        p = r.get("protocol", {})
        hashes = ", ".join(f"{k} {v['sha256'][:12]}" for k, v in (p.get("files") or {}).items()
                           if isinstance(v, dict) and v.get("sha256"))  # a file not used has sha256 None
        value = r.get("value")
        if value is None:
            notes.append(f"- `{r.get('metric')}` not computed: {r.get('reason', 'no value recorded')}")
        rows.append(f"| {r.get('metric')} | {'not computed' if value is None else f'{value:.4g}'} | "
                    f"{r.get('feature_space') or '—'} | {p.get('n_samples', '')} | {p.get('sampler', '')} × "
                    f"{p.get('steps', '')} | {p.get('cfg_scale', '')} | {p.get('ema', '')} | "
                    f"{p.get('seed', '')} | {hashes} |")
    return rows + ([""] + notes if notes else [])


def _earlier_run(out_dir: Path) -> str:
    """'; ran 236 s, ended 2026-11-30 04:46 UTC' from
    papermill's record in executed.ipynb ('' when unreadable)."""
    try:
        meta = json.loads((out_dir / "executed.ipynb").read_text())["metadata"]["papermill"]
        return f"; ran {meta['duration']:.0f} s, ended {meta['end_time'][:16].replace('T', ' ')} UTC"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _claim_headline(summary: dict) -> list[str]:
    """The claim study's verdict, gates and per-arm table (notebook 70's summary) as Markdown."""
    c = summary["claim"]
    lines = ["## Headline: does distribution matching pay? (notebook 70)", "",
             f"**Verdict ({c.get('space')}, FD to real images): {c.get('outcome', '?').upper()}** — "
             f"{c.get('reason', '')}", ""]
    if summary.get("reduced"):
        lines += [f"*Reduced study: {summary['reduced']}*", ""]
    if "psnr_gain_db" in c:
        th, ok = c["thresholds"], {True: "pass", False: "FAIL"}
        lines += [f"- PSNR gain of a trainable encoder over A: {c['psnr_gain_db']:.2f} dB "
                  f"(gate ≥ {th['min_psnr_gain_db']} dB: {ok[bool(c['psnr_gate'])]})",
                  f"- C0 drift: FD to the reference {c['drift_ratio']:.2f}× its floor "
                  f"(gate ≥ {th['min_drift_ratio']}×: {ok[bool(c['drift_gate'])]})"]
    for arm, cmp in (c.get("comparisons") or {}).items():
        lines.append(f"- C1 vs {arm}: {cmp['mean']:+.3f} ± {cmp['se']:.3f} mean log-FD (n = {cmp['n']}; "
                     "> 0: C1 better)")
    table = summary.get("table") or {}
    if table:
        cols = list(table)
        arms_ = list(next(iter(table.values())))
        lines += ["", "| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(_cell(table[k].get(a)) for k in cols) + " |" for a in arms_]
    return lines


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def write_report(file: Path, name: str, preset: str, rows: list[tuple[str, str, Path]]) -> Path:
    """Markdown: stage table, each stage's headline numbers,
    metric protocol records, figures (as PNG links)."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, file.parent)

    intro = (f"Written {_dt.datetime.now():%Y-%m-%d %H:%M:%S}. Each stage's run folder holds its executed "
             "notebook, config, metrics.jsonl, figures and checkpoints.")
    out = [f"# Pipeline run `{name}` (preset `{preset}`)", "", intro, "",
           "| stage | this invocation | run folder |",
           "|---|---|---|"]
    out += [f"| {stage} | {status}{_earlier_run(d) if status == SKIPPED else ''} | [{rel(d)}]({rel(d)}) |"
            for stage, status, d in rows]
    for stage, _, d in rows:  # the claim study's verdict leads the report
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        if isinstance(summary.get("claim"), dict):
            out += ["", *_claim_headline(summary)]
    for stage, _, d in rows:
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        out += ["", f"## {stage}", ""]
        if not summary:
            out.append("No summary.json: the stage did not finish.")
            continue
        nums = _numbers(summary)
        if nums:
            out += ["| quantity | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in nums[:60]]
            if len(nums) > 60:
                out.append(f"({len(nums) - 60} more in `{rel(d / 'summary.json')}`)")
        protocol = _protocol_rows(d)
        if protocol:
            out += ["", "Metrics with their protocol records (`evaluation.json`):", ""] + protocol
        pngs = [f for f in summary.get("figures", []) if f.endswith(".png")]
        if pngs:
            out += [""] + [f"![{Path(f).stem}]({rel(d / f)})" for f in pngs]
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, lambda f: f.write("\n".join(out).encode()))
    return file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=["smoke", "cpu", "imagenet256"],
                    help="default: the parameter file's, else cpu")
    ap.add_argument("--name", default="", help="run name shared by every stage (default: <preset>_main); "
                                                 "re-running the same name resumes and skips finished stages")
    ap.add_argument("--run-root", default="", help="default: $DMVAE_RUNS or <repo>/runs")
    ap.add_argument("--only", nargs="*",
                    help="notebook prefixes to run, e.g. 10 20 (default: all; notebook 70, the claim "
                         "study, then runs reduced to one generator seed)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="processes per fit (DDP under torchrun) for the notebooks "
                                                         "with an `nproc` parameter; one node")
    ap.add_argument("--params", default="", metavar="YAML",
                    help="parameter file (preset, name, params, notebooks)")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                    help="extra notebook parameter for every notebook, JSON-decoded, e.g. -p seed 3")
    args = ap.parse_args(argv)
    file = load_params_file(args.params) if args.params else {}
    preset = args.preset or file.get("preset", "cpu")
    if preset not in ("smoke", "cpu", "imagenet256"):
        raise SystemExit(f"error: unknown preset {preset!r} in {args.params}; use smoke, cpu or imagenet256")
    extra = {**file.get("params", {}), **{k: json.loads(v) for k, v in args.param}}
    name = args.name or file.get("name") or f"{preset}_main"
    report = run(preset, name, resolve_run_root(args.run_root), extra, args.only, file.get("notebooks", {}),
                 nproc=args.nproc)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
