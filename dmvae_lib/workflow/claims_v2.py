"""The claim study, version 2: four claims, each read from paired joint seeds, one verdict each.

Version 1 (`workflow/claim.py`) gave one verdict over arms that did not share a protocol; version 2
(issue 23) fixes the design before any of its results exist. Every joint arm starts from the same stage 1,
runs one joint protocol and the same decoder refinement; only the named differences remain:

    A_J  frozen encoder, λ = 0                 C0  trainable encoder, λ = 0
    VA   trainable, stage 1's alignment on     C1  trainable, λ·L_DM toward the SSL teacher
    AE   from-scratch stage 1, trainable, λ = 0

A joint seed s sets every stream of the joint stage, and arms with the same s see the same batches, so each
comparison is paired. Generation: d_s = score(X, s) − score(C1, s), the difference of mean log-FD curve
scores (> 0 when C1 generates better). With mean m, standard error se = sd/√n and the one-sided 95 %
Student quantile t with n − 1 degrees of freedom:

    C1 better:     m − t·se ≥ effect          C1 no better:  m + t·se < effect

PSNR (after refinement): p_s = PSNR(C1, s) − PSNR(X, s); "C1 higher" when its mean − t·se ≥ psnr_effect_db,
"C1 not higher" when mean + t·se < psnr_effect_db. One seed resolves nothing (se undefined).

Gates, checked first: drift (C0's latent FD to the reference, mean over seeds, ≥ min_drift_ratio × the
reference's two-draw floor; a missing, zero or non-finite number fails it) for claims 1 and 2; reconstruction
to trade (mean PSNR(C0) − mean PSNR(A_J) ≥ min_psnr_trade_db) for claim 4. Claims:

    1 DM resists drift (C1 vs C0)                       supported: C1 better;  refuted: C1 no better
    2 DM beats point-wise alignment (C1 vs VA)          supported: C1 better and PSNR(C1) ≥ PSNR(VA) − tol
                                                        refuted: C1 no better
    3 a structured latent space generates better (vs AE) supported: C1 better;  refuted: C1 no better
    4 DM trades better than freezing (C1 vs A_J)         supported: C1 higher in PSNR and A_J not better
                                                        refuted: C1 not higher and A_J better in generation

Anything else is unresolved. The headline "holds at this scale" needs all four supported. `Thresholds` is
fixed with the design; a change is a new version under a new name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

OUTCOMES = ("supported", "refuted", "unresolved", "gate failed")
ARMS = ("A", "A_J", "C0", "VA", "C1", "AE")  # A: stage 1 only, reported beside, never compared
CLAIMS = {
    "drift": ("DM resists drift", "C0"),
    "alignment": ("distribution matching beats point-wise alignment", "VA"),
    "structure": ("a structured latent space generates better than an unstructured one", "AE"),
    "trade": ("DM trades better than freezing the SSL encoder", "A_J"),
}
GATED = {"drift": "drift", "alignment": "drift", "trade": "reconstruction"}  # claim -> the gate it needs


@dataclass(frozen=True)
class Thresholds:
    effect: float = 0.05  # smallest mean log-FD difference worth a verdict (≈ 5 % FD)
    psnr_effect_db: float = 0.2  # smallest PSNR difference worth a verdict
    psnr_tolerance_db: float = 0.5  # claim 2: how far C1's PSNR may sit below VA's
    min_drift_ratio: float = 3.0  # gate: C0's latent FD to the reference, in two-draw floors
    min_psnr_trade_db: float = 0.5  # gate: what a trainable encoder gains over A_J
    confidence: float = 0.95  # one-sided


@dataclass(frozen=True)
class Paired:
    """A paired difference over seeds, compared with `effect`."""

    mean: float
    se: float  # sample sd / √n; nan below two seeds
    n: int
    t: float  # the one-sided Student quantile used (nan below two seeds)
    above: bool  # mean − t·se ≥ effect: resolved above the effect
    below: bool  # mean + t·se < effect: resolved below it


def differences(x: Mapping[int, float], y: Mapping[int, float]) -> dict[int, float]:
    """{s: x[s] − y[s]} over the seeds both hold, non-finite pairs dropped."""
    d = {s: float(x[s] - y[s]) for s in sorted(set(x) & set(y))}
    return {s: v for s, v in d.items() if math.isfinite(v)}


def paired(x: Mapping[int, float], y: Mapping[int, float], effect: float, confidence: float) -> Paired:
    """d_s = x[s] − y[s] over the seeds both hold (non-finite pairs dropped), tested against `effect`."""
    d = np.array(list(differences(x, y).values()), float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return Paired(mean, math.nan, n, math.nan, False, False)
    se = float(d.std(ddof=1) / math.sqrt(n))
    t = float(stats.t.ppf(confidence, n - 1))
    return Paired(mean, se, n, t, mean - t * se >= effect, mean + t * se < effect)


def _mean(values: Mapping[int, float]) -> float:
    v = np.array([x for x in values.values() if math.isfinite(x)], float)
    return float(v.mean()) if len(v) else math.nan


def gates(psnr: Mapping[str, Mapping[int, float]], drift_fd: Mapping[str, Mapping[int, float]],
          drift_floor: float, th: Thresholds) -> dict:
    """The drift gate (C0; A_J's ratio beside it) and the reconstruction gate, each with its reason."""
    floor_ok = isinstance(drift_floor, (int, float)) and math.isfinite(drift_floor) and drift_floor > 0
    ratios = {arm: _mean(drift_fd.get(arm, {})) / drift_floor if floor_ok else math.nan
              for arm in ("C0", "A_J")}
    drift_ok = floor_ok and math.isfinite(ratios["C0"]) and ratios["C0"] >= th.min_drift_ratio
    if not floor_ok:
        drift_reason = f"the two-draw floor is {drift_floor!r}: no finite positive unit to measure drift in"
    elif not math.isfinite(ratios["C0"]):
        drift_reason = "C0's latent FD to the reference is missing or not finite"
    else:
        drift_reason = (f"C0's latents sit {ratios['C0']:.2f}× the floor from the reference "
                        f"(needs ≥ {th.min_drift_ratio}×)")
    gain = _mean(psnr.get("C0", {})) - _mean(psnr.get("A_J", {}))
    recon_ok = math.isfinite(gain) and gain >= th.min_psnr_trade_db
    recon_reason = (f"PSNR(C0) − PSNR(A_J) = {gain:.2f} dB (needs ≥ {th.min_psnr_trade_db} dB)"
                    if math.isfinite(gain) else "PSNR of C0 or A_J is missing or not finite")
    return {"drift": {"passed": drift_ok, "reason": drift_reason, "ratio": ratios["C0"],
                      "ratio_A_J": ratios["A_J"], "floor": drift_floor},
            "reconstruction": {"passed": recon_ok, "reason": recon_reason, "psnr_gain_db": gain}}


def _claim(key: str, gen: Paired, psnr_c1_x: Paired, psnr: Mapping[str, Mapping[int, float]],
           th: Thresholds) -> tuple[str, str]:
    """(outcome, reason) of one claim once its gate has passed."""
    other = CLAIMS[key][1]
    if key == "trade":
        aj_better = -gen.mean - gen.t * gen.se >= th.effect  # A_J's score resolved lower by `effect`
        if psnr_c1_x.above and not aj_better:
            return "supported", "C1's PSNR is resolved higher than A_J's and A_J does not generate better"
        if psnr_c1_x.below and aj_better:
            return "refuted", "C1's PSNR is not higher than A_J's and A_J generates better"
        return "unresolved", "the seeds resolve neither pattern"
    if gen.below:
        return "refuted", f"C1 generates no better than {other} (resolved)"
    if gen.above:
        if key != "alignment":
            return "supported", f"C1 generates better than {other} (resolved)"
        gap = _mean(psnr.get("C1", {})) - _mean(psnr.get("VA", {}))
        if gap >= -th.psnr_tolerance_db:
            return "supported", f"C1 generates better than VA at a PSNR {gap:+.2f} dB from VA's"
        return "unresolved", f"C1 generates better than VA but its PSNR is {gap:+.2f} dB from VA's"
    why = "one joint seed cannot resolve a difference" if gen.n < 2 else "the seeds do not resolve it"
    return "unresolved", why


def verdicts(scores: Mapping[str, Mapping[int, float]], psnr: Mapping[str, Mapping[int, float]],
             drift_fd: Mapping[str, Mapping[int, float]], drift_floor: float,
             th: Thresholds = Thresholds()) -> dict:
    """Gates, the four claims and the headline. `scores`, `psnr` (after refinement) and `drift_fd` (latent FD
    to the reference) map arm -> {joint seed: value}."""
    g = gates(psnr, drift_fd, drift_floor, th)
    claims = {}
    for key, (title, other) in CLAIMS.items():
        gen = paired(scores.get(other, {}), scores.get("C1", {}), th.effect, th.confidence)
        p = paired(psnr.get("C1", {}), psnr.get(other, {}), th.psnr_effect_db, th.confidence)
        gate = GATED.get(key)
        if gate and not g[gate]["passed"]:
            outcome, reason = "gate failed", f"{gate} gate: {g[gate]['reason']}"
        else:
            outcome, reason = _claim(key, gen, p, psnr, th)
        claims[key] = {"claim": title, "versus": other, "outcome": outcome, "reason": reason,
                       "generation": asdict(gen), "psnr": asdict(p),
                       "generation_by_seed": differences(scores.get(other, {}), scores.get("C1", {})),
                       "psnr_by_seed": differences(psnr.get("C1", {}), psnr.get(other, {}))}
    supported = all(c["outcome"] == "supported" for c in claims.values())
    headline = ("holds at this scale" if supported else
                "; ".join(f"{c['claim']}: {c['outcome']}" for c in claims.values()))
    return {"version": 2, "thresholds": asdict(th), "gates": g, "claims": claims, "headline": headline}
