"""Reference distributions p_ref that DMVAE pulls the tokenizer's aggregate latent distribution onto
(paper §4).

A reference is an object with
    name         a short label ("ssl", "gaussian", …)
    shape        the shape of one sample: (C, H, W) for spatial latents/features, (D,) for a flat vector
    num_classes  0 for an unconditional reference (labels are then None), else the size of the label range
    sample(n, generator) -> (x (n, *shape) float32, y (n,) long or None)
Sampling draws only from the passed `torch.Generator` (never the global RNG), on the generator's device
unless the reference holds a bank of samples, whose device then wins.

Kinds (paper §4, Tab. 1):
    TensorReference      rows of a bank of samples, drawn with replacement: the SSL reference (the stage-1
                         tokenizer's own normalized latents, as the authors do), supervised-encoder features,
                         text embeddings; `class_subset` keeps a few classes ("SubDino").
    GaussianReference    N(0, I), with its exact velocity.
    GMMReference         an isotropic K-component Gaussian mixture in the flattened space, with its exact
                         velocity.
    NoiseStateReference  diffusion-noise states x_t = (1 − t)·ε + t·latents at one fixed t, fresh ε per draw.

Exact velocities (time convention of `flow`: x_t = t·data + (1 − t)·noise, t = 1 is data). For data from one
isotropic component N(m, s²I), x_t ~ N(t·m, σ_t² I) with σ_t² = t²s² + (1 − t)², and
    E[data | x_t]          = m + t·s²·(x_t − t·m) / σ_t²
    v(x_t, t) = E[data − noise | x_t] = m + (t·s² − (1 − t))·(x_t − t·m) / σ_t²
which never divides by (1 − t) (σ_t² ≥ s²/(1 + s²) > 0). For N(0, I) this is
v = (2t − 1)·x_t / (t² + (1 − t)²). A mixture with equal weights and a shared s mixes the per-component
velocities with the posterior responsibilities r_k(x_t) = softmax_k[(t·⟨x_t, m_k⟩ − t²‖m_k‖²/2) / σ_t²] (the
‖x_t‖² term is common to all components and drops out), so v = m̄ + c·(x_t − t·m̄) with m̄ = Σ_k r_k m_k and
c = (t·s² − (1 − t)) / σ_t²: O(B·K·D) work, no (B, K, D) tensor. These velocities are usable as an exact
`real_net(x_t, t, y=None)`.

Reference: Ye et al., "Distribution Matching Variational AutoEncoder", arXiv 2512.07778, §4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.flow import expand_t

Shape = tuple[int, ...]


def _gen_device(generator: torch.Generator) -> torch.device:
    return torch.device(generator.device)


def _as_t(t: Tensor | float, x_t: Tensor) -> Tensor:
    """Times as (B,) in x_t's dtype and device (a float or a 0-d tensor is broadcast)."""
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    return t.expand(x_t.shape[0]) if t.dim() == 0 else t


def _check_labels(labels: Tensor | None, n: int, what: str) -> Tensor | None:
    if labels is None:
        return None
    if labels.shape != (n,) or labels.dtype.is_floating_point:
        raise ValueError(f"{what} labels must be integer of shape ({n},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return labels.long()


class Reference:
    """Common interface: `name`, `shape`, `num_classes`, `sample(n, generator)`."""

    name: str
    shape: Shape
    num_classes: int

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, shape={self.shape}, "
                f"num_classes={self.num_classes})")


class TensorReference(Reference):
    """Rows of `bank` (N, *shape) drawn uniformly with replacement, with their labels (N,) if given.

    `num_classes` defaults to labels.max() + 1 (0 without labels)."""

    def __init__(self, bank: Tensor, labels: Tensor | None = None, name: str = "tensor",
                 num_classes: int | None = None):
        if bank.dim() < 2 or len(bank) == 0:
            raise ValueError(f"bank must be (N, *shape) with N ≥ 1, got {tuple(bank.shape)}")
        self.bank, self.labels = bank, _check_labels(labels, len(bank), name)
        self.name, self.shape = name, tuple(bank.shape[1:])
        if self.labels is None:
            self.num_classes = 0
        else:
            self.num_classes = int(self.labels.max()) + 1 if num_classes is None else num_classes

    def __len__(self) -> int:
        return len(self.bank)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(len(self.bank), (n,), generator=generator, device=_gen_device(generator))
        idx = idx.to(self.bank.device)
        y = None if self.labels is None else self.labels[idx.to(self.labels.device)]
        return self.bank[idx].float(), y


def class_subset(ref: TensorReference, classes: Sequence[int], name: str = "class_subset") -> TensorReference:
    """The rows of a labelled `ref` whose label is in `classes` (paper §4 "SubDino": 10 ImageNet classes).

    Labels keep their original values and `num_classes` stays that of `ref`, so a class-conditional real net
    and the dataset's labels agree on what each label means.

    Raises:
        ValueError: `ref` has no labels, `classes` is empty, or a class has no rows in `ref`.
    """
    if not isinstance(ref, TensorReference) or ref.labels is None:
        raise ValueError(f"class_subset needs a labelled TensorReference, got {ref!r}")
    keep = torch.as_tensor(list(classes), dtype=torch.long, device=ref.labels.device)
    if keep.numel() == 0:
        raise ValueError("class_subset needs at least one class")
    present = set(ref.labels.unique().tolist())
    absent = [c for c in keep.tolist() if c not in present]
    if absent:
        raise ValueError(f"classes {absent} have no samples in reference {ref.name!r} "
                         f"(labels present: {sorted(present)[:20]}{' …' if len(present) > 20 else ''})")
    mask = torch.isin(ref.labels, keep)
    return TensorReference(ref.bank[mask.to(ref.bank.device)], ref.labels[mask], name, ref.num_classes)


class GaussianReference(Reference):
    """N(0, I) on `shape`; `velocity` is its exact flow velocity (module docstring)."""

    num_classes = 0

    def __init__(self, shape: Sequence[int], name: str = "gaussian"):
        self.shape, self.name = tuple(shape), name

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, None]:
        return torch.randn(n, *self.shape, generator=generator, device=_gen_device(generator)), None

    def velocity(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """v = (2t − 1)·x_t / (t² + (1 − t)²) for x_t (B, *shape), t (B,); `y` is ignored. Computed in
        float32."""
        x = x_t.float()
        tt = expand_t(_as_t(t, x), x)
        return ((2 * tt - 1) * x / (tt**2 + (1 - tt) ** 2)).to(x_t.dtype)


class GMMReference(Reference):
    """An equal-weight isotropic Gaussian mixture in the flattened space of `shape`.

    Component means are fixed by `seed`: Gaussian directions rescaled to a per-element RMS of `radius`; every
    component has std `std` per element. The defaults radius = 0.8, std = 0.6 give unit per-element second
    moment (0.8² + 0.6² = 1), the scale of normalized latents. `conditional=True` labels each sample with its
    component (num_classes = components) and makes `velocity(x_t, t, y)` condition on it.
    """

    def __init__(self, shape: Sequence[int], components: int = 10, *, seed: int = 0, radius: float = 0.8,
                 std: float = 0.6, conditional: bool = False, name: str = "gmm"):
        if components < 1 or std <= 0 or radius < 0:
            raise ValueError(f"need components ≥ 1, std > 0, radius ≥ 0; got {components}, {std}, {radius}")
        self.shape, self.name, self.std, self.conditional = tuple(shape), name, float(std), conditional
        self.num_classes = components if conditional else 0
        dim = math.prod(self.shape)
        directions = torch.randn(components, dim, generator=torch.Generator().manual_seed(seed))
        # (K, D), RMS = radius
        self.means = radius * directions / directions.pow(2).mean(1, keepdim=True).sqrt()

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        device = _gen_device(generator)
        k = torch.randint(len(self.means), (n,), generator=generator, device=device)
        eps = torch.randn(n, self.means.shape[1], generator=generator, device=device)
        x = self.means.to(device)[k] + self.std * eps  # (n, D)
        return x.reshape(n, *self.shape), (k if self.conditional else None)

    def velocity(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Exact velocity for x_t (B, *shape), t (B,); `y` (B,) picks the component when conditional.

        Computed in float32 with autocast off: the logits grow with D, and bf16 would scramble the
        responsibilities."""
        b = x_t.shape[0]
        x = x_t.reshape(b, -1).float()  # (B, D)
        m = self.means.to(x.device)
        tt = _as_t(t, x).reshape(b, 1)
        var_t = tt**2 * self.std**2 + (1 - tt) ** 2  # (B, 1)
        with torch.autocast(x.device.type, enabled=False):
            if self.conditional and y is not None:
                resp = F.one_hot(y.long(), len(m)).to(x)
            else:
                logits = (tt * (x @ m.T) - 0.5 * tt**2 * m.pow(2).sum(1)[None]) / var_t  # (B, K)
                resp = torch.softmax(logits, dim=1)
            m_bar = resp @ m  # (B, D)
        v = m_bar + (tt * self.std**2 - (1 - tt)) / var_t * (x - tt * m_bar)
        return v.reshape(x_t.shape).to(x_t.dtype)


class NoiseStateReference(Reference):
    """Diffusion-noise states of a bank: x_t = (1 − t)·ε + t·bank[i], ε ~ N(0, I) fresh per draw (paper §4
    "Diffusion Noise States"). `t` is the `flow` time: t = 1 is the clean bank, t = 0 pure noise."""

    def __init__(self, bank: Tensor, labels: Tensor | None = None, t: float = 0.5, name: str = "noise_states",
                 num_classes: int | None = None):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        self.rows = TensorReference(bank, labels, name, num_classes)
        self.t, self.name = float(t), name
        self.shape, self.num_classes = self.rows.shape, self.rows.num_classes

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        data, y = self.rows.sample(n, generator)
        noise = torch.randn(data.shape, generator=generator, device=_gen_device(generator)).to(data.device)
        return (1 - self.t) * noise + self.t * data, y


def moments(ref: Reference, n: int, generator: torch.Generator, batch: int = 4096) -> tuple[float, float]:
    """Per-element mean and std over n samples of `ref` (pooled over all elements), in float64."""
    total, sq, count = 0.0, 0.0, 0
    for start in range(0, n, batch):
        x, _ = ref.sample(min(batch, n - start), generator)
        x = x.double()
        total, sq, count = total + x.sum().item(), sq + x.pow(2).sum().item(), count + x.numel()
    mean = total / count
    return mean, math.sqrt(max(sq / count - mean**2, 0.0))


# ---------------------------------------------------------------------------------------------------
# Registry: every reference built from plain tensors (the notebooks pick one by name)
# ---------------------------------------------------------------------------------------------------


def _need(value: Tensor | None, param: str, name: str) -> Tensor:
    if value is None:
        raise ValueError(f"make_reference({name!r}) needs `{param}`")
    return value


def _ssl(name, latents, labels, **_):
    return TensorReference(_need(latents, "latents", name), labels, name)


def _features(name, features, feature_labels, **_):
    return TensorReference(_need(features, "features", name), feature_labels, name)


def _gaussian(name, latents, **_):
    return GaussianReference(_need(latents, "latents", name).shape[1:], name)


def _gmm(name, latents, seed, **_):
    return GMMReference(_need(latents, "latents", name).shape[1:], seed=seed, name=name)


def _class_subset(name, latents, labels, classes, **_):
    ref = TensorReference(_need(latents, "latents", name), _need(labels, "labels", name), "ssl")
    if classes is None:
        raise ValueError(f"make_reference({name!r}) needs `classes`")
    return class_subset(ref, classes, name)


def _noise_states(name, latents, labels, t, **_):
    return NoiseStateReference(_need(latents, "latents", name), labels, t, name)


REFERENCES: dict[str, Callable[..., Reference]] = {
    "ssl": _ssl,  # the stage-1 tokenizer's normalized latents (the authors' DINO reference)
    "supervised": _features,  # `features` of a supervised encoder
    "text": _features,  # `features` = caption embeddings of a text tower (models/text_encoder.py), as
                       # (k/16, 4, 4) maps of their top k principal axes (data/latents.py: text_features)
    "gaussian": _gaussian,
    "gmm": _gmm,
    "class_subset": _class_subset,  # the `latents` rows of the labels in `classes`
    "noise_states": _noise_states,  # `latents` noised to flow time `t`
}


def make_reference(name: str, *, latents: Tensor | None = None, labels: Tensor | None = None,
                   features: Tensor | None = None, feature_labels: Tensor | None = None,
                   classes: Sequence[int] | None = None, t: float = 0.5, seed: int = 0) -> Reference:
    """Build the reference `name` of `REFERENCES` from tensors.

    Args:
        latents: (N, C, H, W) normalized stage-1 latents; also fixes the sample shape of "gaussian"/"gmm".
        labels: (N,) labels of `latents` (None: unconditional).
        features, feature_labels: (N', *shape) bank for "supervised"/"text" and its labels.
        classes: the labels kept by "class_subset".
        t: flow time of "noise_states" (t = 1 clean).
        seed: fixes the "gmm" component means.

    Raises:
        KeyError: unknown `name` (the message lists the known ones).
        ValueError: a tensor that `name` needs is None (the message names the parameter).
    """
    if name not in REFERENCES:
        raise KeyError(f"unknown reference {name!r}; known: {sorted(REFERENCES)}")
    return REFERENCES[name](name=name, latents=latents, labels=labels, features=features,
                            feature_labels=feature_labels, classes=classes, t=t, seed=seed)
