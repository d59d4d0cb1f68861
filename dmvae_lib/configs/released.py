"""Configuration of notebook 80: the DMVAE authors' released models (Hugging Face `sen-ye/dmvae`) — load,
reconstruct a folder of images, look at the latents, sample, score (train/released.py, stages/released.py).

The architecture blocks describe the authors' modules as this project builds them; their defaults are the
released files' (`VAE(model_size="large", z_channels=32)`, LightningDiT-XL/1). The `smoke` and `cpu` presets
use the tiny authors-format fixture (tests/fixtures/released/, made with their code): same code path, tiny
numbers, no download.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .generation import SampleConfig, validate_sample
from .latents import EmbedConfig, validate_embed

GENERATOR_FILES = ("ep64.pt", "ep400.pt", "ep800.pt")  # LightningDiT-XL/1 after 64 / 400 / 800 epochs
WEIGHTS = ("ema", "raw")  # the files' EMA entries (vae_ema / ema: what the authors sample with) or raw ones


@dataclass(frozen=True)
class FilesConfig:
    tokenizer: str = ""  # local vae.pt; "" → the Hugging Face cache (DMVAE_FETCH_WEIGHTS=1 may fetch it)
    generator: str = ""  # local ep*.pt; "" → `generator_name` in the Hugging Face cache (same rule)
    generator_name: str = "ep800.pt"  # which released generator: ep64.pt | ep400.pt | ep800.pt
    weights: str = "ema"  # "ema" | "raw" for both files
    trust_pickle: bool = False  # True: unpickle Python objects in the files (only for files you trust)
    fixture: bool = False  # the tiny authors-format stand-in written into the run (CI, laptops)


@dataclass(frozen=True)
class TokenizerArch:
    """The authors' VAE: timm DINOv2 at `patch_size` → per-token MLP → Flux decoder (attention in its mid
    block, GroupNorm 32)."""

    timm_name: str = "vit_large_patch14_dinov2.lvd142m"
    image_size: int = 256
    patch_size: int = 16  # DINOv2 at patch 16 on 256 px: a 16×16 latent grid
    vit_args: dict = field(default_factory=dict)  # extra timm.create_model arguments (the tiny fixture:
                                                  # embed_dim, depth, num_heads)
    z_channels: int = 32
    mlp_hidden: int = 2048
    dec_ch: int = 128
    dec_mult: tuple[int, ...] = (1, 2, 4, 4)
    dec_res_blocks: int = 2
    latent_mean: float = 0.0685  # the authors' README (not in vae.pt): latents = (z − mean)·scale
    latent_scale: float = 0.1763


@dataclass(frozen=True)
class GeneratorArch:
    """The authors' LightningDiT (XL/1: depth 28, width 1152, 16 heads, patch 1, 1,000 classes)."""

    depth: int = 28
    hidden: int = 1152
    heads: int = 16
    patch_size: int = 1
    num_classes: int = 1000


@dataclass(frozen=True)
class ImagesConfig:
    """The user's images to reconstruct and embed: `folder`/<class>/<image> (ImageFolder layout; the ADM
    centre crop at the tokenizer's size)."""

    folder: str = ""  # "" → none (the fixture presets write a small labelled folder into the run)
    n: int = 1000  # images read (a seeded class-balanced subset when the folder holds more)
    classes: tuple[int, ...] = ()  # class folders read, as indices into their sorted names; () = all
    batch: int = 64
    precision: str = "bf16"  # reconstruction numerics (fp32 | bf16 autocast)
    skip_corrupt: bool = False  # an unreadable image: error naming it (False) or served as its neighbour
    lpips: str = "auto"  # "auto" (VGG16 file local, else not measured) | "real" | "off"
    inception_weights: str = ""  # torch-fidelity Inception file for rFID; "" → $TORCH_HOME/hub/checkpoints


@dataclass(frozen=True)
class GridConfig:
    classes: tuple[int, ...] = (88, 207, 279, 360, 387, 388, 417, 979)  # one row each (class ids)
    per_class: int = 6  # columns per CFG scale
    cfg_scales: tuple[float, ...] = (1.0, 4.0)  # one panel each (1: no guidance, the paper's Tab. 3 setting)


@dataclass(frozen=True)
class FIDConfig:
    n: int = 0  # samples for the ADM .npz and FID/IS (50,000 for gFID-50K); 0 = off
    reference_batch: str = ""  # ADM reference batch (VIRTUAL_imagenet256_labeled.npz); "" → FID not computed
    inception_weights: str = ""  # torch-fidelity Inception file; "" → $TORCH_HOME/hub/checkpoints
    isc_splits: int = 10
    prc_neighborhood: int = 3
    feature_batch: int = 250


@dataclass(frozen=True)
class ReleasedStageConfig:
    seed: int = 0
    threads: int = 0
    files: FilesConfig = field(default_factory=FilesConfig)
    tokenizer: TokenizerArch = field(default_factory=TokenizerArch)
    generator: GeneratorArch = field(default_factory=GeneratorArch)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    knn_k: int = 10  # clustering score of the latents (leave-one-out kNN)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    # the grid's and the FID's sampler (sample.n is not read: grid and fid.n set the counts; the grid sets
    # its own CFG scales). The authors' evaluation: SDE, 250 steps, no CFG (their 50k script ignores it)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(
        n=0, sampler="sde", steps=250, batch=125, precision="bf16"))
    fid: FIDConfig = field(default_factory=FIDConfig)

    def validate(self) -> None:
        f, t, s = self.files, self.tokenizer, self.sample
        if f.generator_name not in GENERATOR_FILES and not f.fixture:
            raise ConfigError(f"files.generator_name {f.generator_name!r} unknown; the authors released "
                              f"{', '.join(GENERATOR_FILES)}")
        if f.weights not in WEIGHTS:
            raise ConfigError(f"files.weights {f.weights!r} unknown; use one of {', '.join(WEIGHTS)}")
        if f.fixture and (f.tokenizer or f.generator):
            raise ConfigError("files.fixture writes its own files: leave files.tokenizer and files.generator "
                              "empty, or set files.fixture to false")
        if t.image_size % t.patch_size:
            raise ConfigError(f"tokenizer.image_size {t.image_size} is not a multiple of "
                              f"tokenizer.patch_size {t.patch_size}")
        validate_sample(s)
        for name, value, known in (("images.precision", self.images.precision, ("fp32", "bf16")),
                                   ("images.lpips", self.images.lpips, ("auto", "real", "off"))):
            if value not in known:
                raise ConfigError(f"{name} {value!r} unknown; use one of {', '.join(known)}")
        bad = [c for c in self.grid.classes if not 0 <= c < self.generator.num_classes]
        if bad or not self.grid.classes or self.grid.per_class < 1:
            raise ConfigError(f"grid.classes must be a non-empty list of class ids in "
                              f"0..{self.generator.num_classes - 1} and grid.per_class >= 1; got "
                              f"{list(self.grid.classes)}, {self.grid.per_class}")
        if not self.grid.cfg_scales or any(c < 1.0 for c in self.grid.cfg_scales):
            raise ConfigError(f"grid.cfg_scales must be a non-empty list of scales >= 1, got "
                              f"{list(self.grid.cfg_scales)}")
        if self.images.n < 2 or self.fid.n < 0 or (self.fid.n and self.fid.n < 2):
            raise ConfigError(f"images.n must be >= 2 and fid.n 0 (off) or >= 2, got {self.images.n}, "
                              f"{self.fid.n}")
        validate_embed(self.embed, self.knn_k)


# The tiny authors-format fixture (tests/fixtures/released/README.md): its constructor arguments as ours.
FIXTURE_ARCH = {
    "files.fixture": True, "files.generator_name": "ep_tiny.pt",
    "tokenizer.timm_name": "vit_base_patch14_dinov2.lvd142m", "tokenizer.image_size": 64,
    "tokenizer.patch_size": 4, "tokenizer.vit_args": {"embed_dim": 32, "depth": 1, "num_heads": 2},
    "tokenizer.z_channels": 8, "tokenizer.mlp_hidden": 64, "tokenizer.dec_ch": 32,
    "tokenizer.dec_mult": (2, 1), "tokenizer.dec_res_blocks": 1,
    "generator.depth": 2, "generator.hidden": 32, "generator.heads": 2,
    "generator.patch_size": 4, "generator.num_classes": 10, "grid.classes": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
}

PRESETS: dict[str, dict] = {
    # random tiny weights: the pictures are noise; what runs is the whole path of the GPU run
    "smoke": {**FIXTURE_ARCH, "images.n": 200, "embed.points": 200,
              "embed.methods": ("tsne",), "grid.per_class": 4, "grid.cfg_scales": (1.0, 3.0),
              "sample.steps": 10, "sample.batch": 100, "fid.n": 100},
    "cpu": {**FIXTURE_ARCH, "images.n": 500, "embed.points": 500, "sample.steps": 50, "sample.batch": 250,
            "fid.n": 500},
    # one GPU: the released files (files.tokenizer / files.generator or the HF cache) and your image folder
    # 10 ImageNet classes × 100 val images (notebook 50's classes at this preset)
    "imagenet256": {"images.classes": (1, 94, 207, 279, 323, 417, 511, 717, 852, 980), "embed.points": 1000,
                    "embed.tsne_iters": 1000},
}  # fmt: skip
