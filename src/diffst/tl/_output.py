"""Super-resolved maps as SpatialData elements: one writer for Diff-ST and every baseline, so all are read alike.

An SR result under ``key_added`` is

- ``images[key_added]``: the (mean) map on the prepared HR grid, channels = gene names, a multiscale pyramid, with the
  HR grid's transformation to the source coordinate system (it overlays the image exactly);
- ``images[key_added + '_std']``: the per-pixel standard deviation over samples, same units (only when there is one);
- ``sdata.attrs[key_added]``: a :class:`diffst._contract.SRRecord` (``method``, ``prepared_key``, ``units``,
  ``genes``, ``grid``, ``elements`` and the method's parameters).

Units are ``"counts"`` (expected counts per HR pixel, so that re-binning compares with LR counts) or ``"log1p"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from spatialdata.models import Image2DModel

from .._contract import Prepared, SRRecord
from .._store import ElementWriter

if TYPE_CHECKING:
    import dask.array as da
    from spatialdata import SpatialData

Units = Literal["counts", "log1p"]


def sr_names(key_added: str) -> dict[str, str]:
    """Element names of an SR result."""
    return {"mean": key_added, "std": f"{key_added}_std"}


def check_sr_free(sdata: SpatialData, key_added: str, *, overwrite: bool) -> None:
    """Raise before any work if an SR result would replace something without ``overwrite``."""
    ElementWriter(sdata, overwrite=overwrite).check_free(sr_names(key_added).values(), attrs_key=key_added)


def pyramid_factors(shape: tuple[int, int], min_side: int = 64) -> list[int]:
    """Downscale factors of 2 until the smaller side would fall below ``min_side``."""
    factors = []
    side = min(shape)
    while side // 2 >= min_side:
        factors.append(2)
        side //= 2
    return factors


def sr_image(data: np.ndarray | da.Array, genes: list[str], prep: Prepared) -> Any:
    """An HR-grid image element (multiscale when large enough) with the prepared transformation."""
    factors = pyramid_factors(tuple(data.shape[1:]))
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=list(genes),
        transformations={prep.coordinate_system: prep.hr_transform()},
        scale_factors=factors or None,
        chunks=(min(len(genes), 32), 512, 512),
    )


def write_sr(
    sdata: SpatialData,
    prep: Prepared,
    *,
    key_added: str,
    mean: np.ndarray | da.Array,
    std: np.ndarray | da.Array | None,
    genes: list[str],
    units: Units,
    method: str,
    params: dict[str, Any],
    overwrite: bool,
) -> None:
    """Add an SR result (see module docstring) all-or-nothing; on a zarr-backed SpatialData also on disk."""
    from .. import __version__

    names = sr_names(key_added)
    elements = {names["mean"]: ("images", sr_image(mean, genes, prep))}
    if std is not None:
        elements[names["std"]] = ("images", sr_image(std, genes, prep))
    record = SRRecord(
        method=method,
        prepared_key=prep.key,
        units=units,
        genes=tuple(genes),
        grid=prep.grid,
        elements={k: v for k, v in names.items() if v in elements},
        params=dict(params),
        diffst_version=__version__,
    )
    ElementWriter(sdata, overwrite=overwrite).commit(
        elements, attrs={key_added: record.to_dict()}, stale=names.values()
    )
