"""H&E and DAPI pixels of any window of the tissue at any resolution, deterministically."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage, sparse

from ._common import _M, ADIP, _Field, _interp_matrix

if TYPE_CHECKING:
    from .tissue import Tissue

# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------
# Stain optical densities per unit concentration (R, G, B); hematoxylin after Ruifrok & Johnston, eosin a little bluer
# so that eosin reads pink rather than magenta, and haemoglobin for red blood cells.
_OD_H = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_OD_E = np.array([0.07, 0.92, 0.38], dtype=np.float32)
_OD_R = np.array([0.10, 1.10, 0.80], dtype=np.float32)
_OD_GLASS = 0.035


class _Layer:
    """Ellipses (filled or rings) with per-ellipse values and a bucketed spatial index."""

    BIN_UM = 64.0

    def __init__(
        self,
        width: float,
        height: float,
        x,
        y,
        a,
        b,
        phi,
        values: dict[str, np.ndarray],
        ring_um=None,
        opacity=None,
        profile: float = 0.0,
    ):
        self.opacity = None if opacity is None else np.asarray(opacity, np.float32)
        # values fall off towards the rim as 1 - profile * rho^2 (nuclei are domed, not flat discs)
        self.profile = float(profile)
        self.x = np.asarray(x, np.float64)
        self.y = np.asarray(y, np.float64)
        self.a = np.asarray(a, np.float32)
        self.b = np.asarray(b, np.float32)
        self.phi = np.asarray(phi, np.float32)
        self.values = {k: np.asarray(v, np.float32) for k, v in values.items()}
        self.ring = None if ring_um is None else np.asarray(ring_um, np.float32)
        self.reach = float(self.a.max()) if len(self.a) else 0.0
        self.nbx = int(math.ceil(width / self.BIN_UM)) + 1
        self.nby = int(math.ceil(height / self.BIN_UM)) + 1
        bx = np.clip((self.x // self.BIN_UM).astype(np.int64), 0, self.nbx - 1)
        by = np.clip((self.y // self.BIN_UM).astype(np.int64), 0, self.nby - 1)
        key = by * self.nbx + bx
        self.order = np.argsort(key, kind="stable")
        self.starts = np.searchsorted(key[self.order], np.arange(self.nbx * self.nby + 1))
        c, s = np.cos(self.phi), np.sin(self.phi)
        ia, ib = 1 / self.a**2, 1 / self.b**2
        self.q11, self.q12, self.q22 = c * c * ia + s * s * ib, c * s * (ia - ib), s * s * ia + c * c * ib

    def __len__(self) -> int:
        return len(self.x)

    def query(self, x0: float, x1: float, y0: float, y1: float, margin: float) -> np.ndarray:
        """Indices of ellipses whose stamps may reach the box (µm); ``margin`` covers the stamps' soft edges."""
        if not len(self.x):
            return np.zeros(0, np.int64)
        m = self.reach + margin + (0.0 if self.ring is None else float(self.ring.max(initial=0)))
        bx0 = int(np.clip((x0 - m) // self.BIN_UM, 0, self.nbx - 1))
        bx1 = int(np.clip((x1 + m) // self.BIN_UM, 0, self.nbx - 1))
        by0 = int(np.clip((y0 - m) // self.BIN_UM, 0, self.nby - 1))
        by1 = int(np.clip((y1 + m) // self.BIN_UM, 0, self.nby - 1))
        parts = [
            self.order[self.starts[by * self.nbx + bx0] : self.starts[by * self.nbx + bx1 + 1]]
            for by in range(by0, by1 + 1)
        ]
        return np.concatenate(parts)


def _build_layers(tissue: Tissue) -> dict[str, _Layer]:
    c = tissue.cells
    t = c["type"].astype(np.int64)
    w, h = tissue.width_um, tissue.height_um
    adip = t == ADIP
    cyto = _Layer(
        w,
        h,
        c["x"],
        c["y"],
        c["cell_a"],
        c["cell_b"],
        c["angle"],
        {"E": c["eosin"], "H": _M["Hc"][t]},
        opacity=_M["opacity"][t],
    )
    nuclei = _Layer(
        w,
        h,
        c["nuc_x"],
        c["nuc_y"],
        c["nuc_a"],
        c["nuc_b"],
        c["angle"],
        {"H": c["hema"], "E": np.full(len(t), 0.12), "R": np.zeros(len(t)), "T": _M["tex"][t], "D": c["dapi"]},
        profile=0.3,
    )
    n_r = len(tissue.rbc["x"])
    n_a = int(adip.sum())
    extras = _Layer(
        w,
        h,
        np.concatenate([tissue.rbc["x"], c["x"][adip]]),
        np.concatenate([tissue.rbc["y"], c["y"][adip]]),
        np.concatenate([np.full(n_r, 3.6), c["cell_a"][adip]]),
        np.concatenate([np.full(n_r, 3.4), c["cell_b"][adip]]),
        np.concatenate([np.zeros(n_r), c["angle"][adip]]),
        {
            "H": np.concatenate([np.full(n_r, 0.02), np.full(n_a, 0.05)]),
            "E": np.concatenate([np.zeros(n_r), np.full(n_a, 0.75)]),
            "R": np.concatenate([np.full(n_r, 1.1), np.zeros(n_a)]),
            "T": np.zeros(n_r + n_a),
            "D": np.zeros(n_r + n_a),
        },
        ring_um=np.concatenate([np.zeros(n_r), np.full(n_a, 1.4)]),
    )
    return {"cyto": cyto, "nuclei": nuclei, "extras": extras}


def _hash_uniform(rows: np.ndarray, cols: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic per-pixel uniforms from global pixel indices (independent of chunking)."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + cols.astype(np.uint64) * np.uint64(
            0xC2B2AE3D27D4EB4F
        )
        z += np.uint64(salt & 0xFFFFFFFFFFFF) * np.uint64(0x165667B19E3779F9)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


def _bucket(h: np.ndarray) -> np.ndarray:
    """Round stamp half-sizes up to a short geometric ladder, so that few stamp shapes are needed."""
    ladder = np.unique(np.concatenate([np.arange(1, 9), np.round(8 * 1.2 ** np.arange(1, 30))])).astype(np.int64)
    return ladder[np.minimum(np.searchsorted(ladder, h), len(ladder) - 1)]


def _value_noise(X: np.ndarray, Y: np.ndarray, cell_um: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features of ~``cell_um`` µm, a pure function of the position (not the pixel)."""
    u = X.astype(np.float64) / cell_um
    v = Y.astype(np.float64) / cell_um
    j = np.floor(u)
    i = np.floor(v)
    fu = (u - j).astype(np.float32)
    fv = (v - i).astype(np.float32)
    fu = fu * fu * (3 - 2 * fu)
    fv = fv * fv * (3 - 2 * fv)
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    h00 = _hash_uniform(i, j, salt)
    h01 = _hash_uniform(i, j + 1, salt)
    h10 = _hash_uniform(i + 1, j, salt)
    h11 = _hash_uniform(i + 1, j + 1, salt)
    return (h00 + (h01 - h00) * fu) * (1 - fv) + (h10 + (h11 - h10) * fu) * fv


def _splat(
    layer: _Layer,
    idx: np.ndarray,
    affine: np.ndarray,
    inv: np.ndarray,
    r0: int,
    c0: int,
    shape: tuple[int, int],
    edge_px: float,
    keys: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Accumulate soft-edged ellipse coverage (``"w"``) and coverage-weighted values into a pixel window."""
    hh, ww = shape
    npx = hh * ww
    if not len(idx):
        return {k: np.zeros(npx, np.float32) for k in ("w", *keys)}
    lin = affine[:, :2]
    det = abs(float(np.linalg.det(lin)))
    px_per_um = 1 / float(np.linalg.svd(lin, compute_uv=False).min())
    # centres in pixel coordinates of the window
    cx = inv[0, 0] * layer.x[idx] + inv[0, 1] * layer.y[idx] + inv[0, 2] - c0
    cy = inv[1, 0] * layer.x[idx] + inv[1, 1] * layer.y[idx] + inv[1, 2] - r0
    # quadratic form of each ellipse in pixel units: P = L^T Q L
    q11, q12, q22 = layer.q11[idx], layer.q12[idx], layer.q22[idx]
    l0x, l0y, l1x, l1y = lin[0, 0], lin[1, 0], lin[0, 1], lin[1, 1]
    p00 = q11 * l0x * l0x + 2 * q12 * l0x * l0y + q22 * l0y * l0y
    p11 = q11 * l1x * l1x + 2 * q12 * l1x * l1y + q22 * l1y * l1y
    p01 = q11 * l0x * l1x + q12 * (l0x * l1y + l0y * l1x) + q22 * l0y * l1y
    ring = None if layer.ring is None else layer.ring[idx] * px_per_um
    pad = (0 if ring is None else ring) + 2 * edge_px + 1
    # half extents of the ellipse along the pixel axes
    pdet = np.maximum(p00 * p11 - p01 * p01, 1e-12)
    hx = _bucket(np.ceil(np.sqrt(p11 / pdet) + pad).astype(np.int64))
    hy = _bucket(np.ceil(np.sqrt(p00 / pdet) + pad).astype(np.int64))
    a_um, b_um = layer.a[idx], layer.b[idx]
    area = np.pi * a_um * b_um / det
    if ring is not None:
        perim = np.pi * (3 * (a_um + b_um) - np.sqrt((3 * a_um + b_um) * (a_um + 3 * b_um)))
        area = np.where(ring > 0, perim * layer.ring[idx] / det, area)
    vals = {k: layer.values[k][idx] for k in keys}
    fx_all = np.floor(cx)
    fy_all = np.floor(cy)
    flats, weights, owners, shading = [], [], [], []
    group = hx * 4096 + hy
    for gkey in np.unique(group):
        sel = np.flatnonzero(group == gkey)
        gx, gy = int(gkey // 4096), int(gkey % 4096)
        oy, ox = np.meshgrid(
            np.arange(-gy, gy + 1, dtype=np.float32), np.arange(-gx, gx + 1, dtype=np.float32), indexing="ij"
        )
        oy, ox = oy.ravel(), ox.ravel()
        ix = fx_all[sel, None].astype(np.float32) + ox[None, :]
        iy = fy_all[sel, None].astype(np.float32) + oy[None, :]
        dx = ix + np.float32(0.5) - cx[sel, None].astype(np.float32)
        dy = iy + np.float32(0.5) - cy[sel, None].astype(np.float32)
        d2 = dx * dx
        q = p00[sel, None] * d2
        d2 += dy * dy
        q += p11[sel, None] * (dy * dy) + (2 * p01[sel, None]) * (dx * dy)
        # signed distance to the boundary along the ray from the centre: |d| (1 - 1 / rho)
        with np.errstate(divide="ignore", invalid="ignore"):
            signed = np.sqrt(d2) - np.sqrt(d2 / q)
        signed[q < 1e-12] = -1e3
        if ring is not None:
            rg = ring[sel, None]
            signed = np.where(rg > 0, np.abs(signed) - rg / 2, signed)
        cov = np.clip(np.float32(0.5) - signed * np.float32(1 / edge_px), 0, 1)
        total = cov.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            fix = np.where(total > area[sel], area[sel] / total, 1.0).astype(np.float32)
        if layer.opacity is not None:
            fix *= layer.opacity[idx[sel]]
        cov *= fix[:, None]
        inb = (ix >= 0) & (ix < ww) & (iy >= 0) & (iy < hh) & (cov > 0)
        flats.append((iy[inb] * ww + ix[inb]).astype(np.int64))
        weights.append(cov[inb])
        owners.append(np.broadcast_to(sel[:, None], cov.shape)[inb])
        shading.append(1 - layer.profile * np.minimum(q[inb], 1) if layer.profile else None)
    flat = np.concatenate(flats)
    wts = np.concatenate(weights)
    own = np.concatenate(owners)
    out = {"w": np.bincount(flat, wts, npx)}
    if layer.profile:
        wts = wts * np.concatenate(shading)
    for k in keys:
        out[k] = np.bincount(flat, wts * vals[k][own], npx)
    return out


def _axis_weights(u: np.ndarray, n: int) -> sparse.csr_matrix:
    """Linear-interpolation matrix from ``n`` lattice nodes to positions ``u`` (lattice units, clamped)."""
    return _interp_matrix(np.asarray(u, np.float64), n)


class _Sampler:
    """Bilinear sampling of lattices at the pixels of a window: separable when the image is axis-aligned."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, axis_aligned: bool) -> None:
        self.X, self.Y = X, Y
        self.aligned = axis_aligned
        self.xs = X[0, :].astype(np.float64) if axis_aligned else None
        self.ys = Y[:, 0].astype(np.float64) if axis_aligned else None

    def lattice(self, values: np.ndarray, origin: float, step: float, scale: float = 1.0) -> np.ndarray:
        """Sample ``values`` (node ``k`` at ``origin + k * step`` µm) at the pixels, times ``scale``."""
        if self.aligned:
            ux = (self.xs - origin) / step
            uy = (self.ys - origin) / step
            ny, nx = values.shape
            j0 = int(np.clip(np.floor(ux.min()) - 1, 0, nx - 1))
            j1 = int(np.clip(np.ceil(ux.max()) + 2, j0 + 1, nx))
            i0 = int(np.clip(np.floor(uy.min()) - 1, 0, ny - 1))
            i1 = int(np.clip(np.ceil(uy.max()) + 2, i0 + 1, ny))
            win = values[i0:i1, j0:j1].astype(np.float32) * np.float32(scale)
            if win.shape[0] == 1:
                win = np.vstack([win, win])
            if win.shape[1] == 1:
                win = np.hstack([win, win])
            wy = _axis_weights(uy - i0, win.shape[0])
            wx = _axis_weights(ux - j0, win.shape[1])
            return np.ascontiguousarray((wx @ (wy @ win).T).T, dtype=np.float32)
        gx = (self.X - origin) / step
        gy = (self.Y - origin) / step
        ny, nx = values.shape
        j0 = int(np.clip(np.floor(gx.min()) - 1, 0, nx - 1))
        j1 = int(np.clip(np.ceil(gx.max()) + 2, 1, nx))
        i0 = int(np.clip(np.floor(gy.min()) - 1, 0, ny - 1))
        i1 = int(np.clip(np.ceil(gy.max()) + 2, 1, ny))
        win = values[i0:i1, j0:j1].astype(np.float32) * np.float32(scale)
        coords = np.stack([(gy - i0).ravel(), (gx - j0).ravel()])
        return ndimage.map_coordinates(win, coords, order=1, mode="nearest").reshape(self.X.shape)

    def grid(self, grid: np.ndarray, g: float) -> np.ndarray:
        """A uint8 label grid (cell ``(i, j)`` centred at ``((j + 0.5) g, (i + 0.5) g)``) as 0-1 values."""
        return self.lattice(grid, g / 2, g, 1 / 255)

    def field(self, f: _Field) -> np.ndarray:
        return self.lattice(f.values, f.origin, f.step)


def render(
    tissue: Tissue,
    kind: Literal["he", "dapi"],
    affine: np.ndarray,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    salt: int = 0,
) -> np.ndarray:
    """Render pixels ``rows`` x ``cols`` of an image whose pixel coordinates map to µm through ``affine``.

    Parameters
    ----------
    tissue
        The tissue.
    kind
        ``"he"``: RGB uint8 H&E (3, h, w); ``"dapi"``: uint16 DAPI (1, h, w).
    affine
        2 x 3 matrix from continuous pixel coordinates (x = column, y = row; pixel ``j`` covers ``[j, j + 1)``) to µm.
    rows, cols
        Half-open pixel ranges of the window.
    salt
        Mixed into the pixel noise (e.g. the pyramid level), so that levels do not share noise.

    Returns
    -------
    The pixels; they depend only on the tissue, the affine and the pixel indices, not on the window.

    """
    affine = np.asarray(affine, dtype=np.float64)[:2]
    full = np.vstack([affine, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2]
    r0, r1 = rows
    c0, c1 = cols
    hh, ww = r1 - r0, c1 - c0
    px_um = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))
    rr = np.arange(r0, r1, dtype=np.float64) + 0.5
    cc = np.arange(c0, c1, dtype=np.float64) + 0.5
    X = (affine[0, 0] * cc[None, :] + affine[0, 1] * rr[:, None] + affine[0, 2]).astype(np.float32)
    Y = (affine[1, 0] * cc[None, :] + affine[1, 1] * rr[:, None] + affine[1, 2]).astype(np.float32)
    corners_x = [X[0, 0], X[0, -1], X[-1, 0], X[-1, -1]]
    corners_y = [Y[0, 0], Y[0, -1], Y[-1, 0], Y[-1, -1]]
    bx0, bx1 = min(corners_x) - px_um, max(corners_x) + px_um
    by0, by1 = min(corners_y) - px_um, max(corners_y) + px_um
    w, h = tissue.width_um, tissue.height_um
    on_field = bx1 >= 0 and by1 >= 0 and bx0 <= w and by0 <= h
    g = tissue.grid_um
    # blur: optics (~0.35 µm) combined with the pixel footprint
    edge_px = float(np.sqrt(0.8**2 + (0.35 / px_um) ** 2))
    px_max = float(np.linalg.svd(affine[:, :2], compute_uv=False).max())
    margin = (2 * edge_px + 3) * px_max
    gr = (np.arange(r0, r1, dtype=np.int64)[:, None] * np.ones((1, ww), np.int64)).ravel()
    gc = (np.ones((hh, 1), np.int64) * np.arange(c0, c1, dtype=np.int64)[None, :]).ravel()
    noise1 = _hash_uniform(gr, gc, salt * 7919 + tissue.seed * 104729 + 1).reshape(hh, ww)
    noise2 = _hash_uniform(gr, gc, salt * 7919 + tissue.seed * 104729 + 2).reshape(hh, ww)
    del gr, gc
    inside = (X >= 0) & (X < w) & (Y >= 0) & (Y < h)
    sampler = _Sampler(X, Y, affine[0, 1] == 0 and affine[1, 0] == 0)
    if on_field:
        ta = sampler.grid(tissue.alpha, g) * inside
    else:
        ta = np.zeros((hh, ww), np.float32)
    layers = tissue.layers
    # detail finer than ~2 pixels cannot show: fade textures at coarse resolution
    tex_gain = float(np.clip((1.5 - px_um) / 1.0, 0.15, 1.0))
    # chromatin: clumps of ~0.7 µm, the same at every resolution and in every chunk
    chromatin = _value_noise(X, Y, 0.7, tissue.seed * 7 + 11) if px_um < 1.5 else np.full(X.shape, 0.5, np.float32)

    if kind == "dapi":
        img = np.float32(0.004) + ta * np.float32(0.010)
        if on_field:
            idx = layers["nuclei"].query(bx0, bx1, by0, by1, margin)
            acc = _splat(layers["nuclei"], idx, affine, inv, r0, c0, (hh, ww), edge_px, ("D", "T"))
            wsum = acc["w"].reshape(hh, ww)
            cov = np.minimum(wsum, 1)
            inv_w = 1 / np.maximum(wsum, 1e-6)
            tex = acc["T"].reshape(hh, ww) * inv_w * tex_gain
            nuc = acc["D"].reshape(hh, ww) * inv_w * (1 + 1.2 * tex * (chromatin - 0.5))
            img = img * (1 - cov) + cov * nuc
        counts = img * 65535
        counts = counts + np.sqrt(counts) * 1.2 * (noise2 - 0.5) * 3.4 + 40 * (noise1 - 0.5)
        return np.clip(counts, 0, 65535).astype(np.uint16)[None]

    # --- H&E: stain concentrations of the extracellular background, then cytoplasm, then nuclei on top ---
    if on_field:
        e_bg = sampler.grid(tissue.bg_e, g) * np.float32(255 / 200)
        fib = sampler.grid(tissue.fibre, g)
        f = tissue.fields
        # fibres: contour lines of a smooth field, ~7 µm apart on average, wavy and broken
        fibre = sampler.field(f["fibre"])
        warp = sampler.field(f["fibre_warp"])
        psi1 = 14.0 * fibre + 0.35 * warp
        psi2 = 23.0 * fibre - 0.5 * warp
        stripes = 0.6 * (0.5 + 0.5 * np.cos(psi1 * np.float32(2 * np.pi))) ** 4
        stripes += 0.4 * (0.5 + 0.5 * np.cos(psi2 * np.float32(2 * np.pi))) ** 6
        broken = np.clip(0.5 + 0.7 * sampler.field(f["fibre_break"]), 0, 1)
        fibre_gain = float(np.clip((7.0 / px_um - 2.0) / 2.0, 0.0, 1.0))
        texture = 0.22 + fibre_gain * (stripes * broken - 0.22)
        E = ta * e_bg * (1 + fib * (0.9 * texture - 0.2))
        H = ta * np.float32(0.05)
        R = np.zeros_like(E)
        idx = layers["cyto"].query(bx0, bx1, by0, by1, margin)
        acc = _splat(layers["cyto"], idx, affine, inv, r0, c0, (hh, ww), edge_px, ("E", "H"))
        wsum = acc["w"].reshape(hh, ww)
        cov = np.minimum(wsum, 1)
        inv_w = 1 / np.maximum(wsum, 1e-6)
        E = E * (1 - cov) + cov * acc["E"].reshape(hh, ww) * inv_w
        H = H * (1 - cov) + cov * acc["H"].reshape(hh, ww) * inv_w
        for name in ("nuclei", "extras"):
            idx = layers[name].query(bx0, bx1, by0, by1, margin)
            acc = _splat(layers[name], idx, affine, inv, r0, c0, (hh, ww), edge_px, ("H", "E", "R", "T"))
            wsum = acc["w"].reshape(hh, ww)
            cov = np.minimum(wsum, 1)
            inv_w = 1 / np.maximum(wsum, 1e-6)
            tex = acc["T"].reshape(hh, ww) * inv_w * tex_gain
            Hn = acc["H"].reshape(hh, ww) * inv_w * (1 + 1.4 * tex * (chromatin - 0.5))
            H = H * (1 - cov) + cov * Hn
            E = E * (1 - cov) + cov * acc["E"].reshape(hh, ww) * inv_w
            R = R * (1 - cov) + cov * acc["R"].reshape(hh, ww) * inv_w
        # slide-scale staining variation
        H *= 1 + 0.07 * sampler.field(f["stain_h"])
        E *= 1 + 0.07 * sampler.field(f["stain_e"])
    else:
        E = H = R = np.zeros((hh, ww), np.float32)
    out = np.empty((3, hh, ww), np.uint8)
    jitter = 1 + 0.03 * (noise2 - 0.5)
    for ch in range(3):
        od = _OD_GLASS + H * _OD_H[ch] + E * _OD_E[ch] + R * _OD_R[ch]
        out[ch] = np.clip(255 * np.exp(-od) * jitter, 0, 255).astype(np.uint8)
    return out
