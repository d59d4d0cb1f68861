"""Stage-3 joint DM training under DDP: the real `train_joint` in two gloo processes under `launch`.

Upstream: a tiny stage-1 tokenizer and a teacher fitted on the "supervised" reference, whose shape differs
from the latents', so the projection head is learnable and trains under DDP too. Checks: only rank 0 writes
(metrics, evaluation records, checkpoints), the ranks end with identical tokenizer, head, fake net and
discriminator (BatchNorm statistics included), the logged numbers
are the same on both ranks (rank means), and the decoder refinement afterwards runs under DDP as well.
The DDP steps themselves (tokenizer, GAN weight, discriminator) are checked against one process in
tests/test_distributed_tokenizer.py; the fake net's step is the teacher's (tests/test_distributed.py).
"""

from __future__ import annotations

import textwrap

import pytest
import tiny_stages as tiny
import torch
from tiny_stages import TINY_JOINT

from dmvae_lib.runtime.distributed import launch
from dmvae_lib.runtime.runs import RunDir

JOINT_WORKER = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from dmvae_lib.configs import make_config, to_dict
from dmvae_lib.runtime.distributed import cleanup, init_distributed
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages import joint as joint_stage

root = Path(sys.argv[1])
ctx = init_distributed("cpu")
u = joint_stage.load_upstream(root / "20_tokenizer_pretraining" / "r", root / "30_teacher_fitting" / "r",
                              "cpu", root / "_cache")
cfg = make_config("joint", "smoke", {JOINT})
seen = {{}}  # the nets train_joint does not return (fake net, discriminator), as their steps see them


def spy(name, step):
    def wrapped(net, *args, **kwargs):
        seen[name] = net
        return step(net, *args, **kwargs)
    return wrapped


joint_stage.flow_matching_step = spy("fake", joint_stage.flow_matching_step)
joint_stage.disc_step = spy("disc", joint_stage.disc_step)
run = RunDir.create(root, "40_joint_dm_training", f"rank{{ctx.rank}}", to_dict(cfg))  # one folder per rank
tok, head, stats = joint_stage.train_joint(cfg, u.tokenizer, u.teacher, u.reference, u.data, run, ctx.device,
                                  dm_weight=10.0, progress=False, ctx=ctx, **u.joint_kwargs(cfg))
nets = {{name: net.module.state_dict() for name, net in seen.items()}}
torch.save({{"world_size": ctx.world_size, "tok": tok.state_dict(), "head": head.state_dict(), "stats": stats,
            "head_kind": type(head).__name__, **nets}}, root / f"rank{{ctx.rank}}.pt")
cleanup(ctx)
"""
JOINT = {**TINY_JOINT, "train.batch": 8, "train.refine_steps": 2, "train.control": False}


def _upstream(root):
    """Stage 1 and 2 in this process (tokenizer.pt, teacher.pt and the latent cache the workers read)."""
    stage20 = tiny.tokenizer_stage(root)
    tiny.teacher_stage(root, stage20.run.path, stage20.data, **{"reference.name": "supervised"})


@pytest.mark.slow
def test_train_joint_under_torchrun_writes_on_rank0_only_and_ranks_agree(tmp_path):
    _upstream(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(JOINT_WORKER).format(JOINT=JOINT))
    launch(2, str(script), [str(tmp_path)], timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["head_kind"] == "MLPHead" and any(v.numel() for v in ranks[0]["head"].values())
    main, other = (tmp_path / "40_joint_dm_training" / f"rank{r}" for r in range(2))
    records = RunDir(main).read_metrics()
    by_tag = {tag: [m["step"] for m in records if m["tag"] == tag]
              for tag in ("joint", "joint_eval", "joint_refine")}
    assert by_tag == {"joint": [2, 4, 6], "joint_eval": [3, 6], "joint_refine": [2]}
    assert all((main / "ckpt" / tag / "last.pt").exists() for tag in ("joint", "joint_refine"))
    assert not (other / "metrics.jsonl").exists() and not (other / "ckpt").exists()
    for part in ("tok", "head", "fake", "disc"):  # fake and disc were seen DDP-wrapped (.module)
        for k, v in ranks[0][part].items():
            assert torch.equal(v, ranks[1][part][k]), (part, k)
    stats = ranks[0]["stats"]
    assert stats == ranks[1]["stats"] and stats["nonfinite"] == 0  # rank means
    assert {"dm_loss", "fake_fm_loss", "d_loss", "gan_weight"} <= stats.keys()
