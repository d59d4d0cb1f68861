"""Configuration of the reference-distribution study (notebook 70; paper Tab. 1 and the λ trend of Tab. 2).

One study = a grid of cells. Each reference gets one teacher (notebook 30), shared by all of its seeds and
DM weights; each cell (reference, λ, seed) runs notebook 40 (joint training, no separate control) and
notebook 60 (generator + evaluation) from the one stage-1 tokenizer (notebook 20) that every cell shares.
The λ = 0 baseline cells need no teacher of their own: they run notebook 40 with `train.dm_weight` 0, which
skips the fake net and every DM forward pass (the teacher of the first reference is loaded and ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .teacher import REFERENCE_NAMES


@dataclass(frozen=True)
class StudyConfig:
    seed: int = 0  # the notebook's own seed (plots); the cells use `seeds`
    threads: int = 0
    tokenizer_run: str = ""  # the shared notebook-20 run (resolved by the notebook)
    references: tuple[str, ...] = REFERENCE_NAMES  # one teacher each; cells at λ = dm_weight
    seeds: tuple[int, ...] = (0, 1)  # every cell runs once per seed (joint training and generator)
    dm_weight: float = 10.0  # λ of the reference cells (the authors' 10)
    sweep_reference: str = "ssl"  # the reference of the λ sweep
    sweep_weights: tuple[float, ...] = (1.0, 100.0)  # extra λ on sweep_reference (λ = dm_weight is shared)
    baseline: bool = True  # λ = 0 cells (the same joint stage with the DM term off)
    teacher: dict = field(default_factory=dict)  # dotted overrides for notebook 30 in every cell
    joint: dict = field(default_factory=dict)  # … for notebook 40
    generation: dict = field(default_factory=dict)  # … for notebook 60

    def validate(self) -> None:
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


PRESETS: dict[str, dict] = {
    # CI: one reference and the baseline, one seed, a few steps each (the λ sweep and seeds are unit-tested).
    "smoke": {"references": ["ssl"], "seeds": [0], "sweep_weights": [],
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
    "cpu": {"teacher": {"fit.steps": 800, "fit.eval_samples": 1000},
            "joint": {"train.steps": 400, "train.disc_start": 200, "train.eval_every": 200,
                      "train.control": False, "train.eval_samples": 1000},
            "generation": {"fit.steps": 600, "sample.n": 1000, "metrics.real_images": 4000,
                           "metrics.floor_images": 1000, "metrics.png_limit": 50}},
    # The paper's Tab. 1 protocol at full scale is hundreds of GPU-days per cell; these are the per-stage
    # presets unchanged, one seed (run the cells you need with `references`/`seeds`).
    "imagenet256": {"seeds": [0], "joint": {"train.control": False}},
}  # fmt: skip
