"""VA-VAE-style semantic alignment of z with frozen features (models/alignment.py) and its use in a step."""

import pytest
import torch

from dmvae_lib.models.alignment import SemanticAlignment, distance_matrix_loss, marginal_cosine_loss
from dmvae_lib.train.phases import TokenizerParts, tokenizer_step


def test_losses_vanish_on_aligned_inputs_and_respect_margins():
    f = torch.randn(3, 6, 4, 4)
    scale = torch.rand(3, 1, 4, 4) + 0.5  # per-token positive scale: cosines unchanged
    assert marginal_cosine_loss(f * scale, f, 0.0) == pytest.approx(0.0, abs=1e-6)
    assert distance_matrix_loss(f * scale, f, 0.0) == pytest.approx(0.0, abs=1e-6)
    assert marginal_cosine_loss(-f, f, 0.0) == pytest.approx(2.0, abs=1e-6)
    assert marginal_cosine_loss(-f, f, 1.5) == pytest.approx(0.5, abs=1e-6)
    other = torch.randn(3, 6, 4, 4)
    assert distance_matrix_loss(other, f, 0.0) > 0 and distance_matrix_loss(other, f, 2.0) == 0


def test_alignment_targets_semantic_channels_only_and_pools_to_the_grid():
    torch.manual_seed(0)
    align = SemanticAlignment(2, 2, 3, token_weight=1.0, global_weight=1.0)
    z = torch.randn(4, 2, 2, 2, requires_grad=True)
    feats = torch.randn(4, 5, 4, 4, requires_grad=True)  # 3 semantic channels + 2 side channels, finer grid
    loss, stats = align(z, feats)
    loss.backward()
    assert set(stats) == {"align_cos", "align_dist", "align_global"} and loss > 0
    assert z.grad.abs().sum() > 0 and feats.grad[:, 3:].abs().sum() == 0  # the side input is never a target
    off = SemanticAlignment(2, 2, 3, token_weight=0.0, global_weight=1.0)
    assert off.token is None and set(off(z, feats)[1]) == {"align_global"}


def test_alignment_is_learnable():
    """A few steps on W, G and z drive the loss down: the maps can align z with the features."""
    torch.manual_seed(0)
    feats = torch.randn(8, 4, 2, 2)
    z = torch.randn(8, 4, 2, 2, requires_grad=True)
    align = SemanticAlignment(4, 2, 4, token_weight=1.0, global_weight=1.0)
    opt = torch.optim.Adam([z, *align.parameters()], lr=0.05)
    first = float(align(z, feats)[0].detach())
    for _ in range(100):
        opt.zero_grad()
        align(z, feats)[0].backward()
        opt.step()
    assert float(align(z, feats)[0].detach()) < 0.3 * first


def test_tokenizer_step_adds_the_term_and_keeps_it_off_the_decoder():
    torch.manual_seed(0)
    proj, dec = torch.nn.Conv2d(5, 2, 1), torch.nn.Conv2d(2, 3, 1)
    align = SemanticAlignment(2, 4, 3, token_weight=1.0, global_weight=0.5)
    tok = torch.nn.Module()
    tok.projector, tok.decoder = proj, dec
    feats, images = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    params = [*proj.parameters(), *dec.parameters(), *align.parameters()]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: inspect the gradients only
    gen = torch.Generator().manual_seed(0)
    stats, _ = tokenizer_step(tok, opt, params, images, feats, gen, rec={"l1": 0.0},
                              disc=None, disc_weight=0.0,
                              model=TokenizerParts(proj, dec, align))
    assert stats["align_loss"] > 0 and {"align_cos", "align_dist", "align_global"} <= set(stats)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dec.parameters())
    assert proj.weight.grad.abs().sum() > 0 and align.pooled.weight.grad.abs().sum() > 0
