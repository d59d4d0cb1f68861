"""Stage-1 tokenizer training under DDP, checked on CPU with two gloo processes.

(a) one tokenizer step on two shards of a fixed global batch equals the single-process step on the whole
    batch (loss and gradients to 1e-6): the reconstruction step, and the step with the adaptive GAN term,
    whose weight is the global-batch one (without the all-reduce of its gradients it would not be);
    the discriminator step equals it with GroupNorm; with BatchNorm (per-rank shard statistics) it does not,
    but the ranks stay identical, running statistics included. DiffAug is the identity in these comparisons:
    each rank draws its own augmentations, so the shards could not see the global batch's draws.
    A NaN on one rank only makes both ranks skip the update.
(b) the real `train_tokenizer` under `launch` (torchrun): only rank 0 writes, the ranks end identical, and
    a run interrupted after its step-2 checkpoint resumes to the uninterrupted run's weights.
(c) the single-process path: `ctx=DistContext()` changes nothing; the new helpers are identities.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from test_distributed import _join, _spawn

from dmvae_lib.data.images import load_data
from dmvae_lib.models import recon_losses
from dmvae_lib.models.recon_losses import PatchDiscriminator
from dmvae_lib.models.tokenizer import Decoder, Projector, Tokenizer
from dmvae_lib.runtime.distributed import (
    DistContext,
    all_reduce_tensor_mean,
    average_buffers,
    launch,
    reduce_stats,
    shard_batch,
    wrap_ddp,
)  # fmt: skip
from dmvae_lib.runtime.runs import RunDir, load_checkpoint
from dmvae_lib.train.artifacts import build_tokenizer
from dmvae_lib.train.loop import to_host
from dmvae_lib.train.phases import TokenizerParts, disc_step, tokenizer_step

N = 8  # the global batch


def _tiny_problem():
    """A tiny tokenizer (no encoder: features are given), perturbed discriminators, a fixed batch."""
    torch.manual_seed(0)
    decoder = Decoder(4, latent_size=4, image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=0, attn=True,
                      num_groups=4)
    tok = Tokenizer(None, Projector(8, 4, hidden_channels=16), decoder)
    discs = {norm: PatchDiscriminator(3, 8, 2, norm=norm) for norm in ("batch", "group")}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (tok, *discs.values()):
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    batch = {"images": torch.rand(N, 3, 16, 16, generator=g) * 2 - 1,
             "features": torch.randn(N, 8, 4, 4, generator=g),
             "fakes": torch.rand(N, 3, 16, 16, generator=g) * 2 - 1}
    return tok, discs, batch


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def _steps(ctx: DistContext, batch: dict) -> dict:
    """The steps on `batch` (a shard or the whole), each from a fresh tiny problem; what they produced."""
    recon_losses.diff_augment = lambda x, generator, **kw: x  # see the module docstring
    gen = torch.Generator().manual_seed(2)
    tok, discs, _ = _tiny_problem()  # the adaptive weight this rank would use on its own (no all-reduce)
    x_hat = TokenizerParts(tok.projector, tok.decoder)(batch["features"])[1]
    rec = (x_hat - batch["images"]).abs().mean() + 0.5 * ((x_hat - batch["images"]) ** 2).mean()
    gl = recon_losses.g_loss(discs["batch"].eval()(x_hat))
    out = {"local_weight": float(recon_losses.adaptive_gan_weight(rec, gl, tok.decoder.get_last_layer()))}
    for name, gan in (("rec", False), ("gan", True)):
        tok, discs, _ = _tiny_problem()
        params = list(tok.projector.parameters()) + list(tok.decoder.parameters())
        opt = torch.optim.SGD(params, lr=0.1)
        model = wrap_ddp(TokenizerParts(tok.projector, tok.decoder), ctx)
        stats, _ = tokenizer_step(tok, opt, params, batch["images"], batch["features"], gen,
                                  rec={"l1": 1.0, "l2": 0.5}, disc=discs["batch"] if gan else None,
                                  disc_weight=0.5, grad_clip=0.0, model=model, ctx=ctx)
        out[name] = {"stats": to_host(stats), "grads": _flat(p.grad for p in params), "params": _flat(params)}
    for norm in ("group", "batch"):
        _, discs, _ = _tiny_problem()
        disc = discs[norm]
        opt = torch.optim.SGD(disc.parameters(), lr=0.1)
        stats = disc_step(wrap_ddp(disc, ctx), opt, batch["images"], batch["fakes"], gen, bcr=1.0,
                          grad_clip=0.0, ctx=ctx)
        out[f"disc_{norm}"] = {"stats": to_host(stats), "grads": _flat(p.grad for p in disc.parameters()),
                               "params": _flat(disc.parameters()), "buffers": dict(disc.named_buffers())}
    return out


def _nan_on_rank1(ctx: DistContext, shard: dict) -> dict:
    """Steps where only rank 1's shard holds a NaN: every rank must skip (else DDP waits for rank 1)."""
    images = shard["images"].clone()
    if ctx.rank == 1:
        images[0, 0, 0, 0] = float("nan")
    gen = torch.Generator().manual_seed(3)
    tok, discs, _ = _tiny_problem()
    params = list(tok.projector.parameters()) + list(tok.decoder.parameters())
    before, disc_before = _flat(params), _flat(discs["batch"].parameters())
    model = wrap_ddp(TokenizerParts(tok.projector, tok.decoder), ctx)
    stats, _ = tokenizer_step(tok, torch.optim.SGD(params, lr=0.1), params, images, shard["features"], gen,
                              rec={"l1": 1.0}, disc=None, disc_weight=0.0,
                              grad_clip=0.0, model=model, ctx=ctx)
    d = disc_step(wrap_ddp(discs["batch"], ctx), torch.optim.SGD(discs["batch"].parameters(), lr=0.1), images,
                  shard["fakes"], gen, ctx=ctx)
    return {"nonfinite": (int(stats["nonfinite"]), int(d["nonfinite"])),
            "tok_unchanged": torch.equal(before, _flat(params)),
            "disc_unchanged": torch.equal(disc_before, _flat(discs["batch"].parameters()))}


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    with _join(rank, world_size, port) as ctx:
        _, _, batch = _tiny_problem()
        n = shard_batch(N, ctx)
        shard = {k: v[ctx.rank * n:(ctx.rank + 1) * n] for k, v in batch.items()}
        result = _steps(ctx, shard)
        result["nan"] = _nan_on_rank1(ctx, shard)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks_and_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_tokenizer")
    _spawn(_worker, out)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    real_diff_augment = recon_losses.diff_augment
    try:
        single = _steps(DistContext(), _tiny_problem()[2])
    finally:
        recon_losses.diff_augment = real_diff_augment
    return ranks, single


def _assert_step_equal(ranks: list, single: dict, loss_key: str) -> None:
    assert single["grads"].abs().max() > 1e-2  # the comparison is not between zeros
    assert abs(sum(r["stats"][loss_key] for r in ranks) / 2 - single["stats"][loss_key]) < 1e-6
    for r in ranks:
        torch.testing.assert_close(r["grads"], single["grads"], atol=1e-6, rtol=0)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], single["params"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ddp_reconstruction_step_equals_single_process_step(two_ranks_and_single):
    ranks, single = two_ranks_and_single
    _assert_step_equal([r["rec"] for r in ranks], single["rec"], "rec_loss")


@pytest.mark.slow
def test_ddp_gan_step_uses_the_global_batch_adaptive_weight(two_ranks_and_single):
    ranks, single = two_ranks_and_single
    gan = [r["gan"] for r in ranks]
    w = single["gan"]["stats"]["gan_weight"]
    assert 0 < w < 1e4  # not clamped: the weight takes part in the comparison
    assert single["local_weight"] == pytest.approx(w, rel=1e-6)
    for r in ranks:
        assert r["gan"]["stats"]["gan_weight"] == pytest.approx(w, rel=1e-5)
        assert abs(r["local_weight"] - w) > 1e-3 * w  # a per-rank weight would differ
    assert abs(sum(r["stats"]["g_loss"] for r in gan) / 2 - single["gan"]["stats"]["g_loss"]) < 1e-6
    _assert_step_equal(gan, single["gan"], "rec_loss")


@pytest.mark.slow
def test_ddp_discriminator_step(two_ranks_and_single):
    ranks, single = two_ranks_and_single
    _assert_step_equal([r["disc_group"] for r in ranks], single["disc_group"], "d_loss")
    # BatchNorm normalises each shard with its own statistics: the gradients are not the global batch's,
    # but the ranks end identical, running statistics included (each rank updated them from its own shard)
    bn = [r["disc_batch"] for r in ranks]
    assert torch.equal(bn[0]["params"], bn[1]["params"])
    assert (bn[0]["grads"] - single["disc_batch"]["grads"]).abs().max() > 1e-6
    assert bn[0]["buffers"].keys() == bn[1]["buffers"].keys() and len(bn[0]["buffers"]) == 6
    for name, buf in bn[0]["buffers"].items():
        assert torch.equal(buf, bn[1]["buffers"][name]), name


@pytest.mark.slow
def test_ddp_steps_skip_together_when_one_rank_is_nonfinite(two_ranks_and_single):
    ranks, _ = two_ranks_and_single
    for r in ranks:
        assert r["nan"] == {"nonfinite": (1, 1), "tok_unchanged": True, "disc_unchanged": True}


TOKENIZER_WORKER = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from dmvae_lib.configs import make_config, to_dict
from dmvae_lib.data.images import load_data
from dmvae_lib.models.ssl_encoder import SmallResNet
from dmvae_lib.runtime.distributed import cleanup, init_distributed
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import build_tokenizer

out = Path(sys.argv[1])
ctx = init_distributed("cpu")
cfg = make_config("tokenizer", "smoke", {TINY})
data = load_data(cfg, out / "cache")
ssl = SmallResNet(cfg.encoder.ssl.width, cfg.encoder.ssl.arch)
ssl.load_state_dict(torch.load(out / "ssl.pt"))
runs = {{name: RunDir.create(out, "20_tokenizer_pretraining", f"{{name}}_rank{{ctx.rank}}", to_dict(cfg))
        for name in ("straight", "resumed")}}  # one folder per rank: only rank 0's is written
fit = lambda name: tokenizer_stage.train_tokenizer(cfg, build_tokenizer(cfg, ssl), data, runs[name],
                                                   ctx.device, progress=False, ctx=ctx)
tok, stats = fit("straight")
real_step, calls = tokenizer_stage.tokenizer_step, []


def dying_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # step index 2, after the step-2 checkpoint, on every rank
        raise KeyboardInterrupt
    return real_step(*args, **kwargs)


tokenizer_stage.tokenizer_step = dying_step
try:
    fit("resumed")
except KeyboardInterrupt:
    pass
tokenizer_stage.tokenizer_step = real_step
resumed, _ = fit("resumed")
torch.save({{"world_size": ctx.world_size, "tok": tok.state_dict(), "stats": stats,
            "resumed": resumed.state_dict()}}, out / f"rank{{ctx.rank}}.pt")
cleanup(ctx)
"""
TINY = {"data.n_train": 64, "data.n_val": 32, "encoder.ssl.width": 8, "net.proj_hidden": 16, "net.dec_ch": 8,
        "net.dec_groups": 4, "train.steps": 4, "train.batch": 8, "train.disc_start": 2, "train.disc_ndf": 8,
        "train.log_every": 1, "train.ckpt_every": 2, "train.warmup_steps": 1, "train.precision": "fp32",
        "train.lpips": "off"}


@pytest.mark.slow
def test_train_tokenizer_under_torchrun_writes_on_rank0_only(tmp_path):
    from dmvae_lib.configs import make_config
    from dmvae_lib.models.ssl_encoder import SmallResNet

    cfg = make_config("tokenizer", "smoke", TINY)
    load_data(cfg, tmp_path / "cache")  # rendered once here; the ranks read the cache
    torch.manual_seed(0)
    torch.save(SmallResNet(cfg.encoder.ssl.width, cfg.encoder.ssl.arch).state_dict(), tmp_path / "ssl.pt")
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(TOKENIZER_WORKER).format(TINY=TINY))
    launch(2, str(script), [str(tmp_path)], timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    main, other = (tmp_path / "20_tokenizer_pretraining" / f"straight_rank{r}" for r in range(2))
    records = RunDir(main).read_metrics()
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    assert "g_loss" not in records[1]  # the GAN term starts at step index 2
    assert {"g_loss", "gan_weight", "d_loss"} <= records[2].keys()
    assert (main / "ckpt" / "tokenizer" / "last.pt").exists()
    assert not (other / "metrics.jsonl").exists() and not (other / "ckpt").exists()
    for k, v in ranks[0]["tok"].items():
        assert torch.equal(v, ranks[1]["tok"][k]), k
    assert ranks[0]["stats"] == ranks[1]["stats"]  # all-reduced means
    assert ranks[0]["stats"]["nonfinite"] == 0
    folder = tmp_path / "20_tokenizer_pretraining"
    final = {name: load_checkpoint(folder / f"{name}_rank0" / "ckpt" / "tokenizer" / "last.pt")
             for name in ("straight", "resumed")}
    # the interrupted run logged steps 1-2, the resumed one 3-4
    assert [m["step"] for m in RunDir(folder / "resumed_rank0").read_metrics()] == [1, 2, 3, 4]
    gens = final["straight"]["rank_generators"]
    assert not torch.equal(gens[0]["gen"], gens[1]["gen"])  # two data streams
    for r in range(2):
        assert torch.equal(final["resumed"]["rank_generators"][r]["gen"], gens[r]["gen"])
    for part in ("trainable", "disc"):
        for k, v in final["straight"]["state"][part].items():
            assert torch.equal(v, final["resumed"]["state"][part][k]), (part, k)
    for r in ranks:
        for k, v in ranks[0]["tok"].items():
            assert torch.equal(v, r["resumed"][k]), k


# --- (c) single-process path --------------------------------------------------------------------------------
def test_single_process_helpers_are_identities():
    one = DistContext()
    t = torch.randn(3)
    assert all_reduce_tensor_mean(t, one) is t
    stats = {"l1": 0.5, "nonfinite": 0}
    assert reduce_stats(stats, one) == stats
    disc = PatchDiscriminator(3, 8, 2)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    average_buffers(disc, one)
    assert all(torch.equal(v, disc.state_dict()[k]) for k, v in before.items())


def test_train_tokenizer_with_single_process_ctx_is_unchanged(tmp_path):
    from dmvae_lib.configs import make_config
    from dmvae_lib.models.ssl_encoder import SmallResNet
    from dmvae_lib.stages import tokenizer as tokenizer_stage

    cfg = make_config("tokenizer", "smoke", {**TINY, "train.steps": 3})
    data = load_data(cfg, tmp_path)
    torch.manual_seed(0)
    ssl = SmallResNet(cfg.encoder.ssl.width, cfg.encoder.ssl.arch)
    a, sa = tokenizer_stage.train_tokenizer(cfg, build_tokenizer(cfg, ssl), data, None, "cpu", progress=False)
    b, sb = tokenizer_stage.train_tokenizer(cfg, build_tokenizer(cfg, ssl), data, None, "cpu", progress=False,
                               ctx=DistContext())
    assert sa == sb and "g_loss" in sa
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
