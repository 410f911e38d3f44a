"""Degradation operators: how a low-resolution (LR) measurement arises from high-resolution (HR) counts.

Both operators are linear maps from an HR count raster ``(genes, H, W)`` to an LR raster ``(genes, h, w)``
with ``H = scale · h``, plus an *observed fraction* (coverage) per LR pixel:

``bin``
    Sum-pooling of ``scale × scale`` HR pixels (the paper's setting). Every LR pixel is fully observed.
``spots``
    What a spot-based array (Visium, ST) measures: each spot captures the counts inside a disc; the spot's counts
    are laid on the LR pixel that contains its centre (several spots may share one LR pixel). The disc footprint
    on the HR grid is the exact area fraction of each HR pixel inside the disc (supersampled), so
    ``LR = Σ_spots Σ_q w_q · HR_q``: the expected capture when counts are spread uniformly inside an HR pixel.
    Coverage is the captured area over the LR pixel area (about 0.24 for Visium's 55 µm discs in 100 µm pixels).

Each operator can also *project* a super-resolved map onto the set of maps that reproduce the observed LR
counts exactly (LR consistency), keeping it non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._grid import Grid

if TYPE_CHECKING:
    from ._contract import Prepared

#: Visium geometry: 55 µm spots on a 100 µm hexagonal lattice.
VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_PITCH_UM = 100.0
#: Space Ranger's ``spot_diameter_fullres`` (and so the radius of ``spatialdata_io.visium``'s circles) is the
#: full-resolution pixel width of a *65 µm* spot, not of the 55 µm capture spot (10x Genomics, "Space Ranger spatial
#: outputs": scalefactors_json.json).
VISIUM_FULLRES_SPOT_UM = 65.0
#: Legacy Spatial Transcriptomics (ST) arrays: 100 µm spots 200 µm apart on a square lattice.
ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0

_GENE_CHUNK = 32  # genes processed at once when gathering spot footprints (bounds memory)


def _check_hr(hr: np.ndarray, scale: int) -> None:
    if hr.ndim != 3 or hr.shape[1] % scale or hr.shape[2] % scale:
        msg = f"HR raster must be (genes, H, W) with H and W multiples of scale={scale}; got shape {hr.shape}."
        raise ValueError(msg)


@dataclass(frozen=True)
class BinDegradation:
    """Sum-pool ``scale × scale`` HR pixels into one LR pixel."""

    scale: int
    name: str = field(default="bin", init=False)

    def degrade(self, hr: np.ndarray) -> np.ndarray:
        """LR counts of an HR raster."""
        _check_hr(hr, self.scale)
        g, hh, ww = hr.shape
        s = self.scale
        return hr.reshape(g, hh // s, s, ww // s, s).sum(axis=(2, 4))

    def coverage(self, lr_shape: tuple[int, int]) -> np.ndarray:
        """Observed fraction of each LR pixel (all ones)."""
        return np.ones(lr_shape, dtype=np.float32)

    def footprint(self, hr_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Weight of every HR pixel in its LR pixel (1) and the offset to that LR pixel (0): see :func:`footprint`."""
        return np.ones(hr_shape, dtype=np.float32), np.zeros((2, *hr_shape), dtype=np.int8)

    def project(self, sr: np.ndarray, lr: np.ndarray, observed: np.ndarray | None = None) -> np.ndarray:
        """The non-negative map closest in ratio to ``sr`` whose degradation equals ``lr`` where observed.

        Each observed LR block is rescaled by ``lr / degrade(sr)``; a block the model left at zero but that has
        counts gets them spread uniformly.
        """
        sr = np.clip(np.asarray(sr, dtype=np.float64), 0.0, None)
        _check_hr(sr, self.scale)
        g, hh, ww = sr.shape
        s = self.scale
        blocks = sr.reshape(g, hh // s, s, ww // s, s)
        current = blocks.sum(axis=(2, 4))
        lr = np.asarray(lr, dtype=np.float64)
        obs = np.ones(current.shape[1:], dtype=bool) if observed is None else np.asarray(observed) > 0
        ratio = np.where(current > 0, lr / np.where(current > 0, current, 1.0), 0.0)
        add = np.where(current > 0, 0.0, lr / (s * s))
        ratio = np.where(obs[None], ratio, 1.0)
        add = np.where(obs[None], add, 0.0)
        out = blocks * ratio[:, :, None, :, None] + add[:, :, None, :, None]
        return out.reshape(g, hh, ww)


@dataclass(frozen=True)
class SpotDegradation:
    """Disc-shaped capture spots laid on the LR grid (see module docstring).

    Parameters
    ----------
    grid
        The LR/HR grids.
    centres_um
        ``(n_spots, 2)`` spot centres ``(x, y)`` in the µm frame.
    diameter_um
        Spot diameter in µm.

    """

    grid: Grid
    centres_um: np.ndarray
    diameter_um: float
    name: str = field(default="spots", init=False)
    supersample: int = 8

    def __post_init__(self) -> None:
        g = self.grid
        c = np.asarray(self.centres_um, dtype=np.float64).reshape(-1, 2)
        object.__setattr__(self, "centres_um", c)
        lr_row, lr_col = g.pixel_index(c[:, 0], c[:, 1], level="lr")
        inside = (lr_row >= 0) & (lr_row < g.lr_shape[0]) & (lr_col >= 0) & (lr_col < g.lr_shape[1])
        if not inside.all():
            msg = f"{int((~inside).sum())} spot centres lie outside the grid; drop them before building the operator."
            raise ValueError(msg)
        r = self.diameter_um / 2.0
        hr = g.hr_um
        k = int(np.ceil(2 * r / hr)) + 2
        # top-left HR pixel of each spot's k×k window
        row0 = np.floor((c[:, 1] - r - g.origin_um[1]) / hr).astype(np.int64)
        col0 = np.floor((c[:, 0] - r - g.origin_um[0]) / hr).astype(np.int64)
        # area fraction of each window pixel inside the disc, by ss×ss sub-pixel sampling
        ss = self.supersample
        sub = (np.arange(ss) + 0.5) / ss
        offs = (np.arange(k)[:, None] + sub[None, :]).reshape(-1)  # k*ss sub-positions in pixel units
        ys = g.origin_um[1] + (row0[:, None] + offs[None, :]) * hr - c[:, 1:2]  # (S, k*ss)
        xs = g.origin_um[0] + (col0[:, None] + offs[None, :]) * hr - c[:, 0:1]
        inside_disc = (ys[:, :, None] ** 2 + xs[:, None, :] ** 2) <= r * r  # (S, k*ss, k*ss)
        w = inside_disc.reshape(len(c), k, ss, k, ss).mean(axis=(2, 4)).astype(np.float32)
        rows = row0[:, None] + np.arange(k)[None, :]
        cols = col0[:, None] + np.arange(k)[None, :]
        hh, ww = g.hr_shape
        valid = ((rows >= 0) & (rows < hh))[:, :, None] & ((cols >= 0) & (cols < ww))[:, None, :]
        w = np.where(valid, w, 0.0).astype(np.float32)
        object.__setattr__(self, "_rows", np.clip(rows, 0, hh - 1))
        object.__setattr__(self, "_cols", np.clip(cols, 0, ww - 1))
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "lr_index", lr_row * g.lr_shape[1] + lr_col)

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.centres_um)

    def _gather(self, hr: np.ndarray) -> np.ndarray:
        """HR values in each spot window: ``(genes, spots, k, k)``."""
        return hr[:, self._rows[:, :, None], self._cols[:, None, :]]

    def spot_counts(self, hr: np.ndarray) -> np.ndarray:
        """Counts each spot captures from an HR raster: ``(genes, spots)``."""
        _check_hr(hr, self.grid.scale)
        out = np.empty((hr.shape[0], self.n_spots), dtype=np.float64)
        for g0 in range(0, hr.shape[0], _GENE_CHUNK):
            vals = self._gather(hr[g0 : g0 + _GENE_CHUNK]).astype(np.float64)
            out[g0 : g0 + _GENE_CHUNK] = np.einsum("gskl,skl->gs", vals, self.weights)
        return out

    def lay_on_grid(self, spot_values: np.ndarray) -> np.ndarray:
        """Sum per-spot values ``(genes, spots)`` into the LR pixels holding the spot centres."""
        h, w = self.grid.lr_shape
        out = np.zeros((spot_values.shape[0], h * w), dtype=np.float64)
        for gi in range(spot_values.shape[0]):
            out[gi] = np.bincount(self.lr_index, weights=spot_values[gi], minlength=h * w)
        return out.reshape(-1, h, w)

    def degrade(self, hr: np.ndarray) -> np.ndarray:
        """LR counts of an HR raster."""
        return self.lay_on_grid(self.spot_counts(hr))

    def coverage(self, lr_shape: tuple[int, int] | None = None) -> np.ndarray:
        """Captured area (inside the grid) over LR pixel area, per LR pixel."""
        h, w = self.grid.lr_shape
        area = self.weights.sum(axis=(1, 2)) * self.grid.hr_um**2 / self.grid.lr_um**2
        return np.bincount(self.lr_index, weights=area, minlength=h * w).reshape(h, w).astype(np.float32)

    def project(self, sr: np.ndarray, lr: np.ndarray, observed: np.ndarray | None = None) -> np.ndarray:
        """Rescale each LR pixel's spot footprints so that the degraded map equals ``lr`` exactly.

        HR pixels outside every spot are left as they are (nothing was measured there).
        """
        sr = np.clip(np.asarray(sr, dtype=np.float64), 0.0, None).copy()
        current = self.degrade(sr).reshape(sr.shape[0], -1)
        lr = np.asarray(lr, dtype=np.float64).reshape(sr.shape[0], -1)
        obs = self.coverage() > 0 if observed is None else np.asarray(observed) > 0
        obs = obs.reshape(-1)
        wsum = np.bincount(self.lr_index, weights=self.weights.sum(axis=(1, 2)), minlength=obs.size)
        safe = np.where(current > 0, current, 1.0)
        ratio = np.where(current > 0, lr / safe, 0.0)
        add = np.where(current > 0, 0.0, lr / np.where(wsum > 0, wsum, 1.0))
        ratio = np.where(obs[None], ratio, 1.0)
        add = np.where(obs[None], add, 0.0)
        touched = self.weights > 0
        rows = np.broadcast_to(self._rows[:, :, None], touched.shape)[touched]
        cols = np.broadcast_to(self._cols[:, None, :], touched.shape)[touched]
        owner = np.broadcast_to(self.lr_index[:, None, None], touched.shape)[touched]
        # discs do not overlap (pitch > diameter), so each HR pixel belongs to at most one spot
        sr[:, rows, cols] = sr[:, rows, cols] * ratio[:, owner] + add[:, owner]
        return sr

    def footprint(self, hr_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per HR pixel, the weight it enters its spot with and the offset to the LR pixel that spot is laid on.

        Returns ``weight`` ``(H, W)`` float32 (the disc area fraction, 0 outside every spot) and ``offset``
        ``(2, H, W)`` int8: the LR row and column of the spot's centre minus those of the HR pixel itself (a disc
        reaches at most a few LR pixels from its centre's). ``degrade`` is then ``Σ weight · hr`` over the HR pixels
        owned by each LR pixel, which a model can compute on any window without the spot list.
        """
        g = self.grid
        hh, ww = g.hr_shape
        weight = np.zeros((hh, ww), dtype=np.float32)
        offset = np.zeros((2, hh, ww), dtype=np.int16)
        touched = self.weights > 0
        rows = np.broadcast_to(self._rows[:, :, None], touched.shape)[touched]
        cols = np.broadcast_to(self._cols[:, None, :], touched.shape)[touched]
        owner = np.broadcast_to(self.lr_index[:, None, None], touched.shape)[touched]
        weight[rows, cols] = self.weights[touched]
        offset[0, rows, cols] = owner // g.lr_shape[1] - rows // g.scale
        offset[1, rows, cols] = owner % g.lr_shape[1] - cols // g.scale
        if np.abs(offset).max(initial=0) > 127:
            msg = "spot discs reach more than 127 LR pixels from their centre's; use a larger `lr_um`."
            raise ValueError(msg)
        return weight, offset.astype(np.int8)

    def window(self, r0: int, c0: int, r1: int, c1: int, *, margin: int = 0) -> tuple[SpotDegradation, np.ndarray]:
        """The operator of the spots whose centres lie in LR pixels ``[r0, r1) × [c0, c1)``, on that region's grid.

        The region's grid is widened by ``margin`` LR pixels on each side, so that discs reaching past the region
        stay whole. Returns the operator and the indices of its spots among this operator's.
        """
        g = self.grid
        rows, cols = g.pixel_index(self.centres_um[:, 0], self.centres_um[:, 1], level="lr")
        inside = np.flatnonzero((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1))
        sub = Grid(
            origin_um=(g.origin_um[0] + (c0 - margin) * g.lr_um, g.origin_um[1] + (r0 - margin) * g.lr_um),
            lr_um=g.lr_um,
            scale=g.scale,
            lr_shape=(r1 - r0 + 2 * margin, c1 - c0 + 2 * margin),
        )
        return SpotDegradation(sub, self.centres_um[inside], self.diameter_um, supersample=self.supersample), inside

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (the centres are stored as a shapes element)."""
        return {"name": self.name, "diameter_um": float(self.diameter_um), "n_spots": self.n_spots}


def hex_lattice(grid: Grid, pitch_um: float) -> np.ndarray:
    """Centres ``(x, y)`` of a hexagonal lattice of ``pitch_um`` over the grid, rows ``pitch·√3/2`` apart.

    Even rows start a quarter pitch from the grid's left edge and odd rows three quarters, so no centre sits on an
    LR pixel edge when ``pitch_um == lr_um``.
    """
    x0, y0, x1, y1 = grid.extent_um
    dy = pitch_um * np.sqrt(3.0) / 2.0
    ys = y0 + pitch_um / 2.0 + np.arange(int(np.floor((y1 - y0 - pitch_um / 2.0) / dy)) + 1) * dy
    centres = []
    for k, y in enumerate(ys):
        start = x0 + pitch_um * (0.25 if k % 2 == 0 else 0.75)
        xs = np.arange(start, x1, pitch_um)
        centres.append(np.column_stack([xs, np.full_like(xs, y)]))
    c = np.concatenate(centres) if centres else np.zeros((0, 2))
    keep = (c[:, 0] < x1) & (c[:, 1] < y1)
    return c[keep]


def spot_halo(operator: BinDegradation | SpotDegradation | None, lr_um: float) -> int:
    """LR pixels around a region whose counts a projection inside it depends on (the spot discs reaching it)."""
    if isinstance(operator, SpotDegradation):
        return int(np.ceil(operator.diameter_um / lr_um)) + 2
    return 0


def project_region(
    operator: BinDegradation | SpotDegradation,
    x: np.ndarray,
    lr: np.ndarray,
    observed: np.ndarray,
    region: tuple[int, int, int, int],
) -> np.ndarray:
    """LR consistency of the map ``x`` of the LR pixels ``region = (r0, c0, r1, c1)`` of the slide.

    ``lr`` ``(G, h, w)`` and ``observed`` ``(h, w)`` are the whole slide's; the region may reach past the grid (zero
    padded there). With spots, an LR pixel is made exact only if none of its spots' discs is cut by the region's
    border: a region widened by :func:`spot_halo` around the pixels kept gives them exactly the whole-slide result.
    """
    from ._contract import read_window

    r0, c0, r1, c1 = region
    lr_win = read_window(lr, (r0, r1), (c0, c1), dtype=np.float64)
    obs = read_window(observed, (r0, r1), (c0, c1), dtype=bool)
    if isinstance(operator, BinDegradation):
        return operator.project(x, lr_win, obs)
    # spots: work on the part of the region inside the grid (HR pixels beyond it do not exist)
    h, w = operator.grid.lr_shape
    s = operator.grid.scale
    rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    x = np.array(x, dtype=np.float64)
    inner = (slice(None), slice((rr0 - r0) * s, (rr1 - r0) * s), slice((cc0 - c0) * s, (cc1 - c0) * s))
    op, inside = operator.window(rr0, cc0, rr1, cc1)
    whole = np.isclose(op.weights.sum(axis=(1, 2)), operator.weights[inside].sum(axis=(1, 2)))
    sub_obs = obs[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
    cut = np.bincount(op.lr_index, weights=~whole, minlength=sub_obs.size).reshape(sub_obs.shape) > 0
    x[inner] = op.project(x[inner], lr_win[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0], sub_obs & ~cut)
    return x


def degradation_for(sdata, prep: Prepared) -> BinDegradation | SpotDegradation:
    """The degradation operator of data prepared by ``dst.pp.prepare``."""
    record = prep.record
    grid = record.grid
    deg = record.degradation
    if deg.name == "bin":
        return BinDegradation(grid.scale)
    spots = sdata[record.elements["spots"]]
    centres = np.column_stack([spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy()])
    return SpotDegradation(grid, centres, float(deg.spot_diameter_um))
