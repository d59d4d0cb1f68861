"""Saved artifacts: each model is rebuilt from the config stored beside its weights and loaded strictly."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..configs import ConfigError, from_dict, to_dict
from ..configs.generation import GenerationStageConfig
from ..configs.ssl import SSLConfig
from ..configs.teacher import TeacherStageConfig
from ..configs.tokenizer import TokenizerStageConfig
from ..data.latent_cache import file_digest
from ..data.references import TensorReference
from ..models.lightning_dit import lightning_dit
from ..models.projection_heads import make_head
from ..models.ssl_encoder import SmallResNet
from ..models.tokenizer import Decoder, Projector, SSLFeatures, Tokenizer, timm_encoder
from ..runtime.runs import RunError, load_checkpoint, load_state_strict, save_checkpoint
from ..runtime.seeds import stream_seed


def build_net(cfg: TeacherStageConfig | GenerationStageConfig, shape: tuple[int, ...],
              num_classes: int) -> nn.Module:
    """The LightningDiT that `cfg.net` describes, for latents of `shape` (C, H, W) and `num_classes`."""
    c, h, w = shape
    if h != w:
        raise RunError(f"the LightningDiT needs a square grid, the reference has {shape}")
    n = cfg.net
    return lightning_dit(n.size, input_size=h, in_channels=c, num_classes=num_classes,
                         patch_size=n.patch_size, grad_checkpoint=n.grad_checkpoint, time_scale=n.time_scale,
                         pos_embed_order=n.pos_embed_order)


def save_teacher(path: Path, cfg: TeacherStageConfig, net: nn.Module, reference,
                 tokenizer_file: Path) -> None:
    save_checkpoint(path, {
        "kind": "teacher", "config": to_dict(cfg), "net": net.state_dict(),
        "reference": {"name": reference.name, "shape": list(reference.shape),
                      "num_classes": reference.num_classes},
        "tokenizer": {"path": str(tokenizer_file), "digest": file_digest(tokenizer_file)},
    })


def load_teacher(path: str | Path, device="cpu", expect_reference: Optional[str] = None) -> tuple[nn.Module,
                                                                                                  dict]:
    """The frozen teacher from `save_teacher` (strict);
    wrong kind, missing file or reference mismatch raise."""
    ck = load_checkpoint(path, required=("kind", "config", "net", "reference", "tokenizer"))
    if ck["kind"] != "teacher":
        raise RunError(f"{path} holds a {ck['kind']!r} checkpoint, not a teacher")
    ref = ck["reference"]
    if expect_reference is not None and ref["name"] != expect_reference:
        raise RunError(f"{path} was fitted on reference {ref['name']!r}, not {expect_reference!r}")
    cfg = from_dict(TeacherStageConfig, ck["config"])
    net = build_net(cfg, tuple(ref["shape"]), ref["num_classes"])
    load_state_strict(net, ck["net"], f"{path} [net]")
    return net.to(device).eval().requires_grad_(False), ck


def upstream_tokenizer(folder: Path, device, name: str = "tokenizer.pt") -> tuple[Tokenizer, object, dict,
                                                                                  Path]:
    """A tokenizer saved in a run folder (stage 1's, or notebook 40's DM/control one): (tokenizer, its stage-1
    config, encoders, file)."""
    file = Path(folder) / name
    tok, tcfg, encoders = load_tokenizer(file, device)
    return tok, tcfg, encoders, file


def build_tokenizer(cfg: TokenizerStageConfig, encoder: Optional[nn.Module]) -> Tokenizer:
    """Frozen encoder (ssl/supervised backbone wrapped by
    SSLFeatures, or a timm model) → projector → decoder."""
    e, n = cfg.encoder, cfg.net
    if encoder is None:
        encoder = timm_encoder(e.timm_name, img_size=cfg.data.resolution, patch_size=e.timm_patch_size,
                               weights_path=e.timm_weights or None, pretrained=e.timm_pretrained)
        channels, reduction = encoder.out_channels, encoder.reduction
    else:
        encoder = SSLFeatures(encoder, e.side_input)
        channels, reduction = encoder.out_channels, 4
    latent = cfg.data.resolution // (reduction * n.unshuffle)
    with torch.random.fork_rng(devices=[]):  # the initialisation depends on cfg.seed only
        torch.manual_seed(stream_seed(cfg.seed, "tokenizer.init"))
        proj = Projector(channels, n.z_channels, hidden_channels=n.proj_hidden, unshuffle=n.unshuffle)
        dec = Decoder(n.z_channels, latent_size=latent, image_size=cfg.data.resolution, ch=n.dec_ch,
                      ch_mult=n.dec_mult, num_res_blocks=n.dec_res_blocks, attn=n.dec_attn,
                      num_groups=n.dec_groups)
    return Tokenizer(encoder, proj, dec)


ENCODER_NAMES = ("ssl", "supervised", "random")  # the embedded backbones a tokenizer file can carry


def classifier(encoders: dict) -> Optional[nn.Module]:
    """The embedded supervised classifier, backbone then linear head, when stage 1 trained it (else None)."""
    if "supervised" in encoders and "supervised_head" in encoders:
        return nn.Sequential(encoders["supervised"], encoders["supervised_head"]).eval()
    return None


def tokenizer_backbone(cfg: TokenizerStageConfig, encoders: dict) -> Optional[nn.Module]:
    """The backbone `cfg.encoder.kind` builds the tokenizer around (None: a timm encoder); its own copy when
    stage 1 trains it (`train.train_encoder`), so the reference backbone in `encoders` stays as it was."""
    kind = cfg.encoder.kind
    if kind == "timm":
        return None
    if kind not in encoders:
        raise RunError(f"encoder.kind={kind!r} but no {kind!r} encoder was trained or saved")
    return copy.deepcopy(encoders[kind]) if cfg.train.train_encoder else encoders[kind]


def save_tokenizer(path: Path, cfg: TokenizerStageConfig, tok: Tokenizer, encoders: dict, *,
                   trained_encoder: bool = False) -> None:
    """Everything later stages need to rebuild the tokenizer, latent stats included. `encoders` are the
    reference backbones as trained in stage 1 (feature spaces of the metrics); with `trained_encoder` the
    tokenizer's own encoder, changed by joint training, is stored beside them."""
    payload = {"kind": "tokenizer", "config": to_dict(cfg), "projector": tok.projector.state_dict(),
               "decoder": tok.decoder.state_dict(), "latent_mean": float(tok.latent_mean),
               "latent_scale": float(tok.latent_scale)}
    for name in (*ENCODER_NAMES, "supervised_head"):
        if name in encoders:
            payload[name] = encoders[name].state_dict()
    if trained_encoder:
        payload["encoder"] = tok.encoder.state_dict()
    save_checkpoint(path, payload)


def load_tokenizer(path: str | Path, device="cpu") -> tuple[Tokenizer, TokenizerStageConfig, dict]:
    """Rebuild a tokenizer saved by `save_tokenizer` (strict); returns (tokenizer, config, encoders)."""
    ck = load_checkpoint(path,
                         required=("kind", "config", "projector", "decoder", "latent_mean", "latent_scale"))
    if ck["kind"] != "tokenizer":
        raise RunError(f"{path} holds a {ck['kind']!r} checkpoint, not a tokenizer")
    cfg = from_dict(TokenizerStageConfig, ck["config"])
    encoders = {}
    for name in ENCODER_NAMES:
        if name in ck:
            net = SmallResNet(cfg.encoder.ssl.width, cfg.encoder.ssl.arch)
            load_state_strict(net, ck[name], f"{path} [{name}]")
            encoders[name] = net.eval()
    if "supervised_head" in ck:  # the supervised classifier's linear head (files before it lack one)
        w = ck["supervised_head"]["weight"]
        head = nn.Linear(w.shape[1], w.shape[0])
        load_state_strict(head, ck["supervised_head"], f"{path} [supervised_head]")
        encoders["supervised_head"] = head.eval()
    backbone = tokenizer_backbone(cfg, encoders)
    if "encoder" in ck and backbone is not None:  # trained jointly: its own copy; the references stay
        backbone = copy.deepcopy(backbone)
    tok = build_tokenizer(cfg, backbone)
    if "encoder" in ck:
        load_state_strict(tok.encoder, ck["encoder"], f"{path} [encoder]")
    load_state_strict(tok.projector, ck["projector"], f"{path} [projector]")
    load_state_strict(tok.decoder, ck["decoder"], f"{path} [decoder]")
    tok.latent_mean.fill_(ck["latent_mean"])
    tok.latent_scale.fill_(ck["latent_scale"])
    return tok.to(device).eval(), cfg, encoders


def save_generator(path: Path, cfg: GenerationStageConfig, net: nn.Module, data: TensorReference,
                   tokenizer_file: Path) -> None:
    save_checkpoint(path, {"kind": "generator", "config": to_dict(cfg), "net": net.state_dict(),
                           "latents": {"shape": list(data.shape), "num_classes": data.num_classes},
                           "tokenizer": {"path": str(tokenizer_file), "digest": file_digest(tokenizer_file)}})


def load_generator(path: Path, device="cpu") -> tuple[nn.Module, dict]:
    """A generator saved by `save_generator` (strict)."""
    ck = load_checkpoint(path, required=("kind", "config", "net", "latents", "tokenizer"))
    if ck["kind"] != "generator":
        raise RunError(f"{path} holds a {ck['kind']!r} checkpoint, not a generator")
    net = build_net(from_dict(GenerationStageConfig, ck["config"]), tuple(ck["latents"]["shape"]),
                        ck["latents"]["num_classes"])
    load_state_strict(net, ck["net"], f"{path} [net]")
    return net.to(device).eval().requires_grad_(False), ck


def save_head(path, head: nn.Module, reference) -> None:
    save_checkpoint(path, {"kind": "projection_head", "head": head.state_dict(),
                           "reference": {"name": reference.name, "shape": list(reference.shape)}})


def load_head(path: Path, latent_shape: Sequence[int], ref_shape: Sequence[int]) -> nn.Module:
    """The projection head saved by notebook 40 (strict: it must map these latents onto this reference)."""
    ck = load_checkpoint(path, required=("kind", "head", "reference"))
    if ck["kind"] != "projection_head" or list(ck["reference"]["shape"]) != list(ref_shape):
        raise RunError(f"{path} is not a projection head onto a {tuple(ref_shape)} reference "
                       f"({ck['reference']})")
    head = make_head(latent_shape, ref_shape)
    load_state_strict(head, ck["head"], str(path))
    return head.eval()


def save_encoder(path, encoder: SmallResNet, cfg: SSLConfig, metrics: dict | None = None) -> None:
    """Write the backbone (no projector) with its config and evaluation numbers, atomically."""
    weights = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_checkpoint(path, {"kind": "ssl_encoder", "config": dataclasses.asdict(cfg), "model": weights,
                           "metrics": dict(metrics or {})})


def load_encoder(path, device: str | torch.device = "cpu") -> tuple[SmallResNet, SSLConfig, dict]:
    """(encoder in eval mode, its config, its metrics); a missing file, a foreign config or mismatched
    weights raise RunError naming the file."""
    ckpt = load_checkpoint(path, required=("config", "model"))
    try:
        cfg = from_dict(SSLConfig, ckpt["config"])
    except ConfigError as exc:
        raise RunError(f"checkpoint {path}: its config does not fit SSLConfig: {exc}") from exc
    encoder = SmallResNet(cfg.width, cfg.arch)
    load_state_strict(encoder, ckpt["model"], str(path))
    return encoder.to(device).eval(), cfg, ckpt.get("metrics", {})
