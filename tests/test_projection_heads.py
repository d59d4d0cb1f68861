import pytest
import torch
from torch import nn

from dmvae_lib.models.projection_heads import MLPHead, QueryDecoderHead, make_head, sincos_2d

LATENT = (4, 4, 4)
CASES = [  # (reference shape, head type make_head picks)
    ((4, 4, 4), nn.Identity),
    ((6, 4, 4), MLPHead),  # channels only
    ((3, 8, 8), MLPHead),  # grid ×2 (pixel_shuffle)
    ((5, 2, 2), MLPHead),  # grid ÷2 (pixel_unshuffle)
    ((5, 3, 3), QueryDecoderHead),  # not an integer multiple
    ((4, 8, 2), QueryDecoderHead),  # different factors per axis
    ((12,), QueryDecoderHead),  # flat vector (pooled feature / text embedding)
]


@pytest.mark.parametrize("ref_shape,cls", CASES, ids=lambda v: str(v) if isinstance(v, tuple) else v.__name__)
def test_make_head_picks_the_head_and_output_shape(ref_shape, cls):
    torch.manual_seed(0)
    head = make_head(LATENT, ref_shape, width=32, heads=2)
    assert type(head) is cls
    latents = torch.randn(3, *LATENT, requires_grad=True)
    out = head(latents)
    assert out.shape == (3, *ref_shape) and out.dtype == torch.float32
    out.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0  # the encoder gets the DM gradient
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_forced_kinds_and_errors():
    assert isinstance(make_head(LATENT, (6, 4, 4), width=32, kind="query", heads=2), QueryDecoderHead)
    with pytest.raises(ValueError, match="integer multiples"):
        make_head(LATENT, (5, 3, 3), kind="mlp")
    with pytest.raises(ValueError, match=r"\(C, H, W\) reference"):
        make_head(LATENT, (12,), kind="mlp")
    with pytest.raises(ValueError, match="kind"):
        make_head(LATENT, (12,), kind="conv")
    with pytest.raises(ValueError, match="latent shape"):
        make_head((16,), (12,))


def test_mlp_head_is_per_token():
    """Changing one latent token changes only the output tokens of its own image region."""
    torch.manual_seed(0)
    for ref_shape, region in [((6, 4, 4), (slice(1, 2), slice(2, 3))),
                              ((3, 8, 8), (slice(2, 4), slice(4, 6))),
                              ((5, 2, 2), (slice(0, 1), slice(1, 2)))]:
        head = make_head(LATENT, ref_shape, width=16)
        latents = torch.randn(1, *LATENT)
        poked = latents.clone()
        poked[0, :, 1, 2] += 1.0
        changed = (head(poked) - head(latents)).abs().sum(1)[0] > 0  # (H', W')
        expected = torch.zeros_like(changed)
        expected[region] = True
        assert torch.equal(changed, expected), ref_shape


def test_mlp_head_upsampling_writes_distinct_sub_pixels():
    torch.manual_seed(0)
    out = make_head(LATENT, (3, 8, 8), width=16)(torch.randn(2, *LATENT))
    blocks = out.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # (B, C', 4, 4, f²): each
                                                              # latent token's 2×2 block
    assert (blocks.std(-1) > 1e-3).all()  # pixel_shuffle: not a copied value (nearest upsampling would be)


def test_query_head_sees_every_latent_token_and_is_batch_independent():
    torch.manual_seed(0)
    head = QueryDecoderHead(LATENT, (5, 3, 3), width=32, heads=2)
    latents = torch.randn(2, *LATENT)
    poked = latents.clone()
    poked[0, :, 3, 3] += 1.0
    diff = (head(poked) - head(latents)).abs()
    assert (diff[0].sum(0) > 0).all()  # cross-attention mixes all positions
    assert diff[1].max() == 0  # and never across the batch


def test_sincos_codes():
    codes = sincos_2d(3, 5, 16)
    assert codes.shape == (15, 16)
    assert len({tuple(c.tolist()) for c in codes}) == 15  # distinct per cell
    # the same image-relative cell gets the same code on grids of different size: centre cells of 1×1 and 3×3
    torch.testing.assert_close(sincos_2d(1, 1, 16)[0], sincos_2d(3, 3, 16)[4])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 10)
