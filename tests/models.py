"""Models for tests: an untrained Diff-ST (whose output is exactly the mask-aware bicubic baseline)."""

from __future__ import annotations

from diffst.model import DiffSTConfig, DiffSTNet
from diffst.tl._data import Prepared
from diffst.tl._model import DiffST, ModelUnits, fingerprint


def untrained(prep: Prepared, **overrides) -> DiffST:
    """A ``tiny`` Diff-ST for ``prep``'s data, not trained: its zero-initialised output layer returns ``up(lr)``."""
    cfg = DiffSTConfig.preset(
        "tiny",
        n_genes=len(prep.genes),
        image_channels=len(prep.image.channels),
        hr_um=prep.grid.hr_um,
        scale=prep.grid.scale,
        tile_um=prep.record.tile_um,
        image_kind=prep.image.kind,
        **overrides,
    )
    return DiffST(
        config=cfg,
        net=DiffSTNet(cfg),
        genes=list(prep.genes),
        gene_scale=prep.hr_scale if prep.hr_scale is not None else prep.lr_scale,
        lr_scale=prep.lr_scale,
        units=ModelUnits.of(prep, cfg.image_um),
        info={"prepared_fingerprint": fingerprint(prep)},
    )
