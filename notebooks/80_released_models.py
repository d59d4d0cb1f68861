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
# # 80 · The authors' released models: load, reconstruct, look, sample, score
#
# > The DMVAE authors released their trained tokenizer and LightningDiT-XL/1 generators (Hugging Face
# > `sen-ye/dmvae`: `vae.pt`; `ep64.pt`, `ep400.pt`, `ep800.pt`, paper Tab. 3: gFID 3.22 / 1.82 / 1.64).
# > This notebook runs them through this workbook's models — converted key by key, checked, hashed — on your
# > images: reconstructions with their metrics, the latents embedded by class (paper Fig. 4), samples with
# > and without classifier-free guidance, and optionally N samples in the ADM format with FID / IS.
#
# **What you'll see.** The files and their SHA-256; a table of PSNR / SSIM / LPIPS / rFID with the protocol;
# originals over reconstructions; t-SNE/UMAP of the latents coloured by class, with kNN and silhouette scores
# and an explorer; a grid of samples per CFG scale (same noise); FID / IS when asked for and possible.
#
# **What it needs.** At `imagenet256` (one GPU): the released files (`tokenizer_path`, `generator_path`, or
# the Hugging Face cache; `DMVAE_FETCH_WEIGHTS=1` downloads them into it) and a folder of your images as
# `images/<class>/<file>` (e.g. ImageNet's val split). At `smoke` and `cpu` it runs the **tiny authors-format
# fixture** (random weights made with the authors' code, `tests/fixtures/released/`) on a shapes folder it
# writes itself: the pictures are noise, the path is the GPU run's. Time on 2 CPU cores: `smoke` ≈ 1 min.

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (the fixture, more samples) | "imagenet256" (the released files)
seed: int = 0  # seeds the image subset, the sampling noise and the embeddings
device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps"
run_root: str = ""  # "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; an existing run with the same config resumes
tokenizer_path: str = ""  # your vae.pt; "" -> the Hugging Face cache (imagenet256) or the fixture
generator_path: str = ""  # your ep*.pt; "" -> files.generator_name in the Hugging Face cache, or the fixture
images: str = ""  # a folder <class>/<image> to reconstruct and embed; "" -> none (the fixture writes one)
overrides: dict = {}  # dotted config keys, e.g. {"files.generator_name": "ep64.pt", "fid.n": 50000}

# %%
import math

from IPython.display import Markdown, display

from dmvae_lib.data.pixels import to_float
from dmvae_lib.stages import latents as latents_stage
from dmvae_lib.stages import released as released_stage
from dmvae_lib.viz import figures as viz
from dmvae_lib.viz.tables import config_table
from dmvae_lib.workflow.session import start

# %%
files = {"files.tokenizer": tokenizer_path, "files.generator": generator_path, "images.folder": images}
s = start("released", "80_released_models", preset, {**files, **overrides}, seed=seed, device=device,
          run_root=run_root, run_name=run_name)
cfg = s.cfg
print(f"run: {s.run.path}\ndevice: {s.device}")
config_table(cfg)

# %% [markdown]
# ## 1 · The files, converted
# Each file is CRC-checked, read as tensors only (no pickled code unless `files.trust_pickle`), converted by
# `models/released.py` (renames, q/k/v concatenated, the decoder's levels reordered; every missing,
# unexpected or mis-shaped key named in one error) and loaded strictly. The generator runs in our
# LightningDiT with the authors' time embedding (t, not 1000·t) and position-table order. Latents are
# `(z − 0.0685)·0.1763`.

# %%
models = released_stage.load_models(cfg, s.run, s.device)
for name, info in models.files.items():
    print(f"{name:>9}: {info['file']} [{info['entry']}] sha256 {info['sha256']}")
print(f"latents: {models.latent_shape}; generator classes: {cfg.generator.num_classes}")

# %% [markdown]
# At the fixture presets the loaded models are checked against what the authors' own modules output on the
# fixture's inputs (max |ours − theirs| / max |theirs|; fp32 rounding alone reaches ≈ 1e-6).

# %%
check = released_stage.fixture_check(models) if cfg.files.fixture else {}
print("agreement with the authors' modules: " + (", ".join(f"{k} {v:.1e}" for k, v in check.items())
                                                 or "(no fixture: the released files)"))
assert all(v < 1e-4 for v in check.values()), check

# %% [markdown]
# ## 2 · Reconstructing your images
# Up to `images.n` images of the folder (a seeded class-balanced subset), ADM-centre-cropped to the
# tokenizer's size, encoded and decoded. **PSNR** per image over all pixels in [0, 1],
# $10\log_{10}(1/\mathrm{MSE})$, then the mean; **SSIM** (11×11 Gaussian window, σ 1.5); **LPIPS** (VGG,
# when its file is local); **rFID**: Inception FID of the reconstructions against the same originals
# (torch-fidelity's weights, local only).
# rFID on a few thousand images is biased upward against the paper's 50k-image figure: compare like with like.

# %%
folder = cfg.images.folder or (str(released_stage.write_fixture_images(
    s.run.path / released_stage.FIXTURE_IMAGES, cfg.images.n, seed)) if cfg.files.fixture else "")
if folder:
    originals, labels, folders, paths = released_stage.read_images(folder, cfg.tokenizer.image_size,
                                                                   cfg.images, seed)
    recon, z, rec = released_stage.reconstruction_metrics(models.tokenizer, originals, s.device, cfg.images,
                                                          folder)
    names = released_stage.readable_names(folders)
    display(Markdown(f"**{len(originals)} images** of {len(folders)} classes from `{folder}`: "
                     + ", ".join(f"{k} {rec[k]:.4g}" if rec[k] is not None else f"{k} not measured"
                                 for k in ("psnr", "ssim", "lpips", "rfid"))
                     + f". LPIPS: {rec['lpips_label']}. rFID features: {rec['protocol']['rfid_features']}."))
else:
    print("no image folder (images=...): sections 2 and 3 are skipped")

# %%
if folder:
    k = min(8, len(originals))
    fig = viz.image_grid({"originals": to_float(originals[:k]),
                          "reconstructions": to_float(recon[:k])},
                         title="Originals (top) and reconstructions (bottom)")
    s.figures.save(fig, "reconstructions")

# %% [markdown]
# ## 3 · The latents by class (paper Fig. 4)
# The normalised latents of the images above, flattened (what the generator models), and their mean over
# tokens (C numbers an image, where position averages out), embedded by t-SNE / UMAP after PCA and coloured by
# class folder. Scores as in notebook 50: leave-one-out **kNN** accuracy (chance 1/K) and **silhouette**, in
# the original space and in 2-D. DM pulled these latents toward DINOv2's feature distribution: a kNN far
# above chance in the original space is that semantic structure.

# %%
if folder:
    sets = released_stage.latent_sets(models.tokenizer, z, labels)
    cache, scores = {}, {}
    for method in cfg.embed.methods:
        emb = latents_stage.embeddings_for(sets, cache, method, cfg)
        scores[method] = latents_stage.score_sets(sets, emb, cfg.knn_k)
        title = f"{latents_stage.METHOD_LABELS[method]} of the released latents"
        fig = latents_stage.panels_figure(sets, emb, scores[method], names, title=title)
        s.figures.save(fig, f"latents_{method}")

# %%
if folder:
    table = latents_stage.score_table(sets, scores)
    display(table)
    first = next(iter(scores.values()))
    display(Markdown("**What to look for.** kNN in the original space against chance "
                     f"{1 / len(folders):.2f}: " + ", ".join(f"{n} {sc.knn:.2f}" for n, sc in first.items())
                     + ". At the fixture presets the weights are random: these sit near chance."))

# %% [markdown]
# **Explorer**: method, classes shown, perplexity / neighbours, and an image starred in every panel.

# %%
explorer = latents_stage.explorer(sets, cache, cfg, names, originals) if folder else None
explorer

# %% [markdown]
# ## 4 · Samples, with and without guidance
# `grid.per_class` samples for each class of `grid.classes`, once per CFG scale in `grid.cfg_scales`, from the
# same noise: $v = v_\varnothing + w\,(v_y - v_\varnothing)$ for t in `sample.cfg_interval` (t = 0 noise, 1
# data), w = 1 elsewhere. The sampler is `sample.sampler` (the authors evaluate with the SDE, 250 steps; their
# own 50k script ignores CFG, here it applies).

# %%
grid = released_stage.sample_grid(models, cfg, s.device)
class_names = released_stage.generator_class_names(cfg.generator.num_classes)
for scale, imgs in grid.items():
    rows = released_stage.grid_rows(imgs, cfg.grid.classes, cfg.grid.per_class, class_names)
    s.figures.save(viz.image_grid(rows, title=f"{cfg.sample.sampler.upper()}, {cfg.sample.steps} steps, "
                                  f"CFG {scale:g} (interval {list(cfg.sample.cfg_interval)})"),
                   f"samples_cfg{scale:g}")

# %% [markdown]
# ## 5 · N samples for FID (optional: `fid.n`)
# `fid.n` class-balanced samples (label i mod classes, as the authors' 50k script) with the `sample` settings,
# made in resumable parts of 1,000, saved as `samples.npz` in the ADM evaluator's format (a finished
# run reads it back). FID needs an ADM
# reference batch (`fid.reference_batch`, e.g. `VIRTUAL_imagenet256_labeled.npz`) and the Inception weights;
# without them the run says which is missing. gFID-50K: `{"fid.n": 50000}`, the SDE, CFG 1 (Tab. 3).

# %%
fid = None
if cfg.fid.n:
    fid_images, fid_labels, npz = released_stage.fid_samples(models, cfg, s.run, s.device)
    fid = released_stage.fid_metrics(fid_images, npz, cfg, s.device)
    print({k: fid[k] for k in ("fid", "inception_score", "precision", "recall", "reason") if k in fid})

# %% [markdown]
# ## 6 · Checks and summary

# %%
assert all(tuple(v.shape[1:3]) == (cfg.tokenizer.image_size,) * 2 for v in grid.values())
assert all(len(v) == len(cfg.grid.classes) * cfg.grid.per_class for v in grid.values())
if folder:
    assert recon.shape == originals.shape and math.isfinite(rec["psnr"]) and math.isfinite(rec["ssim"])
    assert all(0 <= sc.knn <= 1 for sc in next(iter(scores.values())).values())
if fid is not None:
    assert len(fid_images) == cfg.fid.n and fid["npz"]
headline = released_stage.summary_numbers(rec if folder else {}, first if folder else {}, fid)
print(headline)

# %%
summary = s.finish({"files": models.files, "fixture_check": check, "images": rec if folder else None,
                    "headline": headline, "grid": {"classes": list(cfg.grid.classes),
                                                   "cfg_scales": list(cfg.grid.cfg_scales)},
                    "fid": fid}, models=[models.tokenizer, models.generator])
print(f"run directory: {s.run.path}")
