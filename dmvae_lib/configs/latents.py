"""Configuration of the latent visualisation (notebook 50; paper Fig. 4): 2-D embeddings of the reference, the
DM-trained latents and the λ = 0 control, coloured by class, with clustering scores."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

EMBED_METHODS = ("tsne", "umap", "pca")


@dataclass(frozen=True)
class EmbedConfig:
    points: int = 2000  # per set, class-balanced (t-SNE of 2000 ≈ 28 s a set on 2 loaded cores, niced)
    methods: tuple[str, ...] = ("tsne", "umap")  # one saved figure each; the
                                                 # explorer offers all EMBED_METHODS
    pca_dims: int = 50  # PCA to this many dims before t-SNE/UMAP (van der Maaten's advice); 0 = off
    perplexity: float = 30.0  # t-SNE (clamped below (N − 1)/3)
    tsne_iters: int = 500  # t-SNE steps, the first 250 exaggerated
                           # (sklearn max_iter); 1000: same 2-D kNN at cpu
    n_neighbors: int = 15  # UMAP (clamped below N)
    min_dist: float = 0.1  # UMAP
    threads: int = 1  # OpenMP threads for t-SNE/UMAP: 2 were 4–20× slower than 1 on 2 cores under other load
    discriminant_points: int = 4000  # other images the class-discriminative (LDA) view is fitted on; 0 = off


def validate_embed(e: EmbedConfig, knn_k: int) -> None:
    """Raise ConfigError, naming the key, for embedding settings that cannot run."""
    bad = [m for m in e.methods if m not in EMBED_METHODS]
    if bad or not e.methods:
        raise ConfigError(f"embed.methods {e.methods} must be a non-empty subset of {EMBED_METHODS}")
    if e.points < 20:
        raise ConfigError(f"embed.points must be >= 20, got {e.points}")
    if e.discriminant_points and e.discriminant_points < 20:
        raise ConfigError(f"embed.discriminant_points must be 0 (off) or >= 20, got {e.discriminant_points}")
    if e.tsne_iters < 250:
        raise ConfigError(f"embed.tsne_iters must be >= 250 (sklearn's minimum), got {e.tsne_iters}")
    if e.perplexity <= 0 or e.n_neighbors < 2 or knn_k < 1 or e.threads < 1:
        raise ConfigError("need embed.perplexity > 0, embed.n_neighbors >= 2, knn_k >= 1, embed.threads >= 1")


@dataclass(frozen=True)
class LatentsStageConfig:
    seed: int = 0
    threads: int = 0
    joint_run: str = ""  # notebook-40 run folder (tokenizer.pt,
                         # control_tokenizer.pt, head.pt); resolved by the notebook
    classes: tuple[int, ...] = ()  # the classes embedded; () = all
    stage1: bool = True  # also embed the stage-1 latents (skipped when
                         # the reference *is* them: reference "ssl")
    encode_batch: int = 500
    knn_k: int = 10  # leave-one-out kNN accuracy (Euclidean, majority vote) as the clustering score
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    def validate(self) -> None:
        validate_embed(self.embed, self.knn_k)


PRESETS: dict[str, dict] = {
    "smoke": {"embed.points": 300, "embed.discriminant_points": 600},
    "cpu": {},
    "imagenet256": {"classes": (1, 94, 207, 279, 323, 417, 511, 717, 852, 980), "embed.points": 500,
                    "embed.tsne_iters": 1000, "encode_batch": 64},
}  # fmt: skip
