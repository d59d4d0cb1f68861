"""Every widget explorer, driven headlessly: each control set to each of its options (sliders to their ends
and middle) through the widgets' own `observe` handlers, as a click in JupyterLab would; any exception fails
the test. And a raising callback shows its traceback in the explorer's output area instead of vanishing."""

import pytest
import torch

pytest.importorskip("ipywidgets")

from dmvae_lib.configs import make_config  # noqa: E402
from dmvae_lib.core import toy2d  # noqa: E402
from dmvae_lib.models.score_nets import ToyScoreMLP  # noqa: E402
from dmvae_lib.stages import latents as latents_stage  # noqa: E402
from dmvae_lib.stages import toy as toy_study  # noqa: E402
from dmvae_lib.viz.explorer import Explorer  # noqa: E402


def _choices(widget) -> list:
    """The values a user can give `widget`: every option; a multiple choice also none and all; a number its
    ends and middle."""
    if hasattr(widget, "options"):
        values = [o[1] if isinstance(o, tuple) else o for o in widget.options]
        return [(v,) for v in values] + [(), tuple(values)] if isinstance(widget.value, tuple) else values
    lo, hi = widget.min, widget.max
    mid = type(widget.value)(lo + (hi - lo) / 2)
    return [lo, mid, hi]


def exercise(explorer: Explorer, **fixed) -> None:
    """Set each control to each of its choices (the others at their current values), then back; fail on the
    first error the explorer recorded."""
    for name, value in fixed.items():
        explorer.controls[name].value = value
    for name, widget in explorer.controls.items():
        start = widget.value
        for value in _choices(widget):
            widget.value = value
            assert not explorer.errors, f"{name} = {value!r}:\n{explorer.errors[0]}"
            kinds = {o["output_type"] for o in explorer.out.outputs}
            assert kinds == {"display_data"}, f"{name} = {value!r} shows {kinds}"
        widget.value = start


def test_a_raising_callback_shows_its_traceback_in_the_explorer():
    import ipywidgets as W
    import plotly.graph_objects as go

    pick = W.Dropdown(options=["ok", "bad"], value="ok")

    def render(pick):
        if pick == "bad":
            raise ValueError("no such panel")
        return go.Figure()

    ex = Explorer({"pick": pick}, render)
    assert [o["output_type"] for o in ex.out.outputs] == ["display_data"]
    pick.value = "bad"
    (out,) = ex.out.outputs
    assert out["output_type"] == "error" and out["ename"] == "ValueError"
    assert any("no such panel" in line for line in out["traceback"])
    assert len(ex.errors) == 1 and "no such panel" in ex.errors[0]
    pick.value = "ok"  # recovers: the figure is back
    assert [o["output_type"] for o in ex.out.outputs] == ["display_data"]


def test_an_explorer_broken_at_its_defaults_raises_in_the_cell():
    import ipywidgets as W

    def render(x):
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        Explorer({"x": W.IntSlider(value=1)}, render)


def test_toy_explorer_every_option():
    g = torch.Generator().manual_seed(0)
    real = ToyScoreMLP(dim=2, width=16, depth=1).eval().requires_grad_(False)
    fake_state = {k: v.half() for k, v in real.state_dict().items()}
    snaps = [(0, torch.randn(32, 2, generator=g)), (5, torch.randn(32, 2, generator=g))]
    results = {
        "dm": toy_study.AlignResult("dm", snaps[-1][1], snaps, [(0, fake_state), (5, fake_state)], []),
        "real_fm_input": toy_study.AlignResult("real_fm_input", snaps[-1][1], snaps, [], []),
    }
    ex = toy_study.toy_explorer(results, real, torch.randn(64, 2, generator=g), toy2d.grid(4), draws=2)
    exercise(ex)


def test_latents_explorer_every_option():
    g = torch.Generator().manual_seed(0)
    n, classes = 40, 4
    labels = torch.arange(n) % classes
    sets = {name: latents_stage.PointSet(torch.randn(n, 6, generator=g) + labels[:, None], labels,
                                         torch.arange(n))
            for name in ("reference (ssl)", "DMVAE (λ = 10)", "λ = 0 control")}
    cfg = make_config("latents", "smoke", {"embed.points": n, "embed.tsne_iters": 250, "knn_k": 3})
    images = torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g)
    ex = latents_stage.explorer(sets, {}, cfg, ["circle", "square", "star", "cross"], images)
    exercise(ex)
    exercise(ex, method="umap")  # the neighbours slider matters under UMAP
