"""Small public real datasets, downloaded with :mod:`pooch` (pinned URLs and sha256) or read from a local copy.

Every raw file is listed once in :data:`REGISTRY`, keyed by its path relative to the dataset root (the layout of
``diffst.settings.datadir``, of the download cache and of ``../shared/data``). When ``diffst.settings.datadir`` (env
``DIFFST_DATA_DIR``) is set, files are read from there and nothing is downloaded; otherwise they are fetched into
``diffst.settings.cachedir``, in the same layout, and checked against the pinned checksum.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pandas as pd
import pooch
import shapely
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, Translation

from diffst._logging import debug, info
from diffst._settings import settings

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["REGISTRY", "cosmx_lung", "her2st", "merfish_mouse_brain"]

_GIOTTO_COMMIT = "1dc55ee8195104a81549b9e3fad04bd459b226de"
_HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
# Neither repository shows a .gitattributes (no Git LFS), so raw.githubusercontent.com serves the files themselves; a
# file stored with LFS would need https://media.githubusercontent.com/media/<owner>/<repo>/<commit>/<path> instead.
_GIOTTO = f"https://raw.githubusercontent.com/josschavezf/GiottoData/{_GIOTTO_COMMIT}/inst/Mini_datasets"
_HER2ST = f"https://raw.githubusercontent.com/almaan/her2st/{_HER2ST_COMMIT}/data"

_MERFISH = "merfish_mousebrain_giotto"
_HER2ST_DIR = "her2st_st"
_COSMX = "cosmx_lung_giotto"

# her2st section -> H&E file under data/ST-imgs/ of almaan/her2st. The names are the lab's slide ids, not the section
# ids: taken from a file listing of the repository (seen at commit 9f2260c6), not yet downloaded from the pinned one.
_HER2ST_IMAGES = {
    "B4": "B/B4/BT10737_D2_HE.jpg",
    "C2": "C/C2/5714_HE_BT_C2.jpg",
    "C3": "C/C3/5714_HE_BT_D1.jpg",
    "C4": "C/C4/5714_HE_BT_D2.jpg",
    "C5": "C/C5/5714_HE_BT_E1.jpg",
    "C6": "C/C6/5714_HE_BT_E2.jpg",
}
HER2ST_SECTIONS = tuple(_HER2ST_IMAGES)

#: Local path (relative to the data root) -> (pinned URL, sha256 of the file).
REGISTRY: dict[str, tuple[str, str]] = {
    # Vizgen MERFISH mouse brain (GiottoData mini dataset, MIT)
    f"{_MERFISH}/vizgen_transcripts.gz": (
        f"{_GIOTTO}/Vizgen/Raw/vizgen_transcripts.gz",
        "b0440c5617efff80b4f3982fa12a3960d88c104838a20f544966f7d7b2cd04ba",
    ),
    f"{_MERFISH}/cell_boundaries/z0_polygons.gz": (
        f"{_GIOTTO}/Vizgen/Raw/cell_boundaries/z0_polygons.gz",
        "8e9229a10d2f5ca0fe111a6791f865085fcae86a58fa12e77b1b3bd0853d75c5",
    ),
    f"{_MERFISH}/cell_boundaries/z1_polygons.gz": (
        f"{_GIOTTO}/Vizgen/Raw/cell_boundaries/z1_polygons.gz",
        "b254ed5fe5616090827a7bbad646732ba426046cdba057aa7902464fc582ad04",
    ),
    f"{_MERFISH}/images/mini_dataset_dapi_z0.jpg": (
        f"{_GIOTTO}/Vizgen/Raw/images/mini_dataset_dapi_z0.jpg",
        "4e6019729ac67c4a218e02102493078195e7e42ca281e0c122c3824322c5e8b0",
    ),
    f"{_MERFISH}/images/mini_dataset_dapi_z1.jpg": (
        f"{_GIOTTO}/Vizgen/Raw/images/mini_dataset_dapi_z1.jpg",
        "0d21537d5567ae29c21ce7d36e25446550accde0875b4f7250b28250614a5a38",
    ),
    f"{_MERFISH}/images/mini_dataset_polyT_z0.jpg": (
        f"{_GIOTTO}/Vizgen/Raw/images/mini_dataset_polyT_z0.jpg",
        "17347ae38b9a03899a6aa2e4459ad2958bfd5f02333882c7186593976af2b53d",
    ),
    f"{_MERFISH}/images/mini_dataset_polyT_z1.jpg": (
        f"{_GIOTTO}/Vizgen/Raw/images/mini_dataset_polyT_z1.jpg",
        "f8ace79125068668c13f97f2e2d1b0614de01e321f73af621861be55c394c94d",
    ),
    # NanoString CosMx lung (GiottoData mini dataset, MIT)
    f"{_COSMX}/Lung12_tx_file.csv": (
        f"{_GIOTTO}/CosMx/Raw/Lung12_tx_file.csv",
        "dce78810038765835afb2dfdf0d3c1a402a3cdc74bce936349f439d7fa429c15",
    ),
    f"{_COSMX}/Lung12_fov_positions_file.csv": (
        f"{_GIOTTO}/CosMx/Raw/Lung12_fov_positions_file.csv",
        "0687639b2579e50e1cb59d08643bb7722e259811ad421d34bb9f2977e05ca75f",
    ),
    f"{_COSMX}/CellComposite/CellComposite_F002.jpg": (
        f"{_GIOTTO}/CosMx/Raw/CellComposite/CellComposite_F002.jpg",
        "cab5dc584916f44095712a9728371c2f4236d05a434b3508122cf017f4d766cc",
    ),
    f"{_COSMX}/CellComposite/CellComposite_F003.jpg": (
        f"{_GIOTTO}/CosMx/Raw/CellComposite/CellComposite_F003.jpg",
        "c027338a7d48ac346e124f0e775b1a82f9622b0bb9c90388b32d449c14d01067",
    ),
    f"{_COSMX}/CellLabels/CellLabels_F002.tif": (
        f"{_GIOTTO}/CosMx/Raw/CellLabels/CellLabels_F002.tif",
        "ee5e33a243275fe5e7bdb97854db07a7da6cc35e9f468628ab264782e933a4ea",
    ),
    f"{_COSMX}/CellLabels/CellLabels_F003.tif": (
        f"{_GIOTTO}/CosMx/Raw/CellLabels/CellLabels_F003.tif",
        "cfc7af87b1810fe720c211496556c14204ae0fdec95bd3631ac5428e0d5838ba",
    ),
}

# her2st (Andersson et al. 2021): the local names differ from the repository's, hence the explicit table.
_HER2ST_SHA256 = {
    "B4": (
        "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
        "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
        "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
    ),
    "C2": (
        "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
        "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
        "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    ),
    "C3": (
        "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
        "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
        "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    ),
    "C4": (
        "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
        "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
        "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    ),
    "C5": (
        "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
        "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
        "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    ),
    "C6": (
        "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
        "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
        "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    ),
}
for _s, (_he, _counts, _selection) in _HER2ST_SHA256.items():
    REGISTRY[f"{_HER2ST_DIR}/{_s}/{_s}_HE.jpg"] = (f"{_HER2ST}/ST-imgs/{_HER2ST_IMAGES[_s]}", _he)
    REGISTRY[f"{_HER2ST_DIR}/{_s}/{_s}_counts.tsv.gz"] = (f"{_HER2ST}/ST-cnts/{_s}.tsv.gz", _counts)
    REGISTRY[f"{_HER2ST_DIR}/{_s}/{_s}_selection.tsv"] = (f"{_HER2ST}/ST-spotfiles/{_s}_selection.tsv", _selection)
del _s, _he, _counts, _selection

# Vizgen mini dataset: image extent in µm (GiottoData's mini_vizgen script, `ultra_mini_extent`, y un-flipped).
_MERFISH_X_UM = (6400.029, 6900.037)
_MERFISH_Y_UM = (4699.967, 5150.007)
_MERFISH_STAINS = {"DAPI": "dapi", "PolyT": "polyT"}  # channel name (spatialdata-io merscope) -> file stem

_HER2ST_PITCH_UM = 200.0  # ST 1k array: spots 100 µm across on a 200 µm centre-to-centre grid
_HER2ST_SPOT_DIAMETER_UM = 100.0

_COSMX_UM_PER_PX = 0.18  # NanoString's figure for this instrument generation; not stored in the files
_COSMX_FOVS = (2, 3)
_COSMX_NEGATIVE = re.compile(r"^(NegPrb|Negative|SystemControl)")


def _fetch(relpath: str) -> Path:
    """Path of one registered raw file: from ``settings.datadir`` if set, else downloaded into the cache."""
    url, sha256 = REGISTRY[relpath]
    if settings.datadir is not None:
        path = Path(settings.datadir).expanduser() / relpath
        if not path.is_file():
            msg = (
                f"`diffst.settings.datadir` (env DIFFST_DATA_DIR) is set to {str(settings.datadir)!r}, but {relpath!r} "
                f"is not there (expected {str(path)!r}). Put the file there (it is {url}), or set "
                "`diffst.settings.datadir = None` / unset DIFFST_DATA_DIR to download it."
            )
            raise FileNotFoundError(msg)
        debug(f"reading {path}")
        return path
    rel = Path(relpath)
    target = Path(settings.cachedir).expanduser() / rel.parent
    fname = pooch.retrieve(
        url=url,
        known_hash=f"sha256:{sha256}",
        fname=rel.name,
        path=target,
        progressbar=settings.verbosity >= 1,
    )
    return Path(fname)


def _read_image(path: Path) -> np.ndarray:
    """Read a JPEG/TIFF as stored (no EXIF rotation: the coordinates in the data refer to the stored pixels)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the her2st H&E images (~92 Mpx) exceed Pillow's decompression-bomb guard
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _um_to_px_affine(x0: float, y0: float, um_per_px_x: float, um_per_px_y: float) -> Affine:
    """µm -> image pixels: ``col = (x - x0) / um_per_px_x``, ``row = (y - y0) / um_per_px_y``."""
    matrix = np.array(
        [
            [1 / um_per_px_x, 0.0, -x0 / um_per_px_x],
            [0.0, 1 / um_per_px_y, -y0 / um_per_px_y],
            [0.0, 0.0, 1.0],
        ]
    )
    return Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))


# --------------------------------------------------------------------------------------------------------------------
# MERFISH
# --------------------------------------------------------------------------------------------------------------------


def merfish_mouse_brain(*, z: int = 0, include_polyT: bool = True, include_blanks: bool = False) -> SpatialData:
    """Vizgen MERFISH of the mouse brain, a 500 × 450 µm crop with DAPI/PolyT images (subcellular transcripts).

    The GiottoData "mini Vizgen" dataset, a crop of the public Vizgen MERFISH Mouse Brain Receptor Map release:
    80,343 transcripts of 559 codewords (450 genes and 109 ``Blank-*`` controls, see ``include_blanks``) on two
    z-planes, cell boundaries of about 500 cells, and 8-bit DAPI and PolyT images of 4143 × 4603 pixels per plane.
    Source: `josschavezf/GiottoData <https://github.com/josschavezf/GiottoData>`_ (a fork of GiottoData, MIT licence),
    ``inst/Mini_datasets/Vizgen/Raw/`` at commit ``1dc55ee8195104a81549b9e3fad04bd459b226de``.

    The layout follows :func:`spatialdata_io.merscope` / Xenium: coordinate system ``"global"`` is the image pixels,
    µm per pixel 0.10863 (the image extent, 500.008 × 450.040 µm, over its 4603 × 4143 pixels).

    Parameters
    ----------
    z
        z-plane (0 or 1) of the image and of the cell boundaries.
    include_polyT
        Add the PolyT stain as a second image channel (after DAPI).
    include_blanks
        Keep the ``Blank-*`` control codewords in the transcripts (they never enter the table).

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with

    - ``images["morphology"]``: uint8 ``(c, y, x)`` with channels ``["DAPI", "PolyT"]`` (or ``["DAPI"]``) of plane
      ``z``, a multiscale pyramid, ``Identity`` to ``"global"``.
    - ``points["transcripts"]``: in µm, columns ``x``, ``y`` (``global_x``/``global_y``), ``z`` (``global_z``, the
      plane index 0/1: transcripts of both planes are kept) and ``gene`` (categorical, the feature key); an ``Affine``
      to ``"global"``: ``col = (x - 6400.029) / 0.10863``, ``row = (y - 4699.967) / 0.10863``.
    - ``shapes["cell_boundaries"]``: cell polygons of plane ``z`` in µm (the file stores ``-y``; un-flipped here),
      index ``cell_id``, same transform as the transcripts.
    - ``tables["table"]``: cells × genes counts (``Blank-*`` excluded) of the transcripts of both planes that fall
      inside each polygon of plane ``z``; ``obs["region"] = "cell_boundaries"``, instance key ``cell_id``,
      ``obsm["spatial"]`` the polygon centroids in µm.

    Examples
    --------
    >>> import diffst as dst
    >>> sdata = dst.datasets.merfish_mouse_brain()  # doctest: +SKIP

    """
    if z not in (0, 1):
        msg = f"`z` must be 0 or 1 (the two z-planes of this dataset), got {z!r}."
        raise ValueError(msg)

    x0, x1 = _MERFISH_X_UM
    y0, y1 = _MERFISH_Y_UM
    stains = ["DAPI", "PolyT"] if include_polyT else ["DAPI"]
    planes = [_read_image(_fetch(f"{_MERFISH}/images/mini_dataset_{_MERFISH_STAINS[s]}_z{z}.jpg")) for s in stains]
    shapes_ = {p.shape for p in planes}
    if len(shapes_) != 1 or planes[0].ndim != 2:
        msg = f"The MERFISH images of plane z={z} should be greyscale and of one shape, got {sorted(shapes_)}."
        raise ValueError(msg)
    n_rows, n_cols = planes[0].shape
    um_per_px_x = (x1 - x0) / n_cols
    um_per_px_y = (y1 - y0) / n_rows
    to_global = _um_to_px_affine(x0, y0, um_per_px_x, um_per_px_y)
    image = Image2DModel.parse(
        np.stack(planes).astype(np.uint8, copy=False),
        dims=("c", "y", "x"),
        c_coords=stains,
        scale_factors=[2, 2, 2],
        chunks=(1, 2048, 2048),
        transformations={"global": Identity()},
    )

    tx = pd.read_csv(_fetch(f"{_MERFISH}/vizgen_transcripts.gz"))
    tx["gene"] = tx["gene"].astype(str)
    is_blank = tx["gene"].str.startswith("Blank-")
    if not include_blanks:
        tx = tx.loc[~is_blank].reset_index(drop=True)
    tx["gene"] = tx["gene"].astype("category")
    cells = _merfish_polygons(_fetch(f"{_MERFISH}/cell_boundaries/z{z}_polygons.gz"))
    table = _merfish_table(tx, cells)
    points = PointsModel.parse(
        tx,
        coordinates={"x": "global_x", "y": "global_y", "z": "global_z"},
        feature_key="gene",
        transformations={"global": to_global},
    )
    cells = ShapesModel.parse(cells, transformations={"global": to_global})
    info(
        f"MERFISH mouse brain: {len(tx):,} transcripts, {len(cells)} cells (z={z}), "
        f"image {n_rows} × {n_cols} px at {um_per_px_x:.5f} µm/px"
    )
    return SpatialData(
        images={"morphology": image},
        points={"transcripts": points},
        shapes={"cell_boundaries": cells},
        tables={"table": table},
    )


def _merfish_polygons(path: Path) -> gpd.GeoDataFrame:
    """Cell polygons from Giotto's ``x, y, poly_ID`` vertex table (``y`` stored as ``-global_y``)."""
    df = pd.read_csv(path, dtype={"poly_ID": str})
    codes, ids = pd.factorize(df["poly_ID"], sort=False)
    coords = np.column_stack([df["x"].to_numpy(), -df["y"].to_numpy()])
    rings = shapely.linearrings(coords, indices=codes)
    polygons = shapely.make_valid(shapely.polygons(rings))
    gdf = gpd.GeoDataFrame({"geometry": polygons}, index=pd.Index(np.asarray(ids, dtype=str), name="cell_id"))
    # make_valid may split a self-touching outline into a collection: keep the polygonal part
    keep = gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not keep.all():
        gdf.loc[~keep, "geometry"] = gdf.loc[~keep, "geometry"].map(
            lambda g: shapely.MultiPolygon([p for p in g.geoms if p.geom_type == "Polygon"])
        )
    return gdf


def _merfish_table(tx: pd.DataFrame, cells: gpd.GeoDataFrame) -> AnnData:
    """Cells × genes counts of the transcripts inside each cell polygon (a spatial join, a fraction of a second)."""
    genes = [g for g in tx["gene"].cat.categories if not g.startswith("Blank-")]
    tx = tx.loc[tx["gene"].isin(genes)]
    pts = gpd.GeoDataFrame(
        {"gene": tx["gene"].to_numpy()},
        geometry=gpd.points_from_xy(tx["global_x"], tx["global_y"]),
    )
    polys = gpd.GeoDataFrame({"cell_idx": np.arange(len(cells))}, geometry=cells.geometry.to_numpy())
    joined = gpd.sjoin(pts, polys, how="inner", predicate="within")
    joined = joined[~joined.index.duplicated(keep="first")]  # overlapping outlines: count a transcript once
    gene_idx = pd.Categorical(joined["gene"].astype(str), categories=genes).codes
    counts = sparse.coo_matrix(
        (np.ones(len(joined), dtype=np.float32), (joined["cell_idx"].to_numpy(), gene_idx)),
        shape=(len(cells), len(genes)),
    ).tocsr()
    centroids = cells.geometry.centroid
    obs = pd.DataFrame(
        {
            "cell_id": cells.index.to_numpy(),
            "region": pd.Categorical(["cell_boundaries"] * len(cells)),
        },
        index=cells.index.to_numpy(),
    )
    adata = AnnData(counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()])
    debug(f"{len(joined):,} of {len(tx):,} gene transcripts fall inside a cell polygon")
    return TableModel.parse(adata, region="cell_boundaries", region_key="region", instance_key="cell_id")


# --------------------------------------------------------------------------------------------------------------------
# her2st (ST)
# --------------------------------------------------------------------------------------------------------------------


def her2st(section: str = "C3") -> SpatialData:
    """A HER2-positive breast tumour section of Spatial Transcriptomics (ST 1k array) with its H&E image.

    Data of Andersson et al., *Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated cell
    type interactions*, Nat Commun 2021, from `almaan/her2st <https://github.com/almaan/her2st>`_ at commit
    ``85df7411b987a7dec3feff9718b869a7a82091ec`` (``data/ST-cnts``, ``data/ST-spotfiles``, ``data/ST-imgs``).
    The repository has no licence file: use it for development and demonstration, do not redistribute it.
    Sections: B4 (shallow, ~650 UMI per spot) and C2–C6 (one patient, 8.5k–12.4k UMI per spot); about 180–280 spots
    of 100 µm diameter on a 200 µm grid, ~15.5k genes, an H&E image of about 9.3k × 9.9k pixels.

    Parameters
    ----------
    section
        One of ``"B4"``, ``"C2"``, ``"C3"``, ``"C4"``, ``"C5"``, ``"C6"``.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` in the layout of :func:`spatialdata_io.visium`, coordinate system ``section``
    = full-resolution image pixels:

    - ``images[f"{section}_full_image"]``: RGB uint8 ``(c, y, x)``, channels ``r, g, b``, multiscale, ``Identity``.
    - ``shapes[section]``: the spots as circles at ``(pixel_x, pixel_y)`` with ``radius`` = 50 µm in pixels, index
      ``spot_id``.
    - ``tables["table"]``: spots × genes raw counts (sparse, float32 holding integers) of the selected spots, obs names
      ``"{x}x{y}"`` (array coordinates), ``obs`` with ``array_row`` (= y), ``array_col`` (= x), ``in_tissue``,
      ``spot_id``, ``region``; ``obsm["spatial"]`` = ``(pixel_x, pixel_y)``; ``uns["spot_diameter_um"] = 100``,
      ``uns["spot_pitch_um"] = 200`` and the derived ``uns["um_per_px"]`` / ``uns["spot_pitch_px"]``.

    The µm per pixel is derived from the spot lattice: the median distance in pixels between array neighbours is
    the 200 µm pitch (≈ 290 px, so ≈ 0.69 µm/px). diffst reads µm/px from that pitch (the array coordinates form a
    square lattice, unlike Visium's hexagonal one), cross-checked against the radius, which here is
    ``uns["spot_diameter_um"]`` wide (not Space Ranger's 65 µm convention).

    Examples
    --------
    >>> import diffst as dst
    >>> sdata = dst.datasets.her2st("C3")  # doctest: +SKIP

    """
    if section not in _HER2ST_IMAGES:
        msg = f"Unknown her2st section {section!r}; choose one of {list(HER2ST_SECTIONS)}."
        raise ValueError(msg)

    root = f"{_HER2ST_DIR}/{section}/{section}"
    sel = pd.read_csv(_fetch(f"{root}_selection.tsv"), sep="\t")
    sel.index = sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str)
    pitch_px = _st_pitch_px(sel)
    um_per_px = _HER2ST_PITCH_UM / pitch_px
    radius = _HER2ST_SPOT_DIAMETER_UM / 2 / um_per_px

    counts = pd.read_csv(_fetch(f"{root}_counts.tsv.gz"), sep="\t", index_col=0)
    counts.index = counts.index.astype(str)
    keep = sel.index[(sel["selected"] == 1).to_numpy()].intersection(counts.index, sort=False)
    if len(keep) == 0:
        msg = f"No selected spot of her2st section {section!r} has counts; the downloaded files may be damaged."
        raise ValueError(msg)
    counts = counts.loc[keep]
    sel = sel.loc[keep]
    values = counts.to_numpy()
    if (values < 0).any() or not np.array_equal(values, np.round(values)):
        msg = f"The her2st counts of section {section!r} are not non-negative integers."
        raise ValueError(msg)

    obs = pd.DataFrame(
        {
            "array_row": sel["y"].astype(int).to_numpy(),
            "array_col": sel["x"].astype(int).to_numpy(),
            "in_tissue": 1,
            "spot_id": np.arange(len(sel)),
            "region": pd.Categorical([section] * len(sel)),
        },
        index=keep,
    )
    adata = AnnData(
        sparse.csr_matrix(values.astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.var_names_make_unique()
    xy = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    adata.obsm["spatial"] = xy
    adata.uns["spot_diameter_um"] = _HER2ST_SPOT_DIAMETER_UM
    adata.uns["spot_pitch_um"] = _HER2ST_PITCH_UM
    adata.uns["spot_pitch_px"] = float(pitch_px)
    adata.uns["um_per_px"] = float(um_per_px)
    table = TableModel.parse(adata, region=section, region_key="region", instance_key="spot_id")

    spots = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(xy), radius),
        index=pd.Index(obs["spot_id"].to_numpy(), name="spot_id"),
        transformations={section: Identity()},
    )

    rgb = _read_image(_fetch(f"{root}_HE.jpg"))
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        msg = f"The her2st H&E image of section {section!r} should be RGB, got an array of shape {rgb.shape}."
        raise ValueError(msg)
    image = Image2DModel.parse(
        np.moveaxis(rgb, 2, 0),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2, 2, 2, 2],
        chunks=(3, 2048, 2048),
        transformations={section: Identity()},
    )
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < rgb.shape[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < rgb.shape[0])
    if not inside.all():
        msg = f"{(~inside).sum()} spot centres of her2st section {section!r} lie outside its H&E image {rgb.shape}."
        raise ValueError(msg)
    info(
        f"her2st {section}: {adata.n_obs} spots × {adata.n_vars} genes, spot pitch {pitch_px:.1f} px "
        f"-> {um_per_px:.4f} µm/px (from the 200 µm lattice)"
    )
    return SpatialData(
        images={f"{section}_full_image": image},
        shapes={section: spots},
        tables={"table": table},
    )


def _st_pitch_px(sel: pd.DataFrame) -> float:
    """Median pixel distance between array neighbours (x ± 1 or y ± 1) of an ST selection table."""
    pos = sel[["x", "y", "pixel_x", "pixel_y"]].astype({"x": int, "y": int})
    dists = []
    for dx, dy in ((1, 0), (0, 1)):
        shifted = pos.assign(x=pos["x"] + dx, y=pos["y"] + dy)
        pairs = shifted.merge(pos, on=["x", "y"], suffixes=("_a", "_b"))
        dists.append(np.hypot(pairs["pixel_x_a"] - pairs["pixel_x_b"], pairs["pixel_y_a"] - pairs["pixel_y_b"]))
    d = np.concatenate(dists)
    if d.size < 3:
        msg = "Too few neighbouring spots to measure the ST spot pitch."
        raise ValueError(msg)
    return float(np.median(d))


# --------------------------------------------------------------------------------------------------------------------
# CosMx
# --------------------------------------------------------------------------------------------------------------------


def cosmx_lung(*, fovs: Sequence[int] = _COSMX_FOVS) -> SpatialData:
    """NanoString CosMx SMI of a lung tumour (Lung12), two crops of 672 × 648 pixels (~120 × 117 µm) of FOVs 2 and 3.

    The GiottoData "mini CosMx" dataset: 25,825 transcripts of 960 targets and 20 negative probes (``NegPrb*``), the
    RGB immunofluorescence composite and the cell label image of each FOV crop. Source: `josschavezf/GiottoData
    <https://github.com/josschavezf/GiottoData>`_ (MIT), ``inst/Mini_datasets/CosMx/Raw/`` at commit
    ``1dc55ee8195104a81549b9e3fad04bd459b226de``. 0.18 µm per pixel is NanoString's platform figure for this
    instrument generation; the files do not store it.

    Where things are: a crop's pixel ``(row, col)`` holds the transcripts at ``col = x_local_px - x_crop + 0.5``,
    ``row = y_crop - y_local_px + 0.5`` in spatialdata's continuous pixel coordinates (pixel ``i`` spans
    ``[i, i + 1)``), where ``(x_crop, y_crop)`` is the crop's top-left corner in the FOV's local pixels
    ((4800, 3648) for FOV 2, (0, 3648) for FOV 3, read from the label GeoTIFF's tie point). The local ``y`` axis points
    up, so rows are flipped; with this mapping every transcript with a ``cell_ID`` lands on that cell's label. The two
    crops are placed with the FOV positions file (``global = local + fov offset``), which puts them side by side.

    Parameters
    ----------
    fovs
        FOVs to load, a subset of ``(2, 3)``.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with coordinate system ``"global"`` = pixels of a common frame
    (``X = x_global_px - x0``, ``Y = y0 - y_global_px``, ``(x0, y0)`` the top-left corner of the loaded crops):

    - ``images[f"{fov}_image"]``: the RGB composite, uint8 ``(c, y, x)``, channels ``r, g, b`` (a fluorescence
      composite, bright cells on a dark background, not H&E), a ``Translation`` to ``"global"``. Element names as in
      :func:`spatialdata_io.cosmx`, whose images are flipped instead of the coordinates.
    - ``labels[f"{fov}_labels"]``: the cell labels (``cell_ID`` of the FOV), int32, same transform.
    - ``points["transcripts"]``: all FOVs in one element, in µm (``x = 0.18 X``, ``y = 0.18 Y``) with
      ``Scale(1 / 0.18)`` to ``"global"``; feature key ``target``; negative probes are kept; the original columns are
      kept (``fov``, ``cell_ID``, ``CellComp``, ``x/y_local_px``, ``x/y_global_px``, ``z`` renamed ``z_raw`` as in
      spatialdata-io because it is a slice index, not a coordinate).
    - ``tables["table"]``: cells (every label of the loaded crops) × targets, counts of the transcripts the file
      assigns to each cell (``cell_ID > 0``), negative probes dropped (their per-cell count is in
      ``obs["negprobe_counts"]``); ``obs["fov_labels"]`` = ``f"{fov}_labels"`` (region key), ``obs["cell_ID"]``
      (instance key), ``obs["fov"]``; ``obsm["spatial"]``: label centroids in ``"global"`` pixels.

    Examples
    --------
    >>> import diffst as dst
    >>> sdata = dst.datasets.cosmx_lung()  # doctest: +SKIP

    """
    fovs = [int(f) for f in fovs] if not isinstance(fovs, int | np.integer) else [int(fovs)]
    if not fovs or len(set(fovs)) != len(fovs) or not set(fovs) <= set(_COSMX_FOVS):
        msg = f"`fovs` must be a non-empty subset of {list(_COSMX_FOVS)} without repeats, got {fovs!r}."
        raise ValueError(msg)
    fovs = sorted(fovs)

    positions = pd.read_csv(_fetch(f"{_COSMX}/Lung12_fov_positions_file.csv")).set_index("fov")
    tx = pd.read_csv(_fetch(f"{_COSMX}/Lung12_tx_file.csv"))
    tx = tx.loc[tx["fov"].isin(fovs)].reset_index(drop=True)

    crops = {}
    for fov in fovs:
        labels_path = _fetch(f"{_COSMX}/CellLabels/CellLabels_F{fov:03d}.tif")
        rgb = _read_image(_fetch(f"{_COSMX}/CellComposite/CellComposite_F{fov:03d}.jpg"))
        lab, (x_crop, y_crop) = _read_geotiff_labels(labels_path)
        if rgb.shape[:2] != lab.shape:
            msg = f"CosMx FOV {fov}: composite {rgb.shape[:2]} and labels {lab.shape} differ in size."
            raise ValueError(msg)
        ox, oy = positions.loc[fov, ["x_global_px", "y_global_px"]].astype(float)
        crops[fov] = (rgb, lab, x_crop + ox, y_crop + oy)  # crop corner in global px (y up)
    x_origin = min(c[2] for c in crops.values()) - 0.5
    y_origin = max(c[3] for c in crops.values()) + 0.5

    images, labels = {}, {}
    for fov, (rgb, lab, gx, gy) in crops.items():
        # pixel-continuous (col, row) = (x_local - x_crop + 0.5, y_crop - y_local + 0.5)  ->  global frame
        shift = Translation([gx - 0.5 - x_origin, y_origin - gy - 0.5], axes=("x", "y"))
        images[f"{fov}_image"] = Image2DModel.parse(
            np.moveaxis(rgb, 2, 0),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={"global": shift},
        )
        labels[f"{fov}_labels"] = Labels2DModel.parse(lab, dims=("y", "x"), transformations={"global": shift})

    tx = tx.rename(columns={"z": "z_raw"})
    tx["x"] = (tx["x_global_px"] - x_origin) * _COSMX_UM_PER_PX
    tx["y"] = (y_origin - tx["y_global_px"]) * _COSMX_UM_PER_PX
    tx["target"] = tx["target"].astype("category")
    points = PointsModel.parse(
        tx,
        feature_key="target",
        transformations={"global": Scale([1 / _COSMX_UM_PER_PX, 1 / _COSMX_UM_PER_PX], axes=("x", "y"))},
    )
    table = _cosmx_table(tx, crops, x_origin, y_origin)
    info(f"CosMx lung: FOVs {fovs}, {len(tx):,} transcripts, {table.n_obs} cells × {table.n_vars} targets")
    return SpatialData(images=images, labels=labels, points={"transcripts": points}, tables={"table": table})


def _read_geotiff_labels(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Label image (float with NaN in the file) as int32, and its top-left corner in FOV-local pixels."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        tie = page.tags.get("ModelTiepointTag")
        scale = page.tags.get("ModelPixelScaleTag")
        tie = None if tie is None else tuple(tie.value)
        scale = None if scale is None else tuple(scale.value)
    if tie is None or scale is None or scale[:2] != (1.0, 1.0):
        msg = f"{path} has no GeoTIFF tie point with 1-pixel scale; cannot place the crop in its FOV."
        raise ValueError(msg)
    arr = np.nan_to_num(np.asarray(arr, dtype=float), nan=0.0)
    if (arr < 0).any() or not np.array_equal(arr, np.round(arr)):
        msg = f"{path} does not hold integer cell labels."
        raise ValueError(msg)
    return arr.astype(np.int32), (float(tie[3]), float(tie[4]))


def _cosmx_table(
    tx: pd.DataFrame,
    crops: dict[int, tuple[np.ndarray, np.ndarray, float, float]],
    x_origin: float,
    y_origin: float,
) -> AnnData:
    """Cells × targets counts from the transcripts' ``cell_ID`` (negative probes to ``obs``)."""
    targets = [t for t in tx["target"].cat.categories if not _COSMX_NEGATIVE.match(t)]
    obs_parts, centroids = [], []
    for fov, (_, lab, gx, gy) in crops.items():
        ids = np.unique(lab)
        ids = ids[ids > 0]
        flat = lab.ravel()
        rows, cols = np.divmod(np.arange(flat.size), lab.shape[1])
        n = np.bincount(flat, minlength=ids.max() + 1 if ids.size else 1)
        cy = np.bincount(flat, weights=rows + 0.5, minlength=n.size)[ids] / n[ids]
        cx = np.bincount(flat, weights=cols + 0.5, minlength=n.size)[ids] / n[ids]
        centroids.append(np.column_stack([cx + gx - 0.5 - x_origin, cy + y_origin - gy - 0.5]))
        obs_parts.append(pd.DataFrame({"fov": fov, "cell_ID": ids.astype(np.int64)}))
    obs = pd.concat(obs_parts, ignore_index=True)
    obs.index = obs["cell_ID"].astype(str) + "_" + obs["fov"].astype(str)
    row_of = pd.Series(np.arange(len(obs)), index=obs.index)

    assigned = tx.loc[tx["cell_ID"] > 0]
    key = assigned["cell_ID"].astype(str) + "_" + assigned["fov"].astype(str)
    known = key.isin(row_of.index).to_numpy()
    if not known.all():
        debug(f"{(~known).sum()} transcripts name a cell_ID absent from the label images; left out of the table")
    assigned, key = assigned.loc[known], key[known]
    rows = row_of.loc[key].to_numpy()
    is_neg = assigned["target"].astype(str).str.match(_COSMX_NEGATIVE).to_numpy()
    gene_idx = pd.Categorical(assigned["target"].astype(str), categories=targets).codes
    counts = sparse.coo_matrix(
        (np.ones((~is_neg).sum(), dtype=np.float32), (rows[~is_neg], gene_idx[~is_neg])),
        shape=(len(obs), len(targets)),
    ).tocsr()
    obs["negprobe_counts"] = np.bincount(rows[is_neg], minlength=len(obs))
    obs["fov_labels"] = pd.Categorical(obs["fov"].astype(str) + "_labels")
    obs["fov"] = pd.Categorical(obs["fov"].astype(str))
    adata = AnnData(counts, obs=obs, var=pd.DataFrame(index=pd.Index(targets)))
    adata.obsm["spatial"] = np.concatenate(centroids)
    return TableModel.parse(
        adata,
        region=sorted(obs["fov_labels"].cat.categories),
        region_key="fov_labels",
        instance_key="cell_ID",
    )
