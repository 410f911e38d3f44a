"""Golden numbers of the user's map: ``super_resolve`` on small prepared slides with fixed, non-trivial weights.

Pinned before the inference code was gathered into one pipeline (``diffst.tl._inference``), so that any change of
the maps (mean and calibrated std, guard blend, flips, LR projection, leave-spots-out) shows up here. A change that
is meant to move the maps must say so and re-pin, with the accuracy change measured on the real benchmarks. The maps
are pinned in float32: ``precision="auto"`` is bfloat16 on CPUs that compute it natively, a change measured on its
own (``tests/test_validation_sections.py``, the benchmark page).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffst as dst
from diffst.tl._data import Prepared
from diffst.tl._model import Guard

from .models import untrained
from .toy import toy_visium, toy_xenium

pytestmark = pytest.mark.usefixtures("quiet")


def _model(prep, seed: int = 0, **overrides):
    """A ``tiny`` model with fixed weights: seeded initialisation, then every weight moved by a fixed random amount,
    so that the network's output is far from its zero-initialised output layer."""
    torch.manual_seed(seed)
    model = untrained(prep, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _digest(out: dict) -> list[float]:
    mean = np.asarray(out["mean"].values, dtype=np.float64)
    std = np.asarray(out["std"].values, dtype=np.float64)
    return [mean.sum(), np.square(mean).sum(), float(mean[1, 7, 9]), std.sum(), np.square(std).sum()]


def test_transcript_slide_maps_are_pinned():
    sdata = toy_xenium(size_um=320, n=8000, seed=1)
    dst.pp.prepare(sdata, genes=3, lr_um=40.0, scale=4, tile_um=160.0)
    prep = Prepared.from_sdata(sdata, "diffst")
    model = _model(prep)
    model.guard = Guard(alpha=[1.0, 0.5, 0.2], std_scale=[1.0, 1.5, 2.0], std_noise="poisson", validation={})
    out = dst.tl.super_resolve(sdata, model=model, n_samples=3, seed=3, inplace=False, precision="float32")
    np.testing.assert_allclose(_digest(out), [2963.000017, 15049.90531, 1.3066108, 2790.46767, 7444.017195], rtol=2e-5)


def test_spot_slide_maps_are_pinned():
    sdata = toy_visium(n_side=10, seed=2)
    dst.pp.prepare(sdata, genes=3, lr_um=100.0, scale=4)
    prep = Prepared.from_sdata(sdata, "diffst")
    model = _model(prep, seed=1, supervision="lr", objective="regression")
    out = dst.tl.super_resolve(sdata, model=model, n_samples=2, seed=5, inplace=False, precision="float32")
    np.testing.assert_allclose(_digest(out), [23749.52809, 133502.5464, 2.0625501, 4615.567601, 7209.096075], rtol=2e-5)


def test_validation_maps_are_pinned():
    from diffst.tl._guard import validation_maps

    sdata = toy_xenium(size_um=480, n=18000, seed=4)
    dst.pp.prepare(sdata, genes=3, lr_um=40.0, scale=4, tile_um=80.0)
    prep = Prepared.from_sdata(sdata, "diffst")
    model = _model(prep, seed=2)
    maps = validation_maps(sdata, prep, model, n_samples=2, seed=1)
    digest = [
        float(np.square(np.asarray(maps[k], dtype=np.float64)).sum()) for k in ("mean", "std", "floor", "bicubic")
    ]
    np.testing.assert_allclose(digest, [6874.331684, 143.2584319, 9122.964722, 3581.723258], rtol=2e-5)
    assert float(maps["truth"].sum()) == 1646.0
