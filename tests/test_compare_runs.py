"""scripts/compare_runs.py: identical runs pass, any changed number, tensor or sample file is named."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "scripts" /
                                               "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def _run(root: Path, psnr: float, w: float, sample: int) -> Path:
    d = root / "20_tokenizer_pretraining" / "x"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"psnr": psnr, "seconds": psnr * 7, "curve": [{"fd": 1.0}]}))
    torch.save({"state": {"w": torch.tensor([w, 1.0])}}, d / "tokenizer.pt")
    np.savez(d / "samples.npz", arr_0=np.array([sample]))
    return root


def test_identical_runs_pass_and_every_kind_of_difference_is_reported(tmp_path, capsys):
    a, b = _run(tmp_path / "a", 20.0, 0.5, 1), _run(tmp_path / "b", 20.0, 0.5, 1)
    assert compare_runs.main([str(a), str(b)]) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    c = _run(tmp_path / "c", 20.5, 0.25, 2)  # timings differ too, and are not reported
    assert compare_runs.main([str(a), str(c), "--name", "x"]) == 1
    out = capsys.readouterr().out
    assert "summary psnr: 20.0 vs 20.5" in out and "tokenizer.pt [state.w] differs" in out
    assert "samples.npz: sha256" in out and "seconds" not in out and "3 DIFFERENCES" in out


def test_allow_new_lists_numbers_only_b_has_and_still_counts_lost_or_changed_ones(tmp_path, capsys):
    a, b = _run(tmp_path / "a", 20.0, 0.5, 1), _run(tmp_path / "b", 20.0, 0.5, 1)
    summary = b / "20_tokenizer_pretraining" / "x" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "probe": {"acc": 0.8}}))
    assert compare_runs.main([str(a), str(b)]) == 1  # strict by default
    assert "summary probe.acc: None vs 0.8" in capsys.readouterr().out
    assert compare_runs.main([str(a), str(b), "--allow-new"]) == 0
    assert "new in B: summary probe.acc = 0.8" in capsys.readouterr().out
    assert compare_runs.main([str(b), str(a), "--allow-new"]) == 1  # A's number missing in B still counts
    summary.write_text(json.dumps({"psnr": 21.0, "curve": [{"fd": 1.0}], "probe": {"acc": 0.8}}))
    assert compare_runs.main([str(a), str(b), "--allow-new"]) == 1
    assert "summary psnr: 20.0 vs 21.0" in capsys.readouterr().out
