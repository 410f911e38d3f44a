"""``dst.tl.evaluate``: score any SR result (Diff-ST or a baseline) on the held-out tiles, per gene."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import metrics
from .._contract import Prepared, check_same_grid, read_sr, read_window
from .._degradation import BinDegradation, SpotDegradation, degradation_for
from .._genes import resolve_genes
from .._grid import Grid
from .._normalise import to_model_units
from .._spatial import channel_names, image_levels, suggest

if TYPE_CHECKING:
    from pathlib import Path

    from spatialdata import SpatialData

    from ._model import DiffST

#: Columns of the table ``evaluate`` returns when there is a truth (the strict metrics first).
METRICS = ("pcc", "rmse", "ssim", "lr_consistency", "paper_pcc", "paper_rmse")


def evaluate(
    sdata: SpatialData,
    *,
    key: str = "diffst_sr",
    truth_key: str | None = None,
    split: str = "test",
    genes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Score a super-resolved result against the HR truth and the observed LR counts, on held-out tiles.

    Every SR result (``dst.tl.super_resolve``, ``dst.tl.upsample`` …) is scored the same way, so methods can be set
    side by side. Only the tiles of ``split`` count, each scored as a whole (tiles hold at least the prepared
    ``min_tissue`` share of tissue).

    Strict metrics (the headline), per tile and gene on the normalised scale ``x = 2·log1p(counts)/s_g − 1`` with
    the prepared per-gene ``hr_scale`` ``s_g`` (see :mod:`diffst.metrics`), then averaged over tiles per gene:

    - ``pcc``: signed Pearson r; tiles whose truth is constant are skipped, a constant prediction on a varying truth
      counts as r = 0 (``n_tiles_pcc`` says how many tiles count);
    - ``rmse``: root mean squared error;
    - ``ssim``: structural similarity, data range 2, window ``min(7, tile side)`` (:func:`diffst.metrics.ssim`);
    - ``lr_consistency``: ``Σ|D(SR) − LR| / Σ LR`` in counts over the observed LR pixels of all the split's tiles
      together, with ``D`` the data's degradation operator (for spots, each tile's spots whose centres it holds).

    Paper-compatible metrics (``paper_pcc``, ``paper_rmse``: per tile min-max scaling, ``|r|``, nonzero truth only;
    :func:`diffst.metrics.paper_pcc`) are averaged over the tiles where they are defined. They flatter every
    method; report them only beside the paper's Table 1.

    When the data have no HR truth (spot data such as Visium) and no ``truth_key`` is given, only
    ``lr_consistency`` is computed: the other columns are left out.

    Parameters
    ----------
    sdata
        SpatialData with a prepared key (``dst.pp.prepare``) and an SR result written on its HR grid.
    key
        The SR result: ``sdata.images[key]`` with ``sdata.attrs[key]`` (its ``prepared_key`` names the prepared data).
    truth_key
        An image on the same HR grid (same shape and transformation) with counts per HR pixel and the genes as
        channels, to use as truth instead of the prepared HR counts ``images['{prepared_key}_hr']``.
    split
        Which tiles to score: ``"test"`` (default), ``"val"`` or ``"train"``.
    genes
        Genes to score (default: all genes of the SR result), in the order given.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by ``gene``: one row per gene in the order of ``genes`` (or of the SR
    result), then a ``"mean"`` row with the mean over genes (NaN genes ignored; its ``n_tiles`` is the split's
    tile count, its ``n_tiles_pcc`` the smallest over genes). Columns: ``pcc, rmse, ssim, lr_consistency,
    paper_pcc, paper_rmse, n_tiles, n_tiles_pcc, method`` (only ``lr_consistency, n_tiles, method`` without truth). ``df.attrs`` holds ``key``, ``method``, ``split``,
    ``prepared_key``, ``truth`` (element name or ``None``) and ``scale`` (``"normalised"``).

    """
    record, sr_element, _ = read_sr(sdata, key)
    prep = Prepared.from_sdata(sdata, record.prepared_key)
    grid = prep.grid
    sr = image_levels(sr_element)[0]
    check_same_grid(sr, f"The SR result {key!r}", prep, grid=record.grid)
    sr_genes = channel_names(sr)
    genes = _check_genes(genes, sr_genes, prep, key)
    units = record.units
    if units not in ("counts", "log1p"):
        msg = f"SR result {key!r} has units {units!r}; `evaluate` reads 'counts' or 'log1p'."
        raise ValueError(msg)

    truth_name = truth_key if truth_key is not None else prep.elements.get("hr")
    truth = None
    truth_idx: list[int] | None = None
    if truth_name is not None:
        if truth_name not in sdata.images:
            msg = f"`truth_key` {truth_name!r} is not an image of this SpatialData." + suggest(
                truth_name, sdata.images.keys()
            )
            raise KeyError(msg)
        truth = image_levels(sdata.images[truth_name])[0]
        check_same_grid(truth, f"The truth {truth_name!r}", prep)
        truth_genes = channel_names(truth)
        missing = [g for g in genes if g not in truth_genes]
        if missing:
            msg = f"The truth {truth_name!r} has no channel for genes {missing}; evaluate fewer `genes`."
            raise ValueError(msg)
        truth_idx = [truth_genes.index(g) for g in genes]

    tiles = _split_tiles(sdata, prep, split)
    prep_idx = [prep.genes.index(g) for g in genes]
    sr_idx = [sr_genes.index(g) for g in genes]
    scale_g = prep.hr_scale if prep.hr_scale is not None else prep.lr_scale
    scale_g = np.asarray(scale_g, dtype=np.float32)[prep_idx]
    lr_all = sdata[prep.elements["lr"]].data
    operator = degradation_for(sdata, prep)
    t, s = prep.tile_lr, grid.scale
    n_genes = len(genes)

    per_tile: dict[str, list[np.ndarray]] = {m: [] for m in METRICS if m != "lr_consistency"}
    err_sum = np.zeros(n_genes)
    lr_sum = np.zeros(n_genes)
    for r0, c0 in zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True):
        rows, cols = (r0 * s, (r0 + t) * s), (c0 * s, (c0 + t) * s)
        sr_counts = _to_counts(read_window(sr.data, rows, cols, channels=sr_idx, dtype=np.float64), units)
        lr_tile = np.asarray(lr_all[prep_idx, r0 : r0 + t, c0 : c0 + t], dtype=np.float64)
        observed = prep.coverage[r0 : r0 + t, c0 : c0 + t]
        degraded = _degrade_tile(operator, sr.data, sr_idx, units, sr_counts, r0, c0, t, grid)
        e, total = metrics._consistency_terms_degraded(degraded, lr_tile, observed)
        err_sum += e
        lr_sum += total
        if truth is None:
            continue
        pred = to_model_units(sr_counts, scale_g)
        true = to_model_units(read_window(truth.data, rows, cols, channels=truth_idx, dtype=np.float64), scale_g)
        scores = {m: np.empty(n_genes) for m in per_tile}
        for gi in range(n_genes):
            p, q = pred[gi], true[gi]
            r = metrics.pearson(p, q)
            if not np.isfinite(r) and np.ptp(q) > 0:
                r = 0.0  # constant prediction on a varying truth: no correlation, not a skipped tile
            scores["pcc"][gi] = r
            scores["rmse"][gi] = metrics.rmse(p, q)
            scores["ssim"][gi] = metrics.ssim(p, q, data_range=2.0)
            scores["paper_pcc"][gi] = metrics.paper_pcc(p, q)
            scores["paper_rmse"][gi] = metrics.paper_rmse(p, q)
        for m, v in scores.items():
            per_tile[m].append(v)

    n_tiles = len(tiles)
    columns: dict[str, Any] = {}
    if truth is not None:
        stacked = {m: np.stack(v) for m, v in per_tile.items()}
        for m in METRICS:
            columns[m] = metrics._ratio(err_sum, lr_sum) if m == "lr_consistency" else _nanmean(stacked[m], axis=0)
        columns["n_tiles"] = np.full(n_genes, n_tiles)
        columns["n_tiles_pcc"] = np.isfinite(stacked["pcc"]).sum(axis=0)
    else:
        columns["lr_consistency"] = metrics._ratio(err_sum, lr_sum)
        columns["n_tiles"] = np.full(n_genes, n_tiles)
    df = pd.DataFrame(columns, index=pd.Index(list(genes), name="gene"))
    mean_row = {c: (_nanmean(df[c].to_numpy(dtype=float)) if not c.startswith("n_tiles") else n_tiles) for c in df}
    if "n_tiles_pcc" in df:
        mean_row["n_tiles_pcc"] = int(df["n_tiles_pcc"].min()) if n_genes else 0
    df.loc["mean"] = mean_row
    for c in df:
        if c.startswith("n_tiles"):
            df[c] = df[c].astype(int)
    method = record.method
    df["method"] = method
    df.attrs = {
        "key": key,
        "method": method,
        "split": split,
        "prepared_key": prep.key,
        "truth": truth_name,
        "scale": "normalised",
    }
    return df


def _nanmean(x: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are NaN, as they should be
        return np.nanmean(x, axis=axis)


def _to_counts(x: np.ndarray, units: str) -> np.ndarray:
    if units == "log1p":
        return np.clip(np.expm1(x), 0.0, None)
    return np.clip(x, 0.0, None)


def _degrade_tile(
    operator: BinDegradation | SpotDegradation,
    data: Any,
    idx: list[int],
    units: str,
    sr_counts: np.ndarray,
    r0: int,
    c0: int,
    t: int,
    grid: Grid,
) -> np.ndarray:
    """LR counts ``(genes, t, t)`` the operator makes of the SR map for the tile's LR pixels.

    Sum-pooling stays inside the tile. A spot may reach past its LR pixel, so spots are degraded on a sub-grid with
    a margin around the tile, using only the spots whose centres lie in the tile (those the tile's LR pixels hold).
    """
    if isinstance(operator, BinDegradation):
        return np.asarray(operator.degrade(sr_counts), dtype=np.float64)
    s = grid.scale
    m = max(1, math.ceil(operator.diameter_um / 2.0 / grid.lr_um))
    op, inside = operator.window(r0, c0, r0 + t, c0 + t, margin=m)
    if not len(inside):
        return np.zeros(sr_counts.shape[:1] + (t, t))
    rows, cols = ((r0 - m) * s, (r0 + t + m) * s), ((c0 - m) * s, (c0 + t + m) * s)
    padded = _to_counts(read_window(data, rows, cols, channels=idx, dtype=np.float64), units)
    return np.asarray(op.degrade(padded), dtype=np.float64)[:, m : m + t, m : m + t]


def _check_genes(genes: Sequence[str] | None, sr_genes: list[str], prep: Prepared, key: str) -> list[str]:
    outside = [g for g in sr_genes if g not in prep.genes]
    if genes is None:
        if outside:
            msg = f"SR result {key!r} has genes {outside} that the prepared data {prep.key!r} do not; pass `genes`."
            raise ValueError(msg)
        return list(sr_genes)
    genes = resolve_genes(
        genes,
        sr_genes,
        empty="or None for all genes of the SR result",
        unknown=lambda missing: f"Genes {missing} are not in the SR result {key!r} (it has {sr_genes}).",
    )
    bad = [g for g in genes if g not in prep.genes]
    if bad:
        msg = f"Genes {bad} are not among the prepared genes of {prep.key!r}; they cannot be scored."
        raise ValueError(msg)
    return genes


def _split_tiles(sdata: SpatialData, prep: Prepared, split: str) -> pd.DataFrame:
    all_tiles = prep.tiles(sdata)
    known = [str(v) for v in pd.unique(all_tiles["split"].astype(str))]
    if split not in ("train", "val", "test") and split not in known:
        msg = f"Unknown split {split!r}; the tiles of {prep.key!r} have splits {sorted(known)}."
        raise ValueError(msg)
    tiles = prep.tiles(sdata, split)
    if len(tiles) == 0:
        counts = all_tiles["split"].astype(str).value_counts().to_dict()
        msg = (
            f"No {split!r} tiles in {prep.elements['tiles']!r} (tiles per split: {counts}). Evaluate another `split`, "
            "or prepare with smaller `tile_um` / `split_block_um` so that every split gets tiles."
        )
        raise ValueError(msg)
    return tiles


def evaluate_spots(
    sdata: SpatialData,
    *,
    model: DiffST | str | Path | None = None,
    prepared_key: str = "diffst",
    split: str = "test",
    seed: int = 0,
) -> pd.DataFrame:
    """Score held-out spots: each spot of ``split``'s tiles predicted while hidden, against its measured counts.

    The check of a model trained from a spot slide alone (``dst.tl.train`` with ``supervision="lr"``), where there is
    no HR truth: the spots of the test tiles were never trained on. Each is hidden from the input and predicted from
    the image and the other spots (the test tiles' spots are split in two random halves, each predicted from the
    other, as ``super_resolve`` predicts a model trained this way); the map is degraded through the slide's spot
    discs and compared with what the spot measured. The baselines go through the same protocol on the same spots:
    bicubic and nearest up-sampling of the visible spots, and the image floor.

    Parameters
    ----------
    sdata
        The prepared spot SpatialData.
    model
        A :class:`~diffst.DiffST` or the path of a saved one; default the model trained for ``prepared_key``
        (``sdata.attrs[prepared_key]['model']``).
    prepared_key
        The key of the prepared data (``key_added`` of :func:`diffst.pp.prepare`).
    split
        ``"test"`` (default) or ``"val"`` (what the guard used).
    seed
        Seed of the random halves.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by ``gene`` (then a ``"mean"`` row) with columns ``pcc`` and ``rmse`` per
    method (a column MultiIndex ``(method, metric)``, methods ``diffst``, ``bicubic``, ``nearest``, ``image_floor``),
    on the normalised scale of the model, over the spots; ``df.attrs["spots"]`` is their number.

    """
    from ._guard import heldout_spots
    from ._super_resolve import _resolve_model

    if split not in ("test", "val", "train"):
        msg = f"`split` must be 'test', 'val' or 'train'; got {split!r}."
        raise ValueError(msg)
    prep = Prepared.from_sdata(sdata, prepared_key)
    if model is None and prep.record.model is None:
        msg = f"No model was trained for {prepared_key!r}: pass `model=` or run `dst.tl.train(sdata, prepared_key={prepared_key!r})` first."
        raise ValueError(msg)
    model = _resolve_model(sdata, model, prepared_key)
    model.check_compatible(prep, genes=list(model.genes))
    maps = heldout_spots(sdata, prep, model, split=split, seed=seed)
    if maps is None or maps["truth"].shape[1] < 3:
        msg = f"The {split!r} tiles hold fewer than 3 whole spots: nothing to score. Prepare a larger `split` share."
        raise ValueError(msg)
    columns = {}
    for method, name in (("diffst", "mean"), ("bicubic", "bicubic"), ("nearest", "nearest"), ("image_floor", "floor")):
        columns[(method, "pcc")] = [metrics.pearson(p, t) for p, t in zip(maps[name], maps["truth"], strict=True)]
        columns[(method, "rmse")] = [metrics.rmse(p, t) for p, t in zip(maps[name], maps["truth"], strict=True)]
    df = pd.DataFrame(columns, index=pd.Index(list(model.genes), name="gene"))
    df.columns = pd.MultiIndex.from_tuples(df.columns, names=["method", "metric"])
    df.loc["mean"] = df.mean(axis=0, skipna=True)
    df.attrs.update(
        {"spots": int(maps["truth"].shape[1]), "split": split, "prepared_key": prepared_key, "scale": "normalised"}
    )
    return df
