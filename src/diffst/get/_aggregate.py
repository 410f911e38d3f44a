"""``dst.get.aggregate``: an SR map summed or averaged over cells (shapes or labels) into a cell × gene table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
import shapely
from anndata import AnnData
from spatialdata.models import TableModel

from .. import _logging as log
from .._spatial import affine_to_cs, element_cs, image_levels, pick_key, suggest, transform_points
from .._store import ElementWriter
from ._source import HRSource, resolve

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData

_WINDOW = 512  # HR pixels per side of the windows cells are matched in (bounds memory on large slides)


def aggregate(
    sdata: SpatialData,
    *,
    key: str = "diffst_sr",
    shapes_key: str | None = None,
    labels_key: str | None = None,
    genes: str | Sequence[str] | None = None,
    how: Literal["sum", "mean"] = "sum",
    coordinate_system: str | None = None,
    prepared_key: str | None = None,
    table_key_added: str | None = None,
    overwrite: bool = False,
) -> AnnData:
    """Aggregate a super-resolved map over cells: a cell × gene table of SR expression.

    Each HR pixel goes to the cell that contains its centre: a polygon (a point on the boundary counts), a circle
    (``Point`` geometry with a ``radius`` column, centre within ``radius``) or a label. Cells are mapped through
    their own transformation to ``coordinate_system``, so shapes in µm with ``Scale(1 / pixel_size)`` (Xenium) or
    labels at any resolution match the SR grid. A pixel inside several overlapping cells goes to the one whose
    centroid is nearest. Cells smaller than an HR pixel may hold no pixel centre at all (``n_pixels`` 0): aggregate
    at an HR pixel size well below the cell size for per-cell values.

    Values are aggregated as counts: a ``"log1p"`` SR map is turned back into counts (``expm1``) first, so
    ``how="sum"`` gives each cell's expected counts, comparable with its measured counts.

    Parameters
    ----------
    sdata
        SpatialData with the SR result and the cells.
    key
        The SR result, or an image on a prepared HR grid (e.g. the truth ``"diffst_hr"``), as in
        :func:`diffst.get.pixels`.
    shapes_key
        Cell polygons or circles (e.g. Xenium ``"cell_boundaries"`` or ``"cell_circles"``). Give this or
        ``labels_key``.
    labels_key
        A cell segmentation (integer labels, 0 = background); read at each HR pixel centre.
    genes
        Genes to aggregate (default: all channels of ``key``).
    how
        ``"sum"`` (counts per cell) or ``"mean"`` (mean counts per HR pixel of the cell; NaN for cells with no pixel).
    coordinate_system
        Coordinate system in which the cells and the SR map are matched (default: the prepared one).
    prepared_key
        The prepared data of ``key`` (see :func:`diffst.get.pixels`).
    table_key_added
        Also add the table to ``sdata.tables[table_key_added]``, annotating the shapes or labels element.
    overwrite
        Replace an existing table under ``table_key_added``.

    Returns
    -------
    An :class:`~anndata.AnnData` of cells × genes (float32); with ``table_key_added`` also written to
    ``sdata.tables[table_key_added]`` (and its zarr store when backed). For shapes: every cell, named and ordered as
    the shapes' index; for labels: every label that holds at least one HR pixel centre, in increasing order.

    - ``obs``: ``region`` (the element), ``cell_id`` (shapes index or label), ``n_pixels`` (HR pixels assigned);
    - ``obsm['spatial']``: cell centroids in ``coordinate_system`` (shapes: of the geometry; labels: of the
      assigned pixel centres);
    - ``uns['diffst']``: ``key``, ``method``, ``prepared_key``, ``units`` (``"counts"``), ``how``, ``element``,
      ``hr_um``, ``grid``, ``coordinate_system``.

    """
    if how not in ("sum", "mean"):
        msg = f"`how` must be 'sum' or 'mean'; got {how!r}."
        raise ValueError(msg)
    if (shapes_key is None) == (labels_key is None):
        msg = (
            "Give exactly one of `shapes_key` (cell polygons or circles) and `labels_key` (a segmentation); "
            f"this SpatialData has shapes {list(sdata.shapes)} and labels {list(sdata.labels)}."
        )
        raise ValueError(msg)
    if table_key_added is not None:
        ElementWriter(sdata, overwrite=overwrite).check_free([table_key_added])
    src = resolve(sdata, key, prepared_key=prepared_key)
    cs = coordinate_system if coordinate_system is not None else src.prep.coordinate_system
    hr_affine = src.hr_affine(cs)
    idx, genes = src.gene_index(genes)

    if shapes_key is not None:
        element = pick_key("shapes", shapes_key, list(sdata.shapes), "shapes_key")
        cells: _Cells = _ShapeCells(
            sdata.shapes[element], _element_affine(sdata.shapes[element], element, cs), hr_affine
        )
    else:
        element = pick_key("labels", labels_key, list(sdata.labels), "labels_key")
        level0 = image_levels(sdata.labels[element])[0]
        cells = _LabelCells(level0, _element_affine(level0, element, cs), hr_affine)

    h, w = src.prep.grid.hr_shape
    parts = [_aggregate_window(src, idx, cells, window) for window in _windows(cells.hr_bbox(h, w))]
    parts = [p for p in parts if p is not None]
    ids, sums, n_pixels, centre_sums = _combine(parts, len(idx))
    table_ids, centroids = cells.finish(ids, n_pixels, centre_sums)
    pos = pd.Index(ids).get_indexer(table_ids)
    found = pos >= 0
    X = np.zeros((len(table_ids), len(idx)), dtype=np.float64)
    n = np.zeros(len(table_ids), dtype=np.int64)
    X[found] = sums[pos[found]]
    n[found] = n_pixels[pos[found]]
    if how == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            X = X / n[:, None]
    empty = int((n == 0).sum())
    if empty and shapes_key is not None:
        log.info(
            f"{empty} of {len(n)} cells hold no HR pixel centre ({src.prep.grid.hr_um:g} µm pixels); "
            f"they get {'0' if how == 'sum' else 'NaN'}"
        )

    instance = cells.instance_ids(table_ids)
    obs = pd.DataFrame(
        {
            "region": pd.Categorical([element] * len(table_ids)),
            "cell_id": instance,
            "n_pixels": n,
        },
        index=pd.Index([str(v) for v in instance], dtype=object),
    )
    adata = AnnData(
        X=X.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
        obsm={"spatial": centroids},
    )
    grid = src.prep.grid
    adata.uns["diffst"] = {
        "key": key,
        "method": src.method,
        "prepared_key": src.prep.key,
        "units": "counts" if src.units in ("counts", "log1p") else src.units,
        "how": how,
        "element": element,
        "hr_um": float(grid.hr_um),
        "grid": grid.to_dict(),
        "coordinate_system": cs,
    }
    if table_key_added is not None:
        table = TableModel.parse(adata.copy(), region=element, region_key="region", instance_key="cell_id")
        ElementWriter(sdata, overwrite=overwrite).commit({table_key_added: ("tables", table)}, attrs={})
        log.info(f"{len(adata)} cells × {len(genes)} genes ({how}) → sdata.tables[{table_key_added!r}]")
    return adata


def _element_affine(element: Any, name: str, cs: str) -> np.ndarray:
    available = element_cs(element)
    if cs not in available:
        msg = (
            f"{name!r} has no transformation to coordinate system {cs!r} (it has {available}); the cells must share "
            f"it with the SR map.{suggest(cs, available)}"
        )
        raise ValueError(msg)
    m = affine_to_cs(element, cs)
    if abs(np.linalg.det(m[:2, :2])) < 1e-12:
        msg = f"The transformation of {name!r} to {cs!r} is singular; it cannot be inverted to match pixels to cells."
        raise ValueError(msg)
    return m


@dataclass
class _Part:
    """What one window contributes: per cell (integer id), sums over genes, pixel count and pixel-centre sums."""

    ids: np.ndarray
    sums: np.ndarray
    n_pixels: np.ndarray
    centre_sums: np.ndarray


def _windows(bbox: tuple[int, int, int, int] | None) -> Iterator[tuple[slice, slice]]:
    if bbox is None:
        return
    r0, c0, r1, c1 = bbox
    for wr in range(r0, r1, _WINDOW):
        for wc in range(c0, c1, _WINDOW):
            yield slice(wr, min(wr + _WINDOW, r1)), slice(wc, min(wc + _WINDOW, c1))


def _aggregate_window(src: HRSource, idx: list[int], cells: _Cells, window: tuple[slice, slice]) -> _Part | None:
    rows, cols = window
    rr, cc = np.meshgrid(np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    cell, pix = cells.assign(rr + 0.5, cc + 0.5)
    if cell.size == 0:
        return None
    values = src.block(idx, rows, cols).reshape(len(idx), -1).T[pix]
    if src.units == "log1p":
        values = np.expm1(values)
    ids, local = np.unique(cell, return_inverse=True)
    onehot = sp.csr_matrix((np.ones(cell.size), (local, np.arange(cell.size))), shape=(ids.size, cell.size))
    centres = np.column_stack([cc[pix] + 0.5, rr[pix] + 0.5])
    return _Part(
        ids=ids,
        sums=np.asarray(onehot @ values.astype(np.float64)),
        n_pixels=np.bincount(local, minlength=ids.size),
        centre_sums=np.asarray(onehot @ centres),
    )


def _combine(parts: list[_Part], n_genes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sum the windows' contributions per cell id (a cell may span several windows); ids sorted."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, n_genes)), np.zeros(0, np.int64), np.zeros((0, 2))
    ids, inverse = np.unique(np.concatenate([p.ids for p in parts]), return_inverse=True)

    def total(arrays: list[np.ndarray]) -> np.ndarray:
        stacked = np.concatenate(arrays)
        out = np.zeros((ids.size, *stacked.shape[1:]), dtype=stacked.dtype)
        np.add.at(out, inverse, stacked)
        return out

    return (
        ids,
        total([p.sums for p in parts]),
        total([p.n_pixels for p in parts]),
        total([p.centre_sums for p in parts]),
    )


class _Cells:
    """Cells of one element, matched to HR pixel centres given in HR intrinsic coordinates."""

    def __init__(self, to_cs: np.ndarray, hr_affine: np.ndarray) -> None:
        self.to_cs = to_cs
        self.hr_affine = hr_affine
        # HR pixel coordinates → the element's own coordinates (where polygons, circles, label pixels are exact)
        self.hr_to_element = np.linalg.inv(to_cs) @ hr_affine
        self.element_to_hr = np.linalg.inv(self.hr_to_element)

    def _hr_bbox_of(self, xmin: np.ndarray, ymin: np.ndarray, xmax: np.ndarray, ymax: np.ndarray, h: int, w: int):
        """HR pixel window ``(r0, c0, r1, c1)`` covering element-space boxes, clipped to the grid (None if empty)."""
        if np.size(xmin) == 0:
            return None
        xs = np.concatenate([xmin, xmax, xmin, xmax])
        ys = np.concatenate([ymin, ymin, ymax, ymax])
        hx, hy = transform_points(self.element_to_hr, xs, ys)
        c0, r0 = max(0, int(np.floor(np.nanmin(hx)))), max(0, int(np.floor(np.nanmin(hy))))
        c1, r1 = min(w, int(np.ceil(np.nanmax(hx))) + 1), min(h, int(np.ceil(np.nanmax(hy))) + 1)
        return (r0, c0, r1, c1) if r1 > r0 and c1 > c0 else None

    def hr_bbox(self, h: int, w: int) -> tuple[int, int, int, int] | None:
        raise NotImplementedError

    def assign(self, hr_y: np.ndarray, hr_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(cell id, pixel position)`` of the pixels (HR coordinates of centres) that fall in a cell."""
        raise NotImplementedError

    def finish(self, ids: np.ndarray, n_pixels: np.ndarray, centre_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the table's rows and their centroids in the coordinate system."""
        raise NotImplementedError

    def instance_ids(self, ids: np.ndarray) -> Any:
        raise NotImplementedError


class _ShapeCells(_Cells):
    """Polygons / multipolygons and circles (points with ``radius``) of a shapes element; ids = row positions."""

    def __init__(self, gdf: gpd.GeoDataFrame, to_cs: np.ndarray, hr_affine: np.ndarray) -> None:
        super().__init__(to_cs, hr_affine)
        self.gdf = gdf
        geoms = np.asarray(gdf.geometry.values, dtype=object)
        types = shapely.get_type_id(geoms)
        self.is_circle = types == shapely.GeometryType.POINT
        if self.is_circle.any():
            if "radius" not in gdf.columns:
                msg = "The shapes have points without a `radius` column; `aggregate` needs polygons or circles."
                raise ValueError(msg)
            self.radius = np.asarray(gdf["radius"], dtype=np.float64)
        else:
            self.radius = np.zeros(len(gdf))
        bad = ~self.is_circle & ~np.isin(types, [shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON])
        if bad.any():
            msg = f"`aggregate` needs polygons or circles; the shapes have {sorted(set(gdf.geometry[bad].geom_type))}."
            raise ValueError(msg)
        self.geoms = geoms
        bounds = shapely.bounds(geoms)
        r = np.where(self.is_circle, self.radius, 0.0)
        self.bounds = bounds + np.column_stack([-r, -r, r, r])
        centroids = shapely.get_coordinates(shapely.centroid(geoms))
        self.centroid = centroids  # element coordinates

    def hr_bbox(self, h: int, w: int) -> tuple[int, int, int, int] | None:
        b = self.bounds
        return self._hr_bbox_of(b[:, 0], b[:, 1], b[:, 2], b[:, 3], h, w)

    def assign(self, hr_y: np.ndarray, hr_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ex, ey = transform_points(self.hr_to_element, hr_x, hr_y)
        xmin, xmax, ymin, ymax = ex.min(), ex.max(), ey.min(), ey.max()
        b = self.bounds
        near = np.flatnonzero((b[:, 0] <= xmax) & (b[:, 2] >= xmin) & (b[:, 1] <= ymax) & (b[:, 3] >= ymin))
        if near.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        tree = shapely.STRtree(shapely.points(ex, ey))
        pairs = []
        poly = near[~self.is_circle[near]]
        if poly.size:
            i, j = tree.query(self.geoms[poly], predicate="intersects")
            pairs.append((poly[i], j))
        circ = near[self.is_circle[near]]
        if circ.size:
            i, j = tree.query(self.geoms[circ], predicate="dwithin", distance=self.radius[circ])
            pairs.append((circ[i], j))
        cell = np.concatenate([p[0] for p in pairs]).astype(np.int64)
        pix = np.concatenate([p[1] for p in pairs]).astype(np.int64)
        # overlapping cells: each pixel to the cell whose centroid is nearest
        d2 = (ex[pix] - self.centroid[cell, 0]) ** 2 + (ey[pix] - self.centroid[cell, 1]) ** 2
        order = np.lexsort((d2, pix))
        first = np.r_[True, pix[order][1:] != pix[order][:-1]]
        keep = order[first]
        return cell[keep], pix[keep]

    def finish(self, ids: np.ndarray, n_pixels: np.ndarray, centre_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = transform_points(self.to_cs, self.centroid[:, 0], self.centroid[:, 1])
        return np.arange(len(self.gdf), dtype=np.int64), np.column_stack([x, y])

    def instance_ids(self, ids: np.ndarray) -> Any:
        return self.gdf.index.to_numpy()[ids]


class _LabelCells(_Cells):
    """A labels raster read at each HR pixel centre (nearest label pixel); ids = label values."""

    def __init__(self, labels: Any, to_cs: np.ndarray, hr_affine: np.ndarray) -> None:
        super().__init__(to_cs, hr_affine)
        if labels.ndim != 2:
            msg = f"`labels_key` must name 2D labels; this one has dims {labels.dims}."
            raise ValueError(msg)
        self.labels = labels
        self.shape = tuple(int(v) for v in labels.shape)

    def hr_bbox(self, h: int, w: int) -> tuple[int, int, int, int] | None:
        ly, lx = self.shape
        return self._hr_bbox_of(np.array([0.0]), np.array([0.0]), np.array([float(lx)]), np.array([float(ly)]), h, w)

    def assign(self, hr_y: np.ndarray, hr_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ex, ey = transform_points(self.hr_to_element, hr_x, hr_y)
        col, row = np.floor(ex).astype(np.int64), np.floor(ey).astype(np.int64)
        inside = np.flatnonzero((row >= 0) & (row < self.shape[0]) & (col >= 0) & (col < self.shape[1]))
        if inside.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        data = self.labels.data
        # point-wise reads: a label raster can be far finer than the HR grid (Xenium: 0.2 µm vs 10 µm pixels)
        picked = data.vindex[row[inside], col[inside]] if isinstance(data, da.Array) else data[row[inside], col[inside]]
        value = np.asarray(picked).astype(np.int64)
        hit = value != 0
        return value[hit], inside[hit]

    def finish(self, ids: np.ndarray, n_pixels: np.ndarray, centre_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if ids.size == 0:
            return ids, np.zeros((0, 2))
        mean = centre_sums / n_pixels[:, None]
        x, y = transform_points(self.hr_affine, mean[:, 0], mean[:, 1])
        return ids, np.column_stack([x, y])

    def instance_ids(self, ids: np.ndarray) -> Any:
        return ids
