"""Configuration of the 2-D toy study (notebook 10; paper §3.3, Fig. 3 and App. B, Fig. 7)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.dmd import OBJECTIVES
from ..core.toy2d import REFERENCES
from .errors import ConfigError

ALL_OBJECTIVES = tuple(OBJECTIVES)  # the registry's order: DM first, then Fig. 3's panels


@dataclass(frozen=True)
class ToyNetConfig:
    width: int = 128  # hidden width of the residual MLP (0.1 M params; the authors' 7.4 M DiT is waste here)
    depth: int = 2  # residual blocks


@dataclass(frozen=True)
class ToyFitConfig:
    """Flow-matching fit of the real (reference) velocity net on fresh reference samples."""

    steps: int = 800
    batch: int = 512  # fresh reference samples per step (infinite data)
    lr: float = 3e-3  # peak of a one-cycle schedule (10 % warm-up, cosine decay)
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ToyAlignConfig:
    """Alternating updates: free points every `points_every` steps, fake net every step."""

    steps: int = 600  # global steps (fake-net updates)
    n_points: int = 1536  # free 2-D "latents", as in the paper's toy
    init_half_width: float = 1.5  # points start i.i.d. U[−w, w]²
    points_every: int = 2  # the reference uses 5 with lr 1e-4, which
                           # cannot reach the S (docs/authors-code.md §1.4)
    points_lr: float = 1e-2  # Adam on the points; 1e-4 (authors) moves a point ~0.2 in 2,000 updates
    fake_lr: float = 1e-3
    fake_batch: int = 512  # points drawn (without replacement) for each fake-net step
    t_min: float = 0.02  # objective timesteps ~ U[t_min, t_max], clamped off the singular ends
    t_max: float = 0.98
    anneal_steps: int = 0  # >0: move t_min linearly to anneal_t_min over this many steps (low-noise end)
    anneal_t_min: float = 0.5
    snapshot_every: int = 50  # keep points + fake-net weights for the progress slider and explorer


@dataclass(frozen=True)
class ToyEvalConfig:
    n_directions: int = 256  # sliced-W2 projections
    repeats: int = 10  # fresh reference draws averaged per SW2 (and pairs for the noise floor)
    coverage_k: int = 5  # k of the k-NN balls in the coverage metric
    field_ts: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # Fig. 7 timesteps
    field_noise_draws: int = 64  # noise draws averaged per probe point and t
    grid_n: int = 15  # direction-field grid is grid_n × grid_n


@dataclass(frozen=True)
class ToyVerdictConfig:
    """Thresholds of the one-word verdicts (`stages.toy.classify`): the results table, the paper comparison
    and the notebook's checks all read these, so they cannot disagree."""

    match_ratio: float = 1.5  # "matched": SW2 <= this × the noise floor (the paper's "precise alignment")
    collapse_spread: float = 0.1  # "collapsed": spread <= this × the reference's (a point or a few)
    expand_spread: float = 1.5  # "expanded": spread > this × the reference's
    drop_coverage: float = 0.8  # "mode-dropping": coverage < this × DM's (real-score maximisation)


@dataclass(frozen=True)
class ToyConfig:
    reference: str = "s_shape"  # a key of toy2d.REFERENCES
    objectives: tuple[str, ...] = ALL_OBJECTIVES
    seed: int = 0
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default
    net: ToyNetConfig = field(default_factory=ToyNetConfig)
    fit: ToyFitConfig = field(default_factory=ToyFitConfig)
    align: ToyAlignConfig = field(default_factory=ToyAlignConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)
    verdict: ToyVerdictConfig = field(default_factory=ToyVerdictConfig)

    def validate(self) -> None:
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference {self.reference!r} unknown; known: {', '.join(REFERENCES)}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise ConfigError(f"objectives {bad or '()'} unknown; known: {', '.join(OBJECTIVES)}")
        if not 0.0 <= self.align.t_min < self.align.t_max <= 1.0:
            raise ConfigError(f"need 0 <= align.t_min < align.t_max <= 1, got {self.align.t_min}, "
                              f"{self.align.t_max}")


PRESETS: dict[str, dict] = {
    # CI: the DM-vs-collapse contrast on a few objectives, well under a minute. 300 steps bring DM to about
    # twice the noise floor, not to it, so "matched" means <= 2.5 × floor here (1.5 × from `cpu` up).
    "smoke": {
        "objectives": ("dm", "real_fm_input", "real_fm_target", "fake_fm_target"),
        "fit.steps": 400, "align.steps": 300, "align.points_lr": 2e-2, "align.snapshot_every": 50,
        "eval.field_noise_draws": 16, "eval.grid_n": 11, "verdict.match_ratio": 2.5,
    },
    # The embedded default: every objective, ~2 min on a 2-core CPU.
    "cpu": {},
    # Larger nets and longer runs for a GPU (or a patient CPU): the authors' 10k-step budget.
    "imagenet256": {
        "net.width": 256, "net.depth": 3, "fit.steps": 10000, "fit.batch": 2048,
        "align.steps": 10000, "align.points_lr": 3e-3, "align.fake_batch": 1536, "align.snapshot_every": 500,
        "eval.field_noise_draws": 256, "eval.grid_n": 21,
    },
}  # fmt: skip
