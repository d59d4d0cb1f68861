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
# # 60 · Generation and evaluation: a LightningDiT on the DM tokenizer's latents
#
# > What DMVAE is for (paper §5, Tab. 3): latents shaped by distribution matching should be *easier to
# > generate*. This notebook fits the final generator on the DM tokenizer's latents, samples images from it
# > and
# > scores them, every number stored with the protocol that produced it.
#
# **What you'll see.** The latent cache of the DM tokenizer; the generator's flow-matching fit (the teacher's
# code of notebook 30: LightningDiT, label dropout, EMA); class-balanced samples by Euler ODE or
# Euler–Maruyama SDE (optionally with CFG inside a guidance interval), decoded and saved as PNGs and as an
# `.npz` in the ADM evaluator's format; a Fréchet distance in the SSL encoder's feature space (not FID) read
# against the real-vs-real floor and the tokenizer's reconstruction FD, and the same in the supervised
# classifier's space; the class accuracy of the samples under that classifier (per class, with its accuracy on
# real images as the ceiling) and a CFG sweep; FID / IS / precision-recall when the Inception weights are on
# disk.
#
# **What it needs.** A finished run of `40_joint_dm_training` (the run of the same `run_name`, else the newest
# at this preset, or `joint_run=<folder>`). `tokenizer_file="control_tokenizer.pt"` runs the λ = 0 baseline
# through the same code. Time on a 2-core CPU: `smoke` ≈ 1 min, `cpu` ≤ 12 min.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (embedded default) | "imagenet256" (GPU)
seed: int = 0  # seeds initialisation, sampling noise and every generator of the run
device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps"
run_root: str = ""  # "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; an existing run with the same config resumes
joint_run: str = ""  # a notebook-40 run folder; "" -> the run named run_name, else the newest at this preset
tokenizer_file: str = "tokenizer.pt"  # "tokenizer.pt" (DM) | "control_tokenizer.pt" (the control: no DM term)
nproc: int = 1  # processes for the training (DDP under torchrun, one node); >1 needs that many GPUs or cores
overrides: dict = {}  # dotted config keys, e.g. {"sample.sampler": "sde", "sample.cfg_scale": 2.0}

# %%
import time

import torch
from IPython.display import Markdown, display

from dmvae_lib.data.images import load_data
from dmvae_lib.data.pixels import to_float
from dmvae_lib.metrics import evaluation
from dmvae_lib.runtime.distributed import launch
from dmvae_lib.stages import generation as generation_stage
from dmvae_lib.stages import latents as latents_stage
from dmvae_lib.train.artifacts import classifier, save_generator, upstream_tokenizer
from dmvae_lib.viz import figures as viz
from dmvae_lib.viz.tables import config_table
from dmvae_lib.workflow.session import resolve_run_root, start, upstream_run

# %%
joint_dir = upstream_run("40_joint_dm_training", tokenizer_file, path=joint_run, run_name=run_name,
                         run_root=run_root, preset=preset)
s = start("generation", "60_generation", preset,
          {"joint_run": str(joint_dir), "tokenizer_file": tokenizer_file, **overrides},
          seed=seed, device=device, run_root=run_root, run_name=run_name)
cfg = s.cfg
print(f"tokenizer: {joint_dir / tokenizer_file}\nrun: {s.run.path}\ndevice: {s.device}")
config_table(cfg)

# %% [markdown]
# ## 1 · The generator's data: the DM tokenizer's latent cache
# Every training image is encoded once and normalised with the latent mean/scale that notebook 40 re-measured
# after DM training, so `decode(denormalize(sample))` maps a generated latent back to an image. The cache
# records the tokenizer's hash: a cache built by another tokenizer is rejected.

# %%
tok, tok_cfg, encoders, tok_file = upstream_tokenizer(joint_dir, s.device, cfg.tokenizer_file)
data = load_data(tok_cfg, resolve_run_root(run_root) / "_cache")
train_set = generation_stage.generator_data(cfg, tok, tok_file, data, s.run, s.device)
lat = train_set.bank
print(f"{train_set.name}: {tuple(lat.shape)}, mean {lat.mean():.3f}, std {lat.std():.3f}, "
      f"{train_set.num_classes} classes")

# %% [markdown]
# How much class structure do the latents carry? The leave-one-out kNN accuracy and the silhouette of a
# class-balanced subset (`metrics.cluster_latents` latents), as in notebook 50: the generator has to learn
# whatever structure is there.

# %%
clusters = generation_stage.latent_clustering(train_set, cfg.metrics.cluster_latents, seed)
print(f"class structure of the latents: kNN {clusters['knn']:.3f} (chance {clusters['chance']:.2f}), "
      f"silhouette {clusters['silhouette']:.3f}")

# %%
display(Markdown(
    f"**What to look for.** kNN {clusters['knn']:.3f} against chance {clusters['chance']:.2f}: "
    + ("the latents' neighbours share their class more often than chance"
       if clusters["knn"] > clusters["chance"] else "the latents' neighbours ignore the class")
    + f"; silhouette {clusters['silhouette']:.3f} (1: tight, separate classes; 0: overlapping; < 0: mixed)."
    if clusters["n"] else "**What to look for.** The cache has no labels: no class structure to measure."))

# %%
assert abs(float(lat.mean())) < 0.2 and 0.7 < float(lat.std()) < 1.3, "latents are not normalised"

# %% [markdown]
# ## 2 · Fit the generator
# Flow matching on the cached latents $x$ with label dropout (the null label gives classifier-free guidance),
# through notebook 30's `fit_velocity_net`: one loop, one loss,
# $$L_{\text{FM}} = \operatorname{mean}\big(v_\theta(x_t, t, \tilde y) - (x - \epsilon)\big)^2,
# \qquad x_t = t\,x + (1-t)\,\epsilon, \qquad t \sim \mathcal U[0, 1],$$
# with t = 0 noise and t = 1 data (`fit.t_sampling`, `fit.t_shift` change the law of t), and $\tilde y$ the
# label, replaced by the null label with probability `net.label_dropout`. Its EMA weights are what gets
# sampled (`sample.ema`). With `curve.steps` set, the EMA net is also sampled and scored at those steps (FD to
# real images and to this tokenizer's reconstructions, in the SSL space and in low-resolution pixels): a
# learning curve, which shows how fast latents are to model.

# %%
if nproc > 1:  # DDP: torchrun fits in nproc processes; the call below then loads the finished checkpoint
    launch(nproc, "dmvae_lib.workflow.ddp_fit", ["generator", str(s.run.path), "--device", device])

# %%
curve = generation_stage.curve_evaluator(cfg, tok, encoders, data, train_set.shape, train_set.num_classes,
                                         s.run, s.device) if cfg.curve.steps and nproc == 1 else None

# %%
net, fit_stats = generation_stage.fit_generator(cfg, train_set, s.run, s.device, curve=curve)

# %%
save_generator(s.run.path / "generator.pt", cfg, net, train_set, tok_file)

# %%
s.figures.save(viz.loss_curves(s.run.read_metrics(), "generator", ("fm_loss",)), "generator_loss")

# %%
first = next(r for r in s.run.read_metrics() if r.get("tag") == "generator")
print(f"flow-matching loss {first['fm_loss']:.3f} (step {first['step']}) → {fit_stats['fm_loss']:.3f}")

# %%
fm_end = float(fit_stats["fm_loss"])
display(Markdown(
    f"**What to look for.** The flow-matching loss goes from {first['fm_loss']:.3f} to {fm_end:.3f} "
    f"({100 * (1 - fm_end / first['fm_loss']):.0f} % lower). It has a floor above 0 (from a noisy $x_t$ "
    "the target is uncertain), so its level says little about sample quality: §4 and §6 measure that."))

# %%
points = generation_stage.curve_records(s.run)
if points:
    s.figures.save(viz.learning_curve_panels(points), "generator_curve")

# %%
if points:
    p0, p1 = points[0], points[-1]
    spaces = [k.removeprefix("space_") for k in p0 if k.startswith("space_")]
    display(Markdown(
        f"**What to look for.** From step {p0['step']} to {p1['step']}, FD to real images (to "
        "reconstructions): " + "; ".join(f"{sp} {p0[f'fd_{sp}']:.3g} → {p1[f'fd_{sp}']:.3g} "
                                         f"({p0[f'fd_{sp}_recon']:.3g} → {p1[f'fd_{sp}_recon']:.3g})"
                                         for sp in spaces)
        + ". A curve that still falls at the last step is a generator that more steps would improve; the "
        "curve to the reconstructions cancels the decoder's error, so it shows the generator alone."))

# %%
assert fit_stats["fm_loss"] < first["fm_loss"], "the generator did not learn"

# %% [markdown]
# ## 3 · The mechanism: one sampling trajectory
# Sampling integrates the learned velocity from noise (t = 0) to data (t = 1),
# $x_{t+\Delta t} = x_t + \Delta t\, v_\theta(x_t, t, y)$, where under classifier-free guidance (inside the
# interval) $v = v_\varnothing + s\,(v_y - v_\varnothing)$. At every step the net also predicts where it is
# heading, $\hat x = x_t + (1-t)\,v$; decoding these predictions shows the image forming, coarse first.
# One row per step shown, one column per sample (one per class when the generator is conditional).

# %%
ts, x_hats = generation_stage.trajectory(net, train_set.shape, train_set.num_classes, cfg.sample, seed,
                                         s.device, n=8, snapshots=6)
rows = {f"t = {t:.2f}": generation_stage.decode_latents(tok, x, s.device, progress=False)
        for t, x in zip(ts, x_hats)}

# %%
s.figures.save(viz.image_grid({k: to_float(v) for k, v in rows.items()}, title="x̂ along one ODE trajectory"),
               "sampling_trajectory")

# %%
step = [float((b - a).abs().mean()) for a, b in zip(x_hats, x_hats[1:])]  # how far x̂ moves between rows
display(Markdown(
    f"**What to look for.** The prediction x̂ moves by {step[0]:.3f} (mean |Δx̂| per latent entry) between "
    f"the first two rows and by {step[-1]:.3f} between the last two: "
    + ("it settles as t → 1, so the layout is decided early and later steps refine it."
       if step[-1] < step[0] else "it is still moving at the end, so more sampling steps may change it.")))

# %%
assert len(rows) == 6 and all(torch.isfinite(x).all() for x in x_hats)

# %% [markdown]
# ## 4 · Sample latents
# Labels are class-balanced (label i mod K, as the authors' `sample_50k.py`). The ODE sampler
# (`core.samplers.euler_ode`) integrates $\mathrm dx / \mathrm dt = v$; the SDE (`euler_maruyama`) integrates
# $$\mathrm dx = \big[v + w(t)\,\nabla \log p_t(x)\big]\,\mathrm dt + \sqrt{2\,w(t)}\,\mathrm dW, \qquad
# w(t) = c\,(1 - t), \qquad \nabla \log p_t(x) = \frac{t\,v - x}{1 - t},$$
# the "sigma" diffusion with $c$ = `sample.diffusion_norm`, up to $t = 1 - \delta$ and ends with a
# deterministic mean step of size $\delta$ = `sample.last_step` (the authors' 250-step evaluation). With
# `sample.cfg_scale` $s > 1$ the velocity is $v = v_\varnothing + s\,(v_y - v_\varnothing)$ for t inside
# `sample.cfg_interval`. First check: do the samples look like the latent cache? (A distance is read against
# two independent draws of the cache.)

# %%
sampler_net = net if cfg.sample.ema else generation_stage.raw_generator(cfg, train_set, s.run, s.device)
t0 = time.perf_counter()
latents, labels = generation_stage.sample_latents(sampler_net, train_set.shape, train_set.num_classes,
                                                  cfg.sample, seed, s.device)
sample_s = time.perf_counter() - t0
print(f"{len(latents)} latents, {cfg.sample.sampler} × {cfg.sample.steps} steps, CFG {cfg.sample.cfg_scale} "
      f"on {cfg.sample.cfg_interval}, {'EMA' if cfg.sample.ema else 'raw'} weights: {sample_s:.1f} s")

# %%
fit = generation_stage.latent_fit(latents, train_set, seed)
print(f"latent FD to the cache {fit['samples_vs_cache']['fd']:.2f} ({fit['fd_ratio']:.2f}× the floor), "
      f"SW2 {fit['sw2_ratio']:.2f}× the floor")

# %%
display(Markdown(
    f"**What to look for.** In latent space the samples are {fit['fd_ratio']:.2f}× (FD) and "
    f"{fit['sw2_ratio']:.2f}× (SW2) as far from the cache as two independent draws of the cache are from "
    "each other: 1× is a generator that matches its training latents, and the decoder cannot undo what is "
    "lost here."))

# %%
assert torch.isfinite(latents).all(), "non-finite samples"

# %% [markdown]
# ## 5 · Decode and save
# `samples.npz` holds all N images as `arr_0` (uint8, N × H × W × 3) and the labels as `arr_1`: the format of
# the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) that DiT, LightningDiT, REPA and RAE
# report with. `samples_grid.png` has one row per class; `samples/` holds the first `metrics.png_limit` PNGs.

# %%
images = generation_stage.decode_latents(tok, latents, s.device, cfg.sample.batch, cfg.sample.precision)

# %%
paths = generation_stage.write_samples(s.run, images, labels, cfg.metrics)
back, back_labels = evaluation.load_adm_npz(paths["npz"])

# %%
names = latents_stage.class_names(tok_cfg.data.source, data)
fig = generation_stage.samples_figure(images, labels, cfg.metrics.grid_per_class, data.val, data.val_labels,
                                      title="generated (each row), real val images (the row below)",
                                      names=names)
s.figures.save(fig, "samples")

# %%
display(Markdown(
    f"**What to look for.** {len(images)} samples, {cfg.metrics.grid_per_class} per class shown, each row "
    "of generated images above real images of the same class. Read each pair of rows: does the generated "
    "row show the shape of the real one, or only its colours and textures? §7 turns this into a number."))

# %%
assert back.dtype == torch.uint8 and back.shape == (cfg.sample.n, *data.val.shape[1:])
assert torch.equal(back, images)
assert back_labels is None or torch.equal(back_labels, labels)

# %% [markdown]
# ## 6 · Evaluate: Fréchet distances
# Between Gaussians fitted to two feature sets (`metrics.image_metrics.frechet_distance`),
# $$\mathrm{FD} = \lVert \mu_a - \mu_b \rVert^2 + \operatorname{tr}\Big(\Sigma_a + \Sigma_b
# - 2\big(\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}\big)^{1/2}\Big),$$
# in three settings:
# * `fd_ssl`: Fréchet distance between SSL-encoder features of the samples and of real training images (at
#   this scale the stand-in for gFID; it is *not* FID). Read it against `fd_ssl_floor` (val vs train images:
#   two real sets, no generator) and `rfd_ssl` (val images vs their reconstructions: what the tokenizer
#   loses).
# * `fd_sup` (with its floor and rFD): the same in the supervised classifier's pooled features, a space the
#   SSL encoder does not define.
# * `inception`: FID, IS and precision/recall with torch-fidelity's Inception-v3, only from a local weights
#   file (and an ADM reference batch for ImageNet's `mu`/`sigma`); otherwise a record that says what to fetch.
#
# Every record carries its protocol: N, sampler and steps, CFG scale and interval, EMA, seed, and the SHA-256
# of the generator, the tokenizer, the scored `.npz`, and any weights or statistics file. The real images'
# features are computed once here and serve every score below.

# %%
files = {"generator": s.run.path / "generator.pt", "tokenizer": tok_file, "samples": paths["npz"]}
real = generation_stage.real_reference(cfg, tok, encoders, data, s.device)

# %%
records = generation_stage.evaluate(cfg, images, real, files, s.device)
by_name = {r["metric"]: r for r in records}
print(by_name["inception"].get("reason", "Inception metrics computed"))
generation_stage.metrics_table(records)

# %%
fd, floor, rfd = (by_name[k]["value"] for k in ("fd_ssl", "fd_ssl_floor", "rfd_ssl"))
print(f"SSL-space FD: samples {fd:.3f} | real-vs-real floor {floor:.3f} | reconstructions {rfd:.3f}")
if "fd_sup" in by_name:
    print(f"supervised-space FD: samples {by_name['fd_sup']['value']:.3f} | floor "
          f"{by_name['fd_sup_floor']['value']:.3f} | reconstructions {by_name['rfd_sup']['value']:.3f}")

# %%
display(Markdown(
    f"**What to look for.** In the SSL space the samples are at FD {fd:.3g}: {fd / max(floor, 1e-12):.1f}× "
    f"the real-vs-real floor ({floor:.3g}) and {fd / max(rfd, 1e-12):.1f}× the reconstructions' FD "
    f"({rfd:.3g}). Lower is better. The floor is the best any set of images can score; rFD above it is what "
    "the tokenizer loses, and the samples' FD above rFD is what the generator adds"
    + ("." if "fd_sup" not in by_name else f"; in the supervised space the ratio to the floor is "
       f"{by_name['fd_sup']['value'] / max(by_name['fd_sup_floor']['value'], 1e-12):.1f}×.")))

# %%
assert all(set(evaluation.PROTOCOL_FIELDS) <= set(r["protocol"]) for r in records), \
    "a metric lacks its protocol"
assert by_name["fd_ssl"]["protocol"]["files"]["generator"]["sha256"], "the generator's hash is missing"
assert fd > 0 and floor >= 0, "Fréchet distances are non-negative"

# %% [markdown]
# ## 7 · Does a person recognise the samples? Class accuracy
# A Fréchet distance says how far two clouds of features are; it does not say whether a sample *is* a star.
# The embedded supervised classifier of notebook 20 (trained on real labelled images) is asked which class
# each generated image shows:
# $$\mathrm{acc} = \frac{1}{N}\sum_i \big[\arg\max_c f_c(x_i) = y_i\big],$$
# with $y_i$ the class the image was generated for. Its accuracy on real held-out images is the ceiling; its
# accuracy on the tokenizer's reconstructions of those images is the decoder's ceiling, what a generator that
# matched the latent distribution exactly would reach at CFG 1. It is not Inception and not IS: a classifier
# of *this* data set, labelled as such in every record.

# %%
classify = classifier(encoders)
recog = None
if classify is not None and labels is not None:
    recog = generation_stage.recognisability(cfg, classify, images, labels, train_set.num_classes, real,
                                             files, s.device)
    records.append(recog)

# %%
if recog is not None:
    s.figures.save(viz.class_accuracy_bars(
        {"real val (ceiling)": recog["ceiling_per_class"],
         "reconstructions": recog["reconstruction_ceiling_per_class"],
         f"generated, CFG {cfg.sample.cfg_scale:g}": recog["per_class"]}, names,
        title="class accuracy per class (embedded supervised classifier)"), "class_accuracy")

# %%
if recog is not None:
    print(f"class accuracy at CFG {cfg.sample.cfg_scale:g}: {recog['value']:.3f} (real val: "
          f"{recog['ceiling']:.3f}, reconstructions: {recog['reconstruction_ceiling']:.3f}, chance "
          f"{1 / train_set.num_classes:.2f})")
else:
    print("no class accuracy: the tokenizer file carries no supervised classifier, or the generator is "
          "unconditional")

# %%
if recog is not None:
    chance, gap = 1 / train_set.num_classes, recog["value"] - recog["reconstruction_ceiling"]
    display(Markdown(
        f"**What to look for.** The classifier names the intended class for a fraction {recog['value']:.3f} "
        f"of the generated images, against chance {chance:.2f}, {recog['reconstruction_ceiling']:.3f} on "
        f"reconstructions (the decoder's ceiling) and {recog['ceiling']:.3f} on real images: {abs(gap):.3f} "
        f"{'below' if gap < 0 else 'above'} the decoder's ceiling. Classes whose generated bar is far below "
        "their reconstruction bar are the ones the generator has not learnt."))

# %%
if recog is not None:
    assert recog["value"] >= cfg.metrics.min_class_accuracy, \
        f"class accuracy {recog['value']:.3f} < metrics.min_class_accuracy {cfg.metrics.min_class_accuracy}"

# %% [markdown]
# ## 8 · The guidance scale: recognisability against distance
# Classifier-free guidance trades diversity for fidelity: as the scale grows, samples become more typical of
# their class (accuracy rises) while the set as a whole drifts from the real distribution (the FD eventually
# rises). The sweep samples `metrics.sweep_n` images per scale from the same noise.

# %%
sweep = generation_stage.cfg_sweep(cfg, sampler_net, tok, classify, train_set.shape, train_set.num_classes,
                                   real, s.device) if cfg.metrics.cfg_sweep else []

# %%
if sweep and "accuracy" in sweep[0]:
    s.figures.save(viz.cfg_sweep_panels(sweep, ceiling=recog["ceiling"], chance=1 / train_set.num_classes,
                                        fd_floor=floor, recon_ceiling=recog["reconstruction_ceiling"],
                                        title="CFG sweep"), "cfg_sweep")

# %%
for row in sweep:
    print(f"CFG {row['cfg_scale']:>4g}: accuracy {row.get('accuracy', float('nan')):.3f} | "
          + " | ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("fd_")))

# %%
at_one = recog if cfg.sample.cfg_scale == 1.0 else next((r for r in sweep if r["cfg_scale"] == 1.0), None)
acc_cfg1 = None if at_one is None else at_one.get("value", at_one.get("accuracy"))

# %%
if sweep and "accuracy" in sweep[0]:
    lo, hi = sweep[0], sweep[-1]
    trend = "rises" if hi["accuracy"] > lo["accuracy"] else "falls" if hi["accuracy"] < lo["accuracy"] else \
        "does not change"
    best_fd = min(sweep, key=lambda r: r["fd_ssl"])
    display(Markdown(
        f"**What to look for.** From CFG {lo['cfg_scale']:g} to {hi['cfg_scale']:g} the class accuracy "
        f"{trend} ({lo['accuracy']:.3f} → {hi['accuracy']:.3f}) and the SSL FD goes {lo['fd_ssl']:.4g} → "
        f"{hi['fd_ssl']:.4g}, lowest at CFG {best_fd['cfg_scale']:g} (floor {floor:.3g}). The useful scales "
        "are those where the accuracy rises while the FD stays near its lowest."))

# %% [markdown]
# ## 9 · Save and summarise
# `generator.pt` (EMA weights, the tokenizer's hash), `samples.npz`, the PNGs and `evaluation.json` (metrics
# and protocols) stay in the run folder; the summary repeats the headline numbers.

# %%
eval_file = generation_stage.save_evaluation(s.run, records)
summary = s.finish({"joint_run": str(joint_dir), "tokenizer_file": cfg.tokenizer_file, "fit": fit_stats,
                    "latent_fit": fit, "latent_clustering": clusters, "sampling_seconds": sample_s,
                    "curve": points, "cfg_sweep": sweep, "class_accuracy_cfg1": acc_cfg1,
                    "metrics": {r["metric"]: r for r in records},
                    "artifacts": {k: str(v.relative_to(s.run.path)) for k, v in paths.items()},
                    "evaluation": str(eval_file.relative_to(s.run.path)), "checkpoint": "generator.pt"},
                   models=[tok])
print(f"run directory: {s.run.path}")
