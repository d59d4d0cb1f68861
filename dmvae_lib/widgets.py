"""ipywidgets explorers. They render with plotly into an Output widget, so they also execute headlessly
(papermill, nbval): the callback runs once for the initial values and the widget state is saved."""

from __future__ import annotations

from typing import Mapping

import ipywidgets as W
import plotly.io as pio
import torch
from IPython.display import display

from . import viz
from .toy_study import AlignResult, direction_fields, fake_net_at


def toy_explorer(results: Mapping[str, AlignResult], real_net: torch.nn.Module, reference: torch.Tensor,
                 probes: torch.Tensor, draws: int = 32) -> W.VBox:
    """Pick an objective, a timestep and a training step; see the points and the update field there."""
    names = list(results)
    steps = [s for s, _ in results[names[0]].snapshots]
    objective = W.Dropdown(options=names, value=names[0], description="objective")
    t = W.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="t (1 = data)")
    step = W.SelectionSlider(options=steps, value=steps[min(1, len(steps) - 1)], description="step")
    out = W.Output()

    def render(objective: str, t: float, step: int) -> None:
        res = results[objective]
        points = dict(res.snapshots)[step]
        fake = fake_net_at(res, step, real_net)
        field = direction_fields(objective, probes, real_net, fake, [t], draws)[0]
        fig = viz.direction_panels(probes, {f"{objective} · t={t:.2f} · step {step}": field}, reference, points,
                                   size=480)
        # Set the Output's state directly: routing a large display message through `with out:` stalls
        # nbclient (papermill, nbval) indefinitely. The plotly mimetype renders in JupyterLab.
        out.outputs = ({"output_type": "display_data", "metadata": {},
                        "data": pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())},)

    W.interactive_output(render, {"objective": objective, "t": t, "step": step})
    box = W.VBox([W.HBox([objective, t, step]), out])
    display(box)
    return box
