import io
import os
import time

import pytest
import timm
import torch

from dmvae_lib.models.tokenizer import (
    Decoder,
    FrozenEncoder,
    Projector,
    Tokenizer,
    latent_stats,
    timm_encoder,
)


def _images(gen, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("name,kwargs,shape", [
    ("vit_tiny_patch16_224", {}, (2, 192, 2, 2)),
    # the authors' trick at toy size: a patch-14 DINOv2 run with 16-px patches gives an img/16 grid
    ("vit_small_patch14_dinov2", {"patch_size": 16}, (2, 384, 2, 2)),
    ("resnet18", {}, (2, 512, 1, 1)),
    ("resnet18", {"feature_stage": 1}, (2, 64, 8, 8)),
])
def test_timm_encoder_shapes(name, kwargs, shape, gen):
    enc = timm_encoder(name, img_size=32, pretrained=False, **kwargs)
    feats = enc(_images(gen))
    assert feats.shape == shape
    assert (enc.out_channels, 32 // enc.reduction) == (shape[1], shape[2])


def test_vit_grid_matches_forward_features(gen):
    """Tokens land row-major on the grid, prefix tokens dropped, final norm applied."""
    enc = timm_encoder("vit_tiny_patch16_224", img_size=64, pretrained=False)
    x = _images(gen, size=64)
    vit = enc.features.model
    x_norm = ((x + 1) / 2 - enc.mean) / enc.std
    tokens = vit.forward_features(x_norm)[:, vit.num_prefix_tokens:]  # (B, 16, C)
    feats = enc(x)
    assert torch.allclose(feats[:, :, 1, 2], tokens[:, 1 * 4 + 2], atol=1e-5)


def test_stage_pruning_drops_unused_layers():
    full = _n_params(timm.create_model("resnet18", num_classes=0))
    assert _n_params(timm_encoder("resnet18", img_size=32, pretrained=False, feature_stage=1)) < full / 10


def test_encoder_is_frozen_and_stays_in_eval(gen):
    enc = timm_encoder("resnet18", img_size=32, pretrained=False, feature_stage=1)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not enc.features.training  # BN statistics must not move
    x = _images(gen).requires_grad_()
    assert not enc(x).requires_grad
    enc.set_trainable(True)
    assert enc.features.training and all(p.requires_grad for p in enc.parameters())
    assert enc(x).requires_grad


def test_imagenet_normalisation_and_raw_mode(gen):
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x

    x = torch.zeros(1, 3, 4, 4)  # grey in [−1, 1] = 0.5 in [0, 1]
    FrozenEncoder(Probe(), 3, 1)(x)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(seen[0][0, :, 0, 0], expected)
    FrozenEncoder(Probe(), 3, 1, mean=None)(x)
    assert torch.equal(seen[1], x)


def test_pretrained_without_file_fails_fast_offline_or_not(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="weights_path=") as err:
        timm_encoder("vit_tiny_patch16_224", img_size=32)
    assert time.perf_counter() - start < 1.0
    assert "huggingface-cli download" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    with pytest.raises(RuntimeError, match="no file"):
        timm_encoder("vit_tiny_patch16_224", img_size=32, weights_path="/nonexistent/model.safetensors")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1")
def test_pretrained_empty_cache_under_hf_hub_offline_raises_with_instructions():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="huggingface-cli download"):
        timm_encoder("vit_tiny_patch16_224", img_size=32)
    assert time.perf_counter() - start < 5.0


def test_pretrained_from_local_file_with_patch_resampling(tmp_path):
    src = timm.create_model("vit_small_patch14_dinov2", img_size=28, num_classes=0)  # 2×2 patches of 14 px
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    enc = timm_encoder("vit_small_patch14_dinov2", img_size=32, patch_size=16, weights_path=str(path))
    vit = enc.features.model
    assert vit.patch_embed.proj.weight.shape[-2:] == (16, 16)  # resampled from 14×14
    assert torch.equal(vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError):
        timm_encoder("resnet18", img_size=32, weights_path=str(path), pretrained=False)


# ---------------------------------------------------------------- projector, decoder, tokenizer


def test_projector_unshuffle_and_init(gen):
    proj = Projector(64, 16, unshuffle=2)
    assert proj(torch.randn(2, 64, 8, 8, generator=gen)).shape == (2, 16, 4, 4)
    w = proj.net[0].weight
    assert w.shape == (512, 256, 1, 1) and abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert not proj.net[0].bias.any() and not proj.net[2].bias.any()
    assert _n_params(Projector(1024, 32)) == 1024 * 2048 + 2048 + 2048 * 32 + 32  # reference: 2.16 M


def _tiny_tokenizer(grid, attn=False):
    enc = timm_encoder("resnet18", img_size=32, pretrained=False, feature_stage=1)  # (B, 64, 8, 8)
    if grid == "8x8x4":
        proj, dec = Projector(64, 4), Decoder(4, latent_size=8, image_size=32, ch=64, ch_mult=(1, 1),
                                                 num_res_blocks=1, attn=attn, num_groups=8)
    else:
        proj, dec = Projector(64, 16, unshuffle=2), Decoder(16, latent_size=4, image_size=32, ch=32,
                                                            ch_mult=(1, 2, 2), num_res_blocks=1, attn=attn,
                                                            num_groups=8)
    return Tokenizer(enc, proj, dec)


@pytest.mark.parametrize("grid,z_shape", [("8x8x4", (2, 4, 8, 8)), ("4x4x16", (2, 16, 4, 4))])
@pytest.mark.parametrize("attn", [False, True])
def test_tiny_tokenizer_shapes_and_gradients(grid, z_shape, attn, gen):
    tok = _tiny_tokenizer(grid, attn)
    x = _images(gen)
    x_hat, z = tok(x)
    assert z.shape == z_shape and x_hat.shape == x.shape
    assert torch.allclose(tok.encode(x), tok.project(tok.encode_features(x)))
    assert torch.allclose(tok.decode(z), x_hat)
    (x_hat - x).abs().mean().backward()
    last = tok.decoder.get_last_layer()
    assert last is tok.decoder.conv_out.weight and last.grad is not None
    assert tok.projector.net[0].weight.grad is not None
    assert all(p.grad is None for p in tok.encoder.parameters())


def test_training_from_cached_features_without_encoder(gen):
    full, x = _tiny_tokenizer("8x8x4"), _images(gen)
    feats = full.encode_features(x)  # computed once, reused every epoch
    cached = Tokenizer(None, full.projector, full.decoder)
    assert torch.allclose(cached.decode(cached.project(feats)), full(x)[0])
    with pytest.raises(RuntimeError, match="cached features"):
        cached.encode(_images(gen))


def test_tiny_param_counts():
    tok = _tiny_tokenizer("8x8x4")
    assert _n_params(tok.projector) == 64 * 128 + 128 + 128 * 4 + 4
    assert 0.4e6 < _n_params(tok.decoder) < 0.6e6  # 486 k at this size


def test_full_scale_decoder_shape_and_size_on_meta():
    with torch.device("meta"):
        dec = Decoder(32, latent_size=16, image_size=256)  # ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, attn
        out = dec(torch.zeros(1, 32, 16, 16))
    assert out.shape == (1, 3, 256, 256)
    assert 49.0e6 < _n_params(dec) < 50.0e6  # reference: ≈ 49.6 M
    assert len(dec.z_up) == 1 and dec.mid[0].conv1.in_channels == 512


@pytest.mark.slow
def test_full_scale_decoder_forward():
    dec = Decoder(32, latent_size=16, image_size=256)
    with torch.no_grad():
        out = dec(torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


def test_decoder_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        Decoder(4, latent_size=8, image_size=48, ch=32, num_groups=8)  # not a power of two
    with pytest.raises(ValueError):
        Decoder(4, latent_size=16, image_size=32, ch=32, ch_mult=(1, 2, 2), num_groups=8)  # 2× < 4×


# ---------------------------------------------------------------- latent statistics


def test_latent_stats_pool_all_elements(gen):
    batches = [3.0 + s * torch.randn(n, 4, 2, 2, generator=gen) for n, s in [(50, 1.0), (7, 4.0), (200, 2.0)]]
    stats = latent_stats(batches)
    pooled = torch.cat([b.flatten() for b in batches]).double()
    assert stats.n == pooled.numel()
    assert stats.mean == pytest.approx(pooled.mean().item(), rel=1e-12)
    assert 1 / stats.scale == pytest.approx(pooled.std(unbiased=False).item(), rel=1e-12)
    # the reference's mean of per-batch reciprocals is a different (larger) number here
    assert sum(1 / b.std().item() for b in batches) / len(batches) > stats.scale * 1.05


def test_latent_buffers_survive_state_dict_and_invert(gen):
    tok = _tiny_tokenizer("8x8x4")
    z = 0.5 + 3.0 * torch.randn(64, 4, 8, 8, generator=gen)
    tok.measure_latent_stats(z.split(16))
    latents = tok.normalize(z)
    assert abs(latents.mean().item()) < 1e-5 and abs(latents.std(unbiased=False).item() - 1) < 1e-5
    assert torch.allclose(tok.denormalize(latents), z, atol=1e-5)
    buf = io.BytesIO()
    torch.save(tok.state_dict(), buf)
    fresh = _tiny_tokenizer("8x8x4")
    assert fresh.latent_scale.item() == 1.0
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.latent_mean.item() == tok.latent_mean.item()
    assert fresh.latent_scale.item() == tok.latent_scale.item()
