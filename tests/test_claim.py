"""The pre-registered verdict on synthetic summaries: every outcome is reachable, gates come first."""

import math

import pytest

from dmvae_lib.workflow.claim import OUTCOMES, Thresholds, compare, curve_score, gates, verdict

PSNR = {"AE": 25.0, "A": 22.0, "C0": 24.5, "C1": 23.5}  # a trainable encoder gains 2.5 dB over A


def _scores(c1: float, c0: float, ae: float, noise: float = 0.01) -> dict:
    """Curve scores for seeds 0–2; C1's seed noise runs against the others', so pairs differ by ~2·noise."""
    jitter = {0: 0.0, 1: noise, 2: -noise}
    return {arm: {s: base + sign * j for s, j in jitter.items()}
            for arm, base, sign in (("C1", c1, 1), ("C0", c0, -1), ("AE", ae, -1), ("A", c1, -1))}


def test_curve_score_is_the_mean_log_fd_over_log_steps():
    assert curve_score([100, 200, 400, 800], [5.0] * 4) == pytest.approx(math.log(5.0))
    # FD halving with every doubling of steps: log FD is linear in log steps, the mean is its midpoint
    assert curve_score([100, 200, 400, 800], [8, 4, 2, 1]) == pytest.approx(math.log(8) / 2)
    with pytest.raises(ValueError, match="increasing"):
        curve_score([200, 100], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        curve_score([100, 200], [1, 0])


def test_paired_comparison_uses_common_seeds_and_the_standard_error():
    th = Thresholds()
    c = compare({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.2, 1: 1.25, 2: 1.15, 3: 9.0}, "C0", th)
    assert c.n == 3 and c.mean == pytest.approx(0.2) and c.better and not c.no_better
    one = compare({0: 1.0}, {0: 2.0}, "C0", th)
    assert math.isnan(one.se) and not one.better and not one.no_better, "one seed resolves nothing"


def test_gates_measure_the_trade_and_the_drift():
    g = gates(PSNR, drift_fd=10.0, drift_floor=2.0, th=Thresholds())
    assert g["psnr_gain_db"] == pytest.approx(3.0) and g["psnr_gate"]
    assert g["drift_ratio"] == pytest.approx(5.0) and g["drift_gate"]


@pytest.mark.parametrize("floor", [0.0, math.nan, math.inf, None])
def test_a_missing_zero_or_non_finite_floor_fails_the_drift_gate(floor):
    """Version 1 divided by the floor only when it was > 0 and else passed the gate (ratio ∞): fixed."""
    g = gates(PSNR, drift_fd=10.0, drift_floor=floor, th=Thresholds())
    assert not g["drift_gate"] and math.isnan(g["drift_ratio"])
    v = verdict(_scores(c1=1.0, c0=1.3, ae=1.4), PSNR, drift_fd=10.0, drift_floor=floor)
    assert v["outcome"] == "gate failed" and "not finite" in v["reason"]


@pytest.mark.parametrize("case, outcome", [
    ("no reconstruction gain", "gate failed"),
    ("no drift", "gate failed"),
    ("dm wins", "supported"),
    ("dm no better, resolved", "refuted"),
    ("spread too large", "unresolved"),
    ("dm wins but psnr below A", "unresolved"),
])
def test_every_outcome_is_reachable(case, outcome):
    psnr, drift, scores = dict(PSNR), 10.0, _scores(c1=1.0, c0=1.3, ae=1.4)
    if case == "no reconstruction gain":
        psnr.update(C0=22.5, AE=22.8)
    elif case == "no drift":
        drift = 4.0
    elif case == "dm no better, resolved":
        scores = _scores(c1=1.0, c0=1.0, ae=1.4)
    elif case == "spread too large":
        scores = _scores(c1=1.0, c0=1.1, ae=1.4, noise=0.3)
    elif case == "dm wins but psnr below A":
        psnr["C1"] = 21.0
    v = verdict(scores, psnr, drift_fd=drift, drift_floor=2.0)
    assert v["outcome"] == outcome and v["outcome"] in OUTCOMES
    assert v["reason"] and v["thresholds"] == Thresholds().__dict__
    if outcome == "gate failed":
        assert "comparisons" not in v, "a failed gate ranks nothing"


def test_the_unresolved_reason_says_which_half_is_missing():
    """Resolved generation with PSNR below A's is not told as unresolved seeds, and the reverse."""
    psnr = dict(PSNR, C1=21.0)
    v = verdict(_scores(c1=1.0, c0=1.3, ae=1.4), psnr, drift_fd=10.0, drift_floor=2.0)
    assert v["reason"].startswith("C1 generates better than C0 and AE at resolved spreads")
    assert v["reason"].endswith("C1's PSNR is not above A's")
    v = verdict(_scores(c1=1.0, c0=1.1, ae=1.4, noise=0.3), PSNR, drift_fd=10.0, drift_floor=2.0)
    assert v["reason"].startswith("the seeds do not resolve") and "PSNR" not in v["reason"]
