"""Stages 2 and 3 on a tiny configuration: latent cache → reference → teacher → joint DM training (+ control),
gradient routing, strict teacher loading, upstream-run resolution."""

import json
import math
from types import SimpleNamespace

import pytest
import tiny_stages as tiny
import torch
from tiny_stages import TINY_JOINT, TINY_TEACHER

from dmvae_lib.configs import ConfigError, make_config, to_dict
from dmvae_lib.data.images import ImageData
from dmvae_lib.data.latents import build_reference, latents_for
from dmvae_lib.models.lightning_dit import lightning_dit
from dmvae_lib.models.projection_heads import make_head
from dmvae_lib.models.ssl_encoder import SmallResNet
from dmvae_lib.models.tokenizer import Decoder, Projector, SSLFeatures, Tokenizer, timm_encoder
from dmvae_lib.runtime.runs import RunDir, RunError, save_checkpoint
from dmvae_lib.runtime.seeds import stream_seed
from dmvae_lib.stages import joint as joint_stage
from dmvae_lib.train.artifacts import load_teacher
from dmvae_lib.train.velocity import fit_velocity_net
from dmvae_lib.workflow.session import upstream_run


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _, run, data, _, _ = tiny.tokenizer_stage(root)
    return root, run.path, data


@pytest.fixture(scope="module")
def teacher(upstream):
    root, tok_dir, data = upstream
    return tiny.teacher_stage(root, tok_dir, data)


def test_latent_cache_is_normalised_and_reused(upstream, teacher):
    _, tok_dir, data = upstream
    cfg, run, tok, *_ , latents = teacher
    assert latents.shape == (64, tok.decoder.z_channels, 8, 8)
    assert abs(float(latents.mean())) < 0.3 and 0.5 < float(latents.std()) < 1.5
    again, _ = latents_for(tok, tok_dir / "tokenizer.pt", data, run, "cpu")
    assert torch.equal(again, latents)


def test_teacher_round_trip_and_strict_errors(teacher, tmp_path):
    cfg, run, tok, enc, ref, net, stats, _ = teacher
    assert stats["nonfinite"] == 0
    loaded, ck = load_teacher(run.path / "teacher.pt", expect_reference="ssl")
    x, y = ref.sample(4, torch.Generator().manual_seed(0))
    t = torch.rand(4)
    assert torch.equal(loaded(x, t, y), net(x, t, y)) and ck["reference"]["name"] == "ssl"
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(RunError, match="fitted on reference"):
        load_teacher(run.path / "teacher.pt", expect_reference="gaussian")
    with pytest.raises(RunError, match="does not exist"):
        load_teacher(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "tok.pt", {"kind": "tokenizer", "config": {}, "net": {}, "reference": {},
                                          "tokenizer": {}})
    with pytest.raises(RunError, match="not a teacher"):
        load_teacher(tmp_path / "tok.pt")


@pytest.mark.parametrize("name", ["gaussian", "gmm", "class_subset", "noise_states", "supervised"])
def test_every_reference_builds_and_fits_a_teacher(upstream, teacher, name):
    _, tok_dir, data = upstream
    cfg, _, tok, enc, _, _, _, latents = teacher
    over = {"tokenizer_run": str(tok_dir), **TINY_TEACHER, "reference.name": name, "fit.steps": 1}
    tcfg = make_config("teacher", "smoke", over)
    ref = build_reference(tcfg, latents, torch.as_tensor(data.train_labels[:64]), enc, data, "cpu")
    x, y = ref.sample(5, torch.Generator().manual_seed(1))
    assert x.shape == (5, *ref.shape) and (y is None) == (ref.num_classes == 0)
    net, stats = fit_velocity_net(tcfg, ref, None, "cpu", progress=False)
    assert stats["nonfinite"] == 0 and net(x, torch.rand(5), y).shape == x.shape


def _routing_run(dm_weight: float, l1: float, encoder: str = "timm", align: float = 0.0) -> dict[str, bool]:
    """Two tokenizer turns of the real `train_joint` (trainable encoder, GAN off, no weight decay): which
    parts moved (the first turn's DM direction is 0: the fake net starts as the teacher). A part whose every
    gradient is zero or absent does not move under AdamW."""
    gen = torch.Generator().manual_seed(0)
    if encoder == "timm":
        enc = timm_encoder("resnet18", img_size=32, pretrained=False, feature_stage=1)  # (B, 64, 8, 8)
    else:  # the embedded SSL encoder with its stem side input, 8×8×(32 + 32)
        enc = SSLFeatures(SmallResNet(8, "r3"), side_input=True)
    bn_before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    dec = Decoder(4, latent_size=8, image_size=32, ch=16, ch_mult=(1, 1), num_res_blocks=0, attn=False,
                  num_groups=8)
    tok = Tokenizer(enc, Projector(enc.out_channels, 4), dec)
    teacher = lightning_dit("tiny", input_size=4, in_channels=6, num_classes=3)
    for p in teacher.parameters():  # non-zero outputs (adaLN-Zero starts at v = 0)
        p.data.normal_(0, 0.05, generator=gen)
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    u8 = torch.randint(0, 256, (1, 8, 32, 32, 3), dtype=torch.uint8, generator=gen)
    data = ImageData(u8, torch.arange(8) % 3, u8[0], torch.arange(8) % 3)
    ref = SimpleNamespace(name="stub", shape=(6, 4, 4), num_classes=3)  # another shape: a learnable head
    cfg = make_config("joint", "smoke", {
        "train.steps": 3, "train.batch": 4, "train.tokenizer_every": 2, "train.l1": l1,
        "train.lpips": "off", "train.disc_start": 10, "train.weight_decay": 0.0, "train.warmup_steps": 1,
        "train.train_encoder": True, "train.eval_every": 0, "train.precision": "fp32",
        "train.cfg_scale": 2.0, "train.align_token": align, "train.align_global": align})
    torch.manual_seed(stream_seed(cfg.seed, "joint.head_init"))  # the head train_joint will build
    head0 = make_head((4, 8, 8), ref.shape)
    out, head, _ = joint_stage.train_joint(cfg, tok, teacher, ref, data, None, "cpu", dm_weight=dm_weight,
                                           disc_arch=(8, 1), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters())), "the teacher moved"
    if encoder == "ssl":  # the embedded encoder trains with its SSL BatchNorm statistics frozen
        after = out.encoder.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in bn_before.items()), "BatchNorm statistics moved"
    moved = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # noqa: E731
    return {"encoder": moved(tok.encoder, out.encoder), "projector": moved(tok.projector, out.projector),
            "decoder": moved(tok.decoder, out.decoder), "head": moved(head0, head)}


@pytest.mark.parametrize("encoder", ["timm", "ssl"])
def test_gradient_routing_of_the_joint_step(encoder):
    """λ·L_DM reaches encoder, projector and head, never the decoder; L_rec reaches all but the head."""
    dm, rec = _routing_run(10.0, 0.0, encoder), _routing_run(0.0, 1.0, encoder)
    assert dm == {"encoder": True, "projector": True, "decoder": False, "head": True}
    assert rec == {"encoder": True, "projector": True, "decoder": True, "head": False}
    va = _routing_run(0.0, 0.0, encoder, align=1.0)  # the VA arm's L_align alone
    assert va == {"encoder": True, "projector": True, "decoder": False, "head": False}


def _joint_run(dm_weight: float, seed: int, steps: int = 4, align: float = 0.0):
    """`steps` joint steps (GAN on from step 0, DM at `dm_weight`, VA's alignment at `align`) under joint
    seed `seed` on a tiny tokenizer and teacher, the real `joint_state` and `joint_step`: (the batches
    consumed, the state, the stage-1 tokenizer)."""
    gen = torch.Generator().manual_seed(0)
    enc = SSLFeatures(SmallResNet(8, "r3"), side_input=True)
    dec = Decoder(4, latent_size=8, image_size=32, ch=16, ch_mult=(1, 1), num_res_blocks=0, attn=False,
                  num_groups=8)
    tok = Tokenizer(enc, Projector(enc.out_channels, 4), dec)
    teacher = lightning_dit("tiny", input_size=4, in_channels=6, num_classes=3)
    u8 = torch.randint(0, 256, (1, 32, 32, 32, 3), dtype=torch.uint8, generator=gen)
    data = ImageData(u8, torch.arange(32) % 3, u8[0], torch.arange(32) % 3)
    ref = SimpleNamespace(name="stub", shape=(6, 4, 4), num_classes=3)
    cfg = make_config("joint", "smoke", {
        "seed": seed, "train.steps": steps, "train.batch": 4, "train.tokenizer_every": 2,
        "train.lpips": "off", "train.disc_start": 0, "train.train_encoder": True, "train.eval_every": 0,
        "train.precision": "fp32", "train.align_token": align, "train.align_global": align})
    s = joint_stage.joint_state(cfg, tok, teacher, ref, data, "cpu", dm_weight=dm_weight, disc_state=None,
                                disc_arch=(8, 1), ctx=joint_stage.DistContext())
    seen, source = [], s.batches
    s.batches = (seen.append(b) or b for b in source)
    for k in range(steps):
        joint_stage.joint_step(s, k)
    return seen, s, tok


def test_arms_of_one_joint_seed_see_the_same_batches():
    """The batches have their own stream: the DM term's, the fake net's, the GAN's and VA's draws do not
    shift them, so λ = 0, λ = 10 and VA under one joint seed train on the identical batch sequence."""
    control, dm, va = (_joint_run(w, seed=3, align=a)[0] for w, a in ((0.0, 0.0), (10.0, 0.0), (0.0, 1.0)))
    assert len(control) == len(dm) == len(va) == 4
    for arm in (dm, va):
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(control, arm))
    other = _joint_run(0.0, seed=4)[0]
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(control, other))


def test_va_aligns_with_a_frozen_copy_of_the_stage1_encoder():
    _, s, stage1 = _joint_run(0.0, seed=0, align=1.0)
    assert s.align is not None and s.align_target is not None and "align" in s.checkpointed()
    target, moved = s.align_target.state_dict(), s.tok.encoder.state_dict()
    assert all(torch.equal(v, target[k]) for k, v in stage1.encoder.state_dict().items())
    assert all(p.grad is None for p in s.align_target.parameters())
    assert any(not torch.equal(v, moved[k]) for k, v in stage1.encoder.state_dict().items())
    off = _joint_run(0.0, seed=0)[1]
    assert off.align is None and off.align_target is None and "align" not in off.checkpointed()


def test_joint_training_and_control(upstream, teacher):
    root, tok_dir, data = upstream
    tcfg, trun, tok, enc, ref, net, _, _ = teacher
    cfg = make_config("joint", "smoke",
                      {"tokenizer_run": str(tok_dir), "teacher_run": str(trun.path), **TINY_JOINT})
    run = RunDir.create(root, "40_joint_dm_training", "r", to_dict(cfg))
    before = {k: v.clone() for k, v in tok.decoder.state_dict().items()}
    dm_tok, head, stats = joint_stage.train_joint(cfg, tok, net, ref, data, run, "cpu", dm_weight=10.0,
                                                  progress=False)
    assert stats["nonfinite"] == 0 and "dm_loss" in stats and "fake_fm_loss" in stats
    after = tok.decoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "stage-1 tokenizer mutated"
    assert not torch.equal(dm_tok.projector.net[0].weight, tok.projector.net[0].weight)
    ctl_tok, _, ctl = joint_stage.train_joint(cfg, tok, net, ref, data, run, "cpu", dm_weight=0.0,
                                              tag="control", progress=False)
    assert "dm_loss" not in ctl and "fake_fm_loss" not in ctl  # the control runs no DM forward at all
    hist = joint_stage.eval_history(run, "joint")
    assert [h["step"] for h in hist] == [3, 6] and {"ref_fd", "ref_sw2", "val_psnr"} <= set(hist[0])
    # resume: a finished run takes no new steps and returns the same weights
    again, _, _ = joint_stage.train_joint(cfg, tok, net, ref, data, run, "cpu", dm_weight=10.0,
                                          progress=False)
    assert torch.equal(again.projector.net[0].weight, dm_tok.projector.net[0].weight)


def test_refinement_moves_only_the_decoder_and_reports_psnr_before_and_after(upstream, teacher):
    """App. A.4: encoder and projector frozen, the decoder trained on reconstruction; train_joint reports the
    val PSNR before and after it."""
    root, tok_dir, data = upstream
    _, trun, tok, _, ref, net, _, _ = teacher
    cfg = make_config("joint", "smoke", {"tokenizer_run": str(tok_dir), "teacher_run": str(trun.path),
                                         **TINY_JOINT, "train.refine_steps": 2, "train.control": False})
    copy = joint_stage.copy.deepcopy(tok)
    joint_stage.refine_decoder(cfg, copy, data, None, "cpu", tag="refine", progress=False)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert same(copy.encoder, tok.encoder) and same(copy.projector, tok.projector)
    assert not same(copy.decoder, tok.decoder)
    run = RunDir.create(root, "40_joint_dm_training", "refined", to_dict(cfg))
    _, _, stats = joint_stage.train_joint(cfg, tok, net, ref, data, run, "cpu", dm_weight=10.0,
                                          progress=False)
    assert stats["refine"]["steps"] == 2
    assert all(math.isfinite(stats["refine"][k]) for k in ("val_psnr_before", "val_psnr_after"))


def test_upstream_resolution_and_errors(upstream, tmp_path):
    root, tok_dir, _ = upstream
    nb = "20_tokenizer_pretraining"
    assert upstream_run(nb, "tokenizer.pt", run_root=str(root), preset="smoke") == tok_dir
    assert upstream_run(nb, "tokenizer.pt", path=str(tok_dir / "tokenizer.pt")) == tok_dir
    with pytest.raises(RunError, match="notebooks/20_tokenizer_pretraining.ipynb"):
        upstream_run("20_tokenizer_pretraining", "tokenizer.pt", run_root=str(tmp_path), preset="smoke")
    with pytest.raises(RunError, match="notebooks/20_tokenizer_pretraining"):
        upstream_run("20_tokenizer_pretraining", "tokenizer.pt", run_root=str(root), preset="cpu")
    assert json.loads((tok_dir / "config.json").read_text())["config"]["preset"] == "smoke"


def test_joint_config_errors():

    with pytest.raises(ConfigError, match="t_min"):
        make_config("joint", "cpu", {"train.t_min": 0.9, "train.t_max": 0.5})
    with pytest.raises(ConfigError, match="cfg_scale"):
        make_config("joint", "cpu", {"train.cfg_scale": 0.5})
    with pytest.raises(ConfigError, match="reference.name"):
        make_config("teacher", "cpu", {"reference.name": "clip"})
    with pytest.raises(ConfigError, match="unknown config key"):
        make_config("joint", "cpu", {"train.lambda": 3.0})
    with pytest.raises(ConfigError, match="align_token"):
        make_config("joint", "cpu", {"train.align_global": -1.0})


def test_va_maps_continue_from_stage1(upstream, teacher):
    """train.align_init='stage1' (the default): the joint stage's alignment maps start as stage 1's EMA maps
    (those that fit the tokenizer it saved); maps of a term stage 1 did not train, or none at all, fail by
    name; with the term off nothing is passed."""
    root, tok_dir, data = upstream
    _, _, tok, _, ref, net, _, _ = teacher
    state = joint_stage.stage1_state(tok_dir)
    maps = joint_stage.stage1_alignment(state)
    ema = {k.removeprefix("module.align."): v for k, v in state["ema"].items()
           if k.startswith("module.align.")}
    raw = {k.removeprefix("align."): v for k, v in state["trainable"].items() if k.startswith("align.")}
    assert maps and maps.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(maps[k], ema[k]) for k in maps)
    assert not all(torch.equal(maps[k], raw[k]) for k in maps)  # the EMA's, not the last step's
    up = SimpleNamespace(disc_state=None, align_state=maps, disc_arch=(8, 2))
    over = {**TINY_JOINT, "train.steps": 2, "train.disc_init": "fresh", "train.control": False,
            "train.eval_every": 0, "train.train_encoder": True, "train.align_global": 1.0}
    cfg = make_config("joint", "smoke", over)
    kw = joint_stage.Upstream.joint_kwargs(up, cfg)
    assert kw["align_state"] is maps
    s = joint_stage.joint_state(cfg, tok, net, ref, data, "cpu", dm_weight=0.0, ctx=joint_stage.DistContext(),
                                **kw)
    assert all(torch.equal(s.align.state_dict()[k], maps[k]) for k in maps)
    fresh = make_config("joint", "smoke", {**over, "train.align_init": "fresh"})
    assert joint_stage.Upstream.joint_kwargs(up, fresh)["align_state"] is None
    off = make_config("joint", "smoke", {**over, "train.align_global": 0.0})
    assert joint_stage.Upstream.joint_kwargs(SimpleNamespace(**{**vars(up), "align_state": None}),
                                              off)["align_state"] is None
    with pytest.raises(RunError, match="no alignment maps"):
        joint_stage.Upstream.joint_kwargs(SimpleNamespace(**{**vars(up), "align_state": None}), cfg)
    token = make_config("joint", "smoke", {**over, "train.align_token": 1.0})
    with pytest.raises(RunError, match="stage-1 alignment maps"):
        joint_stage.joint_state(token, tok, net, ref, data, "cpu", dm_weight=0.0,
                                ctx=joint_stage.DistContext(), **joint_stage.Upstream.joint_kwargs(up, token))
    with pytest.raises(ConfigError, match="align_init"):
        make_config("joint", "smoke", {"train.align_init": "stage2"})


def test_stage1_discriminator_is_reused(upstream, teacher):
    root, tok_dir, data = upstream
    _, trun, tok, _, ref, net, _, _ = teacher
    state = joint_stage.stage1_discriminator(tok_dir)
    cfg = make_config("joint", "smoke", {**TINY_JOINT, "train.steps": 2, "train.tokenizer_every": 1,
                                         "train.disc_start": 0, "train.eval_every": 0,
                                         "train.control": False})
    _, _, stats = joint_stage.train_joint(cfg, tok, net, ref, data, None, "cpu", dm_weight=1.0,
                                          disc_state=state, disc_arch=(8, 2), progress=False)
    assert "d_loss" in stats and stats["nonfinite"] == 0
    with pytest.raises(RunError, match="stage-1 discriminator"):
        joint_stage.train_joint(cfg, tok, net, ref, data, None, "cpu", dm_weight=1.0, disc_state=state,
                                disc_arch=(16, 2), progress=False)
    with pytest.raises(RunError, match="no discriminator state|does not exist"):
        joint_stage.stage1_discriminator(root)
