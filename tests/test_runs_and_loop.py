import json
import os
import time

import pytest
import torch

from dmvae_lib.models.score_nets import ToyScoreMLP
from dmvae_lib.runtime import device
from dmvae_lib.runtime.runs import (
    STALE_TEMP_SECONDS,
    RunDir,
    RunError,
    atomic_write_bytes,
    load_checkpoint,
    load_state_strict,
    save_checkpoint,
)
from dmvae_lib.train.loop import NonFiniteError, train
from dmvae_lib.train.phases import flow_matching_step


def _make(tmp_path, name="r"):
    return RunDir.create(tmp_path, "nb", name, {"a": 1})


def test_rundir_reopens_same_config_and_refuses_a_different_one(tmp_path):
    run = _make(tmp_path)
    assert json.loads((run.path / "config.json").read_text())["config"] == {"a": 1}
    assert RunDir.create(tmp_path, "nb", "r", {"a": 1}).path == run.path
    with pytest.raises(RunError, match="different config"):
        RunDir.create(tmp_path, "nb", "r", {"a": 2})


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    net = ToyScoreMLP(width=8, depth=1)
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"model": net.state_dict()})
    other = ToyScoreMLP(width=8, depth=1)
    load_state_strict(other, load_checkpoint(path, required=("model",))["model"], str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(RunError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(RunError, match="lacks"):
        load_checkpoint(path, required=("ema",))
    with pytest.raises(RunError, match="do not fit"):
        load_state_strict(ToyScoreMLP(width=8, depth=2), load_checkpoint(path)["model"], str(path))
    with pytest.raises(RunError, match="do not fit"):
        load_state_strict(ToyScoreMLP(width=16, depth=1), load_checkpoint(path)["model"], str(path))
    truncated = tmp_path / "bad.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunError, match="unreadable"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(RunError, match="schema"):
        load_checkpoint(foreign)


def test_atomic_write_keeps_the_old_file_on_failure_and_removes_stale_temps(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write_bytes(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, fail)
    assert path.read_bytes() == b"old" and list(tmp_path.glob(".last.pt.tmp*")) == []
    stale, fresh = tmp_path / ".last.pt.tmp999991", tmp_path / ".last.pt.tmp999992"  # left by killed writers
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - STALE_TEMP_SECONDS - 5
    os.utime(stale, (old, old))
    atomic_write_bytes(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and not stale.exists() and fresh.exists()  # a recent one may be live


def _fit(run, max_steps, stop_at=None):
    torch.manual_seed(0)
    net = ToyScoreMLP(width=16, depth=1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def step(k):
        if stop_at is not None and k == stop_at:
            raise KeyboardInterrupt  # an interruption between two checkpoints
        return flow_matching_step(net, opt, torch.randn(32, 2, generator=gen) + 1, gen)

    train(step, max_steps=max_steps, state={"net": net, "opt": opt, "gen": gen}, run=run, tag="fit",
          log_every=5, ckpt_every=4, progress=False)
    return net


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    reference = _fit(RunDir.create(tmp_path, "nb", "straight", {}), 12)
    run = RunDir.create(tmp_path, "nb", "interrupted", {})
    with pytest.raises(KeyboardInterrupt):
        _fit(run, 12, stop_at=10)  # last checkpoint at step 8
    assert load_checkpoint(run.ckpt_path("fit"))["step"] == 8
    resumed = _fit(run, 12)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    steps = [r["step"] for r in run.read_metrics()]
    assert steps[-1] == 12


def test_nonfinite_step_raises_with_step_and_checkpoint_or_is_skipped(tmp_path):
    run = _make(tmp_path)
    calls = []

    def step(k):
        calls.append(k)
        return {"loss": 1.0, "nonfinite": int(k == 3)}

    with pytest.raises(NonFiniteError, match="step 3.*last good checkpoint: .*last.pt"):
        train(step, max_steps=6, state={}, run=run, tag="t", ckpt_every=2, progress=False)
    out = train(step, max_steps=6, state={}, run=None, tag="t2", on_nonfinite="skip", progress=False)
    assert out["nonfinite"] == 0 and calls[-1] == 5


def test_bf16_runs_only_where_the_hardware_has_it(monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setenv("DMVAE_CPU_BF16", "1")
    assert device.effective_precision(cpu, "bf16") == "bf16"
    with device.autocast_ctx(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setenv("DMVAE_CPU_BF16", "0")  # off, whatever the hardware
    assert device.effective_precision(cpu, "bf16") == "fp32"
    monkeypatch.delenv("DMVAE_CPU_BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    device._warn_emulated.cache_clear()  # warned once per process and device
    assert device.effective_precision(cpu, "bf16") == "fp32" == device.effective_precision(cpu, "fp32")
    with device.autocast_ctx(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert "no native bf16: running fp32" in capsys.readouterr().out
    with pytest.raises(ValueError, match="precision"):
        device.effective_precision(cpu, "fp16")
