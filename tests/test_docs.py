"""The documentation's numbers come from one source: every table between markers is what benchmarks/tables.py makes
from benchmarks/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_table_of_the_docs_is_made_from_the_results():
    script = ROOT / "benchmarks" / "tables.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_the_readme_and_the_benchmark_page_carry_generated_tables():
    readme = (ROOT / "README.md").read_text()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in ("readme-real", "readme-curve", "readme-speed"):
        assert f"<!-- table: {name} -->" in readme, name
    for name in ("real", "real-levers", "curve", "her2st-loso", "her2st-pooled", "slides"):
        assert f"<!-- table: {name} -->" in page, name
