"""The DMVAE authors' released weights (Hugging Face `sen-ye/dmvae`) as this project's state dicts.

Math side only: state dicts in, state dicts out; reading the files is `train/released.py`. The authors' code
(github.com/sen-ye/dmvae, no licence) was read, not copied; the maps below were measured against it at their
commit d2be8e0 with random full-size weights (fixture: tests/fixtures/released/).

Generator (`ep*.pt`, LightningDiT-XL/1), theirs → ours, every trainable tensor by renaming:

    x_embedder.proj.*              → patch_embed.*
    t_embedder.mlp.{0,2}.*         → t_mlp.{0,2}.*
    y_embedder.embedding_table.*   → y_embed.*                     (1001 rows; the last is the null label)
    blocks.i.adaLN_modulation.1.*  → blocks.i.adaLN.1.*            (norm1/2, attn.*, mlp.w12/w3 as named)
    final_layer.{norm_final, linear, adaLN_modulation.1}.* → final.{norm, linear, adaLN.1}.*
    pos_embed, feat_rope.freqs_{cos,sin}: fixed tables, checked against ours and dropped (we rebuild them)

Their net embeds t, ours 1000·t, and their position table codes (column, row) where ours codes (row, column):
no weight map can fix either, so their weights run in our net built with `AUTHORS_DIT_SETTINGS`.

Tokenizer (`vae.pt`, VAE(model_size="large", z_channels=32)), theirs → ours:

    encoder.model.*                → encoder.features.model.*      (the timm DINOv2, same timm names)
    encoder.{de_scale,scale}.{mean,std}: the [−1, 1] → ImageNet normalisation, checked and dropped
    bottle_neck.mlp.{0,2}.weight (out, in) → projector.net.{0,2}.weight (out, in, 1, 1)  (Linear → 1×1 conv)
    decoder.conv_in.0.conv.*       → decoder.z_up.0.1.*            (their post_init: nearest ×2 + conv on z)
    decoder.conv_in.1.*            → decoder.conv_in.*
    decoder.mid.{block_1, attn_1, block_2}.* → decoder.mid.{0, 1, 2}.*
    attention q, k, v (C, C, 1, 1) → qkv (3C, C, 1, 1) concatenated in that order;  proj_out → proj
    decoder.up.i.block.j.*         → decoder.up.(L−1−i).j.*        (their levels are numbered from the
    decoder.up.i.upsample.conv.*   → decoder.up.(L−1−i).n_i.1.*     highest resolution, ours in the order run)
    nin_shortcut                   → skip
    latent_mean, latent_scale: not in their file (the README's 0.0685, 0.1763): passed in

Both converters are strict: every unmapped, missing, unexpected or mis-shaped key and every fixed table that
differs from ours is named in one `ConversionError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .lightning_dit import rope_angles, sincos_pos_embed_2d
from .tokenizer import IMAGENET_MEAN, IMAGENET_STD

AUTHORS_DIT_SETTINGS = {"time_scale": 1.0, "pos_embed_order": "col_row"}  # our LightningDiT's arguments
TABLE_ATOL = 1e-4  # fixed tables: theirs are float64 numpy (position) or float32 torch (RoPE) cast to float32


class ConversionError(ValueError):
    """An authors' state dict that does not map onto ours; the message names every offending key."""


# A rule maps a source key (full regex match) to (target key, part): part None copies the tensor, an int i
# makes it the i-th slice of a target concatenated along dim 0 (q, k, v → qkv).
Rule = tuple[str, Callable[[re.Match], tuple[str, int | None]]]


def _rename(template: str) -> Callable[[re.Match], tuple[str, None]]:
    return lambda m: (m.expand(template), None)


_DIT_RULES: list[Rule] = [
    (r"x_embedder\.proj\.(weight|bias)", _rename(r"patch_embed.\1")),
    (r"t_embedder\.mlp\.([02])\.(weight|bias)", _rename(r"t_mlp.\1.\2")),
    (r"y_embedder\.embedding_table\.weight", _rename("y_embed.weight")),
    (r"blocks\.(\d+)\.(norm1|norm2|attn\.q_norm|attn\.k_norm)\.weight", _rename(r"blocks.\1.\2.weight")),
    (r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.w12|mlp\.w3)\.(weight|bias)", _rename(r"blocks.\1.\2.\3")),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", _rename(r"blocks.\1.adaLN.1.\2")),
    (r"final_layer\.norm_final\.weight", _rename("final.norm.weight")),
    (r"final_layer\.linear\.(weight|bias)", _rename(r"final.linear.\1")),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", _rename(r"final.adaLN.1.\1")),
]


def _convert(sd: Mapping[str, Tensor], rules: list[Rule], like: Mapping[str, Tensor],
             tables: Mapping[str, Callable[[Tensor], str | None]], reshape: Mapping[str, Callable],
             what: str) -> dict[str, Tensor]:
    """Rename `sd` by `rules` onto the keys and shapes of `like`; `tables` check-and-drop fixed tensors (a
    returned string is the problem), `reshape[target]` adapts a tensor. One error lists every problem."""
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, tuple[str, Tensor]]] = {}
    sources: dict[str, str] = {}
    unmapped, duplicate, bad_tables = [], [], []
    for key, value in sd.items():
        if key in tables:
            if (problem := tables[key](value)) is not None:
                bad_tables.append(f"{key} ({problem})")
            continue
        match = next(((m, fn) for pattern, fn in rules if (m := re.fullmatch(pattern, key))), None)
        if match is None:
            unmapped.append(key)
            continue
        target, part = match[1](match[0])
        if part is None:
            if target in out:
                duplicate.append(f"{key} and {sources[target]} → {target}")
            out[target], sources[target] = value, key
        else:
            parts.setdefault(target, {})[part] = (key, value)
    missing = []
    for target, got in parts.items():
        if sorted(got) != list(range(3)):
            missing.append(f"{target} (from q, k, v; only {', '.join(src for src, _ in got.values())})")
            continue
        out[target] = torch.cat([got[i][1] for i in range(3)], dim=0)
        sources[target] = " + ".join(got[i][0] for i in range(3))
    for target, fn in reshape.items():
        if target in out:
            out[target] = fn(out[target])
    missing += [k for k in like if k not in out and k not in parts]
    unexpected = [f"{sources[k]} → {k}" for k in out if k not in like]
    misshaped = [f"{sources[k]} → {k} {tuple(out[k].shape)} (ours {tuple(like[k].shape)})"
                 for k in out if k in like and out[k].shape != like[k].shape]
    found = {"unmapped keys": unmapped, "two keys onto one": duplicate, "missing keys": missing,
             "unexpected keys": unexpected, "mis-shaped tensors": misshaped,
             "fixed tables unlike ours": bad_tables}
    problems = [(n, v) for n, v in found.items() if v]
    if problems:
        raise ConversionError(f"{what}: the authors' state dict does not convert: "
                              + "; ".join(f"{n} ({len(v)}): {', '.join(v)}" for n, v in problems))
    return {k: out[k] for k in like}


def _table_check(expected: Callable[[Tensor], Tensor]) -> Callable[[Tensor], str | None]:
    """A check that a fixed tensor equals `expected(it)` (shape and values within TABLE_ATOL)."""

    def check(value: Tensor) -> str | None:
        try:
            want = expected(value)
        except ValueError as exc:  # a shape our table builder rejects
            return str(exc)
        if want.shape != value.shape:
            return f"shape {tuple(value.shape)}, ours {tuple(want.shape)}"
        err = (value.double() - want.double()).abs().max().item()
        return None if err <= TABLE_ATOL else f"differs from ours by up to {err:.3g}"

    return check


def _position_table(value: Tensor) -> Tensor:
    """Their pos_embed (1, N, D): our table built with the authors' (column, row) order."""
    grid = math.isqrt(value.shape[-2])
    return sincos_pos_embed_2d(value.shape[-1], grid, AUTHORS_DIT_SETTINGS["pos_embed_order"])[None]


def _rope_table(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Their RoPE cos/sin table (N, head_dim), each angle repeated for both members of a pair, from ours."""

    def expected(value: Tensor) -> Tensor:
        pos = torch.arange(math.isqrt(value.shape[0]))
        rows, cols = (a.reshape(-1) for a in torch.meshgrid(pos, pos, indexing="ij"))
        return fn(rope_angles(value.shape[1], rows, cols)).repeat_interleave(2, dim=1)

    return expected


def dit_state_from_authors(sd: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our LightningDiT state dict from the authors' LightningDiT state dict `sd` (the `ema` or `model` entry
    of their ep*.pt). `like` is the state dict of our net, which must be built with `AUTHORS_DIT_SETTINGS`;
    the result has exactly its keys and shapes. Tensors are shared with `sd`, not copied.

    Raises:
        ConversionError: naming every unmapped, missing, unexpected or mis-shaped key, and a position or
            RoPE table in `sd` that differs from the one our net builds.
    """
    tables = {"pos_embed": _table_check(_position_table),
              "feat_rope.freqs_cos": _table_check(_rope_table(torch.cos)),
              "feat_rope.freqs_sin": _table_check(_rope_table(torch.sin))}
    return _convert(sd, _DIT_RULES, like, tables, {}, "LightningDiT")


_RES = r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)"  # a ResnetBlock's tensors


def _res(m: re.Match, group: int) -> str:
    """Our ResBlock's name for their ResnetBlock tensor matched by _RES at `group`."""
    name = "skip" if m.group(group) == "nin_shortcut" else m.group(group)
    return f"{name}.{m.group(group + 1)}"


def _decoder_rules(sd: Mapping[str, Tensor]) -> list[Rule]:
    """Their decoder's rules; the level flip and the index of each level's upsample come from `sd`'s keys."""
    blocks: dict[int, set[int]] = {}
    for key in sd:
        if m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.", key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    last = max(blocks, default=0)  # L − 1
    qkv = {"q": 0, "k": 1, "v": 2}
    return [
        (r"decoder\.conv_in\.0\.conv\.(weight|bias)", _rename(r"decoder.z_up.0.1.\1")),
        (r"decoder\.conv_in\.1\.(weight|bias)", _rename(r"decoder.conv_in.\1")),
        (rf"decoder\.mid\.block_([12])\.{_RES}",
         lambda m: (f"decoder.mid.{2 * int(m[1]) - 2}.{_res(m, 2)}", None)),
        (r"decoder\.mid\.attn_1\.norm\.(weight|bias)", _rename(r"decoder.mid.1.norm.\1")),
        (r"decoder\.mid\.attn_1\.([qkv])\.(weight|bias)", lambda m: (f"decoder.mid.1.qkv.{m[2]}", qkv[m[1]])),
        (r"decoder\.mid\.attn_1\.proj_out\.(weight|bias)", _rename(r"decoder.mid.1.proj.\1")),
        (rf"decoder\.up\.(\d+)\.block\.(\d+)\.{_RES}",
         lambda m: (f"decoder.up.{last - int(m[1])}.{m[2]}.{_res(m, 3)}", None)),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)",
         lambda m: (f"decoder.up.{last - int(m[1])}.{len(blocks.get(int(m[1]), ()))}.1.{m[2]}", None)),
        (r"decoder\.(norm_out|conv_out)\.(weight|bias)", _rename(r"decoder.\1.\2")),
    ]


def _constant(values: tuple[float, ...]) -> Callable[[Tensor], Tensor]:
    return lambda value: torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def tokenizer_state_from_authors(sd: Mapping[str, Tensor], like: Mapping[str, Tensor], *, latent_mean: float,
                                 latent_scale: float) -> dict[str, Tensor]:
    """Our Tokenizer state dict (encoder, projector, decoder, latent stats) from the authors' VAE state dict
    `sd` (`vae_ema` or `vae_wo_ddp` of their vae.pt). `like` is our Tokenizer's state dict (timm encoder of
    the same model, Flux decoder of the same widths); `latent_mean`/`latent_scale` fill its latent-stat
    buffers (latents = (z − mean)·scale; not in their file). Tensors are shared with `sd` where not reshaped.

    Raises:
        ConversionError: naming every unmapped, missing, unexpected or mis-shaped key, and a normalisation
            buffer in `sd` unlike ours ([−1, 1] → ImageNet mean/std).
    """
    rules: list[Rule] = [
        (r"encoder\.model\.(.+)", _rename(r"encoder.features.model.\1")),
        (r"bottle_neck\.mlp\.([02])\.(weight|bias)", _rename(r"projector.net.\1.\2")),
        *_decoder_rules(sd),
    ]
    tables = {"encoder.de_scale.mean": _table_check(_constant((0.5,) * 3)),
              "encoder.de_scale.std": _table_check(_constant((0.5,) * 3)),
              "encoder.scale.mean": _table_check(_constant(IMAGENET_MEAN)),
              "encoder.scale.std": _table_check(_constant(IMAGENET_STD))}
    to_conv = {f"projector.net.{i}.weight": lambda w: w[:, :, None, None] for i in (0, 2)}
    stats = {"latent_mean": torch.tensor(float(latent_mean)),
             "latent_scale": torch.tensor(float(latent_scale))}
    out = _convert(sd, rules, {k: v for k, v in like.items() if k not in stats}, tables, to_conv, "Tokenizer")
    return {k: stats[k] if k in stats else out[k] for k in like}
