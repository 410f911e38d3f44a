"""Co-expression intensity-based gene-correlation graph, CIGC-Graph (paper Section 2.3, Eq. 4)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor, nn

__all__ = ["CIGCGraph", "coexpression_intensity", "normalize_coexpression"]


def coexpression_intensity(counts: Any) -> np.ndarray:
    """Co-expression intensity matrix ``I`` of paper Eq. 4 from a genes x pixels count matrix.

    ``p(i|j)`` is the share of gene ``j``'s counts that lie in pixels where gene ``i`` is detected
    (count > 0)::

        p(i|j) = sum_p c_jp [c_ip > 0] / sum_p c_jp,      I_ij = (p(i|j) + p(j|i)) / 2

    so ``I`` is symmetric with entries in [0, 1] and ``I_ii = 1`` (a gene always co-occurs with itself;
    also set for genes without counts, whose off-diagonal entries are then ``p(j|i) / 2``, with
    ``p(i|j) = 0``). The released code used ratios of total counts, which do not measure co-occurrence.

    Parameters
    ----------
    counts
        ``(N, P)`` non-negative counts of ``N`` genes over ``P`` HR pixels (training pixels only),
        a numpy array, a scipy sparse matrix or a torch tensor.

    Returns
    -------
    ``(N, N)`` float64 matrix ``I``.

    """
    if isinstance(counts, Tensor):
        counts = counts.detach().cpu().numpy()
    is_sparse = sparse.issparse(counts)
    counts = sparse.csr_matrix(counts, dtype=np.float64) if is_sparse else np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        msg = f"counts must be a 2-D (genes, pixels) matrix, got shape {counts.shape}."
        raise ValueError(msg)
    values = counts.data if is_sparse else counts
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        msg = "counts must be finite and non-negative; pass raw counts (not normalised values)."
        raise ValueError(msg)
    detected = counts > 0
    joint = detected.astype(np.float64) @ counts.T
    joint = np.asarray(joint.todense()) if is_sparse else joint
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    # joint[i, j] = sum_p [c_ip > 0] c_jp  ->  p[i, j] = p(i|j)
    p = np.divide(joint, total[None, :], out=np.zeros_like(joint), where=total[None, :] > 0)
    intensity = 0.5 * (p + p.T)
    np.fill_diagonal(intensity, 1.0)
    return intensity


def normalize_coexpression(intensity: Tensor) -> Tensor:
    """Symmetric graph-convolution normalisation ``Î = D^-1/2 I D^-1/2`` with ``D_ii = sum_j I_ij``.

    ``I`` already carries self-loops (``I_ii = 1``), so this is Kipf & Welling's renormalised
    adjacency; it keeps ``Î`` symmetric with spectral radius 1, so stacking it does not blow up features.
    """
    inv_sqrt = intensity.sum(dim=1).clamp_min(1e-12).rsqrt()
    return inv_sqrt[:, None] * intensity * inv_sqrt[None, :]


class CIGCGraph(nn.Module):
    """CIGC-Graph: one graph-convolution layer over genes on features of the noisy HR maps (paper Eq. 4).

    Node features ``F_x`` (``N x C``): each gene's noisy map alone goes through a shared encoder
    (3x3 conv, strided conv, adaptive average pooling to ``grid x grid``) with ``k`` channels, so
    ``C = k * grid²`` (paper: 1 x 26 x 26 = 676). Then ``F_mid = SiLU(Î F_x W_g)`` with ``W_g`` ``C x C`` and
    ``F_out = α F_mid + (1 - α) F_x``. ``F_out`` is decoded per gene (3x3 conv to one channel on the grid,
    bilinear upsampling to the HR size): a ``(B, N, H, W)`` map of co-expression context for the denoiser.

    Parameters
    ----------
    n_genes
        Number of genes ``N``.
    grid, node_channels
        Node feature grid side and channels ``k``.
    alpha
        Graph balancing weight α.
    coexpr
        ``(N, N)`` co-expression intensity ``I`` (:func:`coexpression_intensity`), kept as the buffer
        ``coexpr`` so it is saved with the weights; ``None`` uses the identity (no sharing between genes).

    """

    def __init__(self, n_genes: int, grid: int, node_channels: int, alpha: float, coexpr: Tensor | None = None):
        super().__init__()
        self.grid, self.node_channels, self.alpha = grid, node_channels, alpha
        if coexpr is None:
            coexpr = torch.eye(n_genes)
        coexpr = torch.as_tensor(coexpr, dtype=torch.float32)
        if coexpr.shape != (n_genes, n_genes):
            msg = f"coexpr must be ({n_genes}, {n_genes}) for {n_genes} genes, got {tuple(coexpr.shape)}."
            raise ValueError(msg)
        if not torch.isfinite(coexpr).all() or (coexpr < 0).any() or not torch.allclose(coexpr, coexpr.T, atol=1e-5):
            msg = "coexpr must be a finite, non-negative, symmetric matrix (see coexpression_intensity)."
            raise ValueError(msg)
        self.register_buffer("coexpr", coexpr)
        hidden = max(8, node_channels)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, node_channels, 3, stride=2, padding=1),
        )
        dim = node_channels * grid * grid
        self.w_g = nn.Linear(dim, dim, bias=False)
        self.decoder = nn.Conv2d(node_channels, 1, 3, padding=1)

    def encode(self, x: Tensor) -> Tensor:
        """Node features ``F_x`` ``(B, N, C)`` of ``(B, N, H, W)`` gene maps."""
        b, n, h, w = x.shape
        f = F.adaptive_avg_pool2d(self.encoder(x.reshape(b * n, 1, h, w)), self.grid)
        return f.reshape(b, n, -1)

    def propagate(self, f_x: Tensor) -> Tensor:
        """``F_out = α SiLU(Î F_x W_g) + (1 - α) F_x`` for ``(B, N, C)`` node features."""
        f_mid = F.silu(self.w_g(torch.einsum("ij,bjc->bic", normalize_coexpression(self.coexpr), f_x)))
        return self.alpha * f_mid + (1 - self.alpha) * f_x

    def forward(self, x: Tensor) -> Tensor:
        """Co-expression context ``(B, N, H, W)`` for noisy gene maps ``x`` ``(B, N, H, W)``."""
        b, n, h, w = x.shape
        f_out = self.propagate(self.encode(x))
        f_out = f_out.reshape(b * n, self.node_channels, self.grid, self.grid)
        out = F.interpolate(self.decoder(f_out), size=(h, w), mode="bilinear", align_corners=False)
        return out.reshape(b, n, h, w)
