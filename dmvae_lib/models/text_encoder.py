"""A frozen text tower as a caption → vector map: the encoder behind the `text` reference (paper §4, Tab. 1
"SigLIP text": the reference is the distribution of text embeddings of the images' captions).

    e(c) = normalize(pool(T(tokens(c))))   (D,) per caption c, unit L2 norm

    pool = "mean"    the attention-masked mean of the last hidden states: sentence-transformers' pooling of
                     all-MiniLM-L6-v2 (its modules.json: Transformer → mean Pooling → Normalize), D = 384
    pool = "pooler"  the model's `pooler_output`: SigLIP's text embedding (the head on the last token, what
                     `SiglipModel.get_text_features` returns), D = 768 for the base model

The tower and its tokenizer come in as a module and a callable (`runtime.weights.text_tower` loads them);
nothing here reads a path or a config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLINGS = ("mean", "pooler")


class TextEncoder(nn.Module):
    """A frozen `tower` with its `tokenize(captions) -> {name: (B, L) tensor}`; forward: (B, D) unit vectors.

    The tower's weights record (`runtime.weights`), if any, stays on the tower, so `weights.files_of` finds it
    through this module."""

    def __init__(self, tokenize: Callable[[list[str]], Mapping[str, Tensor]], tower: nn.Module, *,
                 pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.tokenize, self.tower, self.pooling = tokenize, tower.eval().requires_grad_(False), pooling

    def forward(self, tokens: Mapping[str, Tensor]) -> Tensor:
        out = self.tower(**tokens)
        if self.pooling == "pooler":
            pooled = out.pooler_output.float()  # (B, D)
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
            pooled = (out.last_hidden_state.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)
        return F.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(encoder: TextEncoder, captions: Sequence[str], *, device: torch.device | str = "cpu",
          batch: int = 256) -> Tensor:
    """Embeddings (N, D) float32 on the CPU of N `captions`, row i for captions[i]; each distinct caption is
    encoded once (a reference of N images but few distinct captions costs only those)."""
    if not captions:
        raise ValueError("embed needs at least one caption")
    unique = sorted(set(captions))
    encoder = encoder.to(device)
    rows = []
    for s in range(0, len(unique), batch):
        tokens = {k: v.to(device) for k, v in encoder.tokenize(unique[s:s + batch]).items()}
        rows.append(encoder(tokens).cpu())
    table = torch.cat(rows)  # (U, D)
    index = {c: i for i, c in enumerate(unique)}
    return table[torch.tensor([index[c] for c in captions])]


def as_grid(vectors: Tensor, side: int = 4) -> Tensor:
    """Lay (N, D) vectors out as (N, D / side², side, side) maps, so that a flat embedding takes the
    (C, H, W) shape the velocity nets and projection heads work on (entry d at channel d // side²)."""
    n, d = vectors.shape
    if d % (side * side):
        raise ValueError(f"a {d}-D embedding does not fill ({d} / {side * side}, {side}, {side}) maps")
    return vectors.reshape(n, d // (side * side), side, side)  # (N, D) -> (N, D/side², side, side)
