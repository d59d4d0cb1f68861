"""Faults while writing a run (issue 25): a torn metrics line, a full disk, and CLI values that used to slip
through. Each test asserts that the error names the thing and that nothing written earlier changed."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from dmvae_lib.runtime import runs
from dmvae_lib.runtime.runs import RunDir, WriteError, load_checkpoint, save_checkpoint
from dmvae_lib.workflow import pipeline, run_notebook

NOTEBOOK_30 = pipeline.NOTEBOOK_DIR / "30_teacher_fitting.ipynb"


# --- a torn metrics.jsonl ---------------------------------------------------------------------------------
def _run_with_records(tmp_path: Path, n: int = 3) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for i in range(n):
        run.log_metrics({"tag": "teacher", "step": i, "loss": 1.0 / (i + 1)})
    return run


def test_a_torn_last_line_is_skipped_by_readers_with_a_warning_naming_the_file(tmp_path, caplog):
    run = _run_with_records(tmp_path)
    file = run.path / runs.METRICS
    with open(file, "a") as f:
        f.write('{"tag": "teacher", "st')  # a writer killed mid-append
    before = file.read_bytes()
    with caplog.at_level(logging.WARNING, logger="dmvae_lib.runtime.runs"):
        records = run.read_metrics()
    assert [r["step"] for r in records] == [0, 1, 2]
    assert str(file) in caplog.text and "incomplete last line" in caplog.text
    assert file.read_bytes() == before  # reading never rewrites


def test_the_next_append_moves_a_torn_line_aside_and_loses_no_record(tmp_path, caplog):
    run = _run_with_records(tmp_path)
    file = run.path / runs.METRICS
    with open(file, "a") as f:
        f.write('{"tag": "teacher", "st')
    with caplog.at_level(logging.WARNING, logger="dmvae_lib.runtime.runs"):
        run.log_metrics({"tag": "teacher", "step": 3, "loss": 0.25})
        run.log_metrics({"tag": "teacher", "step": 4, "loss": 0.2})
    assert caplog.text.count("incomplete last line") == 1  # said once, before the first append
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2, 3, 4]
    assert all(json.loads(line) for line in file.read_text().splitlines())  # every line is a record again
    assert (run.path / (runs.METRICS + runs.TORN_SUFFIX)).read_text() == '{"tag": "teacher", "st\n'


def test_a_complete_record_lacking_only_its_newline_is_kept(tmp_path):
    run = _run_with_records(tmp_path, 1)
    file = run.path / runs.METRICS
    with open(file, "a") as f:
        f.write('{"tag": "teacher", "step": 1}')
    run.log_metrics({"tag": "teacher", "step": 2})
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]
    assert not (run.path / (runs.METRICS + runs.TORN_SUFFIX)).exists()


def test_a_line_glued_by_older_code_is_skipped_and_named_by_number(tmp_path, caplog):
    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 0}\n{"tag": "t", "st{"step": 1}\n{"step": 2}\n')
    with caplog.at_level(logging.WARNING, logger="dmvae_lib.runtime.runs"):
        assert [r["step"] for r in runs.read_jsonl(file)] == [0, 2]
    assert "unreadable line 2" in caplog.text and str(file) in caplog.text


def test_a_file_holding_only_a_torn_line_is_emptied_then_appended_to(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / runs.METRICS).write_text('{"tag"')
    run.log_metrics({"tag": "t", "step": 0})
    assert run.read_metrics() == [{"tag": "t", "step": 0}]


# --- a full disk --------------------------------------------------------------------------------
class _FullAfter:
    """A file object that accepts `limit` bytes, then fails like a full disk."""

    def __init__(self, f, limit: int):
        self.f, self.written, self.limit = f, 0, limit

    def write(self, b):
        if self.written + len(b) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def disk_full_after(monkeypatch):
    """Make runs.py's file writes fail with ENOSPC after `limit` bytes (reads unchanged)."""
    real_open = open

    def arm(limit: int):
        def fake_open(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            return _FullAfter(f, limit) if any(c in mode for c in "wa") else f
        monkeypatch.setattr(runs, "open", fake_open, raising=False)
    return arm


def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous_one(tmp_path, disk_full_after):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"x": torch.arange(10)})
    before = path.read_bytes()
    disk_full_after(2000)
    with pytest.raises(WriteError) as exc:
        save_checkpoint(path, {"x": torch.randn(100_000)})
    assert str(path) in str(exc.value) and "No space left on device" in str(exc.value)
    assert exc.value.errno == errno.ENOSPC and isinstance(exc.value, OSError)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(10))


def test_torch_saves_unexpected_pos_without_an_oserror_reads_as_a_full_disk(tmp_path):
    path = tmp_path / "last.pt"

    def write(f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4608 vs 4496")
    with pytest.raises(WriteError, match="No space left on device") as exc:
        runs.atomic_write_bytes(path, write)
    assert str(path) in str(exc.value) and not path.exists()


def test_other_exceptions_of_a_writer_pass_unchanged(tmp_path):
    def write(f):
        raise ValueError("not a write failure")
    with pytest.raises(ValueError, match="not a write failure"):
        runs.atomic_write_bytes(tmp_path / "x", write)


def test_a_full_disk_during_a_metrics_append_names_the_file_and_keeps_earlier_records(tmp_path,
                                                                                       disk_full_after):
    run = _run_with_records(tmp_path)
    disk_full_after(10)
    with pytest.raises(WriteError) as exc:
        run.log_metrics({"tag": "teacher", "step": 3, "loss": 0.1})
    assert str(run.path / runs.METRICS) in str(exc.value)
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]


def test_artifact_writers_name_the_artifact_not_their_temp_file(tmp_path, monkeypatch):
    from dmvae_lib.metrics import evaluation

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/tmp/file")
    monkeypatch.setattr(evaluation.np, "savez", full)
    target = tmp_path / "samples.npz"
    with pytest.raises(WriteError) as exc:
        evaluation.save_adm_npz(target, torch.zeros(2, 4, 4, 3, dtype=torch.uint8))
    assert str(target) in str(exc.value) and "/some/tmp/file" not in str(exc.value)
    assert not target.exists() and os.listdir(tmp_path) == []


# --- CLI values --------------------------------------------------------------------------------
def test_run_notebook_refuses_an_unknown_device_before_writing_anything(tmp_path):
    with pytest.raises(SystemExit, match="parameter 'device'.*'gpu'"):
        run_notebook.run_notebook(NOTEBOOK_30, {"preset": "smoke", "device": "gpu", "run_name": "d",
                                                "run_root": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "mps"])
def test_devices_this_machine_lacks_are_refused_by_name(device):
    from dmvae_lib.runtime.device import resolve_device

    mps = getattr(torch.backends, "mps", None)
    available = {"cuda:7": torch.cuda.device_count() > 7, "mps": mps is not None and mps.is_available()}
    if available.get(device):
        pytest.skip(f"{device} exists here")
    with pytest.raises(ValueError, match=f"device='{device}'"):
        resolve_device(device)


def test_the_pipeline_names_a_parameter_whose_value_is_not_json(tmp_path, capsys):
    with pytest.raises(SystemExit, match="-p seed 'abc'.*must be JSON") as exc:
        pipeline.main(["--preset", "smoke", "--run-root", str(tmp_path), "-p", "seed", "abc"])
    assert "seed" in str(exc.value) and list(tmp_path.iterdir()) == []


def test_a_checkpoint_whose_tensor_bytes_changed_is_refused_by_name(tmp_path):
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, {"net": {"w": torch.randn(50_000)}})
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # inside the tensor record, not the zip directory
    path.write_bytes(bytes(data))
    with pytest.raises(runs.RunError, match="CRC-32") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)
