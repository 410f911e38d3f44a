"""Per-gene normalisation between counts and the model's units, and its inverse.

The model works on ``x = 2 · log1p(c) / s_g − 1`` where ``c`` is counts per HR pixel and ``s_g`` a robust per-gene
scale (the log1p of the 99th percentile of HR counts on training tissue, see :func:`dst.pp.prepare`), so zero counts
are −1 and typical expression lies in [−1, 1]. LR counts are first turned into counts per HR pixel by dividing by
the observed HR-pixel area of each LR pixel (``coverage · scale²``); unobserved LR pixels are −1 and masked.
"""

from __future__ import annotations

import numpy as np


def _per_gene(scale_g: np.ndarray, ndim: int) -> np.ndarray:
    """Shape the per-gene scale to broadcast over ``(genes, …)`` arrays, or ``(…, genes, H, W)`` when 4-D+."""
    trailing = 2 if ndim >= 4 else ndim - 1
    return np.asarray(scale_g, dtype=np.float32).reshape((-1,) + (1,) * trailing)


def to_model_units(counts: np.ndarray, scale_g: np.ndarray) -> np.ndarray:
    """Counts per HR pixel ``(genes, …)`` (or ``(batch, genes, H, W)``) → model units."""
    s = _per_gene(scale_g, np.ndim(counts))
    return (2.0 * np.log1p(np.clip(counts, 0, None)) / s - 1.0).astype(np.float32)


def to_counts(x: np.ndarray, scale_g: np.ndarray) -> np.ndarray:
    """Model units → expected counts per HR pixel (inverse of :func:`to_model_units`; negatives clip to 0)."""
    s = _per_gene(scale_g, np.ndim(x))
    return np.clip(np.expm1((np.asarray(x, dtype=np.float32) + 1.0) * 0.5 * s), 0.0, None)


def lr_per_hr_pixel(lr: np.ndarray, coverage: np.ndarray, scale: int) -> np.ndarray:
    """LR counts ``(genes, h, w)`` → counts per observed HR pixel (0 where nothing was observed)."""
    area = np.asarray(coverage, dtype=np.float32) * scale * scale
    return np.where(area > 0, lr / np.maximum(area, 1e-9), 0.0).astype(np.float32)


def lr_to_model_units(lr: np.ndarray, coverage: np.ndarray, scale: int, scale_g: np.ndarray) -> np.ndarray:
    """LR counts → model units per HR pixel; unobserved LR pixels are −1."""
    x = to_model_units(lr_per_hr_pixel(lr, coverage, scale), scale_g)
    return np.where(np.asarray(coverage)[None] > 0, x, -1.0).astype(np.float32)
