"""Execute the tutorial notebooks (``tutorials/*.ipynb``) from top to bottom, as a reader would.

Each notebook runs in a fresh ``python3`` kernel in a temporary working directory, with ``DIFFST_CACHE_DIR`` in that
directory (models trained by the notebook land there) and ``DIFFST_DATA_DIR`` pointing at ``../shared/data`` when it
exists (the Visium tutorial then also runs on the real her2st section; nothing is downloaded). The notebooks are
stored executed, with their outputs (``tutorials/run.py``), as the documentation shows them; the copies executed here
are not kept.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorial tests need nbformat (pip install nbformat)")
nbclient = pytest.importorskip("nbclient", reason="the tutorial tests need nbclient (pip install nbclient ipykernel)")
pytest.importorskip("ipykernel", reason="the tutorial tests need a Jupyter kernel (pip install ipykernel)")

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
SHARED_DATA = REPO.parent / "shared" / "data"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # a guard against a hung kernel, not a time limit on the tutorial


def test_tutorials_are_found_and_stored_executed_with_their_figures():
    names = {nb.name for nb in NOTEBOOKS}
    assert {"xenium_end_to_end.ipynb", "visium_he.ipynb", "downstream_squidpy.ipynb"} <= names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: run it top to bottom (tutorials/run.py)"
        errors = [o for c in code for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: saved with an error"
        drawing = [c for c in code if "dst.pl." in c.source]
        assert drawing and all(any("image/png" in o.get("data", {}) for o in c.outputs) for c in drawing), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from jupyter_client.kernelspec import NoSuchKernel

    monkeypatch.setenv("DIFFST_CACHE_DIR", str(tmp_path / "cache"))
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("DIFFST_DATA_DIR", str(SHARED_DATA))
    else:
        monkeypatch.delenv("DIFFST_DATA_DIR", raising=False)
    # the kernel must import this environment's diffst: put its interpreter first on PATH ("python3" kernelspecs
    # usually start plain "python")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel is installed (pip install ipykernel)")
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s")
