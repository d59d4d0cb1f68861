"""Fit a notebook's velocity net with DDP in several processes, from the notebook's run folder.

    torchrun --nproc-per-node 8 -m dmvae_lib.ddp_fit teacher   runs/30_teacher_fitting/<name>
    torchrun --nproc-per-node 8 -m dmvae_lib.ddp_fit generator runs/60_generation/<name>

Notebooks 30 and 60 do this themselves when their parameter `nproc` is above 1 (`distributed.launch`, one
node; the pipeline's `--nproc` sets it): the notebook creates the run folder, config and latent cache, the
processes fit the net (rank 0 writes metrics and checkpoints), and the notebook's own call of the same fit
then finds the finished checkpoint and loads it. The run folder's `config.json` is the only input, so the
processes fit exactly what the notebook configured. Multi-node: start the same command on every node with
torchrun's `--nnodes/--node-rank/--rdzv-endpoint` (the run folder on a shared filesystem).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import generation_stage as gs
from . import teacher_stage as tst
from . import tokenizer_stage as ts
from .configs import from_dict
from .configs.generation import GenerationStageConfig
from .configs.teacher import TeacherStageConfig
from .distributed import DistContext, barrier, cleanup, init_distributed
from .runs import RunDir, RunError

STAGES = {"teacher": TeacherStageConfig, "generator": GenerationStageConfig}


def load_run_config(stage: str, run_dir: Path):
    """The typed config that the notebook wrote into `run_dir/config.json` (strict: unknown keys raise)."""
    file = run_dir / "config.json"
    if not file.is_file():
        raise RunError(f"{file} is missing: create the run from its notebook first (it writes config.json)")
    record = json.loads(file.read_text())["config"]
    body = {k: v for k, v in record.items() if k not in ("stage", "preset")}
    return from_dict(STAGES[stage], body)


def training_set(stage: str, cfg, run: RunDir, ctx: DistContext):
    """The reference (teacher) or latent cache (generator) the notebook built; rank 0 first, so that a missing
    cache is written once and the other ranks read it."""

    def build():
        cache_dir = run.path.parents[1] / "_cache"
        if stage == "teacher":
            tok, tok_cfg, enc, tok_file = tst.upstream_tokenizer(Path(cfg.tokenizer_run), ctx.device)
            data = ts.load_data(tok_cfg, cache_dir)
            latents, labels = tst.latents_for(tok, tok_file, data, run, ctx.device, flip=cfg.reference.flip,
                                              batch=cfg.encode_batch)
            return tst.build_reference(cfg, latents, labels, enc, data, ctx.device)
        tok, tok_cfg, _, tok_file = gs.upstream_tokenizer(Path(cfg.joint_run), cfg.tokenizer_file, ctx.device)
        return gs.generator_data(cfg, tok, tok_file, ts.load_data(tok_cfg, cache_dir), run, ctx.device)

    if ctx.is_main:
        ref = build()
    barrier(ctx)
    return ref if ctx.is_main else build()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        run = RunDir(args.run_dir.resolve())
        cfg = load_run_config(args.stage, run.path)
        ref = training_set(args.stage, cfg, run, ctx)
        _, stats = tst.fit_teacher(cfg, ref, run, ctx.device, ctx=ctx, tag=args.stage)
        if ctx.is_main:
            print(f"{args.stage} fitted by {ctx.world_size} process(es): {stats}", flush=True)
    finally:
        cleanup(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
