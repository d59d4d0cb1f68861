"""2-D embeddings of point sets (t-SNE, UMAP, PCA) and label-based clustering scores (paper Fig. 4).

    embed_2d(x, "tsne" | "umap" | "pca", seed=…)   (N, *D) → (N, 2), deterministic given `seed`
    clustering_scores(x, labels, x_2d=…)            how well the labels cluster, in the original space
                                                    (and, if given, in the 2-D embedding)

t-SNE and UMAP first project onto the top `pca_dims` principal axes (van der Maaten & Hinton 2008 §5 use 30;
50 is the usual default): it removes noise dimensions and makes the neighbour search cheap at D = 8192.

Scores (labels are used for evaluation only):
  * kNN accuracy, leave-one-out: each point is classified by the majority label of its k nearest *other*
    points (Euclidean; a tied vote goes to the class of the nearer neighbours). Chance is the largest class
    share (1/K for a class-balanced set).
  * silhouette (Rousseeuw 1987): mean over points of (b − a)/max(a, b), a = mean distance to the own class,
    b = mean distance to the nearest other class; in [−1, 1], higher = tighter, better separated classes.
Scores in the original space are the ones to compare across sets: they do not depend on the embedding. The
2-D ones say how much of that structure the picture shows (t-SNE and UMAP tend to exaggerate clusters).

References: van der Maaten & Hinton, JMLR 9 (2008); McInnes et al., arXiv 1802.03426 (UMAP); scikit-learn's
TSNE / PCA / silhouette_score and umap-learn are called, not copied.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

METHODS = ("tsne", "umap", "pca")


@dataclass
class PointSet:
    """One embedded set: points (N, D), labels (N,) or None, the image row each point encodes (or None), and
    the rows of the reference bank it took (reference sets not aligned with the images; else None)."""

    points: Tensor
    labels: Tensor | None
    index: Tensor | None
    bank_rows: Tensor | None = None


def _as_2d_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    return arr.reshape(len(arr), -1)  # (N, *D) -> (N, D)


def pca(x: Tensor | np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """Projection of (N, *D) onto its top `dims` principal axes, (N, dims) (sklearn, deterministic signs)."""
    from sklearn.decomposition import PCA

    arr = _as_2d_numpy(x)
    return PCA(n_components=min(dims, *arr.shape), random_state=seed).fit_transform(arr).astype(np.float32)


def embed_2d(x: Tensor | np.ndarray, method: str = "tsne", *, seed: int = 0, perplexity: float = 30.0,
             n_neighbors: int = 15, min_dist: float = 0.1, pca_dims: int = 50, tsne_iters: int = 1000,
             threads: int = 1) -> Tensor:
    """A 2-D embedding (N, 2) float32 of the points (N, *D); the same inputs and `seed` give the same output.

    perplexity is clamped below (N − 1)/3 and n_neighbors below N, so tiny sets work. UMAP runs
    single-threaded (umap-learn's condition for reproducibility with a fixed random_state). `threads` caps the
    OpenMP/BLAS pools (t-SNE's gradient): on 2 cores shared with other jobs, 2 OpenMP threads ran t-SNE 4–20×
    *slower* than 1 (spin-waiting at barriers), so 1 is the default.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return _embed_2d(x, method, seed, perplexity, n_neighbors, min_dist, pca_dims, tsne_iters)


def _embed_2d(x, method, seed, perplexity, n_neighbors, min_dist, pca_dims, tsne_iters) -> Tensor:
    if method not in METHODS:
        raise ValueError(f"unknown embedding method {method!r}; use one of {', '.join(METHODS)}")
    arr = _as_2d_numpy(x)
    n = len(arr)
    if n < 4:
        raise ValueError(f"need at least 4 points to embed, got {n}")
    if method == "pca":
        return torch.from_numpy(pca(arr, 2, seed))
    if pca_dims and arr.shape[1] > pca_dims:
        arr = pca(arr, pca_dims, seed)
    if method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(2, perplexity=min(perplexity, (n - 1) / 3 - 1e-3), init="pca", learning_rate="auto",
                    max_iter=tsne_iters, random_state=seed)
        out = tsne.fit_transform(arr)
    else:
        import umap

        with warnings.catch_warnings():  # small-N spectral-init and n_jobs notices
            warnings.simplefilter("ignore")
            out = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist,
                            random_state=seed, n_jobs=1).fit_transform(arr)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


@torch.no_grad()
def knn_loo_accuracy(x: Tensor | np.ndarray, labels: Tensor, k: int = 10, *, chunk: int = 1024) -> float:
    """Leave-one-out kNN accuracy of (N, *D) points with labels (N,): Euclidean, majority vote of the k
    nearest other points, ties to the class of the nearer neighbours."""
    pts = torch.from_numpy(_as_2d_numpy(x)).double()
    y = torch.as_tensor(labels).long()
    n, k = len(pts), min(k, len(pts) - 1)
    n_classes = int(y.max()) + 1
    rank_bonus = 1e-3 * torch.linspace(1, 0, k, dtype=torch.float64)  # < 1 vote in total: only breaks ties
    correct = 0
    for s in range(0, n, chunk):
        d = torch.cdist(pts[s:s + chunk], pts)  # (c, N)
        d[torch.arange(len(d)), torch.arange(s, s + len(d))] = math.inf  # leave the point itself out
        idx = d.topk(k, dim=1, largest=False).indices  # (c, k), nearest first
        votes = torch.zeros(len(d), n_classes, dtype=torch.float64)
        votes.scatter_add_(1, y[idx], (1.0 + rank_bonus).expand(len(d), k))
        correct += int((votes.argmax(1) == y[s:s + chunk]).sum())
    return correct / n


def silhouette(x: Tensor | np.ndarray, labels: Tensor) -> float:
    """Mean silhouette coefficient of (N, *D) points under labels (N,), Euclidean, over all points (exact)."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(_as_2d_numpy(x), np.asarray(torch.as_tensor(labels).cpu())))


class ClusterScores(NamedTuple):
    """kNN accuracy and silhouette in the original space, and in a 2-D embedding (NaN when not computed)."""

    knn: float
    silhouette: float
    knn_2d: float = math.nan
    silhouette_2d: float = math.nan


def clustering_scores(x: Tensor | np.ndarray, labels: Tensor | None, *, k: int = 10,
                      x_2d: Tensor | np.ndarray | None = None) -> ClusterScores:
    """Scores of how the labels cluster in `x` (N, *D), and in `x_2d` (N, 2) if given. All NaN without labels
    or with fewer than two classes (nothing to separate). Deterministic: no sampling."""
    if labels is None or len(torch.unique(torch.as_tensor(labels))) < 2:
        return ClusterScores(math.nan, math.nan)
    hd = (knn_loo_accuracy(x, labels, k), silhouette(x, labels))
    if x_2d is None:
        return ClusterScores(*hd)
    return ClusterScores(*hd, knn_loo_accuracy(x_2d, labels, k), silhouette(x_2d, labels))


def balanced_indices(labels: Tensor, n: int, *, seed: int = 0, classes: Sequence[int] = (),
                     exclude: Tensor | None = None) -> Tensor:
    """Sorted row indices of a class-balanced subset of about `n` rows (n // K per class, all of a smaller
    class), drawn without replacement; `classes` restricts the classes (() = all present); rows in `exclude`
    are never drawn (a held-out set disjoint from a shown one)."""
    y = torch.as_tensor(labels).long().cpu()
    keep = [int(c) for c in (classes or torch.unique(y).tolist())]
    gen = torch.Generator().manual_seed(seed)
    per_class = max(1, n // len(keep))
    allowed = torch.ones(len(y), dtype=torch.bool)
    if exclude is not None:
        allowed[torch.as_tensor(exclude).long()] = False
    picks = []
    for c in keep:
        rows = ((y == c) & allowed).nonzero().flatten()
        picks.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
    return torch.cat(picks).sort().values


def discriminant_view(fit_x: Tensor | np.ndarray, fit_labels: Tensor, x: Tensor | np.ndarray, *,
                      dims: int = 2) -> tuple[Tensor, Tensor]:
    """Fisher's linear discriminant (shrinkage LDA, Ledoit–Wolf) fitted on (fit_x, fit_labels), a set
    *disjoint* from x, then applied to x (N, *D): its projection onto the `dims` most class-discriminative
    directions (N, dims) and the discriminant's predicted labels (N,).

    PCA, t-SNE and UMAP look for the directions of largest variance or the nearest neighbours; in a latent map
    most variance is pose, position and colour, so classes a linear probe separates can look mixed. LDA
    shows the directions that separate the classes. Fitted on the shown points themselves it would separate
    classes in any high-dimensional set (D ≥ N/K), so it never sees them."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    fit_arr, arr = _as_2d_numpy(fit_x), _as_2d_numpy(x)
    y = torch.as_tensor(fit_labels).long().cpu().numpy()
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto", n_components=dims).fit(fit_arr, y)
    proj = np.ascontiguousarray(lda.transform(arr)[:, :dims], dtype=np.float32)
    return torch.from_numpy(proj), torch.from_numpy(lda.predict(arr).astype(np.int64))
