"""her2st held-out spots pooled over the six sections (bench_visium.py saves them): light, no diffst import, so
that ``tables.py`` makes the pooled table without loading torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
SPOTS = Path(__file__).parent / "results" / "her2st_spots"


def pooled_scores(maps_by_section: list[dict], rng: np.random.Generator, n_boot: int = 2000) -> pd.DataFrame:
    """Each method's PCC over the spots of all sections pooled, and its difference to nearest-spot with a 95 % interval.

    Spots stay in their own section's model units; PCC per gene over the pooled spots, averaged over genes. The
    interval resamples spots with replacement within each section (``n_boot`` times).
    """
    methods = [k for k in maps_by_section[0] if k != "truth" and all(k in m for m in maps_by_section)]

    def score(idx: list[np.ndarray]) -> dict[str, float]:
        truth = np.concatenate([m["truth"][:, i] for m, i in zip(maps_by_section, idx, strict=True)], axis=1)
        out = {}
        for k in methods:
            pred = np.concatenate([m[k][:, i] for m, i in zip(maps_by_section, idx, strict=True)], axis=1)
            out[k] = float(np.nanmean(_row_pearson(pred, truth)))
        return out

    full = [np.arange(m["truth"].shape[1]) for m in maps_by_section]
    base = score(full)
    boots = [score([rng.integers(0, len(f), len(f)) for f in full]) for _ in range(n_boot)]
    rows = []
    for k in methods:
        diff = np.array([b[k] - b["nearest"] for b in boots])
        rows.append({"method": k, "pcc": base[k], "minus_nearest": base[k] - base["nearest"],
                     "ci_low": float(np.quantile(diff, 0.025)), "ci_high": float(np.quantile(diff, 0.975))})  # fmt: skip
    return pd.DataFrame(rows).set_index("method")


def _row_pearson(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """:func:`diffst.metrics.pearson` of each row (gene) of two ``(G, N)`` arrays at once (NaN where undefined)."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if p.shape[1] < 2:
        return np.full(p.shape[0], np.nan)
    dp, dt = p - p.mean(axis=1, keepdims=True), t - t.mean(axis=1, keepdims=True)
    sp, st = np.sqrt((dp * dp).sum(axis=1)), np.sqrt((dt * dt).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip((dp * dt).sum(axis=1) / (sp * st), -1.0, 1.0)
    return np.where((sp == 0) | (st == 0), np.nan, r)


NAMES = {"mean": "Diff-ST (spots only)", "guarded": "Diff-ST (guarded)", "bicubic": "bicubic of spots",
         "nearest": "nearest spot", "floor": "image floor", "tesla": "TESLA"}  # fmt: skip


def pooled(prefix: str, scope: str, seeds: list[int]) -> pd.DataFrame | None:
    """:func:`pooled_scores` per seed over the six sections (``results/her2st_spots``), then the mean over seeds."""
    per_seed = []
    for seed in seeds:
        files = [SPOTS / f"{prefix}_{section}_{seed}_{scope}.npz" for section in SECTIONS]
        if not all(f.exists() for f in files):
            continue
        maps = [dict(np.load(f)) for f in files]
        table = pooled_scores(maps, np.random.default_rng(seed))
        per_seed.append(table.assign(seed=seed, spots=sum(m["truth"].shape[1] for m in maps)))
    if not per_seed:
        return None
    df = pd.concat(per_seed).reset_index()
    df["method"] = df["method"].map(NAMES)
    return df
