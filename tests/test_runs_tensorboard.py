"""Optional TensorBoard logging in RunDir.log_metrics: off by default (no import), on by DMVAE_TENSORBOARD=1
or RunDir(tensorboard=True), a clear error when the package is missing."""

import pickle
import sys

import pytest

from dmvae_lib.runtime.runs import TENSORBOARD_ENV, RunDir

RECORDS = [{"tag": "teacher", "step": s, "skipped": 0, "fm_loss": 1.0 / s, "note": "text"} for s in (1, 2, 3)]


def _block_tensorboard(monkeypatch):
    """Make `import tensorboard` and `import torch.utils.tensorboard` fail, as without the package."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


def test_off_by_default_imports_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(TENSORBOARD_ENV, raising=False)
    _block_tensorboard(monkeypatch)  # any import attempt would raise
    run = RunDir.create(tmp_path, "nb", "r", {})
    for r in RECORDS:
        run.log_metrics(r)
    assert run.read_metrics() == RECORDS and not (run.path / "tensorboard").exists()
    monkeypatch.setenv(TENSORBOARD_ENV, "0")
    RunDir(run.path).log_metrics(RECORDS[0])
    monkeypatch.setenv(TENSORBOARD_ENV, "1")
    RunDir(run.path, tensorboard=False).log_metrics(RECORDS[0])  # the attribute wins over the variable


@pytest.mark.parametrize("how", ["env", "attribute"])
def test_enabled_without_the_package_says_how_to_install(tmp_path, monkeypatch, how):
    _block_tensorboard(monkeypatch)
    if how == "env":
        monkeypatch.setenv(TENSORBOARD_ENV, "1")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        RunDir.create(tmp_path, "nb", "r", {}, tensorboard=True if how == "attribute" else None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        RunDir(tmp_path, tensorboard=True).log_metrics(RECORDS[0])


def test_unknown_env_value_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(TENSORBOARD_ENV, "yes please")
    with pytest.raises(ValueError, match=f"{TENSORBOARD_ENV}='yes please'"):
        RunDir.create(tmp_path, "nb", "r", {})


@pytest.mark.parametrize("how", ["env", "attribute"])
def test_scalars_reach_tensorboard(tmp_path, monkeypatch, how):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv(TENSORBOARD_ENV, raising=False)
    if how == "env":
        monkeypatch.setenv(TENSORBOARD_ENV, "1")
    run = RunDir.create(tmp_path, "nb", "r", {}, tensorboard=True if how == "attribute" else None)
    for r in RECORDS:
        run.log_metrics(r)
    assert run.read_metrics() == RECORDS  # metrics.jsonl is unchanged
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["teacher/fm_loss", "teacher/skipped"]
    loss = events.Scalars("teacher/fm_loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert pickle.loads(pickle.dumps(run)).path == run.path  # the live writer is not pickled
