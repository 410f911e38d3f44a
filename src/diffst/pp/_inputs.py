"""Find the image and the ST measurement in a user's SpatialData, check them, and read them in µm.

Three kinds of measurement are understood:

``transcripts``
    A points element with a gene column (Xenium, MERSCOPE/MERFISH, CosMx). Transcript coordinates are taken to be
    in µm, so µm per unit of the coordinate system follows from the points' transformation.
``spots``
    A table annotating circles (Visium, ST). µm per unit follows from the spot radius and the nominal spot diameter.
``bins``
    Visium HD tables ``square_XXXum`` annotating square bins. µm per unit follows from the bin side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diffst._degradation import VISIUM_SPOT_DIAMETER_UM
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
    # transcripts: positions and gene code per transcript
    x_um: np.ndarray | None = None
    y_um: np.ndarray | None = None
    codes: np.ndarray | None = None
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
            return float(self.x_um.min()), float(self.y_um.min()), float(self.x_um.max()), float(self.y_um.max())
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


def _spot_tables(sdata: SpatialData) -> list[str]:
    out = []
    for name, table in sdata.tables.items():
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        regions = [region] if isinstance(region, str) else list(region or [])
        if any(r in sdata.shapes and "radius" in sdata.shapes[r].columns for r in regions):
            out.append(name)
    return out


def _annotated_shapes(sdata: SpatialData, table_key: str) -> tuple[str, str]:
    attrs = sdata.tables[table_key].uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    shapes = [r for r in regions if r in sdata.shapes]
    if len(shapes) != 1:
        msg = (
            f"Table {table_key!r} must annotate exactly one shapes element (the spots or bins); it annotates {regions}. "
            "Parse it with `spatialdata.models.TableModel.parse(..., region=<shapes key>, instance_key=...)`."
        )
        raise ValueError(msg)
    return shapes[0], attrs.get("instance_key")


def diffst_products(sdata: SpatialData) -> set[str]:
    """Names of elements that diffst itself wrote (recorded in ``sdata.attrs[key]['elements']``)."""
    out: set[str] = set()
    for value in sdata.attrs.values():
        if isinstance(value, dict) and "diffst_version" in value:
            out.update(str(v) for v in value.get("elements", {}).values())
    return out


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
) -> Inputs:
    """Decide which elements to use and derive µm per unit of the coordinate system; errors name the fix."""
    image_key = _pick_image(sdata, image_key)
    image = sdata.images[image_key]

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
        shapes_key, _ = _annotated_shapes(sdata, table_key)
        element = sdata.shapes[shapes_key]

    # coordinate system shared by the image and the measurement
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

    # µm per unit of the coordinate system
    spot_d = None
    if um_per_px is not None:
        if not np.isfinite(um_per_px) or um_per_px <= 0:
            msg = f"`um_per_px` must be a positive number of µm per coordinate unit; got {um_per_px}."
            raise ValueError(msg)
        source = "given by `um_per_px`"
    elif kind == "transcripts":
        um_per_px = 1.0 / linear_scale(affine_to_cs(element, cs))
        source = f"transformation of points {points_key!r} to {cs!r} (transcript coordinates are in µm)"
    elif kind == "spots":
        uns = sdata.tables[table_key].uns
        if spot_diameter_um is not None:
            spot_d, why = float(spot_diameter_um), "`spot_diameter_um`"
        elif "spot_diameter_um" in uns:
            spot_d, why = float(uns["spot_diameter_um"]), f"tables[{table_key!r}].uns['spot_diameter_um']"
        else:
            spot_d, why = VISIUM_SPOT_DIAMETER_UM, "the Visium spot diameter (pass `spot_diameter_um` for other arrays)"
        radius = float(np.median(np.asarray(element["radius"], dtype=float)))
        um_per_px = spot_d / (2.0 * radius * linear_scale(affine_to_cs(element, cs)))
        source = (
            f"spot radius of shapes {shapes_key!r} ({radius:.4g} units) and a {spot_d:g} µm spot diameter from {why}"
        )
    else:
        side = float(np.sqrt(np.median(element.geometry.iloc[: min(len(element), 1000)].area)))
        um_per_px = bin_um / (side * linear_scale(affine_to_cs(element, cs)))
        source = f"side of the {bin_um:g} µm bins in shapes {shapes_key!r} ({side:.4g} units)"
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
    )


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


def image_kind(sdata: SpatialData, image_key: str) -> Literal["rgb", "fluorescence"]:
    """``"rgb"`` for a brightfield colour image (H&E), else ``"fluorescence"``.

    An image with channels ``r, g, b`` is brightfield only if it is mostly bright (a stained section on a white
    slide); an RGB rendering of fluorescence (e.g. a CosMx composite, dark background) counts as fluorescence.
    """
    image = sdata.images[image_key]
    names = [c.lower() for c in channel_names(image)]
    if names not in (["r", "g", "b"], ["r", "g", "b", "a"]):
        return "fluorescence"
    level = image_levels(image)[-1]
    data = np.asarray(level.data[:3], dtype=np.float32)
    top = float(np.iinfo(level.dtype).max) if np.issubdtype(level.dtype, np.integer) else 1.0
    return "rgb" if float(np.median(data.mean(axis=0))) >= 0.35 * top else "fluorescence"


def read_measurement(sdata: SpatialData, inputs: Inputs, *, layer: str | None = None) -> Measurement:
    """Read the measurement into the µm frame, validating coordinates and counts."""
    if inputs.kind == "transcripts":
        return _read_transcripts(sdata, inputs)
    return _read_table(sdata, inputs, layer=layer)


def _read_transcripts(sdata: SpatialData, inputs: Inputs) -> Measurement:
    points = sdata.points[inputs.points_key]
    feature_key = points.attrs.get("spatialdata_attrs", {}).get("feature_key")
    if feature_key is None or feature_key not in points.columns:
        msg = (
            f"Points {inputs.points_key!r} have no gene column (feature_key); columns are {list(points.columns)}. "
            "Parse them with `PointsModel.parse(..., feature_key=<gene column>)`."
        )
        raise ValueError(msg)
    df = points[["x", "y", feature_key]].compute()
    genes = df[feature_key]
    if not isinstance(genes.dtype, pd.CategoricalDtype):
        genes = genes.astype("category")
    if genes.isna().any():
        msg = f"{int(genes.isna().sum())} transcripts in {inputs.points_key!r} have no gene name ({feature_key!r} is NaN)."
        raise ValueError(msg)
    x = df["x"].to_numpy(dtype=np.float64)
    y = df["y"].to_numpy(dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        msg = (
            f"Points {inputs.points_key!r} have non-finite (NaN or infinite) coordinates; drop those transcripts first."
        )
        raise ValueError(msg)
    m = affine_to_cs(points, inputs.cs)
    xc, yc = transform_points(m, x, y)
    return Measurement(
        kind="transcripts",
        gene_names=[str(c) for c in genes.cat.categories],
        x_um=xc * inputs.um_per_px,
        y_um=yc * inputs.um_per_px,
        codes=genes.cat.codes.to_numpy().astype(np.int64),
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
    attrs = table.uns.get("spatialdata_attrs", {})
    instance_key = attrs.get("instance_key")
    region_key = attrs.get("region_key")
    obs = table.obs
    if region_key in obs:
        rows = np.flatnonzero((obs[region_key].astype(str) == inputs.shapes_key).to_numpy())
    else:
        rows = np.arange(table.n_obs)
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

    ids = obs[instance_key].to_numpy()[rows] if instance_key in obs else obs.index.to_numpy()[rows]
    try:
        geom = shapes.geometry.loc[ids]
    except KeyError as e:
        msg = f"Table {inputs.table_key!r} rows do not match the index of shapes {inputs.shapes_key!r} via {instance_key!r}."
        raise ValueError(msg) from e
    cx = geom.centroid.x.to_numpy() if inputs.kind == "bins" else geom.x.to_numpy()
    cy = geom.centroid.y.to_numpy() if inputs.kind == "bins" else geom.y.to_numpy()
    m = affine_to_cs(shapes, inputs.cs)
    xc, yc = transform_points(m, cx, cy)
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
