"""Tissue mask, tiles over the tissue and a spatially blocked train/val/test split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from diffst._grid import Grid

SPLITS = ("train", "val", "test")


def tissue_from_counts(total: np.ndarray, observed: np.ndarray, *, spots: bool) -> np.ndarray:
    """Tissue mask on the LR grid.

    For transcripts and bins: LR pixels whose total count reaches 5 % of the 95th percentile of non-empty pixels
    (background transcripts and empty slide stay out). For spots: the observed pixels, closed over one-pixel gaps so
    that a sparse spot lattice (e.g. ST's 200 µm pitch on a 100 µm grid) gives one connected tissue region.
    """
    if spots:
        obs = observed > 0
        padded = np.pad(obs, 1)
        closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), dtype=bool))[1:-1, 1:-1]
        return obs | closed
    nonzero = total[total > 0]
    if nonzero.size == 0:
        return np.zeros_like(total, dtype=bool)
    threshold = max(1.0, 0.05 * float(np.quantile(nonzero, 0.95)))
    return total >= threshold


def make_tiles(
    grid: Grid,
    tissue_lr: np.ndarray,
    *,
    tile_lr: int,
    min_tissue: float,
    split: Sequence[float],
    block_tiles: int,
    seed: int,
) -> pd.DataFrame:
    """Non-overlapping tiles of ``tile_lr × tile_lr`` LR pixels over the tissue, with a spatially blocked split.

    Tiles are grouped into blocks of ``block_tiles × block_tiles`` tiles; whole blocks go to one split, so that
    neighbouring tiles (which share structures across their border) do not end up on both sides. Blocks are
    shuffled with ``seed`` and each goes to the split furthest below its target share of tiles.
    """
    h, w = grid.lr_shape
    nty, ntx = h // tile_lr, w // tile_lr
    frac = tissue_lr[: nty * tile_lr, : ntx * tile_lr].reshape(nty, tile_lr, ntx, tile_lr).mean(axis=(1, 3))
    tr, tc = np.nonzero(frac >= min_tissue)
    df = pd.DataFrame(
        {
            "tile_row": tr.astype(np.int64),
            "tile_col": tc.astype(np.int64),
            "lr_row0": (tr * tile_lr).astype(np.int64),
            "lr_col0": (tc * tile_lr).astype(np.int64),
            "tissue_fraction": frac[tr, tc].astype(np.float64),
        }
    )
    if df.empty:
        return df.assign(split=pd.Categorical([], categories=SPLITS))
    block = (df["tile_row"] // block_tiles).astype(str) + "_" + (df["tile_col"] // block_tiles).astype(str)
    blocks = block.unique()
    wanted = int(np.count_nonzero(np.asarray(split, dtype=float) > 0))
    if block_tiles > 1 and len(blocks) < wanted <= len(df):
        # a small crop: blocks of one tile, so that validation (and test) still get a region of their own
        return make_tiles(
            grid, tissue_lr, tile_lr=tile_lr, min_tissue=min_tissue, split=split, block_tiles=1, seed=seed
        )
    rng = np.random.default_rng(seed)
    rng.shuffle(blocks)
    target = np.asarray(split, dtype=float) / float(np.sum(split))
    sizes = block.value_counts()
    counts = np.zeros(3)
    assignment = {}
    n_total = len(df)
    for i, b in enumerate(blocks):
        if i < 3 and len(blocks) >= 3:
            # make sure every split with a non-zero share gets at least one block: test, val, then train
            choice = [2, 1, 0][i] if target[[2, 1, 0][i]] > 0 else int(np.argmax(target * n_total - counts))
        else:
            choice = int(np.argmax(target * n_total - counts))
        assignment[b] = SPLITS[choice]
        counts[choice] += sizes[b]
    df["split"] = pd.Categorical(block.map(assignment), categories=SPLITS)
    return df
