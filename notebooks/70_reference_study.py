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
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 70 · Which reference distribution? The study of paper Tab. 1 (and the λ trend of Tab. 2)
#
# > The paper's central claim (§4, Tab. 1): the *choice* of reference matters, and SSL features make the
# > latents easiest to generate while keeping reconstruction. Here every claim is a measurement: the whole
# > pipeline runs once per reference, per DM weight λ and per seed, and the numbers come back as one table.
#
# **What you'll see.** The study's plan (cells = reference × λ × seed); each cell executed through papermill
# (notebooks 30 → 40 → 60, each in its own run folder, finished ones skipped); one table per question, mean ±
# spread over seeds: references {SSL, supervised, Gaussian, GMM, class subset, noise states} at λ = 10 against
# the λ = 0 baseline, and λ ∈ {0, 1, 10, 100} on the SSL reference; one figure each; and the answer to "does
# the SSL reference give the best generation FD?", with its margin read against the seeds' spread.
#
# **Metrics.** Generation FD and reconstruction FD in the SSL encoder's feature space (*not* FID / rFID; see
# notebook 60), val PSNR, and how the classes cluster in the latents (kNN accuracy, silhouette).
#
# **What it needs.** A finished run of `20_tokenizer_pretraining` (shared by every cell). Time on a 2-core
# CPU: `smoke` ≈ 1 min (the SSL reference and the baseline, 1 seed, a few steps each), `cpu` ≤ 2 h (18 cells,
# 6 teachers). One command: `python -m dmvae_lib --preset cpu --only 20 70 --name study`.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (this CPU, ≤ 2 h) | "imagenet256" (GPU)
seed: int = 0  # the notebook's own seed; the cells' seeds are the config's `seeds`
device: str = "auto"  # passed to every cell's notebooks
run_root: str = ""  # "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; also the prefix of every cell's run name
tokenizer_run: str = ""  # a notebook-20 run folder; "" -> the run
                         # named run_name, else the newest at this preset
overrides: dict = {}  # e.g. {"references": ["ssl", "gaussian"],
                      # "seeds": [0, 1, 2], "joint": {"train.steps": 800}}

# %%
import pandas as pd

from dmvae_lib.viz import figures as viz
from dmvae_lib.workflow import study
from dmvae_lib.workflow.session import resolve_run_root, start, upstream_run

tok_dir = upstream_run("20_tokenizer_pretraining", "tokenizer.pt", path=tokenizer_run, run_name=run_name,
                       run_root=run_root, preset=preset)
s = start("study", "70_reference_study", preset, {"tokenizer_run": str(tok_dir), **overrides}, seed=seed,
          run_root=run_root, run_name=run_name)
cfg, prefix, root = s.cfg, s.run.path.name, resolve_run_root(run_root)
print(f"tokenizer: {tok_dir}\nrun: {s.run.path}")

# %% [markdown]
# ## 1 · The plan
# Each reference is fitted once by a teacher (notebook 30) that all its cells share; every cell then trains
# the tokenizer jointly (notebook 40) and fits and scores a generator on its latents (notebook 60).

# %%
cells = study.plan(cfg)
pd.DataFrame([{"cell": c.name(prefix), "condition": c.condition, "teacher": study.teacher_of(cfg, c)}
              for c in cells])

# %% [markdown]
# ## 2 · Run every cell
# Finished runs are skipped and interrupted ones resume, so re-executing this notebook continues the study.
# A failing cell is recorded with its error and the others still run; the check at the end fails if any did.
# `teacher_sw2_ratio` says how close each reference's teacher came to it (SW2 of its samples over the
# two-draw noise floor): DM can only pull the latents toward the teacher's model of the reference.

# %%
results = study.run_study(cfg, preset, prefix, root, tok_dir, device=device)
table = study.collect(results)
table.to_csv(s.run.path / "cells.csv", index=False)
table[["condition", "seed", "status", "minutes", *study.METRICS, "teacher_sw2_ratio"]]

# %% [markdown]
# ## 3 · References at λ = `dm_weight`, against the λ = 0 baseline (paper Tab. 1)
# Mean ± sample standard deviation over seeds (seed count in brackets). Lower FD is better; the FDs are in the
# SSL encoder's feature space, so they compare *within* this table, not with published FIDs.

# %%
rows = study.conditions(cfg)
agg = study.aggregate(table)
titles = {m: label for m, (label, _) in study.METRICS.items()}
tables = {}
for key, names in rows.items():
    if names:
        tables[key] = study.formatted(agg.reindex([n for n in names if n in agg.index]))
        tables[key].to_csv(s.run.path / f"table_{key}.csv")
        s.figures.save(viz.condition_panels(study.panel_points(table, names), titles, title=f"study: {key}"),
                       key)
tables["references"]

# %% [markdown]
# ## 4 · The DM weight λ on the SSL reference (paper Tab. 2 trend)
# More λ pulls the latents harder onto the reference; the paper finds generation improves with λ up to a
# point while reconstruction slowly degrades.

# %%
tables.get("dm_weight", pd.DataFrame())

# %% [markdown]
# ## 5 · Does the SSL reference generate best?
# The lowest mean generation FD over all conditions, and whether its lead over the runner-up is larger than
# the seeds' spread (if not, this study cannot tell the two apart).

# %%
answer = study.verdict(agg.reindex([n for n in rows["references"] if n in agg.index]))
print(f"best generation FD: {answer['best']}; the SSL reference is best: {answer['reference_is_best']}")
if "gap" in answer:
    print(f"lead over {answer['runner_up']}: {answer['gap']:.4f} (largest seed spread "
          f"{answer['largest_spread']:.4f})")

# %%
bad = study.failures(results)
assert not bad, f"cells failed: {bad}"
finished = table[table["status"] != "failed"]
gen_fd = finished["gen_fd_ssl"]
assert gen_fd.notna().all() and (gen_fd > 0).all(), "a cell has no generation FD"
assert len(table) == len(cells) and set(table["seed"]) == set(cfg.seeds)

# %% [markdown]
# ## 6 · Save
# `cells.csv` (every cell with its run folders), `table_references.csv`, `table_dm_weight.csv`, the figures
# and the summary with the verdict stay in this run's folder.

# %%
summary = s.finish({"tokenizer_run": str(tok_dir), "cells": table.to_dict(orient="records"),
                    "tables": {k: v.to_dict() for k, v in tables.items()}, "verdict": answer,
                    "minutes": float(table["minutes"].sum()
                                     + sum(r.seconds for r in results if r.cell is None) / 60)})
print(f"run directory: {s.run.path}")
