"""A training process killed with SIGKILL at an arbitrary moment resumes to the bit-identical final state.

The in-process resume test (test_runs_and_loop) interrupts with a Python exception between two steps; here the
kernel kills the process wherever it is (mid-step or mid-checkpoint-write), which is what a pre-empted GPU job
or an out-of-memory kill does. It works because checkpoints are written to a temp file and renamed
(`runs.atomic_write_bytes`): `last.pt` is always a whole earlier checkpoint, never a half-written one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmvae_lib.models.score_nets import ToyScoreMLP
from dmvae_lib.runtime.runs import RunDir, RunError, load_checkpoint
from dmvae_lib.train.loop import train
from dmvae_lib.train.phases import flow_matching_step

STEPS = 40
CHILD = f"""
import sys

import torch

torch.set_num_threads(1)
from dmvae_lib.configs import make_config, to_dict
from dmvae_lib.data.references import TensorReference
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.train.velocity import fit_velocity_net

cfg = make_config("teacher", "smoke", {{"fit.steps": {STEPS}, "fit.batch": 8, "fit.log_every": 1, "fit.ckpt_every": 1,
                                       "fit.warmup_steps": 5, "fit.precision": "fp32", "net.patch_size": 2}})
g = torch.Generator().manual_seed(0)
ref = TensorReference(torch.randn(32, 4, 4, 4, generator=g), torch.arange(32) % 3)
run = RunDir.create(sys.argv[1], "30_teacher_fitting", sys.argv[2], to_dict(cfg))
fit_velocity_net(cfg, ref, run, "cpu", progress=False)
"""


def _start(root: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), name], env=env, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])


def _finish(proc: subprocess.Popen, timeout: float = 60) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _assert_identical(a, b, where: str = "state") -> None:
    """torch.equal on every tensor of two nested checkpoint structures (dicts, lists, tuples, numbers)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigkilled_fit_resumes_to_the_uninterrupted_state(tmp_path):
    straight = _start(tmp_path, "straight")  # the reference run, alongside the one we kill
    victim = _start(tmp_path, "killed")
    last = tmp_path / "30_teacher_fitting" / "killed" / "ckpt" / "teacher" / "last.pt"
    deadline = time.monotonic() + 60
    while not last.exists():  # the first checkpoint (step 1) exists: the fit is under way
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child wrote no checkpoint within 60 s"
        time.sleep(0.005)
    time.sleep(0.05)  # a few steps later: mid-step or mid-write, wherever the child happens to be
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(last, required=("step", "state"))["step"]  # whole: renamed into place atomically
    assert 1 <= at_kill < STEPS, at_kill  # killed mid-run, not after the end

    _finish(_start(tmp_path, "killed"))  # resume from last.pt to the end
    _finish(straight)
    final = {name: load_checkpoint(tmp_path / "30_teacher_fitting" / name / "ckpt" / "teacher" / "last.pt")
             for name in ("straight", "killed")}
    assert final["straight"]["step"] == final["killed"]["step"] == STEPS
    _assert_identical(final["straight"]["state"], final["killed"]["state"])
    assert set(final["straight"]["state"]) == {"net", "opt", "sched", "ema", "gen"}
    assert final["straight"]["stats"] == final["killed"]["stats"]
    steps = [r["step"] for r in RunDir(tmp_path / "30_teacher_fitting" / "killed").read_metrics()]
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))  # steps after the last ckpt are redone


def test_truncated_last_checkpoint_stops_the_resume_naming_the_file(tmp_path):
    run = RunDir.create(tmp_path, "nb", "r", {})
    net = ToyScoreMLP(width=8, depth=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    state = {"net": net, "opt": opt, "gen": gen}

    def step(k):
        return flow_matching_step(net, opt, torch.randn(16, 2, generator=gen), gen)

    train(step, max_steps=2, state=state, run=run, tag="fit", progress=False)
    last = run.ckpt_path("fit")
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # e.g. a copy or a non-atomic writer cut off half-way
    with pytest.raises(RunError, match=rf"checkpoint {re.escape(str(last))} is unreadable"):
        train(step, max_steps=4, state=state, run=run, tag="fit", progress=False)
