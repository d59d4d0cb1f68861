"""Configuration of notebook 60: the final generator on the DM tokenizer's latents, sampling and evaluation
(notebook 60; paper §5, Tab. 3; docs/authors-code.md §5.2, §5.4, §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .teacher import DiTConfig, validate_fit

SAMPLERS = ("ode", "sde")


@dataclass(frozen=True)
class GeneratorFitConfig:
    """The flow-matching fit of the generator (fit_velocity_net reads exactly these fields)."""

    steps: int = 1600  # ≈ 3.5 min for Micro/4 at batch 256 in bf16 on 2 cores (as the cpu teacher)
    batch: int = 256
    lr: float = 1e-3  # AdamW (0.9, 0.95), linear warm-up then constant
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the EMA weights are what gets sampled unless sample.ema = False
    lr_schedule: str = "constant"  # after the warm-up: "constant" | "cosine" (to 0 at fit.steps)
    t_sampling: str = "uniform"  # training times: "uniform" | "logit_normal" (sigmoid of N(t_mean, t_std²))
    t_mean: float = 0.0  # logit-normal location (< 0: more samples near noise, t = 0)
    t_std: float = 1.0  # logit-normal scale
    t_shift: float = 1.0  # SD3 shift of the noise level σ = 1 − t (> 1: more time at high noise)
    precision: str = "bf16"
    compile: bool = False  # torch.compile the net (GPU)
    log_every: int = 50
    ckpt_every: int = 500


@dataclass(frozen=True)
class SampleConfig:
    n: int = 2000  # images generated (50 000 for gFID-50K); class-balanced labels, i mod num_classes
    sampler: str = "ode"  # "ode" (Euler, probability flow) | "sde" (Euler–Maruyama, the authors' evaluation)
    steps: int = 50  # network evaluations per sample (250 at full scale)
    cfg_scale: float = 1.0  # classifier-free guidance (1: none, the paper's Tab. 3 setting)
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guide only for t in [lo, hi] (t = 0 noise, t = 1 data)
    shift: float = 1.0  # ODE time-grid shift of the noise level (1: uniform); the SDE grid is uniform
    diffusion_norm: float = 1.0  # SDE: w(t) = norm·(1 − t) ("sigma" diffusion of SiT/LightningDiT)
    last_step: float = 0.04  # SDE: final deterministic mean step from t = 1 − last_step to 1
    ema: bool = True  # sample the EMA weights (False: the raw weights of the last checkpoint)
    batch: int = 500  # samples per sampler call (and per decoder call)
    precision: str = "fp32"  # sampler and decoder numerics (fp32 | bf16 autocast)


@dataclass(frozen=True)
class MetricsConfig:
    real_images: int = 10000  # real training images (val when streamed) behind the SSL-space statistics
    floor_images: int = 2000  # val images for the real-vs-real noise floor and the reconstruction FD (rFD)
    feature_batch: int = 500
    inception_weights: str = ""  # torch-fidelity Inception file; "" ->
                                 # $TORCH_HOME/hub/checkpoints; never downloaded
    reference_batch: str = ""  # ADM reference .npz (mu/sigma [+ arr_0]); "" -> statistics of the real images
    isc_splits: int = 10  # Inception-score splits (torch-fidelity default, as the authors' sample_50k.py)
    prc_neighborhood: int = 3  # k of the k-NN balls of precision/recall (ADM evaluator: 3)
    png_limit: int = 500  # individual PNGs written (all N go into the .npz)
    grid_per_class: int = 8  # grid columns; one row per class (at most 10 rows)
    cluster_latents: int = 2000  # class-balanced cached latents behind the clustering score (kNN, silhouette)
    cfg_sweep: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)  # CFG scales scored by class accuracy and FD;
                                                              # () = no sweep
    sweep_n: int = 1000  # samples per CFG scale of the sweep (class-balanced, else the `sample` settings)
    min_class_accuracy: float = 0.0  # notebook 60 asserts the class accuracy of its samples reaches this
                                     # (0: no check; the claim study's short curve fits are not expected to)


@dataclass(frozen=True)
class CurveConfig:
    """A learning curve of the generator: sample and score its EMA net at these fit steps."""

    steps: tuple[int, ...] = ()  # fit steps to score at, e.g. (100, 200, 400, 800); () = no curve
    n: int = 2000  # samples per point (ODE, the `sample` settings)
    pixel_size: int = 8  # the pixel feature space: images average-pooled to this side (not from any encoder)


def validate_sample(s: SampleConfig) -> None:
    """Raise ConfigError, naming the `sample.*` key, for sampler settings that cannot run."""
    if s.sampler not in SAMPLERS:
        raise ConfigError(f"sample.sampler {s.sampler!r} unknown; use one of {', '.join(SAMPLERS)}")
    if s.sampler == "sde" and s.shift != 1.0:
        raise ConfigError("sample.shift only applies to the ODE sampler (the authors' SDE run passes a "
                          "shift that has no effect); leave it at 1.0 with sampler 'sde'")
    if s.sampler == "sde" and (s.steps < 2 or not 0.0 < s.last_step < 1.0):
        raise ConfigError(f"the SDE sampler needs steps >= 2 and 0 < last_step < 1, got {s.steps}, "
                          f"{s.last_step}")
    lo, hi = s.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"sample.cfg_interval must satisfy 0 <= lo <= hi <= 1, got {s.cfg_interval}")
    if s.precision not in ("fp32", "bf16"):
        raise ConfigError(f"sample.precision {s.precision!r} unknown; use fp32 or bf16")


@dataclass(frozen=True)
class GenerationStageConfig:
    seed: int = 0
    threads: int = 0
    joint_run: str = ""  # a notebook-40 run folder (resolved by the notebook)
    tokenizer_file: str = "tokenizer.pt"  # in joint_run: tokenizer.pt (DM) |
                                          # control_tokenizer.pt (λ = 0 baseline)
    flip: bool = False  # also cache horizontally flipped images (doubles the latent cache)
    encode_batch: int = 500
    net: DiTConfig = field(default_factory=DiTConfig)
    fit: GeneratorFitConfig = field(default_factory=GeneratorFitConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)

    def validate(self) -> None:
        s = self.sample
        validate_sample(s)
        validate_fit(self.fit)
        c = self.curve
        if list(c.steps) != sorted(set(c.steps)) or any(k < 1 or k > self.fit.steps for k in c.steps):
            raise ConfigError(f"curve.steps must increase within 1..fit.steps ({self.fit.steps}), "
                              f"got {c.steps}")
        if c.steps and (c.n < 2 or c.pixel_size < 1):
            raise ConfigError(f"curve.n must be >= 2 and curve.pixel_size >= 1, got {c.n}, {c.pixel_size}")
        if any(x < 1.0 for x in self.metrics.cfg_sweep) or self.metrics.sweep_n < 2 or \
                list(self.metrics.cfg_sweep) != sorted(set(self.metrics.cfg_sweep)):
            raise ConfigError(f"metrics.cfg_sweep must increase from >= 1 (or be empty: no sweep) and "
                              f"metrics.sweep_n be >= 2, got "
                              f"{list(self.metrics.cfg_sweep)}, {self.metrics.sweep_n}")
        if not 0.0 <= self.metrics.min_class_accuracy <= 1.0:
            raise ConfigError(f"metrics.min_class_accuracy must be in [0, 1], got "
                              f"{self.metrics.min_class_accuracy}")
        if s.n < 2:
            raise ConfigError(f"sample.n must be at least 2 (a Fréchet distance needs 2 samples), got {s.n}")


PRESETS: dict[str, dict] = {
    "smoke": {"fit.steps": 100, "fit.batch": 128, "fit.log_every": 25, "fit.ckpt_every": 50,
              "net.size": "tiny", "sample.n": 300, "sample.steps": 20, "metrics.real_images": 2048,
              "metrics.floor_images": 300, "metrics.png_limit": 40, "metrics.grid_per_class": 6,
              "metrics.cluster_latents": 300, "metrics.cfg_sweep": (1.0, 3.0), "metrics.sweep_n": 100},
    # cpu (docs/generation-recipe.md): 16 tokens (patch 2) instead of 4, batch 64 with twice the steps of
    # batch 128 in the same time, a higher LR on a cosine, the compiled net (−19 % per step),
    # 25 ODE steps (the accuracy of 50), CFG 3 (the best FD of the scales tried, most of CFG 5's accuracy);
    # the CFG sweep scores 500 samples per scale. Sampling and decoding in bf16: 1.6× faster than fp32 at
    # CFG 3 with the same class accuracy (0.514 vs 0.512 on 1,000 samples; benchmarks/sampling.py).
    "cpu": {"net.patch_size": 2, "fit.batch": 64, "fit.steps": 5000, "fit.lr": 2e-3,
            "fit.lr_schedule": "cosine", "fit.compile": True, "fit.ckpt_every": 1250, "sample.steps": 25,
            "sample.precision": "bf16",
            "sample.cfg_scale": 3.0, "metrics.cfg_sweep": (1.0, 2.0, 3.0, 4.0), "metrics.sweep_n": 500,
            "metrics.min_class_accuracy": 0.2},  # twice chance: a generator that draws its classes at all
    # The authors' final DiT and 50K evaluation (docs/authors-code.md §5.2, §5.4): XL/1, EMA 0.9999, no
    # warm-up; 64 epochs of ImageNet at batch 1024 ≈ 80k steps; SDE Euler–Maruyama, 250 steps, no CFG (paper
    # Tab. 3).
    "imagenet256": {"net.size": "XL", "net.patch_size": 1, "net.grad_checkpoint": True, "fit.steps": 80000,
                    "fit.batch": 1024, "fit.lr": 2e-4, "fit.warmup_steps": 0, "fit.ema_decay": 0.9999,
                    "fit.ckpt_every": 10000, "fit.log_every": 100, "flip": True, "encode_batch": 256,
                    "sample.n": 50000, "sample.sampler": "sde", "sample.steps": 250, "sample.batch": 250,
                    "sample.precision": "bf16", "metrics.real_images": 50000, "metrics.floor_images": 10000,
                    "metrics.feature_batch": 250},
}  # fmt: skip
