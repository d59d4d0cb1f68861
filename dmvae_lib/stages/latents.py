"""Notebook 50 orchestration (paper Fig. 4): which point sets are embedded, and how they are drawn.

Sets, all flattened to (N, D) on one class-balanced subset of the images (the same images in every
encoded set):
  * the reference, in reference space (rows of its bank, without replacement; for reference "ssl" the bank is
    the stage-1 latents of the training images, so the same images are taken);
  * the stage-1 latents, normalize₁(E₁(x)), unless the reference is exactly those;
  * the DM latents in the space the DM loss matched: head(normalize₁(E_DM(x))). notebook 40 trains with the
    stage-1 mean/scale and re-measures them only when saving, so the stage-1 tokenizer normalises here; the
    head is the identity when the reference has the latents' shape;
  * the λ = 0 control's normalised latents (no head: its head never trained).
Then 2-D embeddings per method (cached per (method, perplexity | n_neighbours)), clustering scores per set
(`embedding.clustering_scores`, in the original space and in 2-D), one panel per set, and a widget explorer.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from ..configs.latents import EMBED_METHODS, LatentsStageConfig
from ..data.image_folders import CIFAR10_CLASSES
from ..data.images import ImageData
from ..data.pixels import to_float
from ..data.shapes_dataset import CLASS_NAMES
from ..metrics import embedding
from ..metrics.embedding import PointSet
from ..models.tokenizer import Tokenizer
from ..runtime.runs import SUMMARY, RunError
from ..train.artifacts import load_head, load_tokenizer
from ..viz import figures as viz
from ..viz.explorer import Explorer


def joint_upstreams(joint_dir: Path) -> tuple[Path, Path]:
    """The notebook-20 and notebook-30 run folders a
    notebook-40 run was trained from (its summary, else config)."""
    joint_dir = Path(joint_dir)
    for file, keys in ((SUMMARY, ()), ("config.json", ("config",))):
        rec = json.loads((joint_dir / file).read_text()) if (joint_dir / file).is_file() else {}
        for key in keys:
            rec = rec.get(key, {})
        if rec.get("tokenizer_run") and rec.get("teacher_run"):
            return Path(rec["tokenizer_run"]), Path(rec["teacher_run"])
    raise RunError(f"{joint_dir} names no tokenizer_run/teacher_run in summary.json or config.json")


def dm_weight(joint_dir: Path) -> float:
    """λ of a notebook-40 run (from its config.json)."""
    return float(json.loads((Path(joint_dir) / "config.json").read_text())["config"]["train"]["dm_weight"])


def class_names(source: str, data: ImageData) -> list[str]:
    """Readable class names of the dataset (indices as strings when unknown)."""
    if source == "shapes":
        return list(CLASS_NAMES)
    if source == "cifar10":
        return list(CIFAR10_CLASSES)
    names = list(getattr(data.folder, "classes", []))
    return names or [str(i) for i in range(int(data.val_labels.max()) + 1)]


@torch.no_grad()
def encode(tok: Tokenizer, images_u8: Tensor, device, *, batch: int = 500,
           normalizer: Tokenizer | None = None, head: nn.Module | None = None) -> Tensor:
    """head(normalizer.normalize(tok.encode(x))) of uint8
    images (N, H, W, 3), flattened to (N, D) on the CPU."""
    norm, head = normalizer or tok, (head or nn.Identity()).to(device)
    out = []
    for s in range(0, len(images_u8), batch):
        z = tok.encode(to_float(images_u8[s:s + batch]).to(device)).float()
        out.append(head(norm.normalize(z)).float().flatten(1).cpu())  # (B, C, H, W) -> (B, D)
    return torch.cat(out)


def reference_set(ref, n: int, seed: int, classes: Sequence[int], aligned_index: Tensor | None,
                  exclude: Tensor | None = None) -> PointSet:
    """Reference points: bank rows (class-balanced, no repeats, none of `exclude`) when it has a labelled
    bank, else fresh samples. `aligned_index`: the image rows to take when the bank is row-aligned with the
    images (reference "ssl")."""
    bank, labels = getattr(ref, "bank", None), getattr(ref, "labels", None)
    if bank is not None and labels is not None:
        rows = aligned_index if aligned_index is not None else \
            embedding.balanced_indices(labels, n, seed=seed, classes=classes, exclude=exclude)
        return PointSet(bank[rows].float().flatten(1), labels[rows], aligned_index, rows)
    x, y = ref.sample(n, torch.Generator().manual_seed(seed if exclude is None else seed + 1))
    return PointSet(x.float().flatten(1).cpu(), None if y is None else y.cpu(), None)


def collect_sets(cfg: LatentsStageConfig, upstream, joint_dir: Path, device, *,
                 held_out: Mapping[str, PointSet] | None = None,
                 n: int | None = None) -> tuple[dict[str, PointSet], Tensor]:
    """The point sets to embed (see the module docstring) and the uint8 images (M, H, W, 3) they index.
    With `held_out` (sets returned before), `n` other images and bank rows: a disjoint set to fit on."""
    data, ref, stage1 = upstream.data, upstream.reference, upstream.tokenizer
    images, labels = (data.train[0], data.train_labels) if data.train is not None else (data.val,
                                                                                        data.val_labels)
    n = n or cfg.embed.points
    shown = next(iter(held_out.values())) if held_out else None
    idx = embedding.balanced_indices(labels, n, seed=cfg.seed, classes=cfg.classes,
                                     exclude=None if held_out is None else _image_rows(held_out))
    x, y = images[idx], labels[idx]
    is_stage1 = ref.name == "ssl" and len(getattr(ref, "bank", ())) == len(images)
    aligned = idx if is_stage1 else None
    sets = {f"reference ({ref.name})": reference_set(ref, n, cfg.seed, cfg.classes, aligned,
                                                     exclude=None if shown is None else shown.bank_rows)}
    if cfg.stage1 and not is_stage1:
        sets["stage-1 latents"] = PointSet(encode(stage1, x, device, batch=cfg.encode_batch), y, idx)
    dm = load_tokenizer(Path(joint_dir) / "tokenizer.pt", device)[0]
    shape = dm.latent_shape
    head = load_head(Path(joint_dir) / "head.pt", shape, ref.shape)
    dm_x = encode(dm, x, device, batch=cfg.encode_batch, normalizer=stage1, head=head)
    sets[f"DMVAE (λ = {dm_weight(joint_dir):g})"] = PointSet(dm_x, y, idx)
    if (Path(joint_dir) / "control_tokenizer.pt").is_file():
        ctl = load_tokenizer(Path(joint_dir) / "control_tokenizer.pt", device)[0]
        sets["λ = 0 control"] = PointSet(encode(ctl, x, device, batch=cfg.encode_batch), y, idx)
    return sets, images


def _image_rows(sets: Mapping[str, PointSet]) -> Tensor | None:
    rows = [s.index for s in sets.values() if s.index is not None]
    return torch.cat(rows).unique() if rows else None


def discriminant_embeddings(sets: Mapping[str, PointSet],
                            fits: Mapping[str, PointSet]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per set, the 2-D LDA view fitted on its disjoint twin in `fits` ({set: (N, 2)}) and the held-out
    accuracy of that discriminant on the shown points (a linear probe; NaN and a PCA view without labels)."""
    emb, acc = {}, {}
    for name, s in sets.items():
        f = fits.get(name)
        if s.labels is None or f is None or f.labels is None:
            emb[name], acc[name] = embedding.embed_2d(s.points, "pca"), math.nan
            continue
        emb[name], pred = embedding.discriminant_view(f.points, f.labels, s.points)
        acc[name] = float((pred == s.labels).float().mean())
    return emb, acc


def class_gallery(images_u8: Tensor, labels: Tensor, names: Sequence[str], per_class: int = 8,
                  classes: Sequence[int] = ()) -> go.Figure:
    """A row of example images per class: what the colours of the embeddings stand for."""
    rows = {}
    for c in classes or sorted(set(labels.tolist())):
        idx = (labels == c).nonzero().flatten()[:per_class]
        rows[names[c] if c < len(names) else str(c)] = to_float(images_u8[idx])
    return viz.image_grid(rows, scale=3, title="examples per class")


METHOD_LABELS = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}


def _key(method: str, perplexity: float, n_neighbors: int) -> tuple:
    return {"tsne": ("tsne", float(perplexity)), "umap": ("umap", int(n_neighbors))}.get(method, (method,))


def embeddings_for(sets: Mapping[str, PointSet], cache: dict, method: str, cfg: LatentsStageConfig, *,
                   perplexity: float | None = None, n_neighbors: int | None = None) -> dict[str, Tensor]:
    """2-D embeddings {set: (N, 2)} by `method`, computed once per (method, parameter) and kept in `cache`
    (`cache["seconds"]` records the time each took)."""
    e = cfg.embed
    p = e.perplexity if perplexity is None else perplexity
    k = e.n_neighbors if n_neighbors is None else n_neighbors
    key = _key(method, p, k)
    if key not in cache:
        t0 = time.perf_counter()
        cache[key] = {name: embedding.embed_2d(s.points, method, seed=cfg.seed, perplexity=p, n_neighbors=k,
                                               min_dist=e.min_dist, pca_dims=e.pca_dims,
                                               tsne_iters=e.tsne_iters, threads=e.threads)
                      for name, s in sets.items()}
        cache.setdefault("seconds", {})[key] = time.perf_counter() - t0
    return cache[key]


def _shown(s: PointSet, classes: Sequence[int] | None) -> Tensor:
    if classes is None or s.labels is None:
        return torch.ones(len(s.points), dtype=torch.bool)
    return torch.isin(s.labels, torch.as_tensor(list(classes), dtype=torch.long))


def score_sets(sets: Mapping[str, PointSet], emb: Mapping[str, Tensor], k: int,
               classes: Sequence[int] | None = None) -> dict[str, embedding.ClusterScores]:
    """Clustering scores of each set's shown points, in its original space and in the 2-D embedding `emb`."""
    out = {}
    for name, s in sets.items():
        m = _shown(s, classes)
        y = None if s.labels is None else s.labels[m]
        out[name] = embedding.clustering_scores(s.points[m], y, k=k, x_2d=emb[name][m])
    return out


def panel_title(name: str, dim: int, sc: embedding.ClusterScores) -> str:
    if math.isnan(sc.knn):
        return f"<b>{name}</b><br>(no class labels)"
    return (f"<b>{name}</b><br>{dim}-D: kNN {sc.knn:.2f} · silhouette {sc.silhouette:.2f}"
            f"<br>2-D: kNN {sc.knn_2d:.2f} · silhouette {sc.silhouette_2d:.2f}")


def panels_figure(sets: Mapping[str, PointSet], emb: Mapping[str, Tensor],
                  scores: Mapping[str, embedding.ClusterScores], names: Sequence[str], *,
                  classes: Sequence[int] | None = None, highlight: int | None = None,
                  title: str = "") -> go.Figure:
    """One panel per set (scores in the panel titles), restricted to `classes` when given."""
    masks = {n: _shown(s, classes) for n, s in sets.items()}
    return viz.embedding_panels(
        {n: emb[n][m] for n, m in masks.items()},
        {n: None if sets[n].labels is None else sets[n].labels[m] for n, m in masks.items()},
        index={n: None if sets[n].index is None else sets[n].index[m] for n, m in masks.items()},
        titles={n: panel_title(n, sets[n].points.shape[1], scores[n]) for n in sets}, class_names=names,
        highlight=highlight, title=title)


def score_table(sets: Mapping[str, PointSet], scores: Mapping[str, Mapping[str, embedding.ClusterScores]]):
    """A DataFrame, one row per set: its size, then kNN and silhouette in the original space ("D-dim") and in
    each method's 2-D embedding, under two-level column headers; counts stay integers."""
    import pandas as pd

    first = next(iter(scores.values()))
    rows = {n: {("set", "points"): len(s.points), ("set", "dim"): int(s.points.shape[1]),
                ("D-dim", "kNN"): first[n].knn, ("D-dim", "silhouette"): first[n].silhouette}
            for n, s in sets.items()}
    for method, sc in scores.items():
        for n in sets:
            label = f"{METHOD_LABELS.get(method, method)} 2-D"
            rows[n].update({(label, "kNN"): sc[n].knn_2d, (label, "silhouette"): sc[n].silhouette_2d})
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def explorer(sets: Mapping[str, PointSet], cache: dict, cfg: LatentsStageConfig, names: Sequence[str],
             images_u8: Tensor) -> Explorer:
    """Pick the method, the classes shown, perplexity / neighbours, and an image (shown, and starred in every
    panel). New (method, parameter) pairs are embedded on demand (seconds to a minute) and cached."""
    import ipywidgets as W

    present = sorted({int(c) for s in sets.values() if s.labels is not None for c in s.labels.tolist()})
    first = next((s.index for s in sets.values() if s.index is not None), None)
    slider = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls = {
        "method": W.Dropdown(options=EMBED_METHODS, value=cfg.embed.methods[0], description="method"),
        "perplexity": W.IntSlider(value=int(cfg.embed.perplexity), min=5, max=100, step=5,
                                  description="t-SNE perplexity", **slider),
        "neighbours": W.IntSlider(value=cfg.embed.n_neighbors, min=2, max=100, description="UMAP neighbours",
                                  **slider),
        "shown": W.SelectMultiple(options=[(names[c] if c < len(names) else str(c), c) for c in present],
                                  value=tuple(present), rows=min(10, max(len(present), 1)),
                                  description="classes"),
        "image": W.BoundedIntText(value=-1 if first is None else int(first[0]), min=-1,
                                  max=len(images_u8) - 1, description="image #"),
    }

    def render(method: str, perplexity: int, neighbours: int, shown: tuple, image: int):
        emb = embeddings_for(sets, cache, method, cfg, perplexity=perplexity, n_neighbors=neighbours)
        scores = score_sets(sets, emb, cfg.knn_k, classes=shown)
        figs = [panels_figure(sets, emb, scores, names, classes=shown,
                              highlight=image if image >= 0 else None,
                              title=f"{METHOD_LABELS[method]} (scores over the classes shown)")]
        if image >= 0:
            figs.append(viz.image_grid({f"image #{image}": to_float(images_u8[image:image + 1])}, scale=4))
        return figs

    return Explorer(controls, render, rows=[["method", "perplexity", "neighbours"], ["shown", "image"]])
