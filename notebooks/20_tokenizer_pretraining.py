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
from dmvae_lib.data.images import load_data
from dmvae_lib.data.pixels import to_float
from dmvae_lib.metrics.reconstruction import reconstruct
from dmvae_lib.runtime.distributed import launch
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import build_tokenizer, save_tokenizer, tokenizer_backbone
from dmvae_lib.viz import figures as viz
from dmvae_lib.viz.tables import config_table
from dmvae_lib.workflow.session import resolve_run_root, start

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
s.figures.save(viz.image_grid(rows, title="validation images by class"), "data_grid")

# %% [markdown]
# ## 2 · Reference encoders
# The SSL encoder plays DINOv2's role. kNN accuracy (k = 20, cosine, weighted votes) on the validation
# split measures whether its features discover the classes; the supervised classifier is the upper bound.

# %%
encoders = tokenizer_stage.reference_encoders(cfg, data, s.run, s.device)
table = tokenizer_stage.encoder_table(encoders)
table

# %%
if cfg.encoder.kind != "timm":
    knn = encoders["ssl_scores"]["knn_acc"]
    assert knn > 0.12, f"SSL features are at chance (kNN {knn:.3f})"
    print(f"SSL kNN accuracy {knn:.3f} (chance 0.10)")

# %% [markdown]
# ## 3 · Train the tokenizer
# Frozen encoder (+ its colour-preserving stem) → projector → z → decoder. Loss: L1 (+ LPIPS when the VGG16
# weights are local) + `disc_weight` × adaptive weight × hinge-GAN term from `train.disc_start`, with DiffAug
# and consistency regularisation on the PatchGAN, + a semantic alignment of z with the encoder's semantic
# features (VA-VAE's VF loss, `train.align_*`): without it the projector reconstructs through the stem and the
# latents lose the classes. The EMA of the projector and decoder is evaluated and saved.

# %%
tokenizer = build_tokenizer(cfg, tokenizer_backbone(cfg, encoders))
if nproc > 1:  # DDP: torchrun trains in nproc processes; the call below then loads the finished checkpoint
    launch(nproc, "dmvae_lib.workflow.ddp_fit", ["tokenizer", str(s.run.path), "--device", device])
tokenizer, train_stats = tokenizer_stage.train_tokenizer(cfg, tokenizer, data, s.run, s.device)
print(f"LPIPS in the loss: {train_stats['lpips_in_loss']}")
s.figures.save(tokenizer_stage.loss_curves(s.run, "tokenizer", ("l1", "g_loss", "d_loss")),
               "tokenizer_losses")

# %%
first = next(r for r in s.run.read_metrics() if r.get("tag") == "tokenizer")
assert train_stats["l1"] < first["l1"], "the reconstruction loss did not decrease"

# %% [markdown]
# ## 4 · Reconstructions and metrics
# PSNR and SSIM on [0, 1]; LPIPS (labelled "random backbone" when the VGG16 weights are not local: then it
# is not a perceptual metric); the Fréchet distance between originals and reconstructions in the SSL
# encoder's pooled-feature space (labelled; real rFID needs the Inception weights, see the README).

# %%
metrics = tokenizer_stage.evaluate_tokenizer(tokenizer, data, s.device, encoders.get("ssl"),
                                             cfg.train.eval_batch)
x_hat, _ = reconstruct(tokenizer, data.val[:16], s.device)
s.figures.save(viz.image_grid({"original": to_float(data.val[:16]), "reconstruction": x_hat}),
               "reconstructions")
metrics

# %% [markdown]
# **Do the latents keep the classes?** They become the `ssl` reference distribution of the next stages, so
# they should carry the encoder's semantics: a linear probe and a kNN on the flattened normalised latents,
# fit on labelled train latents and scored on the val split (chance 0.10 on the shapes).

# %%
latent_probe = tokenizer_stage.latent_probe(tokenizer, data, s.device, cfg.checks.probe_train,
                                            cfg.encoder.knn_k)
latent_probe

# %%
c = cfg.checks
assert metrics["psnr"] >= c.min_psnr, f"val PSNR {metrics['psnr']:.2f} dB < {c.min_psnr} dB"
assert latent_probe["linear_acc"] >= c.min_latent_linear, \
    f"latent linear probe {latent_probe['linear_acc']:.3f} < {c.min_latent_linear}"
save_tokenizer(s.run.path / "tokenizer.pt", cfg, tokenizer, encoders, trained_encoder=cfg.train.train_encoder)

# %% [markdown]
# ## 5 · Summary

# %%
summary = s.finish({"encoders": tokenizer_stage.encoder_scores(encoders), "tokenizer": metrics,
                    "latent_probe": latent_probe,
                    "checkpoint": "tokenizer.pt"})
print(f"run directory: {s.run.path}")
print("\n".join(summary["figures"]))
