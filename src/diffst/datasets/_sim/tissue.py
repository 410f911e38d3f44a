"""The tissue: outline, spatial domains, structures and cells with their types, programmes and morphology."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ._common import (
    _GATES,
    _M,
    ADIP,
    BC,
    CELL_TYPES,
    DOMAINS,
    ENDO,
    EPI,
    FIB,
    GLAND,
    GRID_UM,
    IMMUNE,
    MAC,
    MODULES,
    STROMA,
    TC,
    TUM,
    TUMOUR,
    VESSEL,
    _ellipse_rho,
    _Field,
    _rng,
)

if TYPE_CHECKING:
    from .render import _Layer


# --------------------------------------------------------------------------------------------------------------------
# The tissue
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Tissue:
    """A simulated tissue section (see :func:`simulate_tissue`).

    Grids are ``ny`` x ``nx`` with ``grid_um`` µm cells; grid cell ``(i, j)`` covers
    ``[j * grid_um, (j + 1) * grid_um) x [i * grid_um, (i + 1) * grid_um)``.
    """

    width_um: float
    height_um: float
    seed: int
    grid_um: float
    tissue: np.ndarray  # bool, under tissue
    alpha: np.ndarray  # uint8, soft tissue mask for rendering (255 = tissue)
    domain: np.ndarray  # int8, index into DOMAINS
    lumen: np.ndarray  # bool, gland or vessel lumen (tissue without cells)
    bg_e: np.ndarray  # uint8, eosin optical density x 200 of the extracellular background
    fibre: np.ndarray  # uint8, 255 where stromal collagen fibres show
    cells: dict[str, np.ndarray]
    modules: np.ndarray  # (n_cells, len(MODULES)) float32 latent module activity
    rbc: dict[str, np.ndarray]  # red blood cells in vessel lumens (image only)
    fields: dict[str, _Field]
    gradient: np.ndarray  # (n_cells,) value of the tissue-wide gradient at each cell
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return len(self.cells["x"])

    def lookup(self, grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Nearest-grid value at points (µm); points outside the field read the nearest edge."""
        ny, nx = grid.shape
        j = np.clip((np.asarray(x) / self.grid_um).astype(np.int64), 0, nx - 1)
        i = np.clip((np.asarray(y) / self.grid_um).astype(np.int64), 0, ny - 1)
        return grid[i, j]

    @cached_property
    def layers(self) -> dict[str, _Layer]:
        """Ellipse layers used by :func:`render` (built on first use)."""
        from .render import _build_layers

        return _build_layers(self)


def simulate_tissue(width_um: float, height_um: float, *, seed: int) -> Tissue:
    """Simulate a tissue section of ``width_um`` x ``height_um`` µm.

    Parameters
    ----------
    width_um, height_um
        Size of the field (µm).
    seed
        Seed; the same seed and size give the same tissue.

    Returns
    -------
    The simulated :class:`Tissue`.

    """
    w, h = float(width_um), float(height_um)
    g = GRID_UM
    nx, ny = int(math.ceil(w / g)), int(math.ceil(h / g))
    area_mm2 = w * h / 1e6

    rng = _rng(seed, "fields")
    fields = {
        name: _Field(rng, w, h, scale)
        for name, scale in [
            ("tissue_l", 1500),
            ("tissue_m", 250),
            ("tissue_s", 60),
            ("tumour_l", 400),
            ("tumour_m", 100),
            ("tumour_s", 35),
            ("normal", 800),
            ("adipose_l", 350),
            ("adipose_s", 90),
            ("aggregate", 40),
            ("density", 200),
            ("clone", 700),
            ("prolif", 300),
            ("ifn", 400),
            ("stress", 1200),
            ("gradient", 2000),
            ("fibre_warp", 30),
            ("fibre_break", 20),
            ("stain_h", 800),
            ("stain_e", 800),
        ]
    }
    fields.update({f"cluster_{t}": _Field(rng, w, h, 120) for t in range(len(CELL_TYPES))})
    # collagen fibres follow the contour lines of this field (refined so the contours are smooth)
    fields["fibre"] = _Field(rng, w, h, 250, refine=4)

    # --- outline: a large irregular blob that fades out towards the field edges, with an occasional tear ---
    xs = (np.arange(nx, dtype=np.float32) + 0.5) * g
    ys = (np.arange(ny, dtype=np.float32) + 0.5) * g
    r2 = ((xs[None, :] - w / 2) / (w / 2)) ** 2 + ((ys[:, None] - h / 2) / (h / 2)) ** 2
    score = (
        0.9 * fields["tissue_l"].on_grid(nx, ny, g)
        + 0.35 * fields["tissue_m"].on_grid(nx, ny, g)
        + 0.12 * fields["tissue_s"].on_grid(nx, ny, g)
        - 2.2 * r2**2
    )
    rng = _rng(seed, "structures")
    for _ in range(rng.poisson(area_mm2 / 5)):
        hx, hy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        hr = rng.uniform(60, 200)
        d2 = ((xs[None, :] - hx) ** 2 + (ys[:, None] - hy) ** 2) / hr**2
        score -= 4.0 * np.exp(-(d2**2))
    threshold = np.quantile(score[:: max(1, ny // 400), :: max(1, nx // 400)], 0.2)
    alpha = np.clip((score - threshold) / 0.06 + 0.5, 0, 1)
    tissue = score > threshold
    del score, r2

    # --- tumour nests: a multi-scale field thresholded so that about a third of the tissue is tumour ---
    # the normal breast (lobules) and the carcinoma occupy different parts of the section
    step = (max(1, ny // 400), max(1, nx // 400))
    normal = fields["normal"].on_grid(nx, ny, g)
    n_sample = normal[:: step[0], :: step[1]][tissue[:: step[0], :: step[1]]]
    normal_zone = tissue & (normal > (np.quantile(n_sample, 0.7) if n_sample.size else np.inf))
    del normal
    tum = (
        fields["tumour_l"].on_grid(nx, ny, g)
        + 0.5 * fields["tumour_m"].on_grid(nx, ny, g)
        + 0.2 * fields["tumour_s"].on_grid(nx, ny, g)
    )
    tum[~tissue | normal_zone] = -1e9
    t_sample = tum[:: step[0], :: step[1]][tissue[:: step[0], :: step[1]]]
    t_thr = np.quantile(t_sample, 0.68) if t_sample.size else np.inf
    domain = np.zeros((ny, nx), dtype=np.int8)
    domain[tum > t_thr] = TUMOUR
    del tum

    # distances (µm) on a coarser grid; enough for placing structures and for smooth programmes
    cf = max(1, int(math.ceil(max(nx, ny) / 1000)))
    cg = g * cf

    def coarse_lookup(arr: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        j = np.clip((np.asarray(x) / cg).astype(np.int64), 0, arr.shape[1] - 1)
        i = np.clip((np.asarray(y) / cg).astype(np.int64), 0, arr.shape[0] - 1)
        return arr[i, j]

    def lookup(arr: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        j = np.clip((np.asarray(x) / g).astype(np.int64), 0, nx - 1)
        i = np.clip((np.asarray(y) / g).astype(np.int64), 0, ny - 1)
        return arr[i, j]

    def dist_to(mask: np.ndarray) -> np.ndarray:
        m = mask[::cf, ::cf]
        if not m.any():
            return np.full(m.shape, 1e6, dtype=np.float32)
        return ndimage.distance_transform_edt(~m, sampling=cg).astype(np.float32)

    d_tum = dist_to(domain == TUMOUR)

    # --- tumour cords and small satellite nests in the stroma near the tumour (many smaller than a Visium spot) ---
    n_cords = rng.poisson(area_mm2 * 0.8 * 10)
    for _ in range(n_cords):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        d = coarse_lookup(d_tum, cx, cy)
        if (
            not (lookup(tissue, cx, cy) and 25 < d < 250)
            or lookup(domain, cx, cy) != STROMA
            or lookup(normal_zone, cx, cy)
        ):
            continue
        a = rng.uniform(6, 45)
        b = min(a, rng.uniform(5, 10))
        _paint(domain, g, cx, cy, a, b, rng.uniform(0, np.pi), TUMOUR, where=tissue & (domain == STROMA))

    # --- adipose islands in the stroma ---
    fat = fields["adipose_l"].on_grid(nx, ny, g) + 0.35 * fields["adipose_s"].on_grid(nx, ny, g)
    f_sample = fat[:: step[0], :: step[1]][tissue[:: step[0], :: step[1]]]
    f_thr = np.quantile(f_sample, 0.9) if f_sample.size else np.inf
    adipose = tissue & (fat > f_thr) & (domain == STROMA)
    del fat

    # --- normal glands: lobules of small acini (20-60 µm) and ducts, away from the tumour ---
    normal_zone &= domain == STROMA
    lumen = np.zeros((ny, nx), dtype=bool)
    glands: list[tuple[float, float, float, float, float, float, bool]] = []  # cx, cy, a, b, phi, lumen ratio, duct
    n_lobules = rng.poisson(area_mm2 * 0.8 * 5.0)
    for _ in range(n_lobules):
        lx, ly = rng.uniform(0, w), rng.uniform(0, h)
        if not lookup(normal_zone, lx, ly):
            continue
        lr = rng.uniform(90, 240)
        placed: list[tuple[float, float, float]] = []
        if rng.random() < 0.6:
            dr = rng.uniform(35, 70)
            placed.append((lx, ly, dr))
            q = rng.uniform(1.0, 1.4)
            glands.append(
                (lx, ly, dr * math.sqrt(q), dr / math.sqrt(q), rng.uniform(0, np.pi), rng.uniform(0.5, 0.65), True)
            )
        n_acini = rng.poisson((lr / 40) ** 2 * 1.0) + 2
        for _ in range(4 * n_acini):
            if len(placed) >= n_acini + 1:
                break
            ang, rad = rng.uniform(0, 2 * np.pi), lr * math.sqrt(rng.random())
            ax, ay = lx + rad * math.cos(ang), ly + rad * math.sin(ang)
            ar = rng.uniform(12, 30)
            if not lookup(normal_zone, ax, ay):
                continue
            if any((ax - px) ** 2 + (ay - py) ** 2 < (ar + pr + 5) ** 2 for px, py, pr in placed):
                continue
            placed.append((ax, ay, ar))
            q = rng.uniform(1.0, 1.35)
            glands.append(
                (ax, ay, ar * math.sqrt(q), ar / math.sqrt(q), rng.uniform(0, np.pi), rng.uniform(0.3, 0.5), False)
            )
    for cx, cy, a, b, phi, lr_, _duct in glands:
        sl, rho = _ellipse_window(ny, nx, g, cx, cy, a, b, phi)
        if rho is None:
            continue
        sub_t = tissue[sl]
        domain[sl][(rho < 1) & sub_t] = GLAND
        lumen[sl] |= (rho < lr_) & sub_t
        adipose[sl] &= rho >= 1.3

    # --- immune aggregates (tertiary lymphoid structures, 20-180 µm), preferably near the tumour border ---
    aggregates: list[tuple[float, float, float]] = []
    n_agg = rng.poisson(area_mm2 * 0.8 * 6)
    for _ in range(n_agg):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if not lookup(tissue, cx, cy) or lookup(domain, cx, cy) != STROMA or lookup(adipose, cx, cy):
            continue
        if rng.random() > 0.25 + 0.75 * math.exp(-coarse_lookup(d_tum, cx, cy) / 250):
            continue
        r = math.exp(rng.uniform(math.log(20), math.log(180)))
        sl, rho = _ellipse_window(ny, nx, g, cx, cy, 1.3 * r, 1.3 * r, 0.0)
        if rho is None:
            continue
        gy, gx = np.mgrid[sl]
        wobble = fields["aggregate"].at((gx + 0.5) * g, (gy + 0.5) * g)
        inside = (rho * 1.3 < 1 + 0.25 * wobble) & tissue[sl] & (domain[sl] == STROMA)
        domain[sl][inside] = IMMUNE
        adipose[sl] &= ~inside
        aggregates.append((cx, cy, r))

    # --- vessels: capillaries (5-7 µm), small vessels (9-25 µm) and a few larger muscular ones ---
    vessels: list[tuple[float, float, float, float, float, float]] = []  # cx, cy, a, b, phi, lumen ratio
    n_ves = rng.poisson(area_mm2 * 0.8 * 60)
    for _ in range(n_ves):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if not lookup(tissue, cx, cy) or lookup(lumen, cx, cy):
            continue
        dom = lookup(domain, cx, cy)
        if dom == GLAND or (dom == TUMOUR and rng.random() > 0.35):
            continue
        u = rng.random()
        if u < 0.62:
            r = rng.uniform(4.5, 7.0)
            ratio = (r - 2.2) / r
        elif u < 0.93:
            r = rng.uniform(9, 25)
            ratio = 0.72
        else:
            r = rng.uniform(28, 70)
            ratio = 0.7
        q = rng.uniform(1.0, 2.2)
        a, b, phi = r * math.sqrt(q), r / math.sqrt(q), rng.uniform(0, np.pi)
        sl, rho = _ellipse_window(ny, nx, g, cx, cy, a, b, phi)
        if rho is None or (domain[sl][rho < 1.2] == GLAND).any():
            continue
        sub_t = tissue[sl]
        domain[sl][(rho < 1) & sub_t] = VESSEL
        lumen[sl] |= (rho < ratio) & sub_t
        adipose[sl] &= rho >= 1.1
        vessels.append((cx, cy, a, b, phi, ratio))

    adipose &= domain == STROMA
    lumen &= tissue

    # --- cells ---
    cells, rbc = _place_cells(
        seed,
        (w, h),
        maps={"tissue": tissue, "domain": domain, "lumen": lumen, "adipose": adipose},
        glands=glands,
        vessels=vessels,
        fields=fields,
        lookup=lookup,
    )

    # distances and programme activities at the cells
    d_tum = dist_to(domain == TUMOUR)
    d_in = ndimage.distance_transform_edt((domain == TUMOUR)[::cf, ::cf], sampling=cg).astype(np.float32)
    d_imm = dist_to(domain == IMMUNE)
    d_edge = ndimage.distance_transform_edt(np.pad(tissue[::cf, ::cf], 1), sampling=cg)[1:-1, 1:-1].astype(np.float32)
    x, y = cells["x"], cells["y"]
    cells["dist_tumour"] = coarse_lookup(d_tum, x, y)
    cells["depth_tumour"] = coarse_lookup(d_in, x, y)
    cells["dist_immune"] = coarse_lookup(d_imm, x, y)
    cells["depth_tissue"] = coarse_lookup(d_edge, x, y)
    _assign_types(seed, cells, fields, aggregates)
    modules = _module_activity(seed, cells, fields)
    _morphology(seed, cells, fields)

    # tissue-wide gradient used by "grad" genes: a linear ramp in a random direction plus a very smooth field
    grng = _rng(seed, "gradient")
    psi = grng.uniform(0, 2 * np.pi)
    ramp = ((x - w / 2) * math.cos(psi) + (y - h / 2) * math.sin(psi)) / (0.5 * max(w, h))
    gradient = (0.7 * ramp + 0.5 * fields["gradient"].at(x, y)).astype(np.float32)

    # background eosin and fibres for the renderer
    e_domain = np.array([0.50, 0.30, 0.26, 0.62, 0.34], dtype=np.float32)
    bg_e = e_domain[domain]
    bg_e[adipose] = 0.10
    bg_e[lumen] = np.where(domain[lumen] == VESSEL, 0.16, 0.07)
    fibre = (domain == STROMA) & ~lumen & ~adipose
    tissue_area = float(tissue.sum()) * g * g / 1e6
    summary = {
        "tissue_area_mm2": tissue_area,
        "n_cells": len(x),
        "cells_per_mm2": len(x) / max(tissue_area, 1e-9),
        "n_glands": len(glands),
        "n_vessels": len(vessels),
        "n_immune_aggregates": len(aggregates),
        "domain_fraction": {
            name: float((domain[tissue] == k).mean()) if tissue.any() else 0.0 for k, name in enumerate(DOMAINS)
        },
        "cell_type_fraction": {
            name: float((cells["type"] == k).mean()) if len(x) else 0.0 for k, name in enumerate(CELL_TYPES)
        },
    }
    return Tissue(
        width_um=w,
        height_um=h,
        seed=int(seed),
        grid_um=g,
        tissue=tissue,
        alpha=np.round(alpha * 255).astype(np.uint8),
        domain=domain,
        lumen=lumen,
        # smoothed by ~2 µm so that region edges (lumens, fat, aggregates) do not show the grid's staircase
        bg_e=np.round(np.clip(ndimage.gaussian_filter(bg_e, 1.0), 0, 1.27) * 200).astype(np.uint8),
        fibre=np.round(ndimage.gaussian_filter(fibre.astype(np.float32), 1.0) * 255).astype(np.uint8),
        cells=cells,
        modules=modules,
        rbc=rbc,
        fields=fields,
        gradient=gradient,
        summary=summary,
    )


def _ellipse_window(
    ny: int, nx: int, g: float, cx: float, cy: float, a: float, b: float, phi: float
) -> tuple[tuple[slice, slice], np.ndarray | None]:
    """Grid slices of the bounding box of an ellipse and the normalised radius of their nodes."""
    r = max(a, b) + g
    i0, i1 = max(0, int((cy - r) / g)), min(ny, int(math.ceil((cy + r) / g)) + 1)
    j0, j1 = max(0, int((cx - r) / g)), min(nx, int(math.ceil((cx + r) / g)) + 1)
    sl = (slice(i0, i1), slice(j0, j1))
    if i1 <= i0 or j1 <= j0:
        return sl, None
    gy = (np.arange(i0, i1, dtype=np.float32) + 0.5) * g
    gx = (np.arange(j0, j1, dtype=np.float32) + 0.5) * g
    return sl, _ellipse_rho(gx[None, :], gy[:, None], cx, cy, a, b, phi)


def _paint(
    grid: np.ndarray, g: float, cx: float, cy: float, a: float, b: float, phi: float, value: int, where: np.ndarray
) -> None:
    sl, rho = _ellipse_window(grid.shape[0], grid.shape[1], g, cx, cy, a, b, phi)
    if rho is not None:
        grid[sl][(rho < 1) & where[sl]] = value


# --------------------------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------------------------
def _ring(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    a: float,
    b: float,
    phi: float,
    spacing: float,
    min_n: int,
    jitter: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points evenly spaced on an ellipse, with the local tangent angle."""
    perim = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
    n = max(min_n, int(round(perim / spacing)))
    t = (np.arange(n) + rng.uniform(0, 1)) * (2 * np.pi / n) + rng.normal(0, jitter, n)
    c, s = math.cos(phi), math.sin(phi)
    ex, ey = a * np.cos(t), b * np.sin(t)
    x = cx + ex * c - ey * s
    y = cy + ex * s + ey * c
    tx, ty = -a * np.sin(t), b * np.cos(t)
    tangent = np.arctan2(tx * s + ty * c, tx * c - ty * s)
    return x, y, tangent


def _relax(
    x: np.ndarray, y: np.ndarray, radius: np.ndarray, fixed: np.ndarray, n_iter: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Push apart cells closer than the sum of their radii (a few Jacobi steps); fixed cells do not move."""
    x, y = x.copy(), y.copy()
    if len(x) < 2:
        return x, y
    r_max = float(radius.max())
    for _ in range(n_iter):
        pairs = cKDTree(np.column_stack([x, y])).query_pairs(2 * r_max, output_type="ndarray")
        if len(pairs) == 0:
            break
        i, j = pairs[:, 0], pairs[:, 1]
        dx, dy = x[j] - x[i], y[j] - y[i]
        dist = np.hypot(dx, dy)
        overlap = radius[i] + radius[j] - dist
        keep = (overlap > 0) & ~(fixed[i] & fixed[j])
        i, j, dx, dy, dist, overlap = i[keep], j[keep], dx[keep], dy[keep], dist[keep], overlap[keep]
        dist = np.maximum(dist, 1e-6)
        ux, uy = dx / dist, dy / dist
        wi = np.where(fixed[i], 0.0, np.where(fixed[j], 1.0, 0.5)) * overlap * 0.9
        wj = np.where(fixed[j], 0.0, np.where(fixed[i], 1.0, 0.5)) * overlap * 0.9
        n = len(x)
        x += np.bincount(j, wj * ux, n) - np.bincount(i, wi * ux, n)
        y += np.bincount(j, wj * uy, n) - np.bincount(i, wi * uy, n)
    return x, y


def _place_cells(
    seed: int,
    size: tuple[float, float],
    *,
    maps: dict[str, np.ndarray],
    glands: list,
    vessels: list,
    fields: dict[str, _Field],
    lookup,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cells (and red blood cells in vessels) on the 2 µm maps ``tissue``, ``domain``, ``lumen``, ``adipose``."""
    w, h = size
    tissue, domain, lumen, adipose = (maps[k] for k in ("tissue", "domain", "lumen", "adipose"))
    rng = _rng(seed, "cells")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    types: list[np.ndarray] = []
    doms: list[np.ndarray] = []
    angles: list[np.ndarray] = []
    flags: list[np.ndarray] = []  # 1 myoepithelial, 2 vascular smooth muscle / pericyte

    def add(x, y, t, d, ang, flag):
        xs.append(np.asarray(x, float))
        ys.append(np.asarray(y, float))
        n = len(xs[-1])
        types.append(np.full(n, t, np.int8))
        doms.append(np.full(n, d, np.int8))
        angles.append(np.asarray(ang, float))
        flags.append(np.full(n, flag, np.int8))

    # epithelium of glands: a luminal ring (radial nuclei) and an outer myoepithelial ring (flat nuclei)
    for cx, cy, a, b, phi, lr, duct in glands:
        thick = min(a, b) * (1 - lr)
        layers = max(1, int(round((thick - 3) / 9))) if duct else 1
        for k in range(layers):
            f = lr + (1 - lr) * (k + 0.5) / layers * (1 - 2.5 / max(thick, 3))
            x, y, tang = _ring(rng, cx, cy, a * f, b * f, phi, 7.0, 4, 0.05)
            add(x, y, EPI, GLAND, tang + np.pi / 2, 0)
        x, y, tang = _ring(rng, cx, cy, a - 1.3, b - 1.3, phi, 13.0, 3, 0.1)
        add(x, y, EPI, GLAND, tang, 1)

    # vessels: endothelium lining the lumen, smooth muscle / pericytes in thicker walls; red cells in the lumen
    rbc_x: list[np.ndarray] = []
    rbc_y: list[np.ndarray] = []
    for cx, cy, a, b, phi, ratio in vessels:
        la, lb = a * ratio, b * ratio
        x, y, tang = _ring(rng, cx, cy, la + 1.0, lb + 1.0, phi, 15.0, 1, 0.15)
        if len(x) <= 2 and a < 8:
            x, y, tang = x[:2], y[:2], tang[:2]
        add(x, y, ENDO, VESSEL, tang, 0)
        wall = min(a, b) * (1 - ratio)
        if wall >= 4.5:
            n_layers = max(1, int(round(wall / 6)))
            for k in range(n_layers):
                f = (min(a, b) * ratio + 2.5 + (k + 0.5) * (wall - 2.5) / n_layers) / min(a, b)
                x, y, tang = _ring(rng, cx, cy, a * f, b * f, phi, 9.0, 3, 0.1)
                add(x, y, FIB, VESSEL, tang, 2)
        if lb > 3.5:
            n_rbc = rng.poisson(math.pi * la * lb / 60 * rng.uniform(0.1, 1.0))
            t, rr = rng.uniform(0, 2 * np.pi, n_rbc), np.sqrt(rng.random(n_rbc))
            ex, ey = (la - 3.3) * rr * np.cos(t), (lb - 3.3) * rr * np.sin(t)
            c, s = math.cos(phi), math.sin(phi)
            rbc_x.append(cx + ex * c - ey * s)
            rbc_y.append(cy + ex * s + ey * c)

    n_obj = sum(len(v) for v in xs)

    # adipocytes: large cells packed in the adipose islands
    d_adip = 1 / 750
    n = rng.poisson(w * h * d_adip)
    ax, ay = rng.uniform(0, w, n), rng.uniform(0, h, n)
    ok = lookup(adipose, ax, ay)
    ax, ay = ax[ok], ay[ok]
    ax, ay = _relax(ax, ay, np.full(len(ax), 16.0), np.zeros(len(ax), bool), n_iter=6)
    ok = lookup(adipose, ax, ay) & ~lookup(lumen, ax, ay)
    ax, ay = ax[ok], ay[ok]
    if len(ax) > 1:
        nn = cKDTree(np.column_stack([ax, ay])).query(np.column_stack([ax, ay]), k=2)[0][:, 1]
    else:
        nn = np.full(len(ax), 40.0)
    # neighbours touch: fat is a packed foam of adipocytes
    adip_r = np.clip(0.5 * nn, 12, 30)

    # free cells: a thinned Poisson process whose intensity depends on the domain, then relaxed to avoid overlaps
    d_max = 1 / 55
    n = rng.poisson(w * h * d_max)
    fx, fy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    dom = lookup(domain, fx, fy)
    allowed = lookup(tissue, fx, fy) & ~lookup(lumen, fx, fy) & (dom <= IMMUNE)
    in_fat = lookup(adipose, fx, fy)
    het = fields["density"].at(fx, fy)
    dens = np.select(
        [in_fat, dom == STROMA, dom == TUMOUR, dom == IMMUNE],
        [np.full(n, 1 / 2500), np.exp(0.35 * het) / 420, np.exp(0.12 * het) / 135, np.full(n, 1 / 62)],
        0.0,
    )
    keep = allowed & (rng.random(n) < dens / d_max)
    fx, fy, dom = fx[keep], fy[keep], dom[keep]
    r_free = np.select([dom == TUMOUR, dom == IMMUNE], [4.9, 3.3], 5.5)

    obj_x = np.concatenate(xs) if xs else np.zeros(0)
    obj_y = np.concatenate(ys) if ys else np.zeros(0)
    all_x = np.concatenate([obj_x, fx])
    all_y = np.concatenate([obj_y, fy])
    radius = np.concatenate([np.full(n_obj, 3.0), r_free])
    fixed = np.concatenate([np.ones(n_obj, bool), np.zeros(len(fx), bool)])
    all_x, all_y = _relax(all_x, all_y, radius, fixed, n_iter=3)
    fx, fy = all_x[n_obj:], all_y[n_obj:]
    dom_after = lookup(domain, fx, fy)
    ok = (
        lookup(tissue, fx, fy)
        & ~lookup(lumen, fx, fy)
        & (dom_after <= IMMUNE)
        & (fx >= 0)
        & (fx < w)
        & (fy >= 0)
        & (fy < h)
    )
    if len(ax):
        d, k = cKDTree(np.column_stack([ax, ay])).query(np.column_stack([fx, fy]), k=1)
        ok &= d > 0.85 * adip_r[k]
    fx, fy, dom = fx[ok], fy[ok], dom_after[ok]

    add(fx, fy, -1, 0, np.full(len(fx), np.nan), 0)
    doms[-1] = dom.astype(np.int8)
    add(ax, ay, ADIP, STROMA, rng.uniform(0, np.pi, len(ax)), 0)

    cells = {
        "x": np.concatenate(xs),
        "y": np.concatenate(ys),
        "type": np.concatenate(types),
        "domain": np.concatenate(doms),
        "angle": np.concatenate(angles),
        "flag": np.concatenate(flags),
    }
    cells["cell_r_hint"] = np.zeros(len(cells["x"]))
    cells["cell_r_hint"][-len(ax) :] = adip_r if len(ax) else 0
    inside = (cells["x"] >= 0) & (cells["x"] < w) & (cells["y"] >= 0) & (cells["y"] < h)
    cells = {k: v[inside] for k, v in cells.items()}
    # spatial order (tiles of 250 µm, row by row), as instruments write cells and molecules field by field
    tile = (cells["y"] // 250).astype(np.int64) * int(math.ceil(w / 250) + 1) + (cells["x"] // 250).astype(np.int64)
    order = np.lexsort((cells["x"], tile))
    cells = {k: v[order] for k, v in cells.items()}
    rbc = {
        "x": np.concatenate(rbc_x) if rbc_x else np.zeros(0),
        "y": np.concatenate(rbc_y) if rbc_y else np.zeros(0),
    }
    return cells, rbc


def _assign_types(seed: int, cells: dict[str, np.ndarray], fields: dict[str, _Field], aggregates: list) -> None:
    """Cell types of the free cells, from domain mixtures with local clustering and zonation."""
    rng = _rng(seed, "types")
    free = cells["type"] < 0
    x, y, dom = cells["x"][free], cells["y"][free], cells["domain"][free]
    n = len(x)
    mix = np.array(
        [
            # tum  epi   fib   T     B     mac   endo  adip
            [0.015, 0.0, 0.68, 0.08, 0.02, 0.12, 0.085, 0.0],  # stroma
            [0.86, 0.0, 0.03, 0.05, 0.005, 0.05, 0.005, 0.0],  # tumour
            [0.0, 0.0, 0.04, 0.50, 0.33, 0.09, 0.04, 0.0],  # immune
        ]
    )
    logits = np.log(mix[np.minimum(dom, 2)] + 1e-9)
    for t in (TUM, FIB, TC, BC, MAC, ENDO):
        logits[:, t] += 0.9 * fields[f"cluster_{t}"].at(x, y)
    near_tumour = np.exp(-cells["dist_tumour"][free] / 60)
    logits[:, TC] += 1.2 * near_tumour * (dom == STROMA)
    logits[:, MAC] += 0.8 * near_tumour * (dom == STROMA)
    logits[:, TC] += 1.0 * np.exp(-cells["depth_tumour"][free] / 30) * (dom == TUMOUR)
    if aggregates:
        agg = np.array(aggregates)
        d, k = cKDTree(agg[:, :2]).query(np.column_stack([x, y]), k=1)
        rel = d / agg[k, 2]
        big = agg[k, 2] > 45
        # B-cell follicle in the centre of large aggregates, T cells around it
        logits[:, BC] += np.where((dom == IMMUNE) & big, 2.5 * (0.6 - rel), 0.0)
    gumbel = -np.log(-np.log(rng.random((n, len(CELL_TYPES)))))
    cells["type"][free] = np.argmax(logits + gumbel, axis=1).astype(np.int8)


def _module_activity(seed: int, cells: dict[str, np.ndarray], fields: dict[str, _Field]) -> np.ndarray:
    """Latent per-cell activity of each co-expression module (spatially structured and cell-specific)."""
    rng = _rng(seed, "modules")
    x, y, t = cells["x"], cells["y"], cells["type"].astype(np.int64)
    n = len(x)
    noise = rng.standard_normal((n, len(MODULES))).astype(np.float32)
    clone = 1 / (1 + np.exp(-2.5 * fields["clone"].at(x, y)))
    myo = cells["flag"] == 1
    smc = cells["flag"] == 2
    p_cyc = np.where(t == TUM, np.clip(0.22 + 0.12 * fields["prolif"].at(x, y) + 0.1 * clone, 0.03, 0.6), 0.0)
    p_cyc = np.where((t == TC) | (t == BC), np.where(cells["domain"] == IMMUNE, 0.08, 0.03), p_cyc)
    p_cyc = np.where((t != TUM) & (t != TC) & (t != BC) & (t != ADIP), 0.02, p_cyc)
    u = rng.random((n, 4))
    cycling = u[:, 0] < p_cyc
    cells["cycling"] = cycling
    cells["mitotic"] = cycling & (u[:, 1] < 0.08)
    cd8 = (t == TC) & (u[:, 2] < 0.35 + 0.3 * np.exp(-cells["dist_tumour"] / 100))
    plasma = (t == BC) & (u[:, 3] < np.where(cells["domain"] == IMMUNE, 0.05, 0.5))
    cells["cd8"] = cd8
    cells["plasma"] = plasma
    cells["clone"] = clone.astype(np.float32)
    ifn_raw = 2.0 * np.exp(-cells["dist_immune"] / 150) + 0.5 * np.maximum(fields["ifn"].at(x, y), 0)
    raw = np.stack(
        [
            2.8 * cycling + 0.25 * noise[:, 0],
            2.5 * np.clip((cells["depth_tumour"] - 30) / 120, 0, 1.2) + 0.25 * noise[:, 1],
            ifn_raw + 0.2 * noise[:, 2],
            2.8 * clone + 0.2 * noise[:, 3],
            2.2 * (1 - clone) * ~myo + 0.3 * noise[:, 4],
            2.8 * myo + 0.2 * noise[:, 5],
            2.8 * (smc | myo) + 1.2 * np.exp(-cells["dist_tumour"] / 60) * (t == FIB) + 0.2 * noise[:, 6],
            2.4 * np.exp(-cells["dist_tumour"] / 80) + 0.3 * noise[:, 7],
            2.4 * cd8 + 0.2 * noise[:, 8],
            3.5 * plasma + 0.2 * noise[:, 9],
            1.0 + 0.8 * ifn_raw + 0.2 * noise[:, 10],
            2.0 * np.exp(-cells["depth_tissue"] / 250) + 0.6 * fields["stress"].at(x, y) + 0.2 * noise[:, 11],
        ],
        axis=1,
    )
    return (_GATES[t] * raw).astype(np.float32)


def _morphology(seed: int, cells: dict[str, np.ndarray], fields: dict[str, _Field]) -> None:
    """Nucleus and cytoplasm geometry and stain intensities per cell."""
    rng = _rng(seed, "morphology")
    t = cells["type"].astype(np.int64)
    x, y = cells["x"], cells["y"]
    n = len(x)
    z = rng.standard_normal((n, 6))
    nuc_a = _M["nuc_a"][t] * np.exp(_M["nuc_sd"][t] * z[:, 0])
    # higher-grade (ERBB2-amplified) tumour clone: larger nuclei; cycling cells slightly larger and darker
    nuc_a *= np.where(t == TUM, 1 + 0.22 * cells["clone"], 1.0) * np.where(cells["cycling"], 1.08, 1.0)
    nuc_b = np.minimum(nuc_a * _M["nuc_ratio"][t] * np.exp(0.08 * z[:, 1]), nuc_a)
    hema = _M["H"][t] * np.exp(0.08 * z[:, 2]) * np.where(cells["cycling"], 1.1, 1.0)
    mitotic = cells["mitotic"]
    hema = np.where(mitotic, hema * 1.6, hema)
    nuc_b = np.where(mitotic, nuc_b * 0.6, nuc_b)

    angle = cells["angle"].copy()
    fib = (t == FIB) & np.isnan(angle)
    # fibroblasts lie along the collagen fibres, i.e. along the contour lines of the fibre field
    gx, gy = fields["fibre"].gradient_at(x[fib], y[fib])
    angle[fib] = np.arctan2(gy, gx) + np.pi / 2 + 0.2 * rng.standard_normal(fib.sum())
    rest = np.isnan(angle)
    angle[rest] = rng.uniform(0, np.pi, rest.sum())

    # cytoplasm: type size, limited by the distance to the nearest neighbour so that packed cells do not overlap
    pts = np.column_stack([x, y])
    nn = cKDTree(pts).query(pts, k=2)[0][:, 1] if n > 1 else np.full(n, 50.0)
    r_cell = _M["cell_r"][t] * np.exp(0.1 * z[:, 3])
    r_cell = np.minimum(r_cell, np.maximum(0.62 * nn, nuc_a * 0.9))
    adip = t == ADIP
    r_cell[adip] = cells["cell_r_hint"][adip]
    q = _M["cell_ratio"][t]
    cell_a = np.maximum(r_cell / np.sqrt(q), nuc_a + 0.8)
    cell_b = np.maximum(r_cell * np.sqrt(q), nuc_b + 0.8)

    # nucleus centre: the cell centre, except in adipocytes where a flat nucleus is pushed against the membrane
    nuc_x, nuc_y = x.copy(), y.copy()
    if adip.any():
        ang = rng.uniform(0, 2 * np.pi, adip.sum())
        rr = cell_b[adip] - nuc_b[adip] - 0.6
        nuc_x[adip] = x[adip] + rr * np.cos(ang)
        nuc_y[adip] = y[adip] + rr * np.sin(ang)
        cells_angle_adip = ang + np.pi / 2
        angle[adip] = cells_angle_adip
        cell_a[adip] = cell_b[adip] = r_cell[adip]

    cells.update(
        nuc_x=nuc_x,
        nuc_y=nuc_y,
        nuc_a=nuc_a.astype(np.float32),
        nuc_b=nuc_b.astype(np.float32),
        angle=angle.astype(np.float32),
        cell_a=cell_a.astype(np.float32),
        cell_b=cell_b.astype(np.float32),
        hema=hema.astype(np.float32),
        eosin=(_M["E"][t] * np.exp(0.08 * z[:, 4])).astype(np.float32),
        dapi=(_M["dapi"][t] * np.exp(0.1 * z[:, 5]) * np.where(mitotic, 1.5, 1.0)).astype(np.float32),
        z=rng.uniform(9.0, 15.0, n).astype(np.float32),
        size_noise=(0.3 * rng.standard_normal(n)).astype(np.float32),
        area=(np.pi * cell_a * cell_b).astype(np.float32),
        nucleus_area=(np.pi * nuc_a * nuc_b).astype(np.float32),
    )
    cells.pop("cell_r_hint")
