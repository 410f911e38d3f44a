"""Speed and memory of ``dst.pp.prepare`` on slide-sized Xenium-like stores, read back lazily as a user's slide is.

Each slide is a 6.5 mm × 6.5 mm zarr store with a DAPI image (1 µm per pixel) and a transcripts points element of
``N`` transcripts over a 5,000-gene panel (plus 20 negative-control codewords) with a Xenium quality column (``qv``),
in parquet partitions of 5 M transcripts. The stores are generated out of core (one partition in memory at a time)
by :func:`build`: cells on the slide, each of one of 8 cell types laid out in spatial domains; a cell type draws its
transcripts from its own Zipf-like distribution over the panel. That is enough tissue-like structure for ``prepare``
(gene selection, tissue, tiles) and costs no more per transcript than a real slide.

``prepare`` (default arguments but the image key: 25 genes at 10 µm from 100 µm, ``qv >= 20``) then runs in a
fresh process per slide, on ``sd.read_zarr(store)``; wall time and peak resident memory of that process are
recorded in ``results/prepare.csv``.

    python benchmarks/bench_prepare.py                    # 10 M, 100 M and 300 M transcripts
    python benchmarks/bench_prepare.py --millions 10      # one size
    python benchmarks/bench_prepare.py --quick            # 1 M and 3 M (CI smoke)

Targets (issue 30, 2 CPU cores): 300 M transcripts in ≤ 4 GiB and ≤ 10 min; peak memory from 10 M to 300 M grows
≤ 1.25×; time at most linearly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CACHE = HERE / ".cache"
SIDE_UM = 6500.0
PANEL = 5000
CONTROLS = 20
PARTITION = 5_000_000
CELL_TYPES = 8
IMAGE_UM = 1.0


def _names() -> list[str]:
    return [f"G{i:04d}" for i in range(PANEL)] + [f"NegControlCodeword_{i:04d}" for i in range(CONTROLS)]


def _cells(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell centres (µm) and cell types: a cell every ~20 µm; types in smooth domains (a few hundred µm)."""
    rng = np.random.default_rng(seed)
    n = int(SIDE_UM**2 / 400)
    x, y = rng.uniform(10, SIDE_UM - 10, n), rng.uniform(10, SIDE_UM - 10, n)
    field = np.stack([np.sin(x / (300 + 40 * t) + t) + np.cos(y / (350 + 30 * t) - t) for t in range(CELL_TYPES)], 1)
    return x, y, np.argmax(field + rng.normal(0, 0.3, field.shape), axis=1)


def _partition(i: int, n: int, seed: int):
    """One partition of ``n`` transcripts (a pandas DataFrame), made from its own seed."""
    import pandas as pd

    cx, cy, ctype = _cells(seed)
    rng = np.random.default_rng([seed, i])
    # each cell type: a Zipf-like profile over its own permutation of the panel; 1 % control codewords
    ranks = 1.0 / np.arange(1, PANEL + 1) ** 1.1
    p = ranks / ranks.sum()
    perms = np.random.default_rng(seed + 1).permuted(np.tile(np.arange(PANEL), (CELL_TYPES, 1)), axis=1)
    cell = rng.integers(0, len(cx), n)
    gene = perms[ctype[cell], rng.choice(PANEL, size=n, p=p)]
    control = rng.random(n) < 0.01
    gene[control] = PANEL + rng.integers(0, CONTROLS, int(control.sum()))
    names = _names()
    return pd.DataFrame({
        "x": (cx[cell] + rng.normal(0, 4, n)).clip(0, SIDE_UM - 1e-3).astype(np.float32),
        "y": (cy[cell] + rng.normal(0, 4, n)).clip(0, SIDE_UM - 1e-3).astype(np.float32),
        "feature_name": pd.Categorical.from_codes(gene.astype(np.int16), categories=names),
        "qv": np.minimum(40, rng.gamma(6, 6, n)).astype(np.float32),
    })  # fmt: skip


def build(store: Path, millions: float, seed: int = 0) -> None:
    """Write the slide to ``store`` out of core: the image, then the points partition by partition."""
    import dask
    import dask.dataframe as dd
    import spatialdata as sd
    from spatialdata.models import Image2DModel, PointsModel
    from spatialdata.transformations import Identity, Scale

    total = int(millions * 1e6)
    sizes = [PARTITION] * (total // PARTITION) + ([total % PARTITION] if total % PARTITION else [])
    meta = _partition(0, 1, seed).iloc[:0]
    frame = dd.from_delayed([dask.delayed(_partition)(i, n, seed) for i, n in enumerate(sizes)], meta=meta,
                            verify_meta=False)  # fmt: skip
    points = PointsModel.parse(frame, coordinates={"x": "x", "y": "y"}, feature_key="feature_name",
                               transformations={"global": Identity()})  # fmt: skip
    cx, cy, _ = _cells(seed)
    npx = int(SIDE_UM / IMAGE_UM)
    dapi = np.full((1, npx, npx), 20, dtype=np.uint8)
    r, c = (cy / IMAGE_UM).astype(int), (cx / IMAGE_UM).astype(int)
    for dr in range(-3, 4):
        for dc in range(-3, 4):
            if dr * dr + dc * dc <= 9:
                dapi[0, np.clip(r + dr, 0, npx - 1), np.clip(c + dc, 0, npx - 1)] = 250
    image = Image2DModel.parse(dapi, dims=("c", "y", "x"), c_coords=["DAPI"], chunks=(1, 2048, 2048),
                               transformations={"global": Scale([IMAGE_UM, IMAGE_UM], axes=("x", "y"))})  # fmt: skip
    with dask.config.set(scheduler="synchronous"):  # one partition in memory at a time
        sd.SpatialData(images={"morphology_focus": image}, points={"transcripts": points}).write(store, overwrite=True)


def run(store: str) -> None:
    """Child process: ``prepare`` the store read back lazily; print JSON with time and memory."""
    import spatialdata as sd
    from _common import measure

    import diffst as dst

    dst.settings.verbosity = 0
    with measure() as m:
        sdata = sd.read_zarr(store)
        dst.pp.prepare(sdata, image_key="morphology_focus")
    attrs = sdata.attrs["diffst"]
    hr = float(np.asarray(sdata[attrs["elements"]["hr"]].values, dtype=np.float64).sum())
    print(json.dumps({**m, "genes": len(attrs["genes"]), "hr_counts": hr, "hr_shape": attrs["grid"]["hr_shape"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 M and 3 M transcripts (smoke run)")
    parser.add_argument("--millions", type=float, nargs="+", default=None, help="slide sizes, millions of transcripts")
    parser.add_argument("--keep", action="store_true", help="keep the generated stores in benchmarks/.cache")
    parser.add_argument("--build", nargs=2, metavar=("MILLIONS", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--run", metavar="STORE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build(Path(args.build[1]), float(args.build[0]))
    if args.run:
        return run(args.run)
    from _common import append, machine

    sizes = args.millions or ([1, 3] if args.quick else [10, 100, 300])
    print(f"machine: {machine()}")
    path = HERE / "results" / f"prepare{'_quick' if args.quick else ''}.csv"
    for millions in sizes:
        store = CACHE / f"prepare_{millions:g}M.zarr"
        if not store.exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--build", str(millions), str(store)], check=True)
            print(f"{millions:g} M transcripts: store written in {time.perf_counter() - t0:.0f} s", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--run", str(store)], check=True, capture_output=True, text=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"prepare {millions:g} M transcripts ({PANEL:,}-gene panel): {r['seconds']:.0f} s, peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB (fresh process, store read lazily)", flush=True)  # fmt: skip
        append(path, [{"transcripts_m": millions, "panel": PANEL, "side_mm": SIDE_UM / 1000, "seconds": r["seconds"],
                       "peak_rss_gib": r["peak_rss_gib"], "genes": r["genes"], "hr_counts": r["hr_counts"]}])  # fmt: skip
        if not args.keep:
            import shutil

            shutil.rmtree(store)


if __name__ == "__main__":
    main()
