"""The claim study's arms as configs (workflow/arms.py), read back from synthetic run summaries; the random
encoder of arm R/AE; a jointly trained encoder saved and reloaded with its tokenizer."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_stages import TINY_TOK

from dmvae_lib.configs import ConfigError, make_config, to_dict
from dmvae_lib.data.images import load_data
from dmvae_lib.data.pixels import to_float
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_backbone
from dmvae_lib.viz import figures as viz
from dmvae_lib.workflow import arms, pipeline


def _stage1(root: Path, **over) -> Path:
    """A notebook-20 run folder with the config.json `session.start` writes (no weights needed to plan)."""
    cfg = make_config("tokenizer", "smoke", over)
    record = {"stage": "tokenizer", "preset": "smoke", **to_dict(cfg)}
    run = RunDir.create(root, arms.NOTEBOOKS["20"], "stage1", record)
    return run.path


def _study(**over):
    return make_config("study", "smoke", over)


def test_plan_builds_every_arm_from_the_existing_notebooks(tmp_path):
    a_over = {"net.z_channels": 8, "train.align_global": 1.0, "checks.min_latent_linear": 0.5}
    a_dir = _stage1(tmp_path, **a_over)
    cfg = _study(**{"claim.seeds": [0, 1, 2], "claim.extra_weights": [1.0], "claim.random_arm": True})
    runs = arms.plan(cfg, "smoke", "p", tmp_path, a_dir)
    by = {r.name: r for r in runs}
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    # AE's stage 1: A's stage-1 config with only the encoder (random, trained from scratch), the alignment
    # and the probe check changed; R the same with the encoder frozen
    ae1 = make_config("tokenizer", "smoke", by["p-AE-stage1"].params["overrides"])
    r_cfg = make_config("tokenizer", "smoke", by["p-R"].params["overrides"])
    a_cfg = make_config("tokenizer", "smoke", a_over)
    assert ae1.encoder.kind == "random" and ae1.train.train_encoder and ae1.train.align_global == 0
    assert ae1.net == a_cfg.net and ae1.train.steps == a_cfg.train.steps
    assert ae1.encoder.ssl == a_cfg.encoder.ssl
    assert r_cfg.encoder.kind == "random" and not r_cfg.train.train_encoder and r_cfg.net == a_cfg.net
    # C1 with its λ = 0 control (C0), encoder trainable; the extra λ without a control; AE at λ = 0
    c1 = by["p-C1"].params["overrides"]
    assert c1["train.train_encoder"] and c1["train.dm_weight"] == 10.0 and c1["train.control"]
    assert by["p-C1-l1"].params["overrides"]["train.dm_weight"] == 1.0
    assert not by["p-C1-l1"].params["overrides"]["train.control"]
    ae = by["p-AE"].params
    assert ae["overrides"]["train.dm_weight"] == 0.0 and ae["overrides"]["train.train_encoder"]
    assert ae["tokenizer_run"].endswith("p-AE-stage1") and ae["teacher_run"].endswith("p-teacher-AE")
    assert by["p-C1"].params["teacher_run"].endswith("p-teacher")
    assert by["p-C1"].params["tokenizer_run"] == str(a_dir)
    # one generator per arm and seed, paired seeds; C0 reads the control tokenizer of the C1 run
    gens = [r for r in runs if r.notebook == "60"]
    assert len(gens) == len(arms.arms(cfg)) * 3 == 6 * 3
    c0 = by["p-C0-g2"].params
    assert c0["joint_run"].endswith("p-C1") and c0["tokenizer_file"] == "control_tokenizer.pt"
    assert c0["seed"] == 2
    assert by["p-A-g0"].params["joint_run"] == str(a_dir) and by["p-A-g0"].needs == ()
    assert by["p-AE-g1"].needs == ("p-AE",)
    # every run comes after what it needs
    for i, r in enumerate(runs):
        assert set(r.needs) <= set(names[:i])
    # every planned parameter set passes the notebooks' own parameter check
    for r in runs:
        pipeline.check_parameters(arms._notebook(r.notebook), r.params)


def _finished(root: Path, notebook: str, name: str, params: dict) -> Path:
    """A finished run folder of `notebook` whose config.json records exactly what `params` request."""
    nb = arms._notebook(notebook)
    run = RunDir.create(root, arms.NOTEBOOKS[notebook], name, pipeline.requested_record(nb, params))
    (run.path / "summary.json").write_text("{}")
    return run.path


def test_plan_reuses_the_pipelines_own_teacher_and_c1_runs_only_when_their_config_is_the_same(tmp_path):
    a_dir = _stage1(tmp_path)
    cfg = _study()
    first = {r.name: r for r in arms.plan(cfg, "smoke", "p", tmp_path, a_dir)}
    assert "p-teacher" in first and "p-C1" in first
    # the main job's notebook-30 run "p" has exactly the teacher's config: it serves as the teacher
    _finished(tmp_path, "30", "p", first["p-teacher"].params)
    second = {r.name: r for r in arms.plan(cfg, "smoke", "p", tmp_path, a_dir)}
    assert "p-teacher" not in second and second["p"].notebook == "30"
    c1 = next(r for r in second.values() if r.notebook == "40" and r.params["overrides"]["train.control"])
    assert c1.name == "p-C1" and c1.params["teacher_run"].endswith("30_teacher_fitting/p")
    # a notebook-40 run "p" with another config (here λ = 1) is left alone: C1 gets its own run
    _finished(tmp_path, "40", "p", {**c1.params, "overrides": {**c1.params["overrides"],
                                                               "train.dm_weight": 1.0}})
    assert "p-C1" in {r.name for r in arms.plan(cfg, "smoke", "p", tmp_path, a_dir)}
    (tmp_path / arms.NOTEBOOKS["40"] / "p" / "config.json").unlink()
    (tmp_path / arms.NOTEBOOKS["40"] / "p" / "summary.json").unlink()
    # … and one with C1's config serves as C1 and C0, read back by collect
    _finished(tmp_path, "40", "p", c1.params)
    third = arms.plan(cfg, "smoke", "p", tmp_path, a_dir)
    c0_gen = next(r for r in third if r.name == "p-C0-g0")
    assert c0_gen.params["joint_run"].endswith("40_joint_dm_training/p") and c0_gen.needs == ("p",)
    assert arms._sources(cfg, "p", tmp_path, a_dir)["C1"][0].name == "p"


def test_random_encoder_stage1_runs_start_from_a_s_finished_reference_encoder_fits(tmp_path):
    a_dir = _stage1(tmp_path)
    for tag in ("ssl", "supervised"):
        (a_dir / "ckpt" / tag).mkdir(parents=True)
        torch.save({"step": 5, "state": {}}, a_dir / "ckpt" / tag / "last.pt")
    planned = arms.plan(_study(**{"claim.random_arm": True}), "smoke", "p", tmp_path, a_dir)
    r = next(r for r in planned if r.name == "p-R")
    assert {rel for _, rel in r.prefill} == {"ckpt/ssl/last.pt", "ckpt/supervised/last.pt"}
    assert next(r for r in planned if r.name == "p-AE-stage1").prefill == r.prefill
    folder = tmp_path / "r"
    arms._prefill(r, folder)
    assert torch.load(folder / "ckpt" / "ssl" / "last.pt")["step"] == 5
    assert not list(folder.rglob("*.part"))
    # a started R run is never touched, and an R that changes the SSL fit gets nothing
    (folder / "ckpt" / "ssl" / "last.pt").unlink()
    (folder / "config.json").write_text("{}")
    arms._prefill(r, folder)
    assert not (folder / "ckpt" / "ssl" / "last.pt").exists()
    other = _study(**{"claim.tokenizer": {"encoder.ssl.steps": 7}})
    ae1 = next(r for r in arms.plan(other, "smoke", "q", tmp_path, a_dir) if r.name == "q-AE-stage1")
    assert ae1.prefill == ()


def test_plan_refuses_a_random_encoder_as_arm_a(tmp_path):
    a_dir = _stage1(tmp_path, **{"encoder.kind": "random", "train.align_global": 0.0})
    with pytest.raises(ValueError, match="arm A"):
        arms.plan(_study(), "smoke", "p", tmp_path, a_dir)


def test_check_rejects_bad_claim_settings_before_any_work():
    with pytest.raises(ValueError, match="curve.steps"):
        arms.check(_study(**{"claim.generation": {"curve.steps": [40]}}), "smoke")
    with pytest.raises(ConfigError):
        arms.check(_study(**{"claim.joint": {"train.stepz": 3}}), "smoke")
    with pytest.raises(ConfigError):
        _study(**{"claim.extra_weights": [10.0]})  # the same λ as C1
    with pytest.raises(ConfigError):
        _study(**{"claim.space": "inception"})
    arms.check(_study(), "smoke")


def _write(folder: Path, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))


def _curve(level: float, noise: float = 0.0) -> list[dict]:
    """A learning curve falling like step^-0.5 from `level`, in every space."""
    pts = []
    for s in (10, 20, 40):
        v = level * (s / 10) ** -0.5 * (1 + noise)
        pts.append({"tag": "curve", "step": s, "n": 100, **{f"fd_{k}": v for k in ("sup", "ssl", "pix")},
                    **{f"fd_{k}_recon": v / 2 for k in ("sup", "ssl", "pix")}})
    return pts


def _synthetic(root: Path, a_dir: Path, levels: dict, psnr: dict, drift: float, seeds=(0, 1, 2)) -> None:
    """summary.json files where notebooks 20, 40 and 60 would write them."""
    _write(a_dir, {"tokenizer": {"psnr": psnr["A"]}})
    joint = root / arms.NOTEBOOKS["40"]
    _write(joint / "p-C1", {"dm": {"psnr": psnr["C1"], "ref_fd": 1.0},
                            "control": {"psnr": psnr["C0"], "ref_fd": drift, "ref_fd_floor": 1.0}})
    _write(joint / "p-AE", {"dm": {"psnr": psnr["AE"]}})
    for arm, level in levels.items():
        for g in seeds:
            _write(root / arms.NOTEBOOKS["60"] / f"p-{arm}-g{g}",
                   {"curve": _curve(level, noise=0.01 * ((g * 7 + len(arm)) % 3 - 1)),
                    "latent_clustering": {"knn": 0.5}})


PSNR = {"A": 20.0, "C0": 24.0, "C1": 22.0, "AE": 25.0}


@pytest.mark.parametrize("levels,psnr,drift,outcome", [
    ({"AE": 2.0, "A": 1.0, "C0": 2.0, "C1": 1.0}, PSNR, 10.0, "supported"),
    ({"AE": 2.0, "A": 1.0, "C0": 1.0, "C1": 1.0}, PSNR, 10.0, "refuted"),
    ({"AE": 2.0, "A": 1.0, "C0": 2.0, "C1": 1.0}, {**PSNR, "C0": 20.5, "AE": 20.5}, 10.0, "gate failed"),
    ({"AE": 2.0, "A": 1.0, "C0": 2.0, "C1": 1.0}, PSNR, 1.5, "gate failed"),
    ({"AE": 2.0, "A": 1.0, "C0": 2.0, "C1": 1.0}, {**PSNR, "C1": 19.0}, 10.0, "unresolved"),
])
def test_collect_and_result_reach_every_outcome(tmp_path, levels, psnr, drift, outcome):
    a_dir = _stage1(tmp_path)
    cfg = _study(**{"claim.seeds": [0, 1, 2]})
    _synthetic(tmp_path, a_dir, levels, psnr, drift)
    data = arms.collect(cfg, "p", tmp_path, a_dir)
    assert data.psnr == psnr and data.drift_fd == drift and data.drift_floor == 1.0
    assert sorted(data.curves["C1"]) == [0, 1, 2]
    out = arms.result(cfg, data)
    assert out["outcome"] == outcome, out["reason"]
    assert out["space"] == "fd_sup" and set(out["other_spaces"]) == {"fd_ssl", "fd_pix", "fd_sup_recon",
                                                                     "fd_ssl_recon", "fd_pix_recon"}
    table = arms.table(cfg, data)
    assert list(table.index) == ["AE", "A", "C0", "C1"] and "(3)" in table.loc["C1", "fd_sup"]


def test_an_incomplete_study_is_unresolved_and_says_why(tmp_path):
    a_dir = _stage1(tmp_path)
    cfg = _study(**{"claim.seeds": [0, 1]})
    _synthetic(tmp_path, a_dir, {"AE": 2.0, "A": 1.0, "C0": 2.0}, PSNR, 10.0, seeds=(0, 1))
    out = arms.result(cfg, arms.collect(cfg, "p", tmp_path, a_dir))
    assert out["outcome"] == "unresolved" and "incomplete" in out["reason"] and "C1" in out["reason"]


def test_curve_bands_and_their_figure(tmp_path):
    a_dir = _stage1(tmp_path)
    cfg = _study(**{"claim.seeds": [0, 1, 2]})
    _synthetic(tmp_path, a_dir, {"AE": 2.0, "A": 1.0, "C0": 2.0, "C1": 1.0}, PSNR, 10.0)
    data = arms.collect(cfg, "p", tmp_path, a_dir)
    bands = {k: arms.curve_bands(data, k) for k in ("fd_sup", "fd_pix_recon")}
    b = bands["fd_sup"]["C1"]
    assert b["step"] == [10, 20, 40] and b["n"] == 3 and all(s > 0 for s in b["std"])
    assert b["mean"][0] == pytest.approx(1.0, rel=0.02)
    fig = viz.arm_curve_panels(bands, {"fd_sup": "sup"})
    assert len(fig.data) == 2 * 2 * 4  # band + line, per arm, per panel
    assert list(fig.layout.xaxis.tickvals) == [10, 20, 40], "ticked at the measured steps only"


def test_run_all_skips_what_needs_a_failed_run(tmp_path, monkeypatch):
    runs = [arms.Run("20", "p-R", {}), arms.Run("30", "p-teacher", {}), arms.Run("40", "p-AE", {}, ("p-R",)),
            arms.Run("60", "p-AE-g0", {}, ("p-AE",)), arms.Run("60", "p-A-g0", {})]

    def execute(nb, out_dir, params):
        if out_dir.name == "p-R":
            raise RuntimeError("boom\nsecond line")
        return "ran in 0 s"

    monkeypatch.setattr(pipeline, "execute", execute)
    out = {o.run.name: o for o in arms.run_all(runs, tmp_path, progress=False, log=lambda s: None)}
    assert out["p-R"].status == "failed" and "boom" in out["p-R"].error
    assert out["p-AE"].status == "not run" and out["p-AE-g0"].status == "not run"
    assert out["p-teacher"].status == out["p-A-g0"].status == "ran in 0 s"
    assert len(arms.failures(list(out.values()))) == 3


# --- the encoders of the arms ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    cfg = make_config("tokenizer", "smoke", {**TINY_TOK, "encoder.kind": "random", "train.align_global": 0.0})
    data = load_data(cfg, root / "cache")
    enc = tokenizer_stage.reference_encoders(cfg, data, None, "cpu", scores=False)
    return cfg, data, enc


def test_a_random_encoder_is_seeded_untrained_and_normalised(tiny):
    cfg, data, enc = tiny
    assert {"ssl", "random", "supervised"} <= set(enc)
    again = tokenizer_stage.random_encoder(cfg, data, "cpu")
    for (k, a), b in zip(enc["random"].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    seed1 = make_config("tokenizer", "smoke", {**TINY_TOK, "seed": 1, "encoder.kind": "random",
                                               "train.align_global": 0.0})
    other = tokenizer_stage.random_encoder(seed1, data, "cpu")
    assert not torch.equal(other.stem[0].weight, enc["random"].stem[0].weight)
    assert not torch.equal(enc["random"].stem[0].weight, enc["ssl"].stem[0].weight)
    with torch.no_grad():
        stem = enc["random"].stem[1](enc["random"].stem[0](to_float(data.train[0][:64])))
    assert stem.mean().abs() < 0.2 and 0.7 < stem.std() < 1.3  # BatchNorm calibrated on the data
    assert tokenizer_backbone(cfg, enc) is enc["random"]
    with pytest.raises(ConfigError, match="align"):
        make_config("tokenizer", "smoke", {"encoder.kind": "random", "train.align_global": 1.0})


def test_a_jointly_trained_encoder_is_saved_and_the_reference_encoders_are_not(tiny, tmp_path):
    cfg, data, enc = tiny
    tok = build_tokenizer(cfg, tokenizer_backbone(cfg, enc))
    trained = copy.deepcopy(tok)
    with torch.no_grad():
        for p in trained.encoder.parameters():
            p.add_(0.1)
    save_tokenizer(tmp_path / "plain.pt", cfg, trained, enc)
    save_tokenizer(tmp_path / "trained.pt", cfg, trained, enc, trained_encoder=True)
    plain, _, enc_plain = load_tokenizer(tmp_path / "plain.pt")
    loaded, _, enc_loaded = load_tokenizer(tmp_path / "trained.pt")
    x = to_float(data.val[:4])
    assert torch.allclose(loaded.encode_features(x), trained.encode_features(x), atol=1e-6)
    assert not torch.allclose(plain.encode_features(x), trained.encode_features(x), atol=1e-3)
    for name in ("ssl", "random", "supervised"):  # the metrics' feature spaces stay those of stage 1
        for a, b in zip(enc[name].state_dict().values(), enc_loaded[name].state_dict().values()):
            assert torch.equal(a, b)
    assert loaded.encoder.backbone is not enc_loaded["random"]
    assert plain.encoder.backbone is enc_plain["random"]
    assert math.isfinite(float(loaded.latent_scale))


def test_stage1_trains_a_from_scratch_encoder_and_leaves_the_reference_one_alone(tiny):
    """AE's stage 1 (`train.train_encoder`): L_rec reaches the encoder's weights (its BatchNorm statistics
    stay frozen); the reference random backbone, a feature space of the metrics, does not move."""
    _, data, enc = tiny
    cfg = make_config("tokenizer", "smoke", {**TINY_TOK, "encoder.kind": "random", "train.align_global": 0.0,
                                             "train.train_encoder": True})
    reference = copy.deepcopy(enc["random"].state_dict())
    tok = build_tokenizer(cfg, tokenizer_backbone(cfg, enc))
    assert tok.encoder.backbone is not enc["random"]
    start = copy.deepcopy(tok.encoder.state_dict())
    tok, _ = tokenizer_stage.train_tokenizer(cfg, tok, data, None, "cpu", progress=False)
    after = tok.encoder.state_dict()
    moved = [k for k, v in start.items() if not torch.equal(v, after[k])]
    assert any(k.endswith("weight") for k in moved)
    assert not any("running_" in k for k in moved)  # BatchNorm statistics frozen
    for k, v in reference.items():
        assert torch.equal(v, enc["random"].state_dict()[k]), k
    assert not tok.encoder.trainable
    with pytest.raises(ConfigError, match="train_encoder"):
        make_config("tokenizer", "smoke", {"train.train_encoder": True})  # the alignment's target would move
    with pytest.raises(ConfigError, match="train_encoder"):
        make_config("tokenizer", "smoke", {"encoder.kind": "timm", "train.align_global": 0.0,
                                           "train.train_encoder": True})


def test_the_pipeline_report_leads_with_the_claim_verdict(tmp_path):
    a_dir = _stage1(tmp_path)
    cfg = _study(**{"claim.seeds": [0, 1, 2]})
    _synthetic(tmp_path, a_dir, {"AE": 2.0, "A": 1.0, "C0": 2.0, "C1": 1.0}, PSNR, 10.0)
    data = arms.collect(cfg, "p", tmp_path, a_dir)
    study_dir = tmp_path / "70_reference_study" / "p"
    _write(study_dir, {"claim": arms.result(cfg, data), "table": arms.table(cfg, data).to_dict(),
                       "reduced": "one generator seed"})
    report = pipeline.write_report(tmp_path / "report.md", "p", "smoke",
                                   [("20_tokenizer_pretraining", "ran", a_dir), ("70_reference_study", "ran",
                                                                                 study_dir)])
    text = report.read_text()
    assert text.index("Headline") < text.index("## 20 · Tokenizer pretraining")
    assert "SUPPORTED" in text and "Reduced study: one generator seed" in text and "| C1 |" in text


def test_the_pipeline_refuses_a_misspelled_claim_override_before_any_run(tmp_path):
    nb = arms._notebook("20").parent / "70_reference_study.ipynb"
    params = {"preset": "smoke", "run_root": str(tmp_path), "overrides": {"claim.joint": {"train.stepz": 3}}}
    with pytest.raises(SystemExit, match="claim.joint"):
        pipeline.check_config(nb, params)
    pipeline.check_config(nb, {**params, "overrides": {"claim.joint": {"train.steps": 3}}})


def test_reduced_says_what_a_smaller_claim_study_leaves_out(monkeypatch):
    assert arms.reduced(make_config("study", "cpu"), "cpu") == ""
    note = arms.reduced(make_config("study", "cpu", {"claim.seeds": [0]}), "cpu")
    assert "1 generator seed(s) of 3" in note and "cannot resolve" in note and "λ =" not in note
    assert "--preset cpu --only 20 70" in note
    # a preset whose full study has an extra λ: leaving it out is named
    full = make_config("study", "cpu", {"claim.extra_weights": [1.0]})
    monkeypatch.setattr(arms, "make_config", lambda stage, preset, overrides=None: full)
    note = arms.reduced(make_config("study", "cpu", {"claim.extra_weights": []}), "cpu")
    assert note.startswith("no C1 at λ = 1")
