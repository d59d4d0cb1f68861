"""The claim study v2's plan (workflow/arms_v2.py): one joint protocol, arms that differ only where named,
paired by joint seed, one generator per (arm, joint seed); and its readout from synthetic run summaries."""

import json
import math

import pytest

from dmvae_lib.configs import make_config
from dmvae_lib.configs.study import MAIN_JOB_V2, VA_ALIGN_KEYS
from dmvae_lib.workflow import arms, arms_v2

STAGE1 = {"seed": 0, "encoder": {"kind": "ssl"},
          "train": {"align_token": 0.0, "align_global": 1.0, "align_margin_cos": 0.0,
                    "align_margin_dist": 0.0}}


@pytest.fixture
def tokenizer_dir(tmp_path):
    folder = tmp_path / "runs" / "20_tokenizer_pretraining" / "A"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": STAGE1}))
    return folder


def _plan(tokenizer_dir, seeds=(0, 1, 2), **over):
    cfg = make_config("study", "smoke", {"claim_v2.joint_seeds": list(seeds), **over})
    return cfg, arms_v2.plan(cfg, "smoke", "p", tokenizer_dir.parents[1], tokenizer_dir)


def test_the_plan_pairs_every_arm_by_joint_seed(tokenizer_dir):
    cfg, runs = _plan(tokenizer_dir)
    by_nb = {nb: [r for r in runs if r.notebook == nb] for nb in ("20", "30", "40", "60")}
    assert [len(by_nb[nb]) for nb in ("20", "30", "40", "60")] == [1, 2, 5 * 3, 6 * 3]
    joint = {r.name: r.params for r in by_nb["40"]}
    for s in (0, 1, 2):
        p = {arm: joint[arms_v2.joint_name("p", arm, s)] for arm in arms_v2.JOINT_ARMS}
        assert {q["seed"] for q in p.values()} == {s}
        base = p["C0"]["overrides"]
        diff = {arm: {k for k in {*base, *q["overrides"]} if base.get(k) != q["overrides"].get(k)}
                for arm, q in p.items()}
        assert diff == {"A_J": {"train.train_encoder"}, "C0": set(), "C1": {"train.dm_weight"},
                        "VA": {*VA_ALIGN_KEYS, "train.align_init"}, "AE": set()}
        assert p["AE"]["tokenizer_run"].endswith("p-AE-stage1")
        assert p["C0"]["tokenizer_run"] == str(tokenizer_dir)
        assert base["train.refine_steps"] == cfg.claim_v2.refine_steps and base["train.control"] is False
        assert p["C1"]["overrides"]["train.dm_weight"] == cfg.claim_v2.dm_weight
        assert p["VA"]["overrides"]["train.align_global"] == 1.0  # stage 1's weight
        assert p["VA"]["overrides"]["train.align_init"] == "stage1"  # stage 1's term goes on, maps and all
    gens = {r.name: r for r in by_nb["60"]}
    for i, s in enumerate((0, 1, 2)):
        g = {arm: gens[arms_v2.generator_name("p", arm, s, i)] for arm in arms_v2.ALL_ARMS}
        assert {r.params["seed"] for r in g.values()} == {i}  # the same generator noise for every arm
        assert g["A"].params["joint_run"] == str(tokenizer_dir) and g["A"].needs == ()
        assert g["C1"].needs == (arms_v2.joint_name("p", "C1", s),)
    names = [r.name for r in runs]
    assert all(names.index(n) < names.index(r.name) for r in runs for n in r.needs if n in names)


def test_va_needs_an_alignment_term(tokenizer_dir):
    config = {**STAGE1, "train": {"align_token": 0.0, "align_global": 0.0}}
    (tokenizer_dir / "config.json").write_text(json.dumps({"config": config}))
    with pytest.raises(ValueError, match="va_align"):
        _plan(tokenizer_dir)
    _, runs = _plan(tokenizer_dir, **{"claim_v2.va_align": {"train.align_token": 0.5}})
    va = next(r for r in runs if r.name == arms_v2.joint_name("p", "VA", 0))
    assert va.params["overrides"]["train.align_token"] == 0.5
    assert va.params["overrides"]["train.align_init"] == "fresh"  # stage 1 trained no maps to continue


@pytest.mark.parametrize("preset", ["smoke", "cpu"])  # imagenet256: AE cannot train on an ImageFolder
def test_every_config_of_the_plan_builds(preset):
    arms_v2.check(make_config("study", preset), preset)
    with pytest.raises(ValueError, match="va_align"):
        arms_v2.joint_changes(make_config("study", preset), {"train": {}})


def _write(folder, summary):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_collect_and_result_read_the_runs(tokenizer_dir):
    cfg, _ = _plan(tokenizer_dir)
    root = tokenizer_dir.parents[1]
    _write(tokenizer_dir, {"tokenizer": {"psnr": 22.0}})
    gen_level = {"A": 1.0, "A_J": 1.3, "C0": 1.5, "VA": 1.4, "C1": 1.0, "AE": 1.6}
    psnr = {"A_J": 22.0, "C0": 24.0, "VA": 23.0, "C1": 23.5, "AE": 25.0}
    for i, s in enumerate((0, 1, 2)):
        for arm in arms_v2.JOINT_ARMS:
            _write(root / arms.NOTEBOOKS["40"] / arms_v2.joint_name("p", arm, s), {"dm": {
                "psnr": psnr[arm] + 0.01 * s, "ref_fd": 10.0 if arm == "C0" else 2.0, "ref_fd_floor": 1.0,
                "refine": {"val_psnr_before": psnr[arm] - 1, "val_psnr_after": psnr[arm]}}})
        for arm in arms_v2.ALL_ARMS:
            fd = math.exp(gen_level[arm] + 0.01 * s)
            curve = [{"step": st, "fd_sup": fd, "fd_pix": fd} for st in (10, 20, 40)]
            _write(root / arms.NOTEBOOKS["60"] / arms_v2.generator_name("p", arm, s, i), {"curve": curve})
    data = arms_v2.collect(cfg, "p", root, tokenizer_dir)
    assert data.psnr["A"] == {0: 22.0, 1: 22.0, 2: 22.0} and data.psnr_before["C1"][2] == pytest.approx(22.5)
    out = arms_v2.result(cfg, data)
    assert out["space"] == "fd_sup" and out["drift_floor"] == 1.0 and out["gates"]["drift"]["passed"]
    assert {k: c["outcome"] for k, c in out["claims"].items()} == {
        "drift": "supported", "alignment": "supported", "structure": "supported", "trade": "supported"}
    assert out["headline"] == "holds at this scale" and set(out["other_spaces"]) == {"fd_pix"}


def test_a_missing_run_leaves_its_seed_out(tokenizer_dir):
    cfg, _ = _plan(tokenizer_dir)
    data = arms_v2.collect(cfg, "p", tokenizer_dir.parents[1], tokenizer_dir)
    out = arms_v2.result(cfg, data)
    assert not out["gates"]["drift"]["passed"] and math.isnan(out["drift_floor"])
    assert {c["outcome"] for c in out["claims"].values()} <= {"gate failed", "unresolved"}


def test_reduced_names_the_missing_joint_seeds():
    assert arms_v2.reduced(make_config("study", "cpu"), "cpu") == ""
    one = arms_v2.reduced(make_config("study", "cpu", {"claim_v2.joint_seeds": [0]}), "cpu")
    assert one.startswith("1 joint seed(s) of 3, so no claim can resolve")
    assert "--only 20 71" in one  # version 2's notebook
    assert "rehearsal" not in one


def test_the_main_jobs_cpu_rehearsal_builds_and_says_it_is_not_the_study():
    cfg = make_config("study", "cpu", MAIN_JOB_V2["cpu"])
    arms_v2.check(cfg, "cpu")  # every run of it builds
    note = arms_v2.reduced(cfg, "cpu")
    assert "no claim can resolve" in note and "rehearsal" in note and "not the study's" in note
    assert make_config("study", "cpu").claim_v2.joint == {}  # the full study is untouched by it


def test_arm_a_is_never_a_studys_own_random_encoder_run(tmp_path):
    """Notebooks 70 and 71 without a run name take the newest notebook-20 run that can be arm A: a study's
    `-AE-stage1` run (random encoder), finished after it, is passed over."""
    import os

    from dmvae_lib.workflow.session import upstream_run

    base = tmp_path / "20_tokenizer_pretraining"
    for i, (name, kind) in enumerate((("a", "ssl"), ("a-AE-stage1", "random"))):
        folder = base / name
        folder.mkdir(parents=True)
        config = {"preset": "smoke", "encoder": {"kind": kind}}
        (folder / "config.json").write_text(json.dumps({"config": config}))
        (folder / "tokenizer.pt").write_bytes(b"x")
        (folder / "summary.json").write_text("{}")
        os.utime(folder / "summary.json", (1000 + i, 1000 + i))
    kw = {"run_root": str(tmp_path), "preset": "smoke"}
    assert upstream_run(base.name, "tokenizer.pt", **kw) == base / "a-AE-stage1"
    assert upstream_run(base.name, "tokenizer.pt", accept=arms.can_be_arm_a, **kw) == base / "a"
