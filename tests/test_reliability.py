"""Runs that cannot be corrupted (issue 14).

Every refusal names the thing and leaves every existing file as it was. None of these tests executes a
notebook: each refusal happens before a kernel starts (the by-hand notebook run that does execute one is in
test_pipeline.py, marked slow).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dmvae_lib.configs import ConfigError, from_dict, make_config
from dmvae_lib.runtime.runs import RunDir, RunError, RunLockedError, load_checkpoint
from dmvae_lib.train.loop import NonFiniteError, train
from dmvae_lib.train.phases import apply_update, disc_step, flow_matching_step, update
from dmvae_lib.workflow import pipeline, run_notebook
from dmvae_lib.workflow.session import config_record, resolve_config

REPO = Path(__file__).resolve().parents[1]
TOY = pipeline.NOTEBOOK_DIR / "10_toy_gradient_fields.ipynb"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_unchanged(root: Path, before: dict[str, bytes]) -> None:
    after = snapshot(root)
    assert after == before, (sorted(set(after) ^ set(before))
                             or [k for k in after if after[k] != before.get(k)])


def _hold(folder: Path) -> subprocess.Popen:
    """A process that holds the lock of `folder` until killed."""
    code = ("import sys, time\nfrom dmvae_lib.runtime.runs import FolderLock\n"
            "lock = FolderLock.acquire(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _finished_toy_run(root: Path, name: str, params: dict) -> Path:
    """A finished notebook-10 run folder as a kernel leaves it (config.json, summary.json, executed.ipynb)."""
    record = pipeline.requested_record(TOY, params)
    run = RunDir.create(root, TOY.stem, name, record)
    run.write_summary({"preset": params["preset"], "done": True})
    (run.path / "executed.ipynb").write_text(json.dumps({"cells": [], "metadata": {"papermill": {}}}))
    return run.path


# ------------------------------------------------------------------- 1: one process per run folder

CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
from dmvae_lib.train.loop import train
from dmvae_lib.workflow.session import start

print("ready", flush=True)
sys.stdin.readline()  # imports done; go
s = start("toy", "10_toy_gradient_fields", "smoke", run_root=sys.argv[1], run_name="r", device="cpu")
net = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
ran = []

def step(k):
    ran.append(k)
    time.sleep(0.02)
    opt.zero_grad()
    loss = (net(torch.ones(1, 3)) - 1).pow(2).sum()
    loss.backward()
    opt.step()
    return {"loss": float(loss)}

train(step, max_steps=60, state={"net": net, "opt": opt}, run=s.run, tag="t", log_every=1, ckpt_every=1,
      progress=False)
print("first step", ran[0] if ran else None, flush=True)
"""


def _child(root: Path) -> subprocess.Popen:
    """A process that, once its imports are done and it is told to go, trains run `r` (60 steps of 20 ms)."""
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def _go(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-2000:]
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_a_second_process_on_a_run_is_refused_and_a_killed_one_resumes(tmp_path):
    folder = tmp_path / "10_toy_gradient_fields" / "r"
    first, second, third = _child(tmp_path), _child(tmp_path), _child(tmp_path)  # import side by side
    try:
        _go(first)
        deadline = time.monotonic() + 60
        while not (folder / "ckpt" / "t" / "last.pt").exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first process wrote no checkpoint within 60 s"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # frozen, still holding the lock: the folder must not change now
        before = snapshot(folder)
        t0 = time.monotonic()
        _go(second)
        _, err = second.communicate(timeout=60)
        assert second.returncode != 0 and time.monotonic() - t0 < 10
        assert ("RunLockedError" in err
                and f"{folder} is in use by another process (PID {first.pid}" in err), err[-2000:]
        assert_unchanged(folder, before)
    finally:
        os.kill(first.pid, signal.SIGKILL)  # no chance to clean up: the kernel drops its lock
        first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(folder / "ckpt" / "t" / "last.pt")["step"]
    assert 1 <= at_kill < 60
    _go(third)
    out, err = third.communicate(timeout=60)
    assert third.returncode == 0, err[-2000:]
    assert out.strip() == f"first step {at_kill}"  # resumed from the killed run's last checkpoint
    assert load_checkpoint(folder / "ckpt" / "t" / "last.pt")["step"] == 60


def test_one_process_reopens_its_own_run_and_a_refused_config_leaves_no_lock_file(tmp_path):
    a = RunDir.create(tmp_path, "nb", "r", {"x": 1})
    # the same process (a notebook re-running its setup cell)
    b = RunDir.create(tmp_path, "nb", "r", {"x": 1})
    assert a._lock is b._lock and (a.path / ".lock").read_text().strip() == str(os.getpid())
    other = tmp_path / "nb" / "s"
    RunDir.create(tmp_path, "nb", "s", {"x": 1})
    (other / ".lock").unlink()  # as a run made before locks existed
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match=f"{other} already holds a run with a different config"):
        RunDir.create(tmp_path, "nb", "s", {"x": 2})
    assert_unchanged(tmp_path, before)


def test_two_pipelines_on_one_name_the_second_is_refused(tmp_path):
    holder = _hold(tmp_path / "pipeline" / "g")
    try:
        before = snapshot(tmp_path)
        with pytest.raises(SystemExit, match=f"pipeline run 'g': .*pipeline/g is in use by another process "
                                             f"\\(PID {holder.pid}"):
            pipeline.run("smoke", "g", tmp_path, {}, only=["10"])
        assert_unchanged(tmp_path, before)
    finally:
        holder.kill()
        holder.wait()


def test_a_pipeline_refuses_a_stage_folder_that_a_notebook_holds(tmp_path):
    folder = tmp_path / TOY.stem / "g"
    RunDir.create(tmp_path, TOY.stem, "g", pipeline.requested_record(TOY, {"preset": "smoke"}))
    holder = _hold(folder)
    try:
        before = snapshot(tmp_path)
        with pytest.raises(SystemExit, match=f"{folder} is in use by another process \\(PID {holder.pid}"):
            pipeline.run("smoke", "g", tmp_path, {}, only=["10"])
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):  # the by-hand way too
            run_notebook.run_notebook(TOY, {"preset": "smoke", "run_name": "g", "run_root": str(tmp_path)})
        assert_unchanged(tmp_path, before)
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------- 2, 3: overrides checked up front

def test_a_misspelled_override_fails_before_the_name_is_claimed(tmp_path, capsys):
    with pytest.raises(SystemExit, match="10_toy_gradient_fields.ipynb: unknown config key 'align.stepz'"):
        pipeline.main(["--preset", "smoke", "--name", "g", "--run-root", str(tmp_path), "--only", "10", "-p",
                       "overrides", '{"align.stepz": 3}'])
    f = tmp_path / "p.yaml"
    f.write_text('preset: smoke\nname: g\nnotebooks:\n  "40": {overrides: {train.dm_wieght: 1.0}}\n')
    with pytest.raises(SystemExit, match="40_joint_dm_training.ipynb: unknown config key 'train.dm_wieght'"):
        pipeline.main(["--params", str(f), "--run-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="30_teacher_fitting.ipynb: reference.name 'gausian' unknown"):
        pipeline.run("smoke", "g", tmp_path, {}, only=["30"], per_notebook={"30": {"reference": "gausian"}})
    with pytest.raises(SystemExit, match="parameter 'seed' is int, got '1'"):
        pipeline.run("smoke", "g", tmp_path, {"seed": "1"}, only=["10"])
    with pytest.raises(SystemExit, match=r"overrides\['joint'\].*'train.stepz'"):
        pipeline.run("smoke", "g", tmp_path, {"overrides": {"joint": {"train.stepz": 3}}}, only=["70"])
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]  # no run name claimed, no stage folder


def test_float_fields_take_numeric_strings_as_yaml_1_1_reads_them_and_nothing_else(tmp_path):
    overrides = yaml.safe_load("{train.lr: 1e-4, train.weight_decay: 0}")
    assert overrides == {"train.lr": "1e-4", "train.weight_decay": 0}  # PyYAML: a string, and an int
    cfg = make_config("tokenizer", "smoke", overrides)
    assert cfg.train.lr == 1e-4 and type(cfg.train.weight_decay) is float
    for bad, words in [("fast", "expects float, got the string 'fast', which is not a finite number"),
                       ("nan", "expects float, got the string 'nan', which is not a finite number"),
                       (True, "expects float, got True"),
                       ([1e-4], "expects float")]:
        with pytest.raises(ConfigError, match=f"'train.lr' {words}"):
            make_config("tokenizer", "smoke", {"train.lr": bad})
    with pytest.raises(ConfigError, match="'train.steps' expects int, got 10.0"):
        make_config("tokenizer", "smoke", {"train.steps": 10.0})
    with pytest.raises(ConfigError, match="'net.dec_mult' expects int, got '2'"):
        make_config("tokenizer", "smoke", {"net.dec_mult": [1, "2"]})
    with pytest.raises(ConfigError, match=r"'sample.cfg_interval' expects a list of 2 items"):
        make_config("generation", "smoke", {"sample.cfg_interval": [0.1, 0.5, 0.9]})
    study = make_config("study", "smoke")
    with pytest.raises(ConfigError, match="'joint' expects a mapping, got 3"):  # from_dict: no fall-through
        from_dict(type(study), {"joint": 3})
    # the pipeline's YAML parameter file, end to end up to the config (no notebook runs)
    f = tmp_path / "p.yaml"
    f.write_text('notebooks:\n  "20": {overrides: {train.lr: 1e-4}}\n')
    params = {"preset": "smoke", **pipeline.load_params_file(f)["notebooks"]["20"]}
    record = pipeline.requested_record(pipeline.NOTEBOOK_DIR / "20_tokenizer_pretraining.ipynb", params)
    assert record["train"]["lr"] == 1e-4


# ------------------------------------------------------------------- 4: non-finite gradients

def _sqrt_state():
    w = torch.nn.Parameter(torch.zeros(3))  # d sqrt(w) / dw = inf at 0, while sqrt(0) = 0 is finite
    return w, torch.optim.SGD([w], lr=0.1)


def test_apply_update_drops_an_overflowing_gradient_and_reports_it():
    w, opt = _sqrt_state()
    norm = apply_update(w.sqrt().sum(), opt, [w], grad_clip=1.0)
    assert norm == float("inf") and torch.equal(w.detach(), torch.zeros(3))

    class Overflow(torch.nn.Module):  # a finite loss whose gradient overflows
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x, t, y=None):
            return x * 0 + self.w.sqrt().sum()

    net = Overflow()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    stats = flow_matching_step(net, opt, torch.randn(4, 2), gen)
    assert torch.isfinite(stats["fm_loss"]) and stats["nonfinite"] == 1
    assert torch.equal(net.w.detach(), torch.zeros(2))
    class OverflowDisc(Overflow):  # logits sqrt(w) = 0: a finite hinge loss, an infinite gradient
        def forward(self, x):
            return x.mean((1, 2, 3)) * 0 + self.w.sqrt().sum()

    disc = OverflowDisc()
    dopt = torch.optim.SGD(disc.parameters(), lr=0.1)
    d = disc_step(disc, dopt, torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), gen, bcr=0.0)
    assert d["nonfinite"] == 1 and not math.isfinite(d["d_grad_norm"]) and math.isfinite(d["d_loss"])


def test_a_nonfinite_gradient_is_a_nonfinite_step_in_the_loop(tmp_path):
    run = RunDir.create(tmp_path, "nb", "r", {})
    w, opt = _sqrt_state()
    holder = torch.nn.Module()
    holder.w = w

    def step(k):  # a finite loss at every step; `update` reports the overflow as the step's count
        loss = ((w - 1).pow(2).sum() if k != 3
                else (w - w.detach()).sqrt().sum())  # 0, with an infinite gradient
        return {"loss": loss.detach(), **update(loss, opt, [w], grad_clip=1.0)}

    state = {"w": holder, "opt": opt}
    with pytest.raises(NonFiniteError,
                       match=r"t: non-finite values at step 3 .*last good checkpoint: .*ckpt/t/last.pt"):
        train(step, max_steps=6, state=state, run=run, tag="t", ckpt_every=2, progress=False)
    assert load_checkpoint(run.ckpt_path("t"))["step"] == 2
    before = snapshot(tmp_path)
    # resumed from step 2: the same step fails, nothing written
    with pytest.raises(NonFiniteError, match="step 3"):
        train(step, max_steps=6, state=state, run=run, tag="t", ckpt_every=2, progress=False)
    assert_unchanged(tmp_path, before)
    w.data.zero_()
    kept = w.detach().clone()
    out = train(step, max_steps=6, state=state, run=run, tag="s", log_every=6, on_nonfinite="skip",
                progress=False)
    assert out["nonfinite"] == 0 and not torch.equal(w.detach(), kept)  # the finite steps did update
    assert [r["skipped"] for r in run.read_metrics() if r["tag"] == "s"] == [1]


# ------------------------------------------------------------------- 5, 6: by-hand runs and skipping

def test_a_finished_run_is_skipped_only_with_its_own_settings(tmp_path, capsys):
    folder = _finished_toy_run(tmp_path, "g", {"preset": "smoke", "seed": 0})
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit, match=f"{folder} already holds a finished run of 10_toy_gradient_fields "
                                         "with other settings \\(seed: recorded 0, requested 1\\)"):
        pipeline.main(["--preset", "smoke", "--name", "g", "--run-root", str(tmp_path), "--only", "10",
                       "-p", "seed", "1"])
    with pytest.raises(SystemExit, match="align.steps: recorded 300, requested 7"):  # the by-hand command
        run_notebook.main([str(TOY), "-p", "preset", "smoke", "-p", "run_name", "g", "-p", "run_root",
                           str(tmp_path), "-y", '{"overrides": {"align.steps": 7}}'])
    assert_unchanged(tmp_path, before)  # executed.ipynb included
    assert run_notebook.main([str(TOY), "-p", "preset", "smoke", "-p", "run_name", "g", "-p", "run_root",
                              str(tmp_path)]) == 0
    assert "skipped (already finished)" in capsys.readouterr().out
    assert_unchanged(tmp_path, before)
    # same settings: skipped, no kernel
    report = pipeline.run("smoke", "g", tmp_path, {"seed": 0}, only=["10"])
    assert "| 10_toy_gradient_fields | skipped (already finished)" in report.read_text()


def test_a_started_run_of_other_settings_is_refused_before_papermill_writes(tmp_path):
    record = pipeline.requested_record(TOY, {"preset": "smoke"})
    RunDir.create(tmp_path, TOY.stem, "h", record)._lock.release()
    (tmp_path / TOY.stem / "h" / "executed.ipynb").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match="already holds a started run .*"
                                       "preset: recorded 'smoke', requested 'cpu'"):
        run_notebook.run_notebook(TOY, {"preset": "cpu", "run_name": "h", "run_root": str(tmp_path)})
    assert_unchanged(tmp_path, before)


def test_upstream_folders_count_when_named(tmp_path):
    nb30 = pipeline.NOTEBOOK_DIR / "30_teacher_fitting.ipynb"
    params = {"preset": "smoke", "tokenizer_run": str(tmp_path / "tokA")}
    record = {**pipeline.requested_record(nb30, params), "tokenizer_run": str(tmp_path / "tokA")}
    RunDir.create(tmp_path, nb30.stem, "t", record).write_summary({})
    out = tmp_path / nb30.stem / "t"
    assert pipeline.check_stage_folder(nb30, out, params) is True
    # resolved by run name: not compared
    assert pipeline.check_stage_folder(nb30, out, {"preset": "smoke"}) is True
    with pytest.raises(RunError, match="tokenizer_run: recorded .*tokA', requested .*tokB'"):
        pipeline.check_stage_folder(nb30, out, {**params, "tokenizer_run": str(tmp_path / "tokB")})


def test_the_pipeline_knows_each_notebooks_config_stage():
    for nb in pipeline.notebooks():
        source = nb.with_suffix(".py").read_text()
        assert f'start("{pipeline.STAGE_OF[nb.stem[:2]]}", "{nb.stem}"' in source, nb.name
        for name, key in pipeline.CONFIG_PARAMS.get(nb.stem[:2], {}).items():
            assert f'"{key}": {name}' in source, (nb.name, name)


# ------------------------------------------------------------------- 7: ImageFolder with an embedded encoder

def test_imagefolder_with_an_embedded_encoder_is_rejected_up_front(tmp_path):
    imagefolder = {"data.source": "imagefolder", "data.root": str(tmp_path)}
    for kind in ("ssl", "supervised"):
        with pytest.raises(ConfigError, match=f"encoder.kind='{kind}' cannot train on "
                                              "data.source='imagefolder'.*use encoder.kind='timm'"):
            make_config("tokenizer", "smoke", {**imagefolder, "encoder.kind": kind})
    assert make_config("tokenizer", "smoke", {**imagefolder, "encoder.kind": "timm"}).encoder.kind == "timm"
    with pytest.raises(SystemExit, match="20_tokenizer_pretraining.ipynb: encoder.kind='ssl' cannot train"):
        pipeline.run("smoke", "g", tmp_path, {"overrides": imagefolder}, only=["20"])
    assert not any(tmp_path.iterdir())


def test_session_and_pipeline_build_the_same_record():
    cfg = resolve_config("toy", "smoke", {"align.steps": 7}, seed=2)
    want = json.loads(json.dumps(config_record("toy", "smoke", cfg)))
    assert pipeline.requested_record(TOY, {"preset": "smoke", "seed": 2,
                                           "overrides": {"align.steps": 7}}) == want
