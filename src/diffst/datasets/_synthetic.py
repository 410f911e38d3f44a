"""Synthetic Xenium, Visium and Visium HD datasets in the layouts of :mod:`spatialdata_io`.

All three are views of one simulated tissue (:mod:`diffst.datasets._sim`): with the same ``seed`` and size they
show the same cells, so a synthetic Xenium slide is the single-cell ground truth of the synthetic Visium (HD) slide.
Images are lazy dask arrays rendered chunk by chunk (and each pyramid level at its own resolution), so building a
dataset takes seconds and reading a crop costs only the chunks it touches.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import anndata as ad
import dask
import dask.array as da
import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale
from xarray import DataArray, DataTree

from .._degradation import VISIUM_FULLRES_SPOT_UM
from . import _sim as T
from ._sim._common import _rng

__all__ = ["synthetic_visium", "synthetic_visium_hd", "synthetic_xenium"]

SizeUm = float | tuple[float, float] | Literal["default", "slide"]

_SIZES = {"default": (3000.0, 3000.0), "slide": (6500.0, 6500.0)}
_SIZE_RANGE = (100.0, 25000.0)  # up to a whole Xenium slide (about 12 × 24 mm)
_MAX_GENES = 5000
_CHUNK = 1024
_SCALE_FACTORS = [2, 2, 2, 2]
_SOFTWARE = "diffst-synthetic"


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------
def _size(size_um: SizeUm) -> tuple[float, float]:
    if isinstance(size_um, str):
        if size_um not in _SIZES:
            msg = f"`size_um={size_um!r}` is not a known size; use 'default' (3000 µm), 'slide' (6500 µm), a number or (width, height) in µm."
            raise ValueError(msg)
        return _SIZES[size_um]
    if isinstance(size_um, bool):
        msg = f"`size_um={size_um!r}` is not a size; use 'default', 'slide', a number or (width, height) in µm."
        raise ValueError(msg)
    if isinstance(size_um, int | float | np.integer | np.floating):
        w = h = float(size_um)
    elif (
        isinstance(size_um, Sequence)
        and len(size_um) == 2
        and all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in size_um)
    ):
        w, h = float(size_um[0]), float(size_um[1])
    else:
        msg = f"`size_um={size_um!r}` is not a size; use 'default', 'slide', a number or (width, height) in µm."
        raise ValueError(msg)
    lo, hi = _SIZE_RANGE
    for v in (w, h):
        if not (math.isfinite(v) and lo <= v <= hi):
            msg = f"`size_um={size_um!r}` is out of range: each side must be between {lo:g} and {hi:g} µm."
            raise ValueError(msg)
    return w, h


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        msg = f"`{name}={value!r}` must be an integer."
        raise ValueError(msg)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        msg = f"`{name}={value!r}` is out of range: it must be {rng}."
        raise ValueError(msg)
    return int(value)


def _check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        msg = f"`{name}={value!r}` must be a number."
        raise ValueError(msg)
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        msg = f"`{name}={value!r}` is out of range: it must be in {bracket}{lo:g}, {hi:g}]."
        raise ValueError(msg)
    return v


def _common(size_um: SizeUm, n_genes: int, seed: int, transcripts_per_cell: float | None):
    w, h = _size(size_um)
    n_genes = _check_int("n_genes", n_genes, 1, _MAX_GENES)
    seed = _check_int("seed", seed, 0)
    if transcripts_per_cell is None:
        tpc = T.default_transcripts_per_cell(n_genes)
    else:
        tpc = _check_float("transcripts_per_cell", transcripts_per_cell, 0.0, 5000.0, lo_open=True)
    return w, h, n_genes, seed, tpc


# --------------------------------------------------------------------------------------------------------------------
# Lazy images
# --------------------------------------------------------------------------------------------------------------------
def _render_block(
    tissue: T.Tissue, *, kind: str, affine: np.ndarray, salt: int, block_info: dict | None = None
) -> np.ndarray:
    (_, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return T.render(tissue, kind, affine, (r0, r1), (c0, c1), salt=salt)


def _lazy(tissue: T.Tissue, kind: str, affine: np.ndarray, shape: tuple[int, int], salt: int, token: str) -> da.Array:
    """A dask array whose chunks are rendered on demand (deterministic whatever the chunking)."""
    n_c = 3 if kind == "he" else 1
    dtype = np.uint8 if kind == "he" else np.uint16
    chunks = (
        (n_c,),
        da.core.normalize_chunks(_CHUNK, (shape[0],))[0],
        da.core.normalize_chunks(_CHUNK, (shape[1],))[0],
    )
    key = hashlib.sha1(f"{token}-{kind}-{salt}-{shape}-{np.round(affine, 9).tobytes().hex()}".encode()).hexdigest()[:16]
    # the tissue is one node of the graph (not copied into every task), so distributed schedulers ship it once
    name = f"diffst-synthetic-tissue-{tissue.seed}-{tissue.width_um:g}-{tissue.height_um:g}"
    tissue_node = dask.delayed(tissue, pure=True, name=name)
    return da.map_blocks(
        partial(_render_block, kind=kind, affine=np.asarray(affine, float), salt=salt),
        tissue_node,
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype=dtype),
        name=f"diffst-synthetic-{kind}-{key}",
    )


def _multiscale(
    tissue: T.Tissue,
    kind: str,
    affine: np.ndarray,
    shape: tuple[int, int],
    c_coords: list[str],
    transformations: dict,
    token: str,
) -> DataTree:
    """A multiscale image whose every level is rendered directly at its own resolution."""
    level0 = _lazy(tissue, kind, affine, shape, 0, token)
    tree = Image2DModel.parse(
        level0,
        dims=("c", "y", "x"),
        c_coords=c_coords,
        transformations=transformations,
        scale_factors=_SCALE_FACTORS,
        chunks=(len(c_coords), _CHUNK, _CHUNK),
    )
    for k, name in enumerate(tree.children):
        if k == 0:
            continue
        arr = tree[name]["image"]
        hk, wk = arr.shape[1:]
        # pixel (x, y) of level k is pixel (x * W0 / Wk, y * H0 / Hk) of level 0, as spatialdata's Scale says
        lin = np.array([[shape[1] / wk, 0, 0], [0, shape[0] / hk, 0], [0, 0, 1]])
        aff_k = (np.vstack([affine, [0, 0, 1]]) @ lin)[:2]
        tree[name] = tree[name].dataset.assign(image=arr.copy(data=_lazy(tissue, kind, aff_k, (hk, wk), k, token)))
    return tree


def _single(
    tissue: T.Tissue, affine: np.ndarray, shape: tuple[int, int], transformations: dict, token: str
) -> DataArray:
    return Image2DModel.parse(
        _lazy(tissue, "he", affine, shape, 100, token),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=transformations,
    )


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------------
def _var(panel: T.GenePanel, genome: bool) -> pd.DataFrame:
    var = pd.DataFrame(
        {
            "gene_ids": [f"DSTG{i + 1:011d}" for i in range(panel.n_genes)],
            "feature_types": pd.Categorical(["Gene Expression"] * panel.n_genes),
        },
        index=pd.Index(panel.names),
    )
    if genome:
        var["genome"] = pd.Categorical(["GRCh38"] * panel.n_genes)
    return var


def _attrs(
    layout: str,
    tissue: T.Tissue,
    panel: T.GenePanel,
    tx: T.Transcripts,
    w: float,
    h: float,
    seed: int,
    tpc: float,
    **extra: Any,
) -> dict[str, Any]:
    info = {
        "layout": layout,
        "seed": int(seed),
        "size_um": [w, h],
        "n_genes": panel.n_genes,
        "genes": list(panel.names),
        "transcripts_per_cell": float(tpc),
        "n_cells": int(tissue.n_cells),
        "n_cell_transcripts": int(np.sum(tx.source >= 0)),
        "cell_types": list(T.CELL_TYPES),
        "domains": list(T.DOMAINS),
        "modules": list(T.MODULES),
        "markers": panel.markers,
        "tissue": tissue.summary,
        **extra,
    }
    # round-trip through JSON so that only plain types are stored (zarr attrs are JSON)
    return json.loads(json.dumps(info, default=float))


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique 10x-style barcodes (16 nucleotides + ``-1``), sorted as in a filtered matrix."""
    codes = np.unique(rng.integers(0, 4**16, size=int(n * 1.1) + 16, dtype=np.int64))
    while len(codes) < n:
        codes = np.unique(np.concatenate([codes, rng.integers(0, 4**16, size=n, dtype=np.int64)]))
    codes = rng.permutation(codes)[:n]
    digits = (codes[:, None] >> (2 * np.arange(15, -1, -1, dtype=np.int64))) & 3
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[digits]
    return (letters.view("S16").ravel().astype("U16")).astype(object) + "-1"


def _xenium_cell_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Xenium cell ids (``aaaabcde-1``): 8 letters a-p encoding a uint32, sorted like the instrument's."""
    prefix = np.sort(rng.choice(2**28, size=n, replace=False).astype(np.uint32) + np.uint32(2**28))
    nibbles = (prefix[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & 0xF
    chars = (nibbles + ord("a")).astype(np.uint8)
    return chars.view("S8").ravel().astype("U8").astype(object) + "-1"


def _spot_transformations(dataset_id: str, hires: float, lowres: float, axes: tuple[str, str]) -> dict:
    return {
        dataset_id: Identity(),
        f"{dataset_id}_downscaled_hires": Scale([hires, hires], axes=axes),
        f"{dataset_id}_downscaled_lowres": Scale([lowres, lowres], axes=axes),
    }


def _spot_images(
    tissue: T.Tissue,
    dataset_id: str,
    um_per_px: float,
    hires_max: int,
    lowres_max: int,
    axes: tuple[str, str],
    token: str,
) -> tuple[dict[str, DataTree | DataArray], float, float]:
    """Full-resolution (multiscale), hires and lowres images, as Space Ranger writes them."""
    shape = (int(math.ceil(tissue.height_um / um_per_px)), int(math.ceil(tissue.width_um / um_per_px)))
    longest = max(shape)
    hires_scalef = min(1.0, hires_max / longest)
    lowres_scalef = min(1.0, lowres_max / longest)
    affine = np.array([[um_per_px, 0, 0], [0, um_per_px, 0]])
    images: dict[str, DataTree | DataArray] = {
        f"{dataset_id}_full_image": _multiscale(
            tissue, "he", affine, shape, ["r", "g", "b"], {dataset_id: Identity()}, token
        )
    }
    for name, scalef, sys_name in (
        ("hires", hires_scalef, f"{dataset_id}_downscaled_hires"),
        ("lowres", lowres_scalef, f"{dataset_id}_downscaled_lowres"),
    ):
        shp = (max(1, int(round(shape[0] * scalef))), max(1, int(round(shape[1] * scalef))))
        aff = np.array([[um_per_px / scalef, 0, 0], [0, um_per_px / scalef, 0]])
        images[f"{dataset_id}_{name}_image"] = _single(
            tissue,
            aff,
            shp,
            {sys_name: Identity(), dataset_id: Scale([scalef, scalef], axes=axes).inverse()},
            f"{token}-{name}",
        )
    return images, hires_scalef, lowres_scalef


# --------------------------------------------------------------------------------------------------------------------
# Xenium
# --------------------------------------------------------------------------------------------------------------------
def synthetic_xenium(
    *,
    size_um: SizeUm = "default",
    n_genes: int = 50,
    seed: int = 0,
    transcripts_per_cell: float | None = None,
    pixel_size_um: float = 0.2125,
    he_um_per_px: float = 0.5,
    he_rotation_deg: float = 0.0,
    boundaries: bool = True,
) -> SpatialData:
    """A synthetic Xenium dataset, laid out as :func:`spatialdata_io.xenium` reads one.

    Parameters
    ----------
    size_um
        Field size: ``"default"`` (3000 x 3000 µm), ``"slide"`` (6500 x 6500 µm, a Visium capture area), a side
        length or ``(width, height)`` in µm (100 to 25000 µm).
    n_genes
        Panel size (1 to 5000). Real marker symbols come first (``EPCAM``, ``KRT8``, ``ERBB2``, ``PTPRC``, ...);
        ``GENE<n>`` names are used beyond the ~350 symbols of the catalogue.
    seed
        Seed of the tissue, expression and assay; the same seed and size give the same tissue in every layout.
    transcripts_per_cell
        Mean molecules per cell. Defaults to ``45.5 * (n_genes / 50) ** 0.125`` (45.5 for 50 genes, 57 for 300), which
        gives about 10 million transcripts for ``size_um="slide", n_genes=300``.
    pixel_size_um
        Pixel size of the morphology (DAPI) image, µm; ``global`` coordinates are these pixels.
    he_um_per_px
        Pixel size of the aligned H&E image, µm.
    he_rotation_deg
        Rotation of the H&E scan relative to the morphology image, degrees (its ``Affine`` transform undoes it).
    boundaries
        Whether to add cell and nucleus boundary polygons (16-gons); turn off for large fields to save time.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with, in coordinate system ``"global"`` (morphology pixels):

    - ``points["transcripts"]``: ``x``, ``y``, ``z`` (µm), ``feature_name`` (genes and control features),
      ``cell_id`` (``"UNASSIGNED"`` when outside cells), ``overlaps_nucleus``, ``qv``, ``transcript_id``;
      transformation ``Scale(1 / pixel_size_um)``.
    - ``images["morphology_focus"]``: DAPI (uint16, channel ``"DAPI"``), 5-level pyramid, ``Identity``.
    - ``images["he_image"]``: H&E (uint8, channels ``r, g, b``), 5-level pyramid, ``Affine`` to ``global``.
    - ``shapes["cell_circles"]`` and, with ``boundaries``, ``shapes["cell_boundaries"]`` and
      ``shapes["nucleus_boundaries"]`` (µm, ``Scale(1 / pixel_size_um)``).
    - ``tables["table"]``: cells x genes counts (CSR) annotating ``cell_circles``; ``obs`` has ``cell_id``,
      ``transcript_counts``, control counts, ``cell_area``, ``nucleus_area`` and the truth ``cell_type`` and
      ``domain``; ``obsm["spatial"]`` has centroids in µm.

    ``attrs["synthetic"]`` records the parameters and a summary of the simulated tissue.

    Examples
    --------
    >>> import diffst as dst
    >>> sdata = dst.datasets.synthetic_xenium(size_um=600, seed=1)
    >>> sorted(sdata.images)
    ['he_image', 'morphology_focus']

    """
    w, h, n_genes, seed, tpc = _common(size_um, n_genes, seed, transcripts_per_cell)
    ps = _check_float("pixel_size_um", pixel_size_um, 0.05, 5.0)
    he_px = _check_float("he_um_per_px", he_um_per_px, 0.05, 20.0)
    rot = _check_float("he_rotation_deg", he_rotation_deg, -360.0, 360.0)

    tissue = T.simulate_tissue(w, h, seed=seed)
    panel = T.gene_panel(n_genes, seed=seed)
    tx = T.simulate_transcripts(tissue, panel, transcripts_per_cell=tpc, seed=seed)
    cells = tissue.cells
    n_cells = tissue.n_cells
    cell_ids = _xenium_cell_ids(_rng(seed, "cell-ids"), n_cells)
    to_global = Scale([1 / ps, 1 / ps], axes=("x", "y"))

    # --- transcripts ---
    id_array = pa.array(np.append(cell_ids, "UNASSIGNED").astype(str), type=pa.large_string())
    cell_col = id_array.take(pa.array(np.where(tx.cell >= 0, tx.cell, n_cells).astype(np.int64)))
    df = pd.DataFrame(
        {
            "x": tx.x,
            "y": tx.y,
            "z": tx.z,
            "feature_name": pd.Categorical.from_codes(tx.feature.astype(np.int32), categories=tx.feature_names),
            "cell_id": pd.array(cell_col, dtype="string[pyarrow]"),  # as dask reads the parquet
            "overlaps_nucleus": tx.overlaps_nucleus,
            "qv": tx.qv,
            "transcript_id": np.uint64(281474976710656) + np.arange(len(tx), dtype=np.uint64),
        }
    )
    n_parts = max(1, len(df) // 2_000_000)
    points = PointsModel.parse(
        dd.from_pandas(df, npartitions=n_parts, sort=False),
        coordinates={"x": "x", "y": "y", "z": "z"},
        feature_key="feature_name",
        instance_key="cell_id",
        transformations={"global": to_global},
        sort=True,
    )

    # --- table ---
    genes = (tx.feature < n_genes) & (tx.cell >= 0)
    counts = sparse.csr_matrix(
        (np.ones(genes.sum(), np.float32), (tx.cell[genes], tx.feature[genes].astype(np.int64))),
        shape=(n_cells, n_genes),
    )
    counts.sum_duplicates()
    assigned = tx.cell >= 0
    ctrl_counts = {}
    for prefix, col in (
        ("NegControlProbe_", "control_probe_counts"),
        ("NegControlCodeword_", "control_codeword_counts"),
        ("UnassignedCodeword_", "unassigned_codeword_counts"),
        ("BLANK_", "deprecated_codeword_counts"),
    ):
        codes = [i for i, name in enumerate(tx.feature_names) if name.startswith(prefix)]
        m = assigned & np.isin(tx.feature, codes)
        ctrl_counts[col] = np.bincount(tx.cell[m], minlength=n_cells).astype(np.int64)
    transcript_counts = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    obs = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "transcript_counts": transcript_counts,
            **ctrl_counts,
            "total_counts": transcript_counts + sum(ctrl_counts.values()),
            "cell_area": cells["area"].astype(np.float64),
            "nucleus_area": cells["nucleus_area"].astype(np.float64),
            "nucleus_count": np.ones(n_cells, np.int64),
            "region": pd.Categorical(["cell_circles"] * n_cells),
            "cell_type": pd.Categorical.from_codes(cells["type"].astype(np.int32), categories=list(T.CELL_TYPES)),
            "domain": pd.Categorical.from_codes(cells["domain"].astype(np.int32), categories=list(T.DOMAINS)),
        },
        index=pd.Index(cell_ids, name=None),
    )
    adata = ad.AnnData(X=counts, obs=obs, var=_var(panel, genome=False))
    adata.obsm["spatial"] = np.column_stack([cells["x"], cells["y"]]).astype(np.float64)
    table = TableModel.parse(adata, region="cell_circles", region_key="region", instance_key="cell_id")

    # --- shapes ---
    shapes = {
        "cell_circles": ShapesModel.parse(
            adata.obsm["spatial"],
            geometry=0,
            radius=np.sqrt(cells["area"].astype(np.float64) / np.pi),
            index=pd.Series(cell_ids, name="cell_id"),
            transformations={"global": to_global},
        )
    }
    if boundaries:
        cell_poly = _ellipse_polygons(cells["x"], cells["y"], cells["cell_a"], cells["cell_b"], cells["angle"])
        nuc_poly = _ellipse_polygons(cells["nuc_x"], cells["nuc_y"], cells["nuc_a"], cells["nuc_b"], cells["angle"])
        cb = gpd.GeoDataFrame(geometry=cell_poly, index=pd.Index(cell_ids, name="cell_id"))
        nb = gpd.GeoDataFrame({"geometry": nuc_poly, "cell_id": cell_ids}, index=pd.RangeIndex(1, n_cells + 1))
        shapes["cell_boundaries"] = ShapesModel.parse(cb, transformations={"global": to_global})
        shapes["nucleus_boundaries"] = ShapesModel.parse(nb, transformations={"global": to_global})

    # --- images ---
    token = f"xenium-{seed}-{w}-{h}"
    dapi_shape = (int(math.ceil(h / ps)), int(math.ceil(w / ps)))
    images = {
        "morphology_focus": _multiscale(
            tissue,
            "dapi",
            np.array([[ps, 0, 0], [0, ps, 0]]),
            dapi_shape,
            ["DAPI"],
            {"global": Identity()},
            token,
        )
    }
    he_affine_um, he_shape = _he_geometry(w, h, he_px, rot)
    # H&E pixel -> µm -> morphology pixel
    he_to_global = np.vstack([he_affine_um / ps, [0, 0, 1]])
    images["he_image"] = _multiscale(
        tissue,
        "he",
        he_affine_um,
        he_shape,
        ["r", "g", "b"],
        {"global": Affine(he_to_global, input_axes=("x", "y"), output_axes=("x", "y"))},
        token,
    )

    sdata = SpatialData(images=images, points={"transcripts": points}, shapes=shapes, tables={"table": table})
    sdata.attrs["spatialdata_io_software_version"] = _SOFTWARE
    sdata.attrs["spatialdata_io_reader"] = "xenium"
    sdata.attrs["synthetic"] = _attrs(
        "xenium",
        tissue,
        panel,
        tx,
        w,
        h,
        seed,
        tpc,
        n_transcripts=len(tx),
        pixel_size_um=ps,
        he_um_per_px=he_px,
        he_rotation_deg=rot,
        controls=list(tx.feature_names[n_genes:]),
    )
    return sdata


def _he_geometry(w: float, h: float, he_px: float, rot_deg: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Affine (H&E pixel -> µm) and shape of an H&E scan covering the field with a margin, rotated by ``rot_deg``."""
    th = math.radians(rot_deg)
    c, s = math.cos(th), math.sin(th)
    rot = np.array([[c, -s], [s, c]])
    # the scan covers the rotated field's bounding box plus a 4% margin on each side
    ext_w = abs(c) * w + abs(s) * h
    ext_h = abs(s) * w + abs(c) * h
    margin = 0.04 * max(w, h)
    shape = (int(math.ceil((ext_h + 2 * margin) / he_px)), int(math.ceil((ext_w + 2 * margin) / he_px)))
    centre_px = np.array([shape[1] / 2, shape[0] / 2])
    centre_um = np.array([w / 2, h / 2])
    lin = he_px * rot
    affine = np.column_stack([lin, centre_um - lin @ centre_px])
    return affine, shape


def _ellipse_polygons(x, y, a, b, phi, n: int = 16) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ex = a[:, None] * np.cos(t)[None, :]
    ey = b[:, None] * np.sin(t)[None, :]
    c, s = np.cos(phi)[:, None], np.sin(phi)[:, None]
    px = x[:, None] + ex * c - ey * s
    py = y[:, None] + ex * s + ey * c
    ring = np.stack([px, py], axis=-1).astype(np.float64)
    ring = np.concatenate([ring, ring[:, :1]], axis=1)
    return shapely.polygons(ring)


# --------------------------------------------------------------------------------------------------------------------
# Visium
# --------------------------------------------------------------------------------------------------------------------
def synthetic_visium(
    *,
    size_um: SizeUm = "default",
    n_genes: int = 50,
    seed: int = 0,
    dataset_id: str = "synthetic_visium",
    fullres_um_per_px: float = 0.5,
    capture_efficiency: float = 0.3,
    diffusion_um: float = 2.0,
    transcripts_per_cell: float | None = None,
) -> SpatialData:
    """A synthetic Visium dataset, laid out as :func:`spatialdata_io.visium` reads one.

    Spots are 55 µm discs on a 100 µm hexagonal lattice (rows 86.6 µm apart, every other row offset by 50 µm). A
    spot counts the molecules of the tissue with the same ``seed`` (those of :func:`synthetic_xenium`) that fall in
    its disc after capture (each kept with probability ``capture_efficiency``) and lateral diffusion, plus a little
    ambient RNA. Only spots under tissue are kept, as in the filtered matrix.

    Parameters
    ----------
    size_um
        Field size: ``"default"`` (3000 µm), ``"slide"`` (6500 µm, a capture area), a side or ``(width, height)``.
    n_genes
        Panel size (1 to 5000), as in :func:`synthetic_xenium`.
    seed
        Seed; the same seed and size give the same tissue as :func:`synthetic_xenium`.
    dataset_id
        Name of the coordinate system (full-resolution pixels) and prefix of the element names.
    fullres_um_per_px
        Pixel size of the full-resolution H&E image, µm.
    capture_efficiency
        Share of the tissue's molecules that a spot captures, in (0, 1].
    diffusion_um
        Standard deviation of the lateral diffusion of molecules before capture, µm.
    transcripts_per_cell
        Mean molecules per cell in the tissue (before capture), as in :func:`synthetic_xenium`.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with, in coordinate system ``dataset_id`` (full-resolution pixels):

    - ``shapes[dataset_id]``: spot circles with ``radius`` = ``spot_diameter_fullres / 2`` as
      :func:`spatialdata_io.visium` writes them: Space Ranger's ``spot_diameter_fullres`` is the pixel width of a
      *65 µm* spot (the capture spots themselves are 55 µm), so the radius is 32.5 µm in pixels; index ``spot_id``.
    - ``images[f"{dataset_id}_full_image"]`` (5-level pyramid), ``images[f"{dataset_id}_hires_image"]`` (longest
      side 2000 px) and ``images[f"{dataset_id}_lowres_image"]`` (600 px), RGB uint8 with channels ``r, g, b``; the
      latter two also in ``f"{dataset_id}_downscaled_hires"`` / ``_lowres``.
    - ``tables["table"]``: spots x genes counts (CSR) annotating ``shapes[dataset_id]``; ``obs`` has ``in_tissue``,
      ``array_row``, ``array_col``, ``spot_id``, ``region`` and the truth ``n_cells``; ``obsm["spatial"]`` the spot
      centres in full-resolution pixels; ``obsm["cell_type_counts"]`` the cells of each type centred in the spot.

    ``attrs["synthetic"]`` records the parameters (``spot_diameter_fullres``, scale factors, ...).

    """
    w, h, n_genes, seed, tpc = _common(size_um, n_genes, seed, transcripts_per_cell)
    dataset_id = _check_id(dataset_id)
    um_px = _check_float("fullres_um_per_px", fullres_um_per_px, 0.05, 20.0)
    eff = _check_float("capture_efficiency", capture_efficiency, 0.0, 1.0, lo_open=True)
    diff = _check_float("diffusion_um", diffusion_um, 0.0, 50.0)

    tissue = T.simulate_tissue(w, h, seed=seed)
    panel = T.gene_panel(n_genes, seed=seed)
    tx = T.simulate_transcripts(tissue, panel, transcripts_per_cell=tpc, seed=seed, assay_noise=False)
    spots = T.capture_spots(tissue, tx, efficiency=eff, diffusion_um=diff, seed=seed)

    keep = np.flatnonzero(spots.in_tissue)
    barcodes = _barcodes(_rng(seed, "barcodes"), len(keep))
    order = np.argsort(barcodes, kind="stable")  # a filtered matrix lists barcodes in sorted order
    keep, barcodes = keep[order], barcodes[order]
    n = len(keep)
    centres_px = np.column_stack([spots.x[keep], spots.y[keep]]) / um_px
    # truth: cells centred in each spot's disc, by type
    cell_counts = _cells_in_discs(tissue, spots.x[keep], spots.y[keep], spots.diameter_um / 2)
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(n, np.int64),
            "array_row": spots.array_row[keep].astype(np.int64),
            "array_col": spots.array_col[keep].astype(np.int64),
            "spot_id": np.arange(n, dtype=np.int64),
            "region": pd.Categorical([dataset_id] * n),
            "n_cells": cell_counts.sum(axis=1).astype(np.int64),
        },
        index=pd.Index(barcodes),
    )
    adata = ad.AnnData(X=spots.counts[keep], obs=obs, var=_var(panel, genome=True))
    adata.obsm["spatial"] = centres_px
    adata.obsm["cell_type_counts"] = pd.DataFrame(cell_counts, index=obs.index, columns=list(T.CELL_TYPES))
    table = TableModel.parse(adata, region=dataset_id, region_key="region", instance_key="spot_id")

    token = f"visium-{seed}-{w}-{h}-{um_px}"
    images, hires, lowres = _spot_images(tissue, dataset_id, um_px, 2000, 600, ("y", "x"), token)
    # Space Ranger's convention: spot_diameter_fullres is the pixel width of a 65 µm spot (the capture spot is 55 µm)
    spot_diameter_fullres = VISIUM_FULLRES_SPOT_UM / um_px
    circles = ShapesModel.parse(
        centres_px,
        geometry=0,
        radius=spot_diameter_fullres / 2.0,
        index=obs["spot_id"].copy(),
        transformations=_spot_transformations(dataset_id, hires, lowres, ("y", "x")),
    )
    sdata = SpatialData(images=images, shapes={dataset_id: circles}, tables={"table": table})
    sdata.attrs["spatialdata_io_software_version"] = _SOFTWARE
    sdata.attrs["spatialdata_io_reader"] = "visium"
    sdata.attrs["synthetic"] = _attrs(
        "visium",
        tissue,
        panel,
        tx,
        w,
        h,
        seed,
        tpc,
        dataset_id=dataset_id,
        fullres_um_per_px=um_px,
        capture_efficiency=eff,
        diffusion_um=diff,
        scalefactors={
            "spot_diameter_fullres": spot_diameter_fullres,
            "tissue_hires_scalef": hires,
            "tissue_lowres_scalef": lowres,
            "fiducial_diameter_fullres": 65.0 / um_px,
        },
        spot_diameter_um=spots.diameter_um,
        spot_pitch_um=spots.pitch_um,
        n_spots_in_tissue=n,
    )
    return sdata


def _check_id(dataset_id: Any) -> str:
    if not isinstance(dataset_id, str) or not dataset_id or not all(ch.isalnum() or ch in "_-." for ch in dataset_id):
        msg = f"`dataset_id={dataset_id!r}` must be a non-empty string of letters, digits, '_', '-' or '.'."
        raise ValueError(msg)
    return dataset_id


def _cells_in_discs(tissue: T.Tissue, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    out = np.zeros((len(x), len(T.CELL_TYPES)), dtype=np.int64)
    if not len(x) or not tissue.n_cells:
        return out
    tree = cKDTree(np.column_stack([tissue.cells["x"], tissue.cells["y"]]))
    hits = tree.query_ball_point(np.column_stack([x, y]), r)
    rows = np.repeat(np.arange(len(x)), [len(v) for v in hits])
    cols = tissue.cells["type"][np.concatenate([np.asarray(v, dtype=np.int64) for v in hits])] if len(rows) else []
    np.add.at(out, (rows, np.asarray(cols, dtype=np.int64)), 1)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Visium HD
# --------------------------------------------------------------------------------------------------------------------
def synthetic_visium_hd(
    *,
    size_um: SizeUm = "default",
    n_genes: int = 50,
    seed: int = 0,
    dataset_id: str = "synthetic_visium_hd",
    bin_sizes: Sequence[int] = (2, 8, 16),
    fullres_um_per_px: float = 0.5,
    capture_efficiency: float = 0.3,
    diffusion_um: float = 2.0,
    transcripts_per_cell: float | None = None,
) -> SpatialData:
    """A synthetic Visium HD dataset, laid out as :func:`spatialdata_io.visium_hd` reads one (``bins_as_squares``).

    Bins count the molecules of the tissue with the same ``seed`` (those of :func:`synthetic_xenium`) after capture
    and lateral diffusion, on a 2 µm grid; larger bins are exact sums of their 2 µm bins, as in Space Ranger. Only
    bins under tissue are kept, as in the filtered matrices.

    Parameters
    ----------
    size_um
        Field size: ``"default"`` (3000 µm), ``"slide"`` (6500 µm), a side or ``(width, height)`` in µm.
    n_genes
        Panel size (1 to 5000), as in :func:`synthetic_xenium`.
    seed
        Seed; the same seed and size give the same tissue as :func:`synthetic_xenium`.
    dataset_id
        Name of the coordinate system (full-resolution pixels) and prefix of the element names.
    bin_sizes
        Bin sizes in µm: even integers from 2 to 100 (Space Ranger writes 2, 8 and 16).
    fullres_um_per_px
        Pixel size of the full-resolution H&E image, µm.
    capture_efficiency
        Share of the tissue's molecules that the bins capture, in (0, 1].
    diffusion_um
        Standard deviation of the lateral diffusion of molecules before capture, µm.
    transcripts_per_cell
        Mean molecules per cell in the tissue (before capture), as in :func:`synthetic_xenium`.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with, in coordinate system ``dataset_id`` (full-resolution pixels), for each
    bin size ``b``:

    - ``tables[f"square_{b:03d}um"]``: bins x genes counts (CSR); ``obs`` has ``in_tissue``, ``array_row``,
      ``array_col``, ``location_id`` and ``region``; ``obsm["spatial"]`` the bin centres in full-resolution pixels.
    - ``shapes[f"{dataset_id}_square_{b:03d}um"]``: the bins as squares in full-resolution pixels.

    and the images ``f"{dataset_id}_full_image"`` (5-level pyramid), ``_hires_image`` (longest side 6000 px) and
    ``_lowres_image`` (600 px). ``attrs["synthetic"]`` records the parameters.

    """
    w, h, n_genes, seed, tpc = _common(size_um, n_genes, seed, transcripts_per_cell)
    dataset_id = _check_id(dataset_id)
    um_px = _check_float("fullres_um_per_px", fullres_um_per_px, 0.05, 20.0)
    eff = _check_float("capture_efficiency", capture_efficiency, 0.0, 1.0, lo_open=True)
    diff = _check_float("diffusion_um", diffusion_um, 0.0, 50.0)
    if isinstance(bin_sizes, int | np.integer):
        bin_sizes = [int(bin_sizes)]
    sizes = sorted({_check_int("bin_sizes", b, 2, 100) for b in bin_sizes}) if len(bin_sizes) else []
    if not sizes or any(b % 2 for b in sizes):
        msg = f"`bin_sizes={bin_sizes!r}` must be a non-empty sequence of even integers between 2 and 100 µm."
        raise ValueError(msg)

    tissue = T.simulate_tissue(w, h, seed=seed)
    panel = T.gene_panel(n_genes, seed=seed)
    tx = T.simulate_transcripts(tissue, panel, transcripts_per_cell=tpc, seed=seed, assay_noise=False)
    grids = T.capture_bins(tissue, tx, tuple(sizes), efficiency=eff, diffusion_um=diff, seed=seed)

    token = f"visium_hd-{seed}-{w}-{h}-{um_px}"
    images, hires, lowres = _spot_images(tissue, dataset_id, um_px, 6000, 600, ("x", "y"), token)
    transformations = _spot_transformations(dataset_id, hires, lowres, ("x", "y"))
    var = _var(panel, genome=True)
    bins = {}
    for b in sizes:
        keep = np.flatnonzero(grids[b].in_tissue)
        rows, cols = keep // grids[b].n_cols, keep % grids[b].n_cols
        bins[b] = (keep, rows, cols, np.column_stack([(cols + 0.5) * b, (rows + 0.5) * b]) / um_px)
    tables, shapes = {}, {}
    for b in sizes:
        keep, rows, cols, centres = bins[b]
        n = len(keep)
        name = f"square_{b:03d}um"
        region = f"{dataset_id}_{name}"
        obs = pd.DataFrame(
            {
                "in_tissue": np.ones(n, np.int64),
                "array_row": rows.astype(np.int64),
                "array_col": cols.astype(np.int64),
                "location_id": np.arange(n, dtype=np.int64),
                "region": pd.Categorical.from_codes(np.zeros(n, np.int8), categories=[region]),
            },
            index=pd.Index(_hd_barcodes(b, rows, cols)),
        )
        adata = ad.AnnData(X=grids[b].counts[keep], obs=obs, var=var.copy())
        adata.obsm["spatial"] = centres
        tables[name] = TableModel.parse(adata, region=region, region_key="region", instance_key="location_id")
        shapes[region] = ShapesModel.parse(
            gpd.GeoDataFrame(geometry=_squares(centres, b / um_px / 2)), transformations=transformations
        )

    sdata = SpatialData(images=images, shapes=shapes, tables=tables)
    sdata.attrs["spatialdata_io_software_version"] = _SOFTWARE
    sdata.attrs["spatialdata_io_reader"] = "visium_hd"
    sdata.attrs["synthetic"] = _attrs(
        "visium_hd",
        tissue,
        panel,
        tx,
        w,
        h,
        seed,
        tpc,
        dataset_id=dataset_id,
        bin_sizes=sizes,
        fullres_um_per_px=um_px,
        capture_efficiency=eff,
        diffusion_um=diff,
        scalefactors={
            "tissue_hires_scalef": hires,
            "tissue_lowres_scalef": lowres,
            "microns_per_pixel": um_px,
        },
    )
    return sdata


def _squares(centres: np.ndarray, half: float) -> np.ndarray:
    x, y = centres[:, 0], centres[:, 1]
    return shapely.box(x - half, y - half, x + half, y + half)


def _hd_barcodes(b: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``s_008um_00012_00034-1`` barcodes, built without a Python loop."""
    n = len(rows)
    buf = np.empty((n, 21), dtype=np.uint8)
    buf[:, :8] = np.frombuffer(f"s_{b:03d}um_".encode(), dtype=np.uint8)
    # zero-padded digits of every index, looked up rather than computed per bin
    m = int(max(rows.max(initial=0), cols.max(initial=0))) + 1
    digits = (np.arange(m)[:, None] // 10 ** np.arange(4, -1, -1) % 10 + ord("0")).astype(np.uint8)
    buf[:, 8:13] = digits[rows]
    buf[:, 13] = ord("_")
    buf[:, 14:19] = digits[cols]
    buf[:, 19:21] = np.frombuffer(b"-1", dtype=np.uint8)
    return buf.view("S21").ravel().astype("U21").astype(object)
