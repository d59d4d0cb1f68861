"""`ddp_fit`: a notebook's teacher fit run by torchrun in 2 gloo processes from the run folder alone, then picked
up by the notebook's own (single-process) call of the same fit, which finds the finished checkpoint."""

import pytest
import torch
from test_joint_stage import TINY_TEACHER, TINY_TOK

from dmvae_lib import ddp_fit
from dmvae_lib import teacher_stage as tst
from dmvae_lib import tokenizer_stage as ts
from dmvae_lib.configs import make_config, to_dict
from dmvae_lib.distributed import launch
from dmvae_lib.runs import RunDir, RunError, load_checkpoint


@pytest.mark.slow
def test_teacher_fit_in_two_processes_then_loaded_by_the_notebook(tmp_path):
    cfg_tok = make_config("tokenizer", "smoke", TINY_TOK)
    tok_run = RunDir.create(tmp_path, "20_tokenizer_pretraining", "r", {"preset": "smoke", **to_dict(cfg_tok)})
    data = ts.load_data(cfg_tok, tmp_path / "_cache")
    enc = ts.reference_encoders(cfg_tok, data, tok_run, "cpu")
    tok, _ = ts.train_tokenizer(cfg_tok, ts.build_tokenizer(cfg_tok, enc["ssl"]), data, tok_run, "cpu", progress=False)
    ts.evaluate_tokenizer(tok, data, "cpu", None, batch=32)
    ts.save_tokenizer(tok_run.path / "tokenizer.pt", cfg_tok, tok, enc)

    # what notebook 30 does before its fit: config, run folder, latent cache, reference
    cfg = make_config("teacher", "smoke", {"tokenizer_run": str(tok_run.path), **TINY_TEACHER, "fit.steps": 6,
                                           "fit.ckpt_every": 3, "fit.log_every": 3})
    run = RunDir.create(tmp_path, "30_teacher_fitting", "t", {"stage": "teacher", "preset": "smoke", **to_dict(cfg)})
    tok, _, enc, tok_file = tst.upstream_tokenizer(tok_run.path, "cpu")
    latents, labels = tst.latents_for(tok, tok_file, data, run, "cpu", batch=32)
    ref = tst.build_reference(cfg, latents, labels, enc, data, "cpu")
    assert ddp_fit.load_run_config("teacher", run.path) == cfg

    launch(2, "dmvae_lib.ddp_fit", ["teacher", str(run.path), "--device", "cpu"], env={"OMP_NUM_THREADS": "1"},
           timeout=240)
    saved = load_checkpoint(run.ckpt_path("teacher"))
    assert saved["step"] == 6 and len(saved["rank_generators"]) == 2
    logged = [m["step"] for m in run.read_metrics() if m.get("tag") == "teacher"]
    assert logged == [3, 6]  # rank 0 alone wrote the metrics

    net, stats = tst.fit_teacher(cfg, ref, run, "cpu", progress=False)  # the notebook's call: loads, no steps
    assert [m["step"] for m in run.read_metrics() if m.get("tag") == "teacher"] == logged
    ema = {k.removeprefix("module."): v for k, v in saved["state"]["ema"].items()}
    for k, v in net.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert stats == saved["stats"]

    # an interrupted 2-process fit does not resume in one process
    cut = {**saved, "step": 3}
    torch.save(cut, run.ckpt_path("teacher"))
    with pytest.raises(RunError, match="written by 2 process"):
        tst.fit_teacher(cfg, ref, run, "cpu", progress=False)


def test_missing_run_config_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="config.json is missing"):
        ddp_fit.load_run_config("teacher", tmp_path)


@pytest.mark.slow
def test_tokenizer_and_joint_stages_in_two_processes_then_loaded(tmp_path):
    from test_joint_stage import TINY_JOINT

    from dmvae_lib import joint_stage as js

    env = {"OMP_NUM_THREADS": "1"}
    cfg_tok = make_config("tokenizer", "smoke", TINY_TOK)
    tok_run = RunDir.create(tmp_path, "20_tokenizer_pretraining", "r",
                            {"stage": "tokenizer", "preset": "smoke", **to_dict(cfg_tok)})
    data = ts.load_data(cfg_tok, tmp_path / "_cache")
    enc = ts.reference_encoders(cfg_tok, data, tok_run, "cpu")  # notebook 20 before its tokenizer cell
    launch(2, "dmvae_lib.ddp_fit", ["tokenizer", str(tok_run.path), "--device", "cpu"], env=env, timeout=240)
    saved = load_checkpoint(tok_run.ckpt_path("tokenizer"))
    assert saved["step"] == cfg_tok.train.steps and len(saved["rank_generators"]) == 2
    n_logged = len(tok_run.read_metrics())
    tok, stats = ts.train_tokenizer(cfg_tok, ts.build_tokenizer(cfg_tok, enc["ssl"]), data, tok_run, "cpu",
                                    progress=False)
    assert len(tok_run.read_metrics()) == n_logged and saved["stats"].items() <= stats.items()  # loaded
    ts.evaluate_tokenizer(tok, data, "cpu", None, batch=32)
    ts.save_tokenizer(tok_run.path / "tokenizer.pt", cfg_tok, tok, enc)

    cfg_t = make_config("teacher", "smoke", {"tokenizer_run": str(tok_run.path), **TINY_TEACHER})
    t_run = RunDir.create(tmp_path, "30_teacher_fitting", "r", {"stage": "teacher", "preset": "smoke", **to_dict(cfg_t)})
    tok, _, enc, tok_file = tst.upstream_tokenizer(tok_run.path, "cpu")
    latents, labels = tst.latents_for(tok, tok_file, data, t_run, "cpu", batch=32)
    ref = tst.build_reference(cfg_t, latents, labels, enc, data, "cpu")
    net, _ = tst.fit_teacher(cfg_t, ref, t_run, "cpu", progress=False)
    tst.save_teacher(t_run.path / "teacher.pt", cfg_t, net, ref, tok_file)

    cfg_j = make_config("joint", "smoke", {"tokenizer_run": str(tok_run.path), "teacher_run": str(t_run.path),
                                           **TINY_JOINT})
    j_run = RunDir.create(tmp_path, "40_joint_dm_training", "r", {"stage": "joint", "preset": "smoke", **to_dict(cfg_j)})
    launch(2, "dmvae_lib.ddp_fit", ["joint", str(j_run.path), "--device", "cpu"], env=env, timeout=240)
    for tag in ("joint", "control"):  # the DM run and the λ = 0 control, both by the 2 processes
        assert load_checkpoint(j_run.ckpt_path(tag))["step"] == cfg_j.train.steps
    n_logged = len(j_run.read_metrics())
    u = js.load_upstream(tok_run.path, t_run.path, "cpu", tmp_path / "_cache")
    _, _, dm_stats = js.train_joint(cfg_j, u.tokenizer, u.teacher, u.reference, u.data, j_run, "cpu",
                                         dm_weight=cfg_j.train.dm_weight, progress=False, **u.joint_kwargs(cfg_j))
    assert len(j_run.read_metrics()) == n_logged and "dm_loss" in dm_stats
