"""Recognisability (class accuracy of generated images), the CFG sweep, the classifier in the tokenizer file,
the class-discriminative view of notebook 50, and the generator's LR / time-sampling options."""

from __future__ import annotations

import math

import pytest
import tiny_stages as tiny
import torch
from torch import nn

from dmvae_lib.configs import ConfigError, make_config
from dmvae_lib.configs import generation as generation_config
from dmvae_lib.configs.study import CLAIM_V1_GENERATOR
from dmvae_lib.core import flow
from dmvae_lib.metrics import embedding, recognition
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages import generation as generation_stage
from dmvae_lib.train.artifacts import classifier, load_tokenizer
from dmvae_lib.train.velocity import lr_factor
from dmvae_lib.viz import figures as viz


class ChannelClassifier(nn.Module):
    """Names class c for an image whose channel-mean pattern is c (a stand-in with known answers)."""

    def forward(self, x):  # x (B, 3, H, W) in [−1, 1]
        return nn.functional.one_hot((x.mean((1, 2, 3)) > 0).long() * 2, 3).float()


def test_class_accuracy_counts_hits_per_class_and_overall():
    images = torch.cat([torch.full((4, 3, 2, 2), -0.5), torch.full((4, 3, 2, 2), 0.5)])  # → class 0, 2
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1, 1])
    acc = recognition.class_accuracy(ChannelClassifier(), images, labels, 3)
    assert acc["value"] == pytest.approx(5 / 8) and acc["n"] == 8
    assert acc["per_class"][0] == 1.0 and acc["per_class"][1] == 0.0 and acc["per_class"][2] == 1.0
    assert "not Inception" in acc["classifier"]
    assert math.isnan(recognition.class_accuracy(ChannelClassifier(), images, labels, 4)["per_class"][3])
    with pytest.raises(ValueError, match="as many labels"):
        recognition.class_accuracy(ChannelClassifier(), images, labels[:3], 3)


def test_uint8_images_are_classified_like_their_float_twins():
    u8 = torch.randint(0, 256, (10, 4, 4, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (10,))
    a = recognition.class_accuracy(ChannelClassifier(), u8, labels, 3)
    b = recognition.class_accuracy(ChannelClassifier(), u8.permute(0, 3, 1, 2).float() / 127.5 - 1, labels, 3)
    assert a["value"] == b["value"]


def test_tokenizer_file_carries_the_classifier_and_older_files_have_none(tmp_path):
    stage = tiny.tokenizer_stage(tmp_path)
    tok, _, enc = load_tokenizer(stage.run.path / "tokenizer.pt")
    clf = classifier(enc)
    assert isinstance(clf, nn.Sequential)
    ref = nn.Sequential(stage.encoders["supervised"], stage.encoders["supervised_head"]).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(clf(x), ref(x))
    assert classifier({k: v for k, v in enc.items() if k != "supervised_head"}) is None


def test_cfg_sweep_and_recognisability_on_the_tiny_tokenizer(tmp_path):
    stage = tiny.tokenizer_stage(tmp_path)
    cfg = make_config("generation", "smoke", {
        "fit.steps": 2, "fit.batch": 16, "fit.log_every": 1, "sample.steps": 3, "sample.n": 20,
        "metrics.real_images": 24, "metrics.floor_images": 12, "metrics.cfg_sweep": (1.0, 2.0),
        "metrics.sweep_n": 10})
    run = RunDir.create(tmp_path, "60_generation", "t", {"x": 1})
    train_set = generation_stage.generator_data(cfg, stage.tokenizer, stage.run.path / "tokenizer.pt",
                                                stage.data, run, "cpu")
    net, _ = generation_stage.fit_generator(cfg, train_set, run, "cpu", progress=False)
    real = generation_stage.real_reference(cfg, stage.tokenizer, stage.encoders, stage.data, "cpu")
    clf = classifier(stage.encoders)
    rows = generation_stage.cfg_sweep(cfg, net, stage.tokenizer, clf, train_set.shape, train_set.num_classes,
                                      real, "cpu", progress=False)
    assert [r["cfg_scale"] for r in rows] == [1.0, 2.0] and all(r["n"] == 10 for r in rows)
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and len(r["per_class"]) == train_set.num_classes
        assert r["fd_ssl"] >= 0 and r["fd_sup"] >= 0
    images = generation_stage.decode_latents(stage.tokenizer, train_set.bank[:20], "cpu", progress=False)
    labels = train_set.labels[:20]
    rec = generation_stage.recognisability(cfg, clf, images, labels, train_set.num_classes, real,
                                           {"tokenizer": stage.run.path / "tokenizer.pt"}, "cpu")
    assert rec["metric"] == "class_accuracy" and 0 <= rec["ceiling"] <= 1 and rec["n"] == 20
    # the decoder's ceiling is the classifier on the reconstructions of exactly the ceiling's val images
    assert real.recon_u8.shape == real.val_u8.shape and not torch.equal(real.recon_u8, real.val_u8)
    same = generation_stage.recognisability(cfg, clf, real.recon_u8, real.val_labels, train_set.num_classes,
                                            real, {"tokenizer": stage.run.path / "tokenizer.pt"}, "cpu")
    assert same["value"] == same["reconstruction_ceiling"] and \
        same["per_class"] == same["reconstruction_ceiling_per_class"]
    records = generation_stage.evaluate(cfg, images, real, {"tokenizer": stage.run.path / "tokenizer.pt",
                                                            "generator": None, "samples": None}, "cpu")
    names = {r["metric"] for r in records}
    assert {"fd_ssl", "fd_ssl_floor", "rfd_ssl", "fd_sup", "fd_sup_floor", "rfd_sup", "inception"} <= names
    assert "supervised" in next(r for r in records if r["metric"] == "fd_sup")["feature_space"]


def test_sweep_figures_build():
    rows = [{"cfg_scale": s, "accuracy": a, "fd_ssl": f} for s, a, f in ((1, 0.5, 2.0), (2, 0.8, 1.0))]
    fig = viz.cfg_sweep_panels(rows, ceiling=0.97, chance=0.1, fd_floor=0.05, recon_ceiling=0.9)
    assert len(fig.data) == 2 and any(s.y0 == 0.9 for s in fig.layout.shapes)
    bars = viz.class_accuracy_bars({"real": [1.0, 0.9], "gen": [0.5, 0.4]}, ["a", "b"])
    assert len(bars.data) == 2 and list(bars.data[0].x) == ["a", "b"]


def test_cfg_sweep_config_is_checked():
    assert make_config("generation", "smoke", {"metrics.cfg_sweep": ()}).metrics.cfg_sweep == ()
    for bad in ((0.5, 1.0), (2.0, 1.0), (1.0, 1.0)):
        with pytest.raises(ConfigError, match="cfg_sweep"):
            make_config("generation", "smoke", {"metrics.cfg_sweep": bad})


def test_discriminant_view_is_fitted_on_other_points_and_reads_linear_structure():
    gen = torch.Generator().manual_seed(0)

    def draw(n):  # 3 classes apart along one of 60 dims, buried under large noise in the others
        y = torch.arange(n) % 3
        x = torch.randn(n, 60, generator=gen) * 3
        x[:, 7] = y.float() * 2 + 0.3 * torch.randn(n, generator=gen)
        return x, y

    (fx, fy), (x, y) = draw(600), draw(300)
    proj, pred = embedding.discriminant_view(fx, fy, x)
    assert proj.shape == (300, 2) and (pred == y).float().mean() > 0.95
    means = torch.stack([proj[y == c, 0].mean() for c in range(3)])
    assert means.sort().values.diff().min() > 3 * proj[:, 0].std() / 10
    # no structure: held-out accuracy stays near chance although the fit set is separable in 60 dims
    _, pred = embedding.discriminant_view(torch.randn(90, 60, generator=gen), torch.arange(90) % 3,
                                          torch.randn(300, 60, generator=gen))
    assert (pred == y).float().mean() < 0.5


def test_balanced_indices_can_exclude_rows():
    labels = torch.arange(100) % 4
    shown = embedding.balanced_indices(labels, 40, seed=0)
    other = embedding.balanced_indices(labels, 40, seed=0, exclude=shown)
    assert len(other) == 40 and not set(shown.tolist()) & set(other.tolist())
    assert torch.bincount(labels[other]).tolist() == [10] * 4


def test_lr_factor_warms_up_then_stays_or_follows_a_cosine_to_zero():
    f = make_config("generation", "smoke", {"fit.steps": 100, "fit.warmup_steps": 10}).fit
    assert lr_factor(0, f) == pytest.approx(0.1) and lr_factor(50, f) == 1.0 and lr_factor(99, f) == 1.0
    c = make_config("generation", "smoke", {"fit.steps": 100, "fit.warmup_steps": 10,
                                            "fit.lr_schedule": "cosine"}).fit
    assert lr_factor(4, c) == pytest.approx(0.5) and lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(55, c) == pytest.approx(0.5) and lr_factor(100, c) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="lr_schedule"):
        make_config("generation", "smoke", {"fit.lr_schedule": "step"})
    with pytest.raises(ConfigError, match="t_sampling"):
        make_config("teacher", "smoke", {"fit.t_sampling": "beta"})


def test_logit_normal_times_concentrate_where_asked():
    gen = torch.Generator().manual_seed(0)
    t = flow.sample_t(20000, logit_normal=(-1.0, 1.0), generator=gen)
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert float(t.median()) == pytest.approx(float(torch.sigmoid(torch.tensor(-1.0))), abs=0.02)


def test_the_claim_study_v1_keeps_its_generator_whatever_notebook_60_defaults_to():
    study = make_config("study", "cpu")
    gen = make_config("generation", "cpu", study.claim.generation)
    v1 = make_config("generation", "cpu", CLAIM_V1_GENERATOR)
    assert gen.net == v1.net and gen.sample == dataclass_replace(v1.sample, n=gen.sample.n)
    assert (gen.net.size, gen.net.patch_size, gen.fit.lr) == ("Micro", 4, 1e-3)
    assert gen.fit.lr_schedule == "constant"
    assert gen.metrics.cfg_sweep == ()
    # its 800-step generators are not held to notebook 60's recognisability check (0.2 at cpu)
    assert gen.metrics.min_class_accuracy == 0.0 < make_config("generation", "cpu").metrics.min_class_accuracy
    # every key the cpu preset sets is stated by the study (or is one of its own budget keys)
    own = set(study.claim.generation)
    assert set(generation_config.PRESETS["cpu"]) <= own


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_class_accuracy_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match="min_class_accuracy"):
        make_config("generation", "smoke", {"metrics.min_class_accuracy": value})
