import dataclasses

import numpy as np
import pytest
import torch

from dmvae_lib.configs.ssl import SSLConfig
from dmvae_lib.data import shapes_dataset
from dmvae_lib.data.views import augment, batch_images, paired_renders, renders_tensor, sample_views
from dmvae_lib.metrics.probes import extract_features, knn_accuracy, linear_probe_accuracy
from dmvae_lib.models.ssl_encoder import ARCHS, OBJECTIVES, SmallResNet, nt_xent, vicreg
from dmvae_lib.runtime.runs import RunDir, RunError, load_checkpoint, save_checkpoint
from dmvae_lib.train.artifacts import load_encoder, save_encoder
from dmvae_lib.train.ssl import SMOKE_OVERRIDES, SUPERVISED_OVERRIDES, train_ssl, train_supervised

TINY = {"width": 8, "arch": "r3", "batch": 16, "proj_hidden": 32, "proj_out": 16, "warmup_steps": 2}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_backbone_shapes(arch, channels_last):
    net = SmallResNet(width=8, arch=arch)
    x = torch.randn(3, 3, 32, 32)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    feats, stem = net.forward_features(x, return_stem=True)
    assert feats.shape == (3, 32, 8, 8) and stem.shape == (3, 8, 16, 16)
    assert net(x).shape == (3, net.out_channels) == (3, 32)
    assert torch.allclose(net(x), feats.mean(dim=(2, 3)), atol=1e-5)


def test_augment_is_seeded_shape_preserving_and_in_range():
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_augment_identity_settings_and_keep_color():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    same = augment(x, torch.Generator().manual_seed(0), crop_scale=(1.0, 1.0), max_aspect=1.0, rotate=False,
                   flip=False, color_p=0.0, gray_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)  # area 1, aspect 1, no rotation: identity
    gray = augment(x, torch.Generator().manual_seed(0), color_p=0.0, gray_p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    keep = torch.ones(4, dtype=torch.bool)
    kept = augment(x, torch.Generator().manual_seed(0), color_p=0.0, gray_p=1.0, keep_color=keep)
    assert not torch.allclose(kept[:, 0], kept[:, 1])


def test_paired_renders_share_view0_with_generate_and_differ_in_nuisances():
    renders = paired_renders(6, seed=2, n_views=3)
    assert renders.shape == (3, 6, 32, 32, 3) and renders.dtype == np.uint8
    assert np.array_equal(renders[0], shapes_dataset.generate(6, seed=2)[0])
    assert not np.array_equal(renders[1], renders[0]) and not np.array_equal(renders[2], renders[1])


@pytest.mark.parametrize("paired_frac", [0.0, 1.0])
def test_sample_views_pairs_other_renders_without_colour_jitter(paired_frac, gen):
    data = renders_tensor(paired_renders(10, seed=0, n_views=2))
    identity = {"crop_scale": (1.0, 1.0), "max_aspect": 1.0, "rotate": False, "flip": False, "color_p": 1.0,
                "gray_p": 0.0}
    x1, x2, paired = sample_views(data, gen, 8, paired_frac, identity)
    assert bool(paired.all()) == (paired_frac == 1.0) and x1.shape == x2.shape == (8, 3, 32, 32)
    if paired_frac == 1.0:  # x2 is a plain render, untouched by the (certain) colour jitter; x1 is jittered
        renders = batch_images(data, torch.arange(2).repeat_interleave(10), torch.arange(10).repeat(2))
        assert all(any(torch.allclose(x, r, atol=1e-5) for r in renders) for x in x2)
        assert not any(torch.allclose(x, r, atol=1e-5) for r in renders for x in x1)
    else:
        assert not torch.allclose(x1, x2)  # same render, independent colour jitter


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_lower_for_matching_views(name, gen):
    z1 = torch.randn(64, 16, generator=gen)
    near = z1 + 0.05 * torch.randn(64, 16, generator=gen)
    far = torch.randn(64, 16, generator=gen)
    loss = OBJECTIVES[name]
    a, b = loss(z1, near, 0.5), loss(z1, far, 0.5)
    assert torch.isfinite(a) and torch.isfinite(b) and a < b


def test_nt_xent_chance_level_for_collapse():
    z = torch.ones(32, 8)
    assert torch.isclose(nt_xent(z, z, 0.5), torch.tensor(np.log(63.0), dtype=torch.float32), atol=1e-4)
    assert vicreg(z, z) > 20  # collapsed: the variance hinge is fully active


def test_knn_accuracy_separable_and_random(gen):
    centres = torch.randn(10, 32, generator=gen) * 5
    ytr, yva = torch.arange(500) % 10, torch.arange(200) % 10
    ftr = centres[ytr] + 0.1 * torch.randn(500, 32, generator=gen)
    fva = centres[yva] + 0.1 * torch.randn(200, 32, generator=gen)
    assert knn_accuracy(ftr, ytr, fva, yva) == 1.0
    assert linear_probe_accuracy(ftr, ytr, fva, yva, steps=50) == 1.0
    shuffled = ytr[torch.randperm(500, generator=gen)]
    noise_tr, noise_va = torch.randn(500, 32, generator=gen), torch.randn(200, 32, generator=gen)
    assert knn_accuracy(noise_tr, shuffled, noise_va, yva) < 0.25  # chance is 0.1


def test_extract_features_accepts_uint8_hwc():
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    out = extract_features(lambda x: x.mean(dim=(2, 3)), images, batch=2)
    ref = shapes_dataset.to_tensor(images.numpy()).mean(dim=(2, 3))
    assert out.shape == (5, 3) and torch.allclose(out, ref, atol=1e-6)


def test_encoder_checkpoint_round_trip_is_strict(tmp_path):
    cfg = SSLConfig(**TINY)
    enc = SmallResNet(cfg.width, cfg.arch).to(memory_format=torch.channels_last)
    path = tmp_path / "encoder.pt"
    save_encoder(path, enc, cfg, {"knn": 0.5})
    loaded, cfg2, metrics = load_encoder(path)
    assert cfg2 == cfg and metrics == {"knn": 0.5} and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(enc.eval()(x), loaded(x), atol=1e-6)
    ckpt = load_checkpoint(path)
    ckpt["config"]["width"] = 16  # weights no longer fit the declared backbone
    save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in ckpt.items() if k != "schema"})
    with pytest.raises(RunError, match="do not fit"):
        load_encoder(tmp_path / "bad.pt")
    ckpt["config"] = {**cfg.__dict__, "no_such_field": 1}  # a config from another version of the code
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in ckpt.items() if k != "schema"})
    with pytest.raises(RunError, match="no_such_field"):
        load_encoder(tmp_path / "old.pt")
    with pytest.raises(RunError, match="does not exist"):
        load_encoder(tmp_path / "missing.pt")


def _renders(n=48):
    base, _ = shapes_dataset.generate(n, seed=0)
    return np.stack([base, shapes_dataset.generate(n, seed=0, nuisance_seed=1)[0]])


def _fit(run, steps, renders, stop_at=None):
    cfg = SSLConfig(**TINY, steps=steps, precision="fp32")
    hooks = []
    if stop_at is not None:
        def interrupt(step, encoder):
            assert isinstance(encoder, SmallResNet)
            if step == stop_at:
                raise KeyboardInterrupt  # an interruption between two checkpoints
        hooks = [(1, interrupt)]
    return train_ssl(cfg, renders, run=run, tag="ssl", progress=False, hooks=hooks, log_every=1, ckpt_every=2)


def test_train_ssl_resumes_identically_after_interruption(tmp_path):
    renders = _renders()
    reference = _fit(RunDir.create(tmp_path, "nb", "straight", {}), 6, renders)
    run = RunDir.create(tmp_path, "nb", "interrupted", {})
    with pytest.raises(KeyboardInterrupt):
        _fit(run, 6, renders, stop_at=5)  # last checkpoint at step 4
    assert load_checkpoint(run.ckpt_path("ssl"))["step"] == 4
    resumed = _fit(run, 6, renders)
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.stats["loss"] == reference.stats["loss"] and np.isfinite(resumed.stats["loss"])


def test_train_supervised_runs_and_time_budget_stops_early():
    images, labels = shapes_dataset.generate(32, seed=0)
    cfg = SSLConfig(**TINY, steps=50, max_seconds=1e-9, precision="fp32")
    out = train_supervised(cfg, images, labels, progress=False, log_every=1)
    assert out.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert out.stats["idle"] == 1.0 and out.stats["seconds"] > 0  # one step, then the budget is spent


def test_presets_are_config_fields_and_unknown_names_raise():
    fields = {f.name for f in dataclasses.fields(SSLConfig)}
    for overrides in (SMOKE_OVERRIDES,
    SUPERVISED_OVERRIDES, SUPERVISED_OVERRIDES):
        assert set(overrides) <= fields
        SSLConfig(**overrides).validate()
    for bad in ({"arch": "r9"}, {"objective": "byol"}, {"precision": "fp16"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SSLConfig(**bad).validate()
