"""Notebook 80: the DMVAE authors' released models (Hugging Face `sen-ye/dmvae`) on the user's images — load,
reconstruct a folder (PSNR, SSIM, LPIPS, rFID with its protocol), embed the latents by class (paper Fig. 4),
sample a grid (ODE/SDE, CFG, CFG interval), and optionally N samples as an ADM .npz with FID/IS.

The files come from `train/released.py` (converted, checked, hashed); at the `smoke`/`cpu` presets they are
the tiny authors-format fixture written into the run, so the same code runs in CI without 5 GB of weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..configs.released import FIDConfig, ImagesConfig, ReleasedStageConfig
from ..data import shapes_dataset
from ..data.image_folders import DatasetError, ImageFolderDataset
from ..data.pixels import float_to_u8, to_float, to_uint8
from ..metrics import embedding, evaluation, image_metrics
from ..metrics.embedding import PointSet
from ..metrics.reconstruction import reconstruct
from ..models.recon_losses import PerceptualLoss, perceptual_loss
from ..models.tokenizer import Tokenizer
from ..runtime import weights
from ..runtime.runs import RunDir, RunError, atomic_write_bytes
from ..runtime.seeds import stream_seed
from ..train import released
from ..train.sampling import decode_latents, sample_latents

FIXTURE_IMAGES = "fixture_images"  # the labelled shapes folder the fixture presets reconstruct
PART = 1000  # samples per resumable part of the FID run


@dataclass
class ReleasedModels:
    tokenizer: Tokenizer
    generator: nn.Module
    latent_shape: tuple[int, int, int]
    files: dict[str, dict]  # "tokenizer"/"generator" → {file, sha256, entry, config}


def load_models(cfg: ReleasedStageConfig, run: RunDir, device) -> ReleasedModels:
    """The released tokenizer and generator of `cfg.files` (at the fixture presets: the tiny authors-format
    files written into `run`/fixture/), converted into our models on `device`."""
    f = cfg.files
    if f.fixture:
        tok_file, gen_file = released.write_fixture_files(run.path / "fixture")
    else:
        tok_file, gen_file = f.tokenizer or None, f.generator or None
    tok, tok_info = released.load_released_tokenizer(tok_file, arch=cfg.tokenizer, weights_name=f.weights,
                                                     device=device, trust_pickle=f.trust_pickle)
    shape = released.latent_shape(cfg.tokenizer)
    gen, gen_info = released.load_released_generator(
        gen_file, file=Path(gen_file).name if gen_file else f.generator_name, arch=cfg.generator,
        latents=shape, weights_name=f.weights, device=device, trust_pickle=f.trust_pickle)
    return ReleasedModels(tok, gen, shape, {"tokenizer": tok_info, "generator": gen_info})


@torch.no_grad()
def fixture_check(models: ReleasedModels) -> dict[str, float]:
    """max |ours − theirs| / max |theirs| of the loaded fixture models against the outputs the authors'
    modules produced (stored in the fixture): velocity, latents (as tokens) and reconstruction."""
    with safetensors.safe_open(released.FIXTURE, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if "_input." in k or "_output." in k}
    dev = next(models.generator.parameters()).device
    v = models.generator(t["dit_input.x"].float().to(dev), t["dit_input.t"].to(dev), t["dit_input.y"].to(dev))
    rec, z = models.tokenizer(t["vae_input.image"].float().to(dev))
    tokens = z.flatten(2).transpose(1, 2)  # (B, C, H, W) → their (B, H·W, C), row-major

    def rel(ours: Tensor, theirs: Tensor) -> float:
        return ((ours.float().cpu() - theirs).abs().max() / theirs.abs().max()).item()

    return {"velocity": rel(v, t["dit_output.v"]), "latents": rel(tokens, t["vae_output.tokens"]),
            "reconstruction": rel(rec, t["vae_output.reconstruction"])}


def write_fixture_images(folder: Path, n: int, seed: int) -> Path:
    """`n` labelled shapes images (the project's own dataset, 32 px) as PNGs in folder/<class>/, the
    stand-in for the user's folder at the fixture presets; an existing complete folder is kept."""
    done = folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == {"n": n, "seed": seed}:
        return folder
    images, labels = shapes_dataset.generate(n, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / shapes_dataset.CLASS_NAMES[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda fh, im=image: Image.fromarray(im).save(fh, format="PNG"))
    atomic_write_bytes(done, lambda fh: fh.write(json.dumps({"n": n, "seed": seed}).encode()))
    return folder


def read_images(folder: str | Path, resolution: int, c: ImagesConfig, seed: int
                ) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Up to `c.n` images of `folder`/<class>/<image> (of the class folders `c.classes`, all when empty; a
    seeded class-balanced subset when they hold more), ADM-centre-cropped to `resolution`: (uint8 (N, H, W,
    3), labels (indices into the sorted class folders), class names, file paths).

    Raises:
        DatasetError naming the folder (missing, no class folders, an empty class, fewer classes than
        `c.classes` asks for) or an unreadable file (unless `c.skip_corrupt`).
    """
    ds = ImageFolderDataset(folder, resolution, skip_corrupt=c.skip_corrupt)
    labels = torch.tensor(ds.targets)
    if any(k >= len(ds.classes) for k in c.classes):
        raise DatasetError(f"images.classes {list(c.classes)}: {folder} has only {len(ds.classes)} class "
                           "folders")
    idx = (torch.arange(len(ds)) if not c.classes and len(ds) <= c.n
           else embedding.balanced_indices(labels, c.n, seed=seed, classes=c.classes))
    items = [ds.item(int(i)) for i in tqdm(idx, desc="reading images", leave=False)]
    images = torch.stack([float_to_u8(x).permute(1, 2, 0) for x, _, _ in items])
    served = torch.tensor([label for _, label, _ in items], dtype=labels.dtype)
    return images, served, list(ds.classes), [path for _, _, path in items]


def generator_class_names(num_classes: int) -> list[str]:
    """The generator's class names: ImageNet's (timm's table) for 1,000 classes, else "class i"."""
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def readable_names(folders: list[str]) -> list[str]:
    """Class-folder names, ImageNet synsets (n01818515) replaced by their descriptions (macaw)."""
    info = ImageNetInfo()
    synsets = set(info.label_names())
    return [info.label_name_to_description(f) if f in synsets else f for f in folders]


def _lpips(images: Tensor, x_hat: Tensor, mode: str) -> dict[str, Any]:
    net = None if mode == "off" else perceptual_loss("auto") if mode == "auto" else PerceptualLoss()
    if net is None:
        why = "off (images.lpips)" if mode == "off" else "no local VGG16 file (images.lpips='auto')"
        return {"lpips": None, "lpips_label": f"not measured: {why}"}
    res = image_metrics.lpips_distance(x_hat, to_float(images), net)
    return {"lpips": float(res.values.mean()), "lpips_label": res.label, **weights.provenance(net)}


def reconstruction_metrics(tok: Tokenizer, images: Tensor, device, c: ImagesConfig, folder: str
                           ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Reconstructions (uint8), the latents z, and {psnr, ssim (means over images), lpips, rfid, protocol} of
    `images` (uint8) through `tok`. rFID is Inception FID between the reconstructions and the same originals
    (torch-fidelity weights, local only); without them it is None with the reason."""
    x_hat, z = reconstruct(tok, images, device, c.batch, c.precision)
    x = to_float(images)
    out: dict[str, Any] = {"psnr": float(image_metrics.psnr(x_hat, x).mean()),
                           "ssim": float(image_metrics.ssim(x_hat, x).mean()),
                           **_lpips(images, x_hat, c.lpips)}
    rec_u8 = to_uint8(x_hat)
    path = c.inception_weights or evaluation.default_inception_path()
    inc = evaluation.inception_metrics(rec_u8, weights_path=path, real_u8=images, device=device,
                                       config_keys=("images.inception_weights", "(none: the originals)"))
    out["rfid"] = inc["fid"]["value"] if inc.get("available") else None
    out["protocol"] = {
        "images": len(images), "folder": str(folder), "resolution": tuple(images.shape[1:3]),
        "crop": "ADM centre crop (resize the short side, then crop)", "precision": c.precision,
        "psnr": "per image over all pixels in [0, 1], then the mean", "rfid_against": "the same originals",
        "rfid_features": image_metrics.INCEPTION_SPACE if inc.get("available") else inc.get("reason")}
    return rec_u8, z, out


def latent_sets(tok: Tokenizer, z: Tensor, labels: Tensor) -> dict[str, PointSet]:
    """The normalised latents as point sets: flattened maps (what the generator models) and their mean over
    tokens (C numbers an image, where position and pose average out)."""
    zn = tok.normalize(z.to(tok.latent_mean.device)).float().cpu()
    index = torch.arange(len(zn))
    return {"latents (flattened)": PointSet(zn.flatten(1), labels, index),
            "latents (token mean)": PointSet(zn.mean((2, 3)), labels, index)}


def sample_grid(models: ReleasedModels, cfg: ReleasedStageConfig, device) -> dict[float, Tensor]:
    """{CFG scale: uint8 images}: `grid.per_class` samples of each `grid.classes` per scale, the same noise
    (seed) for every scale, rows in class order."""
    g = cfg.grid
    labels = torch.tensor(g.classes).repeat_interleave(g.per_class)
    out = {}
    for scale in g.cfg_scales:
        s = dataclasses.replace(cfg.sample, n=len(labels), cfg_scale=scale)
        lat, _ = sample_latents(models.generator, models.latent_shape, cfg.generator.num_classes, s,
                                stream_seed(cfg.seed, "released.grid"), device, labels=labels)
        out[scale] = decode_latents(models.tokenizer, lat, device, s.batch, s.precision, progress=False)
    return out


def grid_rows(images: Tensor, classes: tuple[int, ...], per_class: int,
              names: list[str]) -> dict[str, Tensor]:
    """{row title: float images} of `sample_grid`'s images (one row per class)."""
    rows = [images[i * per_class:(i + 1) * per_class] for i in range(len(classes))]
    return {(names[c] if c < len(names) else f"class {c}"): to_float(r) for c, r in zip(classes, rows)}


def fid_samples(models: ReleasedModels, cfg: ReleasedStageConfig, run: RunDir, device
                ) -> tuple[Tensor, Tensor, Path]:
    """`fid.n` class-balanced samples (labels i mod classes; the `sample` settings) as uint8 images, labels
    and run/samples.npz (the ADM evaluator's format). Made in resumable parts of PART samples (run/fid_parts/,
    removed once the .npz is written; a part's noise depends on its index only, so a resumed run gives the
    same images); a finished run's .npz is read back instead."""
    n, parts, npz = cfg.fid.n, run.path / "fid_parts", run.path / "samples.npz"
    if npz.is_file():
        images, labels = evaluation.load_adm_npz(npz)
        if len(images) == n and labels is not None:
            return images, labels, npz
    images, labels = [], []
    for start in tqdm(range(0, n, PART), desc="FID samples (parts)"):
        m, file = min(PART, n - start), parts / f"part_{start // PART:05d}.npz"
        if file.is_file():
            with np.load(file) as z:
                images.append(torch.from_numpy(z["images"]))
                labels.append(torch.from_numpy(z["labels"]))
            continue
        y = (torch.arange(start, start + m) % cfg.generator.num_classes)
        s = dataclasses.replace(cfg.sample, n=m)
        part_seed = np.random.SeedSequence([stream_seed(cfg.seed, "released.fid"), start // PART])
        lat, _ = sample_latents(models.generator, models.latent_shape, cfg.generator.num_classes, s,
                                int(part_seed.generate_state(1)[0]), device, labels=y)
        u8 = decode_latents(models.tokenizer, lat, device, s.batch, s.precision, progress=False)
        atomic_write_bytes(file, lambda fh, a=u8, b=y: np.savez(fh, images=a.numpy(), labels=b.numpy()))
        images.append(u8)
        labels.append(y)
    images, labels = torch.cat(images), torch.cat(labels)
    with evaluation.scratch_dir(run.path) as tmp:
        evaluation.save_adm_npz(npz, images, labels, scratch=tmp)
    shutil.rmtree(parts, ignore_errors=True)
    return images, labels, npz


def fid_metrics(images: Tensor, npz: Path, cfg: ReleasedStageConfig, device) -> dict:
    """Inception FID of the samples (against `fid.reference_batch` only: no other real set is ImageNet's),
    IS and precision/recall, with the sampling protocol and the hashes of the .npz and reference files."""
    f: FIDConfig = cfg.fid
    path = f.inception_weights or evaluation.default_inception_path()
    ref = f.reference_batch or None
    if ref is not None and not Path(ref).is_file():
        raise RunError(f"fid.reference_batch: no file {ref} (an ADM reference batch, e.g. "
                       "VIRTUAL_imagenet256_labeled.npz)")
    res = evaluation.inception_metrics(images, weights_path=path, reference_path=ref, device=device,
                                       batch=f.feature_batch, isc_splits=f.isc_splits,
                                       prc_neighborhood=f.prc_neighborhood,
                                       config_keys=("fid.inception_weights", "fid.reference_batch"))
    s = cfg.sample
    proto = evaluation.SamplingProtocol(n_samples=len(images), sampler=s.sampler, steps=s.steps,
                                        cfg_scale=s.cfg_scale, cfg_interval=tuple(s.cfg_interval),
                                        ema=cfg.files.weights == "ema", seed=cfg.seed, shift=s.shift,
                                        precision=s.precision)
    inception = Path(path) if res.get("available") else None
    files = {"samples_npz": npz, "reference_batch": ref, "inception": inception}
    res["protocol"] = evaluation.protocol_record(proto, files, fid_against=(
        "not computed: FID needs fid.reference_batch" if ref is None else "the ADM reference batch"))
    res["npz"] = str(npz)
    return res


def summary_numbers(recon: dict, scores: dict, fid: dict | None) -> dict[str, float | None]:
    """The headline numbers, NaN-free (None where not measured)."""
    def num(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    out = {k: num(recon.get(k)) for k in ("psnr", "ssim", "lpips", "rfid")}
    for name, sc in scores.items():
        out[f"knn {name}"] = num(sc.knn)
    if fid:
        out["fid"] = num(fid.get("fid", {}).get("value")) if fid.get("available") else None
        out["inception_score"] = num(fid.get("inception_score", {}).get("mean")) if fid.get("available") \
            else None
    return out
