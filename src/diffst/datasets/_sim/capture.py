"""What an assay measures of the tissue's molecules.

Imaging (Xenium transcripts, controls, background) and sequencing-based capture (Visium spots, Visium HD bins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from ._common import _M, _rng
from .panel import _BACKGROUND_RATE, _CONTROL_RATE, _CONTROLS, GenePanel

if TYPE_CHECKING:
    from .tissue import Tissue


@dataclass
class Transcripts:
    """Molecules in µm. ``cell`` is the cell a molecule is assigned to (-1: none), ``source`` the cell it came from."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    feature: np.ndarray  # int16 index into feature_names
    cell: np.ndarray  # int32
    source: np.ndarray  # int32 (-1 for background and controls)
    overlaps_nucleus: np.ndarray  # uint8
    qv: np.ndarray  # float32
    feature_names: list[str]
    n_genes: int
    scale: float  # the factor that turns exp(log_expression) into expected molecules

    def __len__(self) -> int:
        return len(self.x)


def _expression_scale(tissue: Tissue, panel: GenePanel, transcripts_per_cell: float) -> float:
    """Global factor so that the mean expected molecules per cell is ``transcripts_per_cell``."""
    n = tissue.n_cells
    if n == 0:
        return 1.0
    idx = np.arange(0, n, max(1, n // 20000))
    total = np.exp(panel.log_expression(tissue, idx)).sum(axis=1).mean()
    return float(transcripts_per_cell / total)


def simulate_transcripts(
    tissue: Tissue,
    panel: GenePanel,
    *,
    transcripts_per_cell: float,
    seed: int,
    assay_noise: bool = True,
) -> Transcripts:
    """Draw the molecules of ``panel`` in the cells of ``tissue``.

    Counts are Poisson given the cell's expected expression. Molecules lie in the cell (a share in the nucleus, the
    rest concentrated towards it), ~6% spill outside and are assigned to the cell they land in (or to none), as a
    segmentation-based assay would. With ``assay_noise``, Xenium background molecules and control features are added.
    The cell molecules (positions, genes) do not depend on ``assay_noise``.
    """
    cells = tissue.cells
    n_cells = tissue.n_cells
    scale = _expression_scale(tissue, panel, transcripts_per_cell)
    rng = _rng(seed, "counts", panel.n_genes)
    cell_idx, gene_idx = [], []
    chunk = max(1, 2_000_000 // max(panel.n_genes, 1))
    for s in range(0, n_cells, chunk):
        sl = slice(s, min(n_cells, s + chunk))
        lam = np.exp(panel.log_expression(tissue, sl)) * scale
        counts = rng.poisson(lam)
        ci, gi = np.nonzero(counts)
        k = counts[ci, gi]
        cell_idx.append(np.repeat((ci + s).astype(np.int32), k))
        gene_idx.append(np.repeat(gi.astype(np.int16), k))
    src = np.concatenate(cell_idx) if cell_idx else np.zeros(0, np.int32)
    gene = np.concatenate(gene_idx) if gene_idx else np.zeros(0, np.int16)
    n = len(src)

    # positions: nucleus (uniform in the nucleus), cytoplasm (denser near the centre), or spilled outside the cell
    rng = _rng(seed, "positions", panel.n_genes)
    u = rng.random((5, n), dtype=np.float32)
    t = cells["type"][src].astype(np.int64)
    p_nuc = _M["p_nuc"][t].astype(np.float32)
    in_nuc = u[0] < p_nuc
    outside = ~in_nuc & (u[0] > 1 - 0.06)
    ang = u[1] * np.float32(2 * np.pi)
    rad = np.where(in_nuc, np.sqrt(u[2]) * 0.97, u[2] ** 0.7)
    rad = np.where(outside, 1 + rng.exponential(0.3, n).astype(np.float32), rad)
    a = np.where(in_nuc, cells["nuc_a"][src], cells["cell_a"][src])
    b = np.where(in_nuc, cells["nuc_b"][src], cells["cell_b"][src])
    phi = cells["angle"][src]
    cxs = np.where(in_nuc, cells["nuc_x"][src], cells["x"][src])
    cys = np.where(in_nuc, cells["nuc_y"][src], cells["y"][src])
    ex, ey = a * rad * np.cos(ang), b * rad * np.sin(ang)
    c, s_ = np.cos(phi), np.sin(phi)
    x = (cxs + ex * c - ey * s_).astype(np.float32)
    y = (cys + ex * s_ + ey * c).astype(np.float32)
    z = (cells["z"][src] + (u[3] - 0.5) * 3.0).astype(np.float32)
    del u, a, b, cxs, cys, ex, ey, c, s_, rad, ang
    # molecules spilled beyond the imaged field are not observed
    seen = (x >= 0) & (x < tissue.width_um) & (y >= 0) & (y < tissue.height_um)
    if not seen.all():
        x, y, z, src, gene, in_nuc, outside = (v[seen] for v in (x, y, z, src, gene, in_nuc, outside))
        n = len(x)
    feature_names = list(panel.names)
    if not assay_noise:
        return Transcripts(
            x=x,
            y=y,
            z=z,
            feature=gene,
            cell=src,
            source=src,
            overlaps_nucleus=np.zeros(n, np.uint8),
            qv=np.zeros(n, np.float32),
            feature_names=feature_names,
            n_genes=panel.n_genes,
            scale=scale,
        )

    # Xenium-like assay noise: ambient background molecules and control features, anywhere on the tissue
    rng = _rng(seed, "assay", panel.n_genes)
    freq = np.bincount(gene, minlength=panel.n_genes).astype(np.float64)
    freq = freq / freq.sum() if freq.sum() > 0 else np.full(panel.n_genes, 1 / max(panel.n_genes, 1))
    n_bg = rng.poisson(_BACKGROUND_RATE * n)
    bx, by = _uniform_on_tissue(rng, tissue, n_bg, 0.9)
    bgene = rng.choice(panel.n_genes, size=n_bg, p=freq).astype(np.int16) if panel.n_genes else np.zeros(0, np.int16)
    ctrl_x, ctrl_y, ctrl_f = [], [], []
    for prefix, rate in _CONTROL_RATE.items():
        names = [k for k in _CONTROLS if k.startswith(prefix)]
        m = rng.poisson(rate * n)
        px, py = _uniform_on_tissue(rng, tissue, m, 0.7)
        ctrl_x.append(px)
        ctrl_y.append(py)
        ctrl_f.append((panel.n_genes + _CONTROLS.index(names[0]) + rng.integers(0, len(names), m)).astype(np.int16))
    feature_names += _CONTROLS
    ex_x = np.concatenate([bx, *ctrl_x]).astype(np.float32)
    ex_y = np.concatenate([by, *ctrl_y]).astype(np.float32)
    ex_f = np.concatenate([bgene, *ctrl_f]).astype(np.int16)
    ex_z = rng.uniform(7.0, 17.0, len(ex_x)).astype(np.float32)

    x = np.concatenate([x, ex_x])
    y = np.concatenate([y, ex_y])
    z = np.concatenate([z, ex_z])
    feature = np.concatenate([gene, ex_f])
    source = np.concatenate([src, np.full(len(ex_x), -1, np.int32)])
    cell = source.copy()

    # molecules outside their cell, and extra molecules, go to the cell they fall in (or to none)
    reassign = np.concatenate([outside, np.ones(len(ex_x), bool)])
    ri = np.flatnonzero(reassign)
    if n_cells and len(ri):
        tree = cKDTree(np.column_stack([cells["x"], cells["y"]]))
        _, k = tree.query(np.column_stack([x[ri], y[ri]]), k=1)
        k = k.astype(np.int32)
        inside = _in_ellipse(
            x[ri], y[ri], cells["x"][k], cells["y"][k], cells["cell_a"][k], cells["cell_b"][k], cells["angle"][k]
        )
        cell[ri] = np.where(inside, k, -1)
    else:
        cell[ri] = -1
    assigned = cell >= 0
    ci = np.where(assigned, cell, 0)
    overlaps = assigned & _in_ellipse(
        x, y, cells["nuc_x"][ci], cells["nuc_y"][ci], cells["nuc_a"][ci], cells["nuc_b"][ci], cells["angle"][ci]
    )

    # quality values (phred-like, 0-40): decoded genes are mostly high, controls and background lower
    rng = _rng(seed, "qv", panel.n_genes)
    is_gene = np.concatenate([np.ones(n, bool), np.zeros(len(ex_x), bool)])
    qv = np.where(is_gene, 40 - rng.gamma(1.5, 4.0, len(x)), 40 - rng.gamma(2.0, 8.0, len(x)))
    qv = np.clip(qv, 0, 40).astype(np.float32)

    # write molecules field of view by field of view (250 µm), like the instrument
    nfx = int(math.ceil(tissue.width_um / 250)) + 1
    fov = (y // 250).astype(np.int32) * nfx + (x // 250).astype(np.int32)
    order = np.argsort(fov, kind="stable")
    return Transcripts(
        x=x[order],
        y=y[order],
        z=z[order],
        feature=feature[order],
        cell=cell[order],
        source=source[order],
        overlaps_nucleus=overlaps[order].astype(np.uint8),
        qv=qv[order],
        feature_names=feature_names,
        n_genes=panel.n_genes,
        scale=scale,
    )


def _in_ellipse(x, y, cx, cy, a, b, phi) -> np.ndarray:
    c, s = np.cos(phi), np.sin(phi)
    dx, dy = x - cx, y - cy
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return u * u + v * v <= 1.0


def _uniform_on_tissue(
    rng: np.random.Generator, tissue: Tissue, n: int, on_tissue: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniform points, a share ``on_tissue`` of them under tissue (when there is tissue)."""
    w, h = tissue.width_um, tissue.height_um
    n_on = rng.binomial(n, on_tissue) if tissue.tissue.any() else 0
    xs, ys = [rng.uniform(0, w, n - n_on)], [rng.uniform(0, h, n - n_on)]
    got = 0
    while got < n_on:
        m = int((n_on - got) * 1.5) + 16
        px, py = rng.uniform(0, w, m), rng.uniform(0, h, m)
        keep = tissue.lookup(tissue.tissue, px, py)
        px, py = px[keep][: n_on - got], py[keep][: n_on - got]
        xs.append(px)
        ys.append(py)
        got += len(px)
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------------------------------------------------
# Sequencing-based capture (Visium, Visium HD)
# --------------------------------------------------------------------------------------------------------------------
def _captured(
    tissue: Tissue, tx: Transcripts, *, efficiency: float, diffusion_um: float, ambient: float, seed: int, key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell molecules kept with probability ``efficiency``, displaced by lateral diffusion, plus ambient molecules."""
    rng = _rng(seed, "capture", key, tx.n_genes)
    genes = tx.feature < tx.n_genes
    keep = genes & (rng.random(len(tx)) < efficiency)
    x = tx.x[keep] + rng.normal(0, diffusion_um, keep.sum()).astype(np.float32)
    y = tx.y[keep] + rng.normal(0, diffusion_um, keep.sum()).astype(np.float32)
    g = tx.feature[keep]
    n_amb = rng.poisson(ambient * keep.sum())
    if n_amb and len(g):
        freq = np.bincount(g, minlength=tx.n_genes) / len(g)
        ax, ay = rng.uniform(0, tissue.width_um, n_amb), rng.uniform(0, tissue.height_um, n_amb)
        ag = rng.choice(tx.n_genes, size=n_amb, p=freq).astype(np.int16)
        x, y, g = np.concatenate([x, ax]), np.concatenate([y, ay]), np.concatenate([g, ag])
    return x.astype(np.float64), y.astype(np.float64), g


@dataclass
class SpotLattice:
    """Visium spots (55 µm discs on a 100 µm hexagonal lattice) in µm."""

    x: np.ndarray
    y: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    in_tissue: np.ndarray
    counts: sparse.csr_matrix  # spots x genes (all spots)
    diameter_um: float = 55.0
    pitch_um: float = 100.0


def spot_lattice(width: float, height: float, pitch: float = 100.0, diameter: float = 55.0):
    """Spot centres of a hexagonal lattice covering the field (rows ``pitch * sqrt(3)/2`` apart)."""
    dy = pitch * math.sqrt(3) / 2
    margin = diameter / 2 + 2
    n_rows = max(1, int((height - 2 * margin) // dy) + 1)
    rows, cols = [], []
    for r in range(n_rows):
        c0 = r % 2
        n_c = max(0, int((width - 2 * margin - c0 * pitch / 2) // pitch) + 1)
        cols.append(c0 + 2 * np.arange(n_c))
        rows.append(np.full(n_c, r))
    array_row = np.concatenate(rows)
    array_col = np.concatenate(cols)
    return margin + array_col * pitch / 2, margin + array_row * dy, array_row, array_col


def capture_spots(
    tissue: Tissue,
    tx: Transcripts,
    *,
    efficiency: float,
    diffusion_um: float = 2.0,
    ambient: float = 0.03,
    seed: int,
) -> SpotLattice:
    """Visium capture: molecules (after capture and diffusion) that fall in each spot's disc."""
    pitch, diameter = 100.0, 55.0
    sx, sy, arow, acol = spot_lattice(tissue.width_um, tissue.height_um, pitch, diameter)
    x, y, g = _captured(
        tissue, tx, efficiency=efficiency, diffusion_um=diffusion_um, ambient=ambient, seed=seed, key="visium"
    )
    dy = pitch * math.sqrt(3) / 2
    margin = diameter / 2 + 2
    n_rows = int(arow.max()) + 1 if len(arow) else 0
    # spot index by (row, col) for the two nearest rows of each molecule
    lut = -np.ones((n_rows + 2, int(acol.max()) + 3 if len(acol) else 1), dtype=np.int64)
    lut[arow, acol] = np.arange(len(arow))
    spot = -np.ones(len(x), dtype=np.int64)
    r_base = np.floor((y - margin) / dy).astype(np.int64)
    for dr in (0, 1):
        r = r_base + dr
        c = np.round((x - margin) / (pitch / 2)).astype(np.int64)
        c += (c - r) % 2 * np.where((x - margin) / (pitch / 2) > c, 1, -1)  # lattice parity: col and row agree
        ok = (r >= 0) & (r < n_rows) & (c >= 0) & (c < lut.shape[1])
        k = np.where(ok, lut[np.clip(r, 0, lut.shape[0] - 1), np.clip(c, 0, lut.shape[1] - 1)], -1)
        hit = (k >= 0) & (np.hypot(x - sx[np.maximum(k, 0)], y - sy[np.maximum(k, 0)]) <= diameter / 2)
        spot = np.where(hit, k, spot)
    m = spot >= 0
    counts = sparse.csr_matrix(
        (np.ones(m.sum(), np.float32), (spot[m], g[m].astype(np.int64))), shape=(len(sx), tx.n_genes)
    )
    counts.sum_duplicates()
    # a spot is under tissue when its disc overlaps the tissue mask
    g_um = tissue.grid_um
    off = np.arange(-diameter / 2, diameter / 2 + g_um, g_um)
    ox, oy = np.meshgrid(off, off)
    disc = ox**2 + oy**2 <= (diameter / 2) ** 2
    ox, oy = ox[disc], oy[disc]
    frac = tissue.lookup(tissue.tissue, sx[:, None] + ox[None, :], sy[:, None] + oy[None, :]).mean(axis=1)
    return SpotLattice(
        x=sx, y=sy, array_row=arow, array_col=acol, in_tissue=frac >= 0.05, counts=counts, diameter_um=diameter
    )


@dataclass
class BinGrid:
    """Visium HD square bins of one size (µm), row-major, with counts for every bin."""

    bin_um: int
    n_rows: int
    n_cols: int
    counts: sparse.csr_matrix  # (n_rows * n_cols) x genes
    in_tissue: np.ndarray  # (n_rows * n_cols,) bool


def capture_bins(
    tissue: Tissue,
    tx: Transcripts,
    bin_sizes: tuple[int, ...],
    *,
    efficiency: float,
    diffusion_um: float = 2.0,
    ambient: float = 0.03,
    seed: int,
) -> dict[int, BinGrid]:
    """Visium HD capture: molecules per 2 µm bin; larger bins are exact sums of their 2 µm bins."""
    x, y, g = _captured(
        tissue, tx, efficiency=efficiency, diffusion_um=diffusion_um, ambient=ambient, seed=seed, key="hd"
    )
    base = 2
    nr2, nc2 = int(tissue.height_um // base), int(tissue.width_um // base)
    ix, iy = np.floor(x / base).astype(np.int64), np.floor(y / base).astype(np.int64)
    ok = (ix >= 0) & (ix < nc2) & (iy >= 0) & (iy < nr2)
    ix, iy, g = ix[ok], iy[ok], g[ok].astype(np.int64)
    # tissue mask per 2 µm bin (the label grid is 2 µm, anchored at the same origin)
    t2 = tissue.tissue[:nr2, :nc2] if tissue.grid_um == base else _resample_mask(tissue, base, nr2, nc2)
    out = {}
    for b in bin_sizes:
        f = b // base
        nr, nc = nr2 // f, nc2 // f
        r, c = iy // f, ix // f
        ok = (r < nr) & (c < nc)
        counts = sparse.csr_matrix(
            (np.ones(ok.sum(), np.float32), (r[ok] * nc + c[ok], g[ok])), shape=(nr * nc, tx.n_genes)
        )
        counts.sum_duplicates()
        mask = t2[: nr * f, : nc * f].reshape(nr, f, nc, f).any(axis=(1, 3)).ravel()
        out[b] = BinGrid(bin_um=b, n_rows=nr, n_cols=nc, counts=counts, in_tissue=mask)
    return out


def _resample_mask(tissue: Tissue, size: float, nr: int, nc: int) -> np.ndarray:
    yy = (np.arange(nr) + 0.5) * size
    xx = (np.arange(nc) + 0.5) * size
    return tissue.lookup(tissue.tissue, xx[None, :], yy[:, None])
