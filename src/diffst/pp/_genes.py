"""Gene selection, per-gene normalisation and the gene co-expression matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from diffst._genes import resolve_genes

from ._inputs import CONTROL_PATTERN

GeneSelection = Literal["spatially_variable", "highly_expressed"]

#: A gene must be detected in at least this share of tissue LR pixels to be picked by top-N selection.
MIN_DETECTION = 0.05
#: Quantile of log1p counts used as each gene's robust scale.
NORM_QUANTILE = 0.99


def morans_i(values: np.ndarray, xy: np.ndarray, k: int = 6) -> np.ndarray:
    """Moran's I of each column of ``values`` ``(n, genes)`` on a ``k``-nearest-neighbour graph of ``xy``."""
    n = len(xy)
    if n < k + 2:
        return np.zeros(values.shape[1])
    _, idx = cKDTree(xy).query(xy, k=k + 1)
    rows = np.repeat(np.arange(n), k)
    w = sp.csr_matrix((np.ones(n * k), (rows, idx[:, 1:].ravel())), shape=(n, n))
    w = (w + w.T) * 0.5
    z = values - values.mean(axis=0, keepdims=True)
    num = np.einsum("ng,ng->g", z, w @ z)
    den = np.einsum("ng,ng->g", z, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        i = (n / w.sum()) * num / den
    return np.nan_to_num(i, nan=0.0)


def select_genes(
    genes: int | Sequence[str],
    *,
    names: list[str],
    lr_counts: np.ndarray,
    lr_density: np.ndarray,
    tissue: np.ndarray,
    xy_um: np.ndarray,
    criterion: GeneSelection,
) -> tuple[list[str], dict]:
    """Pick genes: a validated explicit list, or the top ``genes`` by ``criterion``.

    Parameters
    ----------
    genes
        An int (how many) or gene names.
    names
        All gene names of the measurement.
    lr_counts
        ``(all genes, n)`` LR counts of the tissue pixels.
    lr_density
        ``(all genes, n)`` LR counts per observed area of the same pixels (for spatial statistics).
    tissue
        Boolean ``(n,)`` restricting to tissue pixels (already applied when n is tissue-only).
    xy_um
        ``(n, 2)`` pixel centres.
    criterion
        ``"spatially_variable"``: Moran's I of log1p LR density on a 6-nearest-neighbour graph of tissue LR pixels,
        among genes detected in at least 5 % of tissue LR pixels. ``"highly_expressed"``: total counts.

    """
    if isinstance(genes, str):
        genes = [genes]
    if not isinstance(genes, int | np.integer):
        wanted = resolve_genes(
            list(genes),
            names,
            empty="or an int (how many genes to select)",
            unknown=lambda missing: f"{len(missing)} of the requested genes are not measured in this data:",
        )
        return wanted, {"method": "given"}

    n_wanted = int(genes)
    candidates = np.array([not CONTROL_PATTERN.match(n) for n in names])
    if n_wanted < 1:
        msg = f"`genes` must be a positive number of genes or a list of names; got {genes}."
        raise ValueError(msg)
    if n_wanted > candidates.sum():
        msg = f"`genes={n_wanted}` but the data measure only {int(candidates.sum())} genes (control probes excluded)."
        raise ValueError(msg)
    lr_counts = lr_counts[:, tissue]
    detected = (lr_counts > 0).mean(axis=1)
    eligible = candidates & (detected >= MIN_DETECTION)
    if eligible.sum() < n_wanted:  # too sparse: relax detection rather than fail
        eligible = candidates & (lr_counts.sum(axis=1) > 0)
    if criterion == "spatially_variable":
        score = np.full(len(names), -np.inf)
        idx = np.flatnonzero(eligible)
        score[idx] = morans_i(np.log1p(lr_density[idx][:, tissue].T), xy_um[tissue])
        desc = "Moran's I of log1p LR density on a 6-NN graph of tissue LR pixels; genes detected in ≥5% of them"
    elif criterion == "highly_expressed":
        score = np.where(eligible, lr_counts.sum(axis=1).astype(float), -np.inf)
        desc = "total counts over tissue; genes detected in ≥5% of tissue LR pixels"
    else:
        msg = f"`gene_selection` must be 'spatially_variable' or 'highly_expressed'; got {criterion!r}."
        raise ValueError(msg)
    order = np.argsort(-score, kind="stable")[:n_wanted]
    chosen = [names[i] for i in order if np.isfinite(score[i])]
    if len(chosen) < n_wanted:
        msg = f"Only {len(chosen)} genes have any counts on the tissue; asked for {n_wanted}."
        raise ValueError(msg)
    return chosen, {"method": criterion, "description": desc, "scores": [float(score[i]) for i in order]}


def robust_scale(values: np.ndarray, floor: float) -> np.ndarray:
    """Per-gene scale ``log1p(max(floor, quantile_0.99(values)))`` over pixels; ``values`` is ``(genes, n)``."""
    if values.shape[1] == 0:
        return np.full(values.shape[0], float(np.log1p(floor)))
    q = np.quantile(values, NORM_QUANTILE, axis=1)
    return np.log1p(np.maximum(q, floor))
