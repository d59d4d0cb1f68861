"""Simultaneous notebook executions do not share kernel sockets (issue 25, case 3).

Each launch is a process of its own (as `run_notebook` launched from a shell loop is); all of them pass a
file barrier before calling `pipeline.execute`, so their kernels start at the same instant. Before the fix
every kernel took the ipc socket names `kernel-ipc-N` (first unused N) in its cwd, the notebook's folder, so
kernels started together bound the same sockets and their clients failed ("Invalid Signature", "Kernel
didn't respond in 60 seconds"), and the socket files were left in the checkout.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from dmvae_lib.workflow.session import REPO_ROOT

LAUNCHES = 4

CHILD = """
import sys, time
from pathlib import Path
from dmvae_lib.workflow import pipeline

nb, out_dir, barrier = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
(barrier / ("ready-" + out_dir.name)).touch()
deadline = time.monotonic() + 120
while not (barrier / "go").exists():  # every launch starts its kernel at the same instant
    if time.monotonic() > deadline:
        sys.exit("barrier: no 'go' within 120 s")
    time.sleep(0.005)
print(pipeline.execute(nb, out_dir, {}))
"""


def _kernel_files(folder: Path) -> set[str]:
    """Kernel connection files and ipc sockets (jupyter_client's, ipykernel's default names) in `folder`."""
    patterns = ("kernel-ipc*", "kernel-*.json", "kernel.json")
    return {p.name for pattern in patterns for p in folder.glob(pattern)} if folder.is_dir() else set()


@pytest.mark.slow
def test_simultaneous_launches_get_private_kernel_sockets(tmp_path):
    nb_dir, barrier = tmp_path / "nb", tmp_path / "barrier"
    nb_dir.mkdir()
    barrier.mkdir()
    nb = nb_dir / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os\nprint('pid', os.getpid())")]), nb)
    # a short private TMPDIR (ipc socket paths must stay under ~107 bytes), to see what kernels leave there
    tmp_root = Path(tempfile.mkdtemp(prefix="k25-", dir="/tmp" if os.path.isdir("/tmp") else None))
    repo_before = {d: _kernel_files(d) for d in (REPO_ROOT, REPO_ROOT / "notebooks", Path.cwd())}
    env = {**os.environ, "TMPDIR": str(tmp_root), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    outs = [tmp_path / "runs" / f"r{i}" for i in range(LAUNCHES)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(nb), str(out), str(barrier)], env=env,
                              cwd=nb_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for out in outs]
    try:
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("ready-*"))) < LAUNCHES:
            assert time.monotonic() < deadline, "launches not ready within 120 s"
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs if p.poll()]
            time.sleep(0.01)
        (barrier / "go").touch()
        results = [(p.wait(timeout=240), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        leftover = sorted(p.name for p in tmp_root.iterdir())
        shutil.rmtree(tmp_root, ignore_errors=True)
    failed = [f"launch {i}: exit {rc}\n{out[-3000:]}" for i, (rc, out) in enumerate(results) if rc]
    assert not failed, "\n\n".join(failed)
    for out in outs:
        cells = json.loads((out / "executed.ipynb").read_text())["cells"]
        assert any("pid" in "".join(o.get("text", "")) for c in cells for o in c.get("outputs", [])), out
    assert sorted(p.name for p in nb_dir.iterdir()) == ["tiny.ipynb"], "kernel files in the notebook's folder"
    assert {d: _kernel_files(d) for d in repo_before} == repo_before, "kernel files in the checkout"
    assert not leftover, f"kernels' private folders not removed: {leftover}"
