"""Stage-1 wiring on a tiny configuration: data → SSL +
supervised encoders → tokenizer → metrics → checkpoint."""

import dataclasses
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from dmvae_lib.configs import ConfigError, make_config, to_dict
from dmvae_lib.data.images import load_data
from dmvae_lib.data.pixels import to_float
from dmvae_lib.runtime.runs import RunDir, RunError, load_checkpoint, save_checkpoint
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import build_tokenizer, load_tokenizer, save_tokenizer

TINY = {"data.n_train": 64, "data.n_val": 32, "encoder.ssl.steps": 2, "encoder.ssl.batch": 16,
        "encoder.ssl.width": 8, "encoder.supervised_steps": 2, "encoder.knn_k": 5, "net.proj_hidden": 16,
        "net.dec_ch": 8, "net.dec_groups": 4, "train.steps": 4, "train.batch": 8, "train.disc_start": 2,
        "train.disc_ndf": 8, "train.log_every": 2, "train.ckpt_every": 2, "train.precision": "fp32",
        "train.align_token": 1.0, "train.align_global": 1.0}  # the semantic alignment on (off by default)


class Stage(NamedTuple):
    """The tiny stage-1 run every test here reads."""

    cfg: Any
    run: RunDir
    data: Any
    encoders: dict
    tokenizer: nn.Module
    stats: dict


def _train(cfg, data, encoders, run):
    return tokenizer_stage.train_tokenizer(cfg, build_tokenizer(cfg, encoders["ssl"]), data, run, "cpu",
                                           progress=False)


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Stage:
    root = tmp_path_factory.mktemp("stage")
    cfg = make_config("tokenizer", "smoke", TINY)
    run = RunDir.create(root, "20", "r", to_dict(cfg))
    data = load_data(cfg, root / "cache")
    enc = tokenizer_stage.reference_encoders(cfg, data, run, "cpu")
    tok, stats = _train(cfg, data, enc, run)
    return Stage(cfg, run, data, enc, tok, stats)


def test_data_shapes_and_cache(stage, tmp_path):
    data = stage.data
    assert data.train.shape == (2, 64, 32, 32, 3) and data.train.dtype == torch.uint8
    assert data.val.shape == (32, 32, 32, 3) and data.val_labels.shape == (32,)
    assert not torch.equal(data.train[0], data.train[1]), "paired views must differ in nuisances"


def test_encoders_report_scores_and_tokenizer_trains(stage):
    enc, tok, stats = stage.encoders, stage.tokenizer, stage.stats
    assert 0.0 <= enc["ssl_scores"]["knn_acc"] <= 1.0 and "val_acc" in enc["supervised_scores"]
    assert stats["nonfinite"] == 0 and "g_loss" in stats and "d_loss" in stats  # the GAN term was active
    x = to_float(stage.data.val[:4])
    x_hat, z = tok(x)
    assert x_hat.shape == x.shape and z.shape == (4, stage.cfg.net.z_channels, 8, 8)


def test_metrics_are_labelled_and_checkpoint_round_trips(stage, tmp_path):
    cfg, data, enc, tok = stage.cfg, stage.data, stage.encoders, stage.tokenizer
    m = tokenizer_stage.evaluate_tokenizer(tok, data, "cpu", enc["ssl"], batch=16)
    assert "not Inception" in m["fd_label"] and m["lpips_label"]
    assert m["latent_scale"] > 0 and float(tok.latent_scale) == pytest.approx(m["latent_scale"])
    path = tmp_path / "tokenizer.pt"
    save_tokenizer(path, cfg, tok, enc)
    tok2, cfg2, _ = load_tokenizer(path)
    x = to_float(data.val[:4])
    assert cfg2 == cfg and torch.allclose(tok(x)[0], tok2(x)[0], atol=1e-6)
    assert float(tok2.latent_mean) == pytest.approx(m["latent_mean"])
    save_checkpoint(tmp_path / "other.pt", {"kind": "teacher"})
    with pytest.raises(RunError):
        load_tokenizer(tmp_path / "other.pt")


def test_latent_probe_scores_flattened_latents(stage):
    cfg, run, data, enc, tok, stats = stage
    assert {"align_cos", "align_dist", "align_global"} <= set(stats)  # TINY aligns z
    out = tokenizer_stage.latent_probe(tok, data, "cpu", n_train=48, k=5)
    assert out["dim"] == cfg.net.z_channels * 64 and (out["n_train"], out["n_val"]) == (48, 32)
    assert 0.0 <= out["linear_acc"] <= 1.0 and 0.0 <= out["knn_acc"] <= 1.0 and out["split"] == "train/val"
    streamed_data = dataclasses.replace(data, train=None, train_labels=None)
    streamed = tokenizer_stage.latent_probe(tok, streamed_data, "cpu", k=5)
    assert (streamed["n_train"], streamed["n_val"], streamed["split"]) == (16, 16, "val halves")


def test_finished_training_resumes_without_steps(stage):
    run = stage.run
    assert run.ckpt_path("tokenizer").exists() and run.ckpt_path("ssl").exists()
    _, stats = _train(stage.cfg, stage.data, stage.encoders, run)
    assert stats["nonfinite"] == 0


def test_config_errors():
    with pytest.raises(ConfigError, match="data.root"):
        make_config("tokenizer", "cpu", {"data.source": "cifar10"})
    with pytest.raises(ConfigError, match="encoder.kind"):
        make_config("tokenizer", "cpu", {"encoder.kind": "clip"})


def test_interrupted_training_resumes_to_identical_weights(stage, tmp_path, monkeypatch):
    """Kill the tokenizer after its step-2 checkpoint,
    resume with fresh objects: same weights as uninterrupted."""
    cfg, data, enc = stage.cfg, stage.data, stage.encoders

    def run_to_end(name):
        run = RunDir.create(tmp_path, "20", name, to_dict(cfg))
        tok, _ = _train(cfg, data, enc, run)
        return tok.state_dict()

    reference = run_to_end("straight")
    calls, real_step = [], tokenizer_stage.tokenizer_step

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step index 2: after the checkpoint written at step 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tokenizer_stage, "tokenizer_step", dying_step)
    run = RunDir.create(tmp_path, "20", "killed", to_dict(cfg))
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, data, enc, run)
    monkeypatch.setattr(tokenizer_stage, "tokenizer_step", real_step)
    assert load_checkpoint(run.ckpt_path("tokenizer"))["step"] == 2
    resumed = run_to_end("killed")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


@pytest.mark.slow
def test_imagenet256_preset_full_size_training_step_on_random_tensors():
    """The GPU preset's models at full size (random DINOv2-L at patch 16, 256 px → 16×16×32 latents, the
    49.6 M-parameter decoder) and one reconstruction + adaptive-GAN + discriminator step, on this CPU."""
    from dmvae_lib.models.recon_losses import PatchDiscriminator
    from dmvae_lib.train.phases import disc_step, tokenizer_step

    cfg = make_config("tokenizer", "imagenet256", {"encoder.timm_pretrained": False})
    torch.manual_seed(0)
    tok = build_tokenizer(cfg, None)
    t = cfg.train
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1
    feats = tok.encode_features(images)
    assert feats.shape[-2:] == (16, 16) and tok.project(feats).shape == (1, 32, 16, 16)
    params = list(tok.projector.parameters()) + list(tok.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=t.lr)
    disc = PatchDiscriminator(3, t.disc_ndf, t.disc_layers)
    dopt = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr)
    before = tok.decoder.get_last_layer().detach().clone()
    stats, x_hat = tokenizer_step(tok, opt, params, images, feats, gen, rec={"l1": t.l1, "l2": t.l2},
                                  disc=disc, disc_weight=t.disc_weight, grad_clip=t.grad_clip)
    d = disc_step(disc, dopt, images, x_hat, gen, bcr=t.bcr, grad_clip=t.grad_clip)
    assert x_hat.shape == images.shape and stats["nonfinite"] == 0 and d["nonfinite"] == 0
    assert not torch.equal(before, tok.decoder.get_last_layer()), "the decoder did not take a step"
    assert all(p.grad is None for p in tok.encoder.parameters()), "the frozen encoder received gradients"
