"""Stage-1 wiring on a tiny configuration: data → SSL + supervised encoders → tokenizer → metrics → checkpoint."""

import pytest
import torch

from dmvae_lib import tokenizer_stage as ts
from dmvae_lib.configs import ConfigError, make_config, to_dict
from dmvae_lib.runs import RunDir, RunError, save_checkpoint

TINY = {"data.n_train": 64, "data.n_val": 32, "encoder.ssl.steps": 2, "encoder.ssl.batch": 16,
        "encoder.ssl.width": 8, "encoder.supervised_steps": 2, "encoder.knn_k": 5, "net.proj_hidden": 16,
        "net.dec_ch": 8, "net.dec_groups": 4, "train.steps": 4, "train.batch": 8, "train.disc_start": 2,
        "train.disc_ndf": 8, "train.log_every": 2, "train.ckpt_every": 2, "train.precision": "fp32"}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    cfg = make_config("tokenizer", "smoke", TINY)
    run = RunDir.create(root, "20", "r", to_dict(cfg))
    data = ts.load_data(cfg, root / "cache")
    enc = ts.reference_encoders(cfg, data, run, "cpu")
    tok, stats = ts.train_tokenizer(cfg, ts.build_tokenizer(cfg, enc["ssl"]), data, run, "cpu", progress=False)
    return cfg, run, data, enc, tok, stats


def test_data_shapes_and_cache(stage, tmp_path):
    cfg, run, data, *_ = stage
    assert data.train.shape == (2, 64, 32, 32, 3) and data.train.dtype == torch.uint8
    assert data.val.shape == (32, 32, 32, 3) and data.val_labels.shape == (32,)
    assert not torch.equal(data.train[0], data.train[1]), "paired views must differ in nuisances"


def test_encoders_report_scores_and_tokenizer_trains(stage):
    cfg, run, data, enc, tok, stats = stage
    assert 0.0 <= enc["ssl_scores"]["knn_acc"] <= 1.0 and "val_acc" in enc["supervised_scores"]
    assert stats["nonfinite"] == 0 and "g_loss" in stats and "d_loss" in stats  # the GAN term was active
    x = ts.to_float(data.val[:4])
    x_hat, z = tok(x)
    assert x_hat.shape == x.shape and z.shape == (4, cfg.net.z_channels, 8, 8)


def test_metrics_are_labelled_and_checkpoint_round_trips(stage, tmp_path):
    cfg, run, data, enc, tok, _ = stage
    m = ts.evaluate_tokenizer(tok, data, "cpu", enc["ssl"], batch=16)
    assert "not Inception" in m["fd_label"] and m["lpips_label"]
    assert m["latent_scale"] > 0 and float(tok.latent_scale) == pytest.approx(m["latent_scale"])
    path = tmp_path / "tokenizer.pt"
    ts.save_tokenizer(path, cfg, tok, enc)
    tok2, cfg2, _ = ts.load_tokenizer(path)
    x = ts.to_float(data.val[:4])
    assert cfg2 == cfg and torch.allclose(tok(x)[0], tok2(x)[0], atol=1e-6)
    assert float(tok2.latent_mean) == pytest.approx(m["latent_mean"])
    save_checkpoint(tmp_path / "other.pt", {"kind": "teacher"})
    with pytest.raises(RunError):
        ts.load_tokenizer(tmp_path / "other.pt")


def test_finished_training_resumes_without_steps(stage):
    cfg, run, data, enc, _, _ = stage
    assert run.ckpt_path("tokenizer").exists() and run.ckpt_path("ssl").exists()
    tok, stats = ts.train_tokenizer(cfg, ts.build_tokenizer(cfg, enc["ssl"]), data, run, "cpu", progress=False)
    assert stats["nonfinite"] == 0


def test_config_errors():
    with pytest.raises(ConfigError, match="data.root"):
        make_config("tokenizer", "cpu", {"data.source": "cifar10"})
    with pytest.raises(ConfigError, match="encoder.kind"):
        make_config("tokenizer", "cpu", {"encoder.kind": "clip"})
