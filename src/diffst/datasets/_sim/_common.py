"""Constants and helpers shared by every stage of the simulator: cell types, modules, seeded generators, smooth fields."""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy import ndimage, sparse

GRID_UM = 2.0
"""Resolution of the label grids (domains, lumens, tissue mask); also the finest Visium HD bin."""

DOMAINS = ("stroma", "tumour", "immune", "vessel", "gland")
STROMA, TUMOUR, IMMUNE, VESSEL, GLAND = range(5)

CELL_TYPES = (
    "tumour_epithelial",
    "normal_epithelial",
    "fibroblast",
    "T_cell",
    "B_cell",
    "macrophage",
    "endothelial",
    "adipocyte",
)
TUM, EPI, FIB, TC, BC, MAC, ENDO, ADIP = range(8)
_ABBREV = {"tum": TUM, "epi": EPI, "fib": FIB, "T": TC, "B": BC, "mac": MAC, "endo": ENDO, "adip": ADIP}

# Per-type morphology and assay behaviour. Lengths in µm; H, E are stain optical densities (Beer-Lambert), dapi a
# fraction of the uint16 range; rna scales the cell's mRNA content; p_nuc is the share of its molecules in the nucleus.
_MORPH_COLUMNS = (
    "nuc_a",
    "nuc_ratio",
    "nuc_sd",
    "H",
    "tex",
    "cell_r",
    "cell_ratio",
    "E",
    "Hc",
    "dapi",
    "rna",
    "p_nuc",
    "opacity",
)
_MORPH = np.array(
    [
        # nuc_a ratio  sd    H     tex   cell_r ratio  E     Hc    dapi  rna   p_nuc opacity
        [4.4, 0.78, 0.16, 0.90, 0.60, 8.0, 0.85, 0.44, 0.10, 0.30, 1.45, 0.30, 1.0],  # tumour epithelial
        [3.9, 0.62, 0.10, 1.05, 0.35, 6.0, 0.80, 0.36, 0.06, 0.38, 1.10, 0.30, 1.0],  # normal epithelial
        [5.4, 0.32, 0.12, 1.20, 0.25, 6.5, 0.35, 0.52, 0.03, 0.42, 0.90, 0.35, 0.3],  # fibroblast
        [2.9, 0.92, 0.07, 1.60, 0.20, 3.8, 0.95, 0.22, 0.12, 0.58, 0.55, 0.40, 0.8],  # T cell
        [3.1, 0.90, 0.07, 1.50, 0.20, 4.1, 0.95, 0.26, 0.16, 0.54, 0.60, 0.40, 0.8],  # B cell
        [4.2, 0.68, 0.12, 0.80, 0.40, 9.0, 0.80, 0.62, 0.06, 0.30, 1.20, 0.25, 0.9],  # macrophage
        [5.0, 0.30, 0.10, 1.15, 0.25, 6.0, 0.35, 0.45, 0.04, 0.40, 0.80, 0.35, 0.4],  # endothelial
        [4.0, 0.30, 0.10, 1.00, 0.20, 22.0, 0.85, 0.02, 0.00, 0.35, 0.45, 0.20, 1.0],  # adipocyte
    ],
    dtype=np.float64,
)
_M = {name: _MORPH[:, i] for i, name in enumerate(_MORPH_COLUMNS)}

MODULES = (
    "prolif",
    "hypoxia",
    "ifn",
    "erbb2",
    "luminal",
    "basal",
    "contractile",
    "caf",
    "cytotoxic",
    "plasma",
    "antigen",
    "stress",
)
# How strongly each cell type expresses each co-expression module (rows: CELL_TYPES, columns: MODULES).
_GATES = np.array(
    [
        # prol hyp  ifn  erb  lum  bas  con  caf  cyt  pla  ant  str
        [1.0, 1.0, 0.8, 1.0, 1.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0],  # tumour epithelial
        [0.3, 0.3, 0.8, 0.0, 0.7, 1.0, 1.0, 0.0, 0.0, 0.0, 0.2, 1.0],  # normal epithelial
        [0.2, 0.4, 0.6, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.1, 1.0],  # fibroblast
        [0.5, 0.2, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.3, 1.0],  # T cell
        [0.6, 0.2, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0],  # B cell
        [0.2, 0.7, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],  # macrophage
        [0.2, 0.4, 0.8, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.4, 1.0],  # endothelial
        [0.0, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # adipocyte
    ]
)


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent generator per (seed, stage), so that no stage's draws depend on another's."""
    words = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


# --------------------------------------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------------------------------------
class _Field:
    """A smooth Gaussian random field with unit variance and correlation length ~``scale_um``.

    Stored as white noise smoothed on a coarse lattice; evaluated anywhere by bilinear interpolation, so the values at
    cells, grid nodes and image pixels all agree.
    """

    def __init__(self, rng: np.random.Generator, width: float, height: float, scale_um: float, refine: int = 1) -> None:
        sigma = 1.5
        self.step = scale_um / (2.5 * sigma)
        pad = 4 * self.step
        self.origin = -pad
        nx = int(math.ceil((width + 2 * pad) / self.step)) + 2
        ny = int(math.ceil((height + 2 * pad) / self.step)) + 2
        noise = rng.standard_normal((ny, nx))
        # normalise by the theoretical standard deviation of smoothed white noise (not the sample one), so that a
        # field means the same whatever the size of the slide
        smooth = ndimage.gaussian_filter(noise, sigma, mode="reflect") * (2 * math.sqrt(math.pi) * sigma)
        if refine > 1:
            # a cubic upsampling, so that bilinear reads of the finer lattice have no visible kinks (fibre contours)
            smooth = ndimage.zoom(smooth, refine, order=3, grid_mode=True, mode="nearest")
            # with grid_mode, fine node m sits at coarse coordinate (m + 0.5) / refine - 0.5
            self.origin += -self.step / 2 + self.step / (2 * refine)
            self.step /= refine
        self.values = smooth.astype(np.float32)

    def gradient_at(self, x: np.ndarray, y: np.ndarray, h: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Finite-difference gradient (per µm) at points."""
        gx = (self.at(x + h, y) - self.at(x - h, y)) / (2 * h)
        gy = (self.at(x, y + h) - self.at(x, y - h)) / (2 * h)
        return gx, gy

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Values at points (µm)."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        coords = np.stack([(y - self.origin) / self.step, (x - self.origin) / self.step])
        out = ndimage.map_coordinates(self.values, coords.reshape(2, -1), order=1, mode="nearest")
        return out.reshape(x.shape).astype(np.float32, copy=False)

    def on_grid(self, nx: int, ny: int, g: float) -> np.ndarray:
        """Values at the centres of a ``ny`` x ``nx`` grid of ``g`` µm cells (separable, fast)."""
        wy = _interp_matrix(((np.arange(ny) + 0.5) * g - self.origin) / self.step, self.values.shape[0])
        wx = _interp_matrix(((np.arange(nx) + 0.5) * g - self.origin) / self.step, self.values.shape[1])
        tmp = wy @ self.values  # (ny, cx)
        return np.asarray((wx @ tmp.T).T, dtype=np.float32)


def _interp_matrix(u: np.ndarray, n: int) -> sparse.csr_matrix:
    """Sparse linear-interpolation weights from ``n`` lattice values to positions ``u`` (lattice units)."""
    u = np.clip(u, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), n - 2)
    f = (u - i0).astype(np.float32)
    rows = np.repeat(np.arange(len(u)), 2)
    cols = np.stack([i0, i0 + 1], axis=1).ravel()
    vals = np.stack([1 - f, f], axis=1).ravel()
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(u), n))


def _ellipse_rho(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, phi: float) -> np.ndarray:
    """Normalised elliptical radius (1 on the boundary) of points around an ellipse."""
    c, s = math.cos(phi), math.sin(phi)
    dx = x - cx
    dy = y - cy
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return np.sqrt(u * u + v * v)
