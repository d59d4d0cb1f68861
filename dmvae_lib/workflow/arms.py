"""The claim study (notebook 70): the paper's arms as runs of notebooks 20, 30, 40 and 60, then the verdict.

    runs = plan(cfg, preset, prefix, run_root, tokenizer_dir)    # every notebook execution, in order
    results = run_all(runs, run_root)                            # papermill; finished runs are skipped
    data = collect(cfg, results)                                 # PSNR, drift, curves per arm and seed
    out = result(cfg, data)                                      # curve scores, tables, gates, verdict

The arms (paper Tab. 1–2; `ClaimConfig`): A is the shared stage-1 tokenizer (frozen SSL encoder); C1 is
notebook 40 from A with the encoder trainable and λ = `dm_weight`, C0 the λ = 0 control of that same run
(same data order, schedule and seed); AE is the from-scratch autoencoder: notebook 20 with A's config but
`encoder.kind="random"`, the encoder trained from its random start (`train.train_encoder`) and no
alignment (run `<prefix>-AE-stage1`), then notebook 40 from it, encoder trainable, λ = 0 (its teacher is
fitted only because notebook 40 loads one; at λ = 0 it is never evaluated); R (optional) is that stage 1
with the random encoder frozen. Each arm's generator (notebook 60) runs once per generator seed with a
learning curve. Run names are `<prefix>-<arm>` and `<prefix>-<arm>-g<seed>`, each in its own run folder.
Two shortcuts: a finished notebook-30 or notebook-40 run named `<prefix>` itself (the pipeline's own, e.g.
the main job's) that has exactly the config of the SSL teacher or of C1 serves as that run; and the
random-encoder stage-1 runs start from A's finished SSL and supervised fits when they change nothing those
depend on (A's reference encoders, identical by construction).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..configs import ConfigError, make_config
from ..configs.study import CLAIM_FIXED, StudyConfig
from ..runtime.runs import RunError, is_finished, read_summary
from . import claim, pipeline

PRIMARY = ("AE", "A", "C0", "C1")  # the arms the verdict reads
# AE's teacher: notebook 40 loads one, but at λ = 0 it is never evaluated
UNUSED_TEACHER = {"fit.steps": 20, "fit.warmup_steps": 5, "fit.eval_samples": 100, "fit.sample_steps": 5,
                  "fit.log_every": 10, "fit.ckpt_every": 20}
AE_CHANGES = CLAIM_FIXED["tokenizer"]  # AE's stage 1 = A's stage-1 config with these changed
R_CHANGES = {**AE_CHANGES, "train.train_encoder": False}  # R: the same, its random encoder frozen
NOTEBOOKS = {"20": "20_tokenizer_pretraining", "30": "30_teacher_fitting", "40": "40_joint_dm_training",
             "60": "60_generation"}


def can_be_arm_a(config: Mapping) -> bool:
    """Whether a recorded notebook-20 config can be arm A: a stage 1 on the embedded SSL or supervised encoder
    (not a study's own random-encoder stage-1 run)."""
    return config.get("encoder", {}).get("kind") in ("ssl", "supervised")


def arms(cfg: StudyConfig) -> list[str]:
    """Every arm the study generates from: the primary four, C1 at the extra λ, and R when asked."""
    c = cfg.claim
    return [*PRIMARY, *(weighted_c1(w) for w in c.extra_weights), *(["R"] if c.random_arm else [])]


def weighted_c1(weight: float) -> str:
    """The name of C1 at another λ (the study's extra weights), e.g. "C1 λ=3"."""
    return f"C1 λ={weight:g}"


def slug(arm: str) -> str:
    return arm.replace(" λ=", "-l").replace(" ", "")


@dataclass(frozen=True)
class Run:
    notebook: str  # "20" | "30" | "40" | "60"
    name: str  # the run name (its folder under the notebook's folder)
    params: dict  # papermill parameters
    needs: tuple[str, ...] = ()  # run names that must have finished first
    prefill: tuple[tuple[Path, str], ...] = ()  # (file, path in the run folder) copied in before a first run


@dataclass
class Outcome:
    run: Run
    folder: Path
    status: str = "pending"  # ran | skipped | failed | not run
    seconds: float = 0.0
    error: str = ""


def flat_overrides(config: Mapping, prefix: str = "") -> dict:
    """A recorded config as dotted keys (`stage`/`preset` dropped): overrides that rebuild it exactly."""
    out = {}
    for k, v in config.items():
        if not prefix and k in ("stage", "preset"):
            continue
        if isinstance(v, Mapping):
            out.update(flat_overrides(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _sources(cfg: StudyConfig, prefix: str, run_root: Path, tokenizer_dir: Path,
             c1_name: str = "") -> dict[str, tuple[Path, str]]:
    """Arm → (the run folder its tokenizer lies in, the tokenizer file). C1's run is `c1_name`, else
    `<prefix>-C1` if it exists, else the reused `<prefix>` (`_reused`)."""
    joint = run_root / NOTEBOOKS["40"]
    c1 = joint / (c1_name or (f"{prefix}-C1" if (joint / f"{prefix}-C1").exists() else prefix))
    out = {"AE": (joint / f"{prefix}-AE", "tokenizer.pt"), "A": (tokenizer_dir, "tokenizer.pt"),
           "C0": (c1, "control_tokenizer.pt"), "C1": (c1, "tokenizer.pt")}
    for w in cfg.claim.extra_weights:
        out[weighted_c1(w)] = (joint / f"{prefix}-{slug(weighted_c1(w))}", "tokenizer.pt")
    out["R"] = (run_root / NOTEBOOKS["20"] / f"{prefix}-R", "tokenizer.pt")
    return out


def plan(cfg: StudyConfig, preset: str, prefix: str, run_root: Path, tokenizer_dir: Path,
         device: str = "auto") -> list[Run]:
    """Every notebook execution of the claim study, in an order that respects `needs`."""
    c, root = cfg.claim, Path(run_root)
    a_cfg = json.loads((Path(tokenizer_dir) / "config.json").read_text())["config"]
    if not can_be_arm_a(a_cfg):
        raise ValueError(f"arm A must be a stage-1 tokenizer on the embedded SSL (or supervised) encoder; "
                         f"{tokenizer_dir} has encoder.kind={a_cfg.get('encoder', {}).get('kind')!r}")
    common = {"preset": preset, "run_root": str(root), "device": device}
    seed = int(a_cfg["seed"])
    a_over = {k: v for k, v in flat_overrides(a_cfg).items() if k != "seed"}
    ae1 = f"{prefix}-AE-stage1"
    ae1_dir = root / NOTEBOOKS["20"] / ae1
    def params(name: str, **kw) -> dict:
        return {**common, "seed": seed, "run_name": name, **kw}

    fit = {"reference": "ssl", "max_sw2_ratio": 0.0}
    ssl_teacher = params("", tokenizer_run=str(tokenizer_dir), overrides=dict(c.teacher), **fit)
    teacher = {"ssl": _reused("30", root, prefix, "teacher", ssl_teacher), "AE": f"{prefix}-teacher-AE"}
    prefill = _reference_fits(Path(tokenizer_dir), c.tokenizer)
    runs = [Run("20", ae1, params(ae1, overrides={**a_over, **AE_CHANGES, **c.tokenizer}), prefill=prefill)]
    if c.random_arm:
        runs.append(Run("20", f"{prefix}-R", params(f"{prefix}-R", overrides={**a_over, **R_CHANGES,
                                                                               **c.tokenizer}),
                        prefill=prefill))
    runs += [Run("30", teacher["ssl"], {**ssl_teacher, "run_name": teacher["ssl"]}),
             Run("30", teacher["AE"], params(teacher["AE"], tokenizer_run=str(ae1_dir),
                                             overrides={**c.teacher, **UNUSED_TEACHER}, **fit),
                 needs=(ae1,))]
    joint = {**c.joint, **CLAIM_FIXED["joint"]}
    t_dir = {k: root / NOTEBOOKS["30"] / v for k, v in teacher.items()}
    c1_name, c1s = "", [("C1", c.dm_weight, True), *((weighted_c1(w), w, False) for w in c.extra_weights)]
    for arm, lam, control in c1s:  # C0 is the λ = 0 control of the C1 run
        over = {**joint, "train.dm_weight": lam, "train.control": control}
        p = params("", tokenizer_run=str(tokenizer_dir), teacher_run=str(t_dir["ssl"]), overrides=over)
        name = _reused("40", root, prefix, "C1", p) if arm == "C1" else f"{prefix}-{slug(arm)}"
        c1_name = name if arm == "C1" else c1_name
        runs.append(Run("40", name, {**p, "run_name": name}, needs=(teacher["ssl"],)))
    over = {**joint, "train.dm_weight": 0.0, "train.control": False}
    runs.append(Run("40", f"{prefix}-AE", params(f"{prefix}-AE", tokenizer_run=str(ae1_dir),
                                                 teacher_run=str(t_dir["AE"]), overrides=over),
                    needs=(ae1, teacher["AE"])))
    sources = _sources(cfg, prefix, root, Path(tokenizer_dir), c1_name)
    producers = {str(r.params.get("run_name")): r.name for r in runs}
    for arm in arms(cfg):
        folder, file = sources[arm]
        need = (folder.name,) if folder.name in producers else ()
        for g in c.seeds:
            name = f"{prefix}-{slug(arm)}-g{g}"
            runs.append(Run("60", name, {**common, "seed": g, "run_name": name, "joint_run": str(folder),
                                         "tokenizer_file": file, "overrides": dict(c.generation)},
                            needs=need))
    return runs


def _reused(notebook: str, root: Path, prefix: str, own: str, params: dict) -> str:
    """`prefix` when the run of that name is finished with exactly this config (and no `<prefix>-<own>` run
    exists), else `<prefix>-<own>`."""
    folder = root / NOTEBOOKS[notebook] / prefix
    if (root / NOTEBOOKS[notebook] / f"{prefix}-{own}").exists() or not is_finished(folder):
        return f"{prefix}-{own}"
    try:
        same = pipeline.recorded_differences(_notebook(notebook), folder, params) == []
    except (RunError, ConfigError):
        same = False
    return prefix if same else f"{prefix}-{own}"


# the config keys A's reference-encoder fits depend on: a stage-1 run that changes none reuses A's fits
_FIT_KEYS = ("seed", "data.", "encoder.ssl.", "encoder.supervised_")


def _reference_fits(tokenizer_dir: Path, r_changes: Mapping) -> tuple[tuple[Path, str], ...]:
    """A's finished SSL and supervised checkpoints, for a random-encoder stage-1 run folder (none if its
    changes touch them)."""
    if any(k.startswith(_FIT_KEYS) for k in r_changes):
        return ()
    files = [tokenizer_dir / "ckpt" / tag / "last.pt" for tag in ("ssl", "supervised")]
    return tuple((f, str(f.relative_to(tokenizer_dir))) for f in files if f.is_file())


def check(cfg: StudyConfig, preset: str) -> None:
    """The sub-notebooks' parameters and every config the plan builds, checked before any work starts."""
    c = cfg.claim
    gen = make_config("generation", preset, c.generation)
    if len(gen.curve.steps) < 2:
        raise ValueError("the claim study scores learning curves: claim.generation needs curve.steps with "
                         f"at least two steps, got {list(gen.curve.steps)}")
    make_config("tokenizer", preset, {**AE_CHANGES, **c.tokenizer})
    make_config("tokenizer", preset, {**R_CHANGES, **c.tokenizer})
    make_config("teacher", preset, c.teacher)
    make_config("teacher", preset, {**c.teacher, **UNUSED_TEACHER})
    for w in (c.dm_weight, 0.0, *c.extra_weights):
        make_config("joint", preset, {**c.joint, **CLAIM_FIXED["joint"], "train.dm_weight": w})
    fake = Path("/nonexistent")
    sample = {"20": {"overrides": {}}, "30": {"tokenizer_run": str(fake), "reference": "ssl",
                                             "max_sw2_ratio": 0.0, "overrides": {}},
              "40": {"tokenizer_run": str(fake), "teacher_run": str(fake), "overrides": {}},
              "60": {"joint_run": str(fake), "tokenizer_file": "tokenizer.pt", "overrides": {}}}
    for nb, params in sample.items():
        pipeline.check_parameters(_notebook(nb), {"preset": preset, "run_root": str(fake), "device": "auto",
                                                  "seed": 0, "run_name": "check", **params})


def _notebook(prefix: str) -> Path:
    return pipeline.NOTEBOOK_DIR / f"{NOTEBOOKS[prefix]}.ipynb"


def run_all(runs: Sequence[Run], run_root: Path, *, progress: bool = True,
            log: Callable[[str], None] = print) -> list[Outcome]:
    """Execute (or skip when finished, or resume) every run through papermill; a failure is recorded and the
    runs that need it are not started."""
    from tqdm.auto import tqdm

    done: dict[str, Outcome] = {}
    for r in tqdm(runs, desc="claim study", disable=not progress):
        o = Outcome(r, Path(run_root) / NOTEBOOKS[r.notebook] / r.name)
        blocked = [n for n in r.needs if done.get(n) and done[n].status in ("failed", "not run")]
        t0 = time.perf_counter()
        if blocked:
            o.status, o.error = "not run", f"needs {', '.join(blocked)}, which failed"
        else:
            try:
                _prefill(r, o.folder)
                o.status = pipeline.execute(_notebook(r.notebook), o.folder, r.params)
                log(f"{NOTEBOOKS[r.notebook]}/{r.name}: {o.status}")
            except Exception as e:  # noqa: BLE001 - recorded; `failures` reports it and the notebook asserts
                o.status, o.error = "failed", _last_line(e)
                log(f"{r.name}: FAILED: {o.error}")
        o.seconds = time.perf_counter() - t0
        done[r.name] = o
    return list(done.values())


def _prefill(r: Run, folder: Path) -> None:
    """Copy a run's prefill files into its folder before its first execution (never into a started run)."""
    if not r.prefill or (folder / "config.json").exists():
        return
    for src, rel in r.prefill:
        dst = folder / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst.with_name(dst.name + ".part"))
            dst.with_name(dst.name + ".part").replace(dst)


def _last_line(e: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return " ".join(line.strip() for line in text[-3:])[:500]


def failures(outcomes: Sequence[Outcome]) -> list[str]:
    return [f"{o.run.name}: {o.error}" for o in outcomes if o.status in ("failed", "not run")]


@dataclass
class ArmData:
    """What the runs of one study left behind, per arm."""

    psnr: dict[str, float] = field(default_factory=dict)
    knn: dict[str, float] = field(default_factory=dict)  # latent kNN (notebook 60's clustering, first seed)
    curves: dict[str, dict[int, list[dict]]] = field(default_factory=dict)  # arm → seed → curve records
    drift_fd: float = math.nan  # C0's FD to the reference at the end of joint training
    drift_floor: float = math.nan  # the two-draw floor of that FD
    c1_fd: float = math.nan  # C1's FD to the reference, for comparison


def collect(cfg: StudyConfig, prefix: str, run_root: Path, tokenizer_dir: Path) -> ArmData:
    """Read every arm's numbers from its runs' summary.json (missing runs give NaN / no curve)."""
    out, root = ArmData(), Path(run_root)
    for arm, (folder, file) in _sources(cfg, prefix, root, Path(tokenizer_dir)).items():
        s = read_summary(folder)
        if file == "control_tokenizer.pt":
            psnr = s.get("control", {}).get("psnr", math.nan)
        elif folder.parent.name == NOTEBOOKS["40"]:
            psnr = s.get("dm", {}).get("psnr", math.nan)
        else:
            psnr = s.get("tokenizer", {}).get("psnr", math.nan)
        if arm in arms(cfg):
            out.psnr[arm] = float(psnr)
            out.curves[arm] = {}
            for g in cfg.claim.seeds:
                gen = read_summary(root / NOTEBOOKS["60"] / f"{prefix}-{slug(arm)}-g{g}")
                if gen.get("curve"):
                    out.curves[arm][g] = gen["curve"]
                if g == cfg.claim.seeds[0]:
                    out.knn[arm] = float(gen.get("latent_clustering", {}).get("knn", math.nan))
    joint = read_summary(_sources(cfg, prefix, root, Path(tokenizer_dir))["C1"][0])
    out.drift_fd = float(joint.get("control", {}).get("ref_fd", math.nan))
    out.drift_floor = float(joint.get("control", {}).get("ref_fd_floor", math.nan))
    out.c1_fd = float(joint.get("dm", {}).get("ref_fd", math.nan))
    return out


def scores(data: ArmData, key: str) -> dict[str, dict[int, float]]:
    """{arm: {seed: curve_score of the curve's `key` (e.g. "fd_sup", "fd_ssl_recon")}} where recorded (any
    `data` with `curves`: version 2's V2Data too, keyed by joint seed)."""
    out: dict[str, dict[int, float]] = {}
    for arm, by_seed in data.curves.items():
        out[arm] = {g: claim.curve_score([p["step"] for p in pts], [p[key] for p in pts])
                    for g, pts in by_seed.items() if pts and key in pts[0]}
    return out


def keys(data: ArmData) -> list[str]:
    """The curve keys recorded (fd_<space> and fd_<space>_recon for every space)."""
    first = next((pts for by in data.curves.values() for pts in by.values() if pts), [])
    return [k for k in first[0] if k.startswith("fd_")] if first else []


def table(cfg: StudyConfig, data: ArmData) -> pd.DataFrame:
    """One row per arm: PSNR, latent kNN and, per curve key, the curve score as mean ± std (n seeds)."""
    rows = []
    for arm in arms(cfg):
        row = {"arm": arm, "val PSNR (dB)": data.psnr.get(arm, math.nan),
               "latent kNN": data.knn.get(arm, math.nan)}
        for k in keys(data):
            v = np.array(list(scores(data, k).get(arm, {}).values()), float)
            row[k] = _mean_pm(v)
        rows.append(row)
    return pd.DataFrame(rows).set_index("arm")


def _mean_pm(v: np.ndarray) -> str:
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.3f} (1)"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} ({len(v)})"


def result(cfg: StudyConfig, data: ArmData, thresholds: claim.Thresholds = claim.Thresholds()) -> dict:
    """The verdict (workflow/claim.py) on the pre-registered space's FD to real images, plus the same test
    in every other recorded space and distance, reported beside it (never instead of it)."""
    primary = f"fd_{cfg.claim.space}"
    psnr = {a: data.psnr.get(a, math.nan) for a in PRIMARY}
    out: dict = {"space": primary, "psnr": psnr, "drift_fd": data.drift_fd, "drift_floor": data.drift_floor,
                 "c1_fd": data.c1_fd, "other_spaces": {}}
    missing = [a for a in ("C0", "C1") if not scores(data, primary).get(a)]
    if missing or any(math.isnan(psnr[a]) for a in ("A", "C0", "C1")) or math.isnan(data.drift_fd):
        return {**out, "outcome": "unresolved",
                "reason": f"the study is incomplete: no {primary} curves for {missing}" if missing else
                "the study is incomplete: a PSNR or the drift distance is missing"}
    for k in keys(data):
        v = claim.verdict({a: s for a, s in scores(data, k).items() if a in PRIMARY}, psnr, data.drift_fd,
                          data.drift_floor, thresholds)
        if k == primary:
            out.update(v)
        else:
            out["other_spaces"][k] = {"outcome": v["outcome"], "reason": v["reason"]}
    return out


def reduced(cfg: StudyConfig, preset: str) -> str:
    """What this claim study leaves out of the preset's full one ('' when nothing), e.g. the main job's."""
    full, c = make_config("study", preset).claim, cfg.claim
    parts = []
    if len(c.seeds) < len(full.seeds):
        parts.append(f"{len(c.seeds)} generator seed(s) of {len(full.seeds)}"
                     + (", so the verdict cannot resolve" if len(c.seeds) < 2 else ""))
    missing = sorted(set(full.extra_weights) - set(c.extra_weights))
    if missing:
        parts.append(f"no C1 at λ = {', '.join(f'{w:g}' for w in missing)}")
    if not parts:
        return ""
    return "; ".join(parts) + (f". The full study: `python -m dmvae_lib --preset {preset} --only 20 70 "
                               "--name claim`.")


def curve_bands(data: ArmData, key: str) -> dict[str, dict]:
    """{arm: {"step", "mean", "std", "n"}} of one curve key over the seeds (steps common to all seeds)."""
    out = {}
    for arm, by_seed in data.curves.items():
        pts = [p for p in by_seed.values() if p and key in p[0]]
        if not pts:
            continue
        steps = sorted(set.intersection(*({r["step"] for r in p} for p in pts)))
        vals = np.array([[next(r[key] for r in p if r["step"] == s) for s in steps] for p in pts], float)
        out[arm] = {"step": steps, "mean": vals.mean(0).tolist(),
                    "std": (vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(steps))).tolist(),
                    "n": len(vals)}
    return out
