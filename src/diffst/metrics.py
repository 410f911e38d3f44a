"""Metrics of super-resolved gene maps: per gene map, numpy in, number out.

Strict metrics (the headline, what ``dst.tl.evaluate`` reports first) compare a prediction with the truth on the
**normalised scale** ``x = 2 · log1p(counts) / s_g − 1`` that :func:`diffst.pp.prepare` stores per gene (zero counts are −1, typical
expression lies in [−1, 1]):

- :func:`pearson`: signed Pearson correlation;
- :func:`rmse`: root mean squared error;
- :func:`ssim`: structural similarity with a data range of 2 (the nominal span of the normalised scale);
- :func:`lr_consistency_error`: how far the map, degraded again with the data's own operator, is from the observed
  LR counts (in counts, not on the normalised scale).

Paper-compatible metrics (:func:`paper_pcc`, :func:`paper_rmse`) reproduce what the released Diff-ST code reported
(per patch and per gene: min-max scaling of both maps, absolute correlation, nonzero truth entries only) so numbers
can be set beside the paper's Table 1. They flatter every method and are never the headline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from diffst._degradation import BinDegradation, SpotDegradation

__all__ = [
    "lr_consistency_error",
    "minmax",
    "paper_pcc",
    "paper_rmse",
    "pearson",
    "rmse",
    "ssim",
    "ssim_window",
]


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape:
        msg = f"Prediction and truth must have the same shape; got {p.shape} and {t.shape}."
        raise ValueError(msg)
    return p, t


def pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    """Signed Pearson correlation of two maps over all their entries.

    Parameters
    ----------
    pred
        Predicted map (any shape; flattened).
    truth
        True map of the same shape.

    Returns
    -------
    ``r`` in [−1, 1]; NaN when either map is constant (the correlation is undefined) or has fewer than 2 entries.

    Examples
    --------
    >>> round(pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 7])), 4)
    0.9934

    """
    p, t = _pair(pred, truth)
    p, t = p.ravel(), t.ravel()
    if p.size < 2:
        return float("nan")
    dp, dt = p - p.mean(), t - t.mean()
    sp, st = np.sqrt((dp * dp).sum()), np.sqrt((dt * dt).sum())
    if sp == 0 or st == 0:
        return float("nan")
    return float(np.clip((dp * dt).sum() / (sp * st), -1.0, 1.0))


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error ``sqrt(mean((pred − truth)²))`` over all entries (NaN for empty maps)."""
    p, t = _pair(pred, truth)
    if p.size == 0:
        return float("nan")
    return float(np.sqrt(np.mean((p - t) ** 2)))


def ssim_window(shape: tuple[int, ...]) -> int | None:
    """SSIM window side for a map of ``shape``: ``min(7, largest odd number ≤ the smaller side)``.

    7 is scikit-image's default; tiles smaller than 7 pixels get the largest window that fits. Maps with a side
    below 3 have no window (``None``): SSIM is undefined there.
    """
    side = int(min(shape))
    if side < 3:
        return None
    return min(7, side if side % 2 else side - 1)


def ssim(pred: np.ndarray, truth: np.ndarray, data_range: float = 2.0) -> float:
    """Mean structural similarity of two 2-D maps (:func:`skimage.metrics.structural_similarity`).

    Uniform square windows of side :func:`ssim_window` (7, or the largest odd side that fits a small tile), the
    default constants ``K1 = 0.01``, ``K2 = 0.03`` and the sample covariance, averaged over the windows that lie
    inside the map.

    Parameters
    ----------
    pred
        Predicted 2-D map.
    truth
        True 2-D map of the same shape.
    data_range
        Span of the values, which sets the stabilising constants; 2 for the normalised scale (−1 to 1).

    Returns
    -------
    SSIM (1 for identical maps); NaN when the map has a side below 3 pixels.

    """
    from skimage.metrics import structural_similarity

    p, t = _pair(pred, truth)
    if p.ndim != 2:
        msg = f"SSIM takes 2-D maps; got shape {p.shape}."
        raise ValueError(msg)
    win = ssim_window(p.shape)
    if win is None:
        return float("nan")
    return float(structural_similarity(p, t, data_range=float(data_range), win_size=win))


def _consistency_terms(
    sr_counts: np.ndarray,
    lr_counts: np.ndarray,
    operator: BinDegradation | SpotDegradation,
    observed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per gene ``Σ|D(SR) − LR|`` and ``Σ LR`` over observed LR pixels (the parts of :func:`lr_consistency_error`)."""
    degraded = operator.degrade(np.asarray(sr_counts, dtype=np.float64))
    return _consistency_terms_degraded(degraded, lr_counts, observed)


def _consistency_terms_degraded(
    degraded: np.ndarray, lr_counts: np.ndarray, observed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_consistency_terms` of an SR map already degraded to ``(genes, h, w)``; sums add up over tiles."""
    degraded = np.asarray(degraded, dtype=np.float64)
    lr = np.asarray(lr_counts, dtype=np.float64)
    if degraded.shape != lr.shape:
        msg = f"The degraded SR map has shape {degraded.shape} but the LR counts have {lr.shape}."
        raise ValueError(msg)
    obs = np.ones(lr.shape[1:], dtype=bool) if observed is None else np.asarray(observed) > 0
    if obs.shape != lr.shape[1:]:
        msg = f"`observed` must have the LR map's shape {lr.shape[1:]}; got {obs.shape}."
        raise ValueError(msg)
    err = np.abs(degraded - lr)[:, obs].sum(axis=1)
    total = lr[:, obs].sum(axis=1)
    return err, total


def _ratio(err: np.ndarray, total: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total > 0, err / np.where(total > 0, total, 1.0), np.nan)
    return np.where((total <= 0) & (err == 0), 0.0, out)


def lr_consistency_error(
    sr_counts: np.ndarray,
    lr_counts: np.ndarray,
    operator: BinDegradation | SpotDegradation,
    observed: np.ndarray | None = None,
) -> float | np.ndarray:
    """Relative L1 distance between the re-degraded SR map and the observed LR counts.

    ``Σ_obs |D(SR) − LR| / Σ_obs LR``, the sums running over observed LR pixels, in counts, where ``D`` is the
    degradation operator that made the LR data (``diffst._degradation.degradation_for``). 0 means the SR map
    reproduces the measurement exactly; 1 means the error is as large as all observed counts.

    Parameters
    ----------
    sr_counts
        SR counts per HR pixel, ``(H, W)`` for one gene or ``(genes, H, W)``.
    lr_counts
        Observed LR counts, ``(h, w)`` or ``(genes, h, w)`` with ``(h, w)`` the operator's LR shape.
    operator
        The degradation operator (``BinDegradation`` or ``SpotDegradation``); it must map ``(H, W)`` onto ``(h, w)``.
    observed
        ``(h, w)`` observed fraction or mask of the LR pixels; pixels with a value > 0 count. Default: all.

    Returns
    -------
    A float for one gene, an array ``(genes,)`` for several. NaN when a gene has no observed LR counts but the SR
    map degrades to some (the relative error is undefined); 0 when both are zero.

    Examples
    --------
    >>> from diffst._degradation import BinDegradation
    >>> sr = np.array([[1.0, 1.0], [1.0, 3.0]])  # degrades to 6
    >>> float(lr_consistency_error(sr, np.array([[4.0]]), BinDegradation(2)))  # |6 − 4| / 4
    0.5

    """
    sr = np.asarray(sr_counts)
    single = sr.ndim == 2
    lr = np.asarray(lr_counts)
    if single:
        sr, lr = sr[None], lr[None]
    if sr.ndim != 3 or lr.ndim != 3 or sr.shape[0] != lr.shape[0]:
        msg = f"SR and LR must be (H, W) and (h, w), or (genes, H, W) and (genes, h, w); got {sr_counts.shape} and {np.shape(lr_counts)}."
        raise ValueError(msg)
    value = _ratio(*_consistency_terms(sr, lr, operator, observed))
    return float(value[0]) if single else value


def minmax(x: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1]; a constant map becomes all zeros."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _paper_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _pair(pred, truth)
    p, t = minmax(p).ravel(), minmax(t).ravel()
    keep = t != 0
    return p[keep], t[keep]


def paper_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Paper-compatible PCC, as the released Diff-ST code computed it — **not** a headline metric.

    For one gene in one patch: min-max scale prediction and truth each to [0, 1] within the patch
    (:func:`minmax`), keep the entries where the *scaled* truth is nonzero (the truth is above its patch
    minimum; on the normalised or log1p scale of a patch with any empty pixel, the pixels with counts) and return
    ``|r|`` of the kept entries.

    This flatters every method: ``|r|`` rewards anti-correlated maps, and dropping the truth's empty pixels hides
    expression predicted where there is none. Being invariant to min-max scaling, it gives the same value on the
    counts' log1p and normalised scales.

    Returns
    -------
    ``|r|`` in [0, 1]; NaN when fewer than 2 entries are kept or either kept map is constant.

    Examples
    --------
    >>> pred, truth = np.array([5.0, 3, 2, 1]), np.array([0.0, 1, 2, 3])
    >>> round(pearson(pred, truth), 4)
    -0.9827
    >>> paper_pcc(pred, truth)  # entry 0 dropped; the rest falls linearly: r = −1, reported as 1
    1.0

    """
    p, t = _paper_pair(pred, truth)
    r = pearson(p, t)
    return float(abs(r)) if np.isfinite(r) else float("nan")


def paper_rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Paper-compatible RMSE, as the released Diff-ST code computed it — **not** a headline metric.

    For one gene in one patch: min-max scale prediction and truth each to [0, 1] within the patch, keep the
    entries where the scaled truth is nonzero (see :func:`paper_pcc`) and return the RMSE of the kept entries. The
    scaling hides errors of level and range, and empty truth pixels are not scored.

    Returns
    -------
    RMSE on the [0, 1] scale; NaN when no entry is kept.

    """
    p, t = _paper_pair(pred, truth)
    return rmse(p, t)
