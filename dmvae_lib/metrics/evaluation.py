"""Evaluation of generated images: protocol records, the ADM sample format, and labelled metrics.

A generation metric is only meaningful with the protocol that produced it (sampler and steps,
guidance, EMA, sample count, label scheme, precision, and the exact weights and statistics files). So every
metric here is stored as `{"metric", "value", "feature_space", …, "protocol": protocol_record(…)}`, where the
record holds the `SamplingProtocol` and the SHA-256 of each file used (generator, tokenizer, Inception
weights, reference statistics, the scored .npz); change a file and its hash changes.

Sample format (openai/guided-diffusion `evaluations/evaluator.py`, used by DiT, LightningDiT, REPA, RAE):
an .npz with `arr_0` = uint8 (N, H, W, 3) images and optionally `arr_1` = (N,) int64 labels. Reference
batches add `mu`, `sigma` (pool3 statistics of the whole training set: FID uses these, not `arr_0`) and
`mu_s`, `sigma_s` (sFID); their `arr_0` (10k images) serves precision/recall only.

Metrics:
    FD in a named feature space (`feature_fd`): Fréchet distance of Gaussians fitted to features of the
        samples and of real images; the label says which space it is. Only the Inception pool3 space is FID.
    `inception_metrics`: FID (against reference `mu`/`sigma`, or real images), Inception score
        (exp E_x KL(p(y|x) ‖ p(y)) over `isc_splits` splits, torch-fidelity's logits_unbiased) and
        precision/recall (Kynkäänniemi et al. 2019, k-NN balls, k = 3), with the Inception weights from a
        local file only (fetched there first with DMVAE_FETCH_WEIGHTS=1). Without that file it returns a
        record saying so and how to provide it; nothing else is computed in its place.

Files are written through a scratch directory made by `tempfile.mkdtemp` inside the run folder and renamed
into place, so concurrent evaluations in different run folders never share a temporary path, and a reader
never sees a partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.latent_cache import file_sha256
from ..runtime import weights
from ..runtime.runs import named_write_errors
from . import image_metrics
from .image_metrics import INCEPTION_FILE, INCEPTION_SPACE, INCEPTION_URL

PROTOCOL_FIELDS = ("n_samples", "sampler", "steps", "cfg_scale", "cfg_interval", "ema", "seed", "files")


@dataclass(frozen=True)
class SamplingProtocol:
    """How a set of samples was produced: everything a generation metric depends on besides the files."""

    n_samples: int
    sampler: str  # "ode" (Euler) | "sde" (Euler–Maruyama)
    steps: int
    cfg_scale: float
    cfg_interval: tuple[float, float]
    ema: bool
    seed: int
    label_sampling: str = "class-balanced (label i mod num_classes)"
    shift: float = 1.0
    precision: str = "fp32"


def file_hashes(files: Mapping[str, str | os.PathLike | None]) -> dict[str, dict[str, str | None]]:
    """{name: {"path", "sha256"}} for each file; a None path is recorded as not used (sha256 None).

    Raises:
        FileNotFoundError: a named path that does not exist (a hash of nothing would be a silent lie).
    """
    out = {}
    for name, path in files.items():
        if path is None:
            out[name] = {"path": None, "sha256": None}
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"protocol file {name!r}: {path} does not exist")
        out[name] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
    return out


def protocol_record(sampling: SamplingProtocol, files: Mapping[str, str | os.PathLike | None],
                    **extra: Any) -> dict[str, Any]:
    """The JSON-ready protocol of one metric: the sampling protocol, hashed files, and `extra` (e.g. the
    real-image set, Inception-score splits)."""
    record = {**dataclasses.asdict(sampling), "files": file_hashes(files), **extra}
    record["cfg_interval"] = list(record["cfg_interval"])
    missing = [k for k in PROTOCOL_FIELDS if k not in record]
    if missing:
        raise ValueError(f"protocol record lacks {missing}")
    return record


# --- files --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def scratch_dir(run_path: str | os.PathLike) -> Iterator[Path]:
    """A fresh private directory inside `run_path` (tempfile.mkdtemp), removed on exit."""
    Path(run_path).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".scratch-", dir=run_path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_images(images: Tensor | np.ndarray, what: str) -> np.ndarray:
    arr = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what}: need uint8 (N, H, W, 3) images, got {arr.dtype} {arr.shape}")
    return arr


def save_adm_npz(path: str | os.PathLike, images: Tensor | np.ndarray, labels: Tensor | None = None, *,
                 scratch: Path | None = None) -> Path:
    """Write images as `arr_0` (uint8 NHWC) and labels as `arr_1` (int64), via a temp file in `scratch`
    (default: a mkdtemp directory beside `path`)."""
    path = Path(path)
    arrays = {"arr_0": _check_images(images, str(path))}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
        if arrays["arr_1"].shape != (len(arrays["arr_0"]),):
            raise ValueError(f"labels must be ({len(arrays['arr_0'])},), got {arrays['arr_1'].shape}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(named_write_errors(path))
        tmp_dir = scratch or stack.enter_context(scratch_dir(path.parent))
        tmp = tmp_dir / path.name
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return path


def load_adm_npz(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """(uint8 (N, H, W, 3) images, (N,) labels or None) from an ADM-format sample .npz; checks the format."""
    with np.load(path) as z:
        if "arr_0" not in z:
            raise ValueError(f"{path} has no arr_0 (keys: {list(z.keys())}); not an ADM sample batch")
        images = torch.from_numpy(_check_images(z["arr_0"], str(path)).copy())
        labels = torch.from_numpy(z["arr_1"].astype(np.int64)) if "arr_1" in z else None
    return images, labels


def save_pngs(images: Tensor, folder: str | os.PathLike, limit: int, *, scratch: Path | None = None) -> Path:
    """The first `limit` images as 000000.png … into `folder` (replaced as a whole, written in `scratch`)."""
    from PIL import Image

    arr, folder = _check_images(images, "save_pngs"), Path(folder)
    with contextlib.ExitStack() as stack:
        stack.enter_context(named_write_errors(folder))
        tmp = Path(tempfile.mkdtemp(dir=scratch or stack.enter_context(scratch_dir(folder.parent))))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output folder
        for i, img in enumerate(arr[:limit]):
            Image.fromarray(img).save(tmp / f"{i:06d}.png")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def image_grid(images: Tensor, cols: int, pad: int = 2) -> Tensor:
    """Tile uint8 (N, H, W, 3) images into one uint8 (rows·(H + pad) − pad, cols·(W + pad) − pad, 3) image."""
    arr = torch.as_tensor(_check_images(images, "image_grid"))
    n, h, w, _ = arr.shape
    rows = math.ceil(n / cols)
    grid = torch.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, dtype=torch.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return grid


def save_png(image: Tensor, path: str | os.PathLike, *, scratch: Path | None = None) -> Path:
    """One uint8 (H, W, 3) image as a PNG, via a temp file in `scratch`."""
    from PIL import Image

    path = Path(path)
    with contextlib.ExitStack() as stack:
        stack.enter_context(named_write_errors(path))
        tmp = (scratch or stack.enter_context(scratch_dir(path.parent))) / path.name
        Image.fromarray(_check_images(image[None], str(path))[0]).save(tmp)
        os.replace(tmp, path)
    return path


# --- metrics ------------------------------------------------------------------------------------------------
def feature_fd(feats_samples: Tensor, feats_real: Tensor, feature_space: str) -> dict[str, Any]:
    """Fréchet distance between features (N_a, D) of samples and (N_b, D) of real images, labelled.

    Raises:
        ValueError: an unlabelled space, or "FID" claimed for a space that is not Inception pool3.
    """
    if "FID" in feature_space.replace("not FID", "") and feature_space != INCEPTION_SPACE:
        raise ValueError(f"{feature_space!r} is not the Inception pool3 space; do not call it FID")
    fd = image_metrics.frechet_distance(feats_samples, feats_real, feature_space)
    return {"value": fd.value, "feature_space": fd.feature_space, "n_samples": fd.n_a, "n_real": fd.n_b}


def default_inception_path() -> Path:
    """$TORCH_HOME/hub/checkpoints/<torch-fidelity's Inception file> (where torch-fidelity would cache it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def read_reference_stats(path: str | os.PathLike) -> dict[str, Tensor | None]:
    """`mu`, `sigma` (pool3 statistics) and `arr_0` (reference images, for precision/recall) of an ADM
    reference batch or an LTH14/MAR `adm_in256_stats.npz`; absent entries are None."""
    with np.load(path) as z:
        def get(k):
            return torch.from_numpy(np.asarray(z[k])) if k in z else None

        out = {"mu": get("mu"), "sigma": get("sigma"), "arr_0": get("arr_0")}
    if out["mu"] is None and out["arr_0"] is None:
        raise ValueError(f"{path} holds neither mu/sigma nor arr_0 reference images")
    return out


def inception_metrics(samples_u8: Tensor, *, weights_path: str | os.PathLike | None,
                      real_u8: Tensor | None = None, reference_path: str | os.PathLike | None = None,
                      device="cpu", batch: int = 64, isc_splits: int = 10, prc_neighborhood: int = 3,
                      config_keys: tuple[str, str] = ("metrics.inception_weights", "metrics.reference_batch")
                      ) -> dict:
    """FID, Inception score and precision/recall of uint8 (N, H, W, 3) samples with local Inception weights.

    FID uses the reference file's `mu`/`sigma` when given, else statistics of `real_u8`; precision/recall
    use the reference file's `arr_0`, else `real_u8`. Without a weights file the result is
    `{"available": False, "reason": …}` naming the file to fetch and the caller's `config_keys` (weights file,
    reference batch); nothing is downloaded unless DMVAE_FETCH_WEIGHTS=1 (`runtime.weights`).
    """
    if weights_path is None or weights.ensure_file(weights_path, INCEPTION_URL, "FID Inception") is None:
        return {"available": False, "reason": (
            f"no Inception weights at {weights_path}: FID, IS and precision/recall not computed. Fetch "
            f"{INCEPTION_URL} on a machine with network, put it there (or pass {config_keys[0]}), "
            f"and optionally an ADM reference batch ({config_keys[1]}); nothing is downloaded unless "
            f"{weights.FETCH_ENV}=1 is set.")}
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    no_stats = {"mu": None, "sigma": None, "arr_0": None}
    ref = read_reference_stats(reference_path) if reference_path else no_stats
    real_images = ref["arr_0"] if ref["arr_0"] is not None else real_u8
    net = image_metrics.load_inception(weights_path, ("2048", "logits_unbiased"), device)

    def nchw(u8):
        return u8.permute(0, 3, 1, 2)

    pool, logits = image_metrics.inception_features(net, nchw(_as_tensor(samples_u8)), batch)
    out: dict[str, Any] = {"available": True, "feature_space": INCEPTION_SPACE, **weights.provenance(net)}
    real_pool = None
    if real_images is not None:
        real_pool = image_metrics.inception_features(net, nchw(real_images), batch)[0]
    if ref["mu"] is not None:
        fd = image_metrics.frechet_distance_from_moments(pool.mean(0), torch.cov(pool.T), ref["mu"],
                                                         ref["sigma"], INCEPTION_SPACE, len(pool), 0)
        out["fid"] = {"value": fd.value, "against": f"reference statistics {reference_path}"}
    elif real_pool is not None:
        fd = image_metrics.frechet_distance(pool, real_pool, INCEPTION_SPACE)
        out["fid"] = {"value": fd.value, "against": f"{len(real_pool)} real images"}
    isc = isc_features_to_metric(logits.float(), splits=isc_splits)
    out["inception_score"] = {"mean": isc["inception_score_mean"], "std": isc["inception_score_std"]}
    if real_pool is not None:
        p, r = calculate_precision_recall_part(pool.float(), real_pool.float(), prc_neighborhood, 2000)
        against = f"reference arr_0 of {reference_path}" if ref["arr_0"] is not None else "real images"
        out.update(precision=p, recall=r, n_real=len(real_pool), precision_recall_against=against)
    return out


def _as_tensor(images: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(_check_images(images, "inception_metrics"))
