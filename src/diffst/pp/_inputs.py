"""Find the image and the ST measurement in a user's SpatialData, check them, and read them in µm.

Three kinds of measurement are understood:

``transcripts``
    A points element with a gene column (Xenium, MERSCOPE/MERFISH, CosMx). Transcript coordinates are taken to be
    in µm, so µm per unit of the coordinate system follows from the points' transformation.
``spots``
    A table annotating circles (Visium, ST). µm per unit follows from the spot pitch (100 µm between Visium array
    neighbours, 200 µm on ST arrays) where the table has ``array_row``/``array_col``, cross-checked against the spot
    radius (Space Ranger's ``spot_diameter_fullres`` is the pixel width of a 65 µm spot); else from the radius.
``bins``
    Visium HD tables ``square_XXXum`` annotating square bins (or their circles, or rasterised labels). µm per unit
    follows from the bin side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst import _logging as log
from diffst._degradation import (
    ST_SPOT_DIAMETER_UM,
    ST_SPOT_PITCH_UM,
    VISIUM_FULLRES_SPOT_UM,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOT_PITCH_UM,
)
from diffst._spatial import (
    affine_to_cs,
    channel_names,
    element_cs,
    image_extent_cs,
    image_levels,
    linear_scale,
    pick_key,
    suggest,
    transform_points,
)

from ._transcripts import Transcripts

if TYPE_CHECKING:
    from spatialdata import SpatialData

_BIN_TABLE = re.compile(r"^square_(\d{3})um$")

#: Feature names of control probes / codewords that are never selected as genes.
CONTROL_PATTERN = re.compile(
    r"^(negcontrol|negative|negprb|neg_ctrl|blank|unassigned|deprecatedcodeword|intergenic|antisense|systemcontrol|falsecode)",
    re.IGNORECASE,
)


@dataclass
class Measurement:
    """An ST measurement read into the µm frame of the source coordinate system."""

    kind: Literal["transcripts", "spots", "bins"]
    gene_names: list[str]
    # transcripts: read lazily, partition by partition; how many and where (from the first pass)
    transcripts: Transcripts | None = None
    n_transcripts: int = 0
    transcript_extent_um: tuple[float, float, float, float] | None = None
    # spots / bins: centres and a (n, genes) count matrix
    centres_um: np.ndarray | None = None
    counts: sp.csr_matrix | None = None
    spot_diameter_um: float | None = None
    bin_um: float | None = None
    bin_anchor_um: tuple[float, float] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def extent_um(self) -> tuple[float, float, float, float]:
        """Bounding box of the measurement (spot discs and bins included)."""
        if self.kind == "transcripts":
            return self.transcript_extent_um
        pad = (self.spot_diameter_um or 0.0) / 2.0 if self.kind == "spots" else (self.bin_um or 0.0) / 2.0
        c = self.centres_um
        return (
            float(c[:, 0].min() - pad),
            float(c[:, 1].min() - pad),
            float(c[:, 0].max() + pad),
            float(c[:, 1].max() + pad),
        )


@dataclass
class Inputs:
    """What :func:`resolve_inputs` found: the image, the coordinate system, the units and the measurement element."""

    kind: Literal["transcripts", "spots", "bins"]
    cs: str
    image_key: str
    um_per_px: float
    um_per_px_source: str
    image_um_per_px: float
    image_extent_um: tuple[float, float, float, float]
    points_key: str | None = None
    table_key: str | None = None
    shapes_key: str | None = None
    bin_um: float | None = None
    spot_diameter_um: float | None = None
    spot_pitch_um: float | None = None
    region: str | None = None  # the table's region (``region_key`` value) whose rows are read
    instance_column: str | None = None  # the obs column matching the shapes' index (None: the table's instance key)


#: Largest disagreement between the µm/px of the spot pitch and of the spot radius before a warning.
PITCH_RADIUS_TOLERANCE = 0.05


def _regions(table: Any) -> list[str]:
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    return [region] if isinstance(region, str) else [str(r) for r in (region or [])]


def _spot_tables(sdata: SpatialData) -> list[str]:
    out = []
    for name, table in sdata.tables.items():
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        regions = [region] if isinstance(region, str) else list(region or [])
        if any(r in sdata.shapes and "radius" in sdata.shapes[r].columns for r in regions):
            out.append(name)
    return out


def _annotated_shapes(
    sdata: SpatialData, table_key: str, image_cs: list[str], region: str | None
) -> tuple[str, str, str | None]:
    """The shapes element, the table region whose rows to read, and the obs column that indexes the shapes.

    A table may annotate several regions (slides concatenated): the one sharing a coordinate system with the image is
    taken, or ``region``. A Visium HD table annotating rasterised labels (``annotate_table_by_labels=True``) reads the
    bins of the shapes element ``*_<table key>`` beside them.
    """
    table = sdata.tables[table_key]
    regions = _regions(table)
    if region is not None:
        if region not in regions:
            msg = f"`region={region!r}` is not annotated by table {table_key!r}; it annotates {regions}.{suggest(region, regions)}"
            raise ValueError(msg)
        regions = [region]
    shapes = [r for r in regions if r in sdata.shapes]
    if not shapes and _BIN_TABLE.match(table_key):
        # annotate_table_by_labels=True: the table annotates labels; the bins are still in shapes '<id>_square_XXXum'
        return _bins_behind_labels(sdata, table_key, regions)
    if len(shapes) > 1:
        near = [r for r in shapes if set(element_cs(sdata.shapes[r])) & set(image_cs)]
        if len(near) == 1:
            shapes = near
        else:
            msg = (
                f"Table {table_key!r} annotates {len(shapes)} shapes elements {shapes}"
                + (f", {len(near)} of them in a coordinate system of the image" if near else "")
                + ": pass `region=` naming the one to use."
            )
            raise ValueError(msg)
    if not shapes:
        msg = (
            f"Table {table_key!r} annotates {regions}, none of which is a shapes element of spots or bins (shapes: "
            f"{list(sdata.shapes.keys())}). Parse it with `spatialdata.models.TableModel.parse(..., region=<shapes "
            "key>, instance_key=...)`, or pass `table_key=` naming the table of spot or bin counts."
        )
        raise ValueError(msg)
    return shapes[0], shapes[0], None


def _bins_behind_labels(sdata: SpatialData, table_key: str, regions: list[str]) -> tuple[str, str, str | None]:
    candidates = [k for k in sdata.shapes.keys() if k == table_key or k.endswith(f"_{table_key}")]
    if len(candidates) != 1:
        msg = (
            f"Table {table_key!r} annotates {regions} (labels, as `spatialdata_io.visium_hd(..., "
            "annotate_table_by_labels=True)` writes) and "
            + (
                f"several shapes {candidates} match it"
                if candidates
                else f"no shapes element '*_{table_key}' holds its bins"
            )
            + ": read the data with `annotate_table_by_labels=False`, or keep the bin shapes beside the labels."
        )
        raise ValueError(msg)
    shapes_key = candidates[0]
    table = sdata.tables[table_key]
    attrs = table.uns.get("spatialdata_attrs", {})
    index = sdata.shapes[shapes_key].index
    # the labels' instance key is a relabelled copy; find the obs column that indexes the shapes
    names = [str(attrs.get("instance_key", "")).removesuffix("_relabeled"), "location_id"] + list(table.obs.columns)
    for name in dict.fromkeys(n for n in names if n in table.obs.columns):
        values = table.obs[name]
        if pd.api.types.is_integer_dtype(values) and values.isin(index).all():
            region = regions[0] if len(regions) == 1 else None
            return shapes_key, region, name
    msg = (
        f"Table {table_key!r} annotates labels {regions}, and none of its obs columns indexes the bins of shapes "
        f"{shapes_key!r}: read the data with `spatialdata_io.visium_hd(..., annotate_table_by_labels=False)`."
    )
    raise ValueError(msg)


def diffst_products(sdata: SpatialData) -> set[str]:
    """Names of elements that diffst itself wrote (the elements its prepared data and SR results record)."""
    from .._contract import products

    return products(sdata)


def _pick_image(sdata: SpatialData, image_key: str | None) -> str:
    ours = diffst_products(sdata)
    names = [n for n in sdata.images.keys() if n not in ours]
    if image_key is None and len(names) > 1:
        # the same picture at several resolutions (Visium): take the finest one
        suffixes = ("_full_image", "_hires_image", "_lowres_image")
        stems = {n[: -len(s)] for n in names for s in suffixes if n.endswith(s)}
        if len(stems) == 1 and all(any(n.endswith(s) for s in suffixes) for n in names):
            (stem,) = stems
            for s in suffixes:
                if stem + s in names:
                    return stem + s
    return pick_key(
        "image", image_key, names, "image_key", why=" (diffst needs the tissue image, e.g. H&E or DAPI, to guide it)"
    )


def resolve_inputs(
    sdata: SpatialData,
    *,
    image_key: str | None,
    points_key: str | None,
    table_key: str | None,
    coordinate_system: str | None,
    um_per_px: float | None,
    spot_diameter_um: float | None,
    bin_size: int | None,
    hr_um: float,
    spot_pitch_um: float | None = None,
    region: str | None = None,
) -> Inputs:
    """Decide which elements to use and derive µm per unit of the coordinate system; errors name the fix."""
    image_key = _pick_image(sdata, image_key)
    image = sdata.images[image_key]
    instance_column = None
    table_region = None

    # which measurement
    kind: Literal["transcripts", "spots", "bins"]
    bin_tables = [t for t in sdata.tables if _BIN_TABLE.match(t)]
    shapes_key = None
    bin_um = None
    if table_key is None and (points_key is not None or len(sdata.points) > 0):
        kind = "transcripts"
        points_key = pick_key("points element", points_key, list(sdata.points.keys()), "points_key")
        element = sdata.points[points_key]
    else:
        if table_key is None:
            if bin_tables:
                table_key = _choose_bin_table(bin_tables, bin_size, hr_um)
            else:
                _check_not_segmentation_only(sdata)
                table_key = pick_key(
                    "table of spot counts",
                    None,
                    _spot_tables(sdata),
                    "table_key",
                    why=" and no transcripts: diffst needs transcripts (points), spots or Visium HD bins",
                )
        elif table_key not in sdata.tables:
            avail = list(sdata.tables.keys())
            msg = f"Table {table_key!r} (from `table_key`) is not in the SpatialData; it has {avail}.{suggest(table_key, avail)}"
            raise KeyError(msg)
        kind = "bins" if _BIN_TABLE.match(table_key) else "spots"
        if kind == "bins":
            bin_um = float(_BIN_TABLE.match(table_key).group(1))
        shapes_key, table_region, instance_column = _annotated_shapes(sdata, table_key, element_cs(image), region)
        element = sdata.shapes[shapes_key]
        _check_shapes(element, shapes_key, table_key, kind)

    cs = _shared_cs(image, image_key, element, kind, coordinate_system)

    # µm per unit of the coordinate system
    spot_d = None
    if um_per_px is not None:
        if not np.isfinite(um_per_px) or um_per_px <= 0:
            msg = f"`um_per_px` must be a positive number of µm per coordinate unit; got {um_per_px}."
            raise ValueError(msg)
        source = "given by `um_per_px`"
    elif kind == "transcripts":
        um_per_unit, source = _transcript_units(sdata, element, points_key, image)
        um_per_px = um_per_unit / linear_scale(affine_to_cs(element, cs))
        source += f"; transformation of points {points_key!r} to {cs!r}"
    elif kind == "spots":
        um_per_px, source, spot_d, spot_pitch_um = _spot_units(
            sdata, table_key, shapes_key, table_region, instance_column, cs, spot_diameter_um, spot_pitch_um
        )
    else:
        if "radius" in element.columns:  # bins read as circles (bins_as_squares=False): the radius is half the side
            side = 2.0 * float(np.median(np.asarray(element["radius"], dtype=float)))
            what = f"2 × radius of the {bin_um:g} µm bin circles"
        else:
            side = float(np.sqrt(np.median(element.geometry.iloc[: min(len(element), 1000)].area)))
            what = f"side of the {bin_um:g} µm bins"
        if not np.isfinite(side) or side <= 0:
            msg = f"The bins of shapes {shapes_key!r} have no size (side {side:g}); pass `um_per_px`."
            raise ValueError(msg)
        um_per_px = bin_um / (side * linear_scale(affine_to_cs(element, cs)))
        source = f"{what} in shapes {shapes_key!r} ({side:.4g} units)"
    if kind == "spots" and spot_d is None:
        spot_d = float(spot_diameter_um) if spot_diameter_um is not None else VISIUM_SPOT_DIAMETER_UM
    m = affine_to_cs(image, cs)
    image_um = um_per_px * linear_scale(m)
    ext = tuple(v * um_per_px for v in image_extent_cs(image, cs))
    return Inputs(
        kind=kind,
        cs=cs,
        image_key=image_key,
        um_per_px=float(um_per_px),
        um_per_px_source=source,
        image_um_per_px=float(image_um),
        image_extent_um=ext,  # type: ignore[arg-type]
        points_key=points_key,
        table_key=table_key,
        shapes_key=shapes_key,
        bin_um=bin_um,
        spot_diameter_um=spot_d,
        spot_pitch_um=spot_pitch_um if kind == "spots" else None,
        region=table_region,
        instance_column=instance_column,
    )


#: CosMx FOV images (rows, cols) of each instrument and their µm per pixel (NanoString's specifications).
COSMX_PIXEL_UM = {(3648, 5472): 0.18, (4256, 4256): 0.12028}
#: Columns only CosMx transcript tables have (``spatialdata_io.cosmx`` turns ``x/y_local_px`` into ``x``, ``y``).
_COSMX_COLUMNS = {"x_global_px", "y_global_px"}


def _transcript_units(sdata: SpatialData, points: Any, points_key: str, image: Any) -> tuple[float, str]:
    """µm per unit of the transcripts' own coordinates: µm for every reader but CosMx's, which keeps pixels."""
    columns = set(points.columns)
    cosmx = sdata.attrs.get("spatialdata_io_reader") == "cosmx" or (
        _COSMX_COLUMNS <= columns and "x_local_px" not in columns
    )
    if not cosmx:
        return 1.0, "transcript coordinates in µm"
    level = image_levels(image)[0]
    shape = (int(level.sizes["y"]), int(level.sizes["x"]))
    um = COSMX_PIXEL_UM.get(shape)
    if um is None:
        known = "; ".join(f"{r} × {c} px FOVs: {v:g} µm" for (r, c), v in COSMX_PIXEL_UM.items())
        msg = (
            f"The transcripts {points_key!r} are CosMx pixel coordinates (spatialdata_io.cosmx keeps pixels), and µm "
            f"per pixel depends on the instrument ({known}); the image here is {shape[0]} × {shape[1]} px, so it "
            "does not tell which. Pass `um_per_px=` (the pixel size in your run's documentation)."
        )
        raise ValueError(msg)
    return um, f"CosMx pixel coordinates; a {shape[0]} × {shape[1]} px FOV image is {um:g} µm per pixel"


def _shared_cs(image: Any, image_key: str, element: Any, kind: str, coordinate_system: str | None) -> str:
    """The coordinate system the image and the measurement share (``global`` first); errors name the fix."""
    shared = [c for c in element_cs(image) if c in element_cs(element)]
    if coordinate_system is not None:
        if coordinate_system not in shared:
            msg = (
                f"Coordinate system {coordinate_system!r} (from `coordinate_system`) is not shared by image "
                f"{image_key!r} and the {kind}; the shared ones are {shared}.{suggest(coordinate_system, shared)}"
            )
            raise ValueError(msg)
        cs = coordinate_system
    elif not shared:
        msg = (
            f"Image {image_key!r} (coordinate systems {element_cs(image)}) and the {kind} (coordinate systems "
            f"{element_cs(element)}) share no coordinate system, so they cannot be aligned. Register them first "
            "(e.g. `spatialdata.transformations.set_transformation`)."
        )
        raise ValueError(msg)
    else:
        preferred = [c for c in shared if c == "global"] + [c for c in shared if "downscaled" not in c] + shared
        cs = preferred[0]
    return cs


def _check_not_segmentation_only(sdata: SpatialData) -> None:
    """A Visium HD object read with only its cell segmentation has no spot or bin counts: say which option to use."""
    segmentation = [t for t in sdata.tables if "segmentation" in t]
    if segmentation and not _spot_tables(sdata):
        msg = (
            f"This SpatialData holds Visium HD cell segmentations ({segmentation}) but no binned counts: it was read "
            "with `spatialdata_io.visium_hd(..., load_segmentations_only=True)`. diffst needs the 2/8/16 µm bins: read "
            "it with `load_segmentations_only=False`."
        )
        raise ValueError(msg)


def _check_shapes(element: Any, shapes_key: str, table_key: str, kind: str) -> None:
    """Spots must be circles with a radius; bins squares or circles. Cells (polygons) are neither."""
    geom = element.geometry.iloc[:1]
    points = bool(len(geom)) and geom.geom_type.iloc[0] == "Point"
    if kind == "spots" and (not points or "radius" not in element.columns):
        what = "polygons (cells?)" if not points else "points without a `radius` column"
        msg = (
            f"Table {table_key!r} annotates shapes {shapes_key!r}, which are {what}, not spots: diffst reads spots "
            "as circles with a radius (as `spatialdata_io.visium` writes them) or Visium HD bins (tables "
            "'square_XXXum'). Pass `table_key=` naming the table of spot or bin counts."
        )
        if "segmentation" in table_key:
            msg += " Cell segmentations are not a measurement diffst super-resolves; read the bins with `load_segmentations_only=False`."
        raise ValueError(msg)
    if kind == "bins" and points and "radius" not in element.columns:
        msg = f"The bins of shapes {shapes_key!r} are points without a `radius` column; pass `um_per_px`."
        raise ValueError(msg)


def lattice_pitch(rows: np.ndarray, cols: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, str] | None:
    """Median centre-to-centre distance of array neighbours (in the units of ``x, y``) and the lattice kind.

    Visium arrays are hexagonal: ``array_row + array_col`` is even, neighbours in a row are 2 columns apart and
    diagonal neighbours 1 row and 1 column apart, all 100 µm. Other arrays (ST) are square: neighbours 1 apart,
    200 µm. ``None`` when fewer than 3 neighbour pairs exist.
    """
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if len(rows) < 2:
        return None
    hexagonal = bool(np.all((rows + cols) % 2 == 0))
    steps = [(0, 2), (1, 1), (1, -1)] if hexagonal else [(0, 1), (1, 0)]
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    distances = []
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        for dr, dc in steps:
            j = where.get((int(r) + dr, int(c) + dc))
            if j is not None:
                distances.append(np.hypot(x[i] - x[j], y[i] - y[j]))
    if len(distances) < 3:
        return None
    return float(np.median(distances)), "visium" if hexagonal else "st"


def _spot_units(
    sdata: SpatialData,
    table_key: str,
    shapes_key: str,
    region: str | None,
    instance_column: str | None,
    cs: str,
    spot_diameter_um: float | None,
    spot_pitch_um: float | None,
) -> tuple[float, str, float, float | None]:
    """µm per unit, where it came from, the spot diameter and the lattice pitch (µm) of a spots table."""
    table = sdata.tables[table_key]
    shapes = sdata.shapes[shapes_key]
    scale = linear_scale(affine_to_cs(shapes, cs))
    radius = float(np.median(np.asarray(shapes["radius"], dtype=float)))
    uns_d = table.uns.get("spot_diameter_um")
    # what the radius encodes: the table's own spot diameter (diffst's ST datasets), else Space Ranger's 65 µm
    encoded, encoded_why = (
        (float(uns_d), f"tables[{table_key!r}].uns['spot_diameter_um']")
        if uns_d is not None
        else (VISIUM_FULLRES_SPOT_UM, "Space Ranger's spot_diameter_fullres, the width of a 65 µm spot")
    )
    from_radius = encoded / (2.0 * radius * scale)
    lattice = None
    if {"array_row", "array_col"} <= set(table.obs.columns):
        rows, xc, yc = table_centres(table, shapes, table_key, shapes_key, region, instance_column, cs)
        obs = table.obs.iloc[rows]
        lattice = lattice_pitch(obs["array_row"].to_numpy(), obs["array_col"].to_numpy(), xc, yc)
    if lattice is None:
        pitch_um = float(spot_pitch_um) if spot_pitch_um is not None else None
        source = f"spot radius of shapes {shapes_key!r} ({radius:.4g} units) as {encoded:g} µm ({encoded_why})"
        default_d = VISIUM_SPOT_DIAMETER_UM
        um = from_radius
    else:
        distance, kind = lattice
        default_pitch = VISIUM_SPOT_PITCH_UM if kind == "visium" else ST_SPOT_PITCH_UM
        uns_pitch = table.uns.get("spot_pitch_um")
        pitch_um = float(spot_pitch_um if spot_pitch_um is not None else uns_pitch or default_pitch)
        default_d = VISIUM_SPOT_DIAMETER_UM if kind == "visium" else ST_SPOT_DIAMETER_UM
        um = pitch_um / distance
        name = "Visium" if kind == "visium" else "ST"
        source = (
            f"spot pitch: array neighbours of shapes {shapes_key!r} are {distance:.4g} units apart, {pitch_um:g} µm "
            f"on a {name} array"
            + (" (`spot_pitch_um`)" if spot_pitch_um is not None else " (table uns)" if uns_pitch else "")
        )
        if abs(from_radius / um - 1) > PITCH_RADIUS_TOLERANCE:
            log.warn(
                f"the spot pitch gives {um:.4g} µm per unit but the spot radius ({radius:.4g} units, read as "
                f"{encoded:g} µm: {encoded_why}) gives {from_radius:.4g} ({100 * (from_radius / um - 1):+.0f} %); "
                "using the pitch. Pass `um_per_px` if you know better, or `spot_pitch_um` if the array is not a "
                f"standard {name} array."
            )
        else:
            source += f"; the spot radius agrees within {100 * abs(from_radius / um - 1):.1f} %"
    if spot_diameter_um is not None:
        spot_d = float(spot_diameter_um)
    elif uns_d is not None:
        spot_d = float(uns_d)
    else:
        spot_d = default_d
    return float(um), source, spot_d, pitch_um


def table_centres(
    table: Any,
    shapes: Any,
    table_key: str,
    shapes_key: str,
    region: str | None,
    instance_column: str | None,
    cs: str,
    *,
    centroid: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table rows of ``region`` and the centres of their shapes in ``cs`` units (``centroid`` for polygons)."""
    region_key = table.uns.get("spatialdata_attrs", {}).get("region_key")
    if region is not None and region_key in table.obs:
        rows = np.flatnonzero((table.obs[region_key].astype(str) == region).to_numpy())
    else:
        rows = np.arange(table.n_obs)
    if not len(rows):
        msg = f"Table {table_key!r} has no rows of region {region!r} (its `region_key` column)."
        raise ValueError(msg)
    key = instance_column or table.uns.get("spatialdata_attrs", {}).get("instance_key")
    obs = table.obs
    ids = obs[key].to_numpy()[rows] if key in obs else obs.index.to_numpy()[rows]
    try:
        geom = shapes.geometry.loc[ids]
    except KeyError as e:
        msg = f"Table {table_key!r} rows do not match the index of shapes {shapes_key!r} via {key!r}."
        raise ValueError(msg) from e
    points = geom.centroid if centroid else geom
    xc, yc = transform_points(affine_to_cs(shapes, cs), points.x.to_numpy(), points.y.to_numpy())
    return rows, xc, yc


def _choose_bin_table(tables: list[str], bin_size: int | None, hr_um: float) -> str:
    sizes = {int(_BIN_TABLE.match(t).group(1)): t for t in tables}
    if bin_size is not None:
        if bin_size not in sizes:
            msg = f"No Visium HD table for bin_size={bin_size} µm; available bin sizes: {sorted(sizes)}."
            raise ValueError(msg)
        return sizes[bin_size]
    fitting = [b for b in sizes if hr_um / b >= 1 - 1e-9 and abs(hr_um / b - round(hr_um / b)) < 1e-6]
    if not fitting:
        msg = (
            f"No Visium HD bin size in {sorted(sizes)} µm divides the HR pixel size {hr_um:g} µm, so HR pixels would "
            "split bins. Choose `lr_um` and `scale` so that lr_um/scale is a multiple of a bin size, or pass `bin_size`."
        )
        raise ValueError(msg)
    return sizes[max(fitting)]


def image_kind(
    sdata: SpatialData, image_key: str, override: str | None = None
) -> tuple[Literal["rgb", "fluorescence"], str]:
    """``"rgb"`` for a brightfield colour image (H&E), else ``"fluorescence"``, and why, decided from the pixels.

    An image of 3 or 4 channels (whatever their names: ``r, g, b``, ``0, 1, 2`` …) is brightfield when it is mostly
    bright (a stained section on a white slide: the median over pixels of the mean of the first three channels is at
    least 35 % of full scale); a dark colour rendering of fluorescence (e.g. a CosMx composite) is fluorescence, and
    so is any image with 1, 2 or more than 4 channels. ``override`` (``image_kind=`` of ``prepare``) decides instead.
    """
    image = sdata.images[image_key]
    names = [str(c) for c in channel_names(image)]
    if override is not None:
        return override, f"`image_kind={override!r}`"  # type: ignore[return-value]
    if len(names) not in (3, 4):
        return "fluorescence", f"{len(names)} channel{'s' if len(names) != 1 else ''} {names}"
    level = image_levels(image)[-1]
    data = np.asarray(level.data[:3], dtype=np.float32)
    top = float(np.iinfo(level.dtype).max) if np.issubdtype(level.dtype, np.integer) else max(1.0, float(data.max()))
    brightness = float(np.median(data.mean(axis=0))) / top
    what = f"{len(names)} channels {names}, {level.dtype}, median brightness {brightness:.0%} of full scale"
    if brightness >= 0.35:
        return "rgb", f"{what}: a bright background, brightfield"
    return "fluorescence", f"{what}: a dark background, fluorescence"


def read_measurement(
    sdata: SpatialData, inputs: Inputs, *, layer: str | None = None, min_qv: float | None = None
) -> Measurement:
    """Read the measurement into the µm frame, validating coordinates and counts.

    ``min_qv``: transcripts with a quality value (a ``qv`` column, Xenium's Phred-scaled decoding quality) below it are
    dropped; ``None`` keeps every transcript.
    """
    if inputs.kind == "transcripts":
        return _read_transcripts(sdata, inputs, min_qv)
    return _read_table(sdata, inputs, layer=layer)


def _read_transcripts(sdata: SpatialData, inputs: Inputs, min_qv: float | None = None) -> Measurement:
    points = sdata.points[inputs.points_key]
    feature_key = points.attrs.get("spatialdata_attrs", {}).get("feature_key")
    if feature_key is None or feature_key not in points.columns:
        msg = (
            f"Points {inputs.points_key!r} have no gene column (feature_key); columns are {list(points.columns)}. "
            "Parse them with `PointsModel.parse(..., feature_key=<gene column>)`."
        )
        raise ValueError(msg)
    tx = Transcripts.from_points(points, feature_key, affine_to_cs(points, inputs.cs), inputs.um_per_px, min_qv)
    scan = tx.scan()
    if tx.filtered:
        log.info(
            f"quality filter: {scan.dropped:,} of {scan.n + scan.dropped:,} transcripts have qv < {min_qv:g} and are "
            "left out (`min_qv=None` keeps them)"
        )
    if scan.no_gene:
        msg = f"{scan.no_gene} transcripts in {inputs.points_key!r} have no gene name ({feature_key!r} is NaN)."
        raise ValueError(msg)
    if scan.non_finite:
        msg = (
            f"Points {inputs.points_key!r} have non-finite (NaN or infinite) coordinates; drop those transcripts first."
        )
        raise ValueError(msg)
    return Measurement(
        kind="transcripts",
        gene_names=tx.gene_names,
        transcripts=tx,
        n_transcripts=scan.n,
        transcript_extent_um=scan.extent_um,
        source={"points_key": inputs.points_key, "feature_key": feature_key},
    )


def check_counts(matrix: Any, what: str, fix: str) -> sp.csr_matrix:
    """Return ``matrix`` as CSR float64 after checking it holds finite, non-negative integer counts."""
    x = sp.csr_matrix(matrix, dtype=np.float64)
    data = x.data
    if not np.isfinite(data).all():
        msg = f"{what} contains NaN or infinite values; diffst needs raw counts. {fix}"
        raise ValueError(msg)
    if (data < 0).any():
        msg = f"{what} contains negative values (min {data.min():g}); diffst needs raw counts. {fix}"
        raise ValueError(msg)
    if not np.allclose(data, np.round(data)):
        msg = f"{what} contains non-integer values (e.g. {data[np.flatnonzero(data != np.round(data))[0]]:g}); diffst needs raw counts, not normalised data. {fix}"
        raise ValueError(msg)
    return x


def _read_table(sdata: SpatialData, inputs: Inputs, *, layer: str | None) -> Measurement:
    table = sdata.tables[inputs.table_key]
    shapes = sdata.shapes[inputs.shapes_key]
    rows, xc, yc = table_centres(
        table, shapes, inputs.table_key, inputs.shapes_key, inputs.region, inputs.instance_column, inputs.cs,
        centroid=inputs.kind == "bins",
    )  # fmt: skip
    if layer is not None:
        if layer not in table.layers:
            msg = f"Layer {layer!r} (from `layer`) is not in tables[{inputs.table_key!r}]; it has {list(table.layers)}."
            raise KeyError(msg)
        matrix = table.layers[layer]
    else:
        matrix = table.X
    fix = (
        f"Pass `layer=` naming a layer of raw counts (tables[{inputs.table_key!r}] has layers {list(table.layers)})."
        if layer is None
        else "Use a layer of raw counts."
    )
    counts = check_counts(
        matrix[rows], f"tables[{inputs.table_key!r}]" + (f".layers[{layer!r}]" if layer else ".X"), fix
    )

    centres = np.column_stack([xc, yc]) * inputs.um_per_px
    meas = Measurement(
        kind=inputs.kind,
        gene_names=[str(g) for g in table.var_names],
        centres_um=centres,
        counts=counts,
        spot_diameter_um=inputs.spot_diameter_um,
        bin_um=inputs.bin_um,
        source={"table_key": inputs.table_key, "shapes_key": inputs.shapes_key, "layer": layer},
    )
    if inputs.kind == "bins":
        b = inputs.bin_um
        meas.bin_anchor_um = (float(centres[0, 0] - b / 2), float(centres[0, 1] - b / 2))
    return meas
