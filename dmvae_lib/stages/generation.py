"""Notebook 60, the final generator ( paper §5, Tab. 3; docs/authors-code.md §5.2,
§5.4, §6).

    latent cache of the DM tokenizer → LightningDiT fitted by flow matching (fit_velocity_net, the same
    loop, loss, EMA and label dropout) → class-balanced samples by Euler ODE or Euler–Maruyama SDE, optionally
    with CFG inside a guidance interval → decode(denormalize(latents)) → PNGs + ADM .npz → metrics with their
    protocol records.

The DM tokenizer saved by notebook 40 carries its latent mean/scale re-measured after DM training, so its
`normalize`/`denormalize` are the generator's data scaling. `tokenizer_file="control_tokenizer.pt"` runs the
same code on the λ = 0 baseline.

Metrics (`evaluate`): a Fréchet distance in the SSL encoder's pooled feature space (samples vs real training
images; labelled, never "FID"), read against the real-vs-real noise floor and the tokenizer's reconstruction
FD (rFD: val originals vs their reconstructions, the same images); and, only when the Inception weights are a
local file, FID / IS / precision-recall (`evaluation.inception_metrics`). Each metric carries its protocol.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..configs.generation import GenerationStageConfig, MetricsConfig, SampleConfig
from ..core.flow import predict_data
from ..core.samplers import euler_ode, guided
from ..data.images import ImageData
from ..data.latents import latents_for
from ..data.pixels import to_float, to_uint8
from ..data.references import TensorReference
from ..metrics import embedding, evaluation, probes, recognition
from ..metrics.distributions import distribution_distances
from ..metrics.reconstruction import reconstruct
from ..models.tokenizer import Tokenizer
from ..runtime.device import autocast_ctx
from ..runtime.runs import RunDir, RunError, atomic_write_bytes, load_checkpoint, load_state_strict
from ..runtime.seeds import stream
from ..train.artifacts import build_net
from ..train.sampling import decode_latents, sample_latents
from ..train.velocity import Hook, fit_velocity_net
from ..viz import figures as viz

SSL_SPACE = "SSL-encoder pooled features (not Inception; not FID)"


def generator_data(cfg: GenerationStageConfig, tok: Tokenizer, tok_file: Path, data: ImageData, run: RunDir,
                   device) -> TensorReference:
    """The generator's training set: the tokenizer's
    normalised latents (cached in `run`) with their labels."""
    latents, labels = latents_for(tok, tok_file, data, run, device, flip=cfg.flip, batch=cfg.encode_batch)
    return TensorReference(latents, labels, f"{tok_file.stem} latents")


def fit_generator(cfg: GenerationStageConfig, data: TensorReference, run: RunDir | None, device,
                  progress: bool = True, curve: Hook | None = None) -> tuple[nn.Module, dict]:
    """Flow matching on the latent cache with notebook 30's fit (one loop); returns (EMA net, last stats).
    `curve` (see `curve_evaluator`) scores the EMA net at cfg.curve.steps on the way."""
    hooks = [(1, curve)] if curve is not None else []
    return fit_velocity_net(cfg, data, run, device, progress=progress, tag="generator", hooks=hooks)


def pixel_space(size: int) -> tuple[Callable[[Tensor], Tensor], str]:
    """A feature space no encoder defines: images average-pooled to size × size, flattened."""
    return (lambda x: F.adaptive_avg_pool2d(x.float(), size).flatten(1)), \
        f"pixels average-pooled to {size}×{size} (no encoder; not Inception; not FID)"


SUPERVISED_SPACE = ("the supervised classifier's pooled features (trained here on the train split with "
                    "labels; "
                    "the embedded stand-in for Inception; not FID)")


def curve_evaluator(cfg: GenerationStageConfig, tok: Tokenizer, encoders: dict, data: ImageData,
                    shape: tuple[int, ...], num_classes: int, run: RunDir | None, device) -> Hook:
    """fn(step, ema_net) for `fit_generator`: at each of cfg.curve.steps, cfg.curve.n samples (the same
    noise at every step) scored by FD to real images and to this tokenizer's reconstructions of them (the
    decoder's error cancels), in the SSL space, in pixels and (when stage 1 trained it) in the
    supervised classifier's space; logged as tag "curve" (`curve_records`)."""
    c, m = cfg.curve, cfg.metrics
    semantic = feature_spaces(tok, encoders, device)
    spaces = {"ssl": semantic.pop("ssl"), "pix": pixel_space(c.pixel_size), **semantic}
    real, _ = real_images(data, m.real_images, m.floor_images)
    recon = to_uint8(reconstruct(tok, real, device, m.feature_batch)[0])

    def feats(fn, u8):
        return probes.extract_features(fn, u8, batch=m.feature_batch, device=device)

    refs = {name: (feats(fn, real), feats(fn, recon)) for name, (fn, _) in spaces.items()}
    sample_cfg = dataclasses.replace(cfg.sample, n=c.n)

    def hook(step: int, net: nn.Module) -> None:
        if step not in c.steps:
            return
        latents, _ = sample_latents(net, shape, num_classes, sample_cfg, cfg.seed, device, progress=False)
        images = decode_latents(tok, latents, device, sample_cfg.batch, sample_cfg.precision, progress=False)
        record = {"tag": "curve", "step": step, "n": c.n}
        for name, (fn, label) in spaces.items():
            f = feats(fn, images)
            record[f"fd_{name}"] = evaluation.feature_fd(f, refs[name][0], label)["value"]
            record[f"fd_{name}_recon"] = evaluation.feature_fd(f, refs[name][1], label)["value"]
            record[f"space_{name}"] = label
        if run is not None:
            run.log_metrics(record)

    return hook


def curve_records(run: RunDir) -> list[dict]:
    """The learning-curve points a run logged, one per step (a resumed run's latest), by step."""
    points = {r["step"]: r for r in run.read_metrics() if r.get("tag") == "curve"}
    return [points[k] for k in sorted(points)]


def raw_generator(cfg: GenerationStageConfig, data: TensorReference, run: RunDir, device) -> nn.Module:
    """The raw (non-EMA) weights of the generator's last training checkpoint."""
    ck = load_checkpoint(run.ckpt_path("generator"), required=("state",))
    net = build_net(cfg, data.shape, data.num_classes)
    load_state_strict(net, ck["state"]["net"], f"{run.ckpt_path('generator')} [net]")
    return net.to(device).eval().requires_grad_(False)


def sampling_protocol(cfg: GenerationStageConfig) -> evaluation.SamplingProtocol:
    s = cfg.sample
    return evaluation.SamplingProtocol(n_samples=s.n, sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale,
                                       cfg_interval=tuple(s.cfg_interval), ema=s.ema, seed=cfg.seed,
                                       shift=s.shift, precision=s.precision)


@torch.no_grad()
def trajectory(net: nn.Module, shape: tuple[int, ...], num_classes: int, s: SampleConfig, seed: int,
               device, *, n: int = 8, snapshots: int = 6) -> tuple[list[float], list[Tensor]]:
    """One Euler-ODE run of n latents (one per class when conditional, CFG as `s`), recording the data
    prediction x̂ = x_t + (1 − t)·v at `snapshots` evenly spaced steps: (their t, their x̂ on the CPU)."""
    dev, gen = torch.device(device), stream(seed, "generation.trajectory")
    y = (torch.arange(n) % num_classes).to(dev) if num_classes else None
    velocity = guided(net, s.cfg_scale, num_classes, tuple(s.cfg_interval)) if num_classes else net
    keep = {round(i * (s.steps - 1) / max(snapshots - 1, 1)) for i in range(snapshots)}
    ts, x_hats = [], []

    def record(i: int, t: Tensor, x_t: Tensor, v: Tensor) -> None:
        if i in keep:
            ts.append(float(t[0]))
            x_hats.append(predict_data(x_t, t, v).float().cpu())

    with autocast_ctx(dev, s.precision):
        euler_ode(velocity, torch.randn(n, *shape, generator=gen).to(dev), s.steps, y=y, shift=s.shift,
                  on_step=record)
    return ts, x_hats


def class_rows(images: Tensor, labels: Tensor | None, per_class: int, max_rows: int = 10,
               names: Sequence[str] = ()) -> dict[str, Tensor]:
    """{class name (or "class c"): uint8 images of that class} for the first `max_rows` classes, all rows of
    equal length (`per_class`, or fewer when a class has fewer samples)."""
    if labels is None:
        k = min(per_class, len(images))
        return {f"row {r}": images[r * k:(r + 1) * k] for r in range(min(max_rows, len(images) // k))}
    rows = {(names[c] if c < len(names) else f"class {c}"): images[labels == c]
            for c in labels.unique()[:max_rows].tolist()}
    k = min(per_class, *(len(v) for v in rows.values()))
    return {name: imgs[:k] for name, imgs in rows.items()}


def samples_figure(images: Tensor, labels: Tensor | None, per_class: int, real: Tensor | None = None,
                   real_labels: Tensor | None = None, title: str = "", names: Sequence[str] = ()):
    """Plotly grid: a row of generated samples per class, each followed by real images of that class."""
    gen, rows = class_rows(images, labels, per_class, names=names), {}
    ref = class_rows(real, real_labels, per_class, names=names) if real is not None else {}
    for name, imgs in gen.items():
        rows[f"{name} generated"] = imgs
        if name in ref:
            rows[f"{name} real"] = ref[name]
    k = min(len(v) for v in rows.values())  # equal row lengths
    return viz.image_grid({name: to_float(v[:k]) for name, v in rows.items()},
                          title=title)


def latent_fit(latents: Tensor, data: TensorReference, seed: int) -> dict:
    """FD and sliced-W2 of sampled latents to the latent
    cache, read against two draws of the cache (the floor)."""
    gen = stream(seed, "generation.latent_fit")
    a, b = data.sample(len(latents), gen)[0], data.sample(len(latents), gen)[0]
    fit, floor = distribution_distances(latents, a, seed), distribution_distances(b, a, seed)
    return {"samples_vs_cache": fit, "noise_floor": floor, "fd_ratio": fit["fd"] / max(floor["fd"], 1e-12),
            "sw2_ratio": fit["sw2"] / max(floor["sw2"], 1e-12)}


def latent_clustering(data: TensorReference, n: int, seed: int, k: int = 10) -> dict:
    """How the classes cluster in the generator's training latents: leave-one-out kNN accuracy and silhouette
    on a class-balanced subset of about `n` cached latents (chance = 1 / classes). NaN without labels."""
    if data.labels is None:
        return {"knn": math.nan, "silhouette": math.nan, "n": 0, "chance": math.nan}
    idx = embedding.balanced_indices(data.labels, n, seed=seed)
    sc = embedding.clustering_scores(data.bank[idx].float(), data.labels[idx], k=k)
    return {"knn": sc.knn, "silhouette": sc.silhouette, "n": len(idx), "k": k,
            "chance": 1.0 / data.num_classes}


def write_samples(run: RunDir, images: Tensor, labels: Tensor | None, m: MetricsConfig) -> dict[str, Path]:
    """samples.npz (ADM format, all N), samples_grid.png (one row per class) and samples/ (≤ png_limit PNGs),
    written through a private scratch directory inside the run folder."""
    with evaluation.scratch_dir(run.path) as tmp:
        npz = evaluation.save_adm_npz(run.path / "samples.npz", images, labels, scratch=tmp)
        rows = list(class_rows(images, labels, m.grid_per_class).values())
        grid = evaluation.image_grid(torch.cat(rows), len(rows[0]))
        png = evaluation.save_png(grid, run.path / "samples_grid.png", scratch=tmp)
        folder = evaluation.save_pngs(images, run.path / "samples", m.png_limit, scratch=tmp)
    return {"npz": npz, "grid": png, "pngs": folder}


def real_images(data: ImageData, n: int, held_out: int) -> tuple[Tensor, str]:
    """Up to n real images (uint8 NHWC) for the statistics, and what they are: training images, or (streamed
    training data) val images other than the last `held_out`, which serve the floor and the rFD."""
    if data.train is not None:
        return data.train[0][:n], f"train[:{min(n, data.train.shape[1])}] (first render)"
    k = min(n, len(data.val) - held_out)
    if k < 2:
        raise RunError(f"{len(data.val)} val images leave no real set beside the {held_out} held out")
    return data.val[:k], f"val[:{k}] (training images are streamed)"


def feature_fn(tok: Tokenizer, encoders: dict, device) -> tuple[Callable[[Tensor], Tensor], str]:
    """The SSL encoder's pooled features (falls back to the tokenizer's frozen encoder, mean-pooled)."""
    if "ssl" in encoders:
        return encoders["ssl"].to(device).eval(), SSL_SPACE
    return (lambda x: tok.encode_features(x).float().mean((2, 3))), \
        "tokenizer-encoder features, mean-pooled (not Inception; not FID)"


def feature_spaces(tok: Tokenizer, encoders: dict,
                   device) -> dict[str, tuple[Callable[[Tensor], Tensor], str]]:
    """{name: (features fn, what the space is)}: the SSL space, and the supervised classifier's when stage 1
    trained it (a space the SSL encoder does not define, semantic like Inception's)."""
    spaces = {"ssl": feature_fn(tok, encoders, device)}
    if "supervised" in encoders:
        spaces["sup"] = (encoders["supervised"].to(device).eval(), SUPERVISED_SPACE)
    return spaces


@dataclasses.dataclass
class RealReference:
    """Features of the real images every generated set is scored against, computed once per run: per space
    the real set's, the held-out val images' (the floor) and their reconstructions' (the rFD). The
    reconstructions themselves (`recon_u8`) are the decoder's limit on class accuracy."""

    spaces: dict[str, tuple[Callable[[Tensor], Tensor], str]]
    real: dict[str, Tensor]
    val: dict[str, Tensor]
    recon: dict[str, Tensor]
    real_u8: Tensor
    val_u8: Tensor
    recon_u8: Tensor
    val_labels: Tensor
    real_desc: str
    val_desc: str
    batch: int
    device: object

    def features(self, space: str, images: Tensor) -> Tensor:
        return probes.extract_features(self.spaces[space][0], images, batch=self.batch, device=self.device)


def real_reference(cfg: GenerationStageConfig, tok: Tokenizer, encoders: dict, data: ImageData,
                   device) -> RealReference:
    """The real side of every Fréchet distance and of the recognisability ceiling (see `RealReference`)."""
    m = cfg.metrics
    val, val_labels = data.val[-m.floor_images:], data.val_labels[-m.floor_images:]
    real, real_desc = real_images(data, m.real_images, len(val))  # never the floor's images
    recon = to_uint8(reconstruct(tok, val, device, m.feature_batch)[0])
    spaces = feature_spaces(tok, encoders, device)

    def feats(fn, u8):
        return probes.extract_features(fn, u8, batch=m.feature_batch, device=device)

    return RealReference(spaces, {k: feats(fn, real) for k, (fn, _) in spaces.items()},
                         {k: feats(fn, val) for k, (fn, _) in spaces.items()},
                         {k: feats(fn, recon) for k, (fn, _) in spaces.items()}, real, val, recon, val_labels,
                         real_desc, f"val[-{len(val)}:]", m.feature_batch, device)


def evaluate(cfg: GenerationStageConfig, images: Tensor, ref: RealReference, files: dict[str, Path | None],
             device) -> list[dict]:
    """Every Fréchet metric of the run as {"metric", "value", …, "protocol"}: per feature space (ssl, and sup
    when stage 1 trained the classifier) the FD of the samples to the real set, its real-vs-real floor and the
    reconstruction FD; then the Inception metrics (or why they are not available)."""
    proto, out = sampling_protocol(cfg), []
    for key, (_, space) in ref.spaces.items():
        rows = [(f"fd_{key}", evaluation.feature_fd(ref.features(key, images), ref.real[key], space),
                 {"real_set": ref.real_desc}),
                (f"fd_{key}_floor", evaluation.feature_fd(ref.val[key], ref.real[key], space),
                 {"real_set": ref.real_desc, "note": f"{ref.val_desc} vs the real set: two real sets, no "
                                                      "generator"}),
                (f"rfd_{key}", evaluation.feature_fd(ref.val[key], ref.recon[key], space),
                 {"real_set": ref.val_desc, "note": "reconstructions vs the same val images (rFD)"})]
        for name, res, extra in rows:
            generated = name == f"fd_{key}"
            fs = files if generated else {"tokenizer": files["tokenizer"]}
            sampling = proto if generated else _no_sampling(proto, res["n_samples"])
            out.append({"metric": name, **res, "protocol": evaluation.protocol_record(sampling, fs, **extra)})
    out.append(_inception(cfg, images, ref.real_u8, ref.real_desc, files, proto, device))
    return out


def recognisability(cfg: GenerationStageConfig, classify: nn.Module, images: Tensor, labels: Tensor,
                    num_classes: int, ref: RealReference, files: dict[str, Path | None], device) -> dict:
    """The class accuracy of the generated images under the embedded supervised classifier, per class and
    overall, with two ceilings beside it: the same classifier on the held-out real val images, and on the
    tokenizer's reconstructions of those images. A generator that matched the latent distribution exactly
    would, at CFG 1, reach the second one: the decoder draws every generated image."""
    m = cfg.metrics

    def accuracy(u8: Tensor, y: Tensor) -> dict:
        return recognition.class_accuracy(classify, u8, y, num_classes, batch=m.feature_batch, device=device)

    acc, ceiling, recon = accuracy(images, labels), accuracy(ref.val_u8, ref.val_labels), \
        accuracy(ref.recon_u8, ref.val_labels)
    return {"metric": "class_accuracy", **acc, "ceiling": ceiling["value"],
            "ceiling_per_class": ceiling["per_class"], "reconstruction_ceiling": recon["value"],
            "reconstruction_ceiling_per_class": recon["per_class"],
            "protocol": evaluation.protocol_record(sampling_protocol(cfg), files, real_set=ref.val_desc,
                                                   note="ceiling: the classifier on these real val images; "
                                                        "reconstruction_ceiling: on their reconstructions")}


def cfg_sweep(cfg: GenerationStageConfig, net: nn.Module, tok: Tokenizer, classify: nn.Module | None,
              shape: tuple[int, ...], num_classes: int, ref: RealReference, device,
              progress: bool = True) -> list[dict]:
    """Per CFG scale of cfg.metrics.cfg_sweep: metrics.sweep_n class-balanced samples (the `sample` settings
    otherwise, the same noise at every scale) scored by class accuracy (when a classifier exists) and by FD in
    every feature space. Rows {"cfg_scale", "n", "accuracy", "per_class", "fd_<space>"}."""
    m, rows = cfg.metrics, []
    for scale in tqdm(m.cfg_sweep, desc="CFG sweep", disable=not progress, leave=False):
        s = dataclasses.replace(cfg.sample, n=m.sweep_n, cfg_scale=float(scale))
        latents, labels = sample_latents(net, shape, num_classes, s, cfg.seed, device, progress=False)
        images = decode_latents(tok, latents, device, s.batch, s.precision, progress=False)
        row = {"cfg_scale": float(scale), "n": m.sweep_n}
        if classify is not None and labels is not None:
            acc = recognition.class_accuracy(classify, images, labels, num_classes, batch=m.feature_batch,
                                             device=device)
            row.update(accuracy=acc["value"], per_class=acc["per_class"])
        for key, (_, space) in ref.spaces.items():
            row[f"fd_{key}"] = evaluation.feature_fd(ref.features(key, images), ref.real[key], space)["value"]
        rows.append(row)
    return rows


def _no_sampling(proto: evaluation.SamplingProtocol, n: int) -> evaluation.SamplingProtocol:
    return dataclasses.replace(proto, n_samples=n, sampler="none (real or reconstructed images)", steps=0,
                               cfg_scale=1.0, ema=False, label_sampling="n/a")


def _inception(cfg, images, real, real_desc, files, proto, device) -> dict:
    m = cfg.metrics
    weights = Path(m.inception_weights) if m.inception_weights else evaluation.default_inception_path()
    reference = Path(m.reference_batch) if m.reference_batch else None
    res = evaluation.inception_metrics(images, weights_path=weights, real_u8=real, reference_path=reference,
                                       device=device, batch=m.feature_batch, isc_splits=m.isc_splits,
                                       prc_neighborhood=m.prc_neighborhood)
    used = {**files, "inception_weights": weights if res["available"] else None, "reference_batch": reference}
    extra = {"real_set": real_desc, "isc_splits": m.isc_splits,
             "prc_neighborhood": m.prc_neighborhood}
    return {"metric": "inception", **res, "protocol": evaluation.protocol_record(proto, used, **extra)}


def save_evaluation(run: RunDir, records: list[dict]) -> Path:
    """evaluation.json: the metric records with their protocols."""
    path = run.path / "evaluation.json"
    atomic_write_bytes(path, lambda f: f.write(json.dumps(records, indent=2, default=float).encode()))
    return path


def metrics_table(records: list[dict]):
    """One row per metric: value, feature space, sample counts (pandas DataFrame)."""
    import pandas as pd

    rows = {r["metric"]: {"value": r.get("value", r.get("fid", {}).get("value")),
                          "feature_space": r.get("feature_space", r.get("reason", "")),
                          "n": r["protocol"]["n_samples"]} for r in records}
    return pd.DataFrame(rows).T
