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
# # 20 · Tokenizer pretraining: reference encoders, then a frozen-encoder autoencoder
#
# > DMVAE's stage 1 (paper App. A.1): a frozen encoder (DINOv2-L at full scale; here a self-supervised CNN
# > the workbook trains itself) → a per-token MLP projector → a low-dimensional latent → a Flux-style
# > convolutional decoder, trained with L1 (+ LPIPS) + an adaptive hinge GAN. Its latents become the
# > reference distribution of the next stages.
#
# **What you'll see.** The embedded dataset; a self-supervised encoder trained *without labels* (labels
# only score it, by kNN and a linear probe) and a supervised classifier of the same backbone (the paper's
# "ResNet features" reference); the tokenizer's losses, reconstructions and metrics (PSNR, SSIM, LPIPS, and a
# Fréchet distance *in the SSL encoder's feature space*, which is not FID); a checkpoint later notebooks load.
#
# **What it needs.** Nothing upstream (`imagenet256`: a local ImageNet folder and DINOv2 weights, see the
# README). Time on a 2-core CPU: `smoke` ≈ 1 min; `cpu` ≤ 8 min.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (embedded default) | "imagenet256" (GPU, local data and weights)
seed: int = 0  # seeds data generation, initialisation and every generator of the run
device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps"
run_root: str = ""  # parent of the run folders; "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; an existing run with the same config resumes
nproc: int = 1  # processes for the training (DDP under torchrun, one node); >1 needs that many GPUs or cores
overrides: dict = {}  # dotted config keys, e.g. {"train.steps": 2000, "encoder.ssl.steps": 1500}

# %%
from IPython.display import Markdown, display

from dmvae_lib.configs.tokenizer import gan_start
from dmvae_lib.data.images import load_data
from dmvae_lib.data.pixels import to_float
from dmvae_lib.metrics.reconstruction import reconstruct
from dmvae_lib.runtime.distributed import launch
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import build_tokenizer, save_tokenizer, tokenizer_backbone
from dmvae_lib.viz import figures as viz
from dmvae_lib.viz.tables import config_table
from dmvae_lib.workflow.session import resolve_run_root, start

# %%
s = start("tokenizer", "20_tokenizer_pretraining", preset, overrides, seed=seed, device=device,
          run_root=run_root, run_name=run_name)
cfg = s.cfg
print(f"run: {s.run.path}\ndevice: {s.device}")
config_table(cfg)

# %% [markdown]
# ## 1 · Data
# The embedded set: 10 shape classes rendered at 32×32 with random colour, scale, position, rotation,
# background gradient, texture and noise. Each instance is rendered twice with independent nuisances
# ("paired views"): a label-free augmentation for self-supervised learning.

# %%
data = load_data(cfg, resolve_run_root(run_root) / "_cache")
print(f"val: {tuple(data.val.shape)}" + ("" if data.train is None else f", train: {tuple(data.train.shape)}"))
rows = {f"class {c}": to_float(data.val[data.val_labels == c][:12])
        for c in range(int(data.val_labels.max()) + 1)}

# %%
s.figures.save(viz.image_grid(rows, title="validation images by class"), "data_grid")

# %%
n_classes = len(rows)
display(Markdown(
    f"**What to look for.** {len(data.val):,} validation images in {n_classes} classes, one row each: the "
    "shape is the class, colour, scale, position, rotation and background are nuisances. Every class score "
    f"below is read against chance, 1/{n_classes} = {1 / n_classes:.2f}."))

# %% [markdown]
# ## 2 · Reference encoders
# The SSL encoder plays DINOv2's role. kNN accuracy (k = 20, cosine, weighted votes) on the validation
# split measures whether its features discover the classes; the supervised classifier, trained with the
# labels, is the upper bound a label-free encoder is compared with.

# %%
encoders = tokenizer_stage.reference_encoders(cfg, data, s.run, s.device)
table = tokenizer_stage.encoder_table(encoders)
table

# %%
if cfg.encoder.kind != "timm":
    knn = encoders["ssl_scores"]["knn_acc"]
    assert knn > 0.12, f"SSL features are at chance (kNN {knn:.3f})"
    print(f"SSL kNN accuracy {knn:.3f} (chance 0.10)")

# %%
if not table.empty:
    best = {col: table[col].idxmax() for col in ("knn_acc", "linear_acc") if col in table}
    gap = (table.loc["supervised", "linear_acc"] - table.loc["ssl", "linear_acc"]
           if {"ssl", "supervised"} <= set(table.index) else None)
    sup = ("" if gap is None else f" The supervised linear probe is {abs(gap):.3f} " + (
        "above the SSL one, the upper bound it should be." if gap >= 0 else
        "below the SSL one: the classifier is undertrained at this preset, not a sign that labels hurt."))
    display(Markdown(
        "**What to look for.** " + "; ".join(f"`{col}` is highest for {name} ({table.loc[name, col]:.3f})"
                                            for col, name in best.items())
        + f", against chance {1 / n_classes:.2f}. An SSL row well above chance means the features found the "
        "classes without labels." + sup))

# %% [markdown]
# ## 3 · Train the tokenizer
# Frozen encoder (+ its colour-preserving stem) → projector → z → decoder. The loss
# (`train.phases.tokenizer_step`, `models.recon_losses`) is
# $$L = \underbrace{\ell_1 \operatorname{mean}|\hat x - x| + \ell_2 \operatorname{mean}(\hat x - x)^2
# + w_{\text{LPIPS}}\,\mathrm{LPIPS}(\hat x, x)}_{L_{\text{rec}}}
# + w_{\text{disc}}\, w_{\text{adv}}\, L_{\text{GAN}} + L_{\text{align}},
# \qquad L_{\text{GAN}} = -\operatorname{mean} D\big(\mathrm{DiffAug}(\hat x)\big),$$
# $$w_{\text{adv}} = \operatorname{clamp}\Big(\frac{\lVert \nabla_W L_{\text{rec}} \rVert}
# {\lVert \nabla_W L_{\text{GAN}} \rVert + 10^{-6}},\ 0,\ 10^4\Big)$$
# with W the decoder's last convolution (VQGAN's adaptive weight), $\ell_1$, $\ell_2$, $w_{\text{LPIPS}}$
# and $w_{\text{disc}}$ = `train.l1`, `train.l2`, `train.lpips_weight`, `train.disc_weight`; the LPIPS term
# only when the VGG16 weights are local, the GAN term only from `train.disc_start`. The PatchGAN $D$ is
# trained on the hinge loss
# $\tfrac12\big[\operatorname{mean}\,\mathrm{relu}(1 - D(A(x))) + \operatorname{mean}\,\mathrm{relu}(1 +
# D(A(\operatorname{sg}\hat x)))\big]$ with DiffAug $A$ and consistency regularisation. $L_{\text{align}}$
# aligns z with the encoder's semantic features (VA-VAE's VF loss, `train.align_*`): without it the projector
# reconstructs through the stem and the latents lose the classes. The EMA of the projector and decoder is
# evaluated and saved.

# %%
tokenizer = build_tokenizer(cfg, tokenizer_backbone(cfg, encoders))

# %%
if nproc > 1:  # DDP: torchrun trains in nproc processes; the call below then loads the finished checkpoint
    launch(nproc, "dmvae_lib.workflow.ddp_fit", ["tokenizer", str(s.run.path), "--device", device])
tokenizer, train_stats = tokenizer_stage.train_tokenizer(cfg, tokenizer, data, s.run, s.device)
print(f"LPIPS in the loss: {train_stats['lpips_in_loss']}")

# %%
s.figures.save(viz.loss_curves(s.run.read_metrics(), "tokenizer", ("l1", "g_loss", "d_loss")),
               "tokenizer_losses")

# %%
first = next(r for r in s.run.read_metrics() if r.get("tag") == "tokenizer")
assert train_stats["l1"] < first["l1"], "the reconstruction loss did not decrease"

# %%
l1_end, tc = float(train_stats["l1"]), cfg.train
gan_from = gan_start(tc)
gan_text = (f" `g_loss` and `d_loss` appear from step {gan_from} (`train.disc_start`), when the GAN "
            "term starts: a bend of the L1 curve there is the adversarial term trading pixel accuracy for "
            "sharpness."
            if gan_from is not None and gan_from < tc.steps else " The GAN term stays off in this run.")
display(Markdown(
    f"**What to look for.** The L1 reconstruction loss goes from {first['l1']:.4f} at step {first['step']} "
    f"to {l1_end:.4f} ({100 * (1 - l1_end / first['l1']):.0f} % lower; the check asks for any decrease)."
    + gan_text))

# %% [markdown]
# ## 4 · Reconstructions and metrics
# PSNR per image on [0, 1], $\mathrm{PSNR} = -10 \log_{10} \operatorname{mean}(\hat x - x)^2$ (averaged over
# the val images), and SSIM; LPIPS (labelled "random backbone" when the VGG16 weights are not local: then it
# is not a perceptual metric); the Fréchet distance between originals and reconstructions in the SSL
# encoder's pooled-feature space (labelled; real rFID needs the Inception weights, see the README), between
# Gaussians fitted to the two feature sets (`metrics.image_metrics.frechet_distance`):
# $$\mathrm{FD} = \lVert \mu_a - \mu_b \rVert^2 + \operatorname{tr}\Big(\Sigma_a + \Sigma_b
# - 2\big(\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}\big)^{1/2}\Big).$$

# %%
metrics = tokenizer_stage.evaluate_tokenizer(tokenizer, data, s.device, encoders.get("ssl"),
                                             cfg.train.eval_batch)

# %%
x_hat, _ = reconstruct(tokenizer, data.val[:16], s.device)
s.figures.save(viz.image_grid({"original": to_float(data.val[:16]), "reconstruction": x_hat}),
               "reconstructions")
metrics

# %%
fd_text = (f" The FD of {metrics['fd']:.3g} ({metrics['fd_label']}) is 0 for a perfect tokenizer."
           if "fd" in metrics else "")
display(Markdown(
    f"**What to look for.** Val PSNR {metrics['psnr']:.2f} dB "
    f"({'above' if metrics['psnr'] >= cfg.checks.min_psnr else 'below'} this preset's floor of "
    f"{cfg.checks.min_psnr} dB; higher is better), SSIM {metrics['ssim']:.3f} (1 = identical) and "
    f"{metrics['lpips_label']} {metrics['lpips']:.3f} (0 = identical). In the grid, compare each "
    f"reconstruction with the original above it: shape and colour should survive, fine texture may not."
    + fd_text))

# %% [markdown]
# **Do the latents keep the classes?** They become the `ssl` reference distribution of the next stages, so
# they should carry the encoder's semantics: a linear probe and a kNN on the flattened normalised latents,
# fit on labelled train latents and scored on the val split (chance 0.10 on the shapes).

# %%
latent_probe = tokenizer_stage.latent_probe(tokenizer, data, s.device, cfg.checks.probe_train,
                                            cfg.encoder.knn_k)
latent_probe

# %%
ssl_knn = encoders.get("ssl_scores", {}).get("knn_acc")
display(Markdown(
    f"**What to look for.** On {latent_probe['dim']}-dim latents, the linear probe reaches "
    f"{latent_probe['linear_acc']:.3f} and the kNN {latent_probe['knn_acc']:.3f}, against chance "
    f"{1 / n_classes:.2f} and the check's floor of {cfg.checks.min_latent_linear} for the probe"
    + ("." if ssl_knn is None else f"; the SSL encoder's own kNN was {ssl_knn:.3f}.")
    + " A probe well above chance means the reference the next notebooks match carries the classes."))

# %%
c = cfg.checks
assert metrics["psnr"] >= c.min_psnr, f"val PSNR {metrics['psnr']:.2f} dB < {c.min_psnr} dB"
assert latent_probe["linear_acc"] >= c.min_latent_linear, \
    f"latent linear probe {latent_probe['linear_acc']:.3f} < {c.min_latent_linear}"

# %%
save_tokenizer(s.run.path / "tokenizer.pt", cfg, tokenizer, encoders, trained_encoder=cfg.train.train_encoder)

# %% [markdown]
# ## 5 · Summary

# %%
summary = s.finish({"encoders": tokenizer_stage.encoder_scores(encoders), "tokenizer": metrics,
                    "latent_probe": latent_probe,
                    "checkpoint": "tokenizer.pt"}, models=[tokenizer])
print(f"run directory: {s.run.path}")
print("\n".join(summary["figures"]))
