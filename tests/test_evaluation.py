"""Generation and evaluation (notebook 60): samplers on analytic flows, protocol records and file hashes,
labelled Fréchet distances, the ADM .npz format, the Inception path, and temp-file isolation of parallel
runs."""

import dataclasses
import json
import math
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tiny_stages as tiny
import torch

from dmvae_lib.configs import ConfigError, make_config
from dmvae_lib.configs.generation import SampleConfig
from dmvae_lib.data.pixels import to_uint8
from dmvae_lib.data.references import GaussianReference, TensorReference
from dmvae_lib.metrics import evaluation
from dmvae_lib.metrics.image_metrics import (
    INCEPTION_SPACE,
    INCEPTION_URL,
    frechet_distance,
    frechet_distance_from_moments,
)
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages import generation as generation_stage
from dmvae_lib.train.artifacts import load_generator, save_generator

SHAPE = (2, 4, 4)


def gaussian_oracle(means: torch.Tensor, s: float):
    """Exact velocity for data N(means[y], s²I) (module docstring of references); row K is the null label."""

    def net(x, t, y):
        m = means[y].reshape(-1, *([1] * (x.dim() - 1)))
        tt = t.reshape(-1, *([1] * (x.dim() - 1)))
        var_t = tt**2 * s**2 + (1 - tt) ** 2
        return m + (tt * s**2 - (1 - tt)) * (x - tt * m) / var_t

    return net


def _sample_cfg(**kw) -> SampleConfig:
    return dataclasses.replace(SampleConfig(), **{"n": 2000, "steps": 100, "batch": 700, **kw})


# --- samplers on analytic flows, through the generation path ------------------------------------------------
@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_exact_gaussian_velocity_maps_noise_to_the_standard_gaussian(sampler):
    ref = GaussianReference(SHAPE)
    x, y = generation_stage.sample_latents(ref.velocity, SHAPE, 0, _sample_cfg(sampler=sampler), seed=0,
                                           device="cpu")
    assert y is None and x.shape == (2000, *SHAPE)
    assert abs(float(x.mean())) < 0.03 and abs(float(x.std()) - 1) < 0.03


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_shifted_gaussian_oracle_lands_each_class_on_its_mean(sampler):
    means, s = torch.tensor([-2.0, 0.5, 3.0, 0.0]), 0.5  # 3 classes + the null label
    x, y = generation_stage.sample_latents(gaussian_oracle(means, s), SHAPE, 3, _sample_cfg(sampler=sampler),
                                           0, "cpu")
    assert torch.equal(torch.bincount(y), torch.tensor([667, 667, 666])), "labels are not class-balanced"
    for c in range(3):
        xc = x[y == c]
        assert abs(float(xc.mean()) - float(means[c])) < 0.05
        assert abs(float(xc.std()) - s) < 0.05


def test_cfg_on_gaussians_scales_the_mean_and_the_interval_switches_it_off():
    """Equal-variance Gaussians: w·v_m + (1 − w)·v_0 is exactly v_{w·m}, so guidance w lands on w·m."""
    means, s = torch.tensor([1.0, 0.0]), 0.5  # class 0 at 1, null at 0
    net = gaussian_oracle(means, s)
    guided, _ = generation_stage.sample_latents(net, SHAPE, 1, _sample_cfg(n=500, cfg_scale=2.0), 0, "cpu")
    assert abs(float(guided.mean()) - 2.0) < 0.05
    off, _ = generation_stage.sample_latents(net, SHAPE, 1,
                                             _sample_cfg(n=500, cfg_scale=2.0, cfg_interval=(2.0, 2.0)), 0,
                                             "cpu")
    plain, _ = generation_stage.sample_latents(net, SHAPE, 1, _sample_cfg(n=500), 0, "cpu")
    torch.testing.assert_close(off, plain)


def test_sampling_is_seeded_and_independent_of_the_global_rng():
    net = GaussianReference(SHAPE).velocity
    a, _ = generation_stage.sample_latents(net, SHAPE, 0, _sample_cfg(n=50, steps=5, sampler="sde"), 3, "cpu")
    torch.manual_seed(123)
    b, _ = generation_stage.sample_latents(net, SHAPE, 0, _sample_cfg(n=50, steps=5, sampler="sde"), 3, "cpu")
    c, _ = generation_stage.sample_latents(net, SHAPE, 0, _sample_cfg(n=50, steps=5, sampler="sde"), 4, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_rejects_sde_shift_and_bad_interval():
    with pytest.raises(ConfigError, match="shift"):
        make_config("generation", "smoke", {"sample.sampler": "sde", "sample.shift": 2.5})
    with pytest.raises(ConfigError, match="cfg_interval"):
        make_config("generation", "smoke", {"sample.cfg_interval": [0.8, 0.2]})
    with pytest.raises(ConfigError, match="sampler"):
        make_config("generation", "smoke", {"sample.sampler": "dopri5"})


# --- protocol records and hashes ----------------------------------------------------------------------------
def _protocol() -> evaluation.SamplingProtocol:
    return evaluation.SamplingProtocol(n_samples=10, sampler="sde", steps=250, cfg_scale=1.5,
                                       cfg_interval=(0.1, 1.0), ema=True, seed=7)


def test_protocol_record_has_every_field_and_file_hashes(tmp_path):
    w = tmp_path / "weights.pth"
    w.write_bytes(b"weights v1")
    rec = evaluation.protocol_record(_protocol(), {"inception_weights": w, "reference_batch": None},
                                     real_set="train")
    assert set(evaluation.PROTOCOL_FIELDS) <= set(rec)
    assert (rec["n_samples"], rec["sampler"], rec["steps"], rec["cfg_scale"], rec["cfg_interval"], rec["ema"],
            rec["seed"]) == (10, "sde", 250, 1.5, [0.1, 1.0], True, 7)
    assert len(rec["files"]["inception_weights"]["sha256"]) == 64 and rec["real_set"] == "train"
    assert rec["files"]["reference_batch"] == {"path": None, "sha256": None}
    json.dumps(rec)  # JSON-ready
    w.write_bytes(b"weights v2")
    rec2 = evaluation.protocol_record(_protocol(), {"inception_weights": w})
    assert rec2["files"]["inception_weights"]["sha256"] != rec["files"]["inception_weights"]["sha256"]


def test_protocol_record_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="stats"):
        evaluation.protocol_record(_protocol(), {"stats": tmp_path / "absent.npz"})


# --- Fréchet distances --------------------------------------------------------------------------------------
def test_fd_identical_sets_is_zero_and_shift_gives_squared_mean_difference(gen):
    a = torch.randn(3000, 6, generator=gen)
    same = evaluation.feature_fd(a, a, "test features (not FID)")
    assert abs(same["value"]) < 1e-8 and same["n_samples"] == same["n_real"] == 3000
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    shifted = evaluation.feature_fd(a, a + delta, "test features (not FID)")
    assert shifted["value"] == pytest.approx(float(delta.pow(2).sum()), rel=1e-6)
    b = torch.randn(20000, 6, generator=gen) + delta  # independent draws: ≈ ‖Δμ‖² up to sampling noise
    fd = evaluation.feature_fd(torch.randn(20000, 6, generator=gen), b, "x")["value"]
    assert fd == pytest.approx(14.25, abs=0.1)


def test_fd_label_is_required_and_fid_is_reserved_for_inception(gen):
    a = torch.randn(50, 3, generator=gen)
    with pytest.raises(ValueError, match="feature space"):
        evaluation.feature_fd(a, a, "")
    with pytest.raises(ValueError, match="not the Inception"):
        evaluation.feature_fd(a, a, "SSL FID")
    assert evaluation.feature_fd(a, a, INCEPTION_SPACE)["feature_space"] == INCEPTION_SPACE


def test_fd_from_moments_matches_fd_from_features(gen):
    a, b = torch.randn(400, 5, generator=gen), 0.7 * torch.randn(300, 5, generator=gen) + 0.3
    m = frechet_distance_from_moments(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T), "x")
    assert m.value == pytest.approx(frechet_distance(a, b, "x").value, rel=1e-6)


# --- ADM sample format and image files ----------------------------------------------------------------------
def _images(n=6, h=8, w=10, seed=0):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_adm_npz_round_trip(tmp_path):
    images, labels = _images(), torch.tensor([0, 1, 2, 0, 1, 2])
    path = evaluation.save_adm_npz(tmp_path / "samples.npz", images, labels)
    with np.load(path) as z:  # the evaluator's view: arr_0 uint8 NHWC, arr_1 labels
        assert sorted(z.keys()) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (6, 8, 10, 3)
        assert np.array_equal(z["arr_0"], images.numpy()) and np.array_equal(z["arr_1"], labels.numpy())
    back, back_labels = evaluation.load_adm_npz(path)
    assert torch.equal(back, images) and torch.equal(back_labels, labels)
    evaluation.save_adm_npz(tmp_path / "unlabelled.npz", images)
    assert evaluation.load_adm_npz(tmp_path / "unlabelled.npz")[1] is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "scratch left behind"


def test_adm_npz_rejects_float_or_nchw_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        evaluation.save_adm_npz(tmp_path / "a.npz", torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="uint8"):
        evaluation.save_adm_npz(tmp_path / "b.npz", _images().permute(0, 3, 1, 2))


def test_to_uint8_and_grid():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    u8 = to_uint8(x)
    assert u8.shape == (1, 2, 2, 3) and u8[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255]
    grid = evaluation.image_grid(_images(n=5, h=4, w=4), cols=3, pad=1)
    assert grid.shape == (2 * 5 - 1, 3 * 5 - 1, 3) and grid.dtype == torch.uint8


def test_write_samples_writes_npz_grid_and_capped_pngs(tmp_path):
    from PIL import Image

    run, images, labels = RunDir(tmp_path / "run"), _images(n=12, h=8, w=8), torch.arange(12) % 3
    paths = generation_stage.write_samples(run, images, labels, make_config("generation", "smoke").metrics)
    assert len(list(paths["pngs"].glob("*.png"))) == 12  # png_limit 40 > 12
    assert np.array_equal(np.asarray(Image.open(paths["pngs"] / "000003.png")), images[3].numpy())
    assert np.asarray(Image.open(paths["grid"])).shape[2] == 3
    assert torch.equal(evaluation.load_adm_npz(paths["npz"])[0], images)
    capped = dataclasses.replace(make_config("generation", "smoke").metrics, png_limit=5)
    assert len(list(generation_stage.write_samples(run, images, labels, capped)["pngs"].glob("*.png"))) == 5
    assert not [p for p in run.path.iterdir() if p.name.startswith(".scratch")]


def test_parallel_evaluations_do_not_share_temporary_files(tmp_path, monkeypatch):
    """Two runs writing at once, in separate run folders, with the system temp dir made visible: each gets
    its own files, no scratch is left behind, and nothing is written to the system temp dir."""
    sys_tmp = tmp_path / "system_tmp"
    sys_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sys_tmp))
    runs = [RunDir(tmp_path / f"run{i}") for i in range(2)]
    data = {i: _images(n=30, h=8, w=8, seed=i) for i in range(2)}
    metrics, barrier = make_config("generation", "smoke").metrics, threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(5):
            generation_stage.write_samples(runs[i], data[i], torch.arange(30) % 3, metrics)
            generation_stage.save_evaluation(runs[i], [{"metric": f"m{i}", "value": float(i)}])

    with ThreadPoolExecutor(2) as pool:
        [f.result() for f in [pool.submit(work, i) for i in range(2)]]  # re-raises a worker's error
    for i, run in enumerate(runs):
        assert torch.equal(evaluation.load_adm_npz(run.path / "samples.npz")[0], data[i])
        assert json.loads((run.path / "evaluation.json").read_text())[0]["metric"] == f"m{i}"
        assert not [p for p in run.path.iterdir() if p.name.startswith(".")]
    assert list(sys_tmp.iterdir()) == []
    with evaluation.scratch_dir(runs[0].path) as a, evaluation.scratch_dir(runs[0].path) as b:
        assert a != b and a.parent == b.parent == runs[0].path


# --- Inception metrics --------------------------------------------------------------------------------------
def test_inception_metrics_without_weights_say_how_to_get_them(tmp_path):
    res = evaluation.inception_metrics(_images(), weights_path=tmp_path / "absent.pth",
                                       real_u8=_images(seed=1))
    assert res["available"] is False
    assert INCEPTION_URL in res["reason"] and "inception_weights" in res["reason"]
    assert set(res) == {"available", "reason"}


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A state dict of the right shape with random values (the numbers are meaningless; plumbing only)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_metrics_with_local_weights_and_reference_stats(random_inception, tmp_path):
    samples, real = _images(n=12, h=16, w=16), _images(n=12, h=16, w=16, seed=1)
    res = evaluation.inception_metrics(samples, weights_path=random_inception, real_u8=real, batch=6,
                                       isc_splits=2, prc_neighborhood=2)
    assert res["available"] and res["feature_space"] == INCEPTION_SPACE
    assert res["fid"]["value"] > 0 and "12 real images" in res["fid"]["against"]
    assert res["inception_score"]["mean"] >= 1 - 1e-9
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    same = evaluation.inception_metrics(samples, weights_path=random_inception, real_u8=samples, batch=6,
                                        isc_splits=2)
    assert abs(same["fid"]["value"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    # ADM reference batch: FID against its mu/sigma (here: the samples' own statistics, so ≈ 0)
    from dmvae_lib.metrics.image_metrics import inception_features, load_inception

    (pool,) = inception_features(load_inception(random_inception), samples.permute(0, 3, 1, 2), 6)
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, mu=pool.mean(0).numpy(), sigma=torch.cov(pool.T).numpy(), arr_0=real.numpy())
    res = evaluation.inception_metrics(samples, weights_path=random_inception, reference_path=ref, batch=6,
                                       isc_splits=2)
    assert abs(res["fid"]["value"]) < 1e-6 and "reference statistics" in res["fid"]["against"]
    assert res["n_real"] == 12 and res["precision_recall_against"].startswith("reference arr_0")


# --- the generator fit reuses the teacher's loop ------------------------------------------------------------
def test_fit_generator_checkpoints_ema_raw_and_saved_weights(tmp_path, gen):
    cfg = make_config("generation", "smoke", {"fit.steps": 3, "fit.batch": 16, "fit.log_every": 1,
                                              "net.patch_size": 2})
    data = TensorReference(torch.randn(64, *SHAPE, generator=gen), torch.arange(64) % 4, "latents")
    run = RunDir.create(tmp_path, "60_generation", "t", {"x": 1})
    net, stats = generation_stage.fit_generator(cfg, data, run, "cpu", progress=False)
    assert run.ckpt_path("generator").is_file() and "fm_loss" in stats
    assert [r["step"] for r in run.read_metrics() if r["tag"] == "generator"] == [1, 2, 3]
    raw = generation_stage.raw_generator(cfg, data, run, "cpu")
    x, t, y = torch.randn(5, *SHAPE, generator=gen), torch.rand(5, generator=gen), torch.arange(5) % 4
    assert not torch.allclose(raw(x, t, y), net(x, t, y)), "EMA and raw weights should differ"
    tok_file = tmp_path / "tokenizer.pt"
    tok_file.write_bytes(b"stand-in")
    save_generator(run.path / "generator.pt", cfg, net, data, tok_file)
    loaded, ck = load_generator(run.path / "generator.pt")
    torch.testing.assert_close(loaded(x, t, y), net(x, t, y))
    assert ck["latents"] == {"shape": list(SHAPE), "num_classes": 4}


def test_learning_curve_scores_the_ema_net_at_the_chosen_steps(tmp_path):
    stage = tiny.tokenizer_stage(tmp_path)
    tok, data = stage.tokenizer, stage.data
    cfg = make_config("generation", "smoke", {
        "fit.steps": 4, "fit.batch": 16, "fit.log_every": 2, "net.patch_size": 2, "sample.steps": 3,
        "metrics.real_images": 48, "metrics.floor_images": 16, "curve.steps": (2, 4), "curve.n": 12})
    run = RunDir.create(tmp_path, "60_generation", "t", {"x": 1})
    train_set = generation_stage.generator_data(cfg, tok, stage.run.path / "tokenizer.pt", data, run, "cpu")
    hook = generation_stage.curve_evaluator(cfg, tok, stage.encoders, data, train_set.shape,
                                            train_set.num_classes, run, "cpu")
    generation_stage.fit_generator(cfg, train_set, run, "cpu", progress=False, curve=hook)
    points = generation_stage.curve_records(run)
    assert [p["step"] for p in points] == [2, 4] and all(p["n"] == 12 for p in points)
    for p in points:
        for key in ("fd_ssl", "fd_ssl_recon", "fd_pix", "fd_pix_recon"):
            assert math.isfinite(p[key]) and p[key] >= 0, (key, p)
        assert "no encoder" in p["space_pix"] and "not FID" in p["space_ssl"]


def test_curve_steps_are_checked_against_the_fit():
    with pytest.raises(ConfigError, match="curve.steps"):
        make_config("generation", "smoke", {"fit.steps": 10, "curve.steps": (20,)})
    with pytest.raises(ConfigError, match="curve.steps"):
        make_config("generation", "smoke", {"curve.steps": (5, 2)})
