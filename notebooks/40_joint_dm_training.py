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
# # 40 · Joint distribution-matching training
#
# > The heart of DMVAE (paper §3.2, App. A.3). The tokenizer keeps reconstructing while a
# > distribution-matching term pulls its *aggregate* latent distribution onto the reference: a frozen real net
# > (the teacher of notebook 30) and an online fake net (initialised from it, fitted every step on the current
# > latents) give the direction (x̂_fake − x̂_real)/‖x − x̂_real‖₁ that moves each latent.
#
# **What you'll see.** One DM step taken apart (the direction g and where its gradient goes); joint training
# with λ·L_DM (by default λ = 10, CFG ×5 on both nets, a tokenizer turn every 5 steps; the `cpu` preset turns
# CFG off, `train.cfg_scale` = 1; `cfg.train` in the run's config.json holds this run's values) and the same
# run with λ = 0 as the control;
# DM loss and gradient norm; the distance of the aggregate posterior to the
# reference (Fréchet distance and sliced-W2 on latents) and val PSNR as training goes, for both runs.
#
# **What it needs.** Finished runs of `20_tokenizer_pretraining` and `30_teacher_fitting` (same `run_name`,
# else the newest at this preset, or pass the folders). Time on a 2-core CPU: `smoke` ≈ 1 min, `cpu` ≤ 10 min.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (embedded default) | "imagenet256" (GPU)
seed: int = 0  # seeds initialisation and every generator of the run
device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps"
run_root: str = ""  # "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; an existing run with the same config resumes
tokenizer_run: str = ""  # a notebook-20 run folder; "" -> the run named run_name, else the newest one
teacher_run: str = ""  # a notebook-30 run folder; "" -> likewise
nproc: int = 1  # processes for the training (DDP under torchrun, one node); >1 needs that many GPUs or cores
overrides: dict = {}  # dotted config keys, e.g. {"train.dm_weight": 1.0, "train.cfg_scale": 1.0}

# %%
import pandas as pd
import torch
from IPython.display import Markdown, display

from dmvae_lib.configs.tokenizer import gan_start
from dmvae_lib.runtime.distributed import launch
from dmvae_lib.stages import joint as joint_stage
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import save_head, save_tokenizer
from dmvae_lib.viz import figures as viz
from dmvae_lib.workflow.session import resolve_run_root, start, upstream_run

# %%
up = dict(run_name=run_name, run_root=run_root, preset=preset)
tok_dir = upstream_run("20_tokenizer_pretraining", "tokenizer.pt", path=tokenizer_run, **up)
teacher_dir = upstream_run("30_teacher_fitting", "teacher.pt", path=teacher_run, **up)
s = start("joint", "40_joint_dm_training", preset,
          {"tokenizer_run": str(tok_dir), "teacher_run": str(teacher_dir), **overrides},
          seed=seed, device=device, run_root=run_root, run_name=run_name)
cfg = s.cfg
print(f"tokenizer: {tok_dir}\nteacher: {teacher_dir}\nrun: {s.run.path}\ndevice: {s.device}")

# %% [markdown]
# ## 1 · Load the stage-1 tokenizer, the teacher and its reference
# The teacher is loaded strictly and must have been fitted on latents of *this* tokenizer (its checkpoint
# stores the tokenizer's hash); the reference is rebuilt from notebook 30's latent cache for the diagnostics.

# %%
u = joint_stage.load_upstream(tok_dir, teacher_dir, s.device, resolve_run_root(run_root) / "_cache")
tok, data, ref, latents, encoders = u.tokenizer, u.data, u.reference, u.latents, u.encoders
print(f"reference {ref.name!r} {tuple(ref.shape)}; latents {tuple(latents.shape[1:])}")

# %% [markdown]
# ## 2 · The mechanism: one DM step on a batch
# For latents $z$ (after the projection head), $t \sim U[t_{\min}, t_{\max}]$ and
# $x_t = t\,z + (1-t)\,\epsilon$ (t = 1 is data), each net predicts the data,
# $\hat x = x_t + (1-t)\,v(x_t, t)$. The DM direction (paper Eq. 9, DMD's normalisation) is
# $$g = \frac{\hat x_{\text{fake}} - \hat x_{\text{real}}}{\operatorname{mean}|z - \hat x_{\text{real}}|},
# \qquad L_{\text{DM}} = \tfrac12\,\operatorname{mean}\big(z - \operatorname{sg}(z - g)\big)^2,
# \qquad \frac{\partial L_{\text{DM}}}{\partial z} = \frac{g}{N},$$
# so a descent step moves each latent toward what the real (reference) net denoises to and away from what
# the fake net, which tracks the current latents, denoises to (`core.dmd.dm`). With a class-conditional
# reference and `train.cfg_scale` $s \ne 1$, both nets' velocities are guided,
# $v = v_\varnothing + s\,(v_y - v_\varnothing)$ (`core.samplers.cfg_velocity`, $\varnothing$ the null label).
# The fake net follows the latents by flow matching on them, stop-gradient:
# $\min_\phi \operatorname{mean}\big(v_\phi(x_t, t, \tilde y) - (\operatorname{sg}(z) - \epsilon)\big)^2$.
# The tokenizer's loss is
# $$L = L_{\text{rec}} + w_{\text{disc}}\, w_{\text{adv}}\, L_{\text{GAN}} + \lambda\,L_{\text{DM}},
# \qquad L_{\text{rec}} = \ell_1 \operatorname{mean}|\hat x - x|
# + w_{\text{LPIPS}}\,\mathrm{LPIPS}(\hat x, x),$$
# with the adaptive GAN weight $w_{\text{adv}}$ of notebook 20 (GAN term from `train.disc_start`) and
# $\lambda$ = `train.dm_weight`. $L_{\text{DM}}$ reaches the encoder side (projector, head, and the encoder
# when it trains), never the decoder. Below: one such step on copies, with a fake net fitted briefly to this
# batch (at step 0 the fake equals the teacher and $g = 0$).

# %%
probe = joint_stage.dm_mechanism(cfg, tok, u.teacher, ref, data.train[0][:128], data.train_labels[:128],
                                 s.device, fake_steps=50, seed=seed)

# %%
s.figures.save(viz.dm_mechanism_panels(probe["g_norm"], probe["t"], probe["grad_norm"]), "dm_mechanism")

# %%
print(f"mean ‖g‖ = {probe['g_norm'].mean():.3f}; gradient per part: "
      + ", ".join(f"{k} {v:.2e}" for k, v in probe["grad_norm"].items()))

# %%
noisy = probe["t"] < 0.5
g_lo, g_hi = (float(probe["g_norm"][m].mean()) if m.any() else float("nan") for m in (noisy, ~noisy))
reached = ", ".join(k for k, v in probe["grad_norm"].items() if v > 0) or "no part"
display(Markdown(
    f"**What to look for.** Left: ‖g‖ averages {g_lo:.3f} for t < 0.5 (noisy) and {g_hi:.3f} for t ≥ 0.5; "
    "where it is larger, the fitted fake and the teacher disagree more about what the latents denoise to. "
    f"Right: the gradient of λ·L_DM reaches {reached}; the decoder's bar is "
    f"{probe['grad_norm']['decoder']:.1e}, and must be exactly 0 (the check below)."))

# %%
assert probe["nonfinite"] == 0 and probe["grad_norm"]["decoder"] == 0.0, "L_DM must never reach the decoder"
assert probe["grad_norm"]["projector"] > 0 and probe["g_norm"].mean() > 0

# %% [markdown]
# ## 3 · Joint training (λ = `train.dm_weight`) and the λ = 0 control
# The control runs the same code with the DM term off: same data order, losses and schedule, no fake net and
# no DM forward passes. Diagnostics every `train.eval_every` steps go to `metrics.jsonl`.

# %%
same_shape = tuple(ref.shape) == tuple(latents.shape[1:])  # else the start has no head to compare through
start_diag = joint_stage.latent_diagnostics(tok, torch.nn.Identity(), data.train[0], ref, s.device,
                                            n=cfg.train.eval_samples, seed=seed,
                                            val_u8=data.val[:500]) if same_shape else {}

# %%
if nproc > 1:  # DDP: torchrun trains in nproc processes; the call below then loads the finished checkpoint
    launch(nproc, "dmvae_lib.workflow.ddp_fit", ["joint", str(s.run.path), "--device", device])
dm_tok, head, dm_stats = joint_stage.train_joint(cfg, tok, u.teacher, ref, data, s.run, s.device,
                                                 dm_weight=cfg.train.dm_weight, tag="joint",
                                                 **u.joint_kwargs(cfg))
runs = {"DM": "joint"}

# %%
if cfg.train.control:
    ctl_tok, ctl_head, ctl_stats = joint_stage.train_joint(cfg, tok, u.teacher, ref, data, s.run,
                                                           s.device, dm_weight=0.0, tag="control",
                                                           **u.joint_kwargs(cfg))
    runs["λ = 0 control"] = "control"

# %% [markdown]
# The diagnostics over training, one figure each: the distance of the aggregate posterior head(latents) to
# the reference (Fréchet distance on flattened latents, as in notebook 30, and sliced-W2), then val PSNR.

# %%
hist = {name: joint_stage.eval_history(s.run, tag) for name, tag in runs.items()}
gan_from = gan_start(cfg.train)
gan_on = {"GAN on": gan_from} if gan_from is not None and 0 < gan_from < cfg.train.steps else {}

# %%
def moved(key: str, fmt: str = ".3g") -> str:  # each run's first and last diagnostic, in words
    return "; ".join(f"{name} {h[0][key]:{fmt}} → {h[-1][key]:{fmt}} (step {h[-1]['step']})"
                     for name, h in hist.items())


def versus(key: str, words=("below", "above"), fmt: str = ".3g") -> str:  # where DM ends against the control
    if "λ = 0 control" not in hist:
        return ""
    dm, ctl = hist["DM"][-1][key], hist["λ = 0 control"][-1][key]
    return f" DM ends {words[0] if dm < ctl else words[1]} the control ({dm:{fmt}} vs {ctl:{fmt}})."


# %%
fig = viz.metric_lines(hist, "ref_fd", log_y=True, events=gan_on,
                       title="Fréchet distance of head(latents) to the reference (flattened; not FID)")
s.figures.save(fig, "joint_ref_fd")

# %%
floor_fd = hist["DM"][-1].get("ref_fd_floor", float("nan"))
below = hist["DM"][-1]["ref_fd"] <= floor_fd
display(Markdown(
    f"**What to look for.** FD to the reference, first → last evaluation: {moved('ref_fd')}. Two independent "
    f"reference draws are {floor_fd:.3g} apart (the floor): the closer a curve comes to it, the better the "
    "latents match the reference" + (" (DM's ends at or below it: as close as this measurement can tell)."
                                     if below else ".")
    + f"{versus('ref_fd')} Where both curves bend together at the dashed line, the GAN moved them, not DM."))

# %%
fig = viz.metric_lines(hist, "ref_sw2", log_y=True, title="sliced-W2 of head(latents) to the reference",
                       events=gan_on)
s.figures.save(fig, "joint_ref_sw2")

# %%
display(Markdown(
    f"**What to look for.** Sliced-W2, first → last: {moved('ref_sw2')}.{versus('ref_sw2')} SW2 compares "
    "whole distributions through 1-D projections, not only their means and covariances as FD does: where "
    "the two distances disagree on which run is closer, the difference lies beyond the second moments."))

# %%
fig = viz.metric_lines(hist, "val_psnr", log_y=False, title="val PSNR (dB)", events=gan_on)
s.figures.save(fig, "joint_val_psnr")

# %%
display(Markdown(
    f"**What to look for.** Val PSNR in dB (higher is better), first → last: {moved('val_psnr', '.2f')}"
    + (f"; the stage-1 tokenizer started at {start_diag['val_psnr']:.2f} dB." if start_diag else ".")
    + versus("val_psnr", ("lower than", "higher than"), ".2f")
    + " A DM run below the control pays that gap in reconstruction for λ·L_DM."))

# %%
losses = viz.loss_curves(s.run.read_metrics(), "joint", ("dm_loss", "dm_grad_norm", "fake_fm_loss", "l1"))
s.figures.save(losses, "joint_losses")

# %%
recs = [r for r in s.run.read_metrics() if r.get("tag") == "joint" and "dm_loss" in r]
display(Markdown(
    f"**What to look for.** `dm_loss` is ½·mean(g²), the squared size of the DM direction: "
    f"{recs[0]['dm_loss']:.3g} at step {recs[0]['step']}, {recs[-1]['dm_loss']:.3g} at step "
    f"{recs[-1]['step']}. It does not have to fall: the fake net chases the latents while they chase the "
    "reference, so a flat, finite curve with a bounded `dm_grad_norm` is a healthy run."
    if recs else "**What to look for.** This run has no DM term (λ = 0): only the `l1` curve is drawn."))

# %% [markdown]
# ## 4 · Result: closer to the reference, at what reconstruction cost?
# Read the PSNR curve against the dashed "GAN on" line (`train.disc_start`). The adversarial term trades
# pixel fidelity for sharpness, so a drop that starts there in the DM run and the control alike comes with the
# GAN, not with DM. At the `cpu` preset most of the reconstruction cost appears there (docs/claim-study.md).

# %%
final = {name: h[-1] for name, h in hist.items()}
table = pd.DataFrame({**({"start (stage 1)": start_diag} if start_diag else {}), **final}).T
table = table[[c for c in ("ref_fd", "ref_sw2", "val_psnr", "latent_std") if c in table]]
table

# %%
if "λ = 0 control" in table.index:
    d_fd = table.loc["DM", "ref_fd"] / table.loc["λ = 0 control", "ref_fd"]
    d_psnr = table.loc["DM", "val_psnr"] - table.loc["λ = 0 control", "val_psnr"]
    display(Markdown(
        f"**What to look for.** Against the λ = 0 control, DM ends with an FD to the reference "
        f"{d_fd:.2f}× the control's ({'closer' if d_fd < 1 else 'not closer'}) at {d_psnr:+.2f} dB of val "
        f"PSNR ({'a cost' if d_psnr < 0 else 'no cost'} in reconstruction). Lower FD and SW2 are better, "
        "higher PSNR is better; `latent_std` near 1 says the normalised latents kept their scale."
        + (" At `smoke` the run is too short for either difference to mean much." if preset == "smoke"
           else "")))
else:
    display(Markdown(
        f"**What to look for.** DM ends at FD {table.loc['DM', 'ref_fd']:.3g} to the reference (lower is "
        f"closer) and {table.loc['DM', 'val_psnr']:.2f} dB val PSNR (higher is better); this run has no "
        "λ = 0 control to separate DM's effect from that of training alone."))

# %%
assert dm_stats["nonfinite"] == 0 and ("dm_loss" in dm_stats) == (cfg.train.dm_weight > 0)
if cfg.train.control and preset != "smoke":
    dm_fd, ctl_fd = final["DM"]["ref_fd"], final["λ = 0 control"]["ref_fd"]
    print(f"FD to the reference: DM {dm_fd:.3f} vs control {ctl_fd:.3f}; PSNR gap "
          f"{final['λ = 0 control']['val_psnr'] - final['DM']['val_psnr']:.2f} dB")

# %% [markdown]
# ## 5 · Save
# The DM-trained tokenizer (latent mean and scale re-measured after DM, for the generator of notebook 60), its
# projection head, and the control tokenizer (the λ = 0 baseline of the reference study).

# %%
m = tokenizer_stage.evaluate_tokenizer(dm_tok, data, s.device, encoders.get("ssl"), 500)
trained = {"trained_encoder": cfg.train.train_encoder}  # the encoder itself is saved only when it trained
save_tokenizer(s.run.path / "tokenizer.pt", u.tokenizer_cfg, dm_tok, encoders, **trained)
save_head(s.run.path / "head.pt", head, ref)
out = {"dm": {**final["DM"], **{k: v for k, v in m.items() if not k.startswith("fd")}}}
out["dm"].update({"refine": dm_stats["refine"]} if "refine" in dm_stats else {})

# %%
if cfg.train.control:
    mc = tokenizer_stage.evaluate_tokenizer(ctl_tok, data, s.device, encoders.get("ssl"), 500)
    save_tokenizer(s.run.path / "control_tokenizer.pt", u.tokenizer_cfg, ctl_tok, encoders, **trained)
    out["control"] = {**final["λ = 0 control"], **{k: v for k, v in mc.items() if not k.startswith("fd")}}
    out["control"].update({"refine": ctl_stats["refine"]} if "refine" in ctl_stats else {})

# %%
summary = s.finish({"tokenizer_run": str(tok_dir), "teacher_run": str(teacher_dir), "reference": ref.name,
                    "start": start_diag, **out, "checkpoint": "tokenizer.pt"}, models=[dm_tok, ref])
print(f"run directory: {s.run.path}")
