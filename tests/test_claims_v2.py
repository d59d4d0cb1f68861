"""The claim study v2's verdicts (workflow/claims_v2.py): every outcome of every claim is reachable from
synthetic summaries, the gates fail on missing or non-finite numbers, and the t test is the one stated."""

import math

import pytest
from scipy import stats

from dmvae_lib.workflow import claims_v2

SEEDS = (0, 1, 2)


def _per_seed(value: float, spread: float = 0.01) -> dict:
    return {s: value + spread * (s - 1) for s in SEEDS}


def _inputs(gen=None, psnr=None, drift=10.0, aj_drift=1.5, floor=1.0):
    """C1 at score 1.0 and PSNR 20 dB; other arms from `gen` / `psnr` {arm: value} (defaults: equal to C1)."""
    gen = {"C1": 1.0, "C0": 1.0, "VA": 1.0, "AE": 1.0, "A_J": 1.0, **(gen or {})}
    psnr = {"C1": 20.0, "C0": 21.0, "VA": 20.0, "AE": 20.0, "A_J": 20.0, **(psnr or {})}
    scores = {a: _per_seed(v) for a, v in gen.items()}
    scores["C1"] = _per_seed(1.0, 0.0)  # the differences keep the other arm's small spread
    return (scores, {a: _per_seed(v, 0.02) for a, v in psnr.items()},
            {"C0": _per_seed(drift), "A_J": _per_seed(aj_drift)}, floor)


def _outcome(key, **kw):
    return claims_v2.verdicts(*_inputs(**kw))["claims"][key]["outcome"]


def test_paired_uses_the_one_sided_student_quantile():
    p = claims_v2.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}, 0.05, 0.95)
    assert p.n == 3 and p.mean == pytest.approx(2.0) and p.se == pytest.approx(1 / math.sqrt(3))
    assert p.t == pytest.approx(2.919986, abs=1e-5) == pytest.approx(stats.t.ppf(0.95, 2))
    assert p.above and not p.below  # 2 − 2.92 · 0.577 = 0.31 ≥ 0.05
    q = claims_v2.paired({0: 0.0, 1: 1.0, 2: 2.0}, {0: 0.0, 1: 0.0, 2: 0.0}, 0.05, 0.95)
    assert not q.above and not q.below  # 1 ± 1.69 straddles 0.05
    r = claims_v2.paired({0: -1.0, 1: -1.1, 2: -0.9, 3: math.nan}, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0},
                         0.05, 0.95)
    assert r.n == 3 and r.below and not r.above  # the non-finite pair is dropped
    one = claims_v2.paired({0: 5.0}, {0: 0.0}, 0.05, 0.95)
    assert one.n == 1 and math.isnan(one.se) and not one.above and not one.below


@pytest.mark.parametrize("key, other", [("drift", "C0"), ("alignment", "VA"), ("structure", "AE")])
def test_generation_claims_reach_every_outcome(key, other):
    assert _outcome(key, gen={other: 1.5}) == "supported"
    assert _outcome(key, gen={other: 1.0}) == "refuted"
    assert _outcome(key, gen={other: 1.05}) == "unresolved"  # the margin straddles the effect


def test_claim_2_needs_c1s_psnr_within_tolerance_of_vas():
    assert _outcome("alignment", gen={"VA": 1.5}, psnr={"VA": 20.4}) == "supported"
    assert _outcome("alignment", gen={"VA": 1.5}, psnr={"VA": 21.0}) == "unresolved"


def test_claim_4_reaches_every_outcome():
    assert _outcome("trade", psnr={"A_J": 19.0}) == "supported"  # C1 higher, A_J no better in generation
    trained = {"A_J": 21.0, "C0": 22.0}  # C0 still gains ≥ 0.5 dB over A_J: the gate passes
    assert _outcome("trade", psnr=trained, gen={"A_J": 0.5}) == "refuted"  # the version-1 pattern
    assert _outcome("trade", psnr=trained) == "unresolved"  # C1 lower, A_J not better
    assert _outcome("trade", psnr={"A_J": 19.0}, gen={"A_J": 0.5}) == "unresolved"  # each wins one


@pytest.mark.parametrize("floor", [math.nan, 0.0, -1.0, math.inf, None])
def test_a_missing_or_non_finite_floor_fails_the_drift_gate(floor):
    out = claims_v2.verdicts(*_inputs(gen={"C0": 1.5, "VA": 1.5, "AE": 1.5}, floor=floor))
    assert not out["gates"]["drift"]["passed"] and "floor" in out["gates"]["drift"]["reason"]
    assert out["claims"]["drift"]["outcome"] == out["claims"]["alignment"]["outcome"] == "gate failed"
    assert out["claims"]["structure"]["outcome"] == "supported"  # no gate of its own


def test_the_gates_name_themselves_and_only_their_claims_fail():
    out = claims_v2.verdicts(*_inputs(drift=2.0))
    assert out["gates"]["drift"]["ratio"] == pytest.approx(2.0) and "2.00×" in out["gates"]["drift"]["reason"]
    assert out["gates"]["drift"]["ratio_A_J"] == pytest.approx(1.5)
    assert {k for k, c in out["claims"].items() if c["outcome"] == "gate failed"} == {"drift", "alignment"}
    out = claims_v2.verdicts(*_inputs(psnr={"C0": 20.2}))
    assert not out["gates"]["reconstruction"]["passed"]
    assert {k for k, c in out["claims"].items() if c["outcome"] == "gate failed"} == {"trade"}
    nan_fd = _inputs()
    nan_fd[2]["C0"] = {s: math.nan for s in SEEDS}
    assert not claims_v2.verdicts(*nan_fd)["gates"]["drift"]["passed"]


def test_one_joint_seed_resolves_nothing_and_the_headline_needs_all_four():
    scores, psnr, drift, floor = _inputs(gen={"C0": 1.5, "VA": 1.5, "AE": 1.5}, psnr={"A_J": 19.0})
    out = claims_v2.verdicts(scores, psnr, drift, floor)
    assert {c["outcome"] for c in out["claims"].values()} == {"supported"}
    assert out["headline"] == "holds at this scale"
    first = lambda d: {a: {0: v[0]} for a, v in d.items()}  # noqa: E731
    one = claims_v2.verdicts(first(scores), first(psnr), first(drift), floor)
    assert {c["outcome"] for c in one["claims"].values()} == {"unresolved"}
    assert "one joint seed" in one["claims"]["drift"]["reason"] and "unresolved" in one["headline"]
