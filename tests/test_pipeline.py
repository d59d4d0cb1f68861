"""End-to-end: the pipeline command executes notebooks through papermill, then skips finished stages."""

import hashlib
import json
import re

import pytest

from dmvae_lib.metrics.evaluation import SamplingProtocol, protocol_record
from dmvae_lib.workflow import pipeline, run_notebook

# The smoke budgets (the notebook's asserts must hold), on the three objectives its asserts read.
TINY = {"objectives": ["dm", "fake_fm_target", "real_fm_target"], "eval.grid_n": 5,
        "eval.field_noise_draws": 4}


@pytest.mark.slow
def test_pipeline_runs_writes_artifacts_and_skips_on_rerun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline.run("smoke", "t", tmp_path, {"overrides": TINY}, only=["10"])
    run_dir = tmp_path / "10_toy_gradient_fields" / "t"
    for name in ["executed.ipynb", "config.json", "metrics.jsonl", "summary.json",
                 "figures/fig3_point_clouds.html", "ckpt/fit/last.pt", "ckpt/align/dm/last.pt"]:
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "config.json").read_text())["config"]["eval"]["grid_n"] == 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objectives"]["fake_fm_target"]["spread_ratio"] < 0.1
    report = pipeline.run("smoke", "t", tmp_path, {"overrides": TINY}, only=["10"])
    assert "[skip] 10_toy_gradient_fields" in capsys.readouterr().out
    assert re.search(r"\| skipped \(already finished\); ran \d+ s, ended \d{4}-\d\d-\d\d \d\d:\d\d UTC \|",
                     report.read_text())  # the earlier invocation's time is kept


def test_unknown_parameter_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="no parameter"):
        pipeline.run("smoke", "t", tmp_path, {"presett": 1}, only=["10"])
    assert not (tmp_path / "10_toy_gradient_fields").exists()


def test_parameter_file_is_strict(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("preset: smoke\nparams: {seed: 2}\nnotebooks:\n  40: {overrides: {train.dm_weight: 1.0}}\n")
    data = pipeline.load_params_file(f)
    assert data["params"] == {"seed": 2}
    assert data["notebooks"] == {"40": {"overrides": {"train.dm_weight": 1.0}}}
    f.write_text("preset: smoke\nparamz: {seed: 2}\n")
    with pytest.raises(SystemExit, match="unknown key.*paramz"):
        pipeline.load_params_file(f)
    f.write_text("params: [1, 2\n")
    with pytest.raises(SystemExit, match="cannot read parameter file"):
        pipeline.load_params_file(f)


def test_unknown_per_notebook_parameter_or_notebook_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="30_teacher_fitting.ipynb has no parameter"):
        pipeline.run("smoke", "t", tmp_path, {}, only=["30"], per_notebook={"30": {"referense": "gmm"}})
    with pytest.raises(SystemExit, match=r"\['99'\]"):
        pipeline.run("smoke", "t", tmp_path, {}, only=["30"], per_notebook={"99": {"seed": 1}})
    assert not any(tmp_path.iterdir())


def test_a_run_name_is_never_reused_with_other_settings(tmp_path):
    record = tmp_path / "pipeline" / "x" / "pipeline.json"
    pipeline._claim(record, {"preset": "cpu", "params": {}, "notebooks": {}})
    pipeline._claim(record, {"preset": "cpu", "params": {}, "notebooks": {}})  # same settings: resume
    with pytest.raises(SystemExit, match="already exists with other settings"):
        pipeline._claim(record, {"preset": "cpu", "params": {"seed": 1}, "notebooks": {}})
    with pytest.raises(SystemExit, match="already exists with other settings"):
        pipeline.main(["--preset", "smoke", "--name", "x", "--run-root", str(tmp_path), "--only", "10"])


def test_report_lists_numbers_with_their_labels_protocols_and_figures(tmp_path):
    d = tmp_path / "60_generation" / "r"
    (d / "figures").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"fit": {"fm_loss": 0.5}, "fd": 1.25,
                                                "fd_label": "SSL space (not FID)",
                                                "figures": ["figures/samples.png", "figures/samples.html"]}))
    samples = d / "samples.npz"
    samples.write_bytes(b"x")
    (d / "evaluation.json").write_text(json.dumps([{"metric": "fd_ssl", "value": 2.5, "feature_space": "SSL",
        "protocol": {"n_samples": 10, "sampler": "ode", "steps": 5, "cfg_scale": 1.0, "ema": True, "seed": 0,
                     "files": {"generator": {"path": "g.pt", "sha256": "abcdef0123456789"}}}},
        # as notebook 60
        {"metric": "inception", "available": False, "reason": "no Inception weights at /x.pth",
         "protocol": protocol_record(SamplingProtocol(10, "ode", 5, 1.0, (0.0, 1.0), True, 0),
                                     {"samples": samples, "inception_weights": None})}]))
    report = pipeline.write_report(tmp_path / "pipeline" / "r" / "report.md", "r", "cpu",
                                   [("60_generation", "ran in 3 s", d),
                                    ("70_reference_study", "failed", tmp_path / "none")])
    text = report.read_text()
    assert "| fit.fm_loss | 0.5 |" in text and "| fd [SSL space (not FID)] | 1.25 |" in text
    assert "| fd_ssl | 2.5 | SSL | 10 | ode × 5 | 1.0 | True | 0 | generator abcdef012345 |" in text
    sha = hashlib.sha256(b"x").hexdigest()[:12]
    assert f"| inception | not computed | — | 10 | ode × 5 | 1.0 | True | 0 | samples {sha} |" in text
    assert "`inception` not computed: no Inception weights at /x.pth" in text
    assert "![samples](../../60_generation/r/figures/samples.png)" in text and "samples.html" not in text
    assert "did not finish" in text


def test_unknown_preset_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--preset", "gpu", "--run-root", str(tmp_path), "--only", "10"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    f = tmp_path / "p.yaml"
    f.write_text("preset: laptop\n")
    with pytest.raises(SystemExit, match="unknown preset 'laptop'"):
        pipeline.main(["--params", str(f), "--run-root", str(tmp_path), "--only", "10"])
    with pytest.raises(SystemExit, match="--nproc must be at least 1"):
        pipeline.main(["--nproc", "0", "--run-root", str(tmp_path), "--only", "10"])
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


@pytest.mark.slow
def test_one_notebook_by_hand_runs_a_new_name_then_never_overwrites_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = pipeline.NOTEBOOK_DIR / "10_toy_gradient_fields.ipynb"
    argv = [str(nb), "-p", "preset", "smoke", "-p", "run_name", "new", "-p", "run_root", str(tmp_path),
            "-y", json.dumps({"overrides": TINY})]
    assert run_notebook.main(argv) == 0  # a new name: the folder is created
    run_dir = tmp_path / "10_toy_gradient_fields" / "new"
    assert (run_dir / "executed.ipynb").is_file() and (run_dir / "summary.json").is_file()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_notebook.main(argv) == 0
    assert "skipped (already finished)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"already holds a finished run .*\(seed: recorded 0, requested 1\)"):
        run_notebook.main(argv + ["-p", "seed", "1"])
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
