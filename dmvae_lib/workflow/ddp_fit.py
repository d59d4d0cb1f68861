"""Run a notebook's heavy training with DDP in several processes, from the notebook's run folder.

    torchrun --nproc-per-node 8 -m dmvae_lib.workflow.ddp_fit tokenizer runs/20_tokenizer_pretraining/<name>
    torchrun --nproc-per-node 8 -m dmvae_lib.workflow.ddp_fit teacher   runs/30_teacher_fitting/<name>
    torchrun --nproc-per-node 8 -m dmvae_lib.workflow.ddp_fit joint     runs/40_joint_dm_training/<name>
    torchrun --nproc-per-node 8 -m dmvae_lib.workflow.ddp_fit generator runs/60_generation/<name>

Notebooks 20, 30, 40 and 60 do this themselves when their parameter `nproc` is above 1 (`distributed.launch`,
one node; the pipeline's `--nproc` sets it): the notebook creates the run folder and config (and what comes
before the training: the reference encoders, the latent cache), the processes train (rank 0 writes metrics
and checkpoints), and the notebook's own call of the same training function then finds the finished
checkpoint and loads it. `joint` trains the DM run and, when configured, the λ = 0 control. The run folder's
`config.json` is the only input, so the processes fit exactly what the notebook configured. Multi-node: start
the same command on every node with torchrun's `--nnodes/--node-rank/--rdzv-endpoint` (the run folder on a
shared filesystem).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..configs import from_dict
from ..configs.generation import GenerationStageConfig
from ..configs.joint import JointStageConfig
from ..configs.teacher import TeacherStageConfig
from ..configs.tokenizer import TokenizerStageConfig
from ..data.images import load_data
from ..data.latents import build_reference, latents_for
from ..runtime.distributed import DistContext, barrier, process_group
from ..runtime.runs import RunDir, RunError
from ..stages import generation as generation_stage
from ..stages import joint as joint_stage
from ..stages import tokenizer as tokenizer_stage
from ..train.artifacts import build_tokenizer, tokenizer_backbone, upstream_tokenizer
from ..train.velocity import fit_velocity_net

STAGES = {"tokenizer": TokenizerStageConfig, "teacher": TeacherStageConfig, "joint": JointStageConfig,
          "generator": GenerationStageConfig}


def load_run_config(stage: str, run_dir: Path):
    """The typed config that the notebook wrote into `run_dir/config.json` (strict: unknown keys raise)."""
    file = run_dir / "config.json"
    if not file.is_file():
        raise RunError(f"{file} is missing: create the run from its notebook first (it writes config.json)")
    record = json.loads(file.read_text())["config"]
    body = {k: v for k, v in record.items() if k not in ("stage", "preset")}
    return from_dict(STAGES[stage], body)


def _rank0_first(ctx: DistContext, build):
    """`build()` on rank 0, then on the others: whatever it writes (a latent cache) is written once, and the
    other ranks read it."""
    if ctx.is_main:
        out = build()
    barrier(ctx)
    return out if ctx.is_main else build()


def _fit_tokenizer(cfg, run: RunDir, ctx: DistContext) -> dict:
    data = load_data(cfg, run.path.parents[1] / "_cache")
    encoders = _rank0_first(
        ctx, lambda: tokenizer_stage.reference_encoders(cfg, data, run, ctx.device, scores=False))
    encoder = tokenizer_backbone(cfg, encoders)
    return tokenizer_stage.train_tokenizer(cfg, build_tokenizer(cfg, encoder), data, run, ctx.device,
                                           ctx=ctx)[1]


def _fit_joint(cfg, run: RunDir, ctx: DistContext) -> dict:
    u = _rank0_first(ctx, lambda: joint_stage.load_upstream(Path(cfg.tokenizer_run), Path(cfg.teacher_run),
                                                            ctx.device, run.path.parents[1] / "_cache"))
    runs = [("joint", cfg.train.dm_weight)] + ([("control", 0.0)] if cfg.train.control else [])
    stats = {}
    for tag, weight in runs:
        stats[tag] = joint_stage.train_joint(cfg, u.tokenizer, u.teacher, u.reference, u.data, run,
                                             ctx.device, dm_weight=weight, tag=tag, ctx=ctx,
                                             **u.joint_kwargs(cfg))[2]
    return stats


def _fit_velocity_net(stage: str, cfg, run: RunDir, ctx: DistContext) -> dict:
    """The teacher on its reference, or the generator on its latent cache, as the notebook built them."""

    def build():
        cache_dir = run.path.parents[1] / "_cache"
        if stage == "teacher":
            tok, tok_cfg, enc, tok_file = upstream_tokenizer(Path(cfg.tokenizer_run), ctx.device)
            data = load_data(tok_cfg, cache_dir)
            latents, labels = latents_for(tok, tok_file, data, run, ctx.device, flip=cfg.reference.flip,
                                              batch=cfg.encode_batch)
            return build_reference(cfg, latents, labels, enc, data, ctx.device)
        tok, tok_cfg, _, tok_file = upstream_tokenizer(Path(cfg.joint_run), ctx.device, cfg.tokenizer_file)
        return generation_stage.generator_data(cfg, tok, tok_file, load_data(tok_cfg, cache_dir), run,
                                               ctx.device)

    return fit_velocity_net(cfg, _rank0_first(ctx, build), run, ctx.device, ctx=ctx, tag=stage)[1]


def fit(stage: str, run_dir: Path, ctx: DistContext) -> dict:
    """Train `stage` of the run in `run_dir` on this process's rank; returns the last (rank-mean) numbers."""
    run = RunDir(Path(run_dir).resolve())
    cfg = load_run_config(stage, run.path)
    if stage == "tokenizer":
        return _fit_tokenizer(cfg, run, ctx)
    if stage == "joint":
        return _fit_joint(cfg, run, ctx)
    return _fit_velocity_net(stage, cfg, run, ctx)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    with process_group(args.device) as ctx:
        stats = fit(args.stage, args.run_dir, ctx)
        if ctx.is_main:
            print(f"{args.stage} fitted by {ctx.world_size} process(es): {stats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
