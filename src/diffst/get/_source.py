"""Find the raster behind a ``dst.get`` key: an SR result, or any image on a prepared HR grid (e.g. the HR truth)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._contract import Prepared, check_same_grid, is_sr, keys_of, read_record, read_sr
from .._genes import resolve_genes
from .._spatial import affine_to_cs, channel_names, element_cs, image_levels, suggest

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData


@dataclass
class HRSource:
    """A gene raster on a prepared HR grid: level-0 mean (and std) with what is known of its units."""

    key: str
    prep: Prepared
    data: xr.DataArray
    std: xr.DataArray | None
    genes: list[str]
    units: str
    method: str

    def gene_index(self, genes: str | Sequence[str] | None) -> tuple[list[int], list[str]]:
        """Channel indices and names of ``genes`` (default: all channels), with a clear error for unknown ones."""
        if genes is None:
            return list(range(len(self.genes))), list(self.genes)
        genes = resolve_genes(
            genes,
            self.genes,
            empty="or None for all genes",
            unknown=lambda missing: f"Genes {missing} are not channels of {self.key!r} (it has {self.genes}).",
        )
        return [self.genes.index(g) for g in genes], genes

    def hr_affine(self, cs: str) -> np.ndarray:
        """3×3 affine from HR pixel (intrinsic) coordinates to ``cs``, with a clear error when there is none."""
        available = element_cs(self.data)
        if cs not in available:
            msg = f"{self.key!r} has no transformation to coordinate system {cs!r}; it has {available}."
            raise ValueError(msg)
        return affine_to_cs(self.data, cs)

    def block(self, idx: list[int], rows: slice, cols: slice, *, std: bool = False) -> np.ndarray:
        """Channels ``idx`` over an HR window as float32 ``(genes, rows, cols)``, read in one slice."""
        data = self.std if std else self.data
        return np.asarray(data.isel(c=idx, y=rows, x=cols).values, dtype=np.float32)


def resolve(sdata: SpatialData, key: str, *, prepared_key: str | None = None) -> HRSource:
    """The raster under ``key``: an SR result (``sdata.attrs[key]`` from ``write_sr``) or an image on a prepared HR grid.

    For a plain image the prepared data are ``prepared_key``, else those that wrote it (``{prepared_key}_hr``), else
    the only prepared key whose HR grid it lies on. Its units are those recorded for an SR result,
    ``"counts"`` for the prepared HR truth, else ``"unknown"``.
    """
    if is_sr(sdata, key):
        record, mean, std = read_sr(sdata, key)
        prep = Prepared.from_sdata(sdata, prepared_key or record.prepared_key)
        data = image_levels(mean)[0]
        check_same_grid(data, f"The SR result {key!r}", prep, grid=record.grid)
        return HRSource(
            key=key,
            prep=prep,
            data=data,
            std=None if std is None else image_levels(std)[0],
            genes=channel_names(data),
            units=record.units,
            method=record.method,
        )
    if key not in sdata.images:
        found = keys_of(sdata, "sr")
        msg = (
            f"{key!r} is neither a super-resolved result nor an image of this SpatialData. SR results: {found or 'none'}; "
            f"images: {list(sdata.images)}.{suggest(key, found + list(sdata.images))}"
        )
        raise KeyError(msg)
    data = image_levels(sdata.images[key])[0]
    prep = _prepared_for_image(sdata, key, data, prepared_key)
    units = "counts" if prep.elements.get("hr") == key else "unknown"
    return HRSource(key=key, prep=prep, data=data, std=None, genes=channel_names(data), units=units, method="image")


def _prepared_for_image(sdata: SpatialData, key: str, data: Any, prepared_key: str | None) -> Prepared:
    if prepared_key is not None:
        prep = Prepared.from_sdata(sdata, prepared_key)
        check_same_grid(data, f"The image {key!r}", prep)
        return prep
    keys = keys_of(sdata, "prepared")
    owner = [k for k in keys if key in read_record(sdata, k).elements.values()]
    if owner:
        prep = Prepared.from_sdata(sdata, owner[0])
        check_same_grid(data, f"The image {key!r}", prep)
        return prep
    on_grid = []
    for k in keys:
        prep = Prepared.from_sdata(sdata, k)
        try:
            check_same_grid(data, "", prep)
        except ValueError:
            continue
        on_grid.append(prep)
    if len(on_grid) == 1:
        return on_grid[0]
    if not on_grid:
        msg = (
            f"The image {key!r} does not lie on the HR grid of any prepared data ({keys or 'none'}): `dst.get` reads "
            "SR results and images on a prepared HR grid (same shape and transformation as `{prepared_key}_hr`)."
        )
        raise ValueError(msg)
    msg = f"The image {key!r} lies on the HR grids of several prepared keys {[p.key for p in on_grid]}; pass `prepared_key=`."
    raise ValueError(msg)
