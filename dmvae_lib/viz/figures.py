"""Plotly figures for the workbook, and `FigureStore`, which saves them into a run's figures/ folder.

Figures are interactive in JupyterLab; every saved figure gets an .html file (plotly.js written once per
folder, so it works offline) and a .png when a Chrome/Chromium is available for kaleido (PNG writes are
batched into one kaleido session in `FigureStore.flush`, since each session costs seconds to start). Inside a
notebook, `FigureStore.save` also shows the figure where the cell stands, so no figure is saved unseen.

Every figure fits a notebook column (`COLUMN_WIDTH` px: JupyterLab's in a 1400-px window with the file
browser open): panels wrap into rows instead of running off to the right (`_panel_grid`).
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots
from torch import Tensor

from ..data.pixels import to_uint8
from ..runtime.runs import named_write_errors

REF_COLOR, POINT_COLOR = "rgba(250,173,7,0.35)", "rgba(31,119,180,0.75)"
COLUMN_WIDTH = 880  # px: the widest figure; a 900-px notebook column shows it whole
CHROMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def chrome_available() -> bool:
    return any(shutil.which(c) for c in CHROMES)


class FigureStore:
    """Save figures as HTML now and as PNG in one batch on `flush()`."""

    def __init__(self, directory: str | Path, png: bool | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.png = chrome_available() if png is None else png
        self.pending: list[tuple[go.Figure, Path]] = []
        self.paths: list[Path] = []

    def save(self, fig: go.Figure, name: str, show: bool = True) -> None:
        """Write `name`.html (and queue `name`.png); inside a notebook also display the figure (`show`).

        Returns None, so a cell that ends with `save(...)` shows the figure once, not twice."""
        html = self.dir / f"{name}.html"
        with named_write_errors(html):
            fig.write_html(html, include_plotlyjs="directory", full_html=True)
        self.paths.append(html)
        if self.png:
            self.pending.append((fig, self.dir / f"{name}.png"))
        if show and in_notebook():
            from IPython.display import display

            display(fig)

    def flush(self) -> list[Path]:
        """Write queued PNGs (one kaleido session). Without a Chrome, say so and keep the HTML files."""
        if not self.png:
            warnings.warn("no Chrome/Chromium on PATH: figures saved as HTML only "
                          "(install Debian's `chromium` package for PNG export)", stacklevel=2)
        elif self.pending:
            figs, files = zip(*self.pending)
            # kaleido renders at 700×500 unless told: pass each figure's own layout size. Its browser
            # driver logs (to stderr) messages it ignores itself; those stay quiet.
            driver, level = logging.getLogger("choreographer"), logging.getLogger("choreographer").level
            driver.setLevel(logging.CRITICAL)
            try:
                with named_write_errors(self.dir):
                    pio.write_images(list(figs), list(files), format="png",
                                     width=[f.layout.width or 900 for f in figs],
                                     height=[f.layout.height or 500 for f in figs])
            finally:
                driver.setLevel(level)
            self.paths.extend(files)
            self.pending.clear()
        return self.paths


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill, nbval), False in scripts and tests."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def _panel_grid(n: int, cols: int, size: int, min_size: int, pad: int = 20) -> tuple[int, int, int]:
    """(rows, cols, panel px) for n panels of about `size` px, at most `cols` a row, within COLUMN_WIDTH.

    Panels shrink down to `min_size`; below that a row takes fewer panels. Rows are then balanced (six panels
    that fit four a row become two rows of three)."""
    cols = max(1, min(cols, n))
    while cols > 1 and (COLUMN_WIDTH - pad) // cols < min_size:
        cols -= 1
    rows = math.ceil(n / cols)
    cols = math.ceil(n / rows)
    return rows, cols, min(size, (COLUMN_WIDTH - pad) // cols)


def _square_axes(fig: go.Figure, lim: float) -> None:
    fig.update_xaxes(range=[-lim, lim], showticklabels=False, zeroline=False)
    fig.update_yaxes(range=[-lim, lim], showticklabels=False, zeroline=False, scaleanchor="x", scaleratio=1)
    fig.for_each_yaxis(lambda ax: ax.update(scaleanchor=ax.anchor))


def point_clouds(clouds: Mapping[str, Tensor], reference: Tensor | None,
                 titles: Mapping[str, str] | None = None, cols: int = 5, lim: float = 1.6,
                 size: int = 230) -> go.Figure:
    """One panel per point set over the reference (the layout of the paper's Fig. 3), wrapped to the column.

    `reference=None` draws the sets alone, without a legend (nothing to tell apart)."""
    names = list(clouds)
    rows, ncols, size = _panel_grid(len(names), cols, size, min_size=200)
    fig = make_subplots(rows, ncols, subplot_titles=[(titles or {}).get(n, n) for n in names],
                        horizontal_spacing=0.02, vertical_spacing=0.3 / rows)
    for i, name in enumerate(names):
        r, c = i // ncols + 1, i % ncols + 1
        if reference is not None:
            fig.add_trace(go.Scatter(x=reference[:, 0], y=reference[:, 1], mode="markers", name="reference",
                                     marker=dict(size=3, color=REF_COLOR), showlegend=i == 0), r, c)
        pts = clouds[name]
        fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="markers", name="points",
                                 marker=dict(size=3, color=POINT_COLOR),
                                 showlegend=i == 0 and reference is not None), r, c)
    _square_axes(fig, lim)
    fig.update_annotations(font_size=11)
    fig.update_layout(height=size * rows + 60, width=size * ncols + 20, showlegend=reference is not None,
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


def progress_slider(snapshots: Mapping[str, Sequence[tuple[int, Tensor]]], reference: Tensor, cols: int = 5,
                    lim: float = 1.6, size: int = 230) -> go.Figure:
    """`point_clouds` with a slider (and play button) over the snapshot steps shared by all objectives."""
    steps = [s for s, _ in next(iter(snapshots.values()))]
    first = {n: snaps[0][1] for n, snaps in snapshots.items()}
    fig = point_clouds(first, reference, cols=cols, lim=lim, size=size)
    point_traces = list(range(1, 2 * len(snapshots), 2))
    frames = [go.Frame(name=str(step), traces=point_traces,
                       data=[go.Scatter(x=snaps[i][1][:, 0],
                                        y=snaps[i][1][:, 1]) for snaps in snapshots.values()])
              for i, step in enumerate(steps)]
    fig.frames = frames
    slider = dict(active=0, currentvalue=dict(prefix="step "), pad=dict(t=30),
                  steps=[dict(label=str(s), method="animate",
                              args=[[str(s)], dict(mode="immediate", frame=dict(duration=0, redraw=False))])
                         for s in steps])
    play = dict(type="buttons", x=0, y=-0.02, xanchor="left", yanchor="top", direction="left",
                buttons=[dict(label="▶ play", method="animate",
                              args=[None, dict(frame=dict(duration=250, redraw=False), fromcurrent=True)])])
    fig.update_layout(sliders=[slider], updatemenus=[play], height=fig.layout.height + 90)
    return fig


def quiver_traces(probes: Tensor, directions: Tensor, max_len: float, color: str = "black") -> go.Scatter:
    """Arrows from each probe along its direction, as one line trace.

    Lengths are scaled so the 90th-percentile arrow is `max_len`, and longer ones are clipped to it: the
    DM direction is divided by |x − x̂_real|, so a few probes near the reference carry very long vectors
    that would otherwise shrink every other arrow to a dot.
    """
    norm = directions.norm(dim=1, keepdim=True)
    scale = max_len / float(norm.quantile(0.9).clamp_min(1e-12))
    scaled = directions * scale * (max_len / (norm * scale).clamp_min(max_len)).clamp(max=1.0)
    xs, ys = [], []
    for p, d in zip(probes.tolist(), scaled.tolist()):
        tip = (p[0] + d[0], p[1] + d[1])
        # shaft then a two-stroke head at 30° from the shaft, 30 % of the arrow's length
        dx, dy = d
        hx1, hy1 = tip[0] - 0.3 * (dx * 0.866 - dy * 0.5), tip[1] - 0.3 * (dy * 0.866 + dx * 0.5)
        hx2, hy2 = tip[0] - 0.3 * (dx * 0.866 + dy * 0.5), tip[1] - 0.3 * (dy * 0.866 - dx * 0.5)
        xs += [p[0], tip[0], None, hx1, tip[0], hx2, None]
        ys += [p[1], tip[1], None, hy1, tip[1], hy2, None]
    return go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=1), showlegend=False,
                      hoverinfo="skip")


def direction_panels(probes: Tensor, fields: Mapping[str, Tensor], background: Tensor,
                     points: Tensor | None = None, lim: float = 1.6, size: int = 260, cols: int = 3,
                     title: str = "") -> go.Figure:
    """One panel per field (e.g. per t, plus their average), `cols` a row: arrows over the reference (and
    current points)."""
    names = list(fields)
    rows, ncols, size = _panel_grid(len(names), cols, size, min_size=220)
    fig = make_subplots(rows, ncols, subplot_titles=names, horizontal_spacing=0.02,
                        vertical_spacing=0.25 / rows)
    for i, name in enumerate(names):
        r, c = i // ncols + 1, i % ncols + 1
        fig.add_trace(go.Scatter(x=background[:, 0], y=background[:, 1], mode="markers", showlegend=False,
                                 marker=dict(size=3, color=REF_COLOR), hoverinfo="skip"), r, c)
        if points is not None:
            fig.add_trace(go.Scatter(x=points[:, 0], y=points[:, 1], mode="markers", showlegend=False,
                                     marker=dict(size=2, color="rgba(31,119,180,0.3)"), hoverinfo="skip"), r,
                          c)
        fig.add_trace(quiver_traces(probes, fields[name], 0.18 * lim), r, c)
    _square_axes(fig, lim)
    fig.update_layout(height=size * rows + 70, width=size * ncols + 20, title=title,
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig


def _level(fig: go.Figure, y: float, text: str, log_y: bool = False, **kw) -> None:
    """A labelled horizontal line at `y`. On a log axis plotly places the line at `y` but reads an
    annotation's y as log10 units, so the label is given its own log10(y) to stay beside its line."""
    at = {"annotation_y": math.log10(y)} if log_y and y > 0 else {}
    fig.add_hline(y=y, annotation_text=text, **at, **kw)


def metric_lines(histories: Mapping[str, Sequence[Mapping[str, float]]], key: str, floor: float | None = None,
                 log_y: bool = True, title: str = "", match_ratio: float | None = None,
                 events: Mapping[str, float] | None = None) -> go.Figure:
    """One line per run of `key` against step, with an optional noise floor, "matched" level
    (`match_ratio` × floor) and `events` ({label: step}, e.g. where the GAN starts) as vertical lines."""
    fig = go.Figure()
    for name, hist in histories.items():
        fig.add_trace(go.Scatter(x=[h["step"] for h in hist], y=[h[key] for h in hist], mode="lines+markers",
                                 name=name))
    for label, step in (events or {}).items():
        fig.add_vline(x=step, line_dash="dash", line_color="gray", annotation_text=label)
    if floor is not None:
        _level(fig, floor, "noise floor", log_y, line_dash="dot")
        if match_ratio is not None:
            _level(fig, match_ratio * floor, f"{match_ratio:g} × floor (matched)", log_y, line_dash="dash")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=key,
                      yaxis_type="log" if log_y else "linear", width=COLUMN_WIDTH,
                      height=max(420, 22 * len(histories) + 160))  # room for every legend entry
    return fig


def loss_curves(records: Sequence[Mapping], tag: str, keys: Sequence[str]) -> go.Figure:
    """Lines of `keys` against step from a run's metrics records (`RunDir.read_metrics()`) tagged `tag`:
    any training loop's losses (tokenizer, teacher, joint, generator)."""
    recs = [r for r in records if r.get("tag") == tag]
    fig = go.Figure([go.Scatter(x=[r["step"] for r in recs if k in r], y=[r[k] for r in recs if k in r],
                                mode="lines+markers", name=k) for k in keys])
    # one line: plotly hides its legend, so the axis names it
    fig.update_layout(title=f"{tag} losses", xaxis_title="step", height=380, width=800,
                      yaxis_title=keys[0] if len(keys) == 1 else "value")
    return fig


def image_grid(rows: Mapping[str, Tensor], scale: float = 3, title: str = "") -> go.Figure:
    """Rows of images (N, 3, H, W) in [−1, 1], one labelled row per entry, as one RGB picture, magnified
    `scale` times (less when a row would be wider than the column)."""
    import numpy as np

    tiles = []
    for imgs in rows.values():
        u8 = to_uint8(imgs.detach().clamp(-1, 1)).cpu().numpy()
        pad = np.full((u8.shape[0], u8.shape[1] + 2, u8.shape[2] + 2, 3), 255, np.uint8)
        pad[:, 1:-1, 1:-1] = u8
        tiles.append(np.concatenate(list(pad), axis=1))
    grid = np.concatenate(tiles, axis=0)
    fig = go.Figure(go.Image(z=grid))
    h = grid.shape[0] // len(rows)
    fig.update_yaxes(tickvals=[h * (i + 0.5) for i in range(len(rows))], ticktext=list(rows), showgrid=False)
    fig.update_xaxes(showticklabels=False, showgrid=False)
    scale = min(scale, (COLUMN_WIDTH - 150) / grid.shape[1])  # a long row shrinks to the column
    fig.update_layout(title=title, width=round(grid.shape[1] * scale) + 150,
                      height=round(grid.shape[0] * scale) + 80, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def bar_chart(x: Sequence[float], y: Sequence[float], title: str = "", x_title: str = "",
              y_title: str = "") -> go.Figure:
    """A single-series bar chart (e.g. a loss per t-bin)."""
    fig = go.Figure(go.Bar(x=list(x), y=list(y)))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=360, width=700)
    return fig


def class_colors(n: int) -> list[str]:
    """A qualitative palette of n colours: the 10 well-separated hues of D3's category10 (matplotlib's tab10;
    plotly's own 10 pair two pinks and two greens), else Light24, cycled beyond 24."""
    import plotly.colors as pc

    palette = pc.qualitative.D3 if n <= 10 else pc.qualitative.Light24
    return [palette[i % len(palette)] for i in range(n)]


def embedding_panels(points: Mapping[str, Tensor], labels: Mapping[str, Tensor | None], *,
                     index: Mapping[str, Tensor | None] | None = None,
                     titles: Mapping[str, str] | None = None, class_names: Sequence[str] = (),
                     highlight: int | None = None, size: int = 340, title: str = "") -> go.Figure:
    """One panel per 2-D point set (N, 2), coloured by class (paper Fig. 4 layout).

    A legend entry per class toggles that class in every panel. Hover names the class and the image index
    (`index[name]`, (N,), the row of the image each point encodes; the row in the set when None).
    `highlight`: an image index starred in every panel that holds it (the same image across embeddings).
    """
    import torch

    names = list(points)
    all_classes = sorted({int(c) for y in labels.values() if y is not None for c in y.tolist()})
    color = dict(zip(all_classes, class_colors(len(all_classes))))
    rows, cols, size = _panel_grid(len(names), len(names), size, min_size=260, pad=40)
    fig = make_subplots(rows, cols, subplot_titles=[(titles or {}).get(n, n) for n in names],
                        horizontal_spacing=0.03, vertical_spacing=0.4 / rows)
    shown: set = set()
    for i, name in enumerate(names):
        row, col = i // cols + 1, i % cols + 1
        p, y = points[name], labels.get(name)
        idx = (index or {}).get(name)
        ids, what = (idx, "image") if idx is not None else (torch.arange(len(p)), "sample")
        if y is None:
            groups = [(None, torch.ones(len(p), dtype=torch.bool))]
        else:
            groups = [(c, y == c) for c in all_classes]
        for c, mask in groups:
            if not bool(mask.any()):
                continue
            cname = "unlabelled" if c is None else (class_names[c] if c < len(class_names) else f"class {c}")
            fig.add_trace(go.Scatter(
                x=p[mask, 0].tolist(), y=p[mask, 1].tolist(), mode="markers", name=cname, legendgroup=cname,
                showlegend=cname not in shown, customdata=ids[mask].tolist(),
                marker=dict(size=6, opacity=0.8, color=color.get(c, "gray")),
                hovertemplate=f"<b>{cname}</b><br>{what} #%{{customdata}}<br>{name}<extra></extra>"),
                row, col)
            shown.add(cname)
        if highlight is not None and idx is not None and bool((idx == highlight).any()):
            j = int((idx == highlight).nonzero()[0, 0])
            fig.add_trace(go.Scatter(x=[float(p[j, 0])], y=[float(p[j, 1])], mode="markers", showlegend=False,
                                     marker=dict(symbol="star", size=16, color="black",
                                                 line=dict(color="white", width=1)),
                                     hovertemplate=f"image #{highlight}<extra></extra>"), row, col)
    fig.update_xaxes(showticklabels=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, zeroline=False)
    fig.for_each_yaxis(lambda ax: ax.update(scaleanchor=ax.anchor, scaleratio=1))
    fig.update_annotations(font_size=11)
    fig.update_layout(title=title, height=(size + 90) * rows + 60, width=size * cols + 40,
                      legend=dict(orientation="h", y=-0.04), margin=dict(l=10, r=10, t=110, b=10))
    return fig


def condition_panels(points: Mapping[str, Mapping[str, Sequence[float]]], titles: Mapping[str, str],
                     title: str = "", cols: int = 3) -> go.Figure:
    """One panel per metric: per condition, the mean ± sample standard deviation of its seeds (bar and error
    bar) and every seed as a dot. `points[metric][condition]` lists the seeds' values; `titles[metric]` names
    it."""
    import statistics

    names = list(points)
    rows, cols, size = _panel_grid(len(names), cols, 360, min_size=260)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[titles.get(m, m) for m in names])
    for i, m in enumerate(names):
        r, c = i // cols + 1, i % cols + 1
        conds = [k for k, v in points[m].items() if any(not math.isnan(x) for x in v)]
        vals = [[x for x in points[m][k] if not math.isnan(x)] for k in conds]
        means = [statistics.fmean(v) for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        fig.add_trace(go.Bar(x=conds, y=means, error_y={"type": "data", "array": errs},
                             marker_color="#9db4d3",
                             showlegend=False, hovertemplate="%{x}: %{y:.4g}<extra>mean</extra>"), row=r,
                      col=c)
        fig.add_trace(go.Scatter(x=[k for k, v in zip(conds, vals) for _ in v],
                                 y=[x for v in vals for x in v], mode="markers",
                                 marker={"color": "black", "size": 6}, showlegend=False,
                                 hovertemplate="%{x}: %{y:.4g}<extra>one seed</extra>"), row=r, col=c)
    fig.update_layout(title=title, height=330 * rows, width=size * cols + 20, margin={"t": 80})
    fig.update_xaxes(tickangle=30)
    return fig


def dm_mechanism_panels(g_norm: Tensor, t: Tensor, grad_norm: Mapping[str, float]) -> go.Figure:
    """One DM step in two panels: |g| per sample against its t, and the gradient norm on each model part."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("‖g‖ per sample vs t (t = 1 data)",
                                                        "‖∇ λ·L_DM‖ per part"))
    fig.add_trace(go.Scatter(x=t.tolist(), y=g_norm.tolist(), mode="markers", marker=dict(size=6),
                             name="samples"), 1, 1)
    fig.add_trace(go.Bar(x=list(grad_norm), y=list(grad_norm.values()), name="gradient"), 1, 2)
    fig.update_xaxes(title_text="t", row=1, col=1)
    fig.update_layout(height=380, width=860, showlegend=False)
    return fig


def _step_ticks(fig: go.Figure, steps: Sequence[float]) -> None:
    """Log step axes ticked at the measured steps only (plotly's log ticks crowd a short range)."""
    ticks = sorted(set(steps))
    fig.update_xaxes(type="log", title_text="generator fit step", tickvals=ticks,
                     ticktext=[f"{x:g}" for x in ticks])


def learning_curve_panels(points: Sequence[Mapping]) -> go.Figure:
    """FD against fit steps, one panel per feature space: to real images and to the reconstructions."""
    spaces = [k.removeprefix("space_") for k in points[0] if k.startswith("space_")]
    fig = make_subplots(rows=1, cols=len(spaces), subplot_titles=[points[0][f"space_{s}"] for s in spaces])
    for col, space in enumerate(spaces, 1):
        for key, name in ((f"fd_{space}", "to real images"), (f"fd_{space}_recon", "to reconstructions")):
            fig.add_scatter(x=[p["step"] for p in points], y=[p[key] for p in points], mode="lines+markers",
                            name=name, legendgroup=name, showlegend=col == 1, row=1, col=col)
    _step_ticks(fig, [p["step"] for p in points])
    fig.update_yaxes(type="log", title_text="FD")
    fig.update_annotations(font_size=11)
    fig.update_layout(height=380, width=860, title="generator learning curve")
    return fig


def arm_curve_panels(bands: Mapping[str, Mapping[str, Mapping]], titles: Mapping[str, str], cols: int = 2,
                     title: str = "generator learning curves per arm") -> go.Figure:
    """One panel per curve key: per arm, the mean FD over seeds against fit steps (log–log), with a ± one
    sample-std band. `bands[key][arm]` = {"step", "mean", "std", "n"} (workflow.arms.curve_bands)."""
    keys = list(bands)
    rows, cols, size = _panel_grid(len(keys), cols, 430, min_size=300, pad=160)  # the legend takes ~140 px
    arm_names = list(dict.fromkeys(a for k in keys for a in bands[k]))
    color = dict(zip(arm_names, class_colors(len(arm_names))))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[titles.get(k, k) for k in keys])
    for i, key in enumerate(keys):
        r, c = i // cols + 1, i % cols + 1
        for arm, b in bands[key].items():
            lo = [max(m - s, 1e-12) for m, s in zip(b["mean"], b["std"])]
            hi = [m + s for m, s in zip(b["mean"], b["std"])]
            x = list(b["step"])
            fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself",
                                     fillcolor=color[arm], opacity=0.2, line=dict(width=0), hoverinfo="skip",
                                     legendgroup=arm, showlegend=False), r, c)
            fig.add_trace(go.Scatter(x=x, y=b["mean"], mode="lines+markers", name=f"{arm} (n={b['n']})",
                                     legendgroup=arm, showlegend=i == 0, line=dict(color=color[arm])), r, c)
    _step_ticks(fig, [x for k in keys for b in bands[k].values() for x in b["step"]])
    fig.update_yaxes(type="log", title_text="FD")
    fig.update_annotations(font_size=10)
    fig.update_layout(title=title, height=300 * rows + 80, width=size * cols + 140)
    return fig


def cfg_sweep_panels(rows: Sequence[Mapping], ceiling: float, chance: float, fd_key: str = "fd_ssl",
                     fd_floor: float | None = None, title: str = "",
                     recon_ceiling: float | None = None) -> go.Figure:
    """Two panels against the CFG scale: class accuracy of the generated images (with the classifier's
    real-image ceiling, its accuracy on reconstructions when given, and chance) and their FD (with the
    real-vs-real floor). rows: {"cfg_scale", "accuracy", fd_key}."""
    x = [r["cfg_scale"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["class accuracy of generated images",
                                                        f"{fd_key} of generated images"])
    fig.add_scatter(x=x, y=[r["accuracy"] for r in rows], mode="lines+markers", name="generated", row=1,
                    col=1)
    fig.add_hline(y=ceiling, line_dash="dot", annotation_text="real val (ceiling)", row=1, col=1)
    if recon_ceiling is not None:
        fig.add_hline(y=recon_ceiling, line_dash="dashdot", line_color="green",
                      annotation_text="reconstructions", annotation_position="bottom right", row=1, col=1)
    fig.add_hline(y=chance, line_dash="dash", line_color="gray", annotation_text="chance", row=1, col=1)
    fig.add_scatter(x=x, y=[r[fd_key] for r in rows], mode="lines+markers", name=fd_key, row=1, col=2)
    if fd_floor is not None:
        _level(fig, fd_floor, "real vs real", True, line_dash="dot", row=1, col=2)
    fig.update_xaxes(title_text="CFG scale", tickvals=x)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=1, col=1)
    fig.update_yaxes(type="log", title_text="FD", row=1, col=2)
    fig.update_layout(title=title, height=380, width=COLUMN_WIDTH, showlegend=False)
    return fig


def class_accuracy_bars(series: Mapping[str, Sequence[float]], names: Sequence[str],
                        title: str = "") -> go.Figure:
    """Grouped bars, one group per class: each series' accuracy on that class (e.g. real val, CFG s)."""
    fig = go.Figure()
    for (label, acc), color in zip(series.items(), class_colors(len(series))):
        fig.add_bar(x=list(names)[:len(acc)], y=list(acc), name=label, marker_color=color)
    fig.update_layout(barmode="group", title=title, yaxis=dict(range=[0, 1.02], title="accuracy"), height=380,
                      width=COLUMN_WIDTH, legend=dict(orientation="h", y=-0.2))
    return fig


def paired_differences(panels: Mapping[str, Mapping[str, Mapping]], effects: Mapping[str, float],
                       title: str = "paired differences by joint seed") -> go.Figure:
    """One panel per measure (e.g. generation, PSNR), one row per comparison: each paired seed's difference
    as a dot, the mean with its one-sided interval [mean − t·se, mean + t·se] as a bar, and the measure's
    effect threshold as a dashed line. `panels[measure][label]` = {"by_seed": {seed: d}, "mean", "se", "t"}
    (workflow.claims_v2's claim records)."""
    names = list(panels)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for i, measure in enumerate(names):
        for label, rec in panels[measure].items():
            seeds, d = list(rec["by_seed"]), list(rec["by_seed"].values())
            fig.add_trace(go.Scatter(x=d, y=[label] * len(d), mode="markers", showlegend=False,
                                     marker=dict(size=9, opacity=0.7, color="#1f77b4"),
                                     text=[f"joint seed {s}" for s in seeds]), 1, i + 1)
            half = rec["t"] * rec["se"]
            if half == half:  # a finite interval (two seeds or more)
                fig.add_trace(go.Scatter(x=[rec["mean"]], y=[label], mode="markers",
                                         marker=dict(symbol="line-ns-open", size=16, color="black"),
                                         error_x=dict(type="constant", value=half, color="black"),
                                         showlegend=False, hoverinfo="x"), 1, i + 1)
        fig.add_vline(x=effects.get(measure, 0.0), line_dash="dash", line_color="#d62728", row=1, col=i + 1)
    fig.update_layout(title=title, height=120 + 60 * max(len(p) for p in panels.values()),
                      width=min(COLUMN_WIDTH, 360 * len(names) + 140))
    return fig
