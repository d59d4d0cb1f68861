"""Configuration of notebook 40: joint distribution-matching training of the tokenizer (paper §3.2,
App. A.3; docs/authors-code.md §5.3, with its bugs fixed (§8))."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class JointTrainConfig:
    steps: int = 1000  # global steps = fake-net updates (200 tokenizer updates at tokenizer_every 5)
    batch: int = 128
    tokenizer_every: int = 5  # the tokenizer (and the discriminator) step on every k-th global step
    dm_weight: float = 10.0  # λ in L_rec + L_GAN + λ·L_DM (authors: 10; 0 is the control)
    cfg_scale: float = 5.0  # CFG on both the real and the fake scores (authors: 5); 1 = none
    t_min: float = 0.02  # DM timesteps ~ U[t_min, t_max], clamped off the singular ends
    t_max: float = 0.98
    anneal_steps: int = 0  # >0: move t_min to anneal_t_min over this
                           # many global steps (low-noise end is t → 1)
    anneal_t_min: float = 0.5
    lr: float = 2e-4  # tokenizer (projector [+ encoder]) and projection head, AdamW (0.9, 0.95)
    fake_lr: float = 2e-4
    disc_lr: float = 2e-4
    weight_decay: float = 0.005
    warmup_steps: int = 50  # each optimizer's own steps
    grad_clip: float = 1.0
    train_encoder: bool = False  # also update the encoder (authors: DINOv2 trains); BatchNorm stats frozen
    label_dropout: float = 0.1  # fake-net fitting (as the teacher was fitted)
    l1: float = 1.0
    lpips: str = "auto"  # as in stage 1
    lpips_weight: float = 1.0
    disc_weight: float = 0.5  # adaptive hinge GAN from disc_start
    disc_start: int = 500
    disc_init: str = "stage1"  # "stage1": the stage-1 PatchGAN (no
                               # fresh-discriminator shock) | "fresh" (authors)
    bcr: float = 1.0
    precision: str = "bf16"
    log_every: int = 50
    ckpt_every: int = 500
    eval_every: int = 250  # diagnostics: latent-to-reference distances and val PSNR
    eval_samples: int = 2000
    refine_steps: int = 0  # decoder refinement afterwards (frozen encoder/projector, reconstruction only)
    # stage 1's alignment term (VA-VAE's VF loss, models/alignment.py) of z with the frozen stage-1
    # encoder's features, kept on while the encoder trains: the claim study's VA arm. Both 0: off
    align_token: float = 0.0
    align_global: float = 0.0
    align_margin_cos: float = 0.0
    align_margin_dist: float = 0.0
    align_init: str = "stage1"  # the maps W, G: "stage1" (stage 1's, EMA-averaged as its tokenizer; the term
                                # continues) | "fresh" (seeded anew). Unused while the term is off
    control: bool = True  # also run the λ = 0 control with everything else equal


@dataclass(frozen=True)
class JointStageConfig:
    seed: int = 0
    threads: int = 0
    tokenizer_run: str = ""  # notebook-20 run (tokenizer.pt); resolved by the notebook
    teacher_run: str = ""  # notebook-30 run (teacher.pt, latent cache); resolved by the notebook
    train: JointTrainConfig = field(default_factory=JointTrainConfig)

    def validate(self) -> None:
        t = self.train
        if not 0.0 <= t.t_min < t.t_max <= 1.0:
            raise ConfigError(f"train.t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {t.t_min}, "
                              f"{t.t_max}")
        if t.tokenizer_every < 1:
            raise ConfigError(f"train.tokenizer_every must be >= 1, got {t.tokenizer_every}")
        if t.cfg_scale < 1.0:
            raise ConfigError(f"train.cfg_scale must be >= 1, got {t.cfg_scale}")
        if t.disc_init not in ("stage1", "fresh"):
            raise ConfigError(f"train.disc_init {t.disc_init!r} unknown; use stage1 or fresh")
        if t.align_init not in ("stage1", "fresh"):
            raise ConfigError(f"train.align_init {t.align_init!r} unknown; use stage1 or fresh")
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision {t.precision!r} unknown; use fp32 or bf16")
        if min(t.align_token, t.align_global, t.align_margin_cos, t.align_margin_dist) < 0:
            raise ConfigError("train.align_token, align_global and their margins must be >= 0")


PRESETS: dict[str, dict] = {
    "smoke": {"train.steps": 100, "train.batch": 64, "train.disc_start": 50, "train.log_every": 10,
              "train.ckpt_every": 50, "train.eval_every": 50, "train.eval_samples": 500},
    # cpu: DM without CFG, so that guidance ×5 does not amplify the noise of a small teacher's
    # class-conditional scores (a choice made on weakly clustered latents, not a measured optimum).
    # The encoder trains, as in the authors' DM stage (paper §3.1): this run is then also the claim study's
    # C1 with its C0 control (notebook 70).
    "cpu": {"train.cfg_scale": 1.0, "train.train_encoder": True},
    "imagenet256": {"train.steps": 500000, "train.disc_init": "fresh", "train.batch": 128, "train.lr": 2e-5,
                    "train.fake_lr": 2e-5, "train.disc_lr": 2e-5, "train.warmup_steps": 1000,
                    "train.train_encoder": True, "train.disc_start": 5000, "train.log_every": 100,
                    "train.ckpt_every": 50000, "train.eval_every": 10000, "train.eval_samples": 10000,
                    "train.control": False},
}  # fmt: skip
