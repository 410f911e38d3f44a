"""Interpolation baselines (and TESLA when installed) write SR results that evaluate like Diff-ST's."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import diffst as dst
from diffst import metrics
from diffst._degradation import BinDegradation
from diffst._spatial import affine_to_cs, channel_names, image_levels
from diffst.tl._data import Prepared

from .toy import GENES, toy_xenium

TESLA_REASON = (
    "TESLA is optional: `pip install --no-deps teslaforst && pip install opencv-python-headless scanpy` "
    "(module TESLA, needs cv2)"
)


@pytest.fixture
def prepared():
    sdata = toy_xenium(seed=1, he=True)
    dst.pp.prepare(sdata, genes=GENES[:3], tile_um=200, scale=10, image_key="he_image")
    return sdata, Prepared.from_sdata(sdata, "diffst")


def _sr(sdata, key):
    return np.asarray(image_levels(sdata.images[key])[0].values)


def _replace_lr(sdata, values):
    el = sdata["diffst_lr"]
    sdata.images["diffst_lr"] = Image2DModel.parse(
        values.astype(np.float32),
        dims=("c", "y", "x"),
        c_coords=list(el.coords["c"].values),
        transformations=get_transformation(el, get_all=True),
    )


def test_bicubic_of_constant_lr_is_constant(prepared):
    sdata, prep = prepared
    s = prep.grid.scale
    _replace_lr(sdata, np.full(sdata["diffst_lr"].shape, 50.0))
    dst.tl.upsample(sdata)
    assert np.allclose(_sr(sdata, "bicubic_sr"), 50.0 / s**2, rtol=1e-4)


def test_bicubic_fills_between_spots_under_visium_degradation():
    sdata = toy_xenium(seed=2)
    dst.pp.prepare(sdata, genes=GENES[:2], tile_um=200, degradation="visium", spot_pitch_um=200)
    prep = Prepared.from_sdata(sdata, "diffst")
    s = prep.grid.scale
    # 3 counts per observed HR pixel everywhere a spot looked: the interpolation must not be pulled to 0 by the gaps
    lr = 3.0 * prep.coverage[None] * s * s * np.ones((2, 1, 1))
    _replace_lr(sdata, lr)
    dst.tl.upsample(sdata, method="bicubic")
    dst.tl.upsample(sdata, method="nearest")
    assert (prep.coverage == 0).any()
    assert np.allclose(_sr(sdata, "bicubic_sr"), 3.0, rtol=1e-4)
    assert np.allclose(_sr(sdata, "nearest_sr"), 3.0, rtol=1e-4)


def test_nearest_conserves_lr_counts_under_bin_degradation(prepared):
    sdata, prep = prepared
    dst.tl.upsample(sdata, method="nearest")
    sr = _sr(sdata, "nearest_sr")
    lr = sdata["diffst_lr"].values
    assert np.allclose(BinDegradation(prep.grid.scale).degrade(sr.astype(np.float64)), lr, rtol=1e-5, atol=1e-4)
    # blocks are flat: every HR pixel of an LR pixel holds the same counts
    s = prep.grid.scale
    assert np.allclose(sr[:, ::s, ::s], lr / s**2, rtol=1e-5)


def test_written_element_is_an_sr_result_that_evaluates(prepared):
    sdata, prep = prepared
    dst.tl.upsample(sdata, method="bicubic")
    el = image_levels(sdata.images["bicubic_sr"])[0]
    assert channel_names(el) == prep.genes
    assert el.shape[1:] == prep.grid.hr_shape
    cs = prep.coordinate_system
    assert np.allclose(affine_to_cs(el, cs), affine_to_cs(sdata["diffst_hr"], cs))
    attrs = sdata.attrs["bicubic_sr"]
    assert attrs["method"] == "bicubic" and attrs["units"] == "counts" and attrs["prepared_key"] == "diffst"
    df = dst.tl.evaluate(sdata, key="bicubic_sr")
    assert (df["method"] == "bicubic").all()
    assert np.isfinite(df.loc["mean", ["pcc", "rmse", "ssim", "lr_consistency"]].astype(float)).all()
    assert 0 < df.loc["mean", "lr_consistency"] < 1


def test_log1p_units_and_overwrite(prepared):
    sdata, _ = prepared
    dst.tl.upsample(sdata, method="nearest")
    counts = _sr(sdata, "nearest_sr")
    with pytest.raises(ValueError, match="already exist.*overwrite=True"):
        dst.tl.upsample(sdata, method="nearest")
    with pytest.raises(ValueError, match="already exist"):
        dst.tl.upsample(sdata, method="bicubic", key_added="nearest_sr")
    assert np.array_equal(_sr(sdata, "nearest_sr"), counts)  # untouched
    dst.tl.upsample(sdata, method="nearest", units="log1p", overwrite=True)
    assert sdata.attrs["nearest_sr"]["units"] == "log1p"
    assert np.allclose(_sr(sdata, "nearest_sr"), np.log1p(counts), atol=1e-6)
    with pytest.raises(ValueError, match="`method`"):
        dst.tl.upsample(sdata, method="lanczos")


def test_tesla_without_the_package_says_how_to_install(prepared, monkeypatch):
    sdata, _ = prepared
    monkeypatch.setitem(sys.modules, "TESLA", None)  # import TESLA now fails, installed or not
    monkeypatch.setitem(sys.modules, "TESLA.imputation", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps teslaforst"):
        dst.tl.tesla(sdata)
    assert "tesla_sr" not in sdata.images


def test_tesla_runs_on_the_test_tiles(prepared):
    pytest.importorskip("TESLA", reason=TESLA_REASON)
    sdata, prep = prepared
    dst.tl.tesla(sdata, margin_lr=1)
    dst.tl.tesla(sdata, key_added="tesla_flat", s=1e-6, margin_lr=1)  # colour off: nearly spatial IDW only
    dst.tl.upsample(sdata, method="bicubic")
    sr = _sr(sdata, "tesla_sr")
    assert channel_names(image_levels(sdata.images["tesla_sr"])[0]) == prep.genes
    t, s = prep.tile_lr, prep.grid.scale
    done = np.zeros(prep.grid.hr_shape, dtype=bool)
    for r, c in zip(prep.tiles(sdata, "test")["lr_row0"], prep.tiles(sdata, "test")["lr_col0"], strict=True):
        done[r * s : (r + t) * s, c * s : (c + t) * s] = True
    assert np.isfinite(sr[:, done]).all() and np.isnan(sr[:, ~done]).all()
    assert (sr[:, done] >= 0).all()
    # aligned with the LR data: without colour it is close to bicubic up-sampling
    flat, bicubic = _sr(sdata, "tesla_flat"), _sr(sdata, "bicubic_sr")
    assert all(metrics.pearson(flat[g][done], bicubic[g][done]) > 0.7 for g in range(len(prep.genes)))
    df = dst.tl.evaluate(sdata, key="tesla_sr")
    assert (df["method"] == "tesla").all()
    assert np.isfinite(df["lr_consistency"]).all()


@pytest.mark.parametrize("degradation", ["bin", "visium"])
def test_chunked_upsampling_equals_the_whole_grid_at_once(degradation):
    """Every method, chunk by chunk (each chunk with its LR context and whole spot discs), gives the map one
    computation over the whole grid gives: chunks of 30 HR pixels do not divide the LR pixels (10 HR) evenly."""
    from diffst.tl._baselines import Upsampler

    sdata = toy_xenium(seed=3, size_um=600)
    extra = {"spot_pitch_um": 200} if degradation == "visium" else {}
    dst.pp.prepare(sdata, genes=GENES[:3], tile_um=200, scale=10, degradation=degradation, **extra)
    prep = Prepared.from_sdata(sdata, "diffst")
    hh, ww = prep.grid.hr_shape
    for method in ("bicubic", "nearest", "image"):
        up = Upsampler.from_sdata(sdata, prep, method)
        whole = up.block((0, hh), (0, ww))
        chunked = np.asarray(up.slide(chunk_hr=30).compute(scheduler="synchronous"))
        assert chunked.shape == whole.shape == (3, hh, ww)
        assert whole.max() > 0
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6 * whole.max(), err_msg=method)
    # the floor keeps the LR counts exactly under the data's operator
    lr = np.asarray(sdata["diffst_lr"].values)
    obs = prep.coverage > 0
    degraded = dst.tl._baselines.degradation_for(sdata, prep).degrade(chunked.astype(np.float64))
    np.testing.assert_allclose(degraded[:, obs], lr[:, obs], rtol=1e-4)
