"""Read what ``dst.pp.prepare`` wrote and stream tiles (image crop, LR, mask, HR) to the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._grid import Grid
from .._image import ImageSpec, level_for, read_tile
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


@dataclass
class TileSource:
    """Everything needed to cut model inputs out of a prepared slide, without holding the SpatialData.

    ``lr`` and ``hr`` may be dask arrays (read lazily) or numpy arrays; ``gene_index`` picks and orders the channels
    (the model's gene order). Picklable, so tasks on a dask cluster can carry it.
    """

    grid: Grid
    image_element: Any
    image: ImageSpec
    lr: Any
    coverage: np.ndarray
    hr: Any | None = None
    gene_index: np.ndarray | None = None

    @classmethod
    def from_sdata(cls, sdata: SpatialData, prep: Prepared, genes: list[str] | None = None) -> TileSource:
        """Source of the prepared elements, channels in the order of ``genes`` (default: the prepared order)."""
        index = None if genes is None else np.array([prep.genes.index(g) for g in genes])
        return cls(
            grid=prep.grid,
            image_element=sdata.images[prep.image.key],
            image=prep.image,
            lr=sdata[prep.elements["lr"]].data,
            coverage=prep.coverage,
            hr=sdata[prep.elements["hr"]].data if prep.has_hr else None,
            gene_index=index,
        )

    def cache_image(self, image_um: float, max_bytes: int = 512 * 2**20) -> TileSource:
        """Hold in memory the pyramid level that crops at ``image_um`` are read from, when it is small enough.

        Every window re-reads the image; for lazily computed or remote images that repeats work. The level kept is
        the one :func:`diffst._image.read_tile` would pick, so the crops are identical.
        """
        level, _, _ = level_for(self.image_element, self.image.cs, self.image.um_per_px, image_um)
        if level.nbytes <= max_bytes:
            self.image_element = level.copy(data=np.asarray(level.data))
        return self

    def _channels(self, array: Any, rows: slice, cols: slice) -> np.ndarray:
        block = np.asarray(array[:, rows, cols], dtype=np.float32)
        return block if self.gene_index is None else block[self.gene_index]

    def read(
        self,
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
        available and asked for, ``x0`` ``(G, H, W)``. Windows reaching past the grid are padded as unobserved.
        """
        g = self.grid
        s = g.scale
        h, w = g.lr_shape
        n_genes = self.lr.shape[0] if self.gene_index is None else len(self.gene_index)
        rr0, cc0 = max(lr_row0, 0), max(lr_col0, 0)
        rr1, cc1 = min(lr_row0 + size_lr, h), min(lr_col0 + size_lr, w)
        lr = np.zeros((n_genes, size_lr, size_lr), dtype=np.float32)
        cov = np.zeros((size_lr, size_lr), dtype=np.float32)
        dr, dc = slice(rr0 - lr_row0, rr1 - lr_row0), slice(cc0 - lr_col0, cc1 - lr_col0)
        inside = rr1 > rr0 and cc1 > cc0
        if inside:
            lr[:, dr, dc] = self._channels(self.lr, slice(rr0, rr1), slice(cc0, cc1))
            cov[dr, dc] = self.coverage[rr0:rr1, cc0:cc1]
        out = {"lr": lr_to_model_units(lr, cov, s, gene_scale), "mask": np.clip(cov, 0.0, 1.0)[None]}
        x0, y0 = g.origin_um[0] + lr_col0 * g.lr_um, g.origin_um[1] + lr_row0 * g.lr_um
        bbox = (x0, y0, x0 + size_lr * g.lr_um, y0 + size_lr * g.lr_um)
        out["image"] = read_tile(self.image_element, self.image, bbox, image_um)
        if with_hr and self.hr is not None:
            hr = np.zeros((n_genes, size_lr * s, size_lr * s), dtype=np.float32)
            if inside:
                hr[:, dr.start * s : dr.stop * s, dc.start * s : dc.stop * s] = self._channels(
                    self.hr, slice(rr0 * s, rr1 * s), slice(cc0 * s, cc1 * s)
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
        self.source = TileSource.from_sdata(sdata, prep).cache_image(image_um)
        self.tile_lr = prep.tile_lr
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
        arrays = self.source.read(r0, c0, self.tile_lr, self.image_um, self.gene_scale)
        item = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        if self._cache is not None:
            self._cache[i] = item
        return item
