"""The contract between :func:`diffst.pp.prepare` and everything after it: what ``sdata.attrs`` holds.

This module is the only reader and writer of diffst's entries in ``sdata.attrs``. Two kinds of entries exist, each a
typed, versioned record with ``to_dict``/``from_dict``:

- :class:`PreparedRecord` under the ``key_added`` of ``prepare`` (``"diffst"``): units, grid, genes and their
  normalisation, degradation, image, tiles and split, the element names, and what later steps added (the trained
  model's path, the image features);
- :class:`SRRecord` under the ``key_added`` of a super-resolution or a baseline (``"diffst_sr"``, ``"bicubic_sr"``):
  the method, the prepared data it was made from, its units, genes, grid and elements, and the method's parameters.

Each dict carries ``"diffst_schema"`` (``"prepared/1"``, ``"sr/1"``), which tells them from other entries of
``sdata.attrs``; a newer version than this diffst knows is refused with a message to upgrade.

:class:`Prepared` is the prepared data as the tools see them (the record, the elements it names, the coverage);
:func:`read_sr` finds an SR result; :func:`check_same_grid` checks a raster against a prepared HR grid;
:func:`read_window` is the one zero-padded window reader of rasters on these grids.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._grid import Grid
from ._image import ImageSpec

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData

#: The version of both records this diffst writes; a store with a higher one needs a newer diffst.
SCHEMA_VERSION = 1
_PREPARED, _SR = "prepared", "sr"
Kind = Literal["prepared", "sr"]


class ContractError(KeyError):
    """Prepared data or an SR result that is missing, incomplete or written by a newer diffst."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _schema(kind: Kind) -> str:
    return f"{kind}/{SCHEMA_VERSION}"


def kind_of(value: Any) -> Kind | None:
    """``"prepared"``, ``"sr"`` or ``None``: what a ``sdata.attrs`` entry is, by its schema tag."""
    if not isinstance(value, dict):
        return None
    tag = value.get("diffst_schema")
    if isinstance(tag, str) and "/" in tag:
        kind = tag.split("/", 1)[0]
        return kind if kind in (_PREPARED, _SR) else None  # type: ignore[return-value]
    return None


def _check_version(value: dict[str, Any], key: str) -> None:
    tag = value.get("diffst_schema", f"x/{SCHEMA_VERSION}")
    version = int(str(tag).split("/", 1)[1])
    if version > SCHEMA_VERSION:
        from diffst import __version__

        msg = (
            f"sdata.attrs[{key!r}] was written by a newer diffst (schema {tag}; this diffst {__version__} reads up to "
            f"version {SCHEMA_VERSION}); upgrade diffst (`pip install -U diffst`)."
        )
        raise ContractError(msg)


def keys_of(sdata: SpatialData, kind: Kind) -> list[str]:
    """The ``sdata.attrs`` keys holding prepared data (``"prepared"``) or SR results (``"sr"``)."""
    return [k for k, v in sdata.attrs.items() if kind_of(v) == kind]


# --------------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DegradationRecord:
    """How LR arises from HR: ``"bin"`` (square bins) or spot discs (``"visium"``, ``"spots"``) of a diameter."""

    name: str
    spot_diameter_um: float | None = None
    spot_pitch_um: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DegradationRecord:
        """Inverse of :meth:`to_dict`."""
        num = lambda v: None if v is None else float(v)
        return cls(str(d["name"]), num(d.get("spot_diameter_um")), num(d.get("spot_pitch_um")))


@dataclass(frozen=True)
class NormalisationRecord:
    """Per-gene robust scales of the model units ``x = 2·log1p(counts per HR pixel)/scale_g − 1``."""

    lr_scale: tuple[float, ...]
    hr_scale: tuple[float, ...] | None
    reference: str
    method: str = "log1p_quantile"
    quantile: float = 0.99
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the key order of the stored dict)."""
        return {
            "method": self.method,
            "quantile": float(self.quantile),
            "description": self.description,
            "hr_scale": None if self.hr_scale is None else [float(v) for v in self.hr_scale],
            "lr_scale": [float(v) for v in self.lr_scale],
            "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormalisationRecord:
        """Inverse of :meth:`to_dict`."""
        hr = d.get("hr_scale")
        return cls(
            lr_scale=tuple(float(v) for v in d["lr_scale"]),
            hr_scale=None if hr is None else tuple(float(v) for v in hr),
            reference=str(d.get("reference", "hr" if hr is not None else "lr")),
            method=str(d.get("method", "log1p_quantile")),
            quantile=float(d.get("quantile", 0.99)),
            description=str(d.get("description", "")),
        )


@dataclass(frozen=True)
class SplitRecord:
    """The spatially blocked split: shares of ``(train, val, test)``, block size, seed and tiles per split."""

    shares: tuple[float, float, float]
    block_um: float
    seed: int
    tiles: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tile counts as top-level keys ``train``, ``val``, ``test``)."""
        return {"shares": [float(s) for s in self.shares], "block_um": float(self.block_um), "seed": int(self.seed)} | {
            k: int(v) for k, v in self.tiles.items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitRecord:
        """Inverse of :meth:`to_dict`."""
        shares = tuple(float(s) for s in d["shares"])
        tiles = {k: int(d[k]) for k in ("train", "val", "test") if k in d}
        return cls(shares=shares, block_um=float(d["block_um"]), seed=int(d["seed"]), tiles=tiles)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ImageRecord:
    """The image ``prepare`` read: how to read and normalise it, its native resolution and why its kind."""

    spec: ImageSpec
    image_um_per_px: float | None = None
    kind_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: the :class:`ImageSpec` fields and the two others."""
        return self.spec.to_dict() | {"image_um_per_px": self.image_um_per_px, "kind_reason": self.kind_reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        """Inverse of :meth:`to_dict`."""
        native = d.get("image_um_per_px")
        return cls(ImageSpec.from_dict(d), None if native is None else float(native), d.get("kind_reason"))

    @property
    def native_um_per_px(self) -> float:
        """µm per pixel of the image's finest level (its coordinate system's units when not recorded)."""
        return float(self.image_um_per_px if self.image_um_per_px is not None else self.spec.um_per_px)


@dataclass(frozen=True)
class PreparedRecord:
    """Everything ``dst.pp.prepare`` records under ``sdata.attrs[key_added]`` (and what later steps add to it).

    ``model`` (the trained model's path and run, from ``dst.tl.train``) and ``image_features`` (from
    ``dst.pp.image_features``) are ``None`` until those steps ran. Keys this diffst does not know are kept in
    ``extra`` and written back unchanged.
    """

    diffst_version: str
    coordinate_system: str
    um_per_px: float
    um_per_px_source: str
    measurement: str
    sources: dict[str, Any]
    grid: Grid
    degradation: DegradationRecord
    genes: tuple[str, ...]
    gene_selection: dict[str, Any]
    normalisation: NormalisationRecord
    coexpression: dict[str, Any]
    image: ImageRecord
    tile_um: float
    min_tissue: float
    split: SplitRecord
    elements: dict[str, str]
    model: dict[str, Any] | None = None
    image_features: dict[str, Any] | None = None
    #: The panel context (``prepare(context_genes=...)``): ``{"genes": [...], "lr_scale": [...]}``, else ``None``.
    context: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lr_um(self) -> float:
        """LR pixel size in µm."""
        return self.grid.lr_um

    @property
    def hr_um(self) -> float:
        """HR pixel size in µm."""
        return self.grid.hr_um

    @property
    def scale(self) -> int:
        """HR pixels per LR pixel along each axis."""
        return self.grid.scale

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable dict stored in ``sdata.attrs`` (the layout of version 1)."""
        out: dict[str, Any] = {
            "diffst_schema": _schema(_PREPARED),
            "diffst_version": self.diffst_version,
            "coordinate_system": self.coordinate_system,
            "um_per_px": float(self.um_per_px),
            "um_per_px_source": self.um_per_px_source,
            "measurement": self.measurement,
            "sources": copy.deepcopy(self.sources),
            "grid": self.grid.to_dict(),
            "lr_um": float(self.lr_um),
            "hr_um": float(self.hr_um),
            "scale": int(self.scale),
            "degradation": self.degradation.to_dict(),
            "genes": list(self.genes),
            "gene_selection": copy.deepcopy(self.gene_selection),
            "normalisation": self.normalisation.to_dict(),
            "coexpression": copy.deepcopy(self.coexpression),
            "image": self.image.to_dict(),
            "tile_um": float(self.tile_um),
            "min_tissue": float(self.min_tissue),
            "split": self.split.to_dict(),
            "elements": dict(self.elements),
        }
        if self.model is not None:
            out["model"] = copy.deepcopy(self.model)
        if self.image_features is not None:
            out["image_features"] = copy.deepcopy(self.image_features)
        if self.context is not None:
            out["context"] = copy.deepcopy(self.context)
        return out | copy.deepcopy(self.extra)

    @classmethod
    def from_dict(cls, d: dict[str, Any], key: str = "diffst") -> PreparedRecord:
        """Inverse of :meth:`to_dict`; reads every version up to :data:`SCHEMA_VERSION`."""
        _check_version(d, key)
        known = {f.name for f in dataclasses.fields(cls)} | {"diffst_schema", "lr_um", "hr_um", "scale"}
        return cls(
            diffst_version=str(d.get("diffst_version", "unknown")),
            coordinate_system=str(d["coordinate_system"]),
            um_per_px=float(d["um_per_px"]),
            um_per_px_source=str(d.get("um_per_px_source", "unknown")),
            measurement=str(d.get("measurement", "unknown")),
            sources=copy.deepcopy(dict(d.get("sources", {}))),
            grid=Grid.from_dict(d["grid"]),
            degradation=DegradationRecord.from_dict(d["degradation"]),
            genes=tuple(str(g) for g in d["genes"]),
            gene_selection=copy.deepcopy(dict(d.get("gene_selection", {}))),
            normalisation=NormalisationRecord.from_dict(d["normalisation"]),
            coexpression=copy.deepcopy(dict(d["coexpression"])),
            image=ImageRecord.from_dict(d["image"]),
            tile_um=float(d["tile_um"]),
            min_tissue=float(d.get("min_tissue", 0.0)),
            split=SplitRecord.from_dict(d["split"]),
            elements={str(k): str(v) for k, v in d["elements"].items()},
            model=copy.deepcopy(d.get("model")),
            image_features=copy.deepcopy(d.get("image_features")),
            context=copy.deepcopy(d.get("context")),
            extra={k: copy.deepcopy(v) for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class SRRecord:
    """What a super-resolved result records under ``sdata.attrs[key_added]``: the method's output contract.

    ``params`` holds the method's own parameters (sampler, seed, model, guard weights, ...), stored beside the
    fixed fields.
    """

    method: str
    prepared_key: str
    units: Literal["counts", "log1p"]
    genes: tuple[str, ...]
    grid: Grid | None
    elements: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    diffst_version: str = "unknown"

    @property
    def std_key(self) -> str | None:
        """The element of the per-pixel standard deviation, if there is one."""
        return self.elements.get("std")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable dict stored in ``sdata.attrs``."""
        return {
            "diffst_schema": _schema(_SR),
            "diffst_version": self.diffst_version,
            "method": self.method,
            "prepared_key": self.prepared_key,
            "units": self.units,
            "genes": list(self.genes),
            "grid": None if self.grid is None else self.grid.to_dict(),
            "elements": dict(self.elements),
            **copy.deepcopy(self.params),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], key: str = "diffst_sr") -> SRRecord:
        """Inverse of :meth:`to_dict`; reads every version up to :data:`SCHEMA_VERSION`."""
        _check_version(d, key)
        fixed = ("diffst_schema", "diffst_version", "method", "prepared_key", "units", "genes", "grid", "elements")
        grid = d.get("grid")
        return cls(
            method=str(d["method"]),
            prepared_key=str(d["prepared_key"]),
            units=str(d.get("units", "counts")),  # type: ignore[arg-type]
            genes=tuple(str(g) for g in d.get("genes", ())),
            grid=None if grid is None else Grid.from_dict(grid),
            elements={str(k): str(v) for k, v in d.get("elements", {"mean": key}).items()},
            params={k: copy.deepcopy(v) for k, v in d.items() if k not in fixed},
            diffst_version=str(d.get("diffst_version", "unknown")),
        )


# --------------------------------------------------------------------------------------------------------------------
# Reading and updating
# --------------------------------------------------------------------------------------------------------------------
def read_record(sdata: SpatialData, key: str) -> PreparedRecord:
    """The prepared record under ``key``, with a clear error when there is none."""
    value = sdata.attrs.get(key)
    if kind_of(value) != _PREPARED:
        found = keys_of(sdata, _PREPARED)
        msg = f"No prepared data under key {key!r}. Run `dst.pp.prepare(sdata, key_added={key!r})` first" + (
            f", or pass one of the prepared keys {found}." if found else "."
        )
        raise ContractError(msg)
    return PreparedRecord.from_dict(value, key)


def update_record(sdata: SpatialData, key: str, **changes: Any) -> PreparedRecord:
    """Replace fields of the prepared record under ``key`` (e.g. ``model=``), in memory and in a backed store."""
    from pathlib import Path

    record = dataclasses.replace(read_record(sdata, key), **changes)
    sdata.attrs[key] = record.to_dict()
    if sdata.path is not None and Path(sdata.path).exists():
        sdata.write_attrs()
    return record


def products(sdata: SpatialData) -> set[str]:
    """Names of the elements diffst wrote: those its prepared data and SR results record."""
    out: set[str] = set()
    for key in keys_of(sdata, _PREPARED):
        record = read_record(sdata, key)
        out.update(record.elements.values())
        if record.image_features is not None:
            out.add(str(record.image_features["key"]))
    for key in keys_of(sdata, _SR):
        out.update(SRRecord.from_dict(sdata.attrs[key], key).elements.values())
    return out


def is_prepared(sdata: SpatialData, key: str) -> bool:
    """Whether ``sdata.attrs[key]`` records prepared data."""
    return kind_of(sdata.attrs.get(key)) == _PREPARED


def is_sr(sdata: SpatialData, key: str) -> bool:
    """Whether ``sdata.attrs[key]`` records an SR result."""
    return kind_of(sdata.attrs.get(key)) == _SR


def read_sr(sdata: SpatialData, key: str) -> tuple[SRRecord, Any, Any | None]:
    """The record, mean element and std element (or ``None``) of an SR result, with a clear error if missing."""
    value = sdata.attrs.get(key)
    if kind_of(value) != _SR or key not in sdata.images:
        found = keys_of(sdata, _SR)
        msg = f"No super-resolved result under {key!r}; run `dst.tl.super_resolve(sdata, key_added={key!r})`" + (
            f" or use one of {found}." if found else "."
        )
        raise ContractError(msg)
    record = SRRecord.from_dict(value, key)
    std = record.std_key
    return record, sdata.images[key], (sdata.images[std] if std else None)


@dataclass
class Prepared:
    """The prepared data under ``sdata.attrs[key]`` as the tools see them: the record and what it names."""

    key: str
    record: PreparedRecord
    coverage: np.ndarray = field(repr=False)

    @classmethod
    def from_sdata(cls, sdata: SpatialData, key: str) -> Prepared:
        """Collect the prepared data under ``key``, with a clear error when it is missing or incomplete."""
        record = read_record(sdata, key)
        missing = [name for name in record.elements.values() if name not in sdata]
        if missing:
            msg = f"sdata.attrs[{key!r}] refers to elements {missing} that are not in the SpatialData; rerun `dst.pp.prepare(..., overwrite=True)`."
            raise ContractError(msg)
        if record.image.spec.key not in sdata.images:
            msg = f"The image {record.image.spec.key!r} that `prepare` used is not in the SpatialData any more."
            raise ContractError(msg)
        coverage = np.asarray(sdata[record.elements["lr_mask"]].values[0], dtype=np.float32)
        return cls(key=key, record=record, coverage=coverage)

    @property
    def grid(self) -> Grid:
        """The LR/HR grids."""
        return self.record.grid

    @property
    def genes(self) -> list[str]:
        """The prepared genes, in channel order."""
        return list(self.record.genes)

    @property
    def image(self) -> ImageSpec:
        """How to read the image."""
        return self.record.image.spec

    @property
    def elements(self) -> dict[str, str]:
        """The element names ``prepare`` wrote (``lr``, ``lr_mask``, ``hr``, ``tissue``, ``tiles``, ``spots``)."""
        return self.record.elements

    @property
    def coordinate_system(self) -> str:
        """The coordinate system the grids are placed in."""
        return self.record.coordinate_system

    @property
    def um_per_px(self) -> float:
        """µm per unit of that coordinate system."""
        return self.record.um_per_px

    @property
    def has_hr(self) -> bool:
        """Whether HR counts (ground truth) exist."""
        return "hr" in self.elements

    @property
    def tile_lr(self) -> int:
        """Tile side in LR pixels."""
        return int(round(self.record.tile_um / self.grid.lr_um))

    @property
    def hr_scale(self) -> np.ndarray | None:
        """Per-gene robust scale of HR counts (model units), when HR exists."""
        v = self.record.normalisation.hr_scale
        return None if v is None else np.asarray(v, dtype=np.float32)

    @property
    def lr_scale(self) -> np.ndarray:
        """Per-gene robust scale of LR counts per HR pixel."""
        return np.asarray(self.record.normalisation.lr_scale, dtype=np.float32)

    @property
    def context_genes(self) -> list[str]:
        """The panel-context genes (their LR conditions the model besides the genes'), empty without a context."""
        return list((self.record.context or {}).get("genes", []))

    @property
    def context_scale(self) -> np.ndarray:
        """Per-gene robust scale of the context genes' LR counts per HR pixel (their model units)."""
        return np.asarray((self.record.context or {}).get("lr_scale", []), dtype=np.float32)

    @property
    def coexpression(self) -> np.ndarray:
        """Co-expression intensity matrix of the genes."""
        return np.asarray(self.record.coexpression["matrix"], dtype=np.float32)

    def hr_transform(self) -> Any:
        """The spatialdata transformation of the HR grid to the prepared coordinate system."""
        return self.grid.transform(self.um_per_px, "hr")

    def tissue(self, sdata: SpatialData) -> np.ndarray:
        """The prepared tissue mask on the LR grid (bool ``(h, w)``)."""
        from ._spatial import image_levels

        name = self.elements["tissue"]
        mask = np.asarray(image_levels(sdata[name])[0].values).squeeze() > 0
        if mask.shape != self.grid.lr_shape:
            msg = f"labels[{name!r}] has shape {mask.shape}, not the LR grid {self.grid.lr_shape}; rerun `dst.pp.prepare`."
            raise ContractError(msg)
        return mask

    def tiles(self, sdata: SpatialData, split: str | None = None) -> gpd.GeoDataFrame:
        """The tiles (optionally of one split)."""
        tiles = sdata[self.elements["tiles"]]
        return tiles if split is None else tiles[tiles["split"] == split]


def check_same_grid(image: Any, what: str, prep: Prepared, grid: Grid | None = None) -> None:
    """Raise unless ``image`` lies on the prepared HR grid (shape and transformation; ``grid`` recorded if any)."""
    from ._spatial import affine_to_cs

    own = prep.grid
    shape = tuple(int(v) for v in image.shape[1:])
    problem = None
    if grid is not None and grid != own:
        problem = f"was made on grid {grid.lr_shape} LR px of {grid.lr_um:g} µm at scale {grid.scale}, origin {grid.origin_um}"
    elif shape != own.hr_shape:
        problem = f"has shape {shape}"
    else:
        cs = prep.coordinate_system
        try:
            m = affine_to_cs(image, cs)
        except Exception:  # noqa: BLE001 - no transformation to cs at all
            m = None
        expected = np.asarray(
            prep.hr_transform().to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64
        )
        if m is None or not np.allclose(m, expected, rtol=1e-6, atol=1e-6):
            problem = f"is not aligned with the HR grid in coordinate system {cs!r}"
    if problem is not None:
        msg = (
            f"{what} {problem}, but the prepared data {prep.key!r} have an HR grid of {own.hr_shape} pixels of "
            f"{own.hr_um:g} µm. Evaluate it against the data it was made from, or rerun the method on these."
        )
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# Windows of rasters on the grids
# --------------------------------------------------------------------------------------------------------------------
def read_window(
    data: Any,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    channels: Any = None,
    dtype: Any = np.float32,
) -> np.ndarray:
    """The window ``[rows[0], rows[1]) × [cols[0], cols[1])`` of a raster, zero where it reaches past the raster.

    ``data`` is ``(C, H, W)`` or ``(H, W)`` (numpy, dask or anything sliceable); ``channels`` picks channels of a
    3-D raster (an index array, a list, or ``None`` for all). Only the part inside the raster is read.
    """
    r0, r1 = rows
    c0, c1 = cols
    h, w = data.shape[-2:]
    lead: tuple[int, ...] = ()
    if data.ndim == 3:
        lead = (data.shape[0] if channels is None else len(channels),)
    out = np.zeros((*lead, r1 - r0, c1 - c0), dtype=dtype)
    rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    if rr1 > rr0 and cc1 > cc0:
        inner = (slice(rr0, rr1), slice(cc0, cc1))
        few = channels is not None and data.ndim == 3 and 2 * len(channels) < data.shape[0]
        if few:  # a few channels of many: read only those
            block = np.asarray(data[(np.asarray(channels), *inner)], dtype=dtype)
        else:  # most or all: one plain slice, then pick in memory (cheaper than fancy indexing a dask array)
            block = np.asarray(data[(..., *inner)], dtype=dtype)
            block = block if channels is None else block[np.asarray(channels)]
        out[..., rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = block
    return out
