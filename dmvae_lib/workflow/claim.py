"""The pre-registered test of DMVAE's claim at the embedded scale: pilot gates, then a verdict by code.

The arms (paper Tab. 1–2): AE, a trainable from-scratch encoder (the VAE baseline); A, stage 1 on the frozen
SSL encoder (the reference itself); C0, A with the encoder trainable and λ = 0 (free to drift); C1, the same
with λ·L_DM toward the SSL teacher. The claim: C1 keeps the SSL structure while it gains reconstruction, so
its latents generate better than C0's and AE's, at a PSNR above A's.

Each arm's generator is scored at several training steps (a learning curve), once per generator seed, and a
curve is summarised by its mean log-FD over log-steps (`curve_score`: the normalised area under log FD; a
difference of 0.05 is a ≈ 5 % lower FD all along the curve). Arms are compared seed by seed (the same seeds
for every arm): d_s = score(X, s) − score(C1, s) > 0 when C1 is better; with mean m and standard error se,

    C1 better than X, resolved:     m − z·se ≥ effect        (the improvement is at least `effect`)
    C1 no better than X, resolved:  m + z·se < effect        (any improvement is below `effect`)
    otherwise:                      not resolved by these seeds

Gates (checked first; a failed gate is the verdict, since ranking noise would say nothing):
    reconstruction to trade: max(PSNR(C0), PSNR(AE)) − PSNR(A) ≥ min_psnr_gain_db
    drift to resist:         FD(C0 latents, reference) ≥ min_drift_ratio × the reference's two-draw floor
Verdict: "gate failed"; "supported" when C1 is better than C0 and AE (resolved) and PSNR(C1) > PSNR(A);
"refuted" when C1 is resolved no better than C0; "unresolved" otherwise. The thresholds live in `Thresholds`
and are fixed before any result is seen; changing them after looking is what this module exists to prevent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

OUTCOMES = ("gate failed", "supported", "refuted", "unresolved")


@dataclass(frozen=True)
class Thresholds:
    min_psnr_gain_db: float = 1.5  # gate: what a trainable encoder must gain over A (else nothing to trade)
    min_drift_ratio: float = 3.0  # gate: C0's latent FD to the reference, in units of the two-draw floor
    effect: float = 0.05  # smallest difference in mean log-FD worth a verdict (≈ 5 % FD)
    z: float = 2.0  # standard errors a resolved difference must clear


def curve_score(steps: Sequence[float], fd: Sequence[float]) -> float:
    """Mean of log FD over log steps (trapezoid; area under the log-FD curve / its log-step width)."""
    steps, fd = np.asarray(steps, float), np.asarray(fd, float)
    if len(steps) < 2 or steps[0] <= 0 or not np.all(np.diff(steps) > 0):
        raise ValueError(f"a curve needs at least two increasing positive steps, got {list(steps)}")
    if not np.all(np.isfinite(fd) & (fd > 0)):
        raise ValueError(f"a curve needs finite positive FDs, got {list(fd)}")
    x, y = np.log(steps), np.log(fd)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


@dataclass(frozen=True)
class Comparison:
    other: str  # the arm C1 is compared with
    mean: float  # mean over seeds of score(other) − score(C1): > 0 when C1 generates better
    se: float  # its standard error (sample std / √n); nan for one seed
    n: int  # paired seeds
    better: bool  # C1 better than `other`, resolved
    no_better: bool  # C1 no better than `other`, resolved


def compare(c1: Mapping[int, float], other: Mapping[int, float], name: str, th: Thresholds) -> Comparison:
    """Paired comparison of curve scores {seed: score}; only seeds present in both count."""
    seeds = sorted(set(c1) & set(other))
    d = np.array([other[s] - c1[s] for s in seeds], float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    resolved = n > 1 and math.isfinite(se)
    return Comparison(name, mean, se, n, resolved and mean - th.z * se >= th.effect,
                      resolved and mean + th.z * se < th.effect)


def gates(psnr: Mapping[str, float], drift_fd: float, drift_floor: float, th: Thresholds) -> dict:
    """The two pilot gates: is there reconstruction to trade, and is there drift for DM to resist?"""
    gain = max(psnr.get("C0", -math.inf), psnr.get("AE", -math.inf)) - psnr["A"]
    # a missing, zero or non-finite floor (or FD) is no unit to measure drift in: the gate fails
    usable = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (drift_fd, drift_floor))
    ratio = drift_fd / drift_floor if usable and drift_floor > 0 else math.nan
    return {"psnr_gain_db": gain, "psnr_gate": gain >= th.min_psnr_gain_db,
            "drift_ratio": ratio, "drift_gate": math.isfinite(ratio) and ratio >= th.min_drift_ratio}


def verdict(scores: Mapping[str, Mapping[int, float]], psnr: Mapping[str, float], drift_fd: float,
            drift_floor: float, th: Thresholds = Thresholds()) -> dict:
    """The outcome and every number it rests on. `scores`: {arm: {generator seed: curve_score}}."""
    g = gates(psnr, drift_fd, drift_floor, th)
    out = {"thresholds": asdict(th), **g}
    if not (g["psnr_gate"] and g["drift_gate"]):
        checks = (("reconstruction", g["psnr_gate"]), ("drift", g["drift_gate"]))
        failed = [name for name, ok in checks if not ok]
        return {**out, "outcome": "gate failed", "reason": _gate_reason(failed, g, th)}
    vs = {arm: compare(scores["C1"], scores[arm], arm, th) for arm in ("C0", "AE") if arm in scores}
    out["comparisons"] = {arm: asdict(c) for arm, c in vs.items()}
    psnr_ok = psnr["C1"] > psnr["A"]
    better_than_both = len(vs) == 2 and all(c.better for c in vs.values())
    if "C0" in vs and vs["C0"].no_better:
        outcome, reason = "refuted", "C1 is no better than C0 at resolved spreads"
    elif better_than_both and psnr_ok:
        outcome, reason = "supported", "C1 generates better than C0 and AE, with PSNR above A's"
    else:
        outcome, reason = "unresolved", _unresolved_reason(vs, better_than_both, psnr_ok)
    return {**out, "outcome": outcome, "reason": reason}


def _gate_reason(failed: list[str], g: dict, th: Thresholds) -> str:
    parts = []
    if "reconstruction" in failed:
        parts.append(f"a trainable encoder gains only {g['psnr_gain_db']:.2f} dB over A "
                     f"(needs {th.min_psnr_gain_db}): no reconstruction to trade")
    if "drift" in failed and not math.isfinite(g["drift_ratio"]):
        parts.append("the drift FD or its two-draw floor is missing, zero or not finite: no unit to "
                     "measure drift in")
    elif "drift" in failed:
        parts.append(f"C0's latents sit only {g['drift_ratio']:.2f}× the floor from the reference "
                     f"(needs {th.min_drift_ratio}×): no drift for DM to resist")
    return "; ".join(parts)


def _unresolved_reason(vs: Mapping[str, Comparison], better_than_both: bool, psnr_ok: bool) -> str:
    nums = "; ".join(f"vs {c.other}: {c.mean:+.3f} ± {c.se:.3f} (n = {c.n})" for c in vs.values())
    head = ("C1 generates better than C0 and AE at resolved spreads" if better_than_both
            else "the seeds do not resolve C1 against C0 and AE")
    return f"{head} ({nums})" + ("" if psnr_ok else "; C1's PSNR is not above A's")
