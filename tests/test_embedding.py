"""embedding.py: 2-D embeddings (shapes, determinism, errors)
and clustering scores (blobs beat shuffled labels)."""

import math

import pytest
import torch

from dmvae_lib.metrics import embedding


def blobs(n_per: int = 20, k: int = 3, dim: int = 8, spread: float = 0.3, seed: int = 0):
    """k well-separated Gaussian blobs in `dim` dims, as (N, dim) points and (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(k, dim, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


# UMAP's first call JIT-compiles (numba): ~10–20 s per test process, hence `slow` (still run by default).
@pytest.mark.parametrize("method", ["pca", "tsne", pytest.param("umap", marks=pytest.mark.slow)])
def test_embed_2d_shape_and_determinism(method):
    x, _ = blobs(dim=60)  # 60 > pca_dims: the PCA pre-reduction runs too
    # (N, *D) is flattened
    a = embedding.embed_2d(x.reshape(60, 3, 4, 5), method, seed=1, pca_dims=10, tsne_iters=250)
    b = embedding.embed_2d(x, method, seed=1, pca_dims=10, tsne_iters=250)
    assert a.shape == (60, 2) and a.dtype == torch.float32 and a.isfinite().all()
    assert torch.equal(a, b)


def test_embed_2d_clamps_parameters_for_tiny_sets():
    x, _ = blobs(n_per=4, k=2)  # 8 points: perplexity 30 and 15 neighbours would be invalid unclamped
    assert embedding.embed_2d(x, "tsne", perplexity=30.0, tsne_iters=250).shape == (8, 2)


def test_embed_2d_rejects_unknown_method_and_too_few_points():
    x, _ = blobs()
    with pytest.raises(ValueError, match="unknown embedding method"):
        embedding.embed_2d(x, "isomap")
    with pytest.raises(ValueError, match="at least 4"):
        embedding.embed_2d(x[:3], "pca")


def test_pca_is_deterministic_and_keeps_the_main_axis():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 5, generator=g) * torch.tensor([10.0, 1.0, 0.1, 0.1, 0.1])
    p = embedding.pca(x, 2, seed=0)
    assert p.shape == (50, 2) and (embedding.pca(x, 2, seed=0) == p).all()
    assert abs(torch.corrcoef(torch.stack([torch.from_numpy(p[:, 0]), x[:, 0]]))[0, 1]) > 0.99


def test_separable_blobs_score_higher_than_shuffled_labels():
    x, y = blobs()
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    good, bad = embedding.clustering_scores(x, y, k=5), embedding.clustering_scores(x, shuffled, k=5)
    assert good.knn == 1.0 and good.silhouette > 0.8
    assert bad.knn < 0.6 and bad.silhouette < 0.1
    assert math.isnan(good.knn_2d)  # no 2-D embedding given


def test_scores_in_2d_and_without_labels():
    x, y = blobs()
    sc = embedding.clustering_scores(x, y, k=5, x_2d=embedding.embed_2d(x, "pca"))
    assert 0.9 <= sc.knn_2d <= 1.0 and -1 <= sc.silhouette_2d <= 1
    assert all(math.isnan(v) for v in embedding.clustering_scores(x, None))
    assert all(math.isnan(v) for v in embedding.clustering_scores(x, torch.zeros(len(x), dtype=torch.long)))


def test_knn_leaves_the_point_itself_out():
    # two points per class far apart from each other, the classes interleaved: a point's nearest *other*
    # point belongs to the other class, so leave-one-out 1-NN is 0 (it would be 1 if a point saw itself).
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    assert embedding.knn_loo_accuracy(x, torch.tensor([0, 1, 1, 0]), k=1) == 0.0
    assert embedding.knn_loo_accuracy(x, torch.tensor([0, 0, 1, 1]), k=1) == 1.0


def test_knn_chunks_agree():
    x, y = blobs(spread=3.0)  # overlapping: some errors
    assert embedding.knn_loo_accuracy(x, y, k=5, chunk=7) == embedding.knn_loo_accuracy(x, y, k=5)


def test_balanced_indices():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    idx = embedding.balanced_indices(y, 30, seed=0)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)
    assert torch.bincount(y[idx]).tolist() == [10, 10, 5]  # the small class gives all it has
    assert torch.equal(idx, embedding.balanced_indices(y, 30, seed=0))
    assert set(y[embedding.balanced_indices(y, 20, seed=0, classes=(1,))].tolist()) == {1}
