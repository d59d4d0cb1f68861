"""Label-using evaluations of frozen features: weighted kNN and a linear probe.

    kNN (Wu et al. 2018, as in DINO): cosine similarities s_ij between L2-normalised val and train features;
    the k nearest train neighbours vote for their class with weight exp(s_ij / T); argmax of the summed votes.
    Linear probe: softmax regression on standardised features (Adam, full batch), scored on val.

Labels enter only here, never in self-supervised training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.pixels import u8_to_float


@torch.no_grad()
def extract_features(fn: Callable[[Tensor], Tensor], images: Tensor, *, batch: int = 1024,
                     device: torch.device | str = "cpu") -> Tensor:
    """fn(batch) over `images` (N, 3, H, W) float in [−1, 1] or uint8 (N, H, W, 3), as one fp32 CPU tensor."""
    out = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        if x.dtype == torch.uint8:  # HWC uint8 → CHW float in [−1, 1]
            x = u8_to_float(x.permute(0, 3, 1, 2))
        out.append(fn(x.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                 k: int = 20, T: float = 0.07, *, chunk: int = 1024) -> float:
    """Weighted-vote cosine kNN accuracy of (N_val, D) features against (N_train, D) labelled ones."""
    assert train_feats.shape[0] == train_labels.shape[0] and val_feats.shape[0] == val_labels.shape[0]
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    bank, labels = F.normalize(train_feats.float(), dim=1), train_labels.long()
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, len(val_feats), chunk):
        q = F.normalize(val_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, labels[idx], (sim / T).exp())
        correct += int((votes.argmax(1) == val_labels[start:start + chunk].long()).sum())
    return correct / len(val_feats)


def linear_probe_accuracy(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor, *,
                          steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4,
                          seed: int = 0) -> float:
    """Val accuracy of a softmax-regression probe fit full-batch (Adam) on standardised train features."""
    mean, std = train_feats.float().mean(0), train_feats.float().std(0) + 1e-6
    xtr, xva = (train_feats.float() - mean) / std, (val_feats.float() - mean) / std
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the caller's RNG
        torch.manual_seed(seed)
        probe = nn.Linear(xtr.shape[1], n_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(probe(xtr), train_labels.long()).backward()
            opt.step()
    with torch.no_grad():
        return float((probe(xva).argmax(1) == val_labels.long()).float().mean())
