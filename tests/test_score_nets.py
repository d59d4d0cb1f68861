import pytest
import torch

from dmvae_lib.models.score_nets import SCORE_NETS, ToyScoreMLP, timestep_embedding


def _perturb(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("dim", [2, 8])
@pytest.mark.parametrize("scalar_t", [False, True])
def test_mlp_shape_and_zero_init(dim, scalar_t, gen):
    torch.manual_seed(0)
    net = ToyScoreMLP(dim=dim, width=32, depth=2)
    x = torch.randn(5, dim, generator=gen)
    t = torch.tensor(0.3) if scalar_t else torch.rand(5, generator=gen)
    v = net(x, t)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(x))
    v = _perturb(net)(x, t)
    assert v.shape == x.shape and v.abs().sum() > 0


def test_mlp_scalar_t_matches_vector_t(gen):
    torch.manual_seed(0)
    net = _perturb(ToyScoreMLP(dim=2, width=32))
    x = torch.randn(6, 2, generator=gen)
    assert torch.allclose(net(x, torch.tensor(0.4)), net(x, torch.full((6,), 0.4)))
    assert not torch.allclose(net(x, torch.full((6,), 0.4)), net(x, torch.full((6,), 0.6)))


def test_mlp_trains_on_gradients(gen):
    torch.manual_seed(0)
    net = ToyScoreMLP(dim=2, width=32)
    x, t = torch.randn(6, 2, generator=gen), torch.rand(6, generator=gen)
    net(x, t).sub(1.0).pow(2).mean().backward()
    assert net.out.weight.grad.abs().sum() > 0 and net.out.bias.grad.abs().sum() > 0


def test_class_conditional(gen):
    torch.manual_seed(0)
    net = ToyScoreMLP(dim=2, width=32, num_classes=3)
    assert net.y_embed.num_embeddings == 4  # 3 classes + null
    x, t = torch.randn(6, 2, generator=gen), torch.rand(6, generator=gen)
    assert torch.equal(net(x, t, torch.tensor([0, 1, 2, 0, 1, 2])), torch.zeros(6, 2))
    _perturb(net)
    y0, y1 = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    v0, v1, vn = net(x, t, y0), net(x, t, y1), net(x, t, None)
    assert vn.shape == x.shape
    assert not torch.allclose(v0, v1) and not torch.allclose(v0, vn)
    assert torch.allclose(vn, net(x, t, torch.full((6,), 3)))  # y=None is the null label
    # an unconditional net ignores y
    unc = _perturb(ToyScoreMLP(dim=2, width=32))
    assert unc.y_embed is None and torch.equal(unc(x, t, y0), unc(x, t))


@pytest.mark.parametrize("dim", [7, 8, 65])
def test_timestep_embedding(dim):
    t = torch.tensor([0.0, 0.25, 1.0])
    e = timestep_embedding(t, dim)
    half = dim // 2
    assert e.shape == (3, dim) and e.dtype == torch.float32
    assert torch.allclose(e[0, :half], torch.ones(half)) and torch.allclose(e[0, half : 2 * half],
                                                                            torch.zeros(half))
    assert torch.allclose(e[:, :half] ** 2 + e[:, half : 2 * half] ** 2, torch.ones(3, half), atol=1e-5)
    if dim % 2:
        assert torch.equal(e[:, -1], torch.zeros(3))
    # highest frequency is scale * t itself
    assert torch.allclose(e[:, 0], torch.cos(1000.0 * t), atol=1e-3)


def test_registry():
    assert SCORE_NETS["mlp-toy"] is ToyScoreMLP
