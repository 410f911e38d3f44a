"""``dst.pp.prepare``: from a user's SpatialData to aligned LR/HR gene rasters, tiles and a split."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel
from spatialdata.transformations import Scale

from diffst import _logging as log
from diffst._contract import DegradationRecord, ImageRecord, NormalisationRecord, PreparedRecord, SplitRecord
from diffst._degradation import (
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOT_PITCH_UM,
    BinDegradation,
    SpotDegradation,
    hex_lattice,
)
from diffst._grid import Grid
from diffst._image import image_spec
from diffst._store import ElementWriter, element_names

from ..model.graph import coexpression_intensity
from ._genes import GeneSelection, robust_scale, select_genes
from ._inputs import CONTROL_PATTERN, Measurement, read_measurement, resolve_inputs
from ._inputs import image_kind as decide_image_kind
from ._tiles import make_tiles, tissue_from_counts

if TYPE_CHECKING:
    from spatialdata import SpatialData

_MAX_COEXPR_PIXELS = 50_000
_GENE_CHUNK = 16  # genes rasterised at once (an int64 count array of this many genes at a time)


def prepare(
    sdata: SpatialData,
    *,
    genes: int | Sequence[str] = 25,
    scale: int = 10,
    lr_um: float = 100.0,
    degradation: Literal["bin", "visium"] = "bin",
    image_key: str | None = None,
    points_key: str | None = None,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    tile_um: float | None = None,
    min_tissue: float = 0.25,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    split_block_um: float | None = None,
    gene_selection: GeneSelection = "spatially_variable",
    layer: str | None = None,
    bin_size: int | None = None,
    um_per_px: float | None = None,
    spot_diameter_um: float | None = None,
    spot_pitch_um: float | None = None,
    region: str | None = None,
    image_kind: Literal["rgb", "fluorescence"] | None = None,
    context_genes: int | Sequence[str] = 0,
    min_qv: float | None = 20.0,
    seed: int = 0,
    key_added: str = "diffst",
    overwrite: bool = False,
) -> None:
    """Build training-ready low- and high-resolution gene rasters aligned to the tissue image.

    Works on transcripts (Xenium, MERFISH/MERSCOPE, CosMx), spots (Visium, ST) and Visium HD bins, with an H&E or
    fluorescence image. All sizes are physical (µm); the rasters carry transformations to the source coordinate
    system so they overlay the image exactly.

    Parameters
    ----------
    sdata
        The SpatialData with an image and one ST measurement.
    genes
        How many genes to select (top-N by ``gene_selection``, control probes excluded) or an explicit list of names.
    scale
        Super-resolution factor: HR pixels are ``lr_um / scale`` µm (10 → 10 µm from 100 µm).
    lr_um
        LR pixel size in µm (100 for Visium-scale spots).
    degradation
        How LR arises from HR for data that have HR (transcripts, bins): ``"bin"`` sums ``scale × scale`` HR pixels
        (the paper's setting); ``"visium"`` is what a Visium slide measures: discs of ``spot_diameter_um``
        (default 0.55 · pitch, i.e. 55 µm) on a hexagonal lattice of ``spot_pitch_um`` (default ``lr_um``), each
        spot's counts laid on the LR pixel holding its centre, with the observed fraction of each LR pixel as mask.
        Spot data (Visium, ST) have no HR: their LR comes from the measured spots and this is ignored.
    image_key
        The tissue image; needed when there are several (the finest of Visium's full/hires/lowres is picked).
    points_key
        Transcripts (points with a gene column); needed when there are several points elements.
    table_key
        Spot or bin counts table (Visium: ``"table"``; Visium HD: ``"square_002um"`` …). Setting it chooses spots/bins
        over transcripts.
    coordinate_system
        Coordinate system shared by the image and the measurement; by default the only shared one (``"global"``
        preferred, ``*_downscaled_*`` avoided).
    tile_um
        Tile side in µm (a multiple of ``lr_um``); training and evaluation use these tiles, and a training window is
        at most one tile (default: 400 µm, or four spot pitches where the spots are sparser: 800 µm for the ST
        array's 200 µm grid, so that a window holds enough spots to learn from; rounded up to a multiple of
        ``lr_um``).
    min_tissue
        Minimum tissue fraction of a kept tile.
    split
        Shares of tiles for train, validation and test.
    split_block_um
        Side of the square blocks of tiles that go whole to one split (default ``2 · tile_um``).
    gene_selection
        ``"spatially_variable"`` (Moran's I of log1p LR maps, default) or ``"highly_expressed"`` (total counts);
        genes must be detected in at least 5 % of tissue LR pixels.
    layer
        Table layer with raw counts (spots/bins), when ``X`` is not raw.
    bin_size
        Visium HD bin size in µm to build HR from (default: the largest one dividing ``lr_um / scale``).
    um_per_px
        µm per unit of the coordinate system, overriding what is derived from the data (which is reported).
    spot_diameter_um
        Spot diameter for spot data (default: ``table.uns['spot_diameter_um']`` or 55 µm, Visium) and for
        ``degradation="visium"``.
    spot_pitch_um
        Lattice pitch for ``degradation="visium"`` (default ``lr_um``). For spot data, the array's centre-to-centre
        distance that sets µm per unit with the array coordinates (default 100 µm for Visium, 200 µm for ST arrays,
        told apart by the lattice).
    region
        For a table annotating several regions (slides concatenated): the shapes element of the spots or bins to
        use (default: the one sharing a coordinate system with the image).
    image_kind
        ``"rgb"`` (brightfield H&E) or ``"fluorescence"`` (DAPI, IF), overriding what is decided from the pixels (3–4
        channels on a bright background are brightfield, whatever the channel names).
    min_qv
        Transcripts whose quality value (the ``qv`` column of Xenium transcripts, a Phred-scaled decoding quality)
        is below this are left out, as Xenium Ranger's own outputs do (20 by default; the number dropped is logged).
        ``None`` keeps them all; data without a ``qv`` column are not filtered.
    context_genes
        The panel context: genes whose LR counts condition the model besides those of ``genes`` (they say which cell
        types each LR pixel holds) without being predicted. A number takes the next ones by ``gene_selection`` after
        ``genes``; a list names them. ``0`` (default): none.
    seed
        Seed of the split.
    key_added
        Prefix of the new elements and key of ``sdata.attrs``.
    overwrite
        Replace existing elements of the same names; otherwise an existing key is an error.

    Returns
    -------
    Nothing; adds to ``sdata`` (and writes to its zarr store when it is backed):

    - ``images['{key_added}_lr']``: LR counts per LR pixel, channels = genes;
    - ``images['{key_added}_lr_mask']``: observed fraction of each LR pixel (channel ``observed``);
    - ``images['{key_added}_hr']``: HR counts per HR pixel (transcripts and bins only);
    - ``labels['{key_added}_tissue']``: tissue mask on the LR grid;
    - ``shapes['{key_added}_tiles']``: tile squares with ``split`` in {train, val, test};
    - ``shapes['{key_added}_spots']``: the spots that define the LR pixels (measured spots, or the simulated ones of
      ``degradation="visium"``), in µm with their LR pixel;
    - ``sdata.attrs[key_added]``: units, grid, genes, normalisation, co-expression, image and element names.

    """
    t_start = time.perf_counter()
    names = element_names(key_added)
    _check_arguments(genes, scale, lr_um, degradation, tile_um, min_tissue, split, key_added)
    if image_kind not in (None, "rgb", "fluorescence"):
        msg = f"`image_kind` must be 'rgb' (brightfield, H&E), 'fluorescence' or None (decided from the image); got {image_kind!r}."
        raise ValueError(msg)
    writer = ElementWriter(sdata, overwrite=overwrite)
    writer.check_free([names[k] for k in ("lr", "lr_mask", "hr", "tissue", "tiles", "spots", "context")],
                      attrs_key=key_added)  # fmt: skip
    # the stages: the measurement, the grid and the tissue, the genes, the rasters, the split, the normalisation
    inputs, meas = _measurement(sdata, lr_um / scale, layer=layer, min_qv=min_qv, image_key=image_key,
                                points_key=points_key, table_key=table_key, coordinate_system=coordinate_system,
                                um_per_px=um_per_px, spot_diameter_um=spot_diameter_um, bin_size=bin_size,
                                spot_pitch_um=spot_pitch_um, region=region)  # fmt: skip
    if meas.kind == "spots" and degradation == "visium":
        log.info("spot data: LR comes from the measured spots; `degradation` does not apply")
    area = _grid(meas, inputs, lr_um, scale, tile_um, spot_pitch_um)
    chosen, selection_info, context = _genes(meas, area, genes, context_genes, gene_selection)
    rasters = _rasters(meas, inputs, area, chosen, context, degradation, spot_diameter_um, spot_pitch_um)
    tiles, counts_per_split, block = _split(area, min_tissue, split, split_block_um, seed)
    norm = _normalisation(rasters, area, tiles, seed)
    kind, kind_reason = decide_image_kind(sdata, inputs.image_key, image_kind)
    log.info(f"image {inputs.image_key!r} read as {kind} ({kind_reason}); `image_kind=` overrides")
    spec = image_spec(
        sdata.images[inputs.image_key], key=inputs.image_key, cs=inputs.cs, um_per_px=inputs.um_per_px, kind=kind
    )
    elements = _elements(names, inputs, area, rasters, tiles, chosen, context)
    grid = area.grid
    record = PreparedRecord(
        diffst_version=_version(),
        coordinate_system=inputs.cs,
        um_per_px=inputs.um_per_px,
        um_per_px_source=inputs.um_per_px_source,
        measurement=meas.kind,
        sources={**meas.source, "image_key": inputs.image_key},
        grid=grid,
        degradation=rasters.degradation_record(),
        genes=tuple(chosen),
        gene_selection=selection_info,
        normalisation=norm.record(),
        coexpression=norm.coexpression_record(),
        image=ImageRecord(spec, inputs.image_um_per_px, kind_reason),
        tile_um=float(area.tile_um),
        min_tissue=float(min_tissue),
        split=SplitRecord(
            tuple(float(s) for s in split), float(block), int(seed), {k: int(v) for k, v in counts_per_split.items()}
        ),
        elements={k: v for k, v in names.items() if v in elements},
        context=None if norm.context_scale is None else {"genes": list(context),
                                                          "lr_scale": [float(v) for v in norm.context_scale]},
    )  # fmt: skip
    writer.commit(elements, attrs={key_added: record.to_dict()}, stale=names.values())
    log.info(
        f"prepared {len(chosen)} genes on {grid.lr_shape[0]}×{grid.lr_shape[1]} LR / "
        f"{grid.hr_shape[0]}×{grid.hr_shape[1]} HR pixels ({lr_um:g} → {lr_um / scale:g} µm), {len(tiles)} tiles of "
        f"{area.tile_um:g} µm (train {counts_per_split['train']}, val {counts_per_split['val']}, test "
        f"{counts_per_split['test']}; "
        + ", ".join(f"{k} {a:.3f} mm²" for k, a in _split_areas(tiles, area.tile_um).items())
        + f") in {time.perf_counter() - t_start:.1f} s → sdata.attrs[{key_added!r}]"
    )


# --------------------------------------------------------------------------------------------------------------------
# The stages of prepare
# --------------------------------------------------------------------------------------------------------------------
def _measurement(sdata: SpatialData, hr_um: float, *, layer, min_qv, **inputs_kw) -> tuple[Any, Measurement]:
    """Which image and measurement, in which coordinate system and units (logged), and the measurement read."""
    inputs = resolve_inputs(sdata, hr_um=hr_um, **inputs_kw)
    log.info(
        f"{inputs.kind} from {inputs.points_key or inputs.table_key!r}, image {inputs.image_key!r} "
        f"({inputs.image_um_per_px:.4g} µm/px) in coordinate system {inputs.cs!r}; "
        f"{inputs.um_per_px:.6g} µm per unit, from the {inputs.um_per_px_source}"
    )
    _warn_coarse_image(inputs.image_key, inputs.image_um_per_px, hr_um)
    meas = read_measurement(sdata, inputs, layer=layer, min_qv=min_qv)
    _check_not_empty(meas)
    if meas.kind == "spots":
        _check_spots_under_image(meas, inputs)
    return inputs, meas


@dataclass
class _Area:
    """The grid (whole tiles), the tissue on it, the tile side and the LR counts of every gene."""

    grid: Grid
    tissue: np.ndarray
    all_lr: np.ndarray
    coverage: np.ndarray
    tile_um: float

    @property
    def tile_lr(self) -> int:
        return int(round(self.tile_um / self.grid.lr_um))


def _grid(meas: Measurement, inputs, lr_um: float, scale: int, tile_um: float | None, spot_pitch_um) -> _Area:
    """The LR/HR grid over the data, the tissue and every gene's LR counts; default tiles shrink to a small crop."""
    default_tile = tile_um is None
    if default_tile:
        tile_um = default_tile_um(lr_um, inputs.spot_pitch_um if meas.kind == "spots" else spot_pitch_um)
    grid, tissue, all_lr, coverage = _grid_and_tissue(meas, inputs, lr_um, scale, tile_um)
    span = _tissue_span(tissue)
    if default_tile and tile_um > span * lr_um:
        # a small crop: tiles as large as the tissue (the default ones would not fit it)
        log.info(f"the tissue spans {span * lr_um:g} µm: tiles of {span * lr_um:g} µm instead of {tile_um:g} µm")
        tile_um = float(span * lr_um)
        grid, tissue, all_lr, coverage = _grid_and_tissue(meas, inputs, lr_um, scale, tile_um)
    _check_tile_fits(tissue, int(round(tile_um / lr_um)), tile_um)
    return _Area(grid, tissue, all_lr, coverage, float(tile_um))


def _genes(meas: Measurement, area: _Area, genes, context_genes, criterion) -> tuple[list[str], dict, list[str]]:
    """The genes to predict (and how they were chosen) and the panel-context genes."""
    grid = area.grid
    rows, cols = np.nonzero(np.ones(grid.lr_shape, dtype=bool))
    xy = np.column_stack(grid.pixel_centre_um(rows, cols, level="lr"))
    flat_all = area.all_lr.reshape(len(meas.gene_names), -1)
    density_all = flat_all / np.maximum(area.coverage.reshape(-1), 1e-9)[None]
    chosen, selection_info = select_genes(genes, names=meas.gene_names, lr_counts=flat_all, lr_density=density_all,
                                          tissue=area.tissue.reshape(-1), xy_um=xy, criterion=criterion)  # fmt: skip
    log.info(
        f"{len(chosen)} genes ({selection_info['method']}): {', '.join(chosen[:8])}{' …' if len(chosen) > 8 else ''}"
    )
    context = _context_genes(context_genes, chosen, meas.gene_names, flat_all, density_all, area.tissue, xy,
                             criterion)  # fmt: skip
    return chosen, selection_info, context


@dataclass
class _Rasters:
    """The LR (and HR) counts of the chosen genes, the observed fraction of each LR pixel, how LR arises from HR."""

    lr: np.ndarray
    hr: np.ndarray | None
    coverage: np.ndarray
    degradation: str
    spot_centres: np.ndarray | None = None
    spot_diameter: float | None = None
    spot_pitch: float | None = None
    context_lr: np.ndarray | None = None

    def degradation_record(self) -> DegradationRecord:
        d, p = self.spot_diameter, self.spot_pitch
        return DegradationRecord(self.degradation, None if d is None else float(d), None if p is None else float(p))


def _rasters(meas: Measurement, inputs, area: _Area, chosen: list[str], context: list[str], degradation: str,
             spot_diameter_um, spot_pitch_um) -> _Rasters:  # fmt: skip
    """HR counts of the chosen genes (transcripts, bins) and their LR: the spots measured, or the HR degraded."""
    grid = area.grid
    gene_idx = np.array([meas.gene_names.index(g) for g in chosen])
    if meas.kind == "spots":
        x0, y0, x1, y1 = grid.extent_um
        c = meas.centres_um
        inside = (c[:, 0] >= x0) & (c[:, 0] < x1) & (c[:, 1] >= y0) & (c[:, 1] < y1)
        out = _Rasters(area.all_lr[gene_idx].astype(np.float32), None, area.coverage, "spots", c[inside],
                       meas.spot_diameter_um, inputs.spot_pitch_um)  # fmt: skip
        op = None
    else:
        hr = _hr_raster(meas, grid, gene_idx)
        if degradation == "bin":
            op = BinDegradation(grid.scale)
            out = _Rasters(np.empty(0), hr, op.coverage(grid.lr_shape), "bin")
        else:
            pitch = float(spot_pitch_um) if spot_pitch_um is not None else float(grid.lr_um)
            spot_d = (
                float(spot_diameter_um)
                if spot_diameter_um is not None
                else pitch * VISIUM_SPOT_DIAMETER_UM / VISIUM_SPOT_PITCH_UM
            )
            if spot_d >= pitch:
                msg = f"spot_diameter_um={spot_d:g} must be smaller than the lattice pitch {pitch:g} µm (spots may not overlap)."
                raise ValueError(msg)
            centres = hex_lattice(grid, pitch)
            op = SpotDegradation(grid, centres, spot_d)
            out = _Rasters(np.empty(0), hr, op.coverage(), degradation, centres, spot_d, pitch)
        out.lr = op.degrade(hr).astype(np.float32)
    if context:
        ctx_idx = np.array([meas.gene_names.index(g) for g in context])
        # measured the same way as the genes' LR: the spots (or bins) as they are, simulated spots through `op`
        out.context_lr = (area.all_lr[ctx_idx] if op is None or isinstance(op, BinDegradation)
                          else op.degrade(_hr_raster(meas, grid, ctx_idx))).astype(np.float32)  # fmt: skip
    return out


def _split(area: _Area, min_tissue: float, split, split_block_um, seed: int):
    """Tiles over the tissue with a spatially blocked split; the tiles per split; the block side (µm)."""
    tile_um = area.tile_um
    block = split_block_um if split_block_um is not None else 2 * tile_um
    block_tiles = max(1, int(round(block / tile_um)))
    tiles = make_tiles(area.grid, area.tissue, tile_lr=area.tile_lr, min_tissue=min_tissue, split=split,
                       block_tiles=block_tiles, seed=seed)  # fmt: skip
    if tiles.empty:
        msg = (
            f"No {tile_um:g} µm tile has at least {min_tissue:.0%} tissue. Use smaller tiles (`tile_um`) or a lower "
            "`min_tissue`."
        )
        raise ValueError(msg)
    counts_per_split = tiles["split"].value_counts().reindex(["train", "val", "test"]).fillna(0).astype(int)
    if counts_per_split["train"] == 0:
        msg = f"No training tile: only {len(tiles)} tiles fit. Use smaller `tile_um` or `split_block_um`."
        raise ValueError(msg)
    if counts_per_split["val"] == 0 and split[1] > 0:
        log.info(
            f"no validation tile among the {len(tiles)} tiles of {tile_um:g} µm: `dst.tl.train` holds out a spatially "
            "blocked band of the training tiles for validation instead"
        )
    if counts_per_split["test"] == 0 and split[2] > 0:
        log.warn(
            f"no test tile among the {len(tiles)} tiles of {tile_um:g} µm: `dst.tl.evaluate` has nothing to score; for "
            "a held-out test region prepare with a smaller `tile_um`"
        )
    return tiles, counts_per_split, block


@dataclass
class _Normalisation:
    """Per-gene scales and the co-expression intensity, from the training tiles only."""

    lr_scale: np.ndarray
    hr_scale: np.ndarray | None
    context_scale: np.ndarray | None
    coexpr: np.ndarray
    reference: str

    def record(self) -> NormalisationRecord:
        return NormalisationRecord(
            lr_scale=tuple(float(v) for v in self.lr_scale),
            hr_scale=None if self.hr_scale is None else tuple(float(v) for v in self.hr_scale),
            reference=self.reference,
            description="x = 2·log1p(counts per HR pixel)/scale_g − 1; LR is first divided by the observed HR-pixel area",
        )

    def coexpression_record(self) -> dict[str, Any]:
        return {
            "definition": "I_ij = (p(i|j) + p(j|i))/2, p(i|j) = share of gene j's counts in pixels where gene i is detected",
            "pixels": "HR pixels of training tiles"
            if self.reference == "hr"
            else "observed LR pixels of training tiles",
            "matrix": [[float(v) for v in row] for row in self.coexpr],
        }


def _normalisation(rasters: _Rasters, area: _Area, tiles, seed: int) -> _Normalisation:
    grid, scale, coverage = area.grid, area.grid.scale, rasters.coverage
    train_lr = _tile_mask(grid.lr_shape, tiles[tiles["split"] == "train"], area.tile_lr) & area.tissue
    observed_train = train_lr & (coverage > 0)

    def scale_of(lr: np.ndarray) -> np.ndarray:
        density = lr / np.maximum(coverage * scale * scale, 1e-9)[None]
        return robust_scale(density[:, observed_train], floor=1e-2)

    context_scale = None if rasters.context_lr is None else scale_of(rasters.context_lr)
    hr = rasters.hr
    if hr is None:
        return _Normalisation(scale_of(rasters.lr), None, context_scale,
                              coexpression_intensity(rasters.lr[:, observed_train]), "lr")  # fmt: skip
    train_hr = np.kron(train_lr, np.ones((scale, scale), dtype=bool))
    hr_scale = np.concatenate(
        [robust_scale(hr[g0 : g0 + _GENE_CHUNK][:, train_hr], floor=1.0) for g0 in range(0, len(hr), _GENE_CHUNK)]
    )
    rows_px, cols_px = np.nonzero(train_hr)
    pick = _subsample(len(rows_px), _MAX_COEXPR_PIXELS, seed)
    coexpr = coexpression_intensity(hr[:, rows_px[pick], cols_px[pick]])
    return _Normalisation(scale_of(rasters.lr), hr_scale, context_scale, coexpr, "hr")


def _elements(names: dict[str, str], inputs, area: _Area, rasters: _Rasters, tiles, chosen, context) -> dict:
    """The new SpatialData elements, each with its transformation to the source coordinate system."""
    cs, u, grid = inputs.cs, inputs.um_per_px, area.grid
    lr_t, hr_t = grid.transform(u, "lr"), grid.transform(u, "hr")
    elements: dict[str, tuple[str, Any]] = {
        names["lr"]: ("images", _image(rasters.lr, chosen, lr_t, cs)),
        names["lr_mask"]: ("images", _image(rasters.coverage[None], ["observed"], lr_t, cs)),
    }
    if rasters.hr is not None:
        elements[names["hr"]] = ("images", _image(rasters.hr, chosen, hr_t, cs))
    elements[names["tissue"]] = (
        "labels",
        Labels2DModel.parse(area.tissue.astype(np.uint8), dims=("y", "x"), transformations={cs: lr_t}),
    )
    elements[names["tiles"]] = ("shapes", _tiles_shapes(tiles, grid, area.tile_lr, cs, u))
    if rasters.spot_centres is not None:
        elements[names["spots"]] = ("shapes", _spots_shapes(rasters.spot_centres, rasters.spot_diameter, grid, cs, u))
    if rasters.context_lr is not None:
        elements[names["context"]] = ("images", _image(rasters.context_lr, context, lr_t, cs))
    return elements


def _context_genes(context, chosen, names, flat_all, density_all, tissue, xy, criterion) -> list[str]:
    """The panel-context genes: the next ones after ``chosen`` by the selection criterion, or the ones named."""
    if not isinstance(context, int | np.integer) and len(context) == 0:
        return []
    if isinstance(context, int | np.integer):
        if context < 0:
            msg = f"`context_genes` must be a number ≥ 0 or a list of gene names; got {context}."
            raise ValueError(msg)
        if context == 0:
            return []
        ranked, _ = select_genes(len(chosen) + int(context), names=names, lr_counts=flat_all, lr_density=density_all,
                                 tissue=tissue.reshape(-1), xy_um=xy, criterion=criterion)  # fmt: skip
        extra = [g for g in ranked if g not in chosen][: int(context)]
        if len(extra) < context:
            log.info(f"panel context: {len(extra)} genes qualify besides the {len(chosen)} chosen (asked {context})")
        return extra
    named, _ = select_genes(list(context), names=names, lr_counts=flat_all, lr_density=density_all,
                            tissue=tissue.reshape(-1), xy_um=xy, criterion=criterion)  # fmt: skip
    both = sorted(set(named) & set(chosen))
    if both:
        msg = f"`context_genes` and `genes` share {both}: a context gene conditions the model, it is not predicted."
        raise ValueError(msg)
    return named


#: µm per pixel at which the default model reads the image (``DiffSTConfig.image_um``).
MODEL_IMAGE_UM = 2.0


def _warn_coarse_image(key: str, image_um: float, hr_um: float) -> None:
    """Warn when the image is coarser than the model reads it: its detail within an HR pixel is then lost."""
    if image_um <= 1.5 * MODEL_IMAGE_UM:
        return
    hint = "pass the full-resolution image (`image_key=`)"
    if key.endswith(("_hires_image", "_lowres_image")):
        hint = (
            "read the slide with its full-resolution image: `spatialdata_io.visium(path, "
            "fullres_image_file=<the image given to Space Ranger>)`; the reader joins that name to `path` and skips "
            "it, with a 'does not exist' message, when the image lies elsewhere: give its absolute path"
        )
    elif key.startswith("morphology"):
        hint = "check the Xenium image's pixel size (`spatialdata_io.xenium` reads it from the experiment file)"
    log.warn(
        f"the image {key!r} has {image_um:.3g} µm per pixel, coarser than the {MODEL_IMAGE_UM:g} µm per pixel the model "
        f"reads (HR pixels of {hr_um:g} µm): what it shows within a pixel is lost. To fix: {hint}."
    )


def _split_areas(tiles, tile_um: float) -> dict[str, float]:
    """Tissue area (mm²) of each split: tile area times the tiles' tissue fractions."""
    area = tiles["tissue_fraction"] * (tile_um / 1000.0) ** 2
    return {k: float(area[tiles["split"] == k].sum()) for k in ("train", "val", "test")}


def _version() -> str:
    from diffst import __version__

    return __version__


#: Default tile side (µm) and the least number of spot pitches a tile spans.
DEFAULT_TILE_UM, TILE_PITCHES = 400.0, 4


def default_tile_um(lr_um: float, pitch_um: float | None) -> float:
    """400 µm, or :data:`TILE_PITCHES` spot pitches when larger, rounded up to a multiple of ``lr_um``."""
    target = max(DEFAULT_TILE_UM, TILE_PITCHES * float(pitch_um or 0.0))
    return float(lr_um * max(1, int(np.ceil(target / lr_um - 1e-6))))


def _check_arguments(genes, scale, lr_um, degradation, tile_um, min_tissue, split, key_added) -> None:
    if not isinstance(scale, int | np.integer) or scale < 1:
        msg = f"`scale` must be a positive integer (HR pixels per LR pixel along an axis); got {scale!r}."
        raise ValueError(msg)
    if not np.isfinite(lr_um) or lr_um <= 0:
        msg = f"`lr_um` must be a positive size in µm; got {lr_um!r}."
        raise ValueError(msg)
    if degradation not in ("bin", "visium"):
        msg = f"`degradation` must be 'bin' or 'visium'; got {degradation!r}."
        raise ValueError(msg)
    ratio = tile_um / lr_um if tile_um is not None else None  # None: the default, chosen from the data
    if ratio is not None and (tile_um <= 0 or abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1):
        msg = f"`tile_um`={tile_um:g} must be a positive multiple of `lr_um`={lr_um:g}."
        raise ValueError(msg)
    if not 0 <= min_tissue <= 1:
        msg = f"`min_tissue` must be a fraction in [0, 1]; got {min_tissue!r}."
        raise ValueError(msg)
    if len(split) != 3 or any(s < 0 for s in split) or sum(split) <= 0:
        msg = f"`split` must be three non-negative shares (train, val, test); got {split!r}."
        raise ValueError(msg)
    if not isinstance(key_added, str) or not key_added:
        msg = f"`key_added` must be a non-empty string; got {key_added!r}."
        raise ValueError(msg)
    if isinstance(genes, int | np.integer) and genes < 1:
        msg = f"`genes` must be a positive number of genes or a list of names; got {genes}."
        raise ValueError(msg)


def _check_not_empty(meas: Measurement) -> None:
    n = meas.n_transcripts if meas.kind == "transcripts" else meas.counts.shape[0]
    if n == 0:
        what = "transcripts" if meas.kind == "transcripts" else meas.kind
        msg = f"The measurement has no {what}; there is nothing to prepare."
        raise ValueError(msg)
    if meas.kind != "transcripts":
        per_spot = np.asarray(meas.counts.sum(axis=1)).ravel()
        if not np.any(per_spot > 0):
            msg = (
                f"None of the {n} {meas.kind} has any counts (the table is all zeros). Check `table_key` and `layer`: "
                "diffst needs the raw counts of the spots (Space Ranger's filtered or raw feature-barcode matrix)."
            )
            raise ValueError(msg)


#: Share of the spots that may lie outside the image before ``prepare`` refuses the data.
MAX_SPOTS_OFF_IMAGE = 0.5


def _check_spots_under_image(meas: Measurement, inputs) -> None:
    """Spots outside the image cannot be super-resolved (nor learnt from): warn when some are, refuse when most are."""
    x0, y0, x1, y1 = inputs.image_extent_um
    c = meas.centres_um
    off = (c[:, 0] < x0) | (c[:, 0] >= x1) | (c[:, 1] < y0) | (c[:, 1] >= y1)
    share = float(off.mean()) if len(off) else 0.0
    if share == 0:
        return
    what = (
        f"{int(off.sum())} of {len(off)} spots ({share:.0%}) lie outside the image {inputs.image_key!r} "
        f"(x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f} µm in {inputs.cs!r})"
    )
    if share > MAX_SPOTS_OFF_IMAGE:
        msg = (
            f"{what}: the image does not cover the spots. Check that it is the image of this slide, that the "
            "transformations put both in the same coordinate system (`coordinate_system=`), or pass the right "
            "`image_key` / `um_per_px`."
        )
        raise ValueError(msg)
    log.warn(f"{what}; they are left out")


def _make_grid(meas: Measurement, inputs, lr_um: float, scale: int, tile_um: float) -> Grid:
    dx0, dy0, dx1, dy1 = meas.extent_um()
    ix0, iy0, ix1, iy1 = inputs.image_extent_um
    ext = (max(dx0, ix0), max(dy0, iy0), min(dx1, ix1), min(dy1, iy1))
    if ext[0] >= ext[2] or ext[1] >= ext[3]:
        msg = (
            f"The image {inputs.image_key!r} and the {meas.kind} do not overlap in coordinate system {inputs.cs!r}: "
            f"image spans x {ix0:.1f}–{ix1:.1f}, y {iy0:.1f}–{iy1:.1f} µm, the {meas.kind} x {dx0:.1f}–{dx1:.1f}, "
            f"y {dy0:.1f}–{dy1:.1f} µm. Check the transformations (or `um_per_px`)."
        )
        raise ValueError(msg)
    anchor = meas.bin_anchor_um or (0.0, 0.0)
    grid = Grid.covering(ext, lr_um, scale, anchor_um=anchor)
    # whole tiles: round the LR grid up to a multiple of the tile
    t = int(round(tile_um / lr_um))
    h, w = grid.lr_shape
    return Grid(grid.origin_um, grid.lr_um, grid.scale, (int(np.ceil(h / t) * t), int(np.ceil(w / t) * t)))


def _lr_all_genes(meas: Measurement, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """LR counts of every gene and the observed fraction per LR pixel (1 for transcripts/bins)."""
    h, w = grid.lr_shape
    n_genes = len(meas.gene_names)
    if meas.kind == "transcripts":
        out = meas.transcripts.bin(partial(grid.pixel_index, level="lr"), (h, w))
        return out, np.ones((h, w), dtype=np.float32)
    r, c = grid.pixel_index(meas.centres_um[:, 0], meas.centres_um[:, 1], level="lr")
    ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    coo = meas.counts[np.flatnonzero(ok)].tocoo()
    pix = (r[ok] * w + c[ok])[coo.row]
    out = np.bincount(coo.col * (h * w) + pix, weights=coo.data, minlength=n_genes * h * w).reshape(n_genes, h, w)
    if meas.kind == "bins":
        return out, np.ones((h, w), dtype=np.float32)
    area = np.pi * (meas.spot_diameter_um / 2.0) ** 2 / grid.lr_um**2
    coverage = np.bincount(r[ok] * w + c[ok], minlength=h * w).reshape(h, w) * area
    return out, coverage.astype(np.float32)


def _hr_raster(meas: Measurement, grid: Grid, gene_idx: np.ndarray) -> np.ndarray:
    """HR counts ``(genes, H, W)`` float32 of the selected genes.

    Transcripts are binned partition by partition, bins a few genes at a time, to bound memory.
    """
    hh, ww = grid.hr_shape
    n = len(gene_idx)
    remap = np.full(len(meas.gene_names), -1, dtype=np.int64)
    remap[gene_idx] = np.arange(n)
    if meas.kind == "transcripts":
        return meas.transcripts.bin(partial(grid.pixel_index, level="hr"), (hh, ww), remap=remap, dtype=np.float32)
    r, c = grid.pixel_index(meas.centres_um[:, 0], meas.centres_um[:, 1], level="hr")
    ok_bins = (r >= 0) & (r < hh) & (c >= 0) & (c < ww)
    coo = meas.counts[np.flatnonzero(ok_bins)][:, gene_idx].tocoo()
    gene, pix, weights = coo.col.astype(np.int64), (r[ok_bins] * ww + c[ok_bins])[coo.row], coo.data
    out = np.empty((n, hh, ww), dtype=np.float32)
    order = np.argsort(gene, kind="stable")
    bounds = np.searchsorted(gene[order], np.arange(n + 1))
    for g0 in range(0, n, _GENE_CHUNK):
        g1 = min(n, g0 + _GENE_CHUNK)
        sel = order[bounds[g0] : bounds[g1]]
        lin = (gene[sel] - g0) * (hh * ww) + pix[sel]
        out[g0:g1] = np.bincount(lin, weights=weights[sel], minlength=(g1 - g0) * hh * ww).reshape(g1 - g0, hh, ww)
    return out


def _grid_and_tissue(meas: Measurement, inputs, lr_um: float, scale: int, tile_um: float):
    """The grid (whole tiles), the tissue mask and the LR counts of every gene (the basis of gene selection)."""
    grid = _make_grid(meas, inputs, lr_um, scale, tile_um)
    all_lr, coverage = _lr_all_genes(meas, grid)
    real_genes = np.array([not CONTROL_PATTERN.match(g) for g in meas.gene_names])
    total = all_lr[real_genes].sum(axis=0)
    tissue = tissue_from_counts(total, coverage, spots=meas.kind == "spots")
    if not tissue.any():
        msg = (
            f"No tissue found: no LR pixel of {lr_um:g} µm has enough counts (the measurement has "
            f"{int(all_lr.sum())} counts in total over the image area). Check that the image and measurement overlap "
            "and that the counts are not empty."
        )
        raise ValueError(msg)
    return grid, tissue, all_lr, coverage


def _tissue_span(tissue: np.ndarray) -> int:
    """The longer side of the tissue's bounding box, in LR pixels."""
    rows, cols = np.nonzero(tissue)
    return int(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))


def _check_tile_fits(tissue: np.ndarray, tile_lr: int, tile_um: float) -> None:
    rows, cols = np.nonzero(tissue)
    span_r = rows.max() - rows.min() + 1
    span_c = cols.max() - cols.min() + 1
    if tile_lr > span_r and tile_lr > span_c:
        lr_um = tile_um / tile_lr
        msg = (
            f"Tiles of {tile_um:g} µm are larger than the tissue ({span_c * lr_um:g} × {span_r * lr_um:g} µm). "
            "Use a smaller `tile_um`."
        )
        raise ValueError(msg)


def _tile_mask(lr_shape: tuple[int, int], tiles: pd.DataFrame, tile_lr: int) -> np.ndarray:
    mask = np.zeros(lr_shape, dtype=bool)
    for r0, c0 in zip(tiles["lr_row0"], tiles["lr_col0"], strict=True):
        mask[r0 : r0 + tile_lr, c0 : c0 + tile_lr] = True
    return mask


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _image(data: np.ndarray, channels: list[str], transform, cs: str):
    return Image2DModel.parse(
        np.asarray(data, dtype=np.float32),  # no copy when already float32 (the HR raster can be large)
        dims=("c", "y", "x"),
        c_coords=list(channels),
        transformations={cs: transform},
        chunks=(min(len(channels), 32), 1024, 1024),
    )


def _tiles_shapes(tiles: pd.DataFrame, grid: Grid, tile_lr: int, cs: str, u: float):
    x0 = grid.origin_um[0] + tiles["lr_col0"].to_numpy() * grid.lr_um
    y0 = grid.origin_um[1] + tiles["lr_row0"].to_numpy() * grid.lr_um
    side = tile_lr * grid.lr_um
    geoms = shapely.box(x0, y0, x0 + side, y0 + side)
    gdf = gpd.GeoDataFrame(tiles.reset_index(drop=True), geometry=geoms)
    gdf.index.name = "tile_id"
    return ShapesModel.parse(gdf, transformations={cs: Scale([1 / u, 1 / u], axes=("x", "y"))})


def _spots_shapes(centres: np.ndarray, diameter: float, grid: Grid, cs: str, u: float):
    lr_row, lr_col = grid.pixel_index(centres[:, 0], centres[:, 1], level="lr")
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(centres), diameter / 2.0), "lr_row": lr_row, "lr_col": lr_col},
        geometry=gpd.points_from_xy(centres[:, 0], centres[:, 1]),
    )
    return ShapesModel.parse(gdf, transformations={cs: Scale([1 / u, 1 / u], axes=("x", "y"))})
