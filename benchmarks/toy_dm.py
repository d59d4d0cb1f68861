"""Benchmark: wall time and steps for the DM objective to bring 1,536 uniform points onto the S-shape.

Criterion: sliced-W2 to fresh reference samples <= 1.5 x the sampling noise floor (paper §3.3 toy).
The time counts the real-net fit plus the alignment steps up to the first crossing, re-run without
intermediate evaluations so that evaluation time is not counted.

    .venv/bin/python benchmarks/toy_dm.py [--preset cpu] [--seeds 0 1 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from dmvae_lib.configs import make_config
from dmvae_lib.stages import toy as toy_study


def one_seed(preset: str, seed: int, max_steps: int) -> dict:
    cfg = make_config("toy", preset, {"seed": seed, "objectives": ["dm"], "align.steps": max_steps,
                                       "align.snapshot_every": 25})
    device = torch.device("cpu")
    floor = toy_study.noise_floor(cfg)
    t0 = time.perf_counter()
    real_net, fit_stats = toy_study.fit_real_net(cfg, None, device, progress=False)
    fit_s = time.perf_counter() - t0
    probe = toy_study.align("dm", cfg, real_net, None, device, progress=False)
    # Candidates from the cheap 2-draw SW2 of the snapshots; each is re-run without intermediate evaluations
    # and confirmed with the full 10-draw SW2 before it counts.
    for crossing in [h["step"] for h in probe.history if h["step"] and h["sw2"] <= 1.5 * floor]:
        timed_cfg = make_config("toy", preset, {"seed": seed, "objectives": ["dm"], "align.steps": crossing,
                                                 "align.snapshot_every": crossing})
        res = toy_study.align("dm", timed_cfg, real_net, None, device, progress=False)
        if res.metrics["sw2"] <= 1.5 * floor:
            break
    else:
        return {"seed": seed, "floor": floor, "fit_s": fit_s, "crossing": None}
    align_s = res.metrics["seconds"]  # the training loop only (one snapshot, at the end)
    return {"seed": seed, "floor": floor, "fit_s": fit_s, "fit_steps": cfg.fit.steps, "crossing": crossing,
            "align_s": align_s, "sw2_at_crossing": res.metrics["sw2"], "total_s": fit_s + align_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, fp32")
    print(f"{'seed':>4} {'floor':>7} {'fit s':>6} {'steps':>6} {'align s':>8} {'SW2':>7} {'SW2/floor':>9} "
          f"{'total s':>8}")
    for seed in args.seeds:
        r = one_seed(args.preset, seed, args.max_steps)
        if r["crossing"] is None:
            print(f"{seed:>4} {r['floor']:7.4f} {r['fit_s']:6.1f}  did not reach 1.5x floor in "
                  f"{args.max_steps} steps")
            continue
        print(f"{seed:>4} {r['floor']:7.4f} {r['fit_s']:6.1f} {r['crossing']:6d} {r['align_s']:8.1f} "
              f"{r['sw2_at_crossing']:7.4f} {r['sw2_at_crossing'] / r['floor']:9.2f} {r['total_s']:8.1f}")


if __name__ == "__main__":
    main()
