"""Tiny upstream runs for stage tests: a notebook-20 run (encoders + tokenizer.pt) and a notebook-30 run
(latent cache + teacher.pt), written the way the notebooks write them, in a few seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from dmvae_lib.configs import make_config, to_dict
from dmvae_lib.data.images import load_data
from dmvae_lib.data.latents import build_reference, latents_for
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages.tokenizer import evaluate_tokenizer, reference_encoders, train_tokenizer
from dmvae_lib.train import artifacts
from dmvae_lib.train.artifacts import build_tokenizer, save_teacher, upstream_tokenizer
from dmvae_lib.train.velocity import fit_velocity_net

TINY_TOK = {"data.n_train": 64, "data.n_val": 32, "encoder.ssl.steps": 2, "encoder.ssl.batch": 16,
            "encoder.ssl.width": 8, "encoder.supervised_steps": 2, "encoder.supervised_batch": 16,
            "encoder.knn_k": 5, "net.proj_hidden": 16, "net.dec_ch": 8, "net.dec_groups": 4, "train.steps": 3,
            "train.batch": 8, "train.disc_start": 2, "train.disc_ndf": 8, "train.log_every": 1,
            "train.ckpt_every": 0, "train.precision": "fp32"}
TINY_TEACHER = {"net.size": "tiny", "fit.steps": 4, "fit.batch": 16, "fit.log_every": 2, "fit.ckpt_every": 2,
                "fit.eval_samples": 32, "fit.sample_steps": 3, "fit.precision": "fp32", "encode_batch": 32}
TINY_JOINT = {"train.steps": 6, "train.batch": 8, "train.tokenizer_every": 2, "train.disc_start": 2,
              "train.log_every": 2, "train.ckpt_every": 3, "train.eval_every": 3, "train.eval_samples": 32,
              "train.precision": "fp32", "train.cfg_scale": 2.0}


class TokenizerSetup(NamedTuple):
    """Notebook 20 up to its tokenizer cell."""

    cfg: Any
    run: RunDir
    data: Any
    encoders: dict


class TokenizerStage(NamedTuple):
    """Notebook 20 run to the end: the trained tokenizer saved in `run` with its latent statistics."""

    cfg: Any
    run: RunDir
    data: Any
    encoders: dict
    tokenizer: nn.Module


class TeacherStage(NamedTuple):
    """Notebook 30 run on the tiny tokenizer: latent cache, reference and teacher.pt."""

    cfg: Any
    run: RunDir
    tokenizer: nn.Module
    encoders: dict
    reference: Any
    net: nn.Module
    stats: dict
    latents: Any


def run_dir(root: Path, notebook: str, stage: str, cfg, name: str = "r") -> RunDir:
    """The run folder `session.start` would create for `cfg` (config.json with stage and preset)."""
    return RunDir.create(root, notebook, name, {"stage": stage, "preset": "smoke", **to_dict(cfg)})


def tokenizer_stage(root: Path, train: bool = True) -> TokenizerSetup | TokenizerStage:
    """Notebook 20 up to its tokenizer cell, then (with `train`) the tokenizer trained and saved."""
    cfg = make_config("tokenizer", "smoke", TINY_TOK)
    run = run_dir(root, "20_tokenizer_pretraining", "tokenizer", cfg)
    data = load_data(cfg, root / "_cache")
    enc = reference_encoders(cfg, data, run, "cpu")
    if not train:
        return TokenizerSetup(cfg, run, data, enc)
    tok, _ = train_tokenizer(cfg, build_tokenizer(cfg, enc["ssl"]), data, run, "cpu", progress=False)
    save_tokenizer(cfg, run, data, tok, enc)
    return TokenizerStage(cfg, run, data, enc, tok)


def save_tokenizer(cfg, run: RunDir, data, tok, enc) -> None:
    evaluate_tokenizer(tok, data, "cpu", None, batch=32)  # measures the latent stats
    artifacts.save_tokenizer(run.path / "tokenizer.pt", cfg, tok, enc)
    run.write_summary({"ok": True})


def teacher_stage(root: Path, tok_dir: Path, data, **overrides) -> TeacherStage:
    """Notebook 30 on the tiny tokenizer in `tok_dir`."""
    cfg = make_config("teacher", "smoke", {"tokenizer_run": str(tok_dir), **TINY_TEACHER, **overrides})
    run = run_dir(root, "30_teacher_fitting", "teacher", cfg)
    tok, _, enc, tok_file = upstream_tokenizer(tok_dir, "cpu")
    latents, labels = latents_for(tok, tok_file, data, run, "cpu", batch=32)
    ref = build_reference(cfg, latents, labels, enc, data, "cpu")
    net, stats = fit_velocity_net(cfg, ref, run, "cpu", progress=False)
    save_teacher(run.path / "teacher.pt", cfg, net, ref, tok_file)
    run.write_summary({"ok": True})
    return TeacherStage(cfg, run, tok, enc, ref, net, stats, latents)
