"""Speed and memory of ``dst.pp.prepare`` on a slide-sized synthetic Xenium dataset.

A 6.5 mm × 6.5 mm synthetic Xenium slide with a 300-gene panel (about 10 million transcripts) is prepared
(10 µm HR / 100 µm LR, 400 µm tiles) twice: selecting the default 25 genes, and keeping all 300. Prints wall time
and peak resident memory of the process during ``prepare`` (the input transcripts are already in memory).

    python benchmarks/bench_prepare.py            # full: the slide
    python benchmarks/bench_prepare.py --quick    # 1.5 mm, 50 genes (CI smoke)

Target (issue 2): ≤ 60 s and ≤ 4 GiB on a 2-core machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import append, machine, measure

import diffst as dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small slide for a smoke run")
    args = parser.parse_args()
    size, n_genes = (1500.0, 50) if args.quick else ("slide", 300)
    dst.settings.verbosity = 0
    sdata = dst.datasets.synthetic_xenium(size_um=size, n_genes=n_genes, boundaries=False)
    n_tx = len(sdata["transcripts"])
    panel = sum(
        1
        for g in sdata["transcripts"]["feature_name"].cat.categories
        if not g.startswith(("NegControl", "Unassigned", "BLANK"))
    )
    print(f"machine: {machine()}")
    side = 6500.0 if size == "slide" else size
    print(f"slide: {side:g} µm × {side:g} µm, {n_tx:,} transcripts, {panel} genes in the panel")
    path = Path(__file__).parent / "results" / f"prepare{'_quick' if args.quick else ''}.csv"
    path.unlink(missing_ok=True)
    rows = []
    for genes, key in ((25, "top25"), (n_genes, "all")):
        with measure() as m:
            dst.pp.prepare(sdata, genes=genes, image_key="he_image", key_added=key)
        print(
            f"prepare genes={genes:>3}: {m['seconds']:6.1f} s, peak RSS {m['peak_rss_gib']:.2f} GiB (+{m['peak_increase_gib']:.2f} GiB during prepare)"
        )
        rows.append({"side_um": side, "transcripts": n_tx, "panel": panel, "genes": genes, **m})
    append(path, rows)


if __name__ == "__main__":
    main()
