import pytest
import torch

from dmvae_lib.core.samplers import cfg_velocity
from dmvae_lib.models import lightning_dit as dit_module
from dmvae_lib.models.lightning_dit import (
    DIT_SIZES,
    LightningDiT,
    apply_rope,
    drop_labels,
    lightning_dit,
    rope_angles,
)


def _tiny(input_size=8, channels=4, num_classes=3, patch_size=1, **kw):
    torch.manual_seed(0)
    return lightning_dit(
        "tiny",
        input_size=input_size,
        in_channels=channels,
        num_classes=num_classes,
        patch_size=patch_size,
        **kw,
    )


def _perturb(net, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


def _inputs(net, batch, gen):
    x = torch.randn(batch, net.in_channels, net.input_size, net.input_size, generator=gen)
    return x, torch.rand(batch, generator=gen)


@pytest.mark.parametrize("input_size,channels,patch_size", [(8, 4, 1), (8, 4, 2), (4, 3, 1), (6, 2, 2)])
def test_shape_and_zero_init(input_size, channels, patch_size, gen):
    net = _tiny(input_size, channels, patch_size=patch_size)
    x, t = _inputs(net, 3, gen)
    v = net(x, t, torch.tensor([0, 1, 2]))
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(x))
    v = _perturb(net)(x, t, torch.tensor([0, 1, 2]))
    assert v.shape == x.shape and v.abs().sum() > 0
    assert torch.allclose(net(x, torch.tensor(0.4)), net(x, torch.full((3,), 0.4)), atol=1e-6)


def test_blocks_start_as_identity(gen):
    """adaLN-Zero: with zero gates every block passes its input through unchanged."""
    net = _tiny()
    x, c = torch.randn(2, 64, 64, generator=gen), torch.randn(2, 64, generator=gen)
    rope = (net.rope_cos, net.rope_sin)
    for block in net.blocks:
        assert torch.equal(block(x, c, rope), x)
    _perturb(net.blocks[0].adaLN)
    assert not torch.allclose(net.blocks[0](x, c, rope), x, atol=1e-4)


def test_rms_norm_keeps_dtype_and_normalizes(gen):
    norm = dit_module.RMSNorm(16)
    x = 5 * torch.randn(3, 16, generator=gen)
    y = norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-4)
    y16 = norm(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.allclose(y16.float(), y, atol=2e-2)


def test_buffers_follow_the_module():
    net = _tiny().to("meta")
    assert net.pos_embed.device.type == "meta" and net.rope_cos.device.type == "meta"
    assert _tiny().double().pos_embed.dtype == torch.float64


def test_wrong_input_shape_raises(gen):
    net = _tiny()
    with pytest.raises(ValueError, match="expected x_t"):
        net(torch.randn(2, 4, 6, 6, generator=gen), torch.rand(2, generator=gen))


def test_output_depends_on_t_and_y(gen):
    net = _perturb(_tiny())
    x, _ = _inputs(net, 4, gen)
    y = torch.tensor([0, 1, 2, 0])
    v = net(x, torch.full((4,), 0.3), y)
    assert not torch.allclose(v, net(x, torch.full((4,), 0.6), y), atol=1e-4)
    assert not torch.allclose(v, net(x, torch.full((4,), 0.3), (y + 1) % 3), atol=1e-4)


def test_none_label_is_null_label(gen):
    net = _perturb(_tiny())
    x, t = _inputs(net, 4, gen)
    assert net.null_label == 3 and net.y_embed.num_embeddings == 4
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), net.null_label)))
    assert not torch.allclose(net(x, t), net(x, t, torch.zeros(4, dtype=torch.long)), atol=1e-4)


def test_unconditional_net(gen):
    net = _perturb(_tiny(num_classes=0))
    assert net.y_embed is None
    x, t = _inputs(net, 2, gen)
    v = net(x, t)
    assert v.shape == x.shape and torch.isfinite(v).all() and v.abs().sum() > 0
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, torch.zeros(2, dtype=torch.long))


def test_drop_labels():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, 0.3, null_label=10, generator=torch.Generator().manual_seed(2))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
    assert torch.equal(out[~dropped], y[~dropped])
    again = drop_labels(y, 0.3, null_label=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert (drop_labels(y, 1.0, 10) == 10).all()
    with pytest.raises(ValueError):
        drop_labels(y, 1.5, 10)


def test_cfg_one_batched_forward(gen):
    net = _perturb(_tiny())
    calls = []
    net.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x, t = _inputs(net, 4, gen)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        v_cond, v_null = net(x, t, y), net(x, t, torch.full_like(y, net.null_label))
        calls.clear()
        v1 = cfg_velocity(net, x, t, y, scale=1.0, null_label=net.null_label)
        assert calls == [4]
        calls.clear()
        v3 = cfg_velocity(net, x, t, y, scale=3.0, null_label=net.null_label)
        assert calls == [8]  # cond and null in ONE forward
    assert torch.allclose(v1, v_cond, atol=1e-6)
    assert torch.allclose(v3, v_null + 3.0 * (v_cond - v_null), atol=1e-5)
    assert not torch.allclose(v3, v_cond, atol=1e-4)


def test_rope_depends_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    head_dim = 16
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def score(pq, pk):
        ang = rope_angles(head_dim, torch.tensor([pq[0], pk[0]]), torch.tensor([pq[1], pk[1]]))
        qr = apply_rope(q[None], ang.cos()[:1], ang.sin()[:1])
        kr = apply_rope(k[None], ang.cos()[1:], ang.sin()[1:])
        return (qr * kr).sum()

    base = score((1, 2), (3, 5))
    for offset in [(1, 0), (0, 3), (4, -2), (7, 7)]:
        shifted = score((1 + offset[0], 2 + offset[1]), (3 + offset[0], 5 + offset[1]))
        assert torch.allclose(base, shifted, atol=1e-5)
    assert not torch.allclose(base, score((1, 2), (4, 5)), atol=1e-3)  # row offset matters
    assert not torch.allclose(base, score((1, 2), (3, 6)), atol=1e-3)  # column offset matters
    ang = rope_angles(head_dim, torch.tensor([3]), torch.tensor([5]))
    assert torch.allclose(apply_rope(q[None], ang.cos(), ang.sin()).norm(), q.norm())  # a rotation


def test_rope_is_used_by_the_net(gen):
    with_rope, without = _perturb(_tiny(rope=True)), _perturb(_tiny(rope=False))
    assert not hasattr(without, "rope_cos")
    x, t = _inputs(with_rope, 2, gen)
    assert not torch.allclose(with_rope(x, t), without(x, t), atol=1e-4)


def test_tokens_map_back_to_their_patch(gen):
    """depth 0 acts per token: changing one input patch changes exactly that output patch."""
    torch.manual_seed(0)
    net = _perturb(LightningDiT(6, 3, hidden=32, depth=0, heads=2, num_classes=0, patch_size=2))
    x, t = _inputs(net, 1, gen)
    x2 = x.clone()
    x2[:, :, 0:2, 2:4] += 1.0  # patch (row 0, column 1)
    changed = (net(x2, t) - net(x, t)).abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(changed, expected)


def test_grad_checkpoint_matches(gen, monkeypatch):
    plain = _perturb(_tiny())
    ckpt = _perturb(_tiny(grad_checkpoint=True))
    used = []
    real_checkpoint = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **k: used.append(1) or real_checkpoint(*a, **k))
    x, t = _inputs(plain, 3, gen)
    y = torch.tensor([0, 1, 2])
    outs = []
    for net in (plain, ckpt):
        net.train()
        v = net(x, t, y)
        v.pow(2).mean().backward()
        outs.append((v.detach(), [p.grad.clone() for p in net.parameters()]))
    assert len(used) == len(ckpt.blocks)
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(g0, g1, atol=1e-6)
    ckpt.eval()
    used.clear()
    ckpt(x, t, y)
    assert used == []  # no checkpointing outside training


def test_bf16_autocast_close_to_fp32(gen):
    net = _perturb(_tiny(), std=0.05)
    x, t = _inputs(net, 4, gen)
    y = torch.tensor([0, 1, 2, 0])
    v32 = net(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16 = net(x, t, y)
        v16.float().pow(2).mean().backward()
    assert torch.isfinite(v16).all()
    rel = (v16.float() - v32).norm() / v32.norm()
    assert rel < 0.05, rel
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_torch_compile_fullgraph(gen):
    net = _perturb(_tiny(grad_checkpoint=True)).eval()
    x, t = _inputs(net, 2, gen)
    compiled = torch.compile(net, fullgraph=True, backend="eager")  # dynamo tracing only: no graph breaks
    assert torch.allclose(compiled(x, t, torch.tensor([0, 1])), net(x, t, torch.tensor([0, 1])), atol=1e-6)


# Reference table (in_channels 32, 16×16 latent, 1000 classes, patch 1; buffers excluded), millions.
@pytest.mark.parametrize(
    "size,patch_size,millions",
    [("Mini", 1, 7.6), ("S", 1, 32.9), ("B", 1, 130.4), ("B", 2, 130.5), ("L", 1, 457.9), ("XL", 1, 675.0),
     ("XL", 2, 675.2)],
)  # fmt: skip
def test_param_counts_match_reference(size, patch_size, millions):
    with torch.device("meta"):
        net = lightning_dit(size, input_size=16, in_channels=32, num_classes=1000, patch_size=patch_size)
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - millions) < 0.1
    assert not any(name.startswith(("pos_embed", "rope")) for name, _ in net.named_parameters())


def test_toy_mini_param_count():
    with torch.device("meta"):  # the authors' 2-D toy: Mini/1 on 1-token, 2-channel "images", 1 class
        net = lightning_dit("Mini", input_size=1, in_channels=2, num_classes=1)
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 7.37) < 0.01


def test_registry():
    assert {"tiny", "Micro", "Mini", "S", "B", "L", "XL"} <= set(DIT_SIZES)
    with pytest.raises(KeyError, match="known sizes: tiny"):
        lightning_dit("XXL", input_size=8, in_channels=4, num_classes=10)


def test_state_dict_round_trip_strict(gen):
    src = _perturb(_tiny())
    dst = _tiny()
    state = src.state_dict()
    assert not any(k.startswith(("pos_embed", "rope")) for k in state)  # fixed tables are rebuilt, not saved
    dst.load_state_dict(state, strict=True)
    x, t = _inputs(src, 2, gen)
    assert torch.equal(src(x, t, torch.tensor([0, 2])), dst(x, t, torch.tensor([0, 2])))
    with pytest.raises(RuntimeError):
        _tiny(num_classes=5).load_state_dict(state, strict=True)
