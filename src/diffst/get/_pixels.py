"""``dst.get.pixels``: an SR map (or any raster on the prepared HR grid) as a pixel × gene AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._spatial import transform_points
from ..pp._tiles import SPLITS
from ._source import HRSource, resolve

if TYPE_CHECKING:
    from spatialdata import SpatialData


def pixels(
    sdata: SpatialData,
    *,
    key: str = "diffst_sr",
    genes: str | Sequence[str] | None = None,
    tissue_only: bool = True,
    layer_std: bool = True,
    coordinate_system: str | None = None,
    prepared_key: str | None = None,
) -> AnnData:
    """HR pixels of a super-resolved result as observations, ready for scanpy and squidpy.

    ``key`` is an SR result (``dst.tl.super_resolve``, ``dst.tl.upsample`` …) or any image on a prepared HR grid
    (same shape and transformation), such as the prepared HR truth ``"diffst_hr"``, so that SR and truth are read
    alike. Values are read in one slice of the tissue's bounding box: memory is about
    ``genes × (bounding-box pixels + kept pixels) × 4`` bytes (25 genes over a 2000 × 2000 HR grid: 0.8 GB).

    Parameters
    ----------
    sdata
        SpatialData with the SR result and the prepared data it was made from.
    key
        The SR result, or an image on a prepared HR grid (e.g. ``"diffst_hr"``).
    genes
        Genes to read (default: all channels), in this order.
    tissue_only
        Keep only pixels on tissue: the prepared ``labels['{prepared_key}_tissue']`` mask (LR grid) spread over the
        HR pixels of each LR pixel. ``False`` keeps every pixel of the grid.
    layer_std
        Add the per-pixel standard deviation of the SR result as ``layers['std']``, when it has one.
    coordinate_system
        Coordinate system of ``obsm['spatial']`` (default: the prepared one, e.g. ``"global"`` for Xenium).
    prepared_key
        The prepared data (tissue, tiles, grid); by default the SR result's ``prepared_key``, or for an image the
        prepared data that wrote it or whose HR grid it lies on.

    Returns
    -------
    An :class:`~anndata.AnnData` with one observation per HR pixel (row-major order, names ``'{row}_{col}'``):

    - ``X``: values of ``key`` (float32, in its units: ``"counts"`` per HR pixel or ``"log1p"``), var names = genes;
    - ``layers['std']``: the SR standard deviation (same units), when it exists and ``layer_std``;
    - ``obs``: ``row``, ``col`` (HR pixel), ``x_um``, ``y_um`` (pixel centre in the µm frame of the prepared
      coordinate system), ``in_tissue``, ``tile_split`` (split of the prepared tile holding the pixel, or NA);
    - ``obsm['spatial']``: pixel centres in ``coordinate_system`` (the HR grid's transformation applied to
      ``(col + 0.5, row + 0.5)``; Xenium: morphology-image pixels), so they overlay the image and cells;
    - ``uns['diffst']``: ``key``, ``method``, ``prepared_key``, ``units``, ``hr_um``, ``grid``, ``coordinate_system``.

    """
    src = resolve(sdata, key, prepared_key=prepared_key)
    prep = src.prep
    grid = prep.grid
    cs = coordinate_system if coordinate_system is not None else prep.coordinate_system
    affine = src.hr_affine(cs)
    idx, genes = src.gene_index(genes)

    tissue_lr = src.prep.tissue(sdata)
    s = grid.scale
    if tissue_only:
        rows, cols = np.nonzero(np.kron(tissue_lr, np.ones((s, s), dtype=bool)))
    else:
        h, w = grid.hr_shape
        rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    if rows.size:
        window = slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1)
    else:
        window = slice(0, 0), slice(0, 0)
    local = rows - window[0].start, cols - window[1].start
    X = np.ascontiguousarray(src.block(idx, *window)[:, local[0], local[1]].T)
    layers = {}
    if layer_std and src.std is not None:
        layers["std"] = np.ascontiguousarray(src.block(idx, *window, std=True)[:, local[0], local[1]].T)

    x_um, y_um = grid.pixel_centre_um(rows, cols)
    sx, sy = transform_points(affine, cols + 0.5, rows + 0.5)
    obs = pd.DataFrame(
        {
            "row": rows.astype(np.int32),
            "col": cols.astype(np.int32),
            "x_um": x_um,
            "y_um": y_um,
            "in_tissue": tissue_lr[rows // s, cols // s],
            "tile_split": _tile_split(sdata, src, rows // s, cols // s),
        },
        index=pd.Index(np.char.add(np.char.add(rows.astype(str), "_"), cols.astype(str)), dtype=object),
    )
    adata = AnnData(
        X=X,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
        layers=layers,
        obsm={"spatial": np.column_stack([sx, sy])},
    )
    adata.uns["diffst"] = {
        "key": key,
        "method": src.method,
        "prepared_key": prep.key,
        "units": src.units,
        "hr_um": float(grid.hr_um),
        "grid": grid.to_dict(),
        "coordinate_system": cs,
        "tissue_only": bool(tissue_only),
    }
    return adata


def _tile_split(sdata: SpatialData, src: HRSource, lr_rows: np.ndarray, lr_cols: np.ndarray) -> pd.Categorical:
    """Split of the prepared tile holding each LR pixel (NA outside tiles)."""
    tiles = src.prep.tiles(sdata)
    values = tiles["split"].astype(str).to_numpy()
    splits = pd.Categorical(values, categories=list(SPLITS) + sorted(set(values) - set(SPLITS)))
    codes = np.full(src.prep.grid.lr_shape, -1, dtype=np.int8)
    t = src.prep.tile_lr
    for r0, c0, code in zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), splits.codes, strict=True):
        codes[r0 : r0 + t, c0 : c0 + t] = code
    return pd.Categorical.from_codes(codes[lr_rows, lr_cols], categories=splits.categories)
