"""End-to-end: the pipeline command executes notebooks through papermill, then skips finished stages."""

import json

import pytest

from dmvae_lib import pipeline

# The smoke budgets (the notebook's asserts must hold), on the three objectives its asserts read.
TINY = {"objectives": ["dm", "fake_fm_target", "real_fm_target"], "eval.grid_n": 5, "eval.field_noise_draws": 4}


@pytest.mark.slow
def test_pipeline_runs_writes_artifacts_and_skips_on_rerun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline.run("smoke", "t", tmp_path, {"overrides": TINY}, only=["10"])
    run_dir = tmp_path / "10_toy_gradient_fields" / "t"
    for name in ["executed.ipynb", "config.json", "metrics.jsonl", "summary.json", "figures/fig3_point_clouds.html",
                 "ckpt/fit/last.pt", "ckpt/align/dm/last.pt"]:
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "config.json").read_text())["config"]["eval"]["grid_n"] == 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objectives"]["fake_fm_target"]["spread_ratio"] < 0.1
    report = pipeline.run("smoke", "t", tmp_path, {"overrides": TINY}, only=["10"])
    assert "[skip] 10_toy_gradient_fields" in capsys.readouterr().out
    assert "skipped" in report.read_text()


def test_unknown_parameter_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="no parameter"):
        pipeline.run("smoke", "t", tmp_path, {"presett": 1}, only=["10"])
    assert not (tmp_path / "10_toy_gradient_fields").exists()
