"""``dst.pl.gene_maps``: LR | SR mean | truth | uncertainty of a few genes, over the tissue image, in µm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._contract import Prepared, read_sr
from .._genes import resolve_genes
from .._image import read_tile
from .._normalise import lr_per_hr_pixel
from .._spatial import image_levels
from ._utils import add_scale_bar, check_save, finish, nice_length, pyplot

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

    from .._grid import Grid

# whole grid by default up to this many HR pixels a side; beyond, the fine structure SR is about is not visible
_WHOLE_GRID_MAX_HR_PX = 256
# the tissue image under the panels is read at no more than this many pixels across
_IMAGE_MAX_PX = 600


@dataclass(frozen=True)
class _Region:
    """A region snapped to HR pixel edges: HR pixel slice and its bounds in µm."""

    rows: slice
    cols: slice
    bbox_um: tuple[float, float, float, float]
    what: str


def gene_maps(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str] | None = None,
    key: str = "diffst_sr",
    region: tuple[float, float, float, float] | None = None,
    tile: int | None = None,
    split: str | None = None,
    units: Literal["counts", "log1p"] = "log1p",
    show_image: bool = True,
    image_alpha: float = 1.0,
    map_alpha: float = 0.85,
    transparent_below: float | None = 0.02,
    cmap: str = "magma",
    std_cmap: str = "viridis",
    std_scale: Literal["own", "shared"] = "own",
    vmax_percentile: float = 99.5,
    scale_bar_um: float | Literal[False] | None = None,
    panel_size: float = 2.5,
    ax: Axes | None = None,
    show: bool = False,
    save: str | Path | None = None,
) -> Figure:
    """Super-resolved gene maps beside their low-resolution input and the truth, over the tissue image.

    One row per gene; columns **LR | SR mean | truth | SR std**: the LR map (at its own LR pixel size), the SR mean,
    the measured HR map when the prepared data have one (transcripts, Visium HD bins), and the per-pixel standard
    deviation over samples when the SR result has one. Every panel covers the same region of the µm frame, drawn with
    ``extent`` in µm over the tissue-image crop of that region, so pixels land exactly where they belong. LR counts are
    shown per HR pixel (LR counts divided by the observed HR-pixel area), so LR, SR and truth share one unit and one
    colour scale per gene (one colorbar per row).

    Parameters
    ----------
    sdata
        The SpatialData with a prepared key (:func:`diffst.pp.prepare`) and an SR result under ``key``.
    genes
        One or several genes of the SR result; by default its first three.
    key
        The SR result: ``sdata.images[key]`` (and ``sdata.images[key + '_std']``) with ``sdata.attrs[key]``.
    region
        ``(x0, y0, x1, y1)`` in µm in the µm frame of the prepared grid (source coordinate system × µm per unit),
        expanded to whole HR pixels and clipped to the grid. By default the whole grid when it is at most 256 HR pixels
        a side, otherwise the first test tile (or the first validation, then training tile when there is none).
    tile
        A tile id (index of ``sdata.shapes['{prepared_key}_tiles']``) to show instead of ``region``.
    split
        Show the first tile of this split (``"train"``, ``"val"`` or ``"test"``).
    units
        ``"log1p"`` (log1p of counts per HR pixel) or ``"counts"`` (counts per HR pixel). When the SR result was stored
        in the other unit, the mean is converted exactly and the std to first order (``std / (1 + mean)`` from counts
        to log1p, ``std · (1 + mean)`` back).
    show_image
        Draw the tissue image under the maps. Without it every map pixel is drawn opaque.
    image_alpha
        Opacity of the tissue image.
    map_alpha
        Opacity of the gene maps over the image.
    transparent_below
        Over the image, map pixels below this fraction of the panel's upper colour limit are left transparent so the
        tissue shows through where a gene is not expressed; ``None`` draws every pixel.
    cmap
        Colormap of the expression panels (LR, SR mean, truth).
    std_cmap
        Colormap of the std panel.
    std_scale
        ``"own"``: the std panel has its own colour scale and colorbar (same units); ``"shared"``: it uses the gene's
        expression scale, which shows the uncertainty relative to the expression.
    vmax_percentile
        Upper colour limit of a gene: this percentile of its values over the region's panels (lower limit 0).
    scale_bar_um
        Length of the scale bar drawn on the first panel of each row; by default a round length near a fifth of the
        region's width. ``False`` draws none.
    panel_size
        Width of one panel in inches (the height follows the region's aspect ratio), for a new figure.
    ax
        Draw into the place of this axes of an existing figure (it is replaced by the grid of panels), e.g. one cell
        of a larger layout; by default a new figure.
    show
        Show the figure (``plt.show()``); in a notebook the returned figure is shown anyway.
    save
        Also write the figure to this file (PNG, PDF, SVG … from the suffix; 150 dpi for raster formats).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (one row of axes per gene, then the colorbars). In a notebook, assign it
    (``fig = dst.pl.gene_maps(...)``) or end the line with ``;`` so it is shown once.

    Examples
    --------
    >>> dst.pl.gene_maps(sdata, genes=["ERBB2", "LUM"], split="test")  # doctest: +SKIP
    >>> dst.pl.gene_maps(sdata, "KRT8", region=(1000, 1000, 1400, 1400), units="counts")  # doctest: +SKIP

    """
    save_path = check_save(save)
    if units not in ("counts", "log1p"):
        msg = f"`units` must be 'counts' or 'log1p'; got {units!r}."
        raise ValueError(msg)
    if std_scale not in ("own", "shared"):
        msg = f"`std_scale` must be 'own' or 'shared'; got {std_scale!r}."
        raise ValueError(msg)
    if not 0 < vmax_percentile <= 100:
        msg = f"`vmax_percentile` must be in (0, 100]; got {vmax_percentile!r}."
        raise ValueError(msg)
    record, mean_el, std_el = read_sr(sdata, key)
    prep = Prepared.from_sdata(sdata, record.prepared_key)
    grid = prep.grid
    if record.grid is not None and record.grid != grid:
        msg = (
            f"The SR result {key!r} is on a different grid than the prepared data {prep.key!r} now hold "
            f"({record.grid.to_dict()} vs {grid.to_dict()}); rerun `dst.tl.super_resolve` after `dst.pp.prepare`."
        )
        raise ValueError(msg)
    genes = _check_genes(genes, list(record.genes), key)
    reg = _resolve_region(sdata, prep, region=region, tile=tile, split=split)

    # data of the region, all in the display units (per HR pixel)
    sr_units = record.units
    sr = _crop(mean_el, genes, reg)
    sr_counts = sr if sr_units == "counts" else np.expm1(sr)
    columns: dict[str, np.ndarray] = {}
    lr, lr_rows, lr_cols = _lr_crop(sdata, prep, genes, reg)
    columns["lr"] = _to_units(lr, units)
    columns["sr"] = _to_units(np.clip(sr_counts, 0, None), units)
    if prep.has_hr:
        columns["truth"] = _to_units(_crop(sdata[prep.elements["hr"]], genes, reg), units)
    if std_el is not None:
        columns["std"] = _std_in_units(_crop(std_el, genes, reg), sr_counts, sr_units, units)

    x0, y0, x1, y1 = reg.bbox_um
    hr_extent = (x0, x1, y1, y0)  # imshow's (left, right, bottom, top) with rows running down in y
    lr_extent = (
        grid.origin_um[0] + lr_cols.start * grid.lr_um,
        grid.origin_um[0] + lr_cols.stop * grid.lr_um,
        grid.origin_um[1] + lr_rows.stop * grid.lr_um,
        grid.origin_um[1] + lr_rows.start * grid.lr_um,
    )
    extents = {"lr": lr_extent, "sr": hr_extent, "truth": hr_extent, "std": hr_extent}
    titles = {
        "lr": f"LR ({grid.lr_um:g} µm)",
        "sr": f"SR mean ({grid.hr_um:g} µm)",
        "truth": f"truth ({grid.hr_um:g} µm)",
        "std": f"SR std ({grid.hr_um:g} µm)",
    }
    image = _image_crop(sdata, prep, reg.bbox_um) if show_image else None

    expr_cols = [c for c in ("lr", "sr", "truth") if c in columns]
    has_std = "std" in columns
    own_std_bar = has_std and std_scale == "own"
    width_ratios = [1.0] * len(expr_cols) + [0.06]
    if has_std:
        width_ratios += [1.0] + ([0.06] if own_std_bar else [])
    aspect = float(np.clip((y1 - y0) / (x1 - x0), 0.25, 4.0))
    n_panels = len(expr_cols) + int(has_std)
    if ax is None:
        fig = pyplot().figure(
            figsize=(
                panel_size * n_panels + 0.9 * (1 + int(own_std_bar)) + 0.4,
                panel_size * aspect * len(genes) + 0.9,
            ),
            layout="constrained",
        )
        gs = fig.add_gridspec(len(genes), len(width_ratios), width_ratios=width_ratios)
    else:
        fig = ax.figure
        gs = ax.get_subplotspec().subgridspec(len(genes), len(width_ratios), width_ratios=width_ratios)
        ax.remove()
    unit_label = f"log1p(counts / {grid.hr_um:g} µm px)" if units == "log1p" else f"counts / {grid.hr_um:g} µm px"
    bar_um = _scale_bar_length(scale_bar_um, x1 - x0)

    for i, gene in enumerate(genes):
        values = [columns[c][i][np.isfinite(columns[c][i])] for c in expr_cols]
        vmax = _upper_limit(np.concatenate(values), vmax_percentile)
        std_vmax = vmax
        if own_std_bar:
            std_vmax = _upper_limit(columns["std"][i][np.isfinite(columns["std"][i])], vmax_percentile)
        for j, col in enumerate([*expr_cols, *(["std"] if has_std else [])]):
            slot = j if col != "std" else len(expr_cols) + 1
            panel = fig.add_subplot(gs[i, slot])
            is_std = col == "std"
            im = _draw_panel(
                panel,
                columns[col][i],
                extents[col],
                reg.bbox_um,
                image=image,
                vmax=std_vmax if is_std else vmax,
                cmap=std_cmap if is_std else cmap,
                image_alpha=image_alpha,
                map_alpha=map_alpha,
                transparent_below=transparent_below if image is not None else None,
            )
            panel.set_gid(f"{gene}:{col}")
            if i == 0:
                panel.set_title(titles[col], fontsize="medium")
            if j == 0:
                panel.set_ylabel(gene, fontsize="large", fontweight="bold")
                if bar_um:
                    add_scale_bar(panel, bar_um)
            if col == expr_cols[-1]:
                cb = fig.colorbar(im, cax=fig.add_subplot(gs[i, len(expr_cols)]))
                cb.set_label(unit_label, fontsize="small")
                cb.ax.tick_params(labelsize="small")
            if is_std and own_std_bar:
                cb = fig.colorbar(im, cax=fig.add_subplot(gs[i, len(width_ratios) - 1]))
                cb.set_label(f"std, {unit_label}", fontsize="small")
                cb.ax.tick_params(labelsize="small")
    title = f"{key} ({record.method}) · {reg.what}: x {x0:g}–{x1:g} µm, y {y0:g}–{y1:g} µm"
    if ax is None:
        fig.suptitle(title, fontsize="medium")
    return finish(fig, show=show, save=save_path)


def _check_genes(genes: str | Sequence[str] | None, available: list[str], key: str) -> list[str]:
    return resolve_genes(
        genes,
        available,
        default=available[:3],
        empty="or None for the first three",
        unknown=lambda missing: f"Genes {missing} are not in the SR result {key!r}, which has {available}.",
    )


def _snap(grid: Grid, bbox: tuple[float, float, float, float], what: str) -> _Region:
    """The HR pixels overlapping ``bbox`` (clipped to the grid) and their exact bounds."""
    x0, y0, x1, y1 = bbox
    ox, oy = grid.origin_um
    p = grid.hr_um
    hh, ww = grid.hr_shape
    # a tolerance so that bounds already on pixel edges do not pick up a sliver pixel from rounding
    c0 = int(np.clip(np.floor((x0 - ox) / p + 1e-6), 0, ww))
    c1 = int(np.clip(np.ceil((x1 - ox) / p - 1e-6), 0, ww))
    r0 = int(np.clip(np.floor((y0 - oy) / p + 1e-6), 0, hh))
    r1 = int(np.clip(np.ceil((y1 - oy) / p - 1e-6), 0, hh))
    return _Region(slice(r0, r1), slice(c0, c1), (ox + c0 * p, oy + r0 * p, ox + c1 * p, oy + r1 * p), what)


def _resolve_region(
    sdata: SpatialData,
    prep: Prepared,
    *,
    region: tuple[float, float, float, float] | None,
    tile: int | None,
    split: str | None,
) -> _Region:
    grid = prep.grid
    given = [name for name, v in (("region", region), ("tile", tile), ("split", split)) if v is not None]
    if len(given) > 1:
        msg = f"Pass only one of `region`, `tile` and `split`; got {given}."
        raise ValueError(msg)
    if region is not None:
        try:
            x0, y0, x1, y1 = (float(v) for v in region)
        except (TypeError, ValueError):
            msg = f"`region` must be four numbers (x0, y0, x1, y1) in µm; got {region!r}."
            raise ValueError(msg) from None
        if not (x1 > x0 and y1 > y0):
            msg = f"`region` must have x0 < x1 and y0 < y1 (µm); got {region!r}."
            raise ValueError(msg)
        gx0, gy0, gx1, gy1 = grid.extent_um
        if x1 <= gx0 or x0 >= gx1 or y1 <= gy0 or y0 >= gy1:
            msg = (
                f"`region` {region!r} µm is outside the prepared grid, which spans x {gx0:g}–{gx1:g} µm and "
                f"y {gy0:g}–{gy1:g} µm (µm frame of coordinate system {prep.coordinate_system!r})."
            )
            raise ValueError(msg)
        return _snap(grid, (x0, y0, x1, y1), "region")
    tiles = prep.tiles(sdata)
    if tile is not None:
        if tile not in tiles.index:
            msg = f"No tile {tile!r} in {prep.elements['tiles']!r}; its tile ids are {list(tiles.index)}."
            raise KeyError(msg)
        return _snap(grid, tuple(tiles.geometry.loc[tile].bounds), f"tile {tile} ({tiles.loc[tile, 'split']})")
    if split is not None:
        splits = sorted(set(tiles["split"]))
        chosen = tiles[tiles["split"] == split]
        if chosen.empty:
            msg = f"No tile in split {split!r}; the tiles have splits {splits}."
            raise ValueError(msg)
        t = chosen.index[0]
        return _snap(grid, tuple(chosen.geometry.loc[t].bounds), f"tile {t} ({split})")
    if max(grid.hr_shape) <= _WHOLE_GRID_MAX_HR_PX or tiles.empty:
        return _snap(grid, grid.extent_um, "whole grid")
    for s in ("test", "val", "train"):
        chosen = tiles[tiles["split"] == s]
        if not chosen.empty:
            t = chosen.index[0]
            return _snap(grid, tuple(chosen.geometry.loc[t].bounds), f"tile {t} ({s})")
    t = tiles.index[0]
    return _snap(grid, tuple(tiles.geometry.loc[t].bounds), f"tile {t}")


def _crop(element, genes: list[str], reg: _Region) -> np.ndarray:
    """``(genes, rows, cols)`` float32 of an HR-grid image (full-resolution level of a pyramid)."""
    level = image_levels(element)[0]
    return np.asarray(level.sel(c=genes).data[:, reg.rows, reg.cols], dtype=np.float32)


def _lr_crop(sdata: SpatialData, prep: Prepared, genes: list[str], reg: _Region) -> tuple[np.ndarray, slice, slice]:
    """LR counts per observed HR pixel of the LR pixels under the region (NaN where nothing was observed)."""
    s = prep.grid.scale
    rows = slice(reg.rows.start // s, -(-reg.rows.stop // s))
    cols = slice(reg.cols.start // s, -(-reg.cols.stop // s))
    lr = np.asarray(sdata[prep.elements["lr"]].sel(c=genes).data[:, rows, cols], dtype=np.float32)
    cov = prep.coverage[rows, cols]
    per_px = lr_per_hr_pixel(lr, cov, s)
    per_px[:, cov <= 0] = np.nan
    return per_px, rows, cols


def _to_units(counts: np.ndarray, units: str) -> np.ndarray:
    return np.log1p(np.clip(counts, 0, None)) if units == "log1p" else counts


def _std_in_units(std: np.ndarray, mean_counts: np.ndarray, sr_units: str, units: str) -> np.ndarray:
    """The std in the display units; across units by the delta method (d log1p(c) = dc / (1 + c))."""
    if sr_units == units:
        return std
    if units == "log1p":
        return std / (1.0 + np.clip(mean_counts, 0, None))
    return std * (1.0 + np.clip(mean_counts, 0, None))


def _upper_limit(values: np.ndarray, percentile: float) -> float:
    if values.size == 0:
        return 1.0
    v = float(np.percentile(values, percentile))
    if not np.isfinite(v) or v <= 0:
        v = float(np.max(values)) if np.max(values) > 0 else 1.0
    return v


def _scale_bar_length(scale_bar_um: float | Literal[False] | None, width_um: float) -> float | None:
    if scale_bar_um is False:
        return None
    if scale_bar_um is None:
        return nice_length(width_um / 5)
    if not np.isfinite(scale_bar_um) or scale_bar_um <= 0:
        msg = f"`scale_bar_um` must be a positive length in µm, None (automatic) or False; got {scale_bar_um!r}."
        raise ValueError(msg)
    return float(scale_bar_um)


def _image_crop(sdata: SpatialData, prep: Prepared, bbox: tuple[float, float, float, float]) -> np.ndarray:
    """The tissue image over ``bbox`` as an (rows, cols, 3) RGB or (rows, cols) grey array in [0, 1]."""
    native = prep.record.image.native_um_per_px
    width = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    out_um = max(native, width / _IMAGE_MAX_PX)
    img = read_tile(sdata.images[prep.image.key], prep.image, bbox, out_um)
    if prep.image.kind == "rgb" and img.shape[0] >= 3:
        return np.moveaxis(img[:3], 0, -1)
    return img[0]  # fluorescence: the first channel (DAPI for Xenium) as grey


def _draw_panel(
    ax: Axes,
    data: np.ndarray,
    extent: tuple[float, float, float, float],
    bbox: tuple[float, float, float, float],
    *,
    image: np.ndarray | None,
    vmax: float,
    cmap: str,
    image_alpha: float,
    map_alpha: float,
    transparent_below: float | None,
):
    x0, y0, x1, y1 = bbox
    if image is not None:
        ax.imshow(
            image,
            extent=(x0, x1, y1, y0),
            cmap=None if image.ndim == 3 else "gray",
            vmin=0.0,
            vmax=1.0,
            alpha=image_alpha,
            interpolation="antialiased",
        )
    shown = np.ma.masked_invalid(data)
    if transparent_below is not None:
        shown = np.ma.masked_where(~(np.ma.filled(shown, -np.inf) > transparent_below * vmax), shown)
    im = ax.imshow(
        shown,
        extent=extent,
        cmap=cmap,
        vmin=0.0,
        vmax=vmax,
        alpha=map_alpha if image is not None else 1.0,
        interpolation="nearest",
    )
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.set_facecolor("0.85")  # unobserved (NaN) pixels read as missing, not as zero
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    return im
