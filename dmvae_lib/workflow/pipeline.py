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
the command line or a YAML file (`--params`). A Markdown report (the stages' status, the claim study's
verdict, then per stage its headline numbers with what they mean and its key figure; every number and the
metrics' protocol records in an appendix) is written to `runs/pipeline/<name>/report.md` and its path
printed. The whole pipeline runs notebook 70 reduced.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from ..configs import PRESETS, ConfigError, make_config
from ..configs.study import CLAIM_FIXED, MAIN_JOB_V2
from ..runtime.device import resolve_device
from ..runtime.runs import FolderLock, RunError, RunLockedError, atomic_write_bytes, is_finished, read_summary
from .session import REPO_ROOT, config_record, resolve_config, resolve_run_root

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# The main job runs the claim study version 2 (notebook 71) reduced: its first joint seed only, which
# resolves no claim (the report says so), and at `cpu` every stage shortened (a rehearsal: MAIN_JOB_V2).
# Version 1 (notebook 70, superseded) runs only when named: `--only 70` (reduced the same way, one generator
# seed and no extra λ, when the whole pipeline runs it). Notebook 80 (the authors' released models) is no
# stage of the pipeline: it runs when named (`--only 80`, at imagenet256 with the released files).
MAIN_JOB_SKIPS = ("70", "80")


def reduced_overrides(prefix: str, preset: str) -> dict:
    """What the whole pipeline sets on notebook `prefix` (a claim study: its first seed only; {} else)."""
    study = make_config("study", preset)
    if prefix == "70":
        return {"claim.seeds": list(study.claim.seeds[:1]), "claim.extra_weights": []}
    if prefix == "71":
        return MAIN_JOB_V2.get(preset) or {"claim_v2.joint_seeds": list(study.claim_v2.joint_seeds[:1])}
    return {}


def notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (NN_*.ipynb), in order."""
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb"))


# The config stage each notebook's `start(...)` builds (tests/test_pipeline.py checks it against the sources).
STAGE_OF = {"10": "toy", "20": "tokenizer", "30": "teacher", "40": "joint", "50": "latents",
            "60": "generation", "70": "study", "71": "study", "80": "released"}
# Notebook parameters that the notebook passes into its config as a key (besides seed and overrides) ...
CONFIG_PARAMS = {"30": {"reference": "reference.name"}, "60": {"tokenizer_file": "tokenizer_file"},
                 "80": {"tokenizer_path": "files.tokenizer", "generator_path": "files.generator",
                        "images": "images.folder"}}
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
    check_values(nb, params)


def check_values(nb: Path, params: dict) -> None:
    """Parameters with a closed set of values, checked before anything is written (the kernel would reject
    them only after papermill has created the run folder and its executed.ipynb)."""
    if "device" in params:
        try:
            resolve_device(params["device"])
        except ValueError as e:
            raise SystemExit(f"error: {nb.name} parameter 'device': {e}") from e
    if "preset" in params and params["preset"] not in PRESETS:
        raise SystemExit(f"error: {nb.name} parameter 'preset' {params['preset']!r} unknown; use one of "
                         f"{', '.join(PRESETS)}")
    if "nproc" in params and params["nproc"] < 1:
        raise SystemExit(f"error: {nb.name} parameter 'nproc' must be at least 1, got {params['nproc']}")


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
        for version in ("claim", "claim_v2"):  # the claim studies' runs
            for sub in ("tokenizer", "teacher", "joint", "generation"):
                over = getattr(getattr(cfg, version), sub)
                try:
                    make_config(sub, preset, {**over, **CLAIM_FIXED.get(sub, {})})
                except ConfigError as e:
                    raise ConfigError(f"overrides['{version}.{sub}'] (for the claim study's {sub} runs): "
                                      f"{e}") from e
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
    finished = is_finished(out_dir)
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


# AF_UNIX socket paths end at 107 bytes (Linux; 103 on macOS); a kernel's are `<base>/dmvae-kernel-XXXXXXXX/
# kernel-ipc-N`, about 40 bytes past the temporary folder's base.
_SOCKET_PATH_MAX = 100


def _kernel_folder_base() -> str:
    """Where the kernels' private folders go: the temporary directory, or /tmp when that is so long (a deep
    TMPDIR) that the socket paths inside it would pass the AF_UNIX limit."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + 40 > _SOCKET_PATH_MAX and os.access("/tmp", os.W_OK):
        base = "/tmp"
    return base


def _ipc_kernel_manager(folder: Path) -> type:
    """A local kernel manager on IPC sockets whose connection file and socket files all live in `folder`.

    IPC rather than TCP: no ports to pick (picking a free TCP port and binding it later races against other
    launches), and none of ipykernel's stderr warning about unencrypted TCP in the output of a notebook
    (notebook 70) that runs others. Each execution needs a folder of its own: for transport "ipc" the `ip`
    trait is the sockets' path prefix, and jupyter_client and ipykernel number the sockets `<ip>-N` by the
    first unused N. With the default relative prefix `kernel-ipc` the kernel created them in its cwd (the
    checkout's notebooks/), and two launches started together took the same names, so each one's client
    talked to the other's kernel ("Invalid Signature", "Kernel didn't respond in 60 seconds")."""
    from jupyter_client.manager import KernelManager
    from traitlets import default

    connection_file, prefix = str(folder / "kernel.json"), str(folder / "kernel-ipc")
    if len(os.fsencode(prefix)) + 4 > _SOCKET_PATH_MAX:
        raise RuntimeError(f"kernel socket prefix {prefix} is too long for a unix socket path "
                           f"({_SOCKET_PATH_MAX} bytes at most); set TMPDIR to a shorter folder")

    class IPCKernelManager(KernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("connection_file")
        def _connection_file_default(self) -> str:
            return connection_file

        @default("ip")
        def _ip_default(self) -> str:
            return prefix

    return IPCKernelManager


def execute(nb: Path, out_dir: Path, params: dict) -> str:
    """Execute `nb` into `out_dir/executed.ipynb` unless `out_dir` holds a finished run; return what happened.

    `check_stage_folder` decides first, so a finished run of this config is skipped, and a folder with another
    config, or one that another process holds, raises (RunError) before papermill writes anything.
    A failing cell raises papermill's PapermillExecutionError; the partly executed notebook stays in
    out_dir. The kernel's connection file and sockets go to a private temporary folder
    (`_ipc_kernel_manager`), removed afterwards, so any number of executions may start at once and nothing
    lands in the checkout."""
    import papermill

    if check_stage_folder(nb, out_dir, params):
        return SKIPPED
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="dmvae-kernel-", dir=_kernel_folder_base()))  # mode 0700
    try:
        papermill.execute_notebook(str(nb), str(out_dir / "executed.ipynb"), parameters=params,
                                   kernel_name="python3", cwd=str(nb.parent), progress_bar=False,
                                   kernel_manager_class=_ipc_kernel_manager(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
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
        params = {nb: p for nb, p in params.items() if not nb.stem.startswith(MAIN_JOB_SKIPS)}
        stages = [nb for nb in stages if nb in params]
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
            mark = "skip" if is_finished(out_dir) else "run "
            print(f"[{mark}] {nb.stem} -> {out_dir}", flush=True)
            rows.append((nb.stem, execute(nb, out_dir, params[nb]), out_dir))
        return write_report(record.parent / "report.md", name, preset, rows)
    finally:
        lock.release()


def _main_job(preset: str, params: dict[Path, dict]) -> None:
    """The whole pipeline runs the claim study reduced (`reduced_overrides`); the user's own overrides
    still win."""
    for nb, p in params.items():
        reduced = reduced_overrides(nb.stem[:2], preset)
        if reduced:
            p["overrides"] = {**reduced, **p.get("overrides", {})}


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


def _protocol_line(out_dir: Path) -> str:
    """One line on a stage's evaluation.json: the metrics it records, how the generated samples were drawn,
    and what was not computed ('' without the file)."""
    file = out_dir / "evaluation.json"
    if not file.exists():
        return ""
    records = json.loads(file.read_text())
    done = [str(r.get("metric")) for r in records if r.get("value") is not None]
    missing = [str(r.get("metric")) for r in records if r.get("value") is None]
    gen = next((r.get("protocol", {}) for r in records
                if (r.get("protocol", {}).get("files") or {}).get("generator")), None)
    line = f"Protocol records (`evaluation.json`, in full in the appendix): {', '.join(done) or 'none'}"
    if gen:
        line += (f"; samples: N {gen.get('n_samples')}, {gen.get('sampler')} × {gen.get('steps')} steps, "
                 f"CFG {gen.get('cfg_scale')}, EMA {gen.get('ema')}, seed {gen.get('seed')}")
    return line + (f"; not computed: {', '.join(missing)}." if missing else ".")


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


def _claims_v2_headline(summary: dict) -> list[str]:
    """The claim study v2's gates and four verdicts (notebook 71's summary) as Markdown."""
    c = summary["claims"]
    lines = ["## Headline: the claim study, version 2 (notebook 71)", "",
             f"**{c.get('headline', '?')}** (claims read `{c.get('space')}`, FD to real images)", ""]
    if summary.get("reduced"):
        lines += [f"*Reduced study: {summary['reduced']}*", ""]
    ok = {True: "pass", False: "FAIL"}
    lines += [f"- {name} gate: {ok[bool(g.get('passed'))]} — {g.get('reason', '')}"
              for name, g in (c.get("gates") or {}).items()]
    for claim in (c.get("claims") or {}).values():
        gen, p = claim["generation"], claim["psnr"]
        lines.append(f"- {claim['claim']} (C1 vs {claim['versus']}): **{claim['outcome']}** — "
                     f"generation {_cell(gen['mean'])} ± {_cell(gen['se'])}, PSNR {_cell(p['mean'])} ± "
                     f"{_cell(p['se'])} dB (mean ± standard error, n = {gen['n']})")
    return lines


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _fmt(v) -> str:
    """A number at 4 significant digits (a whole number in full, below a million), anything else as text."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or (v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    return f"{v:.4g}"


class Headline(NamedTuple):
    """One headline number of a stage's summary.json, for the report.

    `path`: dotted keys into the summary; a segment `#i` is the i-th key (or list item), one `*` takes every
    key or item (one line for all, each item named by its key or by the `each` template). `fmt`: how the
    value prints, `{}` receiving it at 4 significant digits. `meaning`: one sentence on what the value says,
    or alternatives, the first whose fields all resolve; a field is `{path}`, or `{path OP path:spec}` with
    OP one of / - + * (e.g. `{dm.ref_fd / dm.ref_fd_floor:.2f}`), read from the same summary. A number whose
    path is absent is left out; a meaning whose fields are absent is left out."""
    path: str
    label: str
    fmt: str
    meaning: str | tuple[str, ...]
    each: str = ""  # for a `*` path: how one item prints, its fields read from the item


_APPENDIX_ROWS = 60  # numbers per stage in the report's appendix; the rest stay in its summary.json
# Per notebook prefix: its title, its key figure (a figure's stem; else its first PNG), its headline numbers.
# Every number and every floor or ceiling beside it is read from the stage's own summary.json.
REPORT_STAGES: dict[str, tuple[str, str, tuple[Headline, ...]]] = {
    "10": ("Toy gradient fields", "fig3_point_clouds", (
        Headline("objectives.dm.sw2", "DM objective: SW2 to the reference", "{}",
                 "{objectives.dm.sw2 / noise_floor:.2f}× the noise floor {noise_floor} (independent samples "
                 "of the reference: 1× is what a perfect fit scores); measured *{verdicts.dm.measured}*, the "
                 "paper: *{verdicts.dm.paper}*"),
        Headline("objectives.real_fm_target.sw2", "Real-score maximisation (real_fm_target): SW2", "{}",
                 "{objectives.real_fm_target.sw2 / noise_floor:.1f}× the floor, coverage "
                 "{objectives.real_fm_target.coverage} against DM's {objectives.dm.coverage}: measured "
                 "*{verdicts.real_fm_target.measured}*, the paper: *{verdicts.real_fm_target.paper}*"),
        Headline("objectives.fake_fm_target.sw2", "Fake-score maximisation (fake_fm_target): SW2", "{}",
                 "spread {objectives.fake_fm_target.spread_ratio}× the reference's: measured "
                 "*{verdicts.fake_fm_target.measured}*, the paper: *{verdicts.fake_fm_target.paper}*"),
    )),
    "20": ("Tokenizer pretraining", "reconstructions", (
        Headline("tokenizer.psnr", "Val PSNR", "{} dB",
                 ("the stage-1 tokenizer's reconstructions of held-out images; SSIM {tokenizer.ssim}, LPIPS "
                  "{tokenizer.lpips}, {tokenizer.lpips_label}",
                  "the stage-1 tokenizer's reconstructions of held-out images")),
        Headline("tokenizer.fd", "rFD", "{}",
                 "reconstructions against the same {tokenizer.fd_n} held-out images in {tokenizer.fd_label}: "
                 "what the stage-1 tokenizer loses, a floor for any generator that decodes through it"),
        Headline("encoders.ssl.knn_acc", "SSL encoder kNN accuracy", "{}",
                 "linear probe {encoders.ssl.linear_acc}; the supervised classifier reaches "
                 "{encoders.supervised.val_acc} on val: the class information the reference encoders carry"),
        Headline("latent_probe.linear_acc", "Latent linear probe", "{}",
                 "kNN {latent_probe.knn_acc} on the tokenizer's {latent_probe.dim}-dim latents "
                 "({latent_probe.n_val} held-out images): the class structure that survives into the "
                 "latents"),
    )),
    "30": ("Teacher fitting", "samples_vs_reference", (
        Headline("evaluation.samples_vs_reference.fd", "FD of the teacher's samples to the reference", "{}",
                 "{evaluation.fd_ratio:.2f}× the floor {evaluation.noise_floor.fd} of two reference draws of "
                 "{evaluation.noise_floor.n} (1× is a perfect fit), in "
                 "{evaluation.samples_vs_reference.fd_label}; the DM term of notebook 40 pulls the latents "
                 "toward this model, so it bounds how close they get"),
        Headline("evaluation.samples_vs_reference.sw2", "SW2 of the teacher's samples", "{}",
                 "{evaluation.sw2_ratio:.2f}× the floor {evaluation.noise_floor.sw2}"),
    )),
    "40": ("Joint DM training", "joint_ref_fd", (
        Headline("dm.ref_fd", "DM latents' FD to the reference", "{}",
                 ("{dm.ref_fd / dm.ref_fd_floor:.2f}× the floor {dm.ref_fd_floor} after {dm.step} steps "
                  "({start.ref_fd} at the start); the λ = 0 control, without the DM loss, ends at "
                  "{control.ref_fd}, {control.ref_fd / control.ref_fd_floor:.2f}× the floor",
                  "{dm.ref_fd / dm.ref_fd_floor:.2f}× the floor {dm.ref_fd_floor} after {dm.step} steps")),
        Headline("dm.val_psnr", "DM tokenizer's val PSNR", "{} dB",
                 ("{dm.val_psnr - control.val_psnr:+.2f} dB against the λ = 0 control's {control.val_psnr} "
                  "dB, {start.val_psnr} dB before joint training: the reconstruction the DM loss costs or "
                  "keeps",
                  "{start.val_psnr} dB before joint training")),
    )),
    "50": ("Latent visualisation", "latents_tsne", (
        Headline("scores.#0.*.knn", "kNN accuracy per latent set (full dimension)", "{}",
                 "leave-one-out kNN on the class labels; chance {chance_knn}"),
        Headline("discriminant.held_out_accuracy.*", "Held-out linear (LDA) accuracy per latent set", "{}",
                 "a linear discriminant fit on {discriminant.fit_points} other points: the class "
                 "information a linear read-out finds; chance {chance_knn}"),
    )),
    "60": ("Generation", "samples", (
        Headline("metrics.fd_ssl.value", "FD of the samples, SSL space", "{}",
                 "{metrics.fd_ssl.value / metrics.fd_ssl_floor.value:.1f}× the real-vs-real floor "
                 "{metrics.fd_ssl_floor.value} and {metrics.fd_ssl.value / metrics.rfd_ssl.value:.1f}× the "
                 "reconstructions' rFD {metrics.rfd_ssl.value}: the FD above rFD is what the generator adds, "
                 "in {metrics.fd_ssl.feature_space}"),
        Headline("metrics.fd_sup.value", "FD of the samples, supervised space", "{}",
                 "{metrics.fd_sup.value / metrics.fd_sup_floor.value:.1f}× its floor "
                 "{metrics.fd_sup_floor.value}, rFD {metrics.rfd_sup.value}, in "
                 "{metrics.fd_sup.feature_space}"),
        Headline("metrics.class_accuracy.value", "Class accuracy of the generated images", "{}",
                 ("at CFG {metrics.class_accuracy.protocol.cfg_scale}, under the embedded classifier: real "
                  "images reach {metrics.class_accuracy.ceiling}, the tokenizer's reconstructions "
                  "{metrics.class_accuracy.reconstruction_ceiling} (the decoder's ceiling)",
                  "under the embedded classifier: real images reach {metrics.class_accuracy.ceiling}")),
        Headline("cfg_sweep.*", "CFG sweep", "{}",
                 ("{cfg_sweep.#0.n} samples per scale from the same noise; the numbers above use CFG "
                  "{metrics.fd_ssl.protocol.cfg_scale}",
                  "{cfg_sweep.#0.n} samples per scale from the same noise"),
                 each="CFG {cfg_scale}: accuracy {accuracy}, SSL FD {fd_ssl}"),
    )),
    "71": ("Claim study, version 2", "claims_paired", (
        Headline("claims.headline", "Headline", "{}", "all four claims must be supported for it to hold"),
        Headline("claims.claims.*.outcome", "The four claims", "{}",
                 "in {claims.space}, paired by joint seed; the gates and reasons lead this report"),
    )),
    "80": ("The authors' released models", "samples_cfg1", (
        Headline("files.*.sha256", "Released files loaded", "{}", "the SHA-256 of each file as read",
                 each="{file} [{entry}]: {sha256}"),
        Headline("fixture_check.*", "Agreement with the authors' modules (the tiny fixture only)", "{}",
                 "max |ours − theirs| / max |theirs| on the fixture's stored outputs"),
        Headline("images.psnr", "Reconstruction PSNR of the image folder", "{} dB",
                 "SSIM {images.ssim}, over {images.protocol.images} images of {images.protocol.folder}"),
        Headline("images.rfid", "rFID of the reconstructions", "{}",
                 "Inception FID against the same originals ({images.protocol.images} images)"),
        Headline("fid.fid.value", "FID of the samples", "{}",
                 "{fid.protocol.n_samples} samples against {fid.fid.against}"),
    )),
    "70": ("Reference study (claim study v1, superseded)", "claim_curves", (
        Headline("claim.outcome", "Verdict", "{}",
                 "in {claim.space}, FD to real images; the gates and the per-arm table lead this report"),
        Headline("claim.other_spaces.*.outcome", "The same rule in the other feature spaces", "{}",
                 "a verdict that changes with the space is not robust"),
    )),
}


class _Missing(Exception):
    """A key path that the summary does not hold."""


def _at(d, path: str):
    """The value at a dotted key path (`#i`: the i-th key or item); _Missing when absent or null."""
    try:
        for k in path.split(".") if path else []:
            if k.startswith("#") and isinstance(d, (dict, list)):
                i = int(k[1:])
                d = d[list(d)[i]] if isinstance(d, dict) else d[i]
            elif isinstance(d, dict):
                d = d[k]
            else:
                raise _Missing(path)
    except (KeyError, IndexError, ValueError) as e:
        raise _Missing(path) from e
    if d is None:
        raise _Missing(path)
    return d


_OPS = {"/": lambda a, b: a / b, "-": lambda a, b: a - b, "+": lambda a, b: a + b, "*": lambda a, b: a * b}


def _fill(template: str, d) -> str:
    """`template` with each `{path}` or `{path OP path:spec}` field read from `d`; _Missing if one is absent
    (or not a number where arithmetic or a number format needs one)."""
    def field(m: re.Match) -> str:
        expr, spec = m.group(1).strip(), m.group(2)
        parts = re.split(r" ([-+*/]) ", expr)
        try:
            v = _at(d, parts[0])
            for op, operand in zip(parts[1::2], parts[2::2]):
                v = _OPS[op](v, _at(d, operand))
            return format(v, spec) if spec else _fmt(v)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise _Missing(expr) from e
    return re.sub(r"\{([^{}:]*)(?::([^{}]*))?\}", field, template)


def _headline_line(summary: dict, h: Headline) -> str:
    """`- label: **value** — meaning.` for one Headline ('' when its value is absent)."""
    try:
        if "*" in h.path.split("."):
            head, _, tail = h.path.partition("*")
            found = _at(summary, head.rstrip("."))
            items = found.items() if isinstance(found, dict) else enumerate(found)
            shown = []
            for k, item in items:
                try:
                    shown.append(_fill(h.each, item) if h.each else
                                 f"{k} {h.fmt.format(_fmt(_at(item, tail.lstrip('.'))))}")
                except _Missing:
                    continue
            if not shown:
                return ""
            value = " · ".join(shown)
        else:
            value = f"**{h.fmt.format(_fmt(_at(summary, h.path)))}**"
    except (_Missing, TypeError):
        return ""
    meaning = ""
    for template in (h.meaning,) if isinstance(h.meaning, str) else h.meaning:
        try:
            meaning = _fill(template, summary)
            break
        except _Missing:
            continue
    line = f"- {h.label}: {value}"
    return line + (f" — {meaning}{'' if meaning.endswith('.') else '.'}" if meaning else "")


def _stage_entry(stage: str) -> tuple[str, str, tuple[Headline, ...]]:
    """(title, key figure's stem, headline numbers) of a notebook stem like '20_tokenizer_pretraining'."""
    nn, _, rest = stage.partition("_")
    return REPORT_STAGES.get(nn, (rest.replace("_", " ").capitalize(), "", ()))


def write_report(file: Path, name: str, preset: str, rows: list[tuple[str, str, Path]]) -> Path:
    """Markdown, read like the notebooks: what ran (a status table), the claim study's verdict, then per stage
    its headline numbers (`REPORT_STAGES`) with a line on what each means and its key figure; an appendix
    holds every number of each summary.json and the metric protocol records."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, file.parent)

    summaries = {stage: read_summary(d) for stage, _, d in rows}
    ran = sum(status.startswith("ran") for _, status, _ in rows)
    skipped = sum(status == SKIPPED for _, status, _ in rows)
    unfinished = [stage for stage, _, _ in rows if not summaries[stage]]
    intro = (f"Written {_dt.datetime.now():%Y-%m-%d %H:%M:%S}. Preset `{preset}`, {len(rows)} stage(s) "
             f"({', '.join(stage.partition('_')[0] for stage, _, _ in rows)}): {ran} ran in this invocation, "
             f"{skipped} had already finished"
             + (f", {len(unfinished)} did not finish ({', '.join(unfinished)})" if unfinished else "")
             + ". Each stage's run folder holds its executed notebook, config, metrics.jsonl, figures and "
             "checkpoints. Below, per stage, the numbers that matter with what they mean and its key figure; "
             "every number of each summary.json is in the appendix.")
    out = [f"# Pipeline run `{name}` (preset `{preset}`)", "", intro, "",
           "| stage | this invocation | run folder |",
           "|---|---|---|"]
    out += [f"| {stage} | {status}{_earlier_run(d) if status == SKIPPED else ''} | [{rel(d)}]({rel(d)}) |"
            for stage, status, d in rows]
    for stage, _, _ in rows:  # the claim study's verdicts lead the report
        if isinstance(summaries[stage].get("claims"), dict):
            out += ["", *_claims_v2_headline(summaries[stage])]
        if isinstance(summaries[stage].get("claim"), dict):
            out += ["", *_claim_headline(summaries[stage])]
    for stage, status, d in rows:
        summary = summaries[stage]
        title, key_figure, headlines = _stage_entry(stage)
        out += ["", f"## {stage.partition('_')[0]} · {title}", ""]
        if not summary:
            out.append(f"No summary.json: the stage did not finish ({status}; [run folder]({rel(d)})).")
            continue
        out += [f"*{status} · [run folder]({rel(d)}) · [summary.json]({rel(d / 'summary.json')})*"]
        lines = [line for line in (_headline_line(summary, h) for h in headlines) if line]
        if lines:
            out += [""] + lines
        protocol = _protocol_line(d)
        if protocol:
            out += ["", protocol]
        pngs = [f for f in summary.get("figures", []) if isinstance(f, str) and f.endswith(".png")]
        if pngs:
            key = next((f for f in pngs if Path(f).stem == key_figure), pngs[0])
            out += ["", f"![{Path(key).stem}]({rel(d / key)})"]
            others = [f"[{Path(f).stem}]({rel(d / f)})" for f in pngs if f != key]
            if others:
                out += ["", "Other figures: " + ", ".join(others) + "."]
    out += ["", "## Appendix · every number", "",
            f"Each stage's numeric summary.json entries (the first {_APPENDIX_ROWS}; the rest in the linked "
            "file), with the labels the summary gives them, then its metric protocol records."]
    for stage, _, d in rows:
        summary = summaries[stage]
        if not summary:
            continue
        out += ["", f"### {stage} · [summary.json]({rel(d / 'summary.json')})", ""]
        nums = _numbers(summary)
        if nums:
            out += ["| quantity | value |", "|---|---|"]
            out += [f"| {k} | {_fmt(v)} |" for k, v in nums[:_APPENDIX_ROWS]]
            if len(nums) > _APPENDIX_ROWS:
                out.append(f"({len(nums) - _APPENDIX_ROWS} more in `{rel(d / 'summary.json')}`)")
        else:
            out.append("Its numbers are in the sections above.")
        protocol = _protocol_rows(d)
        if protocol:
            out += ["", "Metrics with their protocol records (`evaluation.json`):", ""] + protocol
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, lambda f: f.write(("\n".join(out) + "\n").encode()))
    return file


def json_value(name: str, text: str):
    """A `-p NAME JSON` value, decoded; an error names the parameter and the expected form."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: -p {name} {text!r}: the value must be JSON ({e.msg}); e.g. -p seed 3, "
                         f"-p device '\"cpu\"', -p overrides '{{\"fit.steps\": 100}}'") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=PRESETS,
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
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r} in {args.params}; use {', '.join(PRESETS)}")
    extra = {**file.get("params", {}), **{k: json_value(k, v) for k, v in args.param}}
    name = args.name or file.get("name") or f"{preset}_main"
    report = run(preset, name, resolve_run_root(args.run_root), extra, args.only, file.get("notebooks", {}),
                 nproc=args.nproc)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
