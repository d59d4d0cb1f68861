"""The claim study, version 2 (issue 23): its arms as runs of notebooks 20, 30, 40 and 60, then its claims.

    runs = plan(cfg, preset, prefix, run_root, tokenizer_dir)    # every notebook execution, in order
    results = arms.run_all(runs, run_root)                       # papermill; finished runs are skipped
    data = collect(cfg, prefix, run_root, tokenizer_dir)         # PSNR, drift, curves per arm and joint seed
    out = result(cfg, data)                                      # gates and the four claims (claims_v2)

Every joint arm starts from the same stage 1 (AE from its own) and runs one joint protocol: the study's
`claim_v2.joint` overrides, no control, the same decoder refinement (`refine_steps`). Only the named
differences remain (the encoder trains or not, λ, VA's alignment term). A joint seed s is the notebook-40
run's seed, so it sets every stream of the joint stage and arms of one s see the same batches. Each (arm, s)
gets one generator whose seed is s's index; A gets the same generator seeds. Run names:
`<prefix>-v2-<arm>-j<s>` (notebook 40) and `<prefix>-v2-<arm>-j<s>-g<i>` / `<prefix>-v2-A-g<i>` (notebook
60). AE's stage 1 and the two teachers are version 1's runs (the same configs): a finished one is reused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..configs import make_config, to_dict
from ..configs.study import VA_ALIGN_KEYS, StudyConfig
from ..runtime.runs import read_summary
from . import arms, claims_v2

JOINT_ARMS = ("A_J", "C0", "VA", "C1", "AE")  # the notebook-40 arms; A is stage 1 alone
ALL_ARMS = ("A", *JOINT_ARMS)


def joint_changes(cfg: StudyConfig, a_config: dict) -> dict[str, dict]:
    """Arm -> the notebook-40 overrides that make it, on top of the one joint protocol. VA's alignment weights
    are `claim_v2.va_align`, else stage 1's (arm A's recorded config); its maps continue from stage 1's when
    stage 1 trained every term VA switches on (the term goes on, not a new one), else start fresh."""
    c = cfg.claim_v2
    stage1 = a_config.get("train", {})
    va = dict(c.va_align) or {k: stage1.get(k.removeprefix("train."), 0.0) for k in VA_ALIGN_KEYS}
    terms = ("align_token", "align_global")
    if all(va.get(f"train.{t}", 0.0) <= 0 for t in terms):
        raise ValueError("the VA arm needs an alignment term: arm A's stage 1 trained without one "
                         "(train.align_token = train.align_global = 0); set claim_v2.va_align")
    continues = all(stage1.get(t, 0.0) > 0 for t in terms if va.get(f"train.{t}", 0.0) > 0)
    off = {"train.dm_weight": 0.0}
    return {"A_J": {**off, "train.train_encoder": False}, "C0": {**off, "train.train_encoder": True},
            "VA": {**off, "train.train_encoder": True, **va,
                   "train.align_init": "stage1" if continues else "fresh"},
            "C1": {"train.dm_weight": c.dm_weight, "train.train_encoder": True},
            "AE": {**off, "train.train_encoder": True}}


def protocol(cfg: StudyConfig) -> dict:
    """The one joint protocol every arm shares (before its own changes)."""
    return {**cfg.claim_v2.joint, "train.control": False, "train.refine_steps": cfg.claim_v2.refine_steps}


def joint_name(prefix: str, arm: str, seed: int) -> str:
    return f"{prefix}-v2-{arm}-j{seed}"


def generator_name(prefix: str, arm: str, seed: int, index: int) -> str:
    return f"{prefix}-v2-A-g{index}" if arm == "A" else f"{joint_name(prefix, arm, seed)}-g{index}"


def plan(cfg: StudyConfig, preset: str, prefix: str, run_root: Path, tokenizer_dir: Path,
         device: str = "auto") -> list[arms.Run]:
    """Every notebook execution of version 2, in an order that respects `needs`."""
    c, root = cfg.claim_v2, Path(run_root)
    a_cfg = json.loads((Path(tokenizer_dir) / "config.json").read_text())["config"]
    if not arms.can_be_arm_a(a_cfg):
        raise ValueError(f"arm A must be a stage-1 tokenizer on the embedded SSL (or supervised) encoder; "
                         f"{tokenizer_dir} has encoder.kind={a_cfg.get('encoder', {}).get('kind')!r}")
    changes, common = joint_changes(cfg, a_cfg), {"preset": preset, "run_root": str(root), "device": device}
    stage1_seed = int(a_cfg["seed"])
    a_over = {k: v for k, v in arms.flat_overrides(a_cfg).items() if k != "seed"}
    ae1 = f"{prefix}-AE-stage1"
    fit = {"reference": "ssl", "max_sw2_ratio": 0.0}
    ssl_teacher = {**common, "seed": stage1_seed, "run_name": "", "tokenizer_run": str(tokenizer_dir),
                   "overrides": dict(c.teacher), **fit}
    teachers = {"ssl": arms._reused("30", root, prefix, "teacher", ssl_teacher), "AE": f"{prefix}-teacher-AE"}
    ae1_dir = root / arms.NOTEBOOKS["20"] / ae1
    runs = [arms.Run("20", ae1, {**common, "seed": stage1_seed, "run_name": ae1,
                                 "overrides": {**a_over, **arms.AE_CHANGES, **c.tokenizer}},
                     prefill=arms._reference_fits(Path(tokenizer_dir), c.tokenizer)),
            arms.Run("30", teachers["ssl"], {**ssl_teacher, "run_name": teachers["ssl"]}),
            arms.Run("30", teachers["AE"], {**common, "seed": stage1_seed, "run_name": teachers["AE"],
                                            "tokenizer_run": str(ae1_dir),
                                            "overrides": {**c.teacher, **arms.UNUSED_TEACHER}, **fit},
                     needs=(ae1,))]
    t_dir = {k: root / arms.NOTEBOOKS["30"] / v for k, v in teachers.items()}
    for s in c.joint_seeds:
        for arm in JOINT_ARMS:
            name, ae = joint_name(prefix, arm, s), arm == "AE"
            params = {**common, "seed": s, "run_name": name,
                      "tokenizer_run": str(ae1_dir if ae else tokenizer_dir),
                      "teacher_run": str(t_dir["AE" if ae else "ssl"]),
                      "overrides": {**protocol(cfg), **changes[arm]}}
            needs = (ae1, teachers["AE"]) if ae else (teachers["ssl"],)
            runs.append(arms.Run("40", name, params, needs=needs))
    for i, s in enumerate(c.joint_seeds):
        for arm in ALL_ARMS:
            name = generator_name(prefix, arm, s, i)
            folder = (Path(tokenizer_dir) if arm == "A"
                      else root / arms.NOTEBOOKS["40"] / joint_name(prefix, arm, s))
            params = {**common, "seed": i, "run_name": name, "joint_run": str(folder),
                      "tokenizer_file": "tokenizer.pt", "overrides": dict(c.generation)}
            runs.append(arms.Run("60", name, params, needs=() if arm == "A" else (folder.name,)))
    return runs


def check(cfg: StudyConfig, preset: str) -> None:
    """Every config version 2's runs build, checked before any work starts (the VA arm's weights included,
    with stage 1's taken as the preset's)."""
    c = cfg.claim_v2
    make_config("generation", preset, c.generation)
    make_config("tokenizer", preset, {**arms.AE_CHANGES, **c.tokenizer})
    make_config("teacher", preset, c.teacher)
    for over in joint_changes(cfg, to_dict(make_config("tokenizer", preset))).values():
        make_config("joint", preset, {**protocol(cfg), **over})


@dataclass
class V2Data:
    """What version 2's runs left behind: arm -> {joint seed: value}."""

    psnr: dict[str, dict[int, float]] = field(default_factory=dict)  # after refinement (A: stage 1's)
    psnr_before: dict[str, dict[int, float]] = field(default_factory=dict)  # before refinement (val[:500])
    psnr_after: dict[str, dict[int, float]] = field(default_factory=dict)  # after it, the same images
    drift_fd: dict[str, dict[int, float]] = field(default_factory=dict)  # latent FD to the reference
    drift_floor: dict[str, dict[int, float]] = field(default_factory=dict)  # its two-draw floor
    curves: dict[str, dict[int, list[dict]]] = field(default_factory=dict)  # generator curves


def collect(cfg: StudyConfig, prefix: str, run_root: Path, tokenizer_dir: Path) -> V2Data:
    """Read every arm's numbers from its runs' summary.json (a missing run leaves its seed out)."""
    out, root, seeds = V2Data(), Path(run_root), cfg.claim_v2.joint_seeds
    a_psnr = read_summary(tokenizer_dir).get("tokenizer", {}).get("psnr")
    for arm in ALL_ARMS:
        for key in ("psnr", "psnr_before", "psnr_after", "drift_fd", "drift_floor", "curves"):
            getattr(out, key)[arm] = {}
        for i, s in enumerate(seeds):
            curve = read_summary(root / arms.NOTEBOOKS["60"] / generator_name(prefix, arm, s, i)).get("curve")
            if curve:
                out.curves[arm][s] = curve
            if arm == "A":
                if a_psnr is not None:
                    out.psnr[arm][s] = float(a_psnr)
                continue
            dm = read_summary(root / arms.NOTEBOOKS["40"] / joint_name(prefix, arm, s)).get("dm", {})
            for key, value in (("psnr", dm.get("psnr")), ("drift_fd", dm.get("ref_fd")),
                               ("drift_floor", dm.get("ref_fd_floor")),
                               ("psnr_before", dm.get("refine", {}).get("val_psnr_before")),
                               ("psnr_after", dm.get("refine", {}).get("val_psnr_after"))):
                if value is not None:
                    getattr(out, key)[arm][s] = float(value)
    return out


def result(cfg: StudyConfig, data: V2Data, thresholds: claims_v2.Thresholds = claims_v2.Thresholds()) -> dict:
    """Gates and the four claims on the pre-registered space's FD to real images, plus the same claims in
    every other recorded space and distance, reported beside them (never instead)."""
    primary = f"fd_{cfg.claim_v2.space}"
    floors = [v for v in data.drift_floor.get("C0", {}).values() if math.isfinite(v)]
    floor = float(np.mean(floors)) if floors else math.nan
    out = {"space": primary, "joint_seeds": list(cfg.claim_v2.joint_seeds), "drift_floor": floor,
           **claims_v2.verdicts(arms.scores(data, primary), data.psnr, data.drift_fd, floor, thresholds),
           "other_spaces": {}}
    for k in arms.keys(data):
        if k != primary:
            v = claims_v2.verdicts(arms.scores(data, k), data.psnr, data.drift_fd, floor, thresholds)
            out["other_spaces"][k] = {key: c["outcome"] for key, c in v["claims"].items()}
    return out


def reduced(cfg: StudyConfig, preset: str) -> str:
    """What this version-2 study leaves out of the preset's full one ('' when nothing): fewer joint seeds,
    and stages shortened from the preset's (the main job's rehearsal, `configs.study.MAIN_JOB_V2`)."""
    full, c = make_config("study", preset).claim_v2, cfg.claim_v2
    short = [name for name in ("tokenizer", "joint", "generation") if getattr(c, name) != getattr(full, name)]
    short += ["refinement"] if c.refine_steps != full.refine_steps else []
    parts = []
    if len(c.joint_seeds) < len(full.joint_seeds):
        parts.append(f"{len(c.joint_seeds)} joint seed(s) of {len(full.joint_seeds)}"
                     + (", so no claim can resolve" if len(c.joint_seeds) < 2 else ""))
    if short:
        parts.append(f"a rehearsal: the {', '.join(short)} settings differ from the preset's study, so its "
                     "numbers are not the study's")
    if not parts:
        return ""
    return "; ".join(parts) + (f". The full study: `python -m dmvae_lib --preset {preset} --only 20 71 "
                               "--name claim`.")
