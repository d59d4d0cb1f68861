"""The reference study's plan, parameters, collection, aggregation and verdict (no notebook executed here;
nbval runs notebook 70 at `smoke`, which executes notebooks 30, 40 and 60 through papermill)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dmvae_lib.configs import ConfigError, make_config
from dmvae_lib.configs.study import MAIN_JOB_V2
from dmvae_lib.viz import figures as viz
from dmvae_lib.workflow import pipeline, study


def _cfg(**overrides):
    return make_config("study", "cpu", overrides)


def test_cpu_plan_covers_every_reference_the_baseline_and_the_sweep_with_two_seeds():
    cfg = _cfg()
    cells = study.plan(cfg)
    assert len(cells) == 18 and len(set(cells)) == 18
    refs = {c.reference for c in cells if c.dm_weight == cfg.dm_weight}
    assert refs == {"ssl", "supervised", "gaussian", "gmm", "class_subset", "noise_states"}
    assert sorted(c.dm_weight for c in cells if c.reference == "ssl") == [1, 1, 10, 10, 100, 100]
    assert [c.seed for c in cells if c.dm_weight == 0] == [0, 1]
    # one teacher per reference; the baseline loads the first reference's teacher and never fits its own
    assert {study.teacher_of(cfg, c) for c in cells} == set(cfg.references)
    # cells of the first reference come first, its teacher is shared
    assert cells[0] == study.Cell("ssl", 10.0, 0)


def test_the_grid_can_include_the_text_reference(tmp_path):
    """Tab. 1's text row: a reference by name like the others (its own teacher, its cells, its notebook-30
    parameters), checked against the notebooks before any work."""
    cfg = _cfg(references=[*make_config("study", "cpu").references, "text"])
    cells = study.plan(cfg)
    text_cells = [c for c in cells if c.reference == "text"]
    assert text_cells == [study.Cell("text", cfg.dm_weight, s) for s in cfg.seeds]
    assert "text" in {study.teacher_of(cfg, c) for c in cells}
    tok = tmp_path / "20_tokenizer_pretraining" / "x"
    assert study.cell_params(cfg, "cpu", "st", tmp_path, tok, reference="text")["30"]["reference"] == "text"
    p = study.cell_params(cfg, "cpu", "st", tmp_path, tok, text_cells[0])
    assert p["40"]["teacher_run"].endswith("st-teacher-text")
    study.check(cfg, "cpu")


def test_sweep_weight_equal_to_dm_weight_is_not_run_twice():
    cells = study.plan(_cfg(sweep_weights=[10.0, 100.0], seeds=[3]))
    assert [(c.reference, c.dm_weight) for c in cells].count(("ssl", 10.0)) == 1


def test_cell_parameters_wire_the_runs_by_path(tmp_path):
    cfg = _cfg()
    tok = tmp_path / "20_tokenizer_pretraining" / "x"
    t = study.cell_params(cfg, "cpu", "st", tmp_path, tok, reference="gmm")["30"]
    assert t["run_name"] == "st-teacher-gmm" and t["reference"] == "gmm" and t["tokenizer_run"] == str(tok)
    assert t["max_sw2_ratio"] == 0.0  # a poor teacher is a result of the study, not a failed cell
    p = study.cell_params(cfg, "cpu", "st", tmp_path, tok, study.Cell("none", 0.0, 1))
    assert p["40"]["teacher_run"] == str(tmp_path / "30_teacher_fitting" / "st-teacher-ssl")
    assert p["40"]["overrides"]["train.dm_weight"] == 0.0 and p["40"]["overrides"]["train.control"] is False
    assert p["60"]["joint_run"] == str(tmp_path / "40_joint_dm_training" / "st-none-l0-s1")
    assert p["40"]["seed"] == p["60"]["seed"] == 1
    study.check(cfg, "cpu")  # every notebook declares these parameters; every override is a config key


def test_bad_study_configs_fail_before_any_work():
    with pytest.raises(ConfigError, match="references"):
        _cfg(references=["ssl", "imagenet"])
    with pytest.raises(ConfigError, match="sweep_reference"):
        _cfg(references=["gaussian"])
    with pytest.raises(ConfigError, match="seeds"):
        _cfg(seeds=[1, 1])
    with pytest.raises(ConfigError, match="sweep_weights"):
        _cfg(sweep_weights=[0.0])
    with pytest.raises(ConfigError, match="train.stepz"):
        study.check(_cfg(joint={"train.stepz": 3}), "cpu")


def test_overrides_of_a_mapping_field_merge_into_the_preset():
    cfg = _cfg(generation={"fit.steps": 7})
    assert cfg.generation["fit.steps"] == 7 and cfg.generation["sample.n"] == 1000


def _fake_result(tmp_path: Path, cell: study.Cell, gen_fd: float, psnr: float, status="ran") -> study.Result:
    j, g = tmp_path / "40" / cell.name("p"), tmp_path / "60" / cell.name("p")
    t = tmp_path / "30" / cell.reference
    for d in (j, g, t):
        d.mkdir(parents=True, exist_ok=True)
    (t / "summary.json").write_text(json.dumps({"evaluation": {"sw2_ratio": 2.5}}))
    (j / "summary.json").write_text(json.dumps({"dm": {"psnr": psnr, "ssim": 0.5, "ref_fd": 1.0}}))
    (g / "summary.json").write_text(json.dumps({
        "metrics": {"fd_ssl": {"value": gen_fd}, "rfd_ssl": {"value": 0.2}, "fd_ssl_floor": {"value": 0.01}},
        "latent_clustering": {"knn": 0.3, "silhouette": 0.01}, "latent_fit": {"fd_ratio": 2.0}}))
    return study.Result(cell, cell.reference, {"30": t, "40": j, "60": g}, status=status, seconds=60.0)


def test_collect_aggregate_and_verdict(tmp_path):
    results = [
        _fake_result(tmp_path, study.Cell("ssl", 10.0, 0), 1.0, 22.0),
        _fake_result(tmp_path, study.Cell("ssl", 10.0, 1), 1.2, 22.2),
        _fake_result(tmp_path, study.Cell("gaussian", 10.0, 0), 2.0, 21.0),
        _fake_result(tmp_path, study.Cell("gaussian", 10.0, 1), 2.4, 21.0),
        _fake_result(tmp_path, study.Cell("none", 0.0, 0), 1.5, 23.0),
        study.Result(study.Cell("none", 0.0, 1), "none", {}, status="failed", error="boom"),
    ]
    table = study.collect(results)
    assert list(table["gen_fd_ssl"][:2]) == [1.0, 1.2] and math.isnan(table["gen_fd_ssl"].iloc[-1])
    # λ = 0
    assert table["teacher_sw2_ratio"].iloc[0] == 2.5 and math.isnan(table["teacher_sw2_ratio"].iloc[4])
    agg = study.aggregate(table)
    assert list(agg.index) == ["ssl · λ = 10", "gaussian · λ = 10", "λ = 0 (no DM)"]
    assert agg.loc["ssl · λ = 10", ("mean", "gen_fd_ssl")] == pytest.approx(1.1)
    assert agg.loc["ssl · λ = 10", ("std", "gen_fd_ssl")] == pytest.approx(math.sqrt(0.02))
    assert agg.loc["λ = 0 (no DM)", ("n", "gen_fd_ssl")] == 1  # the failed seed does not count
    text = study.formatted(agg)
    assert text.loc["ssl · λ = 10", "gen_fd_ssl"] == "1.100 ± 0.141 (2)"
    assert text.loc["λ = 0 (no DM)", "gen_fd_ssl"] == "1.500 (1)"
    v = study.verdict(agg)
    assert v["best"] == "ssl · λ = 10" and v["reference_is_best"] and v["runner_up"] == "λ = 0 (no DM)"
    assert v["gap"] == pytest.approx(0.4) and v["gap_exceeds_spread"]
    assert study.verdict(agg, metric="psnr")["best"] == "λ = 0 (no DM)"  # higher PSNR is better
    assert study.failures(results) == ["-none-l0-s1: boom"]
    fig = viz.condition_panels(study.panel_points(table, list(agg.index)), {"gen_fd_ssl": "gen FD"})
    assert len(fig.data) == 2 * len(study.METRICS)


def test_verdict_reports_a_lead_smaller_than_the_spread(tmp_path):
    table = pd.DataFrame([{"condition": c, "status": "ran", **{m: 0.0 for m in study.METRICS},
                           "gen_fd_ssl": v}
                          for c, v in (("ssl · λ = 10", 1.0), ("ssl · λ = 10", 2.0), ("gmm · λ = 10", 1.6),
                                       ("gmm · λ = 10", 1.7))])
    v = study.verdict(study.aggregate(table))
    assert v["best"] == "ssl · λ = 10" and v["gap"] == pytest.approx(0.15) and not v["gap_exceeds_spread"]


def test_the_whole_pipeline_runs_the_claim_study_reduced_and_the_users_claim_keys_win():
    nbs = pipeline.notebooks()
    p71 = {nb: {"preset": "cpu"} for nb in nbs if nb.stem.startswith("71")}
    pipeline._main_job("cpu", p71)
    assert next(iter(p71.values()))["overrides"] == MAIN_JOB_V2["cpu"]  # the cpu rehearsal
    smoke = {nb: {"preset": "smoke"} for nb in nbs if nb.stem.startswith("71")}
    pipeline._main_job("smoke", smoke)  # no rehearsal entry: the preset's study, one joint seed
    assert next(iter(smoke.values()))["overrides"] == {"claim_v2.joint_seeds": [0]}
    assert any(nb.stem.startswith("70") for nb in nbs)
    mine = {"overrides": {"claim.space": "pix"}}
    params = {nb: {"preset": "cpu", **(mine if nb.stem.startswith("70") else {})} for nb in nbs}
    pipeline._main_job("cpu", params)
    p70 = next(v for nb, v in params.items() if nb.stem.startswith("70"))
    assert p70["overrides"] == {"claim.seeds": [0], "claim.extra_weights": [], "claim.space": "pix"}
    assert all("overrides" not in v for nb, v in params.items() if not nb.stem.startswith(("70", "71")))
    cfg = make_config("study", "cpu", p70["overrides"])
    assert cfg.claim.seeds == (0,) and cfg.claim.extra_weights == ()
    mine = {nb: {"overrides": {"claim.seeds": [3, 4]}} for nb in nbs if nb.stem.startswith("70")}
    pipeline._main_job("cpu", mine)
    assert next(iter(mine.values()))["overrides"]["claim.seeds"] == [3, 4]
