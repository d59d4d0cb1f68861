"""No host-device sync inside a training step (issue 16): the step functions return 0-dim tensors and decide
a non-finite skip on the device; the loop reads their numbers only when it logs, runs a hook or checkpoints.

A sync cannot be seen on the CPU, so there every way Python reads a tensor's value (`item`, `float`, `bool`,
…) raises during the step; on CUDA `torch.cuda.set_sync_debug_mode("error")` catches the syncs themselves.
The optimisers are fused, as every stage's AdamW is on CUDA (`runtime.device.fused_adamw`)."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from dmvae_lib.core import dmd
from dmvae_lib.models.alignment import SemanticAlignment
from dmvae_lib.models.recon_losses import PatchDiscriminator
from dmvae_lib.models.score_nets import ToyScoreMLP
from dmvae_lib.models.ssl_encoder import SmallResNet, projector
from dmvae_lib.runtime.runs import RunDir, load_checkpoint
from dmvae_lib.train import loop
from dmvae_lib.train.loop import NonFiniteError, to_host, train
from dmvae_lib.train.phases import (
    TokenizerParts,
    disc_step,
    flow_matching_step,
    objective_step,
    tokenizer_step,
)
from dmvae_lib.train.ssl import ssl_step, supervised_step

READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@contextlib.contextmanager
def no_host_reads(device: torch.device):
    """Inside: a sync raises (CUDA), or any read of a tensor's value on the host does (CPU)."""
    if device.type == "cuda":
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)
    else:
        def refuse(name):
            def read(self, *args, **kwargs):
                raise AssertionError(f"Tensor.{name} reads a value on the host inside the step")
            return read

        with pytest.MonkeyPatch.context() as mp:
            for name in READS:
                mp.setattr(torch.Tensor, name, refuse(name))
            yield


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), fused=True)


class _Decoder(nn.Sequential):
    def get_last_layer(self) -> torch.Tensor:
        return self[-1].weight


class _NaNNet(nn.Module):
    def forward(self, x, t, y=None):
        return x * float("nan")


def _phase(name: str, device: torch.device, nan: bool = False):
    """(one step of the phase → its stats, the modules it trains, its optimiser); `nan` puts a NaN into it."""
    torch.manual_seed(0)
    gen = torch.Generator(device).manual_seed(0)  # t and noise are drawn on the training device
    cpu_gen = torch.Generator().manual_seed(1)  # DiffAug's draws come from a CPU generator, as in the stages
    bad = float("nan") if nan else 0.0
    if name in ("velocity_net", "fake_net"):  # the teacher's (class-conditional, warm-up) and the fake net's
        classes = 3 if name == "velocity_net" else 0
        net = ToyScoreMLP(dim=2, width=16, depth=1, num_classes=classes).to(device)
        opt = _adamw(net.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4)) if classes else None
        data = torch.randn(16, 2, device=device) + bad
        y = torch.arange(16, device=device) % 3 if classes else None
        return lambda: flow_matching_step(net, opt, data, gen, y=y, scheduler=sched), [net], opt
    if name == "dm_objective":
        fake = ToyScoreMLP(dim=2, width=16, depth=1).to(device)
        real = copy.deepcopy(fake)
        nn.init.normal_(real.out.weight, std=0.5)  # the nets disagree (both start at v = 0)
        real = _NaNNet() if nan else real
        holder = nn.Module()
        holder.points = nn.Parameter(torch.randn(16, 2, device=device))
        opt = torch.optim.Adam([holder.points], lr=1e-2, fused=True)
        return (lambda: objective_step(holder.points, opt, dmd.dm, real, fake, gen, grad_clip=1.0), [holder],
                opt)
    if name in ("tokenizer", "discriminator"):
        tok = nn.Module()
        tok.projector = nn.Conv2d(5, 2, 1)
        tok.decoder = _Decoder(nn.Conv2d(2, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 1))
        align = SemanticAlignment(2, 16, 3, token_weight=1.0, global_weight=0.5)
        parts = TokenizerParts(tok.projector, tok.decoder, align).to(device)
        disc = PatchDiscriminator(3, 8, 2).to(device)
        images = torch.rand(4, 3, 16, 16, device=device) * 2 - 1 + bad
        feats = torch.randn(4, 5, 16, 16, device=device)
        if name == "discriminator":
            dopt = _adamw(disc.parameters())
            fakes = torch.rand(4, 3, 16, 16, device=device) * 2 - 1
            return lambda: disc_step(disc, dopt, images, fakes, cpu_gen, bcr=1.0), [disc], dopt
        params = list(parts.parameters())
        opt = _adamw(params)
        return (lambda: tokenizer_step(tok, opt, params, images, feats, cpu_gen, rec={"l1": 1.0, "l2": 0.5},
                                       disc=disc, disc_weight=0.5, model=parts)[0], [parts], opt)
    x = torch.rand(4, 3, 32, 32, device=device) * 2 - 1 + bad
    encoder = SmallResNet(8)
    if name == "ssl":
        proj = projector(encoder.out_channels, 16, 8)
        encoder, proj = encoder.to(device), proj.to(device)
        opt = _adamw([*encoder.parameters(), *proj.parameters()])
        x2 = torch.rand(4, 3, 32, 32, device=device) * 2 - 1
        return lambda: ssl_step(encoder, proj, opt, x, x2), [encoder, proj], opt
    model = nn.Sequential(encoder, nn.Linear(encoder.out_channels, 3)).to(device)
    opt = _adamw(model.parameters())
    y = torch.arange(4, device=device) % 3
    return lambda: supervised_step(model, opt, x, y), [model], opt


PHASES = ["velocity_net", "fake_net", "dm_objective", "tokenizer", "discriminator", "ssl", "supervised"]


def _weights(modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", PHASES)
def test_a_training_step_reads_nothing_on_the_host(name, device):
    device = torch.device(device)
    step, modules, _ = _phase(name, device)
    before = _weights(modules)
    for _ in range(3):
        with no_host_reads(device):
            stats = step()
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in stats.values()), stats
    host = to_host(stats)  # what the loop logs: Python numbers
    assert host["nonfinite"] == 0 and isinstance(host["nonfinite"], int)
    assert all(isinstance(v, float) for k, v in host.items() if k != "nonfinite"), host
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(modules))), "no update was applied"


@pytest.mark.parametrize("name", PHASES)
def test_a_nonfinite_step_leaves_weights_and_optimizer_state_alone_without_a_host_read(name):
    cpu = torch.device("cpu")
    step, modules, opt = _phase(name, cpu)
    step()  # the moments exist: a skipped step must leave them as they are
    weights, state = _weights(modules), copy.deepcopy(opt.state_dict()["state"])
    nan_step, nan_modules, nan_opt = _phase(name, cpu, nan=True)  # NaN inputs; weights and moments as above
    for dst, src in zip(nan_modules, modules):
        dst.load_state_dict(src.state_dict())
    nan_opt.load_state_dict(opt.state_dict())
    with no_host_reads(cpu):
        stats = nan_step()
    assert to_host(stats)["nonfinite"] > 0
    for a, b in zip(weights, _weights(nan_modules)):
        assert torch.equal(a, b)
    after = nan_opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for key in state:
        for field, value in state[key].items():
            assert torch.equal(value, after[key][field]), (key, field)


def _fit(run: RunDir, tag: str, nan_at: int, on_nonfinite: str, monkeypatch) -> dict:
    """The loop over a fused flow-matching step, its counts treated as a GPU's (read only when due)."""
    monkeypatch.setattr(loop, "_on_host", lambda value: not torch.is_tensor(value))
    torch.manual_seed(0)
    net = ToyScoreMLP(dim=2, width=16, depth=1)
    opt = _adamw(net.parameters())
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")

    def step(k: int) -> dict:
        data = torch.randn(8, 2, generator=gen) + (float("nan") if k == nan_at else 0.0)
        with no_host_reads(cpu):
            return flow_matching_step(net, opt, data, gen)

    return train(step, max_steps=8, state={"net": net, "opt": opt, "gen": gen}, run=run, tag=tag,
                 log_every=4, ckpt_every=2, on_nonfinite=on_nonfinite, progress=False)


def test_the_loop_reads_counts_late_but_raises_at_the_first_bad_step_before_any_later_checkpoint(
        tmp_path, monkeypatch):
    run = RunDir.create(tmp_path, "nb", "r", {})
    # step 2 (the third) is bad; nothing reads its count until step 4's log and checkpoint are due
    with pytest.raises(NonFiniteError, match=r"f: non-finite values at step 2 .*last good checkpoint: "
                                             r".*ckpt/f/last.pt"):
        _fit(run, "f", 2, "raise", monkeypatch)
    assert load_checkpoint(run.ckpt_path("f"))["step"] == 2  # the one before the bad step; none after it
    assert run.read_metrics() == []


def test_the_loop_logs_floats_and_counts_a_skipped_step(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path, "nb", "r", {})
    out = _fit(run, "s", 4, "skip", monkeypatch)
    records = [r for r in run.read_metrics() if r["tag"] == "s"]
    assert [r["skipped"] for r in records] == [0, 1]
    assert all(isinstance(r["fm_loss"], float) and isinstance(r["nonfinite"], int) for r in records)
    assert out["nonfinite"] == 0 and isinstance(out["fm_grad_norm"], float)
    assert load_checkpoint(run.ckpt_path("s"))["stats"] == out
