"""The package tree is the architecture: each layer imports only the layers below it, no stage imports another
stage, and the library imports its own modules at the top of a file (in-function imports only for optional or
heavy third-party packages)."""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "dmvae_lib"
# lowest first; a package may import only packages before it in this list
LAYERS = ["core", "runtime", "models", "configs", "data", "metrics", "train", "viz", "stages", "workflow",
          "(top)"]


def _imports():
    """(file, its package, the package it imports, line, at top level?) for every relative import."""
    for f in sorted(LIB.rglob("*.py")):
        parts = f.relative_to(LIB).with_suffix("").parts
        pkg = parts[0] if len(parts) > 1 else "(top)"
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(parts[:-1])[: len(parts) - 1 - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [node.names[0].name])
                yield f, pkg, target, node.lineno, node.col_offset == 0


def test_every_package_is_a_known_layer():
    found = {p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert found == set(LAYERS) - {"(top)"}, f"packages {found} vs layers {LAYERS}"


def test_imports_flow_down_the_layers_only():
    bad = [f"{f.relative_to(LIB)}:{line} ({pkg} imports {'.'.join(target)})"
           for f, pkg, target, line, _ in _imports()
           if target and target[0] != pkg and LAYERS.index(target[0]) > LAYERS.index(pkg)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_stage_imports_another_stage():
    bad = [f"{f.relative_to(LIB)}:{line}" for f, pkg, target, line, _ in _imports()
           if pkg == "stages" and target[:1] == ["stages"]]
    assert not bad, bad


def test_own_modules_are_imported_at_the_top_of_a_file():
    bad = [f"{f.relative_to(LIB)}:{line}" for f, _, _, line, top in _imports() if not top]
    assert not bad, "in-function imports of the library's own modules: " + ", ".join(bad)


@pytest.mark.parametrize("layer", [x for x in LAYERS if x != "(top)"])
def test_each_package_says_what_it_is(layer):
    doc = ast.get_docstring(ast.parse((LIB / layer / "__init__.py").read_text()))
    assert doc and len(doc) > 20, f"dmvae_lib/{layer}/__init__.py needs a one-line description"


def _own_module_aliases():
    """(file, line, module, alias) for every `from <our package> import <module> as <alias>`."""
    root = LIB.parent
    files = [*LIB.rglob("*.py"), *(root / "notebooks").glob("*.py"), *(root / "tests").glob("*.py"),
             *(root / "benchmarks").glob("*.py"), *(root / "scripts").glob("*.py")]
    for f in sorted(files):
        for node in ast.walk(ast.parse(f.read_text())):
            own = isinstance(node, ast.ImportFrom) and (node.level
                                                         or (node.module or "").startswith("dmvae_lib"))
            for a in node.names if own else ():
                if a.asname:
                    yield f.relative_to(root), node.lineno, a.name, a.asname


def test_own_modules_keep_readable_names():
    """An alias of one of our modules says what it is (`joint_stage`, `viz`), never `js` or `ev`."""
    bad = [f"{f}:{line} ({name} as {alias})" for f, line, name, alias in _own_module_aliases()
           if alias != "viz" and not set(alias.split("_")) & set(name.split("_"))]
    assert not bad, "cryptic aliases: " + ", ".join(bad)
