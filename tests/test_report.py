"""The pipeline's Markdown report (`pipeline.write_report`): per stage its headline numbers with a line on
what they mean and its key figure, every number in an appendix; built here from small fake stage folders."""

import json

import pytest

from dmvae_lib.workflow import pipeline

PNG = b"\x89PNG\r\n\x1a\n"  # a PNG signature: the report only links the files


def _stage(root, stem, summary, figures=(), evaluation=None):
    d = root / stem / "r"
    (d / "figures").mkdir(parents=True)
    for f in figures:
        (d / "figures" / f).write_bytes(PNG)
    summary = {**summary, "figures": [f"figures/{f}" for f in figures]}
    (d / "summary.json").write_text(json.dumps(summary))
    if evaluation is not None:
        (d / "evaluation.json").write_text(json.dumps(evaluation))
    return d


def _section(text, heading):
    """The text of one `## ` section (up to the next `## ` heading)."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


TOKENIZER = {"tokenizer": {"psnr": 23.97654, "ssim": 0.72587, "fd": 0.2346727, "fd_n": 2000,
                           "fd_label": "SSL features (not FID)", "lpips": 0.0109},  # no lpips_label
             "latent_probe": {"linear_acc": 0.8455, "knn_acc": 0.522, "dim": 512, "n_val": 2000,
                              "n_train": 10000}}  # no `encoders`: its headline number is left out
GENERATION = {"metrics": {"fd_ssl": {"value": 0.75, "feature_space": "SSL features (not FID)",
                                     "protocol": {"cfg_scale": 3.0}},
                          "fd_ssl_floor": {"value": 0.01}, "rfd_ssl": {"value": 0.25},
                          "class_accuracy": {"value": 0.5355, "ceiling": 0.935,
                                             "reconstruction_ceiling": 0.863,
                                             "protocol": {"cfg_scale": 3.0}}},
              "cfg_sweep": [{"cfg_scale": 1.0, "n": 500, "accuracy": 0.338, "fd_ssl": 0.6531},
                            {"cfg_scale": 2.0, "n": 500, "fd_ssl": 0.61},  # no accuracy: item left out
                            {"cfg_scale": 4.0, "n": 500, "accuracy": 0.572, "fd_ssl": 1.0919}]}
LATENTS = {"chance_knn": 0.1,
           "scores": {"tsne": {"reference (ssl)": {"knn": 0.3555}, "DMVAE (λ = 10)": {"knn": 0.352},
                               "λ = 0 control": {"knn": 0.257}},
                      "umap": {"reference (ssl)": {"knn": 0.9}}},
           "discriminant": {"fit_points": 0, "held_out_accuracy": {}}}  # no discriminant: left out


@pytest.fixture
def report(tmp_path):
    rows = [("20_tokenizer_pretraining", "ran in 3 s",
             _stage(tmp_path, "20_tokenizer_pretraining", TOKENIZER,
                    ["data_grid.png", "reconstructions.png", "tokenizer_losses.png"])),
            ("30_teacher_fitting", "ran in 2 s",  # the FD without its floor: no meaning line
             _stage(tmp_path, "30_teacher_fitting", {"evaluation": {"samples_vs_reference": {"fd": 17.2284}}},
                    ["teacher_loss.png"])),
            ("40_joint_dm_training", "failed", tmp_path / "40_joint_dm_training" / "r"),
            ("50_latent_visualization", "ran in 1 s", _stage(tmp_path, "50_latent_visualization", LATENTS)),
            ("60_generation", pipeline.SKIPPED,
             _stage(tmp_path, "60_generation", GENERATION, ["generator_loss.png", "samples.png"],
                    evaluation=[{"metric": "fd_ssl", "value": 0.75, "feature_space": "SSL",
                                 "protocol": {"n_samples": 10, "sampler": "ode", "steps": 5, "cfg_scale": 3.0,
                                              "ema": True, "seed": 0,
                                              "files": {"generator": {"sha256": "abcdef0123456789"}}}},
                                {"metric": "inception", "reason": "no weights", "protocol": {}}])),
            ("90_new_stage", "ran in 1 s",  # a notebook the registry does not know yet
             _stage(tmp_path, "90_new_stage", {"loss": 0.123456, "n": 10000.0}, ["a.png", "b.png"]))]
    return pipeline.write_report(tmp_path / "pipeline" / "r" / "report.md", "r", "cpu", rows).read_text()


def test_the_report_opens_with_what_ran(report):
    head = report[:report.index("\n## ")]
    assert head.startswith("# Pipeline run `r` (preset `cpu`)\n")
    assert ("Preset `cpu`, 6 stage(s) (20, 30, 40, 50, 60, 90): 4 ran in this invocation, 1 had already "
            "finished, 1 did not finish (40_joint_dm_training).") in head
    assert ("| 40_joint_dm_training | failed | [../../40_joint_dm_training/r]"
            "(../../40_joint_dm_training/r) |") in head


def test_each_stage_shows_its_headline_numbers_with_what_they_mean(report):
    tok = _section(report, "20 · Tokenizer pretraining")
    assert "*ran in 3 s · [run folder](../../20_tokenizer_pretraining/r) · " \
           "[summary.json](../../20_tokenizer_pretraining/r/summary.json)*" in tok
    # lpips_label is absent, so the PSNR's meaning falls back to its shorter alternative
    assert "- Val PSNR: **23.98 dB** — the stage-1 tokenizer's reconstructions of held-out images.\n" in tok
    assert ("- rFD: **0.2347** — reconstructions against the same 2000 held-out images in SSL features (not "
            "FID): what the stage-1 tokenizer loses") in tok
    assert "- Latent linear probe: **0.8455** — kNN 0.522 on the tokenizer's 512-dim latents (2000 held-out" \
        in tok
    assert "SSL encoder kNN accuracy" not in report  # its keys are missing: left out, silently
    assert "| tokenizer.psnr |" not in tok  # the full table is in the appendix only

    gen = _section(report, "60 · Generation")
    assert ("- FD of the samples, SSL space: **0.75** — 75.0× the real-vs-real floor 0.01 and 3.0× the "
            "reconstructions' rFD 0.25: the FD above rFD is what the generator adds, in SSL features (not "
            "FID).") in gen
    assert ("- Class accuracy of the generated images: **0.5355** — at CFG 3, under the embedded classifier: "
            "real images reach 0.935, the tokenizer's reconstructions 0.863 (the decoder's ceiling).") in gen
    assert ("- CFG sweep: CFG 1: accuracy 0.338, SSL FD 0.6531 · CFG 4: accuracy 0.572, SSL FD 1.092 — 500 "
            "samples per scale from the same noise; the numbers above use CFG 3.") in gen
    assert "supervised space" not in gen  # no fd_sup in this summary
    assert ("Protocol records (`evaluation.json`, in full in the appendix): fd_ssl; samples: N 10, ode × 5 "
            "steps, CFG 3.0, EMA True, seed 0; not computed: inception.") in gen

    lat = _section(report, "50 · Latent visualisation")  # `#0` takes the first method, `*` every set
    assert ("- kNN accuracy per latent set (full dimension): reference (ssl) 0.3555 · DMVAE (λ = 10) 0.352 · "
            "λ = 0 control 0.257 — leave-one-out kNN on the class labels; chance 0.1.") in lat
    assert "0.9" not in lat and "Held-out linear" not in lat


def test_a_number_whose_meaning_cannot_be_filled_is_shown_alone(report):
    teacher = _section(report, "30 · Teacher fitting")
    assert "- FD of the teacher's samples to the reference: **17.23**\n" in teacher
    assert "SW2 of the teacher's samples" not in teacher


def test_each_stage_embeds_its_key_figure_and_links_the_others(report):
    tok = _section(report, "20 · Tokenizer pretraining")
    assert "![reconstructions](../../20_tokenizer_pretraining/r/figures/reconstructions.png)" in tok
    assert "![data_grid]" not in tok
    assert ("Other figures: [data_grid](../../20_tokenizer_pretraining/r/figures/data_grid.png), "
            "[tokenizer_losses](../../20_tokenizer_pretraining/r/figures/tokenizer_losses.png).") in tok
    assert "![teacher_loss](../../30_teacher_fitting/r/figures/teacher_loss.png)" in report  # the only PNG
    assert "![samples](../../60_generation/r/figures/samples.png)" in report
    new = _section(report, "90 · New stage")  # not in the registry: its first PNG, no headline numbers
    assert "![a](../../90_new_stage/r/figures/a.png)" in new and "\n- " not in new
    assert "![" not in _section(report, "50 · Latent visualisation")


def test_an_unfinished_stage_says_so(report):
    joint = _section(report, "40 · Joint DM training")
    assert joint.strip() == ("## 40 · Joint DM training\n\nNo summary.json: the stage did not finish "
                             "(failed; [run folder](../../40_joint_dm_training/r)).")
    assert "### 40_joint_dm_training" not in report


def test_the_appendix_holds_every_number_and_the_protocol_records(report):
    appendix = report[report.index("\n## Appendix · every number\n"):]
    assert appendix.index("### 20_tokenizer_pretraining") < appendix.index("### 60_generation")
    assert "### 20_tokenizer_pretraining · [summary.json](../../20_tokenizer_pretraining/r/summary.json)" \
        in appendix
    for row in ("| tokenizer.psnr | 23.98 |", "| tokenizer.fd [SSL features (not FID)] | 0.2347 |",
                "| latent_probe.n_train | 10000 |", "| evaluation.samples_vs_reference.fd | 17.23 |",
                "| metrics.fd_ssl.value [SSL features (not FID)] | 0.75 |", "| loss | 0.1235 |",
                "| n | 10000 |"):
        assert row in appendix, row
    assert "| fd_ssl | 0.75 | SSL | 10 | ode × 5 | 3.0 | True | 0 | generator abcdef012345 |" in appendix
    assert "- `inception` not computed: no weights" in appendix


def test_the_appendix_caps_a_long_table_and_points_at_the_file(tmp_path):
    objectives = {f"o{i}": {"sw2": i / 7} for i in range(70)}
    d = _stage(tmp_path, "10_toy_gradient_fields", {"objectives": objectives})
    text = pipeline.write_report(tmp_path / "report.md", "r", "smoke",
                                 [("10_toy_gradient_fields", "ran in 1 s", d)]).read_text()
    assert "| objectives.o59.sw2 | 8.429 |" in text and "objectives.o60.sw2" not in text
    assert "(10 more in `10_toy_gradient_fields/r/summary.json`)" in text
    assert "- DM objective" not in text  # no `dm` objective in this summary


def test_fields_read_key_paths_and_do_arithmetic():
    s = {"a": {"b": 3.0, "c": 0.0, "name": "x"}, "l": [{"v": 2}, {"v": 5}]}
    assert pipeline._fill("{a.b / l.#-1.v:.2f} of {a.name}, {l.#0.v}", s) == "0.60 of x, 2"
    for bad in ("{a.missing}", "{a.b / a.c}", "{a.name / a.b}", "{l.#7.v}"):
        with pytest.raises(pipeline._Missing):
            pipeline._fill(bad, s)
    assert [pipeline._fmt(v) for v in (10000.0, 0.123456, 23.97654, 3, 1e7, float("nan"), "ssl")] == \
        ["10000", "0.1235", "23.98", "3", "1e+07", "nan", "ssl"]


def test_the_registry_names_every_notebook():
    assert set(pipeline.REPORT_STAGES) == {nb.stem[:2] for nb in pipeline.notebooks()}
