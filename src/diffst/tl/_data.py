"""Read what ``dst.pp.prepare`` wrote and stream tiles (image crop, LR, mask, HR) to the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._grid import Grid
from .._image import ImageSpec, read_tile
from .._normalise import lr_to_model_units, to_model_units

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData


@dataclass
class Prepared:
    """The parameters and elements ``dst.pp.prepare`` recorded under ``sdata.attrs[key]``."""

    key: str
    attrs: dict[str, Any]
    grid: Grid
    genes: list[str]
    image: ImageSpec
    elements: dict[str, str]
    coverage: np.ndarray = field(repr=False)

    @classmethod
    def from_sdata(cls, sdata: SpatialData, key: str) -> Prepared:
        """Collect the prepared data under ``key``, with a clear error when it is missing or incomplete."""
        attrs = sdata.attrs.get(key)
        if not isinstance(attrs, dict) or "grid" not in attrs:
            found = [k for k, v in sdata.attrs.items() if isinstance(v, dict) and "grid" in v]
            msg = f"No prepared data under key {key!r}. Run `dst.pp.prepare(sdata, key_added={key!r})` first" + (
                f", or pass one of the prepared keys {found}." if found else "."
            )
            raise KeyError(msg)
        elements = dict(attrs["elements"])
        missing = [name for name in elements.values() if name not in sdata]
        if missing:
            msg = f"sdata.attrs[{key!r}] refers to elements {missing} that are not in the SpatialData; rerun `dst.pp.prepare(..., overwrite=True)`."
            raise KeyError(msg)
        image = ImageSpec.from_dict(attrs["image"])
        if image.key not in sdata.images:
            msg = f"The image {image.key!r} that `prepare` used is not in the SpatialData any more."
            raise KeyError(msg)
        coverage = np.asarray(sdata[elements["lr_mask"]].values[0], dtype=np.float32)
        return cls(
            key=key,
            attrs=attrs,
            grid=Grid.from_dict(attrs["grid"]),
            genes=list(attrs["genes"]),
            image=image,
            elements=elements,
            coverage=coverage,
        )

    @property
    def has_hr(self) -> bool:
        """Whether HR counts (ground truth) exist."""
        return "hr" in self.elements

    @property
    def tile_lr(self) -> int:
        """Tile side in LR pixels."""
        return int(round(self.attrs["tile_um"] / self.grid.lr_um))

    @property
    def hr_scale(self) -> np.ndarray | None:
        """Per-gene robust scale of HR counts (model units), when HR exists."""
        v = self.attrs["normalisation"]["hr_scale"]
        return None if v is None else np.asarray(v, dtype=np.float32)

    @property
    def lr_scale(self) -> np.ndarray:
        """Per-gene robust scale of LR counts per HR pixel."""
        return np.asarray(self.attrs["normalisation"]["lr_scale"], dtype=np.float32)

    @property
    def coexpression(self) -> np.ndarray:
        """Co-expression intensity matrix of the genes."""
        return np.asarray(self.attrs["coexpression"]["matrix"], dtype=np.float32)

    def tiles(self, sdata: SpatialData, split: str | None = None) -> gpd.GeoDataFrame:
        """The tiles (optionally of one split)."""
        tiles = sdata[self.elements["tiles"]]
        return tiles if split is None else tiles[tiles["split"] == split]


def read_sample(
    sdata: SpatialData,
    prep: Prepared,
    lr_row0: int,
    lr_col0: int,
    size_lr: int,
    image_um: float,
    gene_scale: np.ndarray,
    *,
    with_hr: bool = True,
) -> dict[str, np.ndarray]:
    """One model input window whose top-left LR pixel is ``(lr_row0, lr_col0)``, ``size_lr`` LR pixels wide.

    Returns model-unit arrays ``lr`` ``(G, h, w)``, ``mask`` ``(1, h, w)``, ``image`` ``(C, Hi, Wi)`` and, when
    available and asked for, ``x0`` ``(G, H, W)``. Windows reaching past the grid are zero-padded (unobserved).
    """
    g = prep.grid
    s = g.scale
    h, w = g.lr_shape
    r1, c1 = lr_row0 + size_lr, lr_col0 + size_lr
    rr0, cc0, rr1, cc1 = max(lr_row0, 0), max(lr_col0, 0), min(r1, h), min(c1, w)
    lr = np.zeros((len(prep.genes), size_lr, size_lr), dtype=np.float32)
    cov = np.zeros((size_lr, size_lr), dtype=np.float32)
    dst_r, dst_c = slice(rr0 - lr_row0, rr1 - lr_row0), slice(cc0 - lr_col0, cc1 - lr_col0)
    if rr1 > rr0 and cc1 > cc0:
        lr[:, dst_r, dst_c] = np.asarray(sdata[prep.elements["lr"]].data[:, rr0:rr1, cc0:cc1])
        cov[dst_r, dst_c] = prep.coverage[rr0:rr1, cc0:cc1]
    out = {
        "lr": lr_to_model_units(lr, cov, s, gene_scale),
        "mask": np.clip(cov, 0.0, 1.0)[None],
    }
    x0, y0 = g.origin_um[0] + lr_col0 * g.lr_um, g.origin_um[1] + lr_row0 * g.lr_um
    bbox = (x0, y0, x0 + size_lr * g.lr_um, y0 + size_lr * g.lr_um)
    out["image"] = read_tile(sdata.images[prep.image.key], prep.image, bbox, image_um)
    if with_hr and prep.has_hr:
        hr = np.zeros((len(prep.genes), size_lr * s, size_lr * s), dtype=np.float32)
        if rr1 > rr0 and cc1 > cc0:
            hr[:, dst_r.start * s : dst_r.stop * s, dst_c.start * s : dst_c.stop * s] = np.asarray(
                sdata[prep.elements["hr"]].data[:, rr0 * s : rr1 * s, cc0 * s : cc1 * s]
            )
        out["x0"] = to_model_units(hr, gene_scale)
    return out


class TileDataset(Dataset):
    """The prepared tiles of one split as model inputs (read lazily, cached once read).

    Parameters
    ----------
    sdata
        The prepared SpatialData.
    prep
        What :meth:`Prepared.from_sdata` found.
    split
        ``"train"``, ``"val"`` or ``"test"``.
    image_um
        µm per pixel of the image crops the model takes.
    gene_scale
        Per-gene scale of the model units.
    cache
        Keep tiles in memory after their first read (they are small; the slide never is loaded whole).

    """

    def __init__(
        self,
        sdata: SpatialData,
        prep: Prepared,
        split: str,
        *,
        image_um: float,
        gene_scale: np.ndarray,
        cache: bool = True,
    ) -> None:
        self.sdata = sdata
        self.prep = prep
        tiles = prep.tiles(sdata, split)
        self.origins = list(zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True))
        self.image_um = image_um
        self.gene_scale = np.asarray(gene_scale, dtype=np.float32)
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        r0, c0 = self.origins[i]
        arrays = read_sample(self.sdata, self.prep, r0, c0, self.prep.tile_lr, self.image_um, self.gene_scale)
        item = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        if self._cache is not None:
            self._cache[i] = item
        return item
