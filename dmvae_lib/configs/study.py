"""Configuration of notebook 70: the claim study (the paper's arms, `ClaimConfig`) and, optionally after it,
the reference-distribution grid (paper Tab. 1 and the λ trend of Tab. 2).

The grid = a grid of cells. Each reference gets one teacher (notebook 30), shared by all of its seeds and
DM weights; each cell (reference, λ, seed) runs notebook 40 (joint training, no separate control) and
notebook 60 (generator + evaluation) from the one stage-1 tokenizer (notebook 20) that every cell shares.
The λ = 0 baseline cells need no teacher of their own: they run notebook 40 with `train.dm_weight` 0, which
skips the fake net and every DM forward pass (the teacher of the first reference is loaded and ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .teacher import REFERENCE_NAMES

# The grid's default references: every name but `text` (paper Tab. 1's SigLIP row), which the `cpu` budget
# below was measured without (one more teacher and two more cells); add it with references=[…, "text"].
GRID_REFERENCES = tuple(r for r in REFERENCE_NAMES if r != "text")


@dataclass(frozen=True)
class ClaimConfig:
    """The paper's arms as configs of notebooks 20, 30, 40 and 60 (workflow/arms.py): A = the shared stage-1
    tokenizer (frozen SSL encoder); C1 = A jointly trained with the encoder trainable and λ·L_DM; C0 = C1's
    λ = 0 control; AE = stage 1 with a random encoder trained from scratch, then jointly trained, λ = 0;
    R (optional) = that stage 1 with the random encoder frozen."""

    seeds: tuple[int, ...] = (0, 1, 2)  # generator seeds, the same for every arm (paired)
    dm_weight: float = 10.0  # λ of C1, the arm the verdict reads (the authors' 10; fixed before results)
    extra_weights: tuple[float, ...] = (1.0,)  # more C1 arms at these λ, reported beside, not in the verdict
    random_arm: bool = False  # also run and generate from R (frozen random encoder), the RAE-style control
    space: str = "sup"  # the curve FD the verdict reads: "sup" | "ssl" | "pix" (to real images)
    tokenizer: dict = field(default_factory=dict)  # dotted overrides for the AE/R stage-1 runs (beside A's)
    teacher: dict = field(default_factory=dict)  # … for notebook 30 (the SSL teacher of C1)
    joint: dict = field(default_factory=dict)  # … for notebook 40 (C1/C0 and AE; the encoder always trains)
    generation: dict = field(default_factory=dict)  # … for notebook 60 (every arm and seed)

    def validate(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"claim.seeds must be distinct and non-empty, got {list(self.seeds)}")
        if self.dm_weight <= 0 or any(w <= 0 or w == self.dm_weight for w in self.extra_weights):
            raise ConfigError("claim.dm_weight and claim.extra_weights must be > 0 and distinct "
                              "(C0 is C1's λ = 0 control)")
        if self.space not in CURVE_SPACES:
            raise ConfigError(f"claim.space {self.space!r} unknown; use one of {', '.join(CURVE_SPACES)}")
        for name in ("tokenizer", "teacher", "joint", "generation"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"claim.{name} must be a mapping of dotted config keys")


CURVE_SPACES = ("sup", "ssl", "pix")  # generation/curve_evaluator's feature spaces
# What the claim study sets itself in its sub-runs (workflow/arms.py): AE's stage 1 is arm A's stage-1 config
# with these changed (R, when asked for, the same with the encoder frozen); every joint run trains the
# encoder. The pipeline checks the claim's overrides together with them.
CLAIM_FIXED = {"tokenizer": {"encoder.kind": "random", "train.train_encoder": True, "train.align_token": 0.0,
                             "train.align_global": 0.0, "checks.min_latent_linear": 0.0},
               "joint": {"train.train_encoder": True}}


# The claim study v1's generator, fixed with its design: notebook 60's `cpu` recipe as it was when the study
# was pre-registered (Micro/4, constant LR, uniform t, Euler ODE 50 steps, no CFG), stated in full so that a
# new notebook-60 default cannot change the study under its verdict. A study with another generator is a new
# version under a new name. No CFG sweep: the study reads its learning curves, not the sweep. No
# class-accuracy check: 800 steps of this generator draw blobs (0.15–0.18 at CFG 1, measured), which the
# study reports as they are.
CLAIM_V1_GENERATOR = {"net.size": "Micro", "net.patch_size": 4, "net.label_dropout": 0.1,
                      "fit.batch": 256, "fit.lr": 1e-3, "fit.warmup_steps": 100, "fit.weight_decay": 0.0,
                      "fit.grad_clip": 1.0, "fit.ema_decay": 0.999, "fit.lr_schedule": "constant",
                      "fit.t_sampling": "uniform", "fit.t_shift": 1.0, "fit.precision": "bf16",
                      "fit.compile": False, "sample.sampler": "ode", "sample.steps": 50,
                      "sample.cfg_scale": 1.0, "sample.cfg_interval": [0.0, 1.0], "sample.shift": 1.0,
                      "sample.ema": True, "sample.precision": "fp32", "fit.ckpt_every": 500,
                      "metrics.cfg_sweep": [], "metrics.sweep_n": 1000, "metrics.min_class_accuracy": 0.0}


@dataclass(frozen=True)
class ClaimV2Config:
    """The claim study, version 2 (issue 23; `workflow/arms_v2.py`, `workflow/claims_v2.py`), fixed before
    any of its results: every joint arm (A_J, C0, VA, C1, AE) runs one joint protocol and the same decoder
    refinement, once per joint seed; arms are paired by joint seed. Version 1 (`claim`) stays reachable."""

    joint_seeds: tuple[int, ...] = (0, 1, 2)  # each sets every stream of a joint run; generator seed = index
    dm_weight: float = 10.0  # C1's λ toward the SSL teacher (the authors' 10)
    refine_steps: int = 100  # decoder refinement (App. A.4) of every joint arm, the same length for all
    space: str = "sup"  # the curve FD the claims read (to real images), as in version 1
    va_align: dict = field(default_factory=dict)  # VA's alignment weights; {} -> stage 1's (arm A's config)
    tokenizer: dict = field(default_factory=dict)  # dotted overrides for AE's stage-1 run
    teacher: dict = field(default_factory=dict)  # … for notebook 30 (the SSL teacher of C1)
    joint: dict = field(default_factory=dict)  # … for every notebook-40 run (the one joint protocol)
    generation: dict = field(default_factory=dict)  # … for every notebook-60 run

    def validate(self) -> None:
        if not self.joint_seeds or len(set(self.joint_seeds)) != len(self.joint_seeds):
            raise ConfigError("claim_v2.joint_seeds must be distinct and non-empty, got "
                              f"{list(self.joint_seeds)}")
        if self.dm_weight <= 0:
            raise ConfigError(f"claim_v2.dm_weight must be > 0, got {self.dm_weight}")
        if self.refine_steps < 0:
            raise ConfigError(f"claim_v2.refine_steps must be >= 0, got {self.refine_steps}")
        if self.space not in CURVE_SPACES:
            raise ConfigError(f"claim_v2.space {self.space!r} unknown; use one of {', '.join(CURVE_SPACES)}")
        unknown = sorted(set(self.va_align) - set(VA_ALIGN_KEYS))
        if unknown:
            raise ConfigError(f"claim_v2.va_align: unknown keys {unknown}; use {', '.join(VA_ALIGN_KEYS)}")
        for name in ("va_align", "tokenizer", "teacher", "joint", "generation"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"claim_v2.{name} must be a mapping of dotted config keys")


# the joint stage's alignment keys (configs/joint.py), named as in stage 1's config (configs/tokenizer.py)
VA_ALIGN_KEYS = ("train.align_token", "train.align_global", "train.align_margin_cos",
                 "train.align_margin_dist")


@dataclass(frozen=True)
class StudyConfig:
    seed: int = 0  # the notebook's own seed (plots); the cells use `seeds`
    threads: int = 0
    tokenizer_run: str = ""  # the shared notebook-20 run: arm A, and the grid's tokenizer
    claim: ClaimConfig = field(default_factory=ClaimConfig)
    claim_v2: ClaimV2Config = field(default_factory=ClaimV2Config)
    grid: bool = False  # after the claim study, also run the reference grid below (paper Tab. 1)
    references: tuple[str, ...] = GRID_REFERENCES  # one teacher each; cells at λ = dm_weight (any of
                                                   # REFERENCE_NAMES, "text" included)
    seeds: tuple[int, ...] = (0, 1)  # every cell runs once per seed (joint training and generator)
    dm_weight: float = 10.0  # λ of the reference cells (the authors' 10)
    sweep_reference: str = "ssl"  # the reference of the λ sweep
    sweep_weights: tuple[float, ...] = (1.0, 100.0)  # extra λ on sweep_reference (λ = dm_weight is shared)
    baseline: bool = True  # λ = 0 cells (the same joint stage with the DM term off)
    teacher: dict = field(default_factory=dict)  # dotted overrides for notebook 30 in every cell
    joint: dict = field(default_factory=dict)  # … for notebook 40
    generation: dict = field(default_factory=dict)  # … for notebook 60

    def validate(self) -> None:
        self.claim.validate()
        self.claim_v2.validate()
        unknown = [r for r in self.references if r not in REFERENCE_NAMES]
        if unknown or not self.references:
            raise ConfigError(f"references {list(self.references)}: use a non-empty subset of "
                              f"{', '.join(REFERENCE_NAMES)}")
        if self.sweep_weights and self.sweep_reference not in self.references:
            raise ConfigError(f"sweep_reference {self.sweep_reference!r} must be one of references "
                              f"{list(self.references)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and non-empty, got {list(self.seeds)}")
        if self.dm_weight <= 0 or any(w <= 0 for w in self.sweep_weights):
            raise ConfigError("dm_weight and sweep_weights must be > 0 "
                              "(the λ = 0 cells come from `baseline`)")
        for name in ("teacher", "joint", "generation"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping of dotted config keys, got "
                                  f"{getattr(self, name)!r}")


# The claim studies' per-preset joint and generator settings, shared by both versions (version 2 keeps
# version 1's joint length and generator readout: issue 23).
_SMOKE_JOINT = {"train.steps": 20, "train.disc_start": 10, "train.eval_every": 10, "train.eval_samples": 200,
                "train.log_every": 10, "train.ckpt_every": 10}
_SMOKE_GENERATION = {"metrics.cfg_sweep": [], "fit.steps": 40, "fit.log_every": 10, "fit.ckpt_every": 20,
                     "curve.steps": [10, 20, 40], "curve.n": 100, "sample.n": 100, "sample.steps": 10,
                     "metrics.real_images": 500, "metrics.floor_images": 100, "metrics.png_limit": 10,
                     "metrics.grid_per_class": 4, "metrics.cluster_latents": 200}
_CPU_GENERATION = {**CLAIM_V1_GENERATOR, "fit.steps": 800, "curve.steps": [100, 200, 400, 800],
                   "curve.n": 2000, "sample.n": 500, "metrics.real_images": 4000,
                   "metrics.floor_images": 1000, "metrics.png_limit": 50}
_GPU_CURVE = {"curve.steps": [10000, 20000, 40000, 80000], "curve.n": 10000}

# What the main job (the whole pipeline) runs of version 2 at a preset: a rehearsal, not the study. One joint
# seed resolves no claim, and at `cpu` the full study's stages for one seed take ≈ 48 min (measured: the
# reduced pilot, docs/claim-study.md), past the main job's 40-minute budget with notebooks 10–60 at ≈ 30.
# So the main job runs every arm and every stage of version 2 once, shortened (AE's stage 1 100 steps, the
# joint runs 50 with their diagnostics once at the end, the refinement 10, the generators 100 with two
# 250-sample curve points and 1,000 real images), to show the study's shape and exercise its code on the
# embedded data; its numbers are not the study's, and its report says so (`arms_v2.reduced`). The lengths
# were halved once more on 2026-12-07 for the 40-minute budget (16.4 min measured at the earlier ones).
# Presets without an entry run their full version-2 settings with one seed.
MAIN_JOB_V2: dict[str, dict] = {
    "cpu": {"claim_v2.joint_seeds": [0], "claim_v2.refine_steps": 10,
            "claim_v2.tokenizer": {"train.steps": 100, "train.disc_start": 75, "train.ckpt_every": 50,
                                   "checks.min_psnr": 0.0},
            "claim_v2.joint": {"train.steps": 50, "train.disc_start": 25, "train.eval_every": 50,
                               "train.eval_samples": 500, "train.log_every": 10, "train.ckpt_every": 25},
            "claim_v2.generation": {**_CPU_GENERATION, "fit.steps": 100, "curve.steps": [50, 100],
                                    "curve.n": 250, "sample.n": 250, "metrics.real_images": 1000,
                                    "metrics.floor_images": 250, "fit.ckpt_every": 50}},
}

PRESETS: dict[str, dict] = {
    # CI: one reference and the baseline, one seed, a few steps each (the λ sweep and seeds are unit-tested).
    # CI: every arm once (one generator seed, no extra λ), a few steps each; seed pairing is unit-tested.
    "smoke": {"claim.seeds": [0], "claim.extra_weights": [],
              "claim.joint": _SMOKE_JOINT, "claim.generation": _SMOKE_GENERATION,
              "claim_v2.joint_seeds": [0], "claim_v2.refine_steps": 5, "claim_v2.joint": _SMOKE_JOINT,
              "claim_v2.generation": _SMOKE_GENERATION,
              "references": ["ssl"], "seeds": [0], "sweep_weights": [],
              "joint": {"train.steps": 20, "train.disc_start": 10, "train.control": False,
                        "train.eval_every": 10, "train.eval_samples": 200, "train.log_every": 10,
                        "train.ckpt_every": 10},
              "generation": {"fit.steps": 40, "fit.log_every": 10, "fit.ckpt_every": 20, "sample.n": 100,
                             "sample.steps": 10, "metrics.real_images": 500, "metrics.floor_images": 100,
                             "metrics.png_limit": 10, "metrics.grid_per_class": 4,
                             "metrics.cluster_latents": 200}},
    # This CPU in ≤ 2 h: notebook 20 once, 6 teachers and 18 cells (6 references + the baseline + λ ∈ {1,
    # 100}, 2 seeds each). Shorter than the single-run `cpu` notebooks: teacher 800 steps (vs 1600), joint 400
    # (vs 1000, GAN from 200), generator 600 (vs 1600), 1000 samples (vs 2000) against 4000 real images.
    # cpu: 3 generator seeds × the arms AE, A, C0, C1 (λ 10); learning curves at 100–800 steps, 2000 samples a
    # point against 4000 real images. No extra λ: C1 at λ 1 costs ≈ 20 min more (its joint run 6 min, 3
    # generators 4.5 min each; measured), past the 2-h budget; add it with `claim.extra_weights: [1.0]`.
    "cpu": {"claim.extra_weights": [], "claim.generation": _CPU_GENERATION,
            "claim_v2.generation": _CPU_GENERATION,
            "teacher": {"fit.steps": 800, "fit.eval_samples": 1000},
            "joint": {"train.steps": 400, "train.disc_start": 200, "train.eval_every": 200,
                      "train.control": False, "train.eval_samples": 1000},
            "generation": {"fit.steps": 600, "sample.n": 1000, "metrics.real_images": 4000,
                           "metrics.floor_images": 1000, "metrics.png_limit": 50}},
    # The paper's Tab. 1 protocol at full scale is hundreds of GPU-days per cell; these are the per-stage
    # presets as they are, one seed (run the cells you need with `references`/`seeds`).
    "imagenet256": {"claim.seeds": [0], "claim.extra_weights": [], "seeds": [0],
                    "claim.generation": _GPU_CURVE, "claim_v2.joint_seeds": [0],
                    "claim_v2.generation": _GPU_CURVE,
                    "joint": {"train.control": False}},
}  # fmt: skip
