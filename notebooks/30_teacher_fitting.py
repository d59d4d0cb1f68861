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
# # 30 · Teacher fitting: the reference distribution and its frozen velocity net
#
# > DMVAE pulls the aggregate latent distribution onto a *reference* distribution. This notebook builds that
# > reference from the stage-1 tokenizer (paper §4: by default its own latents, which the authors use as
# > "projected SSL features"), and fits the real (teacher) velocity net on it by flow matching (App. A.2).
#
# **What you'll see.** The latent cache (encoded once, normalised with the mean and scale stored in the
# tokenizer checkpoint); reference samples against the teacher's Euler-ODE samples in the reference's top-2
# principal axes; the held-out flow-matching loss per t-bin; Fréchet and sliced-W2 distances of the samples
# to the reference, read against the same distances between two independent reference draws (the noise floor).
#
# **What it needs.** A finished run of `20_tokenizer_pretraining` (the run of the same `run_name`, or the
# newest one at this preset, or `tokenizer_run=<folder>`). Time on a 2-core CPU: `smoke` ≈ 30 s, `cpu` ≤ 6
# min.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (embedded default) | "imagenet256" (GPU)
seed: int = 0  # seeds initialisation and every generator of the run
device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps"
run_root: str = ""  # parent of the run folders; "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; an existing run with the same config resumes
tokenizer_run: str = ""  # a notebook-20 run folder; "" -> the run
                         # named run_name, else the newest at this preset
reference: str = "ssl"  # ssl | supervised | gaussian | gmm | class_subset | noise_states | text
max_sw2_ratio: float = -1.0  # quality gate on teacher SW2 / noise floor:
                             # -1 -> 10 (smoke) or 3; 0 -> report only
nproc: int = 1  # processes for the training (DDP under torchrun, one node); >1 needs that many GPUs or cores
overrides: dict = {}  # dotted config keys, e.g. {"fit.steps": 5000, "net.size": "Mini"}

# %%
import torch
from IPython.display import Markdown, display

from dmvae_lib.data.images import load_data
from dmvae_lib.data.latents import build_reference, latents_for
from dmvae_lib.runtime import weights
from dmvae_lib.runtime.distributed import launch
from dmvae_lib.stages import teacher as teacher_stage
from dmvae_lib.train.artifacts import save_teacher, upstream_tokenizer
from dmvae_lib.train.velocity import fit_velocity_net, fm_loss_per_t_bin
from dmvae_lib.viz import figures as viz
from dmvae_lib.viz.tables import config_table
from dmvae_lib.workflow.session import resolve_run_root, start, upstream_run

# %%
tok_dir = upstream_run("20_tokenizer_pretraining", "tokenizer.pt", path=tokenizer_run, run_name=run_name,
                       run_root=run_root, preset=preset)
s = start("teacher", "30_teacher_fitting", preset,
          {"tokenizer_run": str(tok_dir), "reference.name": reference, **overrides},
          seed=seed, device=device, run_root=run_root, run_name=run_name)
cfg = s.cfg
print(f"tokenizer: {tok_dir}\nrun: {s.run.path}\ndevice: {s.device}")
config_table(cfg)

# %% [markdown]
# ## 1 · Latent cache
# Every training image is encoded once by the stage-1 tokenizer and stored (normalised) in this run's
# `latents.safetensors`, with the tokenizer's mean/scale and a hash of its checkpoint: a cache built by
# another tokenizer is rejected, never silently reused.

# %%
tok, tok_cfg, encoders, tok_file = upstream_tokenizer(tok_dir, s.device)
data = load_data(tok_cfg, resolve_run_root(run_root) / "_cache")
latents, labels = latents_for(tok, tok_file, data, s.run, s.device, flip=cfg.reference.flip,
                                  batch=cfg.encode_batch)
print(f"latents {tuple(latents.shape)}: mean {latents.mean():.3f}, std {latents.std():.3f}")
assert abs(float(latents.mean())) < 0.2 and 0.7 < float(latents.std()) < 1.3, "latents are not normalised"

# %% [markdown]
# ## 2 · The reference distribution
# Selected by name. Unconditional references (Gaussian, GMM) give an unconditional teacher; the others keep
# the class labels, so the teacher is class-conditional with a null label for classifier-free guidance.
# `text` is the paper's text-embedding reference: each training image gets a caption naming what it shows
# (for the shapes: size, colours, background and class, in one of 16 templates drawn per image), embedded by
# a frozen text tower (all-MiniLM-L6-v2 at `smoke` and `cpu`, SigLIP at `imagenet256`); the reference keeps
# the embeddings' top 64 principal axes as (4, 4, 4) maps.

# %%
ref = build_reference(cfg, latents, labels, encoders, data, s.device)
print(f"reference {ref.name!r}: sample shape {tuple(ref.shape)}, classes {ref.num_classes or 'none'}")

# %% [markdown]
# ## 3 · Fit the teacher
# A LightningDiT (RMSNorm, SwiGLU, 2-D RoPE, QK-norm, adaLN-Zero; patch 1 on the latent grid) trained by flow
# matching on fresh reference samples $x$ with label dropout (`train.velocity.fit_velocity_net`):
# $$L_{\text{FM}} = \operatorname{mean}\big(v_\theta(x_t, t, \tilde y) - (x - \epsilon)\big)^2,
# \qquad x_t = t\,x + (1-t)\,\epsilon, \qquad \epsilon \sim \mathcal N(0, I),$$
# with $t \sim \mathcal U[0, 1]$ (`fit.t_sampling`, `fit.t_shift` change that law) and, for a conditional
# reference, $\tilde y$ the class label replaced by the null label with probability `net.label_dropout` (the
# null label is what classifier-free guidance needs). Its EMA weights are the teacher.

# %%
if nproc > 1:  # DDP: torchrun fits in nproc processes; the call below then loads the finished checkpoint
    launch(nproc, "dmvae_lib.workflow.ddp_fit", ["teacher", str(s.run.path), "--device", device])
teacher, fit_stats = fit_velocity_net(cfg, ref, s.run, s.device)

# %%
s.figures.save(viz.loss_curves(s.run.read_metrics(), "teacher", ("fm_loss",)), "teacher_loss")

# %%
first = next(r for r in s.run.read_metrics() if r.get("tag") == "teacher")
print(f"flow-matching loss {first['fm_loss']:.3f} (step {first['step']}) → {fit_stats['fm_loss']:.3f}")
assert fit_stats["fm_loss"] < first["fm_loss"], "the teacher did not learn"

# %%
fm_end = float(fit_stats["fm_loss"])
display(Markdown(
    f"**What to look for.** The flow-matching loss goes from {first['fm_loss']:.3f} to {fm_end:.3f} "
    f"({100 * (1 - fm_end / first['fm_loss']):.0f} % lower). It cannot reach 0: from a noisy $x_t$ the "
    "target $x - \\epsilon$ is uncertain, so a flattening curve means the net is near what it can learn, "
    "not that it has failed. §4 checks what the loss cannot: whether the samples look like the reference."))

# %% [markdown]
# ## 4 · Does the teacher know the reference?
# Loss per t-bin, and Euler-ODE samples against the reference. With the velocity target $x - \epsilon$ both
# ends of the path are hard: near t = 0 the net must guess the data from noise, near t = 1 the noise from the
# data (the error tends to the variance of the one it guesses, 1 per entry for normalised latents), so the
# loss is lowest in between. A distance is read as a multiple of the noise floor: two independent draws of
# the same reference are not at distance 0.

# %%
bins = fm_loss_per_t_bin(teacher, ref, n=min(1000, cfg.fit.eval_samples), bins=10, device=s.device, seed=seed)

# %%
fig = viz.bar_chart([b["t"] for b in bins], [b["fm_loss"] for b in bins], x_title="t", y_title="loss",
                    title="held-out flow-matching loss per t-bin (t = 0 noise, t = 1 data)")
s.figures.save(fig, "loss_per_t_bin")

# %%
hi_bin, lo_bin = max(bins, key=lambda b: b["fm_loss"]), min(bins, key=lambda b: b["fm_loss"])
display(Markdown(
    f"**What to look for.** The loss is highest at t = {hi_bin['t']:.2f} ({hi_bin['fm_loss']:.3f}) and "
    f"lowest at t = {lo_bin['t']:.2f} ({lo_bin['fm_loss']:.3f}). The end bins stay high by construction "
    "(guessing the data, or the noise, from the other); what the teacher has learnt shows as how far the "
    "middle bins fall below them. A bin far above its neighbours marks a range of t where it is weak."))

# %%
ev = teacher_stage.evaluate_teacher(cfg, teacher, ref, s.device)
ref_pts, ev_pts = ref.sample(ev["samples"].shape[0],
                             torch.Generator().manual_seed(seed + 9))[0], ev["samples"]
r2, s2 = teacher_stage.pca_2d(ref_pts, ev_pts)

# %%
lim = float(r2.abs().quantile(0.99)) * 1.1
s.figures.save(viz.point_clouds({"teacher samples": s2}, r2, lim=lim, cols=1, size=420),
               "samples_vs_reference")

# %%
print(f"FD {ev['samples_vs_reference']['fd']:.2f} ({ev['fd_ratio']:.2f}× the floor "
      f"{ev['noise_floor']['fd']:.2f}), "
      f"SW2 {ev['samples_vs_reference']['sw2']:.3f} ({ev['sw2_ratio']:.2f}× the floor)")
print(ev["samples_vs_reference"]["fd_label"])

# %%
display(Markdown(
    f"**What to look for.** In the picture, the teacher's samples should cover the reference's cloud, "
    f"neither a shrunken core nor a wider halo. In numbers, FD {ev['fd_ratio']:.2f}× and SW2 "
    f"{ev['sw2_ratio']:.2f}× the floor of two reference draws (1× is a perfect fit; above 3× a warning "
    "follows). The DM term of notebook 40 pulls the latents toward this model of the reference, not the "
    "reference itself: the teacher's error here is part of what DM matches."))

# %%
gate = max_sw2_ratio if max_sw2_ratio >= 0 else (10.0 if preset == "smoke" else 3.0)
if ev["sw2_ratio"] >= 3.0:
    print(f"WARNING: the teacher is {ev['sw2_ratio']:.1f}× the noise floor from its reference; "
          "DM pulls toward it")
far = f"teacher samples are far from the reference ({ev['sw2_ratio']:.1f}× floor)"
assert gate == 0 or ev["sw2_ratio"] < gate, far

# %% [markdown]
# ## 5 · Save and summarise
# `teacher.pt` records the reference it was fitted on and the tokenizer checkpoint's hash; notebook 40 refuses
# a teacher that does not match.

# %%
save_teacher(s.run.path / "teacher.pt", cfg, teacher, ref, tok_file)
ev.pop("samples")
summary = s.finish({"tokenizer_run": str(tok_dir), "reference": ref.name, "reference_shape": list(ref.shape),
                    "fit": fit_stats, "evaluation": ev, "loss_per_t_bin": bins, "checkpoint": "teacher.pt",
                    **weights.provenance(ref)}, models=[tok])
print(f"run directory: {s.run.path}")
