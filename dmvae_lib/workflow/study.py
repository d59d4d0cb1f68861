"""The reference-distribution study (notebook 70; paper Tab. 1, and the λ trend of Tab. 2) at embedded scale.

    cells = plan(cfg)                                   # (reference, λ, seed) cells, teachers shared
    results = run_study(cfg, preset, prefix, run_root, tokenizer_dir)   # papermill: notebooks 30, 40, 60
    table = collect(results)                            # one row per cell, from the runs' summary.json
    agg = aggregate(table)                              # mean ± spread over seeds per condition

Every cell is a real pipeline run through papermill, under run names `<prefix>-<reference>-l<λ>-s<seed>`
(teachers: `<prefix>-teacher-<reference>`), so each one leaves its executed notebook, config, metrics,
figures and checkpoints in its own run folder, and re-running the study skips what has finished and resumes
what was interrupted. The stage-1 tokenizer (notebook 20) is shared by every cell; each reference's teacher
by all of its cells. A failing cell is recorded (with its error) and the study goes on; `failures` lists them.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..configs import make_config
from ..configs.study import StudyConfig
from ..runtime.runs import read_summary
from . import pipeline

BASELINE = "none"  # the reference column of the λ = 0 cells (no DM term, so no reference)
METRICS = {  # column: (what it is, lower is better)
    "gen_fd_ssl": ("generation FD, SSL-encoder features (not FID)", True),
    "rfd_ssl": ("reconstruction FD, SSL-encoder features (not rFID)", True),
    "psnr": ("val PSNR (dB)", False),
    "knn": ("latent kNN accuracy (class clustering)", False),
    "silhouette": ("latent silhouette (class clustering)", False),
}


@dataclass(frozen=True)
class Cell:
    reference: str  # BASELINE for λ = 0
    dm_weight: float
    seed: int

    @property
    def condition(self) -> str:
        return "λ = 0 (no DM)" if self.dm_weight == 0 else f"{self.reference} · λ = {self.dm_weight:g}"

    def name(self, prefix: str) -> str:
        return f"{prefix}-{self.reference}-l{self.dm_weight:g}-s{self.seed}"


def teacher_name(prefix: str, reference: str) -> str:
    return f"{prefix}-teacher-{reference}"


def plan(cfg: StudyConfig) -> list[Cell]:
    """The cells in run order: each reference's cells (its teacher first), the baseline after the first
    reference, the λ sweep after its reference."""
    cells: list[Cell] = []
    for i, ref in enumerate(cfg.references):
        cells += [Cell(ref, cfg.dm_weight, s) for s in cfg.seeds]
        if i == 0 and cfg.baseline:
            cells += [Cell(BASELINE, 0.0, s) for s in cfg.seeds]
        if ref == cfg.sweep_reference:
            cells += [Cell(ref, w, s) for w in cfg.sweep_weights if w != cfg.dm_weight for s in cfg.seeds]
    return cells


def teacher_of(cfg: StudyConfig, cell: Cell) -> str:
    """The reference whose teacher a cell loads (the λ = 0 cells load the first one and never use it)."""
    return cfg.references[0] if cell.reference == BASELINE else cell.reference


def _notebook(prefix: str) -> Path:
    nb = next((p for p in pipeline.notebooks() if p.stem.startswith(prefix)), None)
    if nb is None:
        raise FileNotFoundError(f"no notebook {prefix}_*.ipynb in {pipeline.NOTEBOOK_DIR}")
    return nb


def cell_params(cfg: StudyConfig, preset: str, prefix: str, run_root: Path, tokenizer_dir: Path,
                cell: Cell | None = None, reference: str = "", device: str = "auto") -> dict[str, dict]:
    """The papermill parameters of one teacher (`reference`) or of one cell's notebooks 40 and 60."""
    common = {"preset": preset, "run_root": str(run_root), "device": device}
    if cell is None:
        # No quality gate on the teacher: how close each teacher gets to its reference is a result of the
        # study (column teacher_sw2_ratio), not a reason to drop the reference.
        return {"30": {**common, "seed": cfg.seeds[0], "run_name": teacher_name(prefix, reference),
                       "tokenizer_run": str(tokenizer_dir), "reference": reference,
                       "overrides": dict(cfg.teacher), "max_sw2_ratio": 0.0}}
    name = cell.name(prefix)
    teacher_dir = run_root / _notebook("30").stem / teacher_name(prefix, teacher_of(cfg, cell))
    joint_dir = run_root / _notebook("40").stem / name
    return {"40": {**common, "seed": cell.seed, "run_name": name, "tokenizer_run": str(tokenizer_dir),
                   "teacher_run": str(teacher_dir),
                   "overrides": {**cfg.joint, "train.dm_weight": cell.dm_weight}},
            "60": {**common, "seed": cell.seed, "run_name": name, "joint_run": str(joint_dir),
                   "overrides": dict(cfg.generation)}}


def check(cfg: StudyConfig, preset: str) -> None:
    """Every sub-notebook's parameters and config overrides, checked before any work starts."""
    dummy = cell_params(cfg, preset, "check", Path("/nonexistent"), Path("/nonexistent"), reference="ssl")
    for cell in plan(cfg)[:1] + [c for c in plan(cfg) if c.dm_weight == 0][:1]:
        dummy.update(cell_params(cfg, preset, "check", Path("/nonexistent"), Path("/nonexistent"), cell))
    for nb_prefix, params in dummy.items():
        pipeline.check_parameters(_notebook(nb_prefix), params)
    make_config("teacher", preset, cfg.teacher)
    for w in {cfg.dm_weight, 0.0, *cfg.sweep_weights}:
        make_config("joint", preset, {**cfg.joint, "train.dm_weight": w})
    make_config("generation", preset, cfg.generation)


@dataclass
class Result:
    cell: Cell | None  # None: a teacher
    reference: str
    dirs: dict[str, Path]
    status: str = "pending"
    seconds: float = 0.0
    error: str = ""


def _execute(nb_prefix: str, params: dict, run_root: Path, log: Callable[[str], None]) -> tuple[Path, str]:
    nb = _notebook(nb_prefix)
    out_dir = run_root / nb.stem / params["run_name"]
    status = pipeline.execute(nb, out_dir, params)
    log(f"{nb.stem}/{params['run_name']}: {status}")
    return out_dir, status


def run_study(cfg: StudyConfig, preset: str, prefix: str, run_root: Path, tokenizer_dir: Path, *,
              device: str = "auto", progress: bool = True,
              log: Callable[[str], None] = print) -> list[Result]:
    """Run (or resume) every teacher and cell through papermill; a failure is recorded, not raised."""
    from tqdm.auto import tqdm

    check(cfg, preset)
    cells = plan(cfg)
    teachers = {teacher_of(cfg, c) for c in cells}
    results: list[Result] = []
    bar = tqdm(total=len(teachers) + len(cells), desc="study", disable=not progress)
    failed_teachers: dict[str, str] = {}
    for ref in cfg.references:
        mine = [c for c in cells if teacher_of(cfg, c) == ref]
        if not mine:
            continue
        r = Result(None, ref, {})
        t0 = time.perf_counter()
        try:
            r.dirs["30"], r.status = _execute("30", cell_params(cfg, preset, prefix, run_root, tokenizer_dir,
                                                                reference=ref, device=device)["30"], run_root,
                                              log)
        except Exception as e:  # noqa: BLE001 - recorded, reported by `failures`, and the study goes on
            r.status, r.error = "failed", _last_line(e)
            failed_teachers[ref] = r.error
            log(f"teacher {ref}: FAILED: {r.error}")
        r.seconds = time.perf_counter() - t0
        results.append(r)
        bar.update(1)
        for cell in mine:
            c = Result(cell, cell.reference, {})
            t0 = time.perf_counter()
            if ref in failed_teachers:
                c.status, c.error = "not run", f"teacher {ref} failed: {failed_teachers[ref]}"
            else:
                c.dirs["30"] = run_root / _notebook("30").stem / teacher_name(prefix, ref)
                try:
                    params = cell_params(cfg, preset, prefix, run_root, tokenizer_dir, cell, device=device)
                    statuses = []
                    for nb_prefix in ("40", "60"):
                        c.dirs[nb_prefix], status = _execute(nb_prefix, params[nb_prefix], run_root, log)
                        statuses.append(status)
                    c.status = pipeline.SKIPPED if all(s == pipeline.SKIPPED for s in statuses) else "ran"
                except Exception as e:  # noqa: BLE001
                    c.status, c.error = "failed", _last_line(e)
                    log(f"{cell.name(prefix)}: FAILED: {c.error}")
            c.seconds = time.perf_counter() - t0
            results.append(c)
            bar.update(1)
    bar.close()
    return results


def _last_line(e: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return " ".join(line.strip() for line in text[-3:])[:500]


def failures(results: Sequence[Result]) -> list[str]:
    return [f"{r.cell.name('') if r.cell else 'teacher ' + r.reference}: {r.error}"
            for r in results if r.status in ("failed", "not run")]


def _summary(folder: Path | None) -> dict:
    return read_summary(folder) if folder else {}


def _value(d: dict, *keys, default=math.nan):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def collect(results: Sequence[Result]) -> pd.DataFrame:
    """One row per cell: its condition, seed, status, and the numbers its notebook-40 and -60 runs saved."""
    rows = []
    for r in results:
        if r.cell is None:
            continue
        joint, gen, teacher = (_summary(r.dirs.get(nb)) for nb in ("40", "60", "30"))
        rows.append({
            "condition": r.cell.condition, "reference": r.cell.reference, "dm_weight": r.cell.dm_weight,
            "seed": r.cell.seed, "status": r.status, "minutes": r.seconds / 60,
            "gen_fd_ssl": _value(gen, "metrics", "fd_ssl", "value"),
            "rfd_ssl": _value(gen, "metrics", "rfd_ssl", "value"),
            "fd_ssl_floor": _value(gen, "metrics", "fd_ssl_floor", "value"),
            "psnr": _value(joint, "dm", "psnr"), "ssim": _value(joint, "dm", "ssim"),
            "knn": _value(gen, "latent_clustering", "knn"),
            "silhouette": _value(gen, "latent_clustering", "silhouette"),
            "latent_fd_ratio": _value(gen, "latent_fit", "fd_ratio"),
            "ref_fd": _value(joint, "dm", "ref_fd"),  # in each reference's own space:
                                                      # compare within a row only
            "teacher_sw2_ratio": _value(teacher, "evaluation",
                                        "sw2_ratio") if r.cell.dm_weight > 0 else math.nan,
            "joint_run": str(r.dirs.get("40", "")), "generation_run": str(r.dirs.get("60", "")),
        })  # fmt: skip
    return pd.DataFrame(rows)


def aggregate(table: pd.DataFrame, metrics: Sequence[str] = tuple(METRICS),
              by: str = "condition") -> pd.DataFrame:
    """Mean, spread (sample standard deviation; NaN for one seed) and seed count of each metric per `by`,
    over the cells that finished, in the table's order of first appearance."""
    done = table[table["status"].isin(["ran", pipeline.SKIPPED])]
    order = list(dict.fromkeys(table[by]))
    g = done.groupby(by, sort=False)[list(metrics)]
    out = pd.concat({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}, axis=1)
    return out.reindex([o for o in order if o in out.index])


def formatted(agg: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """`mean ± std (n)` strings per metric: the table people read."""
    cols = {}
    for m in dict.fromkeys(c[1] for c in agg.columns):
        mean, std, n = agg[("mean", m)], agg[("std", m)], agg[("n", m)]
        cols[m] = [f"{a:.{digits}f} ± {b:.{digits}f} ({int(k)})" if not math.isnan(b) else f"{a:.{digits}f} "
                                                                                           f"({int(k)})"
                   for a, b, k in zip(mean, std, n)]
    return pd.DataFrame(cols, index=agg.index)


def verdict(agg: pd.DataFrame, reference: str = "ssl", metric: str = "gen_fd_ssl") -> dict:
    """Does `reference`'s condition give the best mean `metric` of all conditions (lowest, or highest for a
    metric that METRICS marks higher-is-better), and is its lead larger than the seeds' spread? (The paper's
    Tab. 1 finding is that the SSL reference generates best.)"""
    mean, std = agg[("mean", metric)].dropna(), agg[("std", metric)]
    if mean.empty:
        return {"metric": metric, "best": None, "reference_is_best": False, "note": "no finished cells"}
    ranking = mean.sort_values(ascending=METRICS.get(metric, ("", True))[1])
    best = str(ranking.index[0])
    mine = next((c for c in mean.index if c.startswith(f"{reference} ·")), None)
    out = {"metric": metric, "ranking": {str(k): float(v) for k, v in ranking.items()}, "best": best,
           "reference_condition": mine, "reference_is_best": mine == best}
    if len(ranking) > 1:
        second = str(ranking.index[1])
        gap = abs(float(ranking.iloc[1] - ranking.iloc[0]))
        spread = float(max(std.get(best, 0.0), std.get(second, 0.0)))
        out.update(runner_up=second, gap=gap, largest_spread=spread,
                   gap_exceeds_spread=bool(not math.isnan(spread) and gap > spread))
    return out


def conditions(cfg: StudyConfig) -> dict[str, list[str]]:
    """The rows of the two tables: references at λ = dm_weight (and the baseline), and the λ sweep."""
    base = [Cell(BASELINE, 0.0, 0).condition] if cfg.baseline else []
    refs = [Cell(r, cfg.dm_weight, 0).condition for r in cfg.references] + base
    weights = sorted({cfg.dm_weight, *cfg.sweep_weights}) if cfg.sweep_weights else []
    sweep = base + [Cell(cfg.sweep_reference, w, 0).condition for w in weights] if weights else []
    return {"references": refs, "dm_weight": sweep}


def panel_points(table: pd.DataFrame, rows: Sequence[str], metrics: Sequence[str] = tuple(METRICS)) -> dict:
    """{metric: {condition: [value per finished seed]}} for `viz.condition_panels`, in the order of `rows`."""
    done = table[table["status"].isin(["ran", pipeline.SKIPPED])]
    return {m: {c: [float(v) for v in done.loc[done["condition"] == c, m]] for c in rows} for m in metrics}
