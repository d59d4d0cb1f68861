"""Run one notebook by hand, safely.

    python -m dmvae_lib.workflow.run_notebook NOTEBOOK [-p NAME VALUE] [-y YAML]
    python -m dmvae_lib.workflow.run_notebook notebooks/10_toy_gradient_fields.ipynb \\
        -p preset cpu -p run_name my_run -p seed 3 -y '{"overrides": {"align.steps": 1000}}'

It executes the notebook through papermill into `<run_root>/<notebook>/<run_name>/executed.ipynb` (creating
the folder), like the pipeline does for one stage, but checks everything first, so that nothing on disk
changes unless the run can go ahead: the parameters (names and types, against the parameters cell) and the
config they build (unknown or wrongly typed `overrides` keys); then, if the run folder exists, that its
recorded config equals the requested one (a finished run of the same config is reported and left alone; an
interrupted one resumes) and that no other process holds it (`runs.FolderLock`). A bare
`papermill … executed.ipynb` cannot do this: papermill writes the output notebook before the first cell runs,
so a refused run has already overwritten the record it was refused for.

`-p` values are read as papermill reads them (True/False/None, int, float, else a string); `-y` is a YAML
mapping of parameters, as papermill's. Without `run_name` the run gets `<timestamp>_<preset>_s<seed>`.
Exit status 0 when it ran or was finished already, 1 when refused or failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..runtime.runs import RunError, default_run_name
from . import pipeline
from .session import resolve_run_root


def _value(text: str):
    from papermill.cli import _resolve_type

    return _resolve_type(text)


def run_notebook(nb: str | Path, params: dict) -> tuple[Path, str]:
    """Check, then execute `nb` with `params` into its run folder; return (run folder, what happened).

    Raises SystemExit("error: …") for bad parameters or config, and RunError (RunLockedError) for a run
    folder holding another config or held by another process, before anything is written."""
    nb = Path(nb).resolve()
    if not nb.is_file():
        raise SystemExit(f"error: notebook {nb} does not exist")
    params = dict(params)
    pipeline.check_parameters(nb, params)
    defaults = pipeline._notebook_params(nb, {})
    if not params.get("run_name"):
        params["run_name"] = default_run_name(params.get("preset", defaults.get("preset", "smoke")),
                                              params.get("seed", defaults.get("seed", 0)))
    # the kernel runs in notebooks/: a relative root must mean the same folder there
    if params.get("run_root"):
        params["run_root"] = str(resolve_run_root(params["run_root"]))
    pipeline.check_config(nb, params)
    out_dir = resolve_run_root(params.get("run_root", "")) / nb.stem / params["run_name"]
    return out_dir, pipeline.execute(nb, out_dir, params)


def main(argv: list[str] | None = None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", help="e.g. notebooks/10_toy_gradient_fields.ipynb")
    ap.add_argument("-p", "--parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("-y", "--parameters_yaml", action="append", default=[], metavar="YAML")
    args = ap.parse_args(argv)
    params: dict = {}
    for text in args.parameters_yaml:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise SystemExit(f"error: -y needs a YAML mapping of parameters, got {text!r}")
        params.update(data)
    params.update({name: _value(value) for name, value in args.parameters})
    try:
        out_dir, status = run_notebook(args.notebook, params)
    except RunError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"{Path(args.notebook).stem}: {status} -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
