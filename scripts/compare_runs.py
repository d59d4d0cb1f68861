"""Are two pipeline runs bit-identical? `python scripts/compare_runs.py RUNS_A RUNS_B [--name NAME]`.

Compares, stage by stage (`<root>/<NN_notebook>/<name>/`): every numeric leaf of summary.json (timings and
paths left out), every tensor in every checkpoint and artifact (`*.pt`, compared with torch.equal), and the
SHA-256 of every `.npz` (the generator's samples). Prints each difference and exits 1 if there is any; this
is how a refactor shows that behaviour and numbers did not change (the `cpu` runs are bit-reproducible).
With `--allow-new`, summary numbers that only B has (a measurement added between the two commits) are listed
as new but not counted; a number A has and B lacks, or one that differs, always counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

SKIP = ("seconds", "minutes", "time", "duration", "per_s", "throughput", "_run", "folder", "path", "git_sha")


def numbers(d, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if any(s in k for s in SKIP):
                continue
            out.update(numbers(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(numbers(v, f"{prefix}{i}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix.rstrip(".")] = float(d)
    return out


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}{i}."))
    return out


def compare_stage(a: Path, b: Path, allow_new: bool = False) -> list[str]:
    diffs = []
    sa, sb = (json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else None
              for d in (a, b))
    if sa is None or sb is None:
        return [f"{a.name}: summary.json missing in {'A' if sa is None else 'B'}"]
    na, nb = numbers(sa), numbers(sb)
    for k in sorted(set(na) | set(nb)):
        if allow_new and k not in na:
            print(f"    new in B: summary {k} = {nb[k]}")
            continue
        if na.get(k) != nb.get(k) and not (na.get(k) != na.get(k) and nb.get(k) != nb.get(k)):  # NaN == NaN
            diffs.append(f"summary {k}: {na.get(k)} vs {nb.get(k)}")
    for fa in sorted(a.rglob("*.pt")):
        fb = b / fa.relative_to(a)
        if not fb.exists():
            diffs.append(f"{fa.relative_to(a)} missing in B")
            continue
        ta, tb = (tensors(torch.load(f, map_location="cpu", weights_only=False)) for f in (fa, fb))
        for k in sorted(set(ta) | set(tb)):
            if k not in ta or k not in tb or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
                diffs.append(f"{fa.relative_to(a)} [{k}] differs")
    for fa in sorted(a.rglob("*.npz")):
        fb = b / fa.relative_to(a)
        ha, hb = (hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else "missing" for f in (fa, fb))
        print(f"  {fa.relative_to(a)}: sha256 {ha[:16]} vs {hb[:16]}")
        if ha != hb:
            diffs.append(f"{fa.relative_to(a)}: sha256 {ha} vs {hb}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_a", type=Path)
    ap.add_argument("runs_b", type=Path)
    ap.add_argument("--name", default="", help="the pipeline run name (default: every name found in A)")
    ap.add_argument("--allow-new", action="store_true",
                    help="list summary numbers only B has instead of counting them as differences")
    args = ap.parse_args(argv)
    stages = sorted(d for d in args.runs_a.glob("[0-9][0-9]_*/*") if d.is_dir()
                    and (not args.name or d.name == args.name))
    if not stages:
        where = f"{args.runs_a}" + (f" named {args.name}" if args.name else "")
        raise SystemExit(f"error: no run folders under {where}")
    total = 0
    for a in stages:
        b = args.runs_b / a.relative_to(args.runs_a)
        diffs = compare_stage(a, b, args.allow_new) if b.is_dir() else [f"{b} missing"]
        total += len(diffs)
        print(f"{a.parent.name}/{a.name}: {'identical' if not diffs else f'{len(diffs)} difference(s)'}")
        for d in diffs[:20]:
            print(f"    {d}")
    print("IDENTICAL" if total == 0 else f"{total} DIFFERENCES")
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
