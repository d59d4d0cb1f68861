# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 70 · Does distribution matching pay? The paper's arms, then (optionally) which reference
#
# > The paper's claim (§4, Tab. 1–2): a tokenizer whose encoder *trains* gains reconstruction and drifts
# > off the SSL structure; pulling its aggregate latents back onto the SSL reference with λ·L_DM keeps that
# > structure, so its latents are easier to generate than both the drifted and the unstructured ones, at a
# > reconstruction better than the frozen SSL tokenizer's. This notebook tests exactly that, with a verdict
# > computed by code from thresholds fixed before any result was seen.
#
# **The arms** (configs of notebooks 20, 30, 40 and 60; `dmvae_lib/workflow/arms.py`; AE is the paper's VAE
# baseline):
#
# | arm | tokenizer | encoder | DM |
# |---|---|---|---|
# | **A** | stage 1 (notebook 20), the reference itself | frozen SSL | – |
# | **C0** | A, jointly trained (notebook 40, the control) | trainable | λ = 0: free to drift |
# | **C1** | A, jointly trained (notebook 40) | trainable | λ = `claim.dm_weight` toward the SSL teacher |
# | **AE** | stage 1 with a *random* encoder trained from scratch, then jointly trained | trainable | λ = 0 |
#
# Every arm's generator (notebook 60) is fitted once per generator seed (the same seeds for every arm) and
# scored along a **learning curve**: FD of its samples to real images and to the arm's own reconstructions
# (the decoder's error cancelled), in three labelled feature spaces (none of them Inception, none FID): the
# supervised classifier's (the verdict's, pre-registered: not derived from the SSL encoder), the SSL
# encoder's, and 8×8 pixels. A curve measured at fit steps $s_1 < \dots < s_n$ is summarised by its mean
# log-FD over log-steps (`workflow.claim.curve_score`, trapezoid rule):
# $$\operatorname{score} = \frac{1}{\log s_n - \log s_1} \int_{\log s_1}^{\log s_n} \log \mathrm{FD}\;
# \mathrm d \log s.$$
#
# **Pilot gates, first.** A trainable encoder must gain ≥ 1.5 dB over A (else there is no reconstruction to
# trade) and C0's latents must drift ≥ 3× the reference's two-draw FD floor (else there is nothing for DM to
# resist):
# $$\max\big(\mathrm{PSNR}_{C0}, \mathrm{PSNR}_{AE}\big) - \mathrm{PSNR}_{A} \ge 1.5\ \text{dB},
# \qquad \frac{\mathrm{FD}(C0\ \text{latents}, \text{reference})}{\text{floor}} \ge 3.$$
# **Verdict** (`workflow.claim.verdict`): per generator seed $s$, $d_s = \operatorname{score}(X, s) -
# \operatorname{score}(C1, s)$ (> 0: C1 better than arm X), with mean $m$ and standard error
# $\mathrm{se}$ over the seeds. C1 is resolved better than X when $m - 2\,\mathrm{se} \ge 0.05$ and resolved
# no better when $m + 2\,\mathrm{se} < 0.05$. *Supported* when C1 is resolved better than C0 and AE with a
# PSNR above A's; *refuted* when C1 is resolved no better than C0; *unresolved* otherwise (always with one
# seed: no standard error).
#
# **What it needs.** A finished `20_tokenizer_pretraining` run (arm A). Time on a 2-core CPU: `smoke` ≈ 8
# min (every arm once, a few steps); `cpu`: see the README. One command: `python -m dmvae_lib --preset cpu
# --only 20 70 --name claim`. The main job runs it reduced (one generator seed, no extra λ; the summary says
# so). `grid=True` then also runs the six-reference grid of Tab. 1.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (this CPU) | "imagenet256" (GPU)
seed: int = 0  # the notebook's own seed; the arms' generator seeds are the config's `claim.seeds`
device: str = "auto"  # passed to every run's notebooks
run_root: str = ""  # "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; also the prefix of every run's name
tokenizer_run: str = ""  # a notebook-20 run folder (arm A); "" -> the run
                         # named run_name, else the newest at this preset
overrides: dict = {}  # e.g. {"claim.seeds": [0, 1, 2, 3], "claim.joint": {"train.steps": 2000},
                      # "grid": True, "references": ["ssl", "gaussian"]}

# %%
import pandas as pd
from IPython.display import Markdown, display

from dmvae_lib.viz import figures as viz
from dmvae_lib.workflow import arms, claim, study
from dmvae_lib.workflow.session import resolve_run_root, start, upstream_run

# %%
tok_dir = upstream_run("20_tokenizer_pretraining", "tokenizer.pt", path=tokenizer_run, run_name=run_name,
                       run_root=run_root, preset=preset, accept=arms.can_be_arm_a)
s = start("study", "70_reference_study", preset, {"tokenizer_run": str(tok_dir), **overrides}, seed=seed,
          run_root=run_root, run_name=run_name)
cfg, prefix, root = s.cfg, s.run.path.name, resolve_run_root(run_root)
print(f"arm A (stage 1): {tok_dir}\nrun: {s.run.path}")

# %% [markdown]
# ## 1 · The plan
# Every notebook execution, in order; each leaves its executed notebook, config, metrics, figures and
# checkpoints in its own run folder. Finished runs are skipped and interrupted ones resume.

# %%
arms.check(cfg, preset)
runs = arms.plan(cfg, preset, prefix, root, tok_dir, device)
pd.DataFrame([{"notebook": r.notebook, "run": r.name, "needs": ", ".join(r.needs)} for r in runs])

# %%
per_nb = pd.Series([r.notebook for r in runs]).value_counts().sort_index()
display(Markdown(
    f"**What to look for.** {len(runs)} executions: "
    + ", ".join(f"{n} of notebook {k}" for k, n in per_nb.items())
    + f". Every arm's chain ends in notebook 60, once per generator seed ({len(cfg.claim.seeds)}): the "
    "`needs` column is the order they run in."))

# %%
outcomes = arms.run_all(runs, root)
pd.DataFrame([{"run": o.run.name, "status": o.status, "minutes": round(o.seconds / 60, 1), "error": o.error}
              for o in outcomes])

# %%
status = pd.Series([o.status.split(" (")[0].split(" in ")[0] for o in outcomes]).value_counts()  # "ran", …
display(Markdown(
    "**What to look for.** " + ", ".join(f"{n} {k}" for k, n in status.items())
    + f", {sum(o.seconds for o in outcomes) / 60:.1f} min in all. *skipped* runs had finished before and "
    "are reused; any *failed* run stops the study at the check of §4, so read its `error` first."))

# %% [markdown]
# ## 2 · Pilot gates: is there reconstruction to trade, and drift to resist?

# %%
data = arms.collect(cfg, prefix, root, tok_dir)
out = arms.result(cfg, data)

# %%
th = claim.Thresholds()
gates = pd.DataFrame({"measured": [out.get("psnr_gain_db"), out.get("drift_ratio")],
                      "needed": [th.min_psnr_gain_db, th.min_drift_ratio],
                      "passes": [out.get("psnr_gate"), out.get("drift_gate")]},
                     index=["PSNR gain of a trainable encoder over A (dB)", "C0 drift: FD to ref. / floor"])
print(f"FD to the reference at the end of joint training: C0 {data.drift_fd:.3g}, C1 {data.c1_fd:.3g} "
      f"(two-draw floor {data.drift_floor:.3g})")
gates

# %%
passed = bool(out.get("psnr_gate")) and bool(out.get("drift_gate"))
display(Markdown(
    "**What to look for.** "
    + " ".join(f"{name}: {row['measured']:.3g} against {row['needed']:g} needed "
               f"({'passes' if row['passes'] else 'fails'})." for name, row in gates.dropna().iterrows())
    + (" Both gates pass: the verdict below tests DM." if passed else
       " With a failed or missing gate the verdict is that gate, whatever the curves show.")
    + f" DM's own pull: C1 ends at FD {data.c1_fd:.3g} to the reference against C0's {data.drift_fd:.3g} "
    f"({'closer' if data.c1_fd < data.drift_fd else 'no closer'})."))

# %% [markdown]
# ## 3 · Learning curves and the table
# Mean over generator seeds, band ± one sample standard deviation. The table gives each arm's val PSNR, the
# class structure of its latents (kNN accuracy, chance 0.10) and the curve score of every curve (mean log-FD
# over log-steps; lower is better) as mean ± std (seeds).

# %%
titles = {k: k.replace("fd_", "FD, ").replace("_recon", " → own reconstructions") for k in arms.keys(data)}
bands = {k: arms.curve_bands(data, k) for k in arms.keys(data)}
if bands:
    s.figures.save(viz.arm_curve_panels(bands, titles), "claim_curves")

# %%
summary_table = arms.table(cfg, data)
summary_table.to_csv(s.run.path / "claim_table.csv")
summary_table

# %%
if out["space"] in bands:
    last = {arm: b["mean"][-1] for arm, b in bands[out["space"]].items()}
    psnr_col = summary_table["val PSNR (dB)"].dropna()
    display(Markdown(
        f"**What to look for.** The verdict's curves are `{out['space']}`. At the last common step the mean "
        "FD per arm is " + ", ".join(f"{a} {v:.3g}" for a, v in last.items())
        + f": lowest {min(last, key=last.get)}, highest {max(last, key=last.get)}. In the table a lower "
        "curve score is better"
        + ("." if psnr_col.empty else f"; val PSNR, highest for {psnr_col.idxmax()} ({psnr_col.max():.2f} "
           "dB), is the reconstruction each arm keeps.")))

# %% [markdown]
# ## 4 · The verdict
# Computed by `workflow/claim.py` from the pre-registered space's FD to real images; the same test in every
# other space and distance is shown beside it, not instead of it.

# %%
print(f"VERDICT ({out['space']}): {out['outcome'].upper()}: {out['reason']}")
if arms.reduced(cfg, preset):
    print(f"Reduced study: {arms.reduced(cfg, preset)}")
for name, c in out.get("comparisons", {}).items():
    print(f"  C1 vs {name}: {c['mean']:+.3f} ± {c['se']:.3f} (mean ± standard error, n = {c['n']}; "
          "> 0: C1 better)")
pd.DataFrame(out["other_spaces"]).T

# %%
agree = sum(v["outcome"] == out["outcome"] for v in out["other_spaces"].values())
display(Markdown(
    " ".join([f"**What to look for.** The verdict is *{out['outcome']}*."]
             + [f"Against {n}, C1's curve score is {c['mean']:+.3f} (" + ("better" if c["mean"] > 0 else
                "not better") + f" on average) over {c['n']} seed(s); resolved needs mean − 2 se ≥ 0.05."
                for n, c in out.get("comparisons", {}).items()])
    + f" {agree} of the {len(out['other_spaces'])} other spaces and distances reach the same outcome: the "
    "fewer agree, the more the verdict depends on the space it was pre-registered in."))

# %%
bad = arms.failures(outcomes)
assert not bad, f"runs failed: {bad}"
assert out["outcome"] in claim.OUTCOMES
assert all(data.curves[a] for a in arms.PRIMARY), "an arm has no learning curve"

# %% [markdown]
# ## 5 · Optional: which reference? (paper Tab. 1, `grid=True`)
# Each reference gets a teacher (notebook 30) shared by its cells; each cell (reference, λ, seed) runs
# notebooks 40 and 60 from the shared stage-1 tokenizer, against the λ = 0 baseline. `teacher_sw2_ratio`
# shows how close each teacher came to its reference (SW2 over the two-draw floor): DM can only pull toward
# the teacher's model of it.

# %%
grid = {}
if cfg.grid:
    results = study.run_study(cfg, preset, prefix, root, tok_dir, device=device)
    cells = study.collect(results)
    cells.to_csv(s.run.path / "cells.csv", index=False)
    agg = study.aggregate(cells)
    rows = study.conditions(cfg)["references"]
    grid = {"table": study.formatted(agg.reindex([n for n in rows if n in agg.index])),
            "teacher_sw2_ratio": cells.groupby("condition", sort=False)["teacher_sw2_ratio"].first(),
            "answer": study.verdict(agg.reindex([n for n in rows if n in agg.index])),
            "failures": study.failures(results)}
    display(grid["table"].join(grid["teacher_sw2_ratio"]))
    assert not grid["failures"], f"grid cells failed: {grid['failures']}"

# %%
if grid:
    a = grid["answer"]
    lead = ("" if "gap" not in a else f"; its lead over {a['runner_up']} ({a['gap']:.3g}) "
            f"{'exceeds' if a['gap_exceeds_spread'] else 'does not exceed'} the seeds' spread "
            f"({a['largest_spread']:.3g}; NaN with one seed)")
    display(Markdown(
        f"**What to look for.** By mean `{a['metric']}` the best condition is {a['best']}, and the "
        f"reference's condition {a.get('reference_condition')} "
        f"{'is' if a['reference_is_best'] else 'is not'} the best (the paper finds that the SSL reference "
        f"generates best){lead}."
        if a["best"] is not None else "**What to look for.** No grid cell finished: nothing to rank."))

# %% [markdown]
# ## 6 · Save
# `claim_table.csv`, the curve figure and the summary (gates, comparisons, verdict, every run folder) stay
# in this run's folder; with `grid=True` also `cells.csv` and the grid's table.

# %%
summary = s.finish({"tokenizer_run": str(tok_dir), "claim": out, "table": summary_table.to_dict(),
                    "reduced": arms.reduced(cfg, preset),
                    "runs": {o.run.name: {"folder": str(o.folder), "status": o.status,
                                          "minutes": o.seconds / 60} for o in outcomes},
                    "grid": {"table": grid["table"].to_dict(), "answer": grid["answer"]} if grid else None})
print(f"run directory: {s.run.path}")
