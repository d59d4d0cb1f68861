"""Each rule of the workbook is written in one place: these tests read the sources and fail when a rule is
copied somewhere else (issue 24). They also check that the one written place gives the expected answers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmvae_lib.configs import PRESETS, STAGES, make_config
from dmvae_lib.configs.tokenizer import gan_on, gan_start
from dmvae_lib.configs.toy import ALL_OBJECTIVES
from dmvae_lib.core.dmd import OBJECTIVES
from dmvae_lib.runtime.runs import is_finished, read_summary
from dmvae_lib.workflow import arms

ROOT = Path(__file__).resolve().parents[1]
LIB = sorted((ROOT / "dmvae_lib").rglob("*.py"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def _where(pattern: str, files=(*LIB, *NOTEBOOKS)) -> list[str]:
    """'path:line' of every line of `files` matching the regex `pattern` (comments included)."""
    rx = re.compile(pattern)
    return [f"{f.relative_to(ROOT)}:{i}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if rx.search(line)]


def test_the_gan_schedule_is_written_once():
    hits = _where(r"disc_start\s*[<>]|[<>]=?\s*[\w.]*disc_start|disc_weight\s*>\s*0")
    rule = _line("dmvae_lib/configs/tokenizer.py", "return train.disc_start if train.disc_weight > 0")
    assert hits == [f"dmvae_lib/configs/tokenizer.py:{rule}"], f"use configs.tokenizer.gan_on: {hits}"
    for stage in ("tokenizer", "joint"):
        train = make_config(stage, "smoke").train
        assert gan_start(train) == train.disc_start
        assert not gan_on(train, train.disc_start - 1) and gan_on(train, train.disc_start)
        off = make_config(stage, "smoke", {"train.disc_weight": 0.0}).train
        assert gan_start(off) is None and not any(gan_on(off, k) for k in range(0, 10 * train.steps, 7))


def test_finished_means_summary_json_in_one_place(tmp_path):
    hits = _where(r'/\s*"summary\.json"|"summary\.json"\)\.(exists|is_file)')
    assert hits == [], f"use runtime.runs.is_finished / read_summary: {hits}"
    assert not is_finished(tmp_path) and read_summary(tmp_path) == {}
    (tmp_path / "summary.json").write_text('{"psnr": 1.5}')
    assert is_finished(tmp_path) and read_summary(tmp_path) == {"psnr": 1.5}


def test_one_preset_registry():
    assert _where(r"""["']smoke["'],\s*["']cpu["'],\s*["']imagenet256["']""") == \
        ["dmvae_lib/configs/__init__.py:" + str(_line("dmvae_lib/configs/__init__.py", "PRESETS = ("))]
    for stage, (_, presets) in STAGES.items():
        assert tuple(presets) == PRESETS, stage


def _line(rel: str, text: str) -> int:
    return next(i for i, line in enumerate((ROOT / rel).read_text().splitlines(), 1) if text in line)


def test_one_objective_registry():
    assert ALL_OBJECTIVES == tuple(OBJECTIVES)
    assert make_config("toy", "cpu").objectives == ALL_OBJECTIVES


def test_one_arm_registry_and_one_arm_name_format():
    assert _where(r"""\(\s*["']AE["'],\s*["']A["'],\s*["']C0["'],\s*["']C1["']\s*\)""") == \
        [f"dmvae_lib/workflow/arms.py:{_line('dmvae_lib/workflow/arms.py', 'PRIMARY = (')}"]
    fmt = _line("dmvae_lib/workflow/arms.py", 'return f"C1 λ=')
    assert _where(r"λ=\{") == [f"dmvae_lib/workflow/arms.py:{fmt}"]
    assert arms.weighted_c1(3.0) == "C1 λ=3" and arms.slug(arms.weighted_c1(0.5)) == "C1-l0.5"


@pytest.mark.parametrize("path", [p for p in LIB if "torch.manual_seed(" in p.read_text()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_seeded_initialisation_forks_the_global_rng(path):
    """`torch.manual_seed` only inside `torch.random.fork_rng()` (the caller's global RNG is never changed),
    except in `runtime/device.py`'s seed-everything helper, whose job it is."""
    if path.name == "device.py":
        return
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "torch.manual_seed(" in line and not line.lstrip().startswith(("#", '"')):
            above = "\n".join(lines[max(0, i - 2):i])
            where = f"{path.relative_to(ROOT)}:{i + 1}"
            assert "fork_rng" in above, f"{where} seeds the global RNG: {line.strip()}"


def test_no_module_level_channel_between_loop_and_steps():
    loop = (ROOT / "dmvae_lib/train/loop.py").read_text()
    assert "global " not in loop and "nonlocal " not in loop
    assert not re.search(r"^_\w+\s*(:\s*\w+)?\s*=\s*(\[|\{|set\()", loop, re.M)
    rx = re.compile(r"from (?:\.|\.\.train\.|dmvae_lib\.train\.)loop import (.+)")
    imported = {name.strip() for f in LIB for m in rx.finditer(f.read_text())
                for name in m.group(1).split(",")}
    assert imported <= {"train", "NonFiniteError", "to_host"}, imported


STEPS = {"dmvae_lib/stages/joint.py": ("tokenizer_turn", "fake_turn", "joint_step", "refine_step", "dm_term"),
         "dmvae_lib/stages/tokenizer.py": ("tokenizer_stage_step",),
         "dmvae_lib/train/velocity.py": ("velocity_step",),
         "dmvae_lib/stages/toy.py": ("_align_step", "_fit_step"),
         "dmvae_lib/train/ssl.py": ("_ssl_update", "_supervised_update")}
DRIVERS = {"dmvae_lib/stages/joint.py": ("train_joint", "joint_state", "refine_decoder"),
           "dmvae_lib/stages/tokenizer.py": ("train_tokenizer",),
           "dmvae_lib/train/velocity.py": ("fit_velocity_net",),
           "dmvae_lib/stages/toy.py": ("align", "fit_real_net"),
           "dmvae_lib/train/ssl.py": ("_fit", "train_ssl", "train_supervised"),
           "dmvae_lib/train/loop.py": ("train",)}


def _functions(rel: str) -> dict:
    import ast

    tree = ast.parse((ROOT / rel).read_text())
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("rel", sorted(STEPS))
def test_training_steps_are_flat_named_functions_on_one_screen(rel):
    funcs = _functions(rel)
    for name in STEPS[rel]:
        lines = funcs[name].end_lineno - funcs[name].lineno + 1
        assert lines <= 36, f"{rel}::{name} is {lines} lines"


@pytest.mark.parametrize("rel", sorted(DRIVERS))
def test_training_drivers_define_no_closures(rel):
    import ast

    funcs = _functions(rel)
    for name in DRIVERS[rel]:
        inner = [n for n in ast.walk(funcs[name]) if n is not funcs[name]
                 and isinstance(n, (ast.FunctionDef, ast.Lambda, ast.Nonlocal, ast.Global))]
        assert not inner, f"{rel}::{name} defines {[type(n).__name__ for n in inner]}"


MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict"}
MEMO_CACHES = {"dmvae_lib/runtime/weights.py": {"_fetched", "_digests"}}  # written by their module only


def _module_level_containers(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.parse(path.read_text()).body:
        target, value = (node.targets[0], node.value) if isinstance(node, ast.Assign) else (
            (node.target, node.value) if isinstance(node, ast.AnnAssign) else (None, None))
        call = getattr(getattr(value, "func", None), "id", None) or getattr(getattr(value, "func", None),
                                                                            "attr", None)
        if isinstance(target, ast.Name) and (
                isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp))
                or (isinstance(value, ast.Call) and call in MUTABLE_CALLS)):
            names.add(target.id)
    return names


def test_no_module_level_state_written_from_another_module():
    """Module-level containers are registries (UPPER_CASE, never mutated after import) or a private memo cache
    that only its own module writes: no process-wide ledger or channel between modules."""
    mutation = r"\b{n}\s*(\[[^\]]*\]\s*=[^=]|\|=|\.(append|extend|update|add|pop|clear|setdefault|remove)\()"
    for path in LIB:
        rel = str(path.relative_to(ROOT))
        for name in _module_level_containers(path):
            writes = _where(mutation.format(n=re.escape(name)))
            if name in MEMO_CACHES.get(rel, ()):
                assert writes and all(w.startswith(f"{rel}:") for w in writes), (name, writes)
            else:
                assert name.lstrip("_").isupper() and not writes, f"{rel}: {name} is mutable state {writes}"
