from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import spatialdata as sd
from spatialdata.models import Image2DModel, PointsModel
from spatialdata.transformations import Affine, Identity, Scale, get_transformation, set_transformation

import diffst as dst
from diffst._degradation import BinDegradation, SpotDegradation
from diffst._grid import Grid

from .toy import GENES, toy_visium, toy_xenium


def _affine(element, cs):
    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))


def _apply(m, x, y):
    v = m @ np.array([x, y, 1.0])
    return v[0], v[1]


def _marker(x_um: float, y_um: float, n: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"x": [x_um] * n, "y": [y_um] * n, "feature_name": ["MARK"] * n})


def _snapshot(sdata):
    return {
        k: sorted(getattr(sdata, k).keys()) for k in ("images", "labels", "points", "shapes", "tables")
    }, copy.deepcopy(dict(sdata.attrs))


# --- alignment -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["xenium", "cosmx_flipped"])
def test_transcript_lands_in_expected_pixel_and_maps_back_onto_image(layout):
    x_um, y_um = 123.4, 456.7
    sdata = toy_xenium(extra=_marker(x_um, y_um, n=3), he=True)
    px = 0.5
    if layout == "cosmx_flipped":
        # CosMx: image rows run against the transcripts' y axis
        height = sdata["morphology_focus"].sizes["y"]
        flip = Affine(
            np.array([[1 / px, 0, 0], [0, -1 / px, height], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
        )
        set_transformation(sdata["transcripts"], flip, "global")
    dst.pp.prepare(sdata, genes=["MARK", "G1"], tile_um=200, image_key="morphology_focus")
    attrs = sdata.attrs["diffst"]
    assert attrs["um_per_px"] == pytest.approx(px)
    hr = sdata["diffst_hr"].sel(c="MARK").values
    (row,), (col,) = np.nonzero(hr)
    assert hr[row, col] == 3

    # expected pixel from the µm frame: global coordinates times µm per pixel
    gx, gy = _apply(_affine(sdata["transcripts"], "global"), x_um, y_um)
    grid = Grid.from_dict(attrs["grid"])
    assert (row, col) == (int((gy * px - grid.origin_um[1]) // 10), int((gx * px - grid.origin_um[0]) // 10))

    # the HR pixel's footprint, through its own transformation, contains the transcript (in global pixels)
    m = _affine(sdata["diffst_hr"], "global")
    x0, y0 = _apply(m, col, row)
    x1, y1 = _apply(m, col + 1, row + 1)
    assert x0 <= gx < x1 and y0 <= gy < y1
    # ... and its centre falls on the image pixel under the transcript (within half an HR pixel), for both images
    cx, cy = _apply(m, col + 0.5, row + 0.5)
    for key in ("morphology_focus", "he_image"):
        inv = np.linalg.inv(_affine(sdata[key], "global"))
        img_under_tx = np.array(_apply(inv, gx, gy))
        img_under_centre = np.array(_apply(inv, cx, cy))
        half_hr_in_img_px = 0.5 * 10 / (px * np.sqrt(abs(np.linalg.det(_affine(sdata[key], "global")[:2, :2]))))
        assert np.all(np.abs(img_under_tx - img_under_centre) <= half_hr_in_img_px + 1e-9)
    # LR has the same origin: the LR pixel holding the HR pixel holds the counts
    lr = sdata["diffst_lr"].sel(c="MARK").values
    assert lr[row // 10, col // 10] == 3
    lm = _affine(sdata["diffst_lr"], "global")
    assert np.allclose(_apply(lm, col / 10, row / 10), _apply(m, col, row))


def test_visium_spot_lands_in_expected_lr_pixel_and_maps_back_onto_image():
    sdata = toy_visium()
    dst.pp.prepare(sdata, genes=GENES[:4], tile_um=200)
    attrs = sdata.attrs["diffst"]
    assert attrs["measurement"] == "spots"
    assert attrs["um_per_px"] == pytest.approx(0.5)  # 100 µm between array neighbours 200 px apart
    grid = Grid.from_dict(attrs["grid"])
    shapes = sdata["toy"]
    table = sdata["table"]
    spot = 17
    sx, sy = shapes.geometry.iloc[spot].x, shapes.geometry.iloc[spot].y  # full-res pixels
    row, col = (int((sy * 0.5 - grid.origin_um[1]) // 100), int((sx * 0.5 - grid.origin_um[0]) // 100))
    # every spot whose centre is in that pixel contributes its counts
    all_x = shapes.geometry.x.to_numpy() * 0.5
    all_y = shapes.geometry.y.to_numpy() * 0.5
    same = ((all_y - grid.origin_um[1]) // 100 == row) & ((all_x - grid.origin_um[0]) // 100 == col)
    expected = np.asarray(table[same.nonzero()[0], GENES[:4]].X.sum(axis=0)).ravel()
    assert np.array_equal(sdata["diffst_lr"].values[:, row, col], expected)
    cov = sdata["diffst_lr_mask"].values[0, row, col]
    assert cov == pytest.approx(same.sum() * np.pi * 27.5**2 / 100**2, rel=1e-5)
    m = _affine(sdata["diffst_lr"], "toy")
    x0, y0 = _apply(m, col, row)
    x1, y1 = _apply(m, col + 1, row + 1)
    assert x0 <= sx < x1 and y0 <= sy < y1


# --- exact degradation and conservation ----------------------------------------------------------------------


def test_lr_is_exactly_the_bin_degradation_of_hr_and_counts_are_conserved():
    sdata = toy_xenium(seed=3)
    dst.pp.prepare(sdata, genes=GENES, tile_um=200, scale=5)
    hr = sdata["diffst_hr"].values
    lr = sdata["diffst_lr"].values
    assert np.array_equal(BinDegradation(5).degrade(hr), lr)
    tx = sdata["transcripts"].compute()
    assert hr.sum() == len(tx)  # every transcript lies on the grid (it covers the image, which covers them)
    per_gene = tx["feature_name"].value_counts()
    assert [int(hr[i].sum()) for i in range(len(GENES))] == [int(per_gene[g]) for g in sdata["diffst_hr"].c.values]
    assert sdata.attrs["diffst"]["hr_um"] == 20.0


def test_lr_is_exactly_the_visium_degradation_of_hr():
    sdata = toy_xenium(seed=4)
    dst.pp.prepare(sdata, genes=4, tile_um=200, degradation="visium")
    attrs = sdata.attrs["diffst"]
    spots = sdata["diffst_spots"]
    centres = np.column_stack([spots.geometry.x, spots.geometry.y])
    assert attrs["degradation"]["spot_diameter_um"] == pytest.approx(55.0)
    # neighbouring spots of a row are 100 µm apart; rows 100·√3/2 µm apart
    d = np.sort(np.linalg.norm(centres[1:] - centres[0], axis=1))
    assert d[0] == pytest.approx(100.0)
    op = SpotDegradation(Grid.from_dict(attrs["grid"]), centres, 55.0)
    hr = sdata["diffst_hr"].values
    lr = sdata["diffst_lr"].values
    assert np.allclose(op.degrade(hr), lr, rtol=0, atol=1e-3)
    coverage = sdata["diffst_lr_mask"].values[0]
    # one 55 µm disc in a 100 µm pixel observes about 24 % of it; some pixels hold two spots
    inner = coverage[1:-1, 1:-1]
    assert np.all(np.isclose(inner, 0.2376, atol=0.002) | np.isclose(inner, 0.4752, atol=0.004))
    assert np.isclose(inner, 0.4752, atol=0.004).any()
    # captured counts are those inside the discs: a small share of all counts
    assert 0.15 < lr.sum() / hr.sum() < 0.35


# --- gene selection, normalisation, co-expression, tiles ------------------------------------------------------


def test_top_n_prefers_spatially_variable_genes_and_excludes_controls():
    rng = np.random.default_rng(0)
    n = 20_000
    structured = pd.DataFrame({"x": rng.uniform(0, 400, n), "y": rng.uniform(0, 800, n), "feature_name": "PATTERN"})
    noise = pd.DataFrame({"x": rng.uniform(0, 800, n), "y": rng.uniform(0, 800, n), "feature_name": "UNIFORM"})
    ctrl = pd.DataFrame(
        {"x": rng.uniform(0, 400, 3 * n), "y": rng.uniform(0, 800, 3 * n), "feature_name": "NegControlProbe_00042"}
    )
    sdata = toy_xenium(extra=pd.concat([structured, noise, ctrl]))
    dst.pp.prepare(sdata, genes=1, tile_um=200)
    assert sdata.attrs["diffst"]["genes"] == ["PATTERN"]
    dst.pp.prepare(sdata, genes=2, tile_um=200, gene_selection="highly_expressed", key_added="expr")
    assert "NegControlProbe_00042" not in sdata.attrs["expr"]["genes"]


def test_normalisation_coexpression_and_split_are_recorded():
    sdata = toy_xenium(seed=1, size_um=1200)
    dst.pp.prepare(sdata, genes=GENES, tile_um=200)
    attrs = sdata.attrs["diffst"]
    norm = attrs["normalisation"]
    hr = sdata["diffst_hr"].values
    assert len(norm["hr_scale"]) == len(GENES)
    assert all(s >= np.log1p(1.0) for s in norm["hr_scale"])
    coexpr = np.array(attrs["coexpression"]["matrix"])
    assert np.allclose(coexpr, coexpr.T)
    assert np.allclose(np.diag(coexpr), 1.0)
    # genes of the same toy cells co-occur more than genes of different cells
    assert coexpr.max() < 1.0 + 1e-12 and coexpr.min() >= 0
    tiles = sdata["diffst_tiles"]
    assert set(tiles["split"].unique()) == {"train", "val", "test"}
    assert attrs["split"]["train"] > attrs["split"]["val"] > 0
    # blocks of 2×2 tiles go whole to one split
    blocks = tiles.groupby([tiles["tile_row"] // 2, tiles["tile_col"] // 2])["split"].nunique()
    assert (blocks == 1).all()
    # tiles are squares of tile_um in µm, mapped to the image by Scale(1/um_per_px)
    assert np.allclose(tiles.geometry.area, 200.0**2)
    assert hr.shape[1] % 20 == 0


# --- storage ------------------------------------------------------------------------------------------------


def test_zarr_backed_writes_to_disk_and_keeps_existing(tmp_path):
    sdata = toy_xenium()
    path = tmp_path / "toy.zarr"
    sdata.write(path)
    backed = sd.read_zarr(path)
    dst.pp.prepare(backed, genes=3, tile_um=200)
    reread = sd.read_zarr(path)
    for name in ("diffst_lr", "diffst_hr", "diffst_lr_mask", "diffst_tissue", "diffst_tiles"):
        assert name in reread
    assert reread.attrs["diffst"]["genes"] == backed.attrs["diffst"]["genes"]
    assert np.array_equal(reread["diffst_hr"].values, backed["diffst_hr"].values)
    assert list(reread["diffst_hr"].c.values) == backed.attrs["diffst"]["genes"]
    assert np.allclose(_affine(reread["diffst_hr"], "global"), _affine(backed["diffst_hr"], "global"))
    with pytest.raises(ValueError, match="overwrite=True"):
        dst.pp.prepare(backed, genes=2, tile_um=200)
    assert sd.read_zarr(path).attrs["diffst"]["genes"] == backed.attrs["diffst"]["genes"]
    dst.pp.prepare(backed, genes=2, tile_um=200, overwrite=True)
    assert len(sd.read_zarr(path).attrs["diffst"]["genes"]) == 2
    assert sd.read_zarr(path)["diffst_hr"].sizes["c"] == 2


# --- bad input: clear error before any work, SpatialData unchanged --------------------------------------------


def _two_images():
    s = toy_xenium()
    s.images["other"] = Image2DModel.parse(
        np.zeros((1, 10, 10), dtype=np.uint8), dims=("c", "y", "x"), transformations={"global": Identity()}
    )
    return s


def _no_image():
    s = toy_xenium()
    del s["morphology_focus"]
    return s


def _far_image():
    s = toy_xenium()
    far = Affine(np.array([[1, 0, 1e6], [0, 1, 1e6], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y"))
    set_transformation(s["morphology_focus"], far, "global")
    return s


def _visium_with(values):
    s = toy_visium()
    x = s["table"].X.toarray()
    x[0, 0] = values
    s["table"].X = sp.csr_matrix(x)
    return s


def _controls_only():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.uniform(0, 500, 500), "y": rng.uniform(0, 500, 500), "feature_name": "BLANK_0001"})
    points = PointsModel.parse(
        df,
        coordinates={"x": "x", "y": "y"},
        feature_key="feature_name",
        transformations={"global": Scale([2.0, 2.0], axes=("x", "y"))},
    )
    s = toy_xenium()
    s.points["transcripts"] = points
    return s


def _nan_coordinates():
    return toy_xenium(extra=pd.DataFrame({"x": [np.nan], "y": [3.0], "feature_name": ["G1"]}))


BAD_INPUTS = [
    ("no image", _no_image, {}, ValueError, "no image"),
    ("several images", _two_images, {}, ValueError, "several images.*image_key"),
    ("unknown image key", toy_xenium, {"image_key": "morphology_fokus"}, KeyError, "morphology_focus"),
    ("unknown genes", toy_xenium, {"genes": ["G1", "G11x"]}, ValueError, "G11x.*Did you mean"),
    ("no overlap", _far_image, {}, ValueError, "do not overlap"),
    ("wrong coordinate system", toy_xenium, {"coordinate_system": "globl"}, ValueError, "globl.*Did you mean 'global'"),
    ("NaN counts", lambda: _visium_with(np.nan), {}, ValueError, "NaN"),
    ("negative counts", lambda: _visium_with(-2.0), {}, ValueError, "negative"),
    ("non-integer counts", lambda: _visium_with(2.5), {}, ValueError, "non-integer.*layer="),
    ("NaN coordinates", _nan_coordinates, {}, ValueError, "non-finite"),
    ("empty tissue", _controls_only, {}, ValueError, "No tissue"),
    ("tile larger than tissue", toy_xenium, {"tile_um": 1000}, ValueError, "larger than the tissue"),
    ("tile not a multiple of lr", toy_xenium, {"tile_um": 250}, ValueError, "multiple of `lr_um`"),
    ("too many genes", toy_xenium, {"genes": 50}, ValueError, "measure only 8 genes"),
    ("bad degradation", toy_xenium, {"degradation": "gauss"}, ValueError, "'bin' or 'visium'"),
]


@pytest.mark.parametrize(("what", "make", "kwargs", "error", "match"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_a_clear_error_and_leaves_sdata_unchanged(what, make, kwargs, error, match):
    sdata = make()
    before = _snapshot(sdata)
    args = {"genes": 3, "tile_um": 200} | kwargs
    with pytest.raises(error, match=match):
        dst.pp.prepare(sdata, **args)
    assert _snapshot(sdata) == before


def test_existing_key_without_overwrite_is_refused_and_nothing_changes():
    sdata = toy_xenium()
    dst.pp.prepare(sdata, genes=3, tile_um=200)
    before = _snapshot(sdata)
    hr_before = sdata["diffst_hr"].values.copy()
    with pytest.raises(ValueError, match="already exist.*overwrite=True"):
        dst.pp.prepare(sdata, genes=5, tile_um=200)
    assert _snapshot(sdata) == before
    assert np.array_equal(sdata["diffst_hr"].values, hr_before)


def test_failure_while_writing_rolls_back_in_memory_and_on_disk(tmp_path, monkeypatch):
    path = tmp_path / "toy.zarr"
    toy_xenium().write(path)
    sdata = sd.read_zarr(path)
    before = _snapshot(sdata)
    on_disk = sorted(sdata.elements_paths_on_disk())
    calls = []
    original = sd.SpatialData.write_element

    def flaky(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(sd.SpatialData, "write_element", flaky)
    with pytest.raises(OSError, match="disk full"):
        dst.pp.prepare(sdata, genes=3, tile_um=200)
    assert len(calls) == 3
    assert _snapshot(sdata) == before
    reread = sd.read_zarr(path)
    assert sorted(reread.elements_paths_on_disk()) == on_disk
    assert "diffst" not in reread.attrs


def test_default_tile_spans_four_spot_pitches():
    from diffst.pp._prepare import default_tile_um

    assert default_tile_um(100.0, None) == 400.0  # bins and transcripts: 400 µm
    assert default_tile_um(100.0, 100.0) == 400.0  # Visium: 100 µm lattice
    assert default_tile_um(100.0, 200.0) == 800.0  # the ST array: 200 µm grid
    assert default_tile_um(150.0, None) == 450.0  # rounded up to whole LR pixels
    assert default_tile_um(25.0, 25.0) == 400.0


def test_low_quality_transcripts_are_left_out_by_default_and_kept_on_request(log_lines):
    from spatialdata.models import PointsModel
    from spatialdata.transformations import get_transformation

    def with_qv():
        sdata = toy_xenium(size_um=400, n=20_000, seed=2)
        points = sdata.points["transcripts"]
        df = points.compute()
        df["qv"] = np.where(np.arange(len(df)) % 4 == 0, 10.0, 30.0).astype(np.float32)  # a quarter below 20
        sdata.points["transcripts"] = PointsModel.parse(
            df, coordinates={"x": "x", "y": "y"}, feature_key="feature_name",
            transformations=get_transformation(points, get_all=True),
        )  # fmt: skip
        return sdata

    kept, filtered = with_qv(), with_qv()
    dst.pp.prepare(kept, genes=3, lr_um=40, scale=4, tile_um=160, min_qv=None)
    dst.pp.prepare(filtered, genes=list(kept.attrs["diffst"]["genes"]), lr_um=40, scale=4, tile_um=160)
    total = float(np.asarray(kept["diffst_hr"].values).sum())
    assert float(np.asarray(filtered["diffst_hr"].values).sum()) == pytest.approx(0.75 * total, rel=0.02)
    assert any("quality filter: 5,000 of 20,000 transcripts have qv < 20" in line for line in log_lines)
