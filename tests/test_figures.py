"""Figures fit a notebook column at the sizes the notebooks draw them; the store saves without displaying
outside a kernel; tables format counts as integers."""

import math

import pandas as pd
import pytest
import torch

from dmvae_lib.viz import figures as viz
from dmvae_lib.viz.tables import config_table, number, styled

G = torch.Generator().manual_seed(0)


def _pts(n=50):
    return torch.randn(n, 2, generator=G)


def _images(n, size=32):
    return torch.rand(n, 3, size, size, generator=G) * 2 - 1


_PAIRED = {m: {f"vs {x}": {"by_seed": {0: 0.1, 1: 0.2, 2: 0.15}, "mean": 0.15, "se": 0.03, "t": 2.92}
              for x in ("C0", "VA", "AE", "A_J")} for m in ("generation", "PSNR")}
FIGURES = {
    "fig3, 15 objectives": lambda: viz.point_clouds({f"o{i}": _pts() for i in range(15)}, _pts()),
    "references": lambda: viz.point_clouds({"a": _pts(), "b": _pts()}, None, cols=2, size=320),
    "progress slider": lambda: viz.progress_slider({f"o{i}": [(0, _pts()), (5, _pts())] for i in range(4)},
                                                   _pts()),
    "fig7, 5 t + average": lambda: viz.direction_panels(torch.zeros(9, 2), {f"t{i}": torch.ones(9, 2)
                                                                            for i in range(6)}, _pts()),
    "explorer field": lambda: viz.direction_panels(torch.zeros(9, 2), {"x": torch.ones(9, 2)}, _pts(),
                                                   size=480),
    "16 reconstructions": lambda: viz.image_grid({"original": _images(16), "reconstruction": _images(16)}),
    "12 per class": lambda: viz.image_grid({f"class {c}": _images(12) for c in range(10)}),
    "256-px samples": lambda: viz.image_grid({"a": _images(8, 256)}),
    "embeddings, 3 sets": lambda: viz.embedding_panels({s: _pts() for s in "abc"},
                                                       {s: torch.arange(50) % 10 for s in "abc"}),
    "embeddings, 4 sets": lambda: viz.embedding_panels({s: _pts() for s in "abcd"},
                                                       {s: None for s in "abcd"}),
    "conditions": lambda: viz.condition_panels({m: {"A": [1.0, 2.0], "B": [3.0]} for m in "abcd"},
                                               {}),
    "arm curves": lambda: viz.arm_curve_panels(
        {k: {"A": {"step": [1, 10], "mean": [2.0, 1.0], "std": [0.1, 0.1], "n": 2}} for k in "abcdef"}, {}),
    "paired differences": lambda: viz.paired_differences(_PAIRED, {"generation": 0.05, "PSNR": 0.2}),
    "metric lines": lambda: viz.metric_lines({"dm": [{"step": 0, "sw2": 1.0}]}, "sw2", 0.1, match_ratio=2.5,
                                             events={"GAN on": 0}),
}


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_fits_the_notebook_column(name):
    fig = FIGURES[name]()
    assert fig.layout.width <= viz.COLUMN_WIDTH, f"{name}: {fig.layout.width} px"


def test_wide_panel_sets_wrap_into_balanced_rows():
    fig7 = FIGURES["fig7, 5 t + average"]()
    rows = {tuple(fig7.layout[k].domain) for k in fig7.layout if k.startswith("yaxis")}
    assert len(rows) == 2 and len(fig7.layout.annotations) == 6
    assert viz._panel_grid(6, 6, 260, 220) == (2, 3, 260)
    assert viz._panel_grid(3, 3, 340, 260, pad=40) == (1, 3, 280)
    assert viz._panel_grid(1, 3, 480, 220)[:2] == (1, 1)


def test_reference_free_point_clouds_have_no_legend():
    fig = FIGURES["references"]()
    assert fig.layout.showlegend is False and all(t.name == "points" for t in fig.data)


def test_class_palette_separates_the_shapes_that_looked_alike():
    import colorsys

    from dmvae_lib.data.shapes_dataset import CLASS_NAMES

    colors = dict(zip(CLASS_NAMES, viz.class_colors(10)))
    assert len(set(colors.values())) == 10

    def hue(c):
        return 360 * colorsys.rgb_to_hsv(*(int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)))[0]

    for a, b in (("circle", "star"), ("cross", "crescent"), ("ellipse", "heart")):  # issue 15's pairs
        d = abs(hue(colors[a]) - hue(colors[b]))
        assert min(d, 360 - d) > 60, (a, b, colors[a], colors[b])


def test_store_saves_and_returns_none_outside_a_kernel(tmp_path):
    store = viz.FigureStore(tmp_path, png=False)
    assert not viz.in_notebook()
    assert store.save(FIGURES["metric lines"](), "lines") is None
    assert (tmp_path / "lines.html").is_file() and store.paths == [tmp_path / "lines.html"]


def test_numbers_and_tables():
    assert [number(x) for x in (300, 300.0, 0.123456, 12345.6, math.nan, True, "a")] == \
        ["300", "300", "0.123", "12,346", "–", "True", "a"]
    table = pd.DataFrame({"points": [300], "kNN": [0.81234]}, index=["ref"])
    html = styled(table).to_html()
    assert ">300<" in html and ">0.812<" in html and "300.0" not in html


def test_config_table_has_one_row_per_section():
    from dmvae_lib.configs import make_config

    data = config_table(make_config("toy", "smoke")).data
    assert list(data.index) == ["run", "net", "fit", "align", "eval", "verdict"]
    assert "match_ratio = 2.5" in data.loc["verdict", "settings"]
    assert "objectives = (dm, real_fm_input, real_fm_target, fake_fm_target)" in data.loc["run", "settings"]


def test_library_notes_go_to_stdout_in_a_notebook(capsys):
    """In a notebook (`session.start`) the library's log warnings are `note:` lines on stdout, once each."""
    import logging

    from dmvae_lib.workflow import session

    log = logging.getLogger("dmvae_lib")
    try:
        session.notes_on_stdout()
        session.notes_on_stdout()  # idempotent: one handler
        logging.getLogger("dmvae_lib.models.recon_losses").warning("a %s backbone", "RANDOM")
        out, err = capsys.readouterr()
        assert out.count("note: a RANDOM backbone") == 1 and err == ""
    finally:
        log.handlers = [h for h in log.handlers if not getattr(h, "dmvae_notes", False)]
        log.propagate = True


def test_metric_lines_mark_each_event_at_its_step():
    fig = viz.metric_lines({"dm": [{"step": s, "val_psnr": 20.0 + s / 100} for s in (0, 250, 500, 750)]},
                           "val_psnr", log_y=False, events={"GAN on": 500})
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert [(s.x0, s.x1) for s in lines] == [(500, 500)]
    assert [a.text for a in fig.layout.annotations] == ["GAN on"]


def test_level_labels_sit_beside_their_lines_on_log_and_linear_axes():
    # plotly reads an annotation's y on a log axis as log10 units, while the line itself takes the value
    hist = {"dm": [{"step": 0, "sw2": 1.0}, {"step": 10, "sw2": 0.2}]}
    for log_y in (True, False):
        fig = viz.metric_lines(hist, "sw2", floor=0.01, log_y=log_y, match_ratio=2.5)
        at = {a.text: a.y for a in fig.layout.annotations}
        want = {"noise floor": 0.01, "2.5 × floor (matched)": 0.025}
        assert at == pytest.approx({k: math.log10(v) if log_y else v for k, v in want.items()})
        assert sorted(sh.y0 for sh in fig.layout.shapes) == pytest.approx(sorted(want.values()))
    rows = [{"cfg_scale": s, "accuracy": a, "fd_ssl": f} for s, a, f in ((1, 0.5, 2.0), (2, 0.8, 1.0))]
    fig = viz.cfg_sweep_panels(rows, ceiling=0.97, chance=0.1, fd_floor=0.05)
    at = {a.text: a.y for a in fig.layout.annotations if a.text in ("real vs real", "chance")}
    assert at == pytest.approx({"real vs real": math.log10(0.05), "chance": 0.1})


def test_loss_curves_plot_only_the_tagged_records_that_hold_each_key():
    records = [{"tag": "teacher", "step": 10, "fm_loss": 1.0}, {"tag": "joint", "step": 10, "fm_loss": 9.0},
               {"tag": "teacher", "step": 20, "fm_loss": 0.5, "lr": 1e-3}]
    fig = viz.loss_curves(records, "teacher", ("fm_loss", "lr"))
    assert [t.name for t in fig.data] == ["fm_loss", "lr"]
    assert list(fig.data[0].x) == [10, 20] and list(fig.data[0].y) == [1.0, 0.5]
    assert list(fig.data[1].x) == [20] and fig.layout.title.text == "teacher losses"
    assert fig.layout.yaxis.title.text == "value"
    assert viz.loss_curves(records, "teacher", ("fm_loss",)).layout.yaxis.title.text == "fm_loss"


def test_paired_differences_draw_every_seed_and_an_interval_only_when_there_is_one():
    fig = viz.paired_differences(_PAIRED, {"generation": 0.05, "PSNR": 0.2})
    dots = [t for t in fig.data if t.error_x.value is None]
    bars = [t for t in fig.data if t.error_x.value is not None]
    assert len(dots) == len(bars) == 8 and all(len(t.x) == 3 for t in dots)
    assert bars[0].error_x.value == pytest.approx(2.92 * 0.03)
    one = {"generation": {"vs C0": {"by_seed": {0: 0.1}, "mean": 0.1, "se": float("nan"), "t": float("nan")}}}
    assert len(viz.paired_differences(one, {}).data) == 1
