from __future__ import annotations

import copy
import functools

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
import torch
from spatialdata.transformations import get_transformation

import diffst as dst
from diffst._degradation import BinDegradation, degradation_for
from diffst._normalise import lr_to_model_units, to_model_units
from diffst._spatial import image_levels
from diffst.model import upsample_lr
from diffst.tl import _inference
from diffst.tl._data import Prepared

from .models import untrained
from .toy import FAST, toy_prepared, toy_visium, toy_xenium

pytestmark = pytest.mark.usefixtures("quiet")


def _prepared(seed=0, degradation="bin", he=False, **kw):
    return toy_prepared(seed, he=he, degradation=degradation, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    sdata = _prepared()
    model = dst.tl.train(sdata, max_epochs=2, checkpoint_dir=tmp_path_factory.mktemp("run"), **FAST)
    return sdata, model


def _mean(sdata, key="diffst_sr"):
    return np.asarray(image_levels(sdata.images[key])[0].values)


def _snapshot(sdata):
    return {
        k: sorted(getattr(sdata, k).keys()) for k in ("images", "labels", "points", "shapes", "tables")
    }, copy.deepcopy(dict(sdata.attrs))


# --- LR consistency -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_consistency_reproduces_lr_exactly_bin(trained):
    sdata, model = trained
    dst.tl.super_resolve(sdata, model=model, n_samples=2, block_lr=7)
    sr = _mean(sdata)
    lr = sdata["diffst_lr"].values
    assert sr.min() >= 0
    assert np.allclose(BinDegradation(4).degrade(sr), lr, rtol=1e-5, atol=1e-4)
    # and without it the map does not (the model is not exact by itself)
    dst.tl.super_resolve(sdata, model=model, consistency=False, key_added="raw")
    assert np.abs(BinDegradation(4).degrade(_mean(sdata, "raw")) - lr).max() > 0.5


@pytest.mark.slow
def test_consistency_reproduces_lr_exactly_visium_spots():
    sdata = _prepared(degradation="visium")
    prep = Prepared.from_sdata(sdata, "diffst")
    # chunks smaller than a spot disc + halo: footprints cross chunk borders and must still agree
    dst.tl.super_resolve(sdata, model=untrained(prep), block_lr=7, n_samples=2)
    sr = _mean(sdata)
    op = degradation_for(sdata, prep)
    lr = sdata["diffst_lr"].values
    assert sr.min() >= 0
    assert np.allclose(op.degrade(sr), lr, rtol=1e-5, atol=1e-4)


# --- tiling and seams ---------------------------------------------------------------------------------------


def _smooth_slide():
    rng = np.random.default_rng(0)
    n = 400_000
    x, y = rng.uniform(0, 1600, n), rng.uniform(0, 1600, n)
    keep = rng.random(n) < 0.5 + 0.45 * np.sin(x / 150) * np.cos(y / 200)
    sdata = toy_xenium(
        size_um=1600, n=20_000, extra=pd.DataFrame({"x": x[keep], "y": y[keep], "feature_name": "SMOOTH"})
    )
    dst.pp.prepare(sdata, genes=["SMOOTH", "G1"], lr_um=40, scale=4, tile_um=160)
    return sdata


def test_blended_tiles_leave_no_seams_on_a_smooth_field():
    """An untrained model returns bicubic up-sampling per window; blended windows must match one global bicubic."""
    sdata = _smooth_slide()
    prep = Prepared.from_sdata(sdata, "diffst")
    model = untrained(prep, base="bicubic")
    lr = sdata["diffst_lr"].values
    x_lr = torch.from_numpy(lr_to_model_units(lr, prep.coverage, 4, model.gene_scale))[None]
    mask = torch.from_numpy(np.clip(prep.coverage, 0, 1))[None, None]
    reference = upsample_lr(x_lr, mask, 4)[0, 0].numpy()
    interior = (slice(8, -8), slice(8, -8))  # away from the slide's own border

    def error(overlap):
        out = dst.tl.super_resolve(sdata, model=model, consistency=False, tile_overlap=overlap, inplace=False)
        x = to_model_units(out["mean"].values, model.gene_scale)[0]
        return np.abs(x - reference)[interior]

    seams = error(0.0)
    blended = error(0.25)
    # stated bound: with the default overlap no pixel deviates from the seamless map by more than 0.08 normalised
    # units (4 % of the [-1, 1] range of expression)
    assert blended.max() < 0.08
    assert seams.max() > 2 * blended.max()  # without overlap, tile borders show


# --- output element -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sr_element_is_aligned_named_and_multiscale(tmp_path):
    # one hot LR pixel: with consistency, all its SR counts stay inside it
    rng = np.random.default_rng(1)
    hot = pd.DataFrame({"x": rng.uniform(520, 560, 300), "y": rng.uniform(200, 240, 300), "feature_name": "HOT"})
    sdata = toy_xenium(size_um=1600, n=60_000, extra=hot)
    dst.pp.prepare(sdata, genes=["HOT", "G1", "G2"], lr_um=40, scale=4, tile_um=160)
    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    dst.tl.super_resolve(sdata, model=model, genes=["HOT", "G2"], n_samples=2)
    sr = sdata.images["diffst_sr"]
    levels = image_levels(sr)
    assert len(levels) >= 2  # a pyramid (160 × 160 HR pixels → at least one coarser level)
    assert list(levels[0].c.values) == ["HOT", "G2"]
    assert list(image_levels(sdata.images["diffst_sr_std"])[0].c.values) == ["HOT", "G2"]
    t_sr = get_transformation(levels[0], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    t_hr = get_transformation(sdata["diffst_hr"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    assert np.allclose(t_sr, t_hr)
    hot_map = levels[0].sel(c="HOT").values
    rows, cols = np.nonzero(hot_map > 1e-6)
    # the HR pixels holding HOT counts, mapped to the image (global pixels), lie on the transcripts' image pixels
    corners = t_sr @ np.array([[cols.min(), rows.min(), 1.0], [cols.max() + 1, rows.max() + 1, 1.0]]).T
    assert corners[0, 0] <= 520 / 0.5 and corners[0, 1] >= 560 / 0.5 - 1e-6
    assert corners[1, 0] <= 200 / 0.5 and corners[1, 1] >= 240 / 0.5 - 1e-6
    assert (cols.max() - cols.min() + 1) * 10 <= 80 and (rows.max() - rows.min() + 1) * 10 <= 80
    attrs = sdata.attrs["diffst_sr"]
    assert attrs["method"] == "diffst" and attrs["units"] == "counts" and attrs["n_samples"] == 2
    assert attrs["genes"] == ["HOT", "G2"]


@pytest.mark.slow
def test_n_samples_gives_mean_and_std_and_log1p_units(trained):
    sdata, model = trained
    out = dst.tl.super_resolve(sdata, model=model, n_samples=4, consistency=False, inplace=False)
    assert out["std"] is not None
    assert float(out["std"].values.max()) > 0
    one = dst.tl.super_resolve(sdata, model=model, n_samples=1, consistency=False, inplace=False)
    assert one["std"] is None
    logged = dst.tl.super_resolve(sdata, model=model, n_samples=4, consistency=False, inplace=False, units="log1p")
    # log1p units: mean of log1p(samples) ≤ log1p(mean of samples) (Jensen), equal where samples agree
    assert np.all(logged["mean"].values <= np.log1p(out["mean"].values) + 1e-5)


def test_progress_bar_counts_every_window_sampling(monkeypatch):
    sdata = _prepared()
    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    sampled = []
    original = _inference.InferencePipeline.window_maps

    def counting(self, group, *args):
        sampled.append(len(group))
        return original(self, group, *args)

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(_inference.InferencePipeline, "window_maps", counting)
    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    monkeypatch.setattr(_inference.log, "interactive", lambda: True)  # a terminal: the bar
    dst.settings.verbosity = 1
    # small chunks: windows near chunk borders are sampled once per chunk they reach, and the bar knows it
    dst.tl.super_resolve(sdata, model=model, block_lr=7)
    assert len(bars) == 1 and bars[0].total == bars[0].n == sum(sampled) > 0
    assert _inference._progress is None  # removed when done
    # quiet: no bar
    dst.settings.verbosity = 0
    dst.tl.super_resolve(sdata, model=model, block_lr=7, key_added="again")
    assert len(bars) == 1


def test_progress_in_a_log_file_is_plain_lines(monkeypatch, log_lines):
    sdata = _prepared()
    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    monkeypatch.setattr(_inference.log, "interactive", lambda: False)  # output to a file
    monkeypatch.setattr(dst.settings, "progress_every", 0.0)
    monkeypatch.setattr(dst.settings, "verbosity", 1)
    dst.tl.super_resolve(sdata, model=model, block_lr=7)
    lines = [line for line in log_lines if line.startswith("super-resolving: ")]
    counts = [tuple(int(v) for v in line.split()[1].split("/")) for line in lines]
    assert counts and counts[-1][0] == counts[-1][1] > 0  # the last line: all windows done
    assert [n for n, _ in counts] == sorted(n for n, _ in counts) and all("left" in line for line in lines)
    assert _inference._progress is None


@pytest.mark.slow
def test_same_seed_same_map_different_seed_different(trained):
    sdata, model = trained
    run = functools.partial(dst.tl.super_resolve, sdata, model=model, consistency=False, inplace=False, n_samples=2)
    a, a2, b, c = run(seed=3), run(seed=3), run(seed=3, block_lr=6), run(seed=4)
    assert np.array_equal(a["std"].values, a2["std"].values)
    # each window has its own seed, so chunking changes nothing but float rounding of differently sized batches
    assert np.allclose(a["mean"].values, b["mean"].values, rtol=0, atol=1e-5)
    # the std of two samples magnifies float rounding through the sampler steps; it must still agree closely
    assert np.corrcoef(a["std"].values.ravel(), b["std"].values.ravel())[0, 1] > 0.9999
    assert not np.allclose(a["std"].values, c["std"].values, rtol=0, atol=1e-3)
    # the refiner's map is its deterministic mean head: the seed changes the samples around it, not the map
    assert model.config.objective == "refiner"
    assert np.allclose(a["mean"].values, c["mean"].values, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_dask_distributed_cluster_gives_the_same_map(trained, cluster_env):
    distributed = pytest.importorskip("distributed")
    sdata, model = trained
    local = dst.tl.super_resolve(sdata, model=model, seed=7, inplace=False, block_lr=8)["mean"].values
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster),
    ):
        remote = dst.tl.super_resolve(sdata, model=model, seed=7, inplace=False, block_lr=8)["mean"].values
    assert np.allclose(local, remote, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_zarr_backed_result_is_written_to_disk(trained, tmp_path):
    sdata, model = trained
    path = tmp_path / "s.zarr"
    copy_ = sd.SpatialData(
        images={k: v for k, v in sdata.images.items() if not k.startswith("diffst_sr") and k != "raw"},
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes=dict(sdata.shapes),
        attrs=copy.deepcopy({k: v for k, v in sdata.attrs.items() if k == "diffst"}),
    )
    copy_.write(path)
    backed = sd.read_zarr(path)
    dst.tl.super_resolve(backed, model=model, n_samples=2)
    reread = sd.read_zarr(path)
    assert "diffst_sr" in reread and "diffst_sr_std" in reread
    assert np.allclose(_mean(reread), _mean(backed))
    assert reread.attrs["diffst_sr"]["model_path"] == str(model.path)
    assert not any(p.name.startswith(".diffst-tmp") for p in tmp_path.iterdir())  # scratch removed


# --- model resolution, raw data, transfer ----------------------------------------------------------------------


def test_recorded_model_is_used_when_none_is_given(trained):
    sdata, model = trained
    a = dst.tl.super_resolve(sdata, seed=1, inplace=False)["mean"].values
    b = dst.tl.super_resolve(sdata, model=model, seed=1, inplace=False)["mean"].values
    assert np.array_equal(a, b)


def test_without_any_model_it_prepares_and_trains_with_the_defaults(monkeypatch):
    import diffst.tl._train as train_module

    calls = {}
    sdata = dst.datasets.synthetic_xenium(size_um=1200, boundaries=False)
    del sdata["he_image"]  # one image, so nothing has to be asked

    def fake_train(sdata, key="diffst", **kwargs):
        calls["key"] = key
        return untrained(Prepared.from_sdata(sdata, key))

    monkeypatch.setattr(train_module, "train", fake_train)
    dst.tl.super_resolve(sdata)
    assert calls["key"] == "diffst"
    assert "diffst_sr" in sdata.images and "diffst_hr" in sdata.images


def test_inplace_false_leaves_a_raw_spatialdata_untouched(trained):
    sdata, model = trained
    raw = toy_xenium(size_um=800, n=60_000, seed=9)
    before = {kind: set(getattr(raw, kind)) for kind in ("images", "labels", "points", "shapes", "tables")}
    out = dst.tl.super_resolve(raw, model=model, inplace=False)  # it must prepare to run, but not in `raw`
    assert out["mean"].shape[0] == len(model.genes)
    assert {kind: set(getattr(raw, kind)) for kind in before} == before
    assert "diffst" not in raw.attrs
    inplace = toy_xenium(size_um=800, n=60_000, seed=9)
    dst.tl.super_resolve(inplace, model=model)
    assert np.allclose(_mean(inplace), out["mean"].values)


def test_raw_spatialdata_is_prepared_with_the_models_genes_and_units(trained):
    sdata, model = trained
    raw = toy_xenium(size_um=800, n=60_000, seed=9)
    dst.tl.super_resolve(raw, model=model)
    assert raw.attrs["diffst"]["genes"] == model.genes
    assert raw.attrs["diffst"]["hr_um"] == model.units.hr_um
    assert _mean(raw).shape[0] == len(model.genes)


@pytest.mark.slow
def test_transfer_to_a_visium_slide_with_only_spots():
    # train on transcripts degraded like Visium (spots), with an H&E image; apply to a spot-only Visium slide
    sdata = toy_xenium(size_um=1600, n=200_000, he=True)
    dst.pp.prepare(
        sdata, genes=["G0", "G1", "G2"], lr_um=100, scale=10, tile_um=400, degradation="visium", image_key="he_image"
    )
    model = untrained(Prepared.from_sdata(sdata, "diffst"))  # the transfer, not the weights, is under test
    visium = toy_visium()
    dst.tl.super_resolve(visium, model=model, n_samples=2)
    attrs = visium.attrs["diffst"]
    assert attrs["measurement"] == "spots" and attrs["genes"] == ["G0", "G1", "G2"]
    assert visium.attrs["diffst_sr"]["transferred"] is True
    sr = _mean(visium)
    op = degradation_for(visium, Prepared.from_sdata(visium, "diffst"))
    assert np.allclose(op.degrade(sr), visium["diffst_lr"].values, rtol=1e-5, atol=1e-3)


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_errors_leave_sdata_unchanged(trained, tmp_path):
    sdata, model = trained
    before = _snapshot(sdata)
    with pytest.raises(ValueError, match="(?s)does not know 1 of.*'G99'"):
        dst.tl.super_resolve(sdata, model=model, genes=[model.genes[0], "G99"], key_added="fresh")
    with pytest.raises(ValueError, match="n_samples"):
        dst.tl.super_resolve(sdata, model=model, n_samples=0, key_added="fresh")
    assert _snapshot(sdata) == before
    dst.tl.super_resolve(sdata, model=model, key_added="exists")
    before = _snapshot(sdata)
    with pytest.raises(ValueError, match="already exist.*overwrite=True"):
        dst.tl.super_resolve(sdata, model=model, key_added="exists")
    assert _snapshot(sdata) == before


def test_model_of_another_scale_or_image_type_is_refused(trained):
    _, model = trained
    other_scale = _prepared(lr_um=50, scale=5, tile_um=200)
    with pytest.raises(ValueError, match="scale 5.*scale 4"):
        dst.tl.super_resolve(other_scale, model=model)
    rgb = _prepared(he=True)
    with pytest.raises(ValueError, match="image is rgb.*fluorescence"):
        dst.tl.super_resolve(rgb, model=model)


def test_sdata_without_the_image_is_refused(trained):
    sdata, model = trained
    raw = toy_xenium(size_um=800, n=60_000)
    del raw["morphology_focus"]
    with pytest.raises(ValueError, match="no image"):
        dst.tl.super_resolve(raw, model=model)


def test_failure_midway_leaves_sdata_as_it_was(trained, monkeypatch):
    sdata, model = trained
    before = _snapshot(sdata)
    calls = []
    original = _inference.InferencePipeline.block

    def flaky(self, rows, cols):
        calls.append(rows)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(self, rows, cols)

    monkeypatch.setattr(_inference.InferencePipeline, "block", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        dst.tl.super_resolve(sdata, model=model, block_lr=5, key_added="midway")
    assert _snapshot(sdata) == before
