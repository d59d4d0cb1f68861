"""DDP under torchrun, checked on CPU with two gloo processes.

(a) one flow-matching step on two shards of a fixed global batch equals the single-process step on the whole
    batch (loss and gradients to 1e-6), and the ranks hold identical parameters after the optimizer step;
(b) the real `fit_velocity_net` under `launch` (torchrun): only rank 0 writes, both ranks end with the
    same net; a 2-process fit interrupted and resumed ends bit-identical to an uninterrupted one (every
    rank restores rank 0's checkpoint with its own generator state), and a checkpoint one rank cannot read
    stops both; a non-finite loss on one rank only makes both ranks skip the update together and raise, or
    skip, at the same step;
(c) the single-process fallback.
"""

from __future__ import annotations

import os
import shutil
import socket
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmvae_lib.core import flow
from dmvae_lib.models.lightning_dit import lightning_dit
from dmvae_lib.runtime.distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    launch,
    main_only_run,
    process_group,
    rank_generator,
    shard_batch,
    wrap_ddp,
)  # fmt: skip
from dmvae_lib.runtime.runs import RunDir, RunError, load_checkpoint, save_checkpoint
from dmvae_lib.train.loop import NonFiniteError, train
from dmvae_lib.train.phases import apply_update, flow_matching_step
from dmvae_lib.train.velocity import fit_velocity_net

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_problem(n: int = 8):
    """A tiny LightningDiT with perturbed weights (adaLN-Zero
    alone gives zero output) and a fixed global batch."""
    torch.manual_seed(0)
    net = lightning_dit("tiny", input_size=4, in_channels=4, num_classes=3, patch_size=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = {"data": torch.randn(n, 4, 4, 4, generator=g), "noise": torch.randn(n, 4, 4, 4, generator=g),
             "t": torch.rand(n, generator=g), "y": torch.randint(0, 4, (n,), generator=g)}  # 3 = null label
    return net, batch


def _fm_step(model, net, batch) -> dict:
    """One SGD flow-matching step through `model` (net
    or DDP(net)); the loss, gradients and new parameters."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = flow.flow_matching_loss(model, batch["data"], batch["t"], batch["noise"], batch["y"]).mean()
    apply_update(loss, opt, net.parameters(), grad_clip=0.0)
    return {"loss": float(loss.detach()), "grads": torch.cat([p.grad.flatten() for p in net.parameters()]),
            "params": torch.cat([p.detach().flatten() for p in net.parameters()])}


def _fm_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with _join(rank, world_size, port) as ctx:
        net, batch = _tiny_problem()
        n = shard_batch(len(batch["data"]), ctx)
        shard = {k: v[ctx.rank * n:(ctx.rank + 1) * n] for k, v in batch.items()}
        torch.save(_fm_step(wrap_ddp(net, ctx), net, shard), os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_step_equals_single_process_step(tmp_path):
    _spawn(_fm_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    net, batch = _tiny_problem()
    single = _fm_step(net, net, batch)
    assert single["grads"].abs().max() > 1e-3  # the comparison is not between zeros
    assert abs(sum(r["loss"] for r in ranks) / 2 - single["loss"]) < 1e-6
    for r in ranks:
        torch.testing.assert_close(r["grads"], single["grads"], atol=1e-6, rtol=0)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], single["params"], atol=1e-6, rtol=0)


TEACHER_WORKER = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from dmvae_lib.configs import make_config, to_dict
from dmvae_lib.data.references import TensorReference
from dmvae_lib.runtime.distributed import cleanup, init_distributed
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.train.velocity import fit_velocity_net

out = Path(sys.argv[1])
ctx = init_distributed("cpu")
cfg = make_config("teacher", "smoke", {"fit.steps": 3, "fit.batch": 8, "fit.log_every": 1,
                                       "fit.ckpt_every": 2, "fit.warmup_steps": 1, "fit.precision": "fp32",
                                       "net.patch_size": 2})
g = torch.Generator().manual_seed(0)
ref = TensorReference(torch.randn(32, 4, 4, 4, generator=g), torch.arange(32) % 3)
run = RunDir.create(out, "30_teacher_fitting", f"rank{ctx.rank}", to_dict(cfg))  # one folder per rank
net, stats = fit_velocity_net(cfg, ref, run, ctx.device, progress=False, ctx=ctx)
torch.save({"world_size": ctx.world_size, "ema": net.state_dict(), "stats": stats},
           out / f"rank{ctx.rank}.pt")
cleanup(ctx)
"""


@pytest.mark.slow
def test_fit_teacher_under_torchrun_writes_on_rank0_only(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(TEACHER_WORKER))
    launch(2, str(script), [str(tmp_path)], timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    main, other = (tmp_path / "30_teacher_fitting" / f"rank{r}" for r in range(2))
    assert [m["step"] for m in RunDir(main).read_metrics()] == [1, 2, 3]
    assert (main / "ckpt" / "teacher" / "last.pt").exists()
    assert not (other / "metrics.jsonl").exists() and not (other / "ckpt").exists()
    for k, v in ranks[0]["ema"].items():
        assert torch.equal(v, ranks[1]["ema"][k]), k
    assert ranks[0]["stats"]["fm_loss"] == ranks[1]["stats"]["fm_loss"]  # the all-reduced mean


@pytest.mark.slow
def test_launch_raises_with_stderr_tail(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.stderr.write('boom from the worker\\n')\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="boom from the worker"):
        launch(1, str(script), [], timeout=60)



def _spawn(worker, out, timeout: float = 120) -> None:
    """mp.spawn two ranks of `worker(rank, 2, port, out)`; fail (instead of hanging) if they fall out of step.

    A rank killed by a signal (no Python traceback: an abort inside the C++ gloo transport, seen once in CI
    out of hundreds of runs, never reproduced here) gets one fresh retry with a warning. A Python exception
    in a rank, a second signal death or a hang fails the test.
    """
    for attempt in (1, 2):
        procs = mp.spawn(worker, args=(2, _free_port(), str(out)), nprocs=2, join=False)
        deadline = time.monotonic() + timeout
        try:
            while not procs.join(timeout=1):  # re-raises a rank's exception
                if time.monotonic() > deadline:
                    for p in procs.processes:
                        p.kill()
                    pytest.fail(f"{worker.__name__} did not finish within {timeout} s: ranks out of step in "
                                "a collective?")
            return
        except mp.ProcessExitedException as exc:
            if attempt == 2 or not exc.signal_name:
                raise
            warnings.warn(f"{worker.__name__}: rank {exc.error_index} died by {exc.signal_name}; retrying "
                          "once",
                          stacklevel=2)
            for child in Path(out).iterdir():  # the retry starts from an empty
                                               # folder, as the first attempt did
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _join(rank: int, world_size: int, port: int):
    """The process group of a spawned worker, as torchrun's
    variables would set it up (`with _join(…) as ctx:`)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    return process_group("cpu")


def _tiny_teacher(steps: int):
    from dmvae_lib.configs import make_config
    from dmvae_lib.data.references import TensorReference

    cfg = make_config("teacher", "smoke", {"fit.steps": steps, "fit.batch": 8, "fit.log_every": 1,
                                           "fit.ckpt_every": 2, "fit.warmup_steps": 1,
                                           "fit.precision": "fp32", "net.patch_size": 2})
    g = torch.Generator().manual_seed(0)
    return cfg, TensorReference(torch.randn(32, 4, 4, 4, generator=g), torch.arange(32) % 3)


class _Faulty:
    """A reference whose draw number `at` (0-based; one draw per step) goes through `fault(x, y)`."""

    def __init__(self, ref, at: int, fault):
        self.ref, self.at, self.fault, self.calls = ref, at, fault, 0
        self.shape, self.num_classes, self.name = ref.shape, ref.num_classes, ref.name

    def sample(self, n, generator):
        x, y = self.ref.sample(n, generator)
        self.calls += 1
        return self.fault(x, y) if self.calls - 1 == self.at else (x, y)


def _interrupt(x, y):
    raise KeyboardInterrupt


def _unreadable(path, required=()):
    raise RunError(f"checkpoint {path} does not exist")


def _shared_run(rank: int, out: str, name: str) -> RunDir:
    """One run folder for all ranks: rank 0 creates (and locks) it; the others hold a handle without a lock,
    as torchrun workers do (two processes may not `create` one run)."""
    if rank == 0:
        return RunDir.create(out, "30_teacher_fitting", name, {})
    return RunDir(Path(out) / "30_teacher_fitting" / name)


def _resume_worker(rank: int, world_size: int, port: int, out: str) -> None:
    from dmvae_lib.train import loop

    with _join(rank, world_size, port) as ctx:
        cfg, ref = _tiny_teacher(steps=5)  # checkpoints at steps 2, 4 and 5
        runs = {name: _shared_run(rank, out, name) for name in ("straight", "resumed")}
        straight, _ = fit_velocity_net(cfg, ref, runs["straight"], "cpu", progress=False, ctx=ctx)
        try:  # every rank stops at the draw of step 3: the last checkpoint is step 2's
            fit_velocity_net(cfg, _Faulty(ref, 3, _interrupt), runs["resumed"], "cpu", progress=False,
                             ctx=ctx)
        except KeyboardInterrupt:
            pass
        step_at_stop = load_checkpoint(runs["resumed"].ckpt_path("teacher"))["step"] if rank == 0 else None
        resumed, _ = fit_velocity_net(cfg, ref, runs["resumed"], "cpu", progress=False, ctx=ctx)
        if rank == 1:  # as on a node that does not see the run
                       # folder: every rank must stop, not only this one
            loop.load_checkpoint = _unreadable
        try:
            fit_velocity_net(cfg, ref, runs["resumed"], "cpu", progress=False, ctx=ctx)
            error = None
        except RunError as exc:
            error = str(exc)
        torch.save({"straight": straight.state_dict(), "resumed": resumed.state_dict(),
                    "step_at_stop": step_at_stop, "error": error}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_fit_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    _spawn(_resume_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["step_at_stop"] == 2
    final = {name: load_checkpoint(tmp_path / "30_teacher_fitting" / name / "ckpt" / "teacher" / "last.pt")
             for name in ("straight", "resumed")}
    assert final["straight"]["step"] == final["resumed"]["step"] == 5
    gens = final["straight"]["rank_generators"]
    assert len(gens) == 2 and not torch.equal(gens[0]["gen"], gens[1]["gen"])  # two different data streams
    for r in range(2):
        assert torch.equal(final["resumed"]["rank_generators"][r]["gen"], gens[r]["gen"])
    for part in ("net", "ema"):
        for k, v in final["straight"]["state"][part].items():
            assert torch.equal(v, final["resumed"]["state"][part][k]), (part, k)
    for r in ranks:  # both ranks return the same EMA net, equal to the uninterrupted one
        for k, v in ranks[0]["straight"].items():
            assert torch.equal(v, r["resumed"][k]), k
    assert ranks[1]["error"].startswith("rank 1: checkpoint") and "does not exist" in ranks[1]["error"]
    assert "another rank could not read" in ranks[0]["error"] and "shared filesystem" in ranks[0]["error"]


def test_checkpoint_of_two_processes_does_not_resume_in_one(tmp_path):
    run = RunDir.create(tmp_path, "nb", "r", {})
    gen = torch.Generator().manual_seed(0)
    save_checkpoint(run.ckpt_path("t"),
                    {"step": 1, "tag": "t", "state": {"gen": gen.get_state()}, "stats": {},
                                         "rank_generators": [{"gen": gen.get_state()}] * 2})
    with pytest.raises(RunError, match="written by 2 process.*not 1"):
        train(lambda k: {}, max_steps=2, state={"gen": gen}, run=run, tag="t", progress=False)


def _nan_data(x, y):
    return torch.full_like(x, float("nan")), y


def _nonfinite_worker(rank: int, world_size: int, port: int, out: str) -> None:

    result = {}
    with _join(rank, world_size, port) as ctx:
        cfg, ref = _tiny_teacher(steps=4)
        run = _shared_run(rank, out, "nan")
        faulty = _Faulty(ref, 2, _nan_data) if rank == 1 else ref  # rank 1 only, at step 2
        try:
            fit_velocity_net(cfg, faulty, run, "cpu", progress=False, ctx=ctx)
        except NonFiniteError as exc:
            result["raised"] = str(exc)
        # on_nonfinite="skip": the same one-rank fault, skipped by both ranks, and training goes on
        torch.manual_seed(0)
        net = lightning_dit("tiny", input_size=4, in_channels=4, num_classes=3, patch_size=2)
        model, opt = wrap_ddp(net, ctx), torch.optim.SGD(net.parameters(), lr=0.1)
        gen = rank_generator(3, ctx)
        faulty = _Faulty(ref, 1, _nan_data) if rank == 1 else ref
        seen = []

        def step(k):
            x, y = faulty.sample(4, gen)
            stats = flow_matching_step(model, opt, x, gen, y=y, ctx=ctx)
            seen.append(stats["nonfinite"])
            return stats

        train(step, max_steps=3, state={"net": net, "opt": opt, "gen": gen}, on_nonfinite="skip",
              progress=False, ctx=ctx)
        result.update(seen=seen, params=torch.cat([p.detach().flatten() for p in net.parameters()]))
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_stops_or_skips_on_every_rank(tmp_path):
    _spawn(_nonfinite_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert "non-finite values at step 2" in r["raised"] and "last good checkpoint" in r["raised"]
        assert r["seen"] == [0, 1, 0]  # rank 0's loss was finite at step 1, and it skipped too
    last = tmp_path / "30_teacher_fitting" / "nan" / "ckpt" / "teacher" / "last.pt"
    assert ranks[0]["raised"].endswith(str(last))
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])

# --- (c) single-process fallback ---------------------------------------------------------------------------
def test_single_process_fallback(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.device) == (0, 1, 0, True,
                                                                                   torch.device("cpu"))
    assert not dist.is_initialized()
    net = torch.nn.Linear(2, 2)
    assert wrap_ddp(net, ctx) is net
    assert all_reduce_mean(2.5, ctx) == 2.5
    barrier(ctx)
    cleanup(ctx)
    with process_group("cpu") as same:  # no group to join or leave
        assert same == ctx and not dist.is_initialized()
    run = RunDir("unused")
    assert main_only_run(run, ctx) is run and main_only_run(run, DistContext(rank=1, world_size=2)) is None


def test_world_size_without_master_raises(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        init_distributed("cpu")


def test_shard_batch_and_rank_generator():
    two = DistContext(rank=1, world_size=2)
    assert shard_batch(8, two) == 4 and shard_batch(8, DistContext()) == 8
    with pytest.raises(ValueError, match=r"fit\.batch=10 is not divisible by the world size 3"):
        shard_batch(10, DistContext(world_size=3), "fit.batch")
    for ctx, seed in ((DistContext(), 7), (two, 1007)):
        assert torch.equal(torch.rand(4, generator=rank_generator(7, ctx)),
                           torch.rand(4, generator=torch.Generator().manual_seed(seed)))


def test_fit_teacher_with_single_process_ctx_is_unchanged():
    from dmvae_lib.configs import make_config
    from dmvae_lib.data.references import TensorReference

    cfg = make_config("teacher", "smoke", {"fit.steps": 2, "fit.batch": 6, "fit.precision": "fp32",
                                           "net.patch_size": 2})
    ref = TensorReference(torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
                          torch.arange(16) % 3)
    a, _ = fit_velocity_net(cfg, ref, None, "cpu", progress=False)
    b, _ = fit_velocity_net(cfg, ref, None, "cpu", progress=False, ctx=DistContext())
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def _aborting_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Rank 1 aborts (SIGABRT, no traceback) while `<out>.aborts` is below the budget written in it."""
    budget = Path(out + ".aborts")
    left = int(budget.read_text())
    if rank == 1 and left > 0:
        budget.write_text(str(left - 1))
        os.abort()
    Path(out, f"rank{rank}.done").write_text("")


@pytest.mark.slow
def test_spawn_retries_one_signal_death_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("")
    Path(str(out) + ".aborts").write_text("1")
    with pytest.warns(UserWarning, match="rank 1 died by SIGABRT; retrying once"):
        _spawn(_aborting_worker, out)
    assert sorted(p.name for p in out.iterdir()) == ["rank0.done", "rank1.done"]  # the retry began empty
    Path(str(out) + ".aborts").write_text("2")
    with pytest.warns(UserWarning), pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        _spawn(_aborting_worker, out)
