"""Transcripts read partition by partition: binned into count rasters without holding the slide's transcripts.

A points element is a dask dataframe (parquet in a zarr store, as ``spatialdata_io.xenium`` writes it, or one
in-memory partition). :class:`Transcripts` never computes it whole: each pass over the slide computes a few
partitions at a time, reduces each to what the pass needs (the extent and counts of the first pass, the non-zero
pixels and their counts when binning), and drops it. Peak memory is therefore set by the partition size and the
rasters, not by the number of transcripts.

The partitions are reduced by ``dask.compute`` on delayed tasks, so with a ``dask.distributed`` ``Client`` active
they run on its workers and only the reductions travel back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
import numpy as np
import pandas as pd

from diffst._spatial import transform_points

#: Partitions computed together per round (memory: that many partitions at once).
PARTITIONS_AT_ONCE = max(1, min(4, os.cpu_count() or 1))
#: Rows of a partition turned into positions and binned at a time (memory: a few arrays of this length).
ROWS_AT_ONCE = 1_000_000


@dataclass(frozen=True)
class _Reader:
    """How one partition becomes µm positions and gene codes (picklable: it travels to dask workers)."""

    feature_key: str
    gene_names: tuple[str, ...]
    matrix: np.ndarray  # intrinsic coordinates → the coordinate system
    um_per_px: float
    min_qv: float | None

    def __call__(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x_um, y_um, gene code)`` of a partition's transcripts that pass the quality filter (code -1: no gene)."""
        if self.min_qv is not None:
            df = df[df["qv"].to_numpy() >= self.min_qv]
        codes = pd.Categorical(df[self.feature_key], categories=self.gene_names).codes.astype(np.int64)
        xc, yc = transform_points(self.matrix, df["x"].to_numpy(dtype=np.float64), df["y"].to_numpy(dtype=np.float64))
        return xc * self.um_per_px, yc * self.um_per_px, codes


@dataclass
class Scan:
    """What the first pass over the transcripts found (totals over every partition)."""

    n: int  # transcripts kept (after the quality filter)
    dropped: int  # transcripts below the quality threshold
    no_gene: int  # kept transcripts whose gene is missing (NaN)
    non_finite: int  # kept transcripts with a NaN or infinite coordinate
    extent_um: tuple[float, float, float, float]


@dataclass
class Transcripts:
    """The transcripts of a points element, read lazily (see the module docstring)."""

    frame: Any  # the points' dask dataframe, the columns that are read
    reader: _Reader

    @classmethod
    def from_points(cls, points: Any, feature_key: str, matrix: np.ndarray, um_per_px: float,
                    min_qv: float | None) -> Transcripts:  # fmt: skip
        """The transcripts of ``points``: columns x, y, the gene and (when filtering) qv.

        The gene names are in the order of the column's categories, or sorted when the column is not categorical
        (one pass over that column).
        """
        filtered = min_qv is not None and "qv" in points.columns
        frame = points[["x", "y", feature_key, *(["qv"] if filtered else [])]]
        genes = frame[feature_key]
        if isinstance(genes.dtype, pd.CategoricalDtype) and genes.cat.known:
            names = [str(c) for c in genes.cat.categories]
        else:
            names = sorted(str(c) for c in genes.dropna().unique().compute())
        reader = _Reader(feature_key, tuple(names), np.asarray(matrix, dtype=np.float64), float(um_per_px),
                         float(min_qv) if filtered else None)  # fmt: skip
        return cls(frame, reader)

    @property
    def gene_names(self) -> list[str]:
        return list(self.reader.gene_names)

    @property
    def filtered(self) -> bool:
        return self.reader.min_qv is not None

    def map_partitions(self, fn: Callable[..., Any]) -> Iterator[Any]:
        """``fn(df)`` of every slice of ``ROWS_AT_ONCE`` rows of every partition.

        Computed a few partitions at a time and yielded as they come: the caller reduces them, so nothing of slide
        size accumulates.
        """
        tasks = [dask.delayed(_apply)(p, fn) for p in self.frame.to_delayed()]
        for i in range(0, len(tasks), PARTITIONS_AT_ONCE):
            for results in dask.compute(*tasks[i : i + PARTITIONS_AT_ONCE]):
                yield from results

    def scan(self) -> Scan:
        """Counts and extent of the kept transcripts, and how many the quality filter drops (one pass)."""
        parts = list(self.map_partitions(partial(_scan, reader=self.reader)))
        boxes = np.array([p["box"] for p in parts if p["box"] is not None]).reshape(-1, 4)
        extent = (
            (float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max()))
            if len(boxes)
            else (0.0, 0.0, 0.0, 0.0)
        )
        return Scan(n=sum(p["n"] for p in parts), dropped=sum(p["dropped"] for p in parts),
                    no_gene=sum(p["no_gene"] for p in parts), non_finite=sum(p["non_finite"] for p in parts),
                    extent_um=extent)  # fmt: skip

    def bin(self, pixel_index: Callable[..., tuple[np.ndarray, np.ndarray]], shape: tuple[int, int],
            remap: np.ndarray | None = None, dtype: Any = np.float64) -> np.ndarray:  # fmt: skip
        """Counts ``(genes, H, W)`` of the transcripts per pixel.

        ``pixel_index(x_um, y_um)`` gives row and column; ``remap`` maps gene codes to output planes (-1: left out;
        default: every gene its own plane).
        """
        n = len(self.reader.gene_names) if remap is None else int(remap.max(initial=-1)) + 1
        out = np.zeros(n * shape[0] * shape[1], dtype=dtype)
        if n == 0:
            return out.reshape(0, *shape)
        fn = partial(_bin_partition, reader=self.reader, pixel_index=pixel_index, shape=shape, remap=remap,
                     size=out.size)  # fmt: skip
        for idx, counts in self.map_partitions(fn):
            out[idx] += counts
        return out.reshape(n, *shape)


def _apply(df: pd.DataFrame, fn: Callable[[pd.DataFrame], Any]) -> list[Any]:
    return [fn(df.iloc[i : i + ROWS_AT_ONCE]) for i in range(0, len(df), ROWS_AT_ONCE)]


def _scan(df: pd.DataFrame, reader: _Reader) -> dict[str, Any]:
    x, y, codes = reader(df)
    dropped = len(df) - len(x)
    finite = np.isfinite(x) & np.isfinite(y)
    box = (x.min(), y.min(), x.max(), y.max()) if finite.all() and len(x) else None
    return {"n": len(x), "dropped": dropped, "no_gene": int((codes < 0).sum()), "non_finite": int((~finite).sum()),
            "box": box}  # fmt: skip


def _bin_partition(df: pd.DataFrame, *, reader: _Reader, pixel_index, shape, remap,
                   size: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The non-zero entries ``(flat index, count)`` of the ``(genes, H, W)`` counts of a slice of a partition."""
    x, y, codes = reader(df)
    h, w = shape
    g = codes if remap is None else remap[codes]
    r, c = pixel_index(x, y)
    ok = (g >= 0) & (r >= 0) & (r < h) & (c >= 0) & (c < w)
    lin = g[ok] * (h * w) + r[ok] * w + c[ok]
    if size <= 8 * max(len(lin), 1):  # a dense raster no larger than a few times the partition: count directly
        counts = np.bincount(lin, minlength=size)
        idx = np.flatnonzero(counts)
        return idx, counts[idx]
    return np.unique(lin, return_counts=True)
