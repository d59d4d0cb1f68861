"""Notebook hygiene: pairing, no committed outputs, the
parameters-cell contract, thin cells, no hard-coded CUDA."""

import ast
import re
from pathlib import Path

import jupytext
import nbformat
import pytest

from dmvae_lib.workflow.pipeline import check_parameters

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
ALLOWED_IMPORTS = {"torch", "numpy", "pandas", "IPython", "dmvae_lib", "math", "json", "pathlib", "time"}


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert SOURCES, "no notebooks/NN_*.py found"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_pair_exists_is_in_sync_and_has_no_outputs(src):
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.exists(), f"{src.name} has no paired .ipynb (run: jupytext --sync {src})"
    py_nb, ipy_nb = jupytext.read(src), nbformat.read(ipynb, as_version=4)
    a = [(c.cell_type, c.source.strip()) for c in py_nb.cells]
    b = [(c.cell_type, c.source.strip()) for c in ipy_nb.cells]
    assert a == b, f"{ipynb.name} is out of sync with {src.name}: run `jupytext --sync {src}`"
    for cell in _code_cells(ipy_nb):
        assert not cell.get("outputs"), f"{ipynb.name} carries outputs"
        assert cell.get("execution_count") is None, f"{ipynb.name} carries execution counts"
    assert ipy_nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_structure(src):
    nb = jupytext.read(src)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "first cell must be an H1 title"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one parameters cell"
    assert _code_cells(nb)[0] is params[0], "the parameters cell must be the first code cell"
    for node in ast.parse(params[0].source).body:
        assert isinstance(node, ast.AnnAssign), \
            f"parameters cell: only annotated assignments, got {ast.dump(node)[:60]}"
        ast.literal_eval(node.value)  # literals only: papermill appends its overrides after this cell
    lines = params[0].source.splitlines()
    assert all("#" in line for line in lines if line.strip()), "every parameter needs a trailing comment"
    for cell in _code_cells(nb):
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for m in mods:
                    assert m.split(".")[0] in ALLOWED_IMPORTS, f"notebooks import only the library: {m}"
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.end_lineno - node.lineno < 10, \
                    f"{node.name}: long definitions belong in dmvae_lib"
        assert len(cell.source.splitlines()) <= 16, f"code cell too long:\n{cell.source[:200]}"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_papermill_sees_documented_parameters_and_rejects_unknown_ones(src):
    import papermill

    ipynb = src.with_suffix(".ipynb")
    params = papermill.inspect_notebook(str(ipynb))
    assert {"preset", "seed", "device", "run_root", "run_name"} <= set(params)
    assert all(p["help"] for p in params.values()), "annotate every parameter with a comment"
    with pytest.raises(SystemExit, match="no parameter"):
        check_parameters(ipynb, {"presett": "cpu"})


def test_no_hard_coded_cuda():
    pattern = re.compile(r"\.cuda\(|device_type=\"cuda\"|device_type='cuda'")
    files = list((ROOT / "dmvae_lib").rglob("*.py")) + SOURCES
    offenders = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, offenders
