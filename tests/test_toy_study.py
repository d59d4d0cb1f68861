import torch

from dmvae_lib.configs import make_config
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages import toy as toy_study

TINY = {"objectives": ["dm", "real_fm_input"], "fit.steps": 20, "fit.batch": 64, "align.steps": 10,
        "align.n_points": 64, "align.fake_batch": 32, "align.snapshot_every": 5, "eval.repeats": 2}


def test_align_records_snapshots_and_resumes_from_its_checkpoint(tmp_path):
    cfg = make_config("toy", "smoke", TINY)
    run = RunDir.create(tmp_path, "10", "r", {})
    real, _ = toy_study.fit_real_net(cfg, run, torch.device("cpu"), progress=False)
    res = toy_study.align("dm", cfg, real, run, torch.device("cpu"), progress=False)
    assert res.points.shape == (64, 2) and torch.isfinite(res.points).all()
    assert [s for s, _ in res.snapshots] == [0, 5, 10] and len(res.fake_states) == 3
    assert not torch.equal(res.snapshots[0][1], res.points), "the points did not move"
    # finished: loads, no steps
    again = toy_study.align("dm", cfg, real, run, torch.device("cpu"), progress=False)
    assert torch.equal(again.points, res.points) and [s for s, _ in again.snapshots] == [0, 5, 10]
    only_real = toy_study.align("real_fm_input", cfg, real, None, torch.device("cpu"), progress=False)
    assert only_real.fake_states == [] and toy_study.fake_net_at(only_real, 5, real) is real


def test_classify_verdicts():
    base = {"nonfinite_points": 0, "sw2": 0.03, "spread_ratio": 1.0, "coverage": 0.95}
    assert toy_study.classify(base, 0.025, 0.95) == "matched"
    assert toy_study.classify({**base, "sw2": 0.5, "spread_ratio": 0.02}, 0.025, 0.95) == "collapsed"
    assert toy_study.classify({**base, "sw2": 0.2, "coverage": 0.4}, 0.025, 0.95) == "mode-dropping"
    assert toy_study.classify({**base, "sw2": 0.9, "spread_ratio": 3.0}, 0.025, 0.95) == "expanded"
    assert toy_study.classify({**base, "sw2": float("nan")}, 0.025, 0.95) == "diverged"


def test_direction_fields_point_from_fake_toward_real_modes():
    # Analytic nets: real data at +1, fake at -1 (both N(m, 0.05 I)); DM should push every probe toward +x.
    from dmvae_lib.core import toy2d

    real = toy2d.gaussian_velocity(torch.tensor([1.0, 0.0]), 0.05)
    fake = toy2d.gaussian_velocity(torch.tensor([-1.0, 0.0]), 0.05)
    probes = toy2d.grid(5)
    fields = toy_study.direction_fields("dm", probes, real, fake, [0.3, 0.7], draws=8)
    assert fields.shape == (2, 25, 2) and (fields[..., 0] > 0).all()
