"""`ddp_fit`: a notebook's teacher fit run by torchrun in 2 gloo processes from the run folder alone, then
picked up by the notebook's own (single-process) call of the same fit, which finds the finished checkpoint."""

import pytest
import tiny_stages as tiny
import torch
from tiny_stages import TINY_JOINT, TINY_TEACHER

from dmvae_lib.configs import make_config
from dmvae_lib.data.latents import build_reference, latents_for
from dmvae_lib.runtime.distributed import launch
from dmvae_lib.runtime.runs import RunError, load_checkpoint
from dmvae_lib.stages import joint as joint_stage
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import build_tokenizer, upstream_tokenizer
from dmvae_lib.train.velocity import fit_velocity_net
from dmvae_lib.workflow import ddp_fit


@pytest.mark.slow
def test_teacher_fit_in_two_processes_then_loaded_by_the_notebook(tmp_path):
    stage20 = tiny.tokenizer_stage(tmp_path)
    tok_run, data = stage20.run, stage20.data

    # what notebook 30 does before its fit: config, run folder, latent cache, reference
    cfg = make_config("teacher", "smoke", {"tokenizer_run": str(tok_run.path), **TINY_TEACHER, "fit.steps": 6,
                                           "fit.ckpt_every": 3, "fit.log_every": 3})
    run = tiny.run_dir(tmp_path, "30_teacher_fitting", "teacher", cfg)
    tok, _, enc, tok_file = upstream_tokenizer(tok_run.path, "cpu")
    latents, labels = latents_for(tok, tok_file, data, run, "cpu", batch=32)
    ref = build_reference(cfg, latents, labels, enc, data, "cpu")
    assert ddp_fit.load_run_config("teacher", run.path) == cfg

    launch(2, "dmvae_lib.workflow.ddp_fit", ["teacher", str(run.path), "--device", "cpu"],
           env={"OMP_NUM_THREADS": "1"}, timeout=240)
    saved = load_checkpoint(run.ckpt_path("teacher"))
    assert saved["step"] == 6 and len(saved["rank_generators"]) == 2
    logged = [m["step"] for m in run.read_metrics() if m.get("tag") == "teacher"]
    assert logged == [3, 6]  # rank 0 alone wrote the metrics

    # the notebook's call: loads, no steps
    net, stats = fit_velocity_net(cfg, ref, run, "cpu", progress=False)
    assert [m["step"] for m in run.read_metrics() if m.get("tag") == "teacher"] == logged
    ema = {k.removeprefix("module."): v for k, v in saved["state"]["ema"].items()}
    for k, v in net.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert stats == saved["stats"]

    # an interrupted 2-process fit does not resume in one process
    cut = {**saved, "step": 3}
    torch.save(cut, run.ckpt_path("teacher"))
    with pytest.raises(RunError, match="written by 2 process"):
        fit_velocity_net(cfg, ref, run, "cpu", progress=False)


def test_missing_run_config_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="config.json is missing"):
        ddp_fit.load_run_config("teacher", tmp_path)


@pytest.mark.slow
def test_tokenizer_and_joint_stages_in_two_processes_then_loaded(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    setup = tiny.tokenizer_stage(tmp_path, train=False)  # notebook 20 up to its tokenizer
    cfg_tok, tok_run, data, enc = setup.cfg, setup.run, setup.data, setup.encoders
    launch(2, "dmvae_lib.workflow.ddp_fit", ["tokenizer", str(tok_run.path), "--device", "cpu"], env=env,
           timeout=240)
    saved = load_checkpoint(tok_run.ckpt_path("tokenizer"))
    assert saved["step"] == cfg_tok.train.steps and len(saved["rank_generators"]) == 2
    n_logged = len(tok_run.read_metrics())
    tok, stats = tokenizer_stage.train_tokenizer(cfg_tok, build_tokenizer(cfg_tok, enc["ssl"]), data, tok_run,
                                                 "cpu", progress=False)
    assert len(tok_run.read_metrics()) == n_logged and saved["stats"].items() <= stats.items()  # loaded
    tiny.save_tokenizer(cfg_tok, tok_run, data, tok, enc)
    t_run = tiny.teacher_stage(tmp_path, tok_run.path, data).run

    cfg_j = make_config("joint", "smoke", {"tokenizer_run": str(tok_run.path), "teacher_run": str(t_run.path),
                                           **TINY_JOINT})
    j_run = tiny.run_dir(tmp_path, "40_joint_dm_training", "joint", cfg_j)
    launch(2, "dmvae_lib.workflow.ddp_fit", ["joint", str(j_run.path), "--device", "cpu"], env=env,
           timeout=240)
    for tag in ("joint", "control"):  # the DM run and the λ = 0 control, both by the 2 processes
        assert load_checkpoint(j_run.ckpt_path(tag))["step"] == cfg_j.train.steps
    n_logged = len(j_run.read_metrics())
    u = joint_stage.load_upstream(tok_run.path, t_run.path, "cpu", tmp_path / "_cache")
    _, _, dm_stats = joint_stage.train_joint(cfg_j, u.tokenizer, u.teacher, u.reference, u.data, j_run, "cpu",
                                         dm_weight=cfg_j.train.dm_weight, progress=False,
                                             **u.joint_kwargs(cfg_j))
    assert len(j_run.read_metrics()) == n_logged and "dm_loss" in dm_stats
