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
