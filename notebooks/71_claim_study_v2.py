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
# # 71 · The claim study, version 2: one joint protocol, replicated tokenizers, one verdict per claim
#
# > Version 1 (notebook 70) found DM's latents generating better than the λ = 0 control's, but its arms did
# > not share a protocol: A alone skipped the joint stage, each arm had one tokenizer, C0 and C1 did not see
# > the same batches, no arm kept stage 1's alignment term or got the paper's decoder refinement. Version 2
# > fixes the design before any of its results exist (issue 23; `docs/claim-study.md`). Version 1 stays as it
# > was, superseded.
#
# **The arms.** Every joint arm starts from the same stage 1 (AE from its own), runs one joint protocol and
# the same decoder refinement (App. A.4), once per joint seed; only these differences remain:
#
# | arm | encoder | stage 1's alignment term | λ·L_DM |
# |---|---|---|---|
# | **A** | frozen, stage 1 only (no joint stage) | — | — (reported, not compared) |
# | **A_J** | frozen | off | 0 |
# | **C0** | trainable | off | 0 |
# | **VA** | trainable | **on** (the VA-VAE analogue) | 0 |
# | **C1** | trainable | off | λ toward the SSL teacher |
# | **AE** | from scratch (its own stage 1), trainable | off | 0 |
#
# A joint seed $s$ sets every random stream of a joint run, and arms with the same $s$ train on the same
# batches. Each (arm, $s$) gets one generator, seeded by $s$'s index. Generation is scored as in version 1:
# the mean log-FD over log-steps of a learning curve, in the supervised classifier's space, to real images.
#
# **Tests.** For a comparison of C1 with arm X, paired by joint seed, $d_s = \mathrm{score}(X, s) -
# \mathrm{score}(C1, s)$ (> 0: C1 generates better), with mean $m$, standard error $\mathrm{se} =
# \mathrm{sd}/\sqrt n$ and $t$ the one-sided 95 % Student quantile with $n - 1$ degrees of freedom (2.92
# for $n = 3$):
# $$\text{C1 better: } m - t\,\mathrm{se} \ge 0.05, \qquad \text{C1 no better: } m + t\,\mathrm{se} < 0.05.$$
# PSNR after refinement is tested the same way on $p_s = \mathrm{PSNR}(C1, s) - \mathrm{PSNR}(X, s)$ against
# 0.2 dB. **Gates** first: C0's latent FD to the reference ≥ 3× the two-draw floor (claims 1–2); PSNR(C0) −
# PSNR(A_J) ≥ 0.5 dB (claim 4).
#
# **Four claims** (`dmvae_lib/workflow/claims_v2.py`), each *supported*, *refuted*, *unresolved* or *gate
# failed*: (1) DM resists drift (C1 vs C0); (2) distribution matching beats point-wise alignment (C1 vs VA,
# with C1's PSNR within 0.5 dB of VA's); (3) a structured latent space generates better than an unstructured
# one (C1 vs AE); (4) DM trades better than freezing the SSL encoder (C1 vs A_J: C1 higher in PSNR and A_J no
# better in generation). The headline "holds at this scale" needs all four.
#
# **What it needs.** A finished `20_tokenizer_pretraining` run (arm A). One command for the full study:
# `python -m dmvae_lib --preset cpu --only 20 71 --name claim`. The main job runs it with one joint seed,
# which resolves nothing; its summary says so.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (this CPU) | "imagenet256" (GPU)
seed: int = 0  # the notebook's own seed; the joint seeds are the config's `claim_v2.joint_seeds`
device: str = "auto"  # passed to every run's notebooks
run_root: str = ""  # "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; also the prefix of every run's name
tokenizer_run: str = ""  # a notebook-20 run folder (arm A); "" -> the run
                         # named run_name, else the newest at this preset
overrides: dict = {}  # e.g. {"claim_v2.joint_seeds": [0, 1, 2, 3]}

# %%
import pandas as pd
from IPython.display import Markdown, display

from dmvae_lib.viz import figures as viz
from dmvae_lib.workflow import arms, arms_v2, claims_v2
from dmvae_lib.workflow.session import resolve_run_root, start, upstream_run

# %%
tok_dir = upstream_run("20_tokenizer_pretraining", "tokenizer.pt", path=tokenizer_run, run_name=run_name,
                       run_root=run_root, preset=preset, accept=arms.can_be_arm_a)
s = start("study", "71_claim_study_v2", preset, {"tokenizer_run": str(tok_dir), **overrides}, seed=seed,
          run_root=run_root, run_name=run_name)
cfg, prefix, root = s.cfg, s.run.path.name, resolve_run_root(run_root)
print(f"arm A (stage 1): {tok_dir}\nrun: {s.run.path}")

# %% [markdown]
# ## 1 · The plan
# Every notebook execution, in order; each leaves its executed notebook, config, metrics, figures and
# checkpoints in its own run folder. Finished runs are skipped and interrupted ones resume. AE's stage 1 and
# the teachers are version 1's runs when those exist with the same config.

# %%
arms_v2.check(cfg, preset)
runs = arms_v2.plan(cfg, preset, prefix, root, tok_dir, device)
pd.DataFrame([{"notebook": r.notebook, "run": r.name, "seed": r.params.get("seed"),
               "needs": ", ".join(r.needs)} for r in runs])

# %%
per_nb = pd.Series([r.notebook for r in runs]).value_counts().sort_index()
display(Markdown(
    f"**What to look for.** {len(runs)} executions: "
    + ", ".join(f"{n} of notebook {k}" for k, n in per_nb.items())
    + f", for {len(cfg.claim_v2.joint_seeds)} joint seed(s). Within one joint seed every notebook-40 run "
    "has the same `seed`: the arms are paired by it."))

# %%
outcomes = arms.run_all(runs, root)
pd.DataFrame([{"run": o.run.name, "status": o.status, "minutes": round(o.seconds / 60, 1), "error": o.error}
              for o in outcomes])

# %%
status = pd.Series([o.status for o in outcomes]).value_counts()
display(Markdown(
    "**What to look for.** " + ", ".join(f"{n} {k}" for k, n in status.items())
    + f", {sum(o.seconds for o in outcomes) / 60:.1f} min in all. *skipped* runs had finished before and "
    "are reused; a *failed* run stops the study at the checks of §5, so read its `error` first."))

# %% [markdown]
# ## 2 · Gates: is there drift to resist, and reconstruction to trade?

# %%
data = arms_v2.collect(cfg, prefix, root, tok_dir)
out = arms_v2.result(cfg, data)
g, th = out["gates"], out["thresholds"]
gates = pd.DataFrame({
    "measured": [g["drift"]["ratio"], g["drift"]["ratio_A_J"], g["reconstruction"]["psnr_gain_db"]],
    "needed": [th["min_drift_ratio"], None, th["min_psnr_trade_db"]],
    "passes": [g["drift"]["passed"], None, g["reconstruction"]["passed"]]},
    index=["C0: latent FD to the reference / floor", "A_J: the same (reported)", "PSNR(C0) − PSNR(A_J) (dB)"])
gates

# %%
display(Markdown(
    f"**What to look for.** Drift gate: {g['drift']['reason']} "
    f"({'passes' if g['drift']['passed'] else 'fails'}); A_J, whose encoder is frozen, sits at "
    f"{g['drift']['ratio_A_J']:.3g}× (how far the head and projector alone move the latents). "
    f"Reconstruction gate: {g['reconstruction']['reason']} "
    f"({'passes' if g['reconstruction']['passed'] else 'fails'}). A failed gate is the verdict of the claims "
    "that depend on it, whatever the curves say."))

# %% [markdown]
# ## 3 · The four claims
# Each claim's generation difference (curve scores) and PSNR difference, mean ± standard error over the
# joint seeds, and its verdict. The figure shows every joint seed's difference (dots), the mean with its
# one-sided interval ± t·se (bar), and the effect a verdict needs (dashed).

# %%
claims = pd.DataFrame({k: {
    "claim": c["claim"], "vs": c["versus"], "outcome": c["outcome"],
    "generation m ± se": f"{c['generation']['mean']:+.3f} ± {c['generation']['se']:.3f}",
    "PSNR m ± se (dB)": f"{c['psnr']['mean']:+.2f} ± {c['psnr']['se']:.2f}", "n": c["generation"]["n"],
    "reason": c["reason"]} for k, c in out["claims"].items()}).T
claims

# %%
panels = {"generation: score(X) − score(C1)": {f"vs {c['versus']}": {**c["generation"],
                                                                    "by_seed": c["generation_by_seed"]}
                                               for c in out["claims"].values()},
          "PSNR (dB): C1 − X": {f"vs {c['versus']}": {**c["psnr"], "by_seed": c["psnr_by_seed"]}
                                for c in out["claims"].values()}}
effects = dict(zip(panels, (th["effect"], th["psnr_effect_db"])))
s.figures.save(viz.paired_differences(panels, effects), "claims_paired")

# %%
display(Markdown(
    f"**What to look for.** The headline: *{out['headline']}*. "
    + " ".join(f"{c['claim'].capitalize()}: *{c['outcome']}* ({c['reason']})."
               for c in out["claims"].values())
    + " A dot right of the dashed line is a joint seed on which C1 beat the arm by more than the effect; a "
    "claim is resolved only when the whole bar is on one side."
    + (f" {arms_v2.reduced(cfg, preset)}" if arms_v2.reduced(cfg, preset) else "")))

# %% [markdown]
# ## 4 · What the claims rest on: curves, PSNR before and after refinement
# Mean over joint seeds, band ± one sample standard deviation.

# %%
titles = {k: k.replace("fd_", "FD, ").replace("_recon", " → own reconstructions") for k in arms.keys(data)}
bands = {k: arms.curve_bands(data, k) for k in arms.keys(data)}
if bands:
    s.figures.save(viz.arm_curve_panels(bands, titles, title="generator learning curves per arm (v2)"),
                   "claim_v2_curves")

# %%
mean = lambda d: sum(d.values()) / len(d) if d else float("nan")  # noqa: E731
psnr = pd.DataFrame({arm: {"before refinement (val[:500])": mean(data.psnr_before.get(arm, {})),
                           "after refinement (val[:500])": mean(data.psnr_after.get(arm, {})),
                           "after, full val (the claims')": mean(data.psnr.get(arm, {})),
                           "latent FD to ref. / floor": mean(data.drift_fd.get(arm, {})) / out["drift_floor"]}
                     for arm in arms_v2.ALL_ARMS}).T
psnr.round(3)

# %%
gain = (psnr["after refinement (val[:500])"] - psnr["before refinement (val[:500])"]).dropna()
display(Markdown(
    "**What to look for.** Refinement (decoder only, encoder and projector frozen) changes val PSNR by "
    + ", ".join(f"{a} {v:+.2f} dB" for a, v in gain.items())
    + ". The claims read PSNR after it; a large gain means the joint stage had left the decoder behind its "
    "encoder. The drift column is each arm's latent FD to the reference in units of the two-draw floor."))

# %%
pd.DataFrame(out["other_spaces"]).T

# %%
same = sum(v == out["claims"][k]["outcome"] for sp in out["other_spaces"].values() for k, v in sp.items())
total = sum(len(sp) for sp in out["other_spaces"].values())
display(Markdown(
    f"**What to look for.** {same} of the {total} claim verdicts in the other spaces and distances agree "
    f"with the pre-registered `{out['space']}`: the fewer agree, the more a verdict depends on its space."))

# %% [markdown]
# ## 5 · Checks and save

# %%
bad = arms.failures(outcomes)
assert not bad, f"runs failed: {bad}"
assert all(c["outcome"] in claims_v2.OUTCOMES for c in out["claims"].values())
assert all(data.curves[a] for a in arms_v2.ALL_ARMS), "an arm has no learning curve"
assert all(data.psnr_before[a] and data.psnr_after[a] for a in arms_v2.JOINT_ARMS), "refinement not reported"
if len(cfg.claim_v2.joint_seeds) < 2:  # one joint seed resolves nothing: no claim may say otherwise
    assert {c["outcome"] for c in out["claims"].values()} <= {"unresolved", "gate failed"}

# %%
summary = s.finish({"tokenizer_run": str(tok_dir), "claims": out, "reduced": arms_v2.reduced(cfg, preset),
                    "psnr_table": psnr.to_dict(),
                    "runs": {o.run.name: {"folder": str(o.folder), "status": o.status,
                                          "minutes": o.seconds / 60} for o in outcomes}})
print(f"run directory: {s.run.path}")
