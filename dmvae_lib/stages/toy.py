"""The 2-D toy study of distribution-matching objectives (paper §3.3, Fig. 3; App. B, Fig. 7).

Orchestration only: fit the real velocity net on a reference sampler by flow matching, then for each
objective initialise a fake net from the real one and move 1,536 free points from U[−1.5, 1.5]² with
alternating updates (points every k steps, fake net every step, on stop-gradient points), all through
`loop.train` so every stage checkpoints and resumes. Measures: sliced-W2 to fresh reference samples
against the sampling noise floor, per-axis spread, and k-NN coverage of the reference.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..configs.toy import ToyConfig, ToyVerdictConfig
from ..core import distances, flow, toy2d
from ..core.dmd import get_objective, update_direction
from ..core.samplers import euler_ode
from ..models.score_nets import ToyScoreMLP
from ..runtime.runs import RunDir
from ..runtime.seeds import stream, stream_seed
from ..train.loop import train
from ..train.phases import flow_matching_step, objective_step
from ..viz import figures as viz
from ..viz.explorer import Explorer


@dataclass
class AlignResult:
    name: str
    points: Tensor  # (n_points, 2), final
    snapshots: list  # [(step, points (n, 2))]
    fake_states: list  # [(step, fake-net state_dict)] at the snapshot steps (objectives that use the fake)
    history: list  # [{"step", "sw2"}] at the snapshot steps
    metrics: dict = field(default_factory=dict)


def reference_sampler(cfg: ToyConfig):
    sampler = toy2d.REFERENCES[cfg.reference]
    return lambda n, g=None: toy2d.draw(sampler, n, g)


def build_net(cfg: ToyConfig) -> ToyScoreMLP:
    return ToyScoreMLP(dim=2, width=cfg.net.width, depth=cfg.net.depth)


def fit_real_net(cfg: ToyConfig, run: Optional[RunDir], device: torch.device, progress: bool = True):
    """Flow-matching fit of the real net on fresh reference samples; returns (net, last stats)."""
    sample = reference_sampler(cfg)
    net = build_net(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.fit.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.fit.lr, total_steps=cfg.fit.steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = functools.partial(_fit_step, cfg, sample, net, opt, sched, gen, device)
    stats = train(step, max_steps=cfg.fit.steps, state={"net": net, "opt": opt, "sched": sched, "gen": gen},
                  run=run, tag="fit", log_every=max(cfg.fit.steps // 20, 1), progress=progress)
    return net.eval().requires_grad_(False), stats


def _fit_step(cfg: ToyConfig, sample, net, opt, sched, gen: torch.Generator, device, k: int) -> dict:
    """One flow-matching step of the real net on a fresh batch of the reference."""
    data = sample(cfg.fit.batch, gen).to(device)
    return flow_matching_step(net, opt, data, gen, scheduler=sched, grad_clip=cfg.fit.grad_clip)


def evaluate_points(points: Tensor, cfg: ToyConfig, repeats: Optional[int] = None) -> dict:
    """SW2 to fresh reference samples, spread, coverage; all against the same reference stream."""
    sample = reference_sampler(cfg)
    ref = sample(points.shape[0], stream(cfg.seed, "toy.reference_eval"))
    sw2 = distances.mean_sliced_w2(points.cpu(), sample, repeats or cfg.eval.repeats, cfg.eval.n_directions,
                                  stream_seed(cfg.seed, "toy.sw2"))
    return {"sw2": sw2, "spread": distances.spread(points),
            "spread_ratio": distances.spread(points) / distances.spread(ref),
            "coverage": distances.coverage(ref, points.cpu(), cfg.eval.coverage_k),
            "nonfinite_points": int((~torch.isfinite(points)).sum())}


def noise_floor(cfg: ToyConfig) -> float:
    """Median SW2 between independent n_points-samples of the reference (what a perfect fit scores)."""
    return distances.noise_floor(reference_sampler(cfg), cfg.align.n_points, cfg.eval.repeats,
                                 cfg.eval.n_directions, stream_seed(cfg.seed, "toy.noise_floor"))


def initial_points(cfg: ToyConfig) -> Tensor:
    return toy2d.uniform_square(cfg.align.n_points, cfg.align.init_half_width,
                                stream(cfg.seed, "toy.init_points"))


def align(name: str, cfg: ToyConfig, real_net: torch.nn.Module, run: Optional[RunDir], device: torch.device,
          progress: bool = True) -> AlignResult:
    """Move the free points with objective `name`; fake
    net trained every step only if the objective uses it."""
    info, a = get_objective(name), cfg.align
    points = torch.nn.Parameter(initial_points(cfg).to(device))
    fake = copy.deepcopy(real_net).requires_grad_(True).train()
    popt = torch.optim.Adam([points], lr=a.points_lr, betas=(0.9, 0.95))
    fopt = torch.optim.AdamW(fake.parameters(), lr=a.fake_lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = stream(cfg.seed, "toy.align")
    res = AlignResult(name, points.detach(), [(0, points.detach().cpu().clone())], [], [])
    if info.uses_fake:
        res.fake_states.append((0, _half(fake.state_dict())))
    res.history.append({"step": 0, "sw2": evaluate_points(points.detach(), cfg, repeats=2)["sw2"]})

    s = _AlignState(cfg, info, points, popt, real_net, fake, fopt, gen, device, res)
    start = time.perf_counter()
    state = {"points": _ParamHolder(points), "popt": popt, "fake": fake, "fopt": fopt, "gen": gen,
             "snapshots": res.snapshots, "fake_states": res.fake_states, "history": res.history}
    train(functools.partial(_align_step, s), max_steps=a.steps, state=state, run=run, tag=f"align/{name}",
          log_every=max(a.steps // 10, 1), hooks=[(a.snapshot_every, functools.partial(_snapshot, s))],
          on_nonfinite="skip", progress=progress)
    seconds = time.perf_counter() - start  # includes the snapshot evaluations (2 SW2 draws each)
    res.points = points.detach().cpu()
    res.metrics = {**evaluate_points(res.points, cfg), "seconds": seconds}
    return res


@dataclass
class _AlignState:
    """What one objective's alignment step reads and changes (`align`)."""

    cfg: ToyConfig
    info: object  # the objective's ObjectiveInfo
    points: torch.nn.Parameter
    popt: torch.optim.Optimizer
    real_net: torch.nn.Module
    fake: torch.nn.Module
    fopt: torch.optim.Optimizer
    gen: torch.Generator
    device: torch.device
    res: AlignResult


def _align_step(s: _AlignState, k: int) -> dict:
    """The points move every `points_every` steps (t in the annealed range); the fake net, when the objective
    uses it, takes a flow-matching step on a random subset of sg(points) every step."""
    a = s.cfg.align
    lo, hi = (flow.annealed_t_range(k, a.anneal_steps, (a.t_min, a.t_max), (a.anneal_t_min, a.t_max))
              if a.anneal_steps else (a.t_min, a.t_max))
    obj = (objective_step(s.points, s.popt, s.info.fn, s.real_net, s.fake, s.gen, t_range=(lo, hi))
           if k % a.points_every == 0 else {})
    fm = {}
    if s.info.uses_fake:
        idx = torch.randperm(a.n_points, generator=s.gen)[: a.fake_batch].to(s.device)
        fm = flow_matching_step(s.fake, s.fopt, s.points.detach()[idx], s.gen, grad_clip=1.0)
    return {**obj, **fm, "nonfinite": obj.get("nonfinite", 0) + fm.get("nonfinite", 0)}


def _snapshot(s: _AlignState, k: int) -> None:
    """The points (and the fake net's weights) at step k, and their SW2 to the reference."""
    s.res.snapshots.append((k, s.points.detach().cpu().clone()))
    if s.info.uses_fake:
        s.res.fake_states.append((k, _half(s.fake.state_dict())))
    s.res.history.append({"step": k, "sw2": evaluate_points(s.points.detach(), s.cfg, repeats=2)["sw2"]})


def fake_net_at(res: AlignResult, step: int, real_net: torch.nn.Module) -> torch.nn.Module:
    """The fake net as it was at snapshot `step` (the real net for objectives that never train it)."""
    if not res.fake_states:
        return real_net
    fake = copy.deepcopy(real_net)
    state = min(res.fake_states, key=lambda s: abs(s[0] - step))[1]
    fake.load_state_dict({k: v.float() for k, v in state.items()})
    return fake.eval().requires_grad_(False)


def direction_fields(name: str, probes: Tensor, real_net, fake_net, ts, draws: int, seed: int = 0) -> Tensor:
    """Update directions of objective `name` at each t in `ts`: (len(ts), P, 2)."""
    gen = torch.Generator().manual_seed(seed)
    fn = get_objective(name).fn
    return torch.stack([update_direction(fn, probes, real_net, fake_net, t, draws, gen) for t in ts])


def classify(metrics: dict, floor: float, dm_coverage: float,
             th: ToyVerdictConfig = ToyVerdictConfig()) -> str:
    """A one-word verdict from the numbers and the preset's thresholds `th` (the config's `verdict`),
    compared with the paper's Fig. 3."""
    if metrics["nonfinite_points"] or not math.isfinite(metrics["sw2"]):
        return "diverged"
    if metrics["spread_ratio"] < th.collapse_spread:
        return "collapsed"
    if metrics["sw2"] <= th.match_ratio * floor:
        return "matched"
    if metrics["spread_ratio"] > th.expand_spread:
        return "expanded"
    if metrics["coverage"] < th.drop_coverage * dm_coverage:
        return "mode-dropping"
    return "not aligned"


def _half(state: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float16).clone() for k, v in state.items()}


class _ParamHolder:
    """Gives a bare Parameter the state_dict/load_state_dict pair the loop expects."""

    def __init__(self, p: torch.nn.Parameter):
        self.p = p

    def state_dict(self) -> Tensor:
        return self.p.detach().clone()

    def load_state_dict(self, value: Tensor) -> None:
        with torch.no_grad():
            self.p.copy_(value)


# What the paper reports for each family (§3.3, Fig. 3), as the verdicts of `classify` that fit its words.
PAPER_VERDICT = {
    "distribution matching": ("matched",),  # "precise distribution alignment"
    "real-score maximisation": ("mode-dropping", "collapsed"),  # "collapses into a few modes"
    "fake-score maximisation": ("collapsed",),  # "contract to a single or a few points"
    "score-difference minimisation": ("not aligned", "expanded", "mode-dropping"),  # "failing to align"
    "loss-difference minimisation": (),  # discussed, not drawn
    "score ascent": (),  # extras of the reference code, not in the paper
}


def results_table(results: dict, floor: float, th: ToyVerdictConfig = ToyVerdictConfig()):
    """One row per objective: the numbers, the measured verdict (thresholds `th`: the config's `verdict`) and
    the paper's, and whether they agree."""
    import pandas as pd

    dm_cov = results["dm"].metrics["coverage"] if "dm" in results else 1.0
    rows = []
    for name, res in results.items():
        info, m = get_objective(name), res.metrics
        verdict, paper = classify(m, floor, dm_cov, th), PAPER_VERDICT[info.family]
        rows.append({"objective": name, "family": info.family, "panel": info.panel, "sw2": m["sw2"],
                     "sw2/floor": m["sw2"] / floor, "spread ratio": m["spread_ratio"],
                     "coverage": m["coverage"], "seconds": m["seconds"], "measured": verdict,
                     "paper": " or ".join(paper) or "—",
                     "agrees": "—" if not paper else ("yes" if verdict in paper else "no")})
    return pd.DataFrame(rows).set_index("objective")


def sample_points(net: torch.nn.Module, cfg: ToyConfig, device: torch.device, steps: int = 100) -> Tensor:
    """n_points Euler-ODE samples of a velocity net, (n, 2) on the CPU."""
    noise = torch.randn(cfg.align.n_points, 2, generator=stream(cfg.seed, "toy.sample_noise")).to(device)
    return euler_ode(net, noise, steps).cpu()


def objectives_table(names):
    """The objectives' registry entries as a table."""
    import pandas as pd

    return pd.DataFrame([{"objective": n, "family": get_objective(n).family,
                          "Fig. 3 panel": get_objective(n).panel,
                          "gradient reaches the points via": get_objective(n).gradient,
                          "trains fake net": get_objective(n).uses_fake,
                          "reference-code name": get_objective(n).reference_name}
                         for n in names]).set_index("objective")


def paper_comparison(table, th: ToyVerdictConfig = ToyVerdictConfig()) -> str:
    """Markdown: where each objective agrees or disagrees with the paper's Fig. 3, with the numbers, after a
    line stating the verdict thresholds `th` (the config's `verdict`)."""
    lines = [f"Verdicts: *matched* = SW2 ≤ {th.match_ratio:g} × floor, *collapsed* = spread < "
             f"{th.collapse_spread:g} × the reference's, *expanded* = spread > {th.expand_spread:g} ×, "
             f"*mode-dropping* = coverage < {th.drop_coverage:g} × DM's.", ""]
    for name, row in table.iterrows():
        nums = (f"SW2 {row['sw2']:.3f} ({row['sw2/floor']:.1f}× floor), spread ×{row['spread ratio']:.2f}, "
                f"coverage {row['coverage']:.2f}")
        if row["agrees"] == "—":
            lines.append(f"- **{name}** ({row['family']}, not in Fig. 3): {row['measured']}: {nums}.")
        elif row["agrees"] == "yes":
            lines.append(f"- **{name}**: {row['measured']}, as the paper reports: {nums}.")
        else:
            lines.append(f"- **{name}**: ⚠ the paper reports *{row['paper']}*, here it is "
                         f"**{row['measured']}**: {nums}.")
    return "\n".join(lines)


def field_agreement(fields: Tensor) -> list[float]:
    """Mean cosine similarity, over probes, between each t's field (T, P, D) and the t-averaged field."""
    mean = fields.mean(0, keepdim=True)
    return torch.nn.functional.cosine_similarity(fields, mean.expand_as(fields), dim=-1).mean(-1).tolist()


def toy_explorer(results: Mapping[str, AlignResult], real_net: torch.nn.Module, reference: torch.Tensor,
                 probes: torch.Tensor, draws: int = 32) -> Explorer:
    """Pick an objective, a timestep and a training step; see the points and the update field there."""
    import ipywidgets as W  # lazy: only notebooks need the widget stack

    names = list(results)
    steps = [s for s, _ in results[names[0]].snapshots]
    controls = {"objective": W.Dropdown(options=names, value=names[0], description="objective"),
                "t": W.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="t (1 = data)"),
                "step": W.SelectionSlider(options=steps, value=steps[min(1, len(steps) - 1)],
                                          description="step")}

    def render(objective: str, t: float, step: int):
        res = results[objective]
        points = dict(res.snapshots)[step]
        fake = fake_net_at(res, step, real_net)
        field = direction_fields(objective, probes, real_net, fake, [t], draws)[0]
        return viz.direction_panels(probes, {f"{objective} · t={t:.2f} · step {step}": field}, reference,
                                    points, size=480)

    return Explorer(controls, render)
