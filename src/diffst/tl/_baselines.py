"""Baselines in the same harness as Diff-ST: same prepared data, same grid, written with the same SR writer."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from unittest import mock

import dask.array as da
import numpy as np
import pandas as pd
import torch

from .. import _logging as log
from .._contract import Prepared
from .._degradation import BinDegradation, SpotDegradation, degradation_for, project_region, spot_halo
from .._grid import Grid
from .._image import read_tile
from .._normalise import lr_per_hr_pixel, lr_to_model_units, to_counts
from .._store import materialise, scratch_beside
from ..model.floor import hr_signal, image_floor
from ..model.upsample import fill_unobserved, upsample_lr
from ._output import Units, check_sr_free, write_sr

if TYPE_CHECKING:
    from spatialdata import SpatialData

UpsampleMethod = Literal["bicubic", "nearest", "image"]

#: Image pixels per HR pixel side over which the image floor averages the nuclear signal.
FLOOR_PX_PER_HR = 4


def upsample(
    sdata: SpatialData,
    *,
    prepared_key: str = "diffst",
    method: UpsampleMethod = "bicubic",
    key_added: str | None = None,
    units: Units = "counts",
    consistency: bool | None = None,
    overwrite: bool = False,
) -> None:
    """Up-sample the LR gene maps to the HR grid: the interpolation baselines of Diff-ST and the image floor.

    ``"bicubic"``
        Exactly the up-sampling Diff-ST conditions on and adds its residual to
        (:func:`diffst.model.upsample_lr`): LR counts per observed HR pixel in model units
        ``2·log1p(c)/s_g − 1``, unobserved LR pixels filled from observed neighbours, bicubic interpolation
        (``align_corners=False``), then back to expected counts per HR pixel (negative counts clip to 0).
    ``"nearest"``
        Each LR pixel's counts spread evenly over its ``scale × scale`` HR pixels (counts per observed HR pixel);
        unobserved LR pixels take the value :func:`diffst.model.fill_unobserved` gives them in model units.
        Under ``bin`` degradation this reproduces the LR counts exactly when re-binned.
    ``"image"``
        The training-free *image floor* (``diffst.model.floor``): the bicubic map times an image-derived
        density per HR pixel (the square root of the mean nuclear signal: DAPI, or haematoxylin from colour
        deconvolution of H&E), rescaled so that every LR pixel keeps exactly its counts under the data's own
        degradation (sum-pooling bins or Visium spot discs). Diff-ST's guard compares the model with it.

    ``s_g`` is the prepared ``hr_scale`` (what Diff-ST uses), or ``lr_scale`` for spot data, which have no HR.
    The slide is computed in chunks of 512 × 512 HR pixels (each with the LR context it needs, so the result is
    that of one computation over the whole grid); a zarr-backed SpatialData receives them one by one, in bounded
    memory, and a ``dask.distributed`` client runs them on its cluster.

    Parameters
    ----------
    sdata
        SpatialData prepared with ``dst.pp.prepare``.
    prepared_key
        The key of the prepared data (``key_added`` of :func:`diffst.pp.prepare`).
    method
        ``"bicubic"``, ``"nearest"`` or ``"image"`` (the image floor), as above.
    key_added
        Name of the SR result (default ``"bicubic_sr"``, ``"nearest_sr"`` or ``"image_floor_sr"``).
    units
        ``"counts"`` (expected counts per HR pixel) or ``"log1p"`` of them.
    consistency
        Rescale the map so that, degraded with the data's operator, it reproduces the observed LR counts exactly
        (as :func:`diffst.tl.super_resolve` does). Default: ``True`` for ``"image"``, ``False`` otherwise.
    overwrite
        Replace an existing result under ``key_added``.

    Returns
    -------
    Nothing; writes ``sdata.images[key_added]`` (channels = the prepared genes, on the HR grid with its
    transformation) and ``sdata.attrs[key_added]`` (``method`` = ``method``), ready for ``dst.tl.evaluate``.

    """
    if method not in ("bicubic", "nearest", "image"):
        msg = f"`method` must be 'bicubic', 'nearest' or 'image'; got {method!r}."
        raise ValueError(msg)
    if consistency is None:
        consistency = method == "image"
    elif method == "image" and not consistency:
        msg = "The image floor is LR-consistent by construction; `consistency=False` is not available for it."
        raise ValueError(msg)
    if units not in ("counts", "log1p"):
        msg = f"`units` must be 'counts' or 'log1p'; got {units!r}."
        raise ValueError(msg)
    key_added = {"image": "image_floor_sr"}.get(method, f"{method}_sr") if key_added is None else key_added
    prep = Prepared.from_sdata(sdata, prepared_key)
    check_sr_free(sdata, key_added, overwrite=overwrite)

    s = prep.grid.scale
    counts = Upsampler.from_sdata(sdata, prep, method, consistency=consistency).slide()
    with scratch_beside(sdata) as scratch:  # chunk by chunk into a store beside a zarr-backed SpatialData
        data = materialise(counts if units == "counts" else da.log1p(counts), scratch)
        params = {
            "baseline": True,
            "consistency": bool(consistency),
            "gene_scale": "hr_scale" if prep.hr_scale is not None else "lr_scale",
        }
        write_sr(sdata, prep, key_added=key_added, mean=data, std=None, genes=list(prep.genes), units=units,
                 method="image_floor" if method == "image" else method, params=params, overwrite=overwrite)  # fmt: skip
    what = "image floor" if method == "image" else f"{method} up-sampling"
    log.info(f"{what} of {len(prep.genes)} genes ×{s} → sdata.images[{key_added!r}]")


def _interpolate(lr: np.ndarray, coverage: np.ndarray, s: int, gene_scale: np.ndarray, method: str) -> np.ndarray:
    """Bicubic or nearest up-sampling of LR counts ``(G, h, w)`` to expected counts per HR pixel."""
    x_lr = torch.from_numpy(lr_to_model_units(lr, coverage, s, gene_scale))[None]
    mask = torch.from_numpy(np.clip(coverage, 0.0, 1.0)[None, None])
    with torch.no_grad():
        if method == "bicubic":
            return to_counts(upsample_lr(x_lr, mask, s)[0].numpy(), gene_scale)
        filled = to_counts(fill_unobserved(x_lr, mask)[0].numpy(), gene_scale)
    # observed pixels keep their exact counts (no log/exp round trip), so re-binning gives LR back
    per_px = np.where(coverage[None] > 0, lr_per_hr_pixel(lr, coverage, s), filled)
    return np.repeat(np.repeat(per_px, s, axis=1), s, axis=2)


def slide_signal(
    sdata: SpatialData, prep: Prepared, *, per_hr: int = FLOOR_PX_PER_HR, strip_lr: int = 16
) -> np.ndarray:
    """Mean nuclear signal of every HR pixel of the prepared grid ``(1, H, W)``, read in strips of LR rows.

    The image is read at ``hr_um / per_hr`` µm per pixel, normalised as the model sees it (:class:`ImageSpec`), the
    nuclear signal taken per pixel (DAPI-like channel, or haematoxylin of H&E) and averaged over each HR pixel.
    Memory: one strip of ``strip_lr`` LR rows of the image at a time.
    """
    g = prep.grid
    spec = prep.image
    image = sdata.images[spec.key]
    channel = spec.nuclear_channel
    h, w = g.lr_shape
    s = g.scale
    out = np.zeros((1, h * s, w * s), dtype=np.float32)
    x0, y0 = g.origin_um
    for r0 in range(0, h, strip_lr):
        r1 = min(h, r0 + strip_lr)
        bbox = (x0, y0 + r0 * g.lr_um, x0 + w * g.lr_um, y0 + r1 * g.lr_um)
        crop = read_tile(image, spec, bbox, g.hr_um / per_hr)
        with torch.no_grad():
            sig = hr_signal(torch.from_numpy(crop)[None], spec.kind, per_hr, channel)[0].numpy()
        out[:, r0 * s : r1 * s] = sig
    return out


#: LR pixels of context the up-sampling of a region needs around it: three for filling unobserved LR pixels
#: (:func:`diffst.model.fill_unobserved`), two for the bicubic kernel.
UPSAMPLE_HALO_LR = 5


@dataclass
class Upsampler:
    """The interpolation baselines and the image floor of any part of the prepared grid, in counts per HR pixel.

    It holds LR rasters and, for the floor, the nuclear signal (one HR channel), never a map of every gene at HR,
    so that the whole slide is computed chunk by chunk (:meth:`slide`, a dask array) in bounded memory, on a
    cluster too. Each chunk is computed on a region widened by :data:`UPSAMPLE_HALO_LR` and the spot discs
    reaching it, so it equals the same pixels of one computation over the whole grid.
    """

    method: str  # "bicubic", "nearest" or "image" (the image floor)
    lr: np.ndarray  # (G, h, w) float32 LR counts of the genes
    coverage: np.ndarray  # (h, w)
    gene_scale: np.ndarray  # (G,)
    grid: Grid
    operator: BinDegradation | SpotDegradation | None  # None: no LR projection
    signal: np.ndarray | None = None  # (1, H, W) nuclear signal, for "image"

    @classmethod
    def from_sdata(cls, sdata: SpatialData, prep: Prepared, method: str, *, genes: list[str] | None = None,
                   consistency: bool = True, lr: np.ndarray | None = None) -> Upsampler:  # fmt: skip
        """The up-sampling ``method`` of ``genes`` (default: every prepared gene, in the prepared order)."""
        if lr is None:
            lr = np.asarray(sdata[prep.elements["lr"]].values, dtype=np.float32)
        gene_scale = prep.hr_scale if prep.hr_scale is not None else prep.lr_scale
        if genes is not None:
            idx = [prep.genes.index(g) for g in genes]
            lr, gene_scale = lr[idx], np.asarray(gene_scale)[idx]
        return cls(
            method=method,
            lr=np.asarray(lr, dtype=np.float32),
            coverage=np.asarray(prep.coverage, dtype=np.float32),
            gene_scale=np.asarray(gene_scale, dtype=np.float32),
            grid=prep.grid,
            operator=degradation_for(sdata, prep) if consistency or method == "image" else None,
            signal=slide_signal(sdata, prep) if method == "image" else None,
        )

    def block(self, hr_rows: tuple[int, int], hr_cols: tuple[int, int]) -> np.ndarray:
        """Counts ``(G, rows, cols)`` of the HR pixels ``[rows) × [cols)`` (LR-consistent with an operator)."""
        s = self.grid.scale
        h, w = self.grid.lr_shape
        halo = UPSAMPLE_HALO_LR + spot_halo(self.operator, self.grid.lr_um)
        r0, c0 = max(0, hr_rows[0] // s - halo), max(0, hr_cols[0] // s - halo)
        r1, c1 = min(h, -(-hr_rows[1] // s) + halo), min(w, -(-hr_cols[1] // s) + halo)
        counts = self._region(r0, c0, r1, c1)
        if self.operator is not None:
            counts = project_region(self.operator, counts, self.lr, self.coverage > 0, (r0, c0, r1, c1))
        cut = (slice(None), slice(hr_rows[0] - r0 * s, hr_rows[1] - r0 * s),
               slice(hr_cols[0] - c0 * s, hr_cols[1] - c0 * s))  # fmt: skip
        return np.asarray(counts[cut], dtype=np.float32)

    def _region(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """The map of the LR pixels ``[r0, r1) × [c0, c1)`` (inside the grid), before any projection."""
        s = self.grid.scale
        lr, coverage = self.lr[:, r0:r1, c0:c1], self.coverage[r0:r1, c0:c1]
        if self.method != "image":
            return _interpolate(lr, coverage, s, self.gene_scale, self.method)
        base = _interpolate(lr, coverage, s, self.gene_scale, "bicubic")
        # counts each LR pixel would hold over its full area (spots measure only a part of it)
        total = lr_per_hr_pixel(lr, coverage, s) * s * s
        signal = self.signal[:, r0 * s : r1 * s, c0 * s : c1 * s]
        with torch.no_grad():
            return image_floor(
                torch.from_numpy(base)[None],
                torch.from_numpy(total)[None],
                torch.from_numpy((coverage > 0)[None, None]),
                torch.from_numpy(np.ascontiguousarray(signal))[None],
                s,
            )[0].numpy()

    def slide(self, chunk_hr: int = 512) -> da.Array:
        """``(G, H, W)`` lazy array of the whole grid, one task per ``chunk_hr × chunk_hr`` HR pixels."""
        g, (hh, ww) = len(self.gene_scale), self.grid.hr_shape
        chunks = da.core.normalize_chunks((g, chunk_hr, chunk_hr), shape=(g, hh, ww))
        return da.map_blocks(_upsample_block, dtype=np.float32, chunks=chunks, source=self,
                             meta=np.zeros((0, 0, 0), np.float32))  # fmt: skip


def _upsample_block(block_info: dict | None = None, source: Upsampler | None = None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    return source.block(loc[1], loc[2])


TESLA_INSTALL = "pip install --no-deps teslaforst && pip install opencv-python-headless scanpy"


class _TeslaOutput:
    """What TESLA's ``imputation`` builds its result in, instead of an AnnData.

    teslaforst 1.2.2 looks its superpixels up by their integer index after storing them as ``AnnData.obs``; current
    anndata turns that index into strings, and the look-up fails. This holder keeps ``X``, ``obs`` and ``var`` as
    given, which is all ``imputation`` uses (TESLA's computation is unchanged).
    """

    def __init__(self, X: np.ndarray) -> None:
        self.X = X
        self.obs = pd.DataFrame(index=pd.RangeIndex(X.shape[0]))
        self.var = pd.DataFrame(index=pd.RangeIndex(X.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape


def _tesla_imputation():
    """TESLA's ``imputation`` function (run with :class:`_TeslaOutput`), or an ImportError that says how to install it."""
    try:
        import importlib

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its anndata imports are deprecated, not broken
            module = importlib.import_module("TESLA.imputation")
    except ImportError as e:
        msg = (
            f"`dst.tl.tesla` needs the optional TESLA package (module `TESLA`, PyPI `teslaforst`), which failed to "
            f"import: {e}. Install it with `{TESLA_INSTALL}`: `--no-deps` because teslaforst declares the withdrawn "
            "`sklearn` package; it imports opencv (cv2) without declaring it, and scanpy."
        )
        raise ImportError(msg) from e

    def run(*args, **kwargs):
        with mock.patch.object(module, "AnnData", _TeslaOutput):
            return module.imputation(*args, **kwargs)

    return run


def tesla(
    sdata: SpatialData,
    *,
    prepared_key: str = "diffst",
    split: str | None = "test",
    key_added: str = "tesla_sr",
    image_px_per_hr: int = 8,
    margin_lr: int = 1,
    num_nbs: int = 10,
    k: int = 2,
    s: float = 1.0,
    units: Units = "counts",
    overwrite: bool = False,
) -> None:
    """TESLA's gene-expression imputation (Hu et al., ``teslaforst``) on the prepared tiles: an image-guided baseline.

    TESLA places "superpixels" on a regular grid over the histology and gives each the inverse-distance-weighted
    mean (power ``k``) of its ``num_nbs`` nearest measured spots, distance taken in 3-D: image rows and columns
    plus the superpixel's colour z-score scaled by ``s ·`` the larger spatial standard deviation of the points.
    Here, per tile:

    - superpixels are the HR pixel centres (the image crop starts half an HR pixel before the tile so TESLA's grid
      ``res, 2·res, …`` lands on them, ``res = image_px_per_hr``, and colour is averaged over one HR pixel);
    - measured spots are the observed LR pixel centres of the tile and ``margin_lr`` LR pixels around it, with
      ``log1p`` of the LR counts per observed HR pixel (TESLA interpolates log expression, as in its tutorial);
    - the result is turned back to expected counts per HR pixel (``expm1``).

    TESLA computes distances in a Python double loop (superpixels × spots), so it runs per tile and only on the
    tiles of ``split`` by default; pixels outside the processed tiles are NaN. The colour scale depends on the
    crop's extent, so tile-wise runs differ slightly from one whole-slide run, and a crop with no colour variation
    gives NaN (TESLA's z-score is undefined).

    Parameters
    ----------
    sdata
        SpatialData prepared with ``dst.pp.prepare``.
    prepared_key
        The key of the prepared data (``key_added`` of :func:`diffst.pp.prepare`).
    split
        Tiles to process (``"test"``, ``"val"``, ``"train"``), or ``None`` for all tiles.
    key_added
        Name of the SR result.
    image_px_per_hr
        Image pixels per HR pixel side in the crops TESLA reads (its ``res``).
    margin_lr
        LR pixels around each tile whose measurements TESLA may use.
    num_nbs, k, s
        TESLA's ``imputation`` parameters (neighbours, distance power, colour weight), its defaults.
    units
        ``"counts"`` or ``"log1p"``.
    overwrite
        Replace an existing result under ``key_added``.

    Returns
    -------
    Nothing; writes ``sdata.images[key_added]`` and ``sdata.attrs[key_added]`` (``method="tesla"``).

    Raises
    ------
    ImportError
        When TESLA (module ``TESLA`` with opencv and scanpy) is not installed; the message has the install command.

    """
    imputation = _tesla_imputation()
    if units not in ("counts", "log1p"):
        msg = f"`units` must be 'counts' or 'log1p'; got {units!r}."
        raise ValueError(msg)
    if image_px_per_hr < 2 or margin_lr < 0:
        msg = f"`image_px_per_hr` must be ≥ 2 and `margin_lr` ≥ 0; got {image_px_per_hr} and {margin_lr}."
        raise ValueError(msg)
    prep = Prepared.from_sdata(sdata, prepared_key)
    check_sr_free(sdata, key_added, overwrite=overwrite)
    tiles = prep.tiles(sdata, split)
    if len(tiles) == 0:
        msg = (
            f"No {split!r} tiles under {prepared_key!r} to run TESLA on; pass another `split` (or None for all tiles)."
        )
        raise ValueError(msg)

    grid = prep.grid
    sc = grid.scale
    t = prep.tile_lr
    h, w = grid.lr_shape
    genes = list(prep.genes)
    lr = np.asarray(sdata[prep.elements["lr"]].values, dtype=np.float32)
    log_lr = np.log1p(lr_per_hr_pixel(lr, prep.coverage, sc))
    image = sdata.images[prep.image.key]
    res = int(image_px_per_hr)
    out = np.full((len(genes), *grid.hr_shape), np.nan, dtype=np.float32)
    n_nan = 0
    for r0, c0 in zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True):
        ra, ca = max(r0 - margin_lr, 0), max(c0 - margin_lr, 0)
        rb, cb = min(r0 + t + margin_lr, h), min(c0 + t + margin_lr, w)
        if not (prep.coverage[ra:rb, ca:cb] > 0).any():
            continue
        half = grid.hr_um / 2.0
        x0 = grid.origin_um[0] + ca * grid.lr_um - half
        y0 = grid.origin_um[1] + ra * grid.lr_um - half
        hh, ww = (rb - ra) * sc, (cb - ca) * sc
        bbox = (x0, y0, x0 + (ww + 1) * grid.hr_um, y0 + (hh + 1) * grid.hr_um)
        crop = read_tile(image, prep.image, bbox, grid.hr_um / res)
        values = tesla_window(imputation, _rgb_uint8(crop), log_lr[:, ra:rb, ca:cb], prep.coverage[ra:rb, ca:cb] > 0,
                              genes, scale=sc, res=res, num_nbs=num_nbs, k=k, s=s)  # fmt: skip
        tr, tc = (r0 - ra) * sc, (c0 - ca) * sc
        tile_vals = values[:, tr : tr + t * sc, tc : tc + t * sc]
        n_nan += int(np.isnan(tile_vals).any())
        out[:, r0 * sc : (r0 + t) * sc, c0 * sc : (c0 + t) * sc] = tile_vals
    if n_nan:
        log.warn(f"TESLA left NaN in {n_nan} tiles (no colour variation in the image crop or no spot nearby)")
    counts = np.expm1(out)
    data = counts if units == "counts" else out
    write_sr(
        sdata,
        prep,
        key_added=key_added,
        mean=data.astype(np.float32),
        std=None,
        genes=genes,
        units=units,
        method="tesla",
        params={
            "baseline": True,
            "split": split,
            "tesla": {"res": res, "num_nbs": num_nbs, "k": k, "s": s, "margin_lr": margin_lr},
        },
        overwrite=overwrite,
    )
    log.info(f"TESLA imputation of {len(genes)} genes on {len(tiles)} tiles → sdata.images[{key_added!r}]")


def tesla_window(
    imputation, img: np.ndarray, log_lr: np.ndarray, measured: np.ndarray, genes: list[str], *, scale: int, res: int,
    num_nbs: int = 10, k: int = 2, s: float = 1.0,
) -> np.ndarray:  # fmt: skip
    """TESLA on one window: ``log1p`` counts per HR pixel ``(G, H, W)`` from the ``measured`` LR pixels of ``log_lr``.

    ``img`` ``(H·res + res, W·res + res, 3)`` uint8 starts half an HR pixel before the window (TESLA's superpixel
    grid ``res, 2·res, …`` then lands on the HR pixel centres); ``log_lr`` ``(G, h, w)`` is ``log1p`` of the counts
    per HR pixel of each LR pixel, read where ``measured`` ``(h, w)``. HR pixels TESLA leaves out (all, with no measured pixel) are NaN.
    """
    import anndata as ad

    ii, jj = np.nonzero(measured)
    hh, ww = measured.shape[0] * scale, measured.shape[1] * scale
    values = np.full((len(genes), hh, ww), np.nan, dtype=np.float32)
    if len(ii) == 0:
        return values
    known = ad.AnnData(
        X=log_lr[:, ii, jj].T.astype(np.float64),
        obs=pd.DataFrame(
            {"pixel_x": ((ii + 0.5) * scale + 0.5) * res, "pixel_y": ((jj + 0.5) * scale + 0.5) * res},
            index=[f"lr_{a}_{b}" for a, b in zip(ii, jj, strict=True)],
        ),
        var=pd.DataFrame(index=genes),
    )
    rows, cols = img.shape[:2]
    contour = np.array([[[0, 0]], [[cols - 1, 0]], [[cols - 1, rows - 1]], [[0, rows - 1]]], dtype=np.int32)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = imputation(img, known, contour, genes, res=res, s=s, k=k, num_nbs=min(num_nbs, len(ii)))
    hr_r = (result.obs["x"].to_numpy() // res - 1).astype(int)
    hr_c = (result.obs["y"].to_numpy() // res - 1).astype(int)
    inside = (hr_r < hh) & (hr_c < ww)
    order = [list(result.var.index).index(g) for g in genes]
    values[:, hr_r[inside], hr_c[inside]] = np.asarray(result.X, dtype=np.float32)[inside][:, order].T
    return values


def _rgb_uint8(crop: np.ndarray) -> np.ndarray:
    """An image crop ``(C, H, W)`` in [0, 1] as the ``(H, W, 3)`` uint8 array TESLA reads (one channel repeated)."""
    c = crop[:3] if crop.shape[0] >= 3 else np.repeat(crop[:1], 3, axis=0)
    return np.ascontiguousarray(np.round(np.clip(c, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0))
