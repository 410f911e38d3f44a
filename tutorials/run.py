"""Execute the tutorials and save them with their outputs (figures, tables, logs), as the documentation shows them.

    DIFFST_DATA_DIR=../shared/data python tutorials/run.py            # every notebook
    DIFFST_DATA_DIR=../shared/data python tutorials/run.py visium_he  # one

Each notebook runs in a fresh kernel in a temporary folder (what it writes stays there); the test suite executes them
again (``tests/test_tutorials.py``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).parent


def run(path: Path) -> float:
    """Execute one notebook, write it back with its outputs; returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=None, resources={"metadata": {"path": folder}}
        ).execute()
        seconds = time.perf_counter() - t0
    nbformat.write(nb, path)
    return seconds


if __name__ == "__main__":
    names = sys.argv[1:] or [p.stem for p in sorted(HERE.glob("*.ipynb"))]
    for name in names:
        print(f"{name}: {run(HERE / f'{name}.ipynb'):.0f} s", flush=True)
