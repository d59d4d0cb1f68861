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
# # 50 · Latent visualisation: the reference, the DM latents and the λ = 0 control
#
# > Paper Fig. 4: what the latent space looks like once its aggregate distribution has been matched to the
# > reference. The same class-balanced images are encoded by the DM-trained tokenizer and by the λ = 0 control
# > of notebook 40, embedded in 2-D by t-SNE and UMAP next to the reference itself, and coloured by class.
#
# **What you'll see.** One panel per set and method, with two clustering scores in each panel title: the
# leave-one-out kNN accuracy and the silhouette, computed in the sets' *original* space (comparable across
# sets and methods) and in the 2-D embedding (how much of it the picture shows). A gallery of each class, and
# an explorer (method, classes shown, perplexity / neighbours, an image starred in every panel).
#
# **What it needs.** A finished run of `40_joint_dm_training` (the run of the same `run_name`, else the newest
# at this preset, or `joint_run=<folder>`); its notebook-20 and -30 runs are read from its summary. Time on a
# 2-core CPU: `smoke` ≈ 1 min, `cpu` ≤ 3 min (t-SNE of 2000 points is the bulk).

# %% tags=["parameters"]
preset: str = "smoke"  # "smoke" (CI) | "cpu" (embedded default) | "imagenet256" (GPU)
seed: int = 0  # seeds the subset, PCA, t-SNE and UMAP
device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps" (encoding only; the embeddings run on the CPU)
run_root: str = ""  # "" -> $DMVAE_RUNS or <repo>/runs
run_name: str = ""  # "" -> "<timestamp>_<preset>_s<seed>"; an existing run with the same config is reopened
joint_run: str = ""  # a notebook-40 run folder; "" -> the run named run_name, else the newest at this preset
overrides: dict = {}  # dotted config keys, e.g. {"embed.points": 1000, "embed.methods": ["tsne"]}

# %%
import math

from IPython.display import Markdown, display

from dmvae_lib.runtime.runs import read_summary
from dmvae_lib.stages import joint as joint_stage
from dmvae_lib.stages import latents as latents_stage
from dmvae_lib.viz.tables import config_table, styled
from dmvae_lib.workflow.session import resolve_run_root, start, upstream_run

# %%
joint_dir = upstream_run("40_joint_dm_training", "tokenizer.pt", path=joint_run, run_name=run_name,
                         run_root=run_root, preset=preset)
tok_dir, teacher_dir = latents_stage.joint_upstreams(joint_dir)
s = start("latents", "50_latent_visualization", preset, {"joint_run": str(joint_dir), **overrides},
          seed=seed, device=device, run_root=run_root, run_name=run_name)
cfg = s.cfg
print(f"joint run: {joint_dir}\ntokenizer: {tok_dir}\nteacher: {teacher_dir}\nrun: {s.run.path}")
config_table(cfg)

# %% [markdown]
# ## 1 · The point sets
# One class-balanced subset of the training images (`embed.points` in all), encoded by each tokenizer; the
# reference contributes its own rows (for the default reference "ssl" these *are* the stage-1 latents of the
# same images, so no separate stage-1 panel). The DM latents are taken where the DM loss saw them,
# head(normalize₁(E_DM(x))); the control's are its normalised latents. Everything is flattened to (N, D).

# %%
u = joint_stage.load_upstream(tok_dir, teacher_dir, s.device, resolve_run_root(run_root) / "_cache")
sets, images = latents_stage.collect_sets(cfg, u, joint_dir, s.device)
names = latents_stage.class_names(u.tokenizer_cfg.data.source, u.data)

# %%
for name, ps in sets.items():
    print(f"{name:>22}: {tuple(ps.points.shape)}, {'labelled' if ps.labels is not None else 'no labels'}")
assert all(ps.points.ndim == 2 and ps.points.isfinite().all() for ps in sets.values())

# %%
labels = u.data.train_labels if u.data.train is not None else u.data.val_labels
s.figures.save(latents_stage.class_gallery(images, labels, names, classes=cfg.classes), "class_gallery")

# %%
n_shown = len(cfg.classes) or len(names)
display(Markdown(
    f"**What to look for.** One row per class ({n_shown} shown): the classes that colour every panel below. "
    "Point sets: " + "; ".join(f"{name}, {len(ps.points)} points in {ps.points.shape[1]} dims"
                               for name, ps in sets.items())
    + f". With balanced classes a score that ignores them scores chance, 1/{n_shown} = {1 / n_shown:.2f} "
    "for the kNN accuracy and about 0 for the silhouette."))

# %% [markdown]
# ## 2 · Embeddings, coloured by class
# t-SNE (perplexity `embed.perplexity`) and UMAP (`embed.n_neighbors` neighbours) after PCA to
# `embed.pca_dims` dims, with fixed seeds. Scores (labels are used only here; `metrics.embedding`):
# **kNN** = leave-one-out accuracy of a `knn_k`-nearest-neighbour majority vote (Euclidean),
# $\frac1N \sum_i \big[\operatorname{vote}_k(i) = y_i\big]$ with point i left out of its own neighbours
# (chance = 1/K for K balanced classes); **silhouette** ∈ [−1, 1], the mean over points of
# $$s_i = \frac{b_i - a_i}{\max(a_i, b_i)},$$
# with $a_i$ the mean distance from point i to the other points of its class and $b_i$ the smallest mean
# distance to the points of another class. The D-dim numbers do not depend on the embedding; the 2-D ones do
# (t-SNE and UMAP tend to exaggerate clusters). Hover shows the class and the image index; a legend entry
# toggles a class in every panel.

# %%
cache, scores = {}, {}
for method in cfg.embed.methods:
    emb = latents_stage.embeddings_for(sets, cache, method, cfg)
    scores[method] = latents_stage.score_sets(sets, emb, cfg.knn_k)
    fig = latents_stage.panels_figure(sets, emb, scores[method], names,
                                      title=f"{latents_stage.METHOD_LABELS[method]} by class")
    s.figures.save(fig, f"latents_{method}")

# %%
labelled = [n for n in sets if sets[n].labels is not None]
display(Markdown(
    "**What to look for.** kNN accuracy in the 2-D picture against the original space, per method: "
    + "; ".join(f"{latents_stage.METHOD_LABELS[m]}: " + ", ".join(
        f"{n} {sc[n].knn_2d:.2f} (D-dim {sc[n].knn:.2f})" for n in labelled) for m, sc in scores.items())
    + f". Chance is {1 / n_shown:.2f}. A 2-D score above the D-dim one is the embedding exaggerating "
    "clusters: compare the sets by their D-dim numbers, which no embedding changes."))

# %% [markdown]
# Read the D-dim kNN against chance (1/K) and against the SSL encoder's own kNN on its pooled features
# (notebook 20): flattened latent *maps* keep pose, position and colour for the decoder, so their Euclidean
# neighbours are much less class-driven than the encoder's pooled features (stage-1 latents at `cpu`: kNN ≈
# 0.18 against the encoder's ≈ 0.95). What DM changes is read across the rows, at equal footing.

# %%
ssl_knn = read_summary(tok_dir).get("encoders", {}).get("ssl", {}).get("knn_acc")
print(f"SSL encoder kNN on pooled features (notebook 20): {ssl_knn}")
table = latents_stage.score_table(sets, scores)
styled(table)

# %%
knn_hd = table[("D-dim", "kNN")].dropna()
display(Markdown(
    f"**What to look for.** In the original space the highest kNN is {knn_hd.idxmax()}'s "
    f"({knn_hd.max():.2f}) and the lowest {knn_hd.idxmin()}'s ({knn_hd.min():.2f}), against chance "
    f"{1 / n_shown:.2f}"
    + ("" if ssl_knn is None else f" and the SSL encoder's kNN on its pooled features ({ssl_knn:.2f})")
    + ". A set whose kNN sits far above chance keeps the classes as neighbourhoods; DM's row against the "
    "control's is what λ·L_DM changed."))

# %% [markdown]
# ## 3 · The class-discriminative view
# t-SNE and UMAP keep each point's nearest neighbours, PCA the directions of largest variance; in a latent map
# both are mostly pose, position and colour, so the panels above can look alike while a linear probe
# separates the classes well. Fisher's linear discriminant shows the directions that separate the classes:
# with $S_W$ the within-class and $S_B$ the between-class scatter, it projects on the top eigenvectors of
# $S_W^{-1} S_B$ (shrinkage LDA). Fitted on the shown points it would separate classes in *any* set of this
# dimension, so each set's discriminant is fitted on `embed.discriminant_points` *other* images, and its
# accuracy on the shown points (a held-out linear probe) goes in the table.

# %%
if cfg.embed.discriminant_points:
    fits, _ = latents_stage.collect_sets(cfg, u, joint_dir, s.device, held_out=sets,
                                         n=cfg.embed.discriminant_points)
    lda_emb, lda_acc = latents_stage.discriminant_embeddings(sets, fits)
    lda_scores = latents_stage.score_sets(sets, lda_emb, cfg.knn_k)

# %%
if cfg.embed.discriminant_points:
    fig = latents_stage.panels_figure(sets, lda_emb, lda_scores, names,
                                      title="class-discriminative view (LDA fitted on other images)")
    s.figures.save(fig, "latents_lda")

# %%
if cfg.embed.discriminant_points:
    table[("LDA 2-D", "kNN")] = [lda_scores[n].knn_2d for n in table.index]
    table[("LDA", "held-out acc")] = [lda_acc[n] for n in table.index]
    print("held-out linear accuracy: " + " | ".join(f"{n} {a:.2f}" for n, a in lda_acc.items()))
    display(styled(table))

# %%
acc = {n: a for n, a in lda_acc.items() if not math.isnan(a)} if cfg.embed.discriminant_points else {}
if acc:
    display(Markdown(
        "**What to look for.** Read the held-out accuracy across the rows: it is the class information a "
        "linear map can read off each set, the number the t-SNE picture hides (the LDA panels show it): "
        + ", ".join(f"{n} {a:.2f}" for n, a in acc.items()) + f", chance {1 / n_shown:.2f}. The highest is "
        f"{max(acc, key=acc.get)}'s. Where this ranking differs from the kNN ranking above, the classes are "
        "linearly separable without being neighbourhoods, or the reverse."))

# %% [markdown]
# ## 4 · Explorer
# Changing the method or its parameter embeds all sets again (cached afterwards; t-SNE of 2000 points takes
# about 10 s a set on 2 CPU cores). The class filter only hides points, and the scores follow the classes
# shown. Plotly's hover labels are text only, so the thumbnail lives here: type an image # (from a hover) to
# see it and to star it in every panel; the saved HTML/PNG pair with the class gallery above instead.

# %%
explorer = latents_stage.explorer(sets, cache, cfg, names, images)
explorer

# %% [markdown]
# ## 5 · Checks and summary
# Every score lies in its range; beyond smoke, an encoder-derived reference ("ssl", "supervised") must carry
# class information: its kNN above chance by more than three binomial standard errors.

# %%
chance = 1 / max(len(cfg.classes) or len(names), 1)
hd = next(iter(scores.values()))  # the D-dim scores are the same under every method
assert all(0 <= sc.knn <= 1 and -1 <= sc.silhouette <= 1 for sc in hd.values() if not math.isnan(sc.knn))
ref_name = next(iter(sets))  # the reference comes first
n_ref = len(sets[ref_name].points)
if preset != "smoke" and u.reference.name in ("ssl", "supervised"):
    margin = 3 * math.sqrt(chance * (1 - chance) / n_ref)
    assert hd[ref_name].knn > chance + margin, \
        f"the reference does not cluster by class (kNN {hd[ref_name].knn:.2f})"
seconds = {"/".join(map(str, k)): round(v, 1) for k, v in cache["seconds"].items()}
print(f"chance kNN ≈ {chance:.2f}; embedding seconds {seconds}")

# %%
summary = s.finish({"joint_run": str(joint_dir), "tokenizer_run": str(tok_dir),
                    "teacher_run": str(teacher_dir), "reference": u.reference.name,
                    "points": {n: len(ps.points) for n, ps in sets.items()},
                    "dims": {n: ps.points.shape[1] for n, ps in sets.items()}, "chance_knn": chance,
                    "scores": {m: {n: sc._asdict() for n, sc in sc_m.items()} for m, sc_m in scores.items()},
                    "embed_seconds": seconds,
                    "discriminant": {"fit_points": cfg.embed.discriminant_points,
                                     "held_out_accuracy": lda_acc if cfg.embed.discriminant_points else {}}},
                   models=[u.tokenizer, u.reference])
print(f"run directory: {s.run.path}")
