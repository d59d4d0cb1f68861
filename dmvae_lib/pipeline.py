"""Run the workbook's notebooks in order through papermill: `python -m dmvae_lib.pipeline --preset cpu`.

Each notebook `notebooks/NN_name.ipynb` (but the study, notebook 70, unless `--only 70` names it) executes into `runs/NN_name/<name>/executed.ipynb` with parameters
`preset`, `run_name=<name>` and `run_root`. Parameters are checked against each notebook's parameters cell
before any work starts. A stage whose run folder already holds a `summary.json` is skipped, and an
interrupted stage resumes from its checkpoints (the notebooks reopen a run with the same config). A
Markdown report of the stages' summaries is written to `runs/pipeline/<name>/report.md`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

from .session import REPO_ROOT, resolve_run_root

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Studies run the pipeline many times over (notebook 70: ≈ 2 h at `cpu`); they run when named with --only.
OPT_IN = ("70",)


def notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (NN_*.ipynb), in order."""
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb"))


def check_parameters(nb: Path, params: dict) -> None:
    """Raise if `params` names a parameter that the notebook's parameters cell does not declare."""
    import papermill

    declared = papermill.inspect_notebook(str(nb))
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise SystemExit(f"error: {nb.name} has no parameter(s) {unknown}; it declares {sorted(declared)}")


def execute(nb: Path, out_dir: Path, params: dict) -> str:
    """Execute `nb` into `out_dir/executed.ipynb` unless `out_dir/summary.json` exists; return what happened.

    A failing cell raises papermill's PapermillExecutionError; the partly executed notebook stays in out_dir."""
    import papermill

    if (out_dir / "summary.json").exists():
        return "skipped (already finished)"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    papermill.execute_notebook(str(nb), str(out_dir / "executed.ipynb"), parameters=params,
                               kernel_name="python3", cwd=str(nb.parent), progress_bar=False)
    return f"ran in {time.perf_counter() - t0:.0f} s"


def run(preset: str, name: str, run_root: Path, extra: dict, only: list[str] | None = None) -> Path:
    stages = [nb for nb in notebooks() if (any(nb.stem.startswith(o) for o in only) if only
                                           else not nb.stem.startswith(OPT_IN))]
    if not stages:
        raise SystemExit(f"error: no notebook matches {only} in {NOTEBOOK_DIR}")
    params = {"preset": preset, "run_name": name, "run_root": str(run_root), **extra}
    for nb in stages:  # validate everything before running anything
        check_parameters(nb, params)
    report = [f"# Pipeline run `{name}` (preset `{preset}`)", "",
              f"Started {_dt.datetime.now():%Y-%m-%d %H:%M:%S}.", ""]
    for nb in stages:
        out_dir = run_root / nb.stem / name
        summary_file = out_dir / "summary.json"
        print(f"[{'skip' if summary_file.exists() else 'run '}] {nb.stem} -> {out_dir}", flush=True)
        status = execute(nb, out_dir, params)
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        report += [f"## {nb.stem}: {status}", "", f"Run folder: `{out_dir}`", "", "```json",
                   json.dumps(summary, indent=1, default=str)[:4000], "```", ""]
    report_file = run_root / "pipeline" / name / "report.md"
    report_file.parent.mkdir(parents=True, exist_ok=True)
    report_file.write_text("\n".join(report))
    return report_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "imagenet256"])
    ap.add_argument("--name", default="", help="run name shared by every stage (default: <preset>_main); "
                                                 "re-running the same name resumes and skips finished stages")
    ap.add_argument("--run-root", default="", help="default: $DMVAE_RUNS or <repo>/runs")
    ap.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 10 20")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                    help="extra notebook parameter, JSON-decoded, e.g. -p seed 3")
    args = ap.parse_args(argv)
    extra = {k: json.loads(v) for k, v in args.param}
    name = args.name or f"{args.preset}_main"
    report = run(args.preset, name, resolve_run_root(args.run_root), extra, args.only)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
