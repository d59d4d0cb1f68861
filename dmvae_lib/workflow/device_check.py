"""The device check: a few real steps of every imagenet256 stage on whatever device is present.

    python -m dmvae_lib.workflow.device_check                 # full size on a GPU, `cpu` size on a CPU
    python -m dmvae_lib.workflow.device_check --size cpu --steps 1 --batch 2

Each stage runs through the stage's own function, as notebooks 20–60 do, on random stand-ins of the right
shapes (random uint8 images, a Gaussian latent bank with labels) and random weights where pretrained ones are
absent (DINOv2 through `encoder.timm_weights`, the LPIPS VGG16 when its file is local):

    tokenizer  `train_tokenizer`: frozen DINOv2-L/16 → projector → Flux decoder, L1 + LPIPS + adaptive GAN,
               PatchGAN step with BCR, EMA                                  (disc_start 0: every step)
    teacher    `fit_velocity_net`: LightningDiT-XL/1 on 16×16×32 latents (256 tokens), label dropout, EMA
    joint      `train_joint`, a tokenizer turn every step: encoder trainable, L_rec + GAN + λ·L_DM with CFG on
               both XL nets (cond and null batched), then the fake net's flow-matching step
    sample     `sample_latents`: Euler ODE, CFG 4 inside the interval [0, 0.75] (one 2B forward per step)
    decode     `decode_latents`: the Flux decoder on B latents

Per stage it prints step time, images/s, GFLOP per step (torch's FlopCounterMode), the achieved FLOP/s as a
fraction of a GEMM peak measured in the same process at the stage's precision (and, on a known GPU, of the
datasheet peak), and peak memory (CUDA: the allocator's peak; CPU: the rise of the resident set, sampled,
a rough figure). Step time is (T(1 + n) − T(1)) / n of whole stage calls, so building the models cancels.
`--size cpu` runs the same code with smaller nets and images (`SIZES`), in CI. `memory_plan` sizes the
full stages for 80 GB and 141 GB GPUs from parameter counts and activation bytes counted on the meta device.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import lpips
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..configs import make_config
from ..data.images import ImageData
from ..data.references import TensorReference
from ..models.lightning_dit import DIT_SIZES, LightningDiT
from ..models.recon_losses import PatchDiscriminator, default_vgg16_path
from ..runtime.device import effective_precision, resolve_device
from ..runtime.perf import (
    PeakMemory,
    count_flops,
    datasheet_peak,
    gemm_peak,
    saved_activation_bytes,
    timed,
)
from ..stages.joint import train_joint
from ..stages.tokenizer import train_tokenizer
from ..train.artifacts import build_net, build_tokenizer
from ..train.sampling import decode_latents, sample_latents
from ..train.velocity import fit_velocity_net

STAGES = ("tokenizer", "teacher", "joint", "sample", "decode")
NEVER = 10**9  # log/checkpoint interval that never fires


@dataclass(frozen=True)
class CheckSize:
    """The sizes a check runs at: overrides of the imagenet256 tokenizer preset, the DiT size and the batch
    per stage (full: the presets' global batches over 8 GPUs)."""

    name: str
    tokenizer: dict = field(default_factory=dict)
    dit: str = "XL"
    num_classes: int = 1000
    batch: dict = field(default_factory=dict)


SIZES = {
    "full": CheckSize("full", {}, "XL", 1000,
                      {"tokenizer": 32, "teacher": 32, "joint": 16, "sample": 64, "decode": 64}),
    # DINOv2-S/16 at 32 px (2×2 tokens), a narrow Flux decoder with the same layout, LightningDiT-Mini/1;
    # about 15 s for all stages at --steps 1 on two cores (CI).
    "cpu": CheckSize("cpu", {"data.resolution": 32, "encoder.timm_name": "vit_small_patch14_dinov2.lvd142m",
                             "net.proj_hidden": 768, "net.dec_ch": 32, "net.dec_mult": (1, 2, 2, 2),
                             "net.dec_res_blocks": 1, "net.dec_groups": 8, "train.disc_ndf": 16},
                     "Mini", 10, {"tokenizer": 2, "teacher": 8, "joint": 2, "sample": 8, "decode": 2}),
}


@dataclass
class StageResult:
    stage: str
    batch: int
    precision: str
    step_s: float
    images_per_s: float
    flops: int  # per step
    achieved: float  # FLOP/s
    mfu_measured: float  # of the same run's GEMM peak at `precision`
    mfu_datasheet: Optional[float]
    peak_bytes: int
    note: str = ""


def _perturb(net: nn.Module, seed: int = 0) -> nn.Module:
    """Small random weights everywhere (adaLN-Zero starts at v = 0, which would make the DM direction 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return net


def _weights(size: CheckSize, timm_weights: str) -> tuple[dict, str]:
    """Tokenizer overrides for the weights present: DINOv2 from `timm_weights` (else random), LPIPS real when
    the VGG16 file is local (else a random backbone: the same compute)."""
    lp = "real" if default_vgg16_path().is_file() else "random"
    over = {"train.lpips": lp, "encoder.timm_pretrained": bool(timm_weights)}
    if timm_weights:
        over["encoder.timm_weights"] = timm_weights
    note = f"DINOv2 {'pretrained' if timm_weights else 'random'}, LPIPS VGG16 {lp}"
    return over, note


class Check:
    """Builds each stage's inputs once and runs `steps` steps of a stage on demand (`runner`)."""

    def __init__(self, size: CheckSize, device: torch.device, precision: str = "bf16", timm_weights: str = "",
                 batch: Optional[int] = None, sample_steps: int = 250):
        self.size, self.device, self.precision, self.sample_steps = size, device, precision, sample_steps
        self.batch = {k: batch or v for k, v in size.batch.items()}
        over, self.weights_note = _weights(size, timm_weights)
        self.tcfg = make_config("tokenizer", "imagenet256", {
            **size.tokenizer, **over, "train.disc_start": 0, "train.log_every": NEVER, "train.ckpt_every": 0,
            "train.precision": precision, "train.batch": self.batch["tokenizer"]})
        self.tok = build_tokenizer(self.tcfg, None).eval()  # initialised under the config's seed
        res = self.tcfg.data.resolution
        self.shape = self.tok.latent_shape
        n = max(self.batch.values()) * 2
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (1, n, res, res, 3), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, size.num_classes, (n,), generator=gen)
        self.data = ImageData(images, labels, images[0, :8], labels[:8])
        self.ref = TensorReference(torch.randn(n, *self.shape, generator=gen), labels, "random latents",
                                   num_classes=size.num_classes)
        common = {"net.size": size.dit, "net.patch_size": 1}
        self.teacher_cfg = make_config("teacher", "imagenet256", {
            **common, "fit.log_every": NEVER, "fit.ckpt_every": 0, "fit.precision": precision,
            "fit.batch": self.batch["teacher"]})
        self.teacher = _perturb(build_net(self.teacher_cfg, self.shape, size.num_classes))
        self.joint_cfg = make_config("joint", "imagenet256", {
            "train.tokenizer_every": 1, "train.disc_start": 0, "train.eval_every": 0, "train.ckpt_every": 0,
            "train.log_every": NEVER, "train.control": False, "train.lpips": over["train.lpips"],
            "train.precision": precision, "train.batch": self.batch["joint"]})
        self.gen_cfg = make_config("generation", "imagenet256", {**common, "sample.precision": precision})

    def runner(self, stage: str) -> Callable[[int], object]:
        dev, t = self.device, self.tcfg.train
        if stage == "tokenizer":
            def run(k: int):
                cfg = dataclasses.replace(self.tcfg, train=dataclasses.replace(t, steps=k))
                return train_tokenizer(cfg, copy.deepcopy(self.tok), self.data, None, dev, progress=False)
        elif stage == "teacher":
            def run(k: int):
                fit = dataclasses.replace(self.teacher_cfg.fit, steps=k)
                cfg = dataclasses.replace(self.teacher_cfg, fit=fit)
                return fit_velocity_net(cfg, self.ref, None, dev, progress=False)
        elif stage == "joint":
            def run(k: int):
                cfg = dataclasses.replace(self.joint_cfg, train=dataclasses.replace(self.joint_cfg.train,
                                                                                    steps=k))
                return train_joint(cfg, self.tok, self.teacher, self.ref, self.data, None, dev,
                                   dm_weight=10.0, disc_arch=(t.disc_ndf, t.disc_layers), progress=False)
        elif stage == "sample":
            net = self.teacher.to(dev).eval()
            b = self.batch["sample"]

            def run(k: int):
                s = dataclasses.replace(self.gen_cfg.sample, n=b, batch=b, sampler="ode", steps=k,
                                        cfg_scale=4.0, cfg_interval=(0.0, 0.75))
                return sample_latents(net, self.shape, self.size.num_classes, s, 0, dev, progress=False)
        elif stage == "decode":
            tok = self.tok.to(dev).eval()
            b = self.batch["decode"]

            def run(k: int):
                latents = torch.randn(k * b, *self.shape, generator=torch.Generator().manual_seed(0))
                return decode_latents(tok, latents, dev, batch=b, precision=self.precision, progress=False)
        else:
            raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        return run

    def gemm_shape(self) -> tuple[int, int, int]:
        """A matmul like the DiT's MLP: (B·N tokens) × D → 4D, B the teacher batch."""
        hidden = DIT_SIZES[self.size.dit][1]
        tokens = self.batch["teacher"] * self.shape[1] * self.shape[2]
        return max(tokens, 256), hidden, 4 * hidden

    def images_per_step(self, stage: str) -> float:
        """Images one timed step stands for (sampling: a whole `sample_steps`-step run per image)."""
        b = self.batch[stage]
        return b / self.sample_steps if stage == "sample" else b


def measure(check: Check, stage: str, steps: int, peaks: dict[str, float]) -> StageResult:
    """One stage: FLOPs of a 1-step call, then T(1) and T(1 + steps); step = their difference / steps."""
    run, dev = check.runner(stage), check.device
    flops = count_flops(lambda: run(1))  # also the warm-up
    t1 = timed(lambda: run(1), dev)
    with PeakMemory(dev) as mem:
        tn = timed(lambda: run(1 + steps), dev)
    step = max(tn - t1, 1e-9) / steps
    prec = effective_precision(dev, check.precision)
    achieved = flops / step
    sheet = datasheet_peak(dev, prec)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return StageResult(stage, check.batch[stage], prec, step, check.images_per_step(stage) / step, flops,
                       achieved, achieved / peaks[prec], None if sheet is None else achieved / sheet,
                       mem.peak)


def format_table(results: list[StageResult], peaks: dict[str, float], device: torch.device) -> str:
    head = (f"{'stage':10s} {'batch':>5s} {'prec':4s} {'step s':>8s} {'img/s':>9s} {'GFLOP/step':>11s} "
            f"{'GFLOP/s':>8s} {'MFU(meas)':>9s} {'MFU(sheet)':>10s} {'peak MiB':>9s}")
    rows = [f"device {device}: measured GEMM peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
            f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s", head]
    for r in results:
        sheet = "-" if r.mfu_datasheet is None else f"{r.mfu_datasheet:.1%}"
        rows.append(f"{r.stage:10s} {r.batch:5d} {r.precision:4s} {r.step_s:8.3f} {r.images_per_s:9.2f} "
                    f"{r.flops / 1e9:11.2f} {r.achieved / 1e9:8.1f} {r.mfu_measured:9.1%} {sheet:>10s} "
                    f"{r.peak_bytes / 2**20:9.0f}")
    return "\n".join(rows)


def run_check(size: str = "auto", device: str = "auto", *, steps: int = 2, batch: Optional[int] = None,
              stages: tuple[str, ...] = STAGES, precision: str = "bf16", timm_weights: str = "",
              sample_steps: int = 250, echo: Callable[[str], None] = print) -> list[StageResult]:
    """Run the check and print its table; returns the rows."""
    dev = resolve_device(device)
    size = ("full" if dev.type == "cuda" else "cpu") if size == "auto" else size
    check = Check(SIZES[size], dev, precision, timm_weights, batch, sample_steps)
    m, k, n = check.gemm_shape()
    peaks = {p: gemm_peak(dev, torch.bfloat16 if p == "bf16" else torch.float32, m, k, n) for p in
             ("fp32", "bf16")}
    echo(f"device check, size {size!r} ({check.weights_note}), torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}, GEMM {m}×{k}×{n}")
    results = []
    for stage in stages:
        results.append(measure(check, stage, steps, peaks))
        echo(f"  {stage} done")
    echo(format_table(results, peaks, dev))
    echo(f"sample: one step = one Euler step (a 2B CFG forward); img/s for {sample_steps}-step sampling. "
         "joint: a tokenizer turn + the fake-net step. CPU peak MiB: resident-set rise, rough.")
    return results


# ---------------------------------------------------------------------------------------------------------
# Memory plan: parameter counts and saved-activation bytes of the full-size nets, counted on the meta device
# ---------------------------------------------------------------------------------------------------------

GIB = 2**30


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _act(module: nn.Module, forward: Callable[[int], Callable[[], object]]) -> int:
    """Saved-activation bytes per sample of `forward(batch)()` under bf16 autocast, on fake tensors (no
    activation memory, no compute; the weights are real, built outside): the slope between batch 1 and 2, so
    what does not grow with the batch (autocast's bf16 weight copies, counted as static) drops out."""
    counts = []
    for batch in (1, 2):
        with FakeTensorMode(allow_non_fake_inputs=True), torch.autocast("cpu", torch.bfloat16):
            counts.append(saved_activation_bytes(forward(batch), exclude=module.parameters()))
    return counts[1] - counts[0]


def activation_table(size: CheckSize = SIZES["full"]) -> dict:
    """Per-sample saved-activation bytes of each trainable forward at `size` under bf16 autocast (CPU
    autocast's casting policy, close to CUDA's: matmuls and convolutions in bf16, the RMSNorms in fp32) and
    the parameter counts. Builds the nets with real weights on the CPU (about 4 GB at full size)."""
    tcfg = make_config("tokenizer", "imagenet256", {**size.tokenizer, "encoder.timm_pretrained": False})
    n, res, t = tcfg.net, tcfg.data.resolution, tcfg.train
    tok = build_tokenizer(tcfg, None)
    enc_ch, latent = tok.encoder.out_channels, tok.decoder.latent_size
    depth, hidden, heads = DIT_SIZES[size.dit]
    tok.encoder.set_trainable(True)
    perceptual = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).requires_grad_(False)
    nets = {"dit": LightningDiT(latent, n.z_channels, hidden, depth, heads, size.num_classes),
            "encoder": tok.encoder, "decoder": nn.ModuleList([tok.projector, tok.decoder]),
            "lpips": perceptual, "disc": PatchDiscriminator(3, t.disc_ndf, t.disc_layers)}

    def dit(b: int):
        x, tt = torch.randn(b, n.z_channels, latent, latent), torch.rand(b)
        y = torch.zeros(b, dtype=torch.long)
        return lambda: nets["dit"](x, tt, y)

    def encoder(b: int):
        x = torch.randn(b, 3, res, res)
        return lambda: tok.encoder(x)

    def decoder(b: int):
        f = torch.randn(b, enc_ch, latent, latent)
        return lambda: tok.decoder(tok.projector(f))

    def lpips_net(b: int):  # LPIPS on a reconstruction that needs gradients (VGG16 frozen)
        x = torch.randn(b, 3, res, res, requires_grad=True)
        return lambda: perceptual(x, x.detach())

    def disc(b: int):  # the PatchGAN, trainable (its own step)
        x = torch.randn(b, 3, res, res)
        return lambda: nets["disc"](x)

    forwards = {"dit": dit, "encoder": encoder, "decoder": decoder, "lpips": lpips_net, "disc": disc}
    acts = {name: _act(nets[name], fwd) for name, fwd in forwards.items()}
    params = {name: _params(net) for name, net in nets.items()}
    params["decoder"], params["projector"] = _params(tok.decoder), _params(tok.projector)
    return {"act": acts, "params": params, "dit_depth": depth}


# bytes per parameter: fp32 weights + grads + AdamW's two moments, the bf16 copy autocast caches for a
# trainable weight, an fp32 EMA copy; a frozen net is fp32 weights only
TRAIN_BYTES, AUTOCAST_COPY, EMA_BYTES, FROZEN_BYTES = 16, 2, 4, 4


def stage_memory(table: dict, stage: str, batch: int, checkpoint: bool = False) -> tuple[float, float]:
    """(static bytes, activation bytes) of `stage` at per-GPU `batch` (see the README's memory plan)."""
    p, a = table["params"], table["act"]
    trainable = lambda n, ema: n * (TRAIN_BYTES + AUTOCAST_COPY + (EMA_BYTES if ema else 0))  # noqa: E731
    dit_act = a["dit"] / table["dit_depth"] * 2 if checkpoint else a["dit"]  # block inputs + one block, ~
    if stage == "tokenizer":
        static = (FROZEN_BYTES * (p["encoder"] + p["lpips"]) + trainable(p["decoder"] + p["projector"], True)
                  + trainable(p["disc"], False))
        act = a["decoder"] + a["lpips"] + a["disc"]  # G graph; the D step (2B through D, twice) comes after
        act = max(act, 4 * a["disc"])
    elif stage in ("teacher", "generator"):
        static, act = trainable(p["dit"], True), dit_act
    elif stage == "joint":
        static = (FROZEN_BYTES * (p["dit"] + p["lpips"]) + trainable(p["dit"], False)
                  + trainable(p["encoder"] + p["projector"] + p["decoder"] + p["disc"], False))
        act = max(a["encoder"] + a["decoder"] + a["lpips"] + a["disc"], dit_act)  # turn, then fake step
    elif stage == "sample":
        static, act = FROZEN_BYTES * p["dit"], 2 * 2 * a["dit"] / table["dit_depth"]  # 2B, ~2 blocks live
    else:
        raise ValueError(stage)
    return static, act * batch


PLAN_STAGES = {"tokenizer": 256, "teacher": 256, "joint": 128, "generator": 1024, "sample": 250}


def memory_plan(table: Optional[dict] = None, gpus: tuple[int, ...] = (80, 141), overhead: float = 0.1,
                context_gib: float = 1.5) -> str:
    """A markdown table: per stage, static GiB, activation GiB per sample, the largest per-GPU batch on each
    GPU size (usable = (size − CUDA context) / (1 + overhead) for fragmentation and workspaces), with and
    without activation checkpointing of the DiT blocks."""
    table = table or activation_table()
    rows = ["| stage | preset global batch | static GiB | activations GiB/sample | "
            + " | ".join(f"max batch/GPU {g} GB" for g in gpus) + " | notes |",
            "|---|---|---|---|" + "---|" * len(gpus) + "---|"]
    for stage, global_batch in PLAN_STAGES.items():
        static, act1 = stage_memory(table, stage, 1)
        cells = []
        for g in gpus:
            usable = (g * 1e9 - context_gib * GIB) / (1 + overhead)
            fit = math.floor((usable - static) / act1) if usable > static else 0
            cell = str(fit)
            if stage in ("teacher", "joint", "generator"):
                s_ck, a_ck = stage_memory(table, stage, 1, checkpoint=True)
                cell += f" ({math.floor((usable - s_ck) / a_ck)} ckpt)"
            cells.append(cell)
        rows.append(f"| {stage} | {global_batch} | {static / GIB:.1f} | {act1 / GIB:.3f} | "
                    + " | ".join(cells) + " | |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["auto", *SIZES], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=2, help="timed steps per stage (after one warm-up step)")
    p.add_argument("--batch", type=int, default=None, help="one per-device batch for every stage")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--timm-weights", default="", help="DINOv2 weights file (default: random weights)")
    p.add_argument("--memory-plan", action="store_true", help="print the full-size memory plan and exit")
    a = p.parse_args(argv)
    if a.memory_plan:
        print(memory_plan())
        return 0
    results = run_check(a.size, a.device, steps=a.steps, batch=a.batch, stages=tuple(a.stages),
                        precision=a.precision, timm_weights=a.timm_weights)
    bad = [r.stage for r in results if not all(map(math.isfinite, (r.step_s, r.images_per_s, r.achieved)))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
