"""Widget explorers: a few controls and one output area that shows the figures of the current choice.

`Explorer` calls `render(**values)` at start and whenever a control's value changes, and puts the returned
plotly figures into its `ipywidgets.Output`. Two things it does on purpose:

* It sets the Output's `outputs` directly instead of `with out: display(fig)`: routing a large display
  message through the context manager stalls nbclient (papermill, nbval) indefinitely.
* A render that raises does not vanish. `ipywidgets.interactive_output` prints the traceback into an Output
  nobody displays, so the old figure stays and nothing looks wrong; here the traceback replaces the figure
  in the explorer's own output area and is kept in `errors` (which `tests/test_explorers.py` reads after
  driving every option). The first render, in the notebook cell itself, raises as usual, so papermill and
  nbval fail on an explorer that is broken at its defaults.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence

import plotly.graph_objects as go


def figure_output(fig: go.Figure) -> dict:
    """A display_data output (nbformat) of `fig` as plotly's JSON mimetype, which JupyterLab renders."""
    import plotly.io as pio

    return {"output_type": "display_data", "metadata": {},
            "data": pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())}


def error_output(exc: BaseException) -> dict:
    """An error output (nbformat) carrying `exc`'s traceback, as a notebook cell shows one."""
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    return {"output_type": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": lines}


class Explorer:
    """Controls (name → widget) laid out in `rows` (lists of names; one row of all when None) above an output
    area showing `render(**{name: widget.value})`, a figure or a sequence of figures."""

    def __init__(self, controls: Mapping[str, object], render: Callable[..., go.Figure | Sequence[go.Figure]],
                 rows: Sequence[Sequence[str]] | None = None):
        import ipywidgets as W  # lazy: only notebooks need the widget stack

        self.controls, self.render = dict(controls), render
        self.errors: list[str] = []  # the tracebacks of failed renders, oldest first
        self.out = W.Output()
        rows = rows or [list(self.controls)]
        self.box = W.VBox([W.HBox([self.controls[n] for n in row]) for row in rows] + [self.out])
        self._update(strict=True)
        for widget in self.controls.values():
            widget.observe(self._on_change, "value")

    def values(self) -> dict:
        return {name: widget.value for name, widget in self.controls.items()}

    def _on_change(self, _change: dict) -> None:
        self._update(strict=False)

    def _update(self, strict: bool) -> None:
        try:
            figs = self.render(**self.values())
        except Exception as exc:  # shown, never swallowed: see the module docstring
            self.out.outputs = (error_output(exc),)
            self.errors.append("\n".join(error_output(exc)["traceback"]))
            if strict:
                raise
            return
        figs = [figs] if isinstance(figs, go.Figure) else list(figs)
        self.out.outputs = tuple(figure_output(f) for f in figs)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)
