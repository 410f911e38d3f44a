"""Read tissue-image crops aligned to the gene-raster grid, at any µm per pixel, from any pyramid level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from ._spatial import affine_to_cs, channel_names, image_levels, linear_scale


@dataclass(frozen=True)
class ImageSpec:
    """How to read and normalise an image: which element, its units and per-channel intensity range."""

    key: str
    cs: str
    um_per_px: float  # µm per unit of the coordinate system
    kind: Literal["rgb", "fluorescence"]
    channels: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    @property
    def nuclear_channel(self) -> int:
        """The nuclear (DAPI-like) channel the image floor reads: found by name for fluorescence, 0 for RGB."""
        from .model.floor import nuclear_channel

        return 0 if self.kind == "rgb" else nuclear_channel(self.channels)

    @property
    def background(self) -> float:
        """Normalised value outside the image: white for brightfield, dark for fluorescence."""
        return 1.0 if self.kind == "rgb" else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "key": self.key,
            "cs": self.cs,
            "um_per_px": float(self.um_per_px),
            "kind": self.kind,
            "channels": list(self.channels),
            "low": [float(v) for v in self.low],
            "high": [float(v) for v in self.high],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            key=d["key"],
            cs=d["cs"],
            um_per_px=float(d["um_per_px"]),
            kind=d["kind"],
            channels=tuple(d["channels"]),
            low=tuple(d["low"]),
            high=tuple(d["high"]),
        )


def level_for(image: Any, cs: str, um_per_px: float, out_um: float) -> tuple[Any, np.ndarray, float]:
    """The coarsest pyramid level that is still at least as fine as ``out_um``, its affine and µm per pixel."""
    best = None
    for level in image_levels(image):
        m = affine_to_cs(level, cs)
        level_um = um_per_px * linear_scale(m)
        if best is None or level_um <= out_um * 1.0001:
            best = (level, m, level_um)
        else:
            break
    return best  # type: ignore[return-value]


def in_memory_level(image: Any, spec: ImageSpec, out_um: float, max_bytes: int = 512 * 2**20) -> Any:
    """The pyramid level :func:`read_tile` reads for ``out_um``, loaded into memory when it is at most ``max_bytes``.

    Reading many crops from a lazily computed (dask) image repeats work for every crop; this level gives identical
    crops. Returns ``image`` itself when the level is too large.
    """
    level, _, _ = level_for(image, spec.cs, spec.um_per_px, out_um)
    if level.nbytes <= max_bytes:
        return level.copy(data=np.asarray(level.data))
    return image


@dataclass
class LevelRegion:
    """A rectangle of one pyramid level held in memory, which :func:`read_tile` reads crops inside it from.

    :func:`preload` makes it for the crops of a region (e.g. the windows of one output chunk), so that each is cut
    from memory instead of re-reading (and decompressing) the store, with the same pixels as from the whole level:
    the crop's source rectangle and resampling are computed in the whole level's coordinates either way.
    """

    data: np.ndarray  # (C, rows, cols): level rows [row0, row0 + rows) and cols [col0, col0 + cols)
    row0: int
    col0: int
    level_shape: tuple[int, int]  # (ny, nx) of the whole level
    matrix: np.ndarray  # the level's affine to the coordinate system
    level_um: float


def _source_rect(level_shape: tuple[int, int], minv: np.ndarray, spec: ImageSpec, bbox_um) -> tuple[int, int, int, int]:
    """Rows ``[r0, r1)`` and cols ``[c0, c1)`` of a level that a crop over ``bbox_um`` reads (with a 2-pixel margin)."""
    x0, y0, x1, y1 = bbox_um
    u = spec.um_per_px
    # intrinsic (x, y) of the four output corners, to know which part of the level to read
    cx = np.array([x0, x1, x0, x1]) / u
    cy = np.array([y0, y0, y1, y1]) / u
    ix = minv[0, 0] * cx + minv[0, 1] * cy + minv[0, 2]
    iy = minv[1, 0] * cx + minv[1, 1] * cy + minv[1, 2]
    ny, nx = level_shape
    r0 = int(max(0, np.floor(iy.min()) - 2))
    r1 = int(min(ny, np.ceil(iy.max()) + 2))
    c0 = int(max(0, np.floor(ix.min()) - 2))
    c1 = int(min(nx, np.ceil(ix.max()) + 2))
    return r0, r1, c0, c1


def preload(image: Any, spec: ImageSpec, bbox_um: tuple[float, float, float, float], out_um: float) -> LevelRegion:
    """The part of the level :func:`read_tile` reads at ``out_um`` that covers every crop inside ``bbox_um``."""
    level, m, level_um = level_for(image, spec.cs, spec.um_per_px, out_um)
    shape = (int(level.sizes["y"]), int(level.sizes["x"]))
    r0, r1, c0, c1 = _source_rect(shape, np.linalg.inv(m), spec, bbox_um)
    data = np.asarray(level.data[:, r0:r1, c0:c1])
    return LevelRegion(data=data, row0=r0, col0=c0, level_shape=shape, matrix=m, level_um=level_um)


def read_tile(
    image: Any, spec: ImageSpec, bbox_um: tuple[float, float, float, float], out_um: float, *, order: int = 1
) -> np.ndarray:
    """An image crop over ``bbox_um = (x0, y0, x1, y1)`` resampled to ``out_um`` µm per pixel.

    The crop is axis-aligned in the µm frame of the source coordinate system whatever the image's own affine
    (rotations and shears included), normalised to [0, 1] per channel, and filled with the background value where
    the image does not reach. Returns ``(channels, rows, cols)`` float32. ``image`` may be a :class:`LevelRegion`
    that holds the crop's part of the level (:func:`preload`).
    """
    x0, y0, x1, y1 = bbox_um
    out_h = int(round((y1 - y0) / out_um))
    out_w = int(round((x1 - x0) / out_um))
    if isinstance(image, LevelRegion):
        m, level_um, shape = image.matrix, image.level_um, image.level_shape
        data, row0, col0 = image.data, image.row0, image.col0
    else:  # the whole level: a region that starts at its origin
        level, m, level_um = level_for(image, spec.cs, spec.um_per_px, out_um)
        shape = (int(level.sizes["y"]), int(level.sizes["x"]))
        data, row0, col0 = level.data, 0, 0
    minv = np.linalg.inv(m)
    u = spec.um_per_px
    r0, r1, c0, c1 = _source_rect(shape, minv, spec, bbox_um)
    out = np.full((data.shape[0], out_h, out_w), spec.background, dtype=np.float32)
    if r1 <= r0 or c1 <= c0:
        return out
    if r0 < row0 or c0 < col0 or r1 > row0 + data.shape[1] or c1 > col0 + data.shape[2]:
        msg = "read_tile: the crop reaches past the preloaded part of the level (preload a larger bbox)."
        raise ValueError(msg)
    src = np.asarray(data[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0], dtype=np.float32)
    low = np.asarray(spec.low, dtype=np.float32)[:, None, None]
    high = np.asarray(spec.high, dtype=np.float32)[:, None, None]
    src = np.clip((src - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)
    factor = out_um / level_um
    if factor > 1.5:  # anti-alias before sampling a coarser grid
        src = ndimage.gaussian_filter(src, sigma=(0, (factor - 1) / 2, (factor - 1) / 2))
    s = out_um / u
    # output (row i, col j) -> source array (row, col); pixel centres sit at +0.5 in intrinsic coordinates
    ax = minv[0, 0] * (x0 / u + 0.5 * s) + minv[0, 1] * (y0 / u + 0.5 * s) + minv[0, 2]
    ay = minv[1, 0] * (x0 / u + 0.5 * s) + minv[1, 1] * (y0 / u + 0.5 * s) + minv[1, 2]
    matrix = np.array([[minv[1, 1] * s, minv[1, 0] * s], [minv[0, 1] * s, minv[0, 0] * s]])
    offset = np.array([ay - 0.5 - r0, ax - 0.5 - c0])
    # mark where the source exists, so the background fill is exact outside the image
    inside = ndimage.affine_transform(
        np.ones(src.shape[1:], dtype=np.float32), matrix, offset, output_shape=(out_h, out_w), order=0, cval=0.0
    )
    for c in range(len(out)):
        out[c] = ndimage.affine_transform(
            src[c], matrix, offset, output_shape=(out_h, out_w), order=order, cval=spec.background, mode="nearest"
        )
    out[:, inside < 0.5] = spec.background
    return out


def image_spec(image: Any, *, key: str, cs: str, um_per_px: float, kind: Literal["rgb", "fluorescence"]) -> ImageSpec:
    """Intensity range per channel: the dtype's range for brightfield RGB, robust percentiles for fluorescence."""
    levels = image_levels(image)
    names = tuple(channel_names(image))
    dtype = levels[0].dtype
    if kind == "rgb":
        top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
        return ImageSpec(key, cs, um_per_px, kind, names, (0.0,) * len(names), (top,) * len(names))
    # fluorescence: percentiles on the coarsest level with a few hundred thousand pixels at most
    level = levels[-1]
    for lv in levels:
        if lv.sizes["y"] * lv.sizes["x"] <= 4_000_000:
            level = lv
            break
    data = np.asarray(level.data, dtype=np.float32).reshape(len(names), -1)
    step = max(1, data.shape[1] // 1_000_000)
    sample = data[:, ::step]
    low = np.percentile(sample, 0.5, axis=1)
    high = np.percentile(sample, 99.8, axis=1)
    high = np.where(high > low, high, low + 1.0)
    return ImageSpec(key, cs, um_per_px, kind, names, tuple(map(float, low)), tuple(map(float, high)))
