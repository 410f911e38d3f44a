"""The LR/HR raster grids diffst works on, in the µm frame of the source coordinate system."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._spatial import raster_transform


@dataclass(frozen=True)
class Grid:
    """Two nested raster grids: LR pixels of ``lr_um`` µm, each split into ``scale × scale`` HR pixels.

    Parameters
    ----------
    origin_um
        ``(x0, y0)``: the µm-frame position of the top-left corner of pixel ``(0, 0)`` (both grids share it).
    lr_um
        LR pixel size in µm.
    scale
        HR pixels per LR pixel along each axis; ``hr_um = lr_um / scale``.
    lr_shape
        ``(rows, cols)`` of the LR grid; the HR grid has ``scale`` times as many of each.

    """

    origin_um: tuple[float, float]
    lr_um: float
    scale: int
    lr_shape: tuple[int, int]

    @property
    def hr_um(self) -> float:
        """HR pixel size in µm."""
        return self.lr_um / self.scale

    @property
    def hr_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the HR grid."""
        return self.lr_shape[0] * self.scale, self.lr_shape[1] * self.scale

    @property
    def extent_um(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` covered by the grids, in µm."""
        x0, y0 = self.origin_um
        return x0, y0, x0 + self.lr_shape[1] * self.lr_um, y0 + self.lr_shape[0] * self.lr_um

    def transform(self, um_per_px: float, level: str = "hr") -> Any:
        """Spatialdata transformation of the ``"hr"`` or ``"lr"`` raster to the source coordinate system."""
        pixel = {"hr": self.hr_um, "lr": self.lr_um}[level]
        return raster_transform(self.origin_um, pixel, um_per_px)

    def pixel_index(self, x_um: np.ndarray, y_um: np.ndarray, level: str = "hr") -> tuple[np.ndarray, np.ndarray]:
        """Row and column of the pixel containing each µm position (may fall outside the grid)."""
        pixel = {"hr": self.hr_um, "lr": self.lr_um}[level]
        col = np.floor((np.asarray(x_um, dtype=np.float64) - self.origin_um[0]) / pixel).astype(np.int64)
        row = np.floor((np.asarray(y_um, dtype=np.float64) - self.origin_um[1]) / pixel).astype(np.int64)
        return row, col

    def pixel_centre_um(self, row: np.ndarray, col: np.ndarray, level: str = "hr") -> tuple[np.ndarray, np.ndarray]:
        """µm position ``(x, y)`` of the centre of pixels."""
        pixel = {"hr": self.hr_um, "lr": self.lr_um}[level]
        return self.origin_um[0] + (np.asarray(col) + 0.5) * pixel, self.origin_um[1] + (np.asarray(row) + 0.5) * pixel

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (stored in ``sdata.attrs``)."""
        return {
            "origin_um": [float(self.origin_um[0]), float(self.origin_um[1])],
            "lr_um": float(self.lr_um),
            "hr_um": float(self.hr_um),
            "scale": int(self.scale),
            "lr_shape": [int(self.lr_shape[0]), int(self.lr_shape[1])],
            "hr_shape": [int(self.hr_shape[0]), int(self.hr_shape[1])],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        """Inverse of :meth:`to_dict`."""
        return cls(
            origin_um=(float(d["origin_um"][0]), float(d["origin_um"][1])),
            lr_um=float(d["lr_um"]),
            scale=int(d["scale"]),
            lr_shape=(int(d["lr_shape"][0]), int(d["lr_shape"][1])),
        )

    @classmethod
    def covering(
        cls,
        extent_um: tuple[float, float, float, float],
        lr_um: float,
        scale: int,
        anchor_um: tuple[float, float] = (0.0, 0.0),
    ) -> Grid:
        """The smallest grid whose LR pixels cover ``extent_um``, with pixel edges on ``anchor + k · lr_um``."""
        xmin, ymin, xmax, ymax = extent_um
        ax, ay = anchor_um
        x0 = ax + np.floor((xmin - ax) / lr_um) * lr_um
        y0 = ay + np.floor((ymin - ay) / lr_um) * lr_um
        nx = max(1, int(np.ceil((xmax - x0) / lr_um - 1e-9)))
        ny = max(1, int(np.ceil((ymax - y0) / lr_um - 1e-9)))
        return cls(origin_um=(float(x0), float(y0)), lr_um=float(lr_um), scale=int(scale), lr_shape=(ny, nx))
