"""Configuration of the embedded SSL encoder (stage 1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.ssl_encoder import ARCHS, OBJECTIVES


@dataclass(frozen=True)
class SSLConfig:
    seed: int = 0  # model init (seed itself) and the batch/augmentation stream "ssl.batches"
    width: int = 32  # stem channels w; the last block has 4w → an 8×8×4w feature map
    arch: str = "r3"  # a key of ARCHS; r3 is 2× cheaper per step than r4 and better per second
    objective: str = "ntxent"  # a key of OBJECTIVES (VICReg: 4.7 points lower at 300 steps)
    steps: int = 1800  # optimizer steps = the cosine schedule's length (2.2 min at 74 ms/step, 2 free cores)
    max_seconds: float = 0.0  # >0: the schedule and training also end after this much step time
    batch: int = 64  # instances per step, two views each; at equal compute 64 beat 32, 128 and 256
    lr: float = 2e-3  # AdamW peak LR
    weight_decay: float = 1e-4  # AdamW, on all parameters
    warmup_steps: int = 30  # linear warm-up, then cosine to 0
    grad_clip: float = 3.0  # max global grad norm (0: off)
    temperature: float = 0.2  # NT-Xent temperature (0.5 was 0.7–3 points lower at 600 steps)
    proj_hidden: int = 512  # projector 4w → hidden (BN, ReLU) → out; discarded after training
    proj_out: int = 128  # projection dim the loss sees
    paired_frac: float = 1.0  # share of pairs whose 2nd view is another render (needs V ≥ 2)
    paired_ramp_steps: int = 0  # >0: ramp paired_frac up from 0 (200: seed 1 stuck at 16 % kNN at step 600)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random-resized-crop area range
    rotate: bool = True  # full 0–360° rotation: the classes are rotation invariant
    flip: bool = True  # random horizontal flip
    color_p: float = 0.0  # probability of colour jitter per view (0.8 cost 2–5 points with paired views)
    color_strength: float = 0.4  # brightness/contrast/saturation factors in 1 ± strength
    hue: bool = True  # jitter includes a full hue rotation about the grey axis
    gray_p: float = 0.0  # probability of grayscale per view
    precision: str = "bf16"  # "fp32" | "bf16" autocast (1.6× faster on CPU; 1.75–1.9× with channels_last)
    channels_last: bool = True  # NHWC convolutions: another 12–14 % on CPU

    def validate(self) -> None:  # called by configs.make_config: unknown names raise ValueError
        for name, value, known in (("arch", self.arch, ARCHS), ("objective", self.objective, OBJECTIVES),
                                   ("precision", self.precision, ("fp32", "bf16"))):
            if value not in known:
                raise ValueError(f"SSLConfig.{name}={value!r} is unknown; known: {', '.join(known)}")
