"""Execute the tutorial notebooks (``tutorials/*.ipynb``) from top to bottom, as a reader would.

Each notebook runs in a fresh ``python3`` kernel in a temporary working directory, with ``DIFFST_CACHE_DIR`` in that
directory (models trained by the notebook land there) and ``DIFFST_DATA_DIR`` pointing at ``../shared/data`` when it
exists (the Visium tutorial then also runs on the real her2st section; nothing is downloaded). The notebooks are
stored without outputs; the executed copies are not kept.
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
CELL_TIMEOUT_S = 300


def test_tutorials_are_found_and_stored_without_outputs():
    names = {nb.name for nb in NOTEBOOKS}
    assert {"xenium_end_to_end.ipynb", "visium_he.ipynb", "downstream_squidpy.ipynb"} <= names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not with_outputs, f"{path.name}: clear the outputs of cells {with_outputs} before committing"


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
