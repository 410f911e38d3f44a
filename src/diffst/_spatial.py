"""SpatialData plumbing shared by every step: find elements, read transforms, derive physical units.

Conventions used throughout diffst
----------------------------------
* The *source coordinate system* (``cs``) is the one the user's image and measurements share: ``"global"`` for
  Xenium (morphology-image pixels), the dataset id for Visium / Visium HD (full-resolution pixels).
* ``um_per_px`` is the number of µm per unit of ``cs``. Everything diffst builds lives on grids in the
  *µm frame*: ``cs`` coordinates multiplied by ``um_per_px``. A raster pixel ``(row i, col j)`` of a grid with
  origin ``(x0, y0)`` µm and pixel size ``p`` µm covers ``[x0 + j p, x0 + (j + 1) p)`` in x, so its centre maps to
  ``cs`` at ``((x0 + (j + 0.5) p) / um_per_px, (y0 + (i + 0.5) p) / um_per_px)``. This is spatialdata's own
  convention (pixel ``(i, j)`` spans ``[j, j + 1)`` in intrinsic coordinates), so the transform of a raster is a
  scale ``p / um_per_px`` followed by a translation ``(x0, y0) / um_per_px``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import numpy as np
import xarray as xr
from spatialdata.models import get_channel_names
from spatialdata.transformations import Scale, Sequence, Translation, get_transformation


def element_cs(element: Any) -> list[str]:
    """Coordinate systems an element has a transformation to."""
    return list(get_transformation(_level0(element), get_all=True).keys())


def _level0(element: Any) -> Any:
    """The full-resolution array of an image that may be a multiscale ``DataTree``."""
    if isinstance(element, xr.DataTree):
        return next(iter(element["scale0"].values()))
    return element


def affine_to_cs(element: Any, cs: str) -> np.ndarray:
    """3×3 affine matrix (x, y, 1) from an element's intrinsic coordinates to ``cs``."""
    t = get_transformation(_level0(element), to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def linear_scale(matrix: np.ndarray) -> float:
    """Isotropic scale of an affine matrix (square root of the absolute determinant of its linear part)."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def raster_transform(origin_um: tuple[float, float], pixel_um: float, um_per_px: float) -> Sequence:
    """Transformation from a raster on the µm-frame grid to the source coordinate system (see module docstring)."""
    s = pixel_um / um_per_px
    return Sequence(
        [
            Scale([s, s], axes=("y", "x")),
            Translation([origin_um[1] / um_per_px, origin_um[0] / um_per_px], axes=("y", "x")),
        ]
    )


def channel_names(image: Any) -> list[str]:
    """Channel names of an image element (single- or multiscale)."""
    return [str(c) for c in get_channel_names(image)]


def image_levels(image: Any) -> list[xr.DataArray]:
    """The pyramid levels of an image element, finest first (a single-scale image is one level)."""
    if isinstance(image, xr.DataTree):
        return [next(iter(image[k].values())) for k in sorted(image.keys(), key=lambda s: int(s.removeprefix("scale")))]
    return [image]


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean …?' hint for a misspelt name, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=n, cutoff=0.6)
    if not close:
        close = [c for c in candidates if str(c).lower() == str(name).lower()][:n]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def pick_key(kind: str, key: str | None, available: list[str], param: str, *, why: str = "") -> str:
    """Resolve a ``*_key`` argument: the given key, or the single obvious candidate, or a clear error."""
    if key is not None:
        if key not in available:
            msg = f"{kind} {key!r} (from `{param}`) is not in the SpatialData; it has {available or 'none'}.{suggest(key, available)}"
            raise KeyError(msg)
        return key
    if len(available) == 1:
        return available[0]
    if not available:
        msg = f"The SpatialData has no {kind}{why}. Add one, or check that you passed the right object."
        raise ValueError(msg)
    msg = f"The SpatialData has several {kind}s {available}; say which one to use with `{param}=`."
    raise ValueError(msg)


def transform_points(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a 3×3 affine to coordinate arrays."""
    return (
        matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2],
        matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2],
    )


def image_extent_cs(image: Any, cs: str) -> tuple[float, float, float, float]:
    """Bounding box ``(xmin, ymin, xmax, ymax)`` of an image in ``cs``."""
    level0 = _level0(image)
    ny, nx = level0.sizes["y"], level0.sizes["x"]
    m = affine_to_cs(image, cs)
    cx, cy = transform_points(m, np.array([0.0, nx, 0.0, nx]), np.array([0.0, 0.0, ny, ny]))
    return float(cx.min()), float(cy.min()), float(cx.max()), float(cy.max())
