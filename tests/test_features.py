"""Image features once per slide (issue 14): the weight-free encoder, timm encoders, the feature element, the model."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import diffst as dst
from diffst._grid import Grid
from diffst._spatial import affine_to_cs, image_levels
from diffst.features import StainEncoder, make_encoder
from diffst.pp._image_features import fit_projection, project

from . import toy
from .toy import toy_xenium

# a haematoxylin-rich (purple-blue) square at x 300–340 µm, y 200–240 µm of the toy H&E (1 µm per pixel)
SQUARE = (slice(200, 240), slice(300, 340))
PURPLE = (70, 40, 150)


def _he_with_square():
    sdata = toy_xenium(he=True)
    el = sdata.images["he_image"]
    rgb = np.array(el.values)
    for ch, v in enumerate(PURPLE):
        rgb[ch][SQUARE] = v
    sdata.images["he_image"] = Image2DModel.parse(rgb, dims=("c", "y", "x"), c_coords=list(el.coords["c"].values),
                                                  transformations=get_transformation(el, get_all=True))  # fmt: skip
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160, image_key="he_image", min_tissue=0.0)
    return sdata


@pytest.fixture(scope="module")
def he_features():
    sdata = _he_with_square()
    dst.pp.image_features(sdata, encoder="stain", n_components=None)
    return sdata


def test_stain_encoder_features_and_their_meaning():
    enc = StainEncoder("rgb", hr_um=10.0)
    crop = np.full((1, 3, 40, 40), 0.95, dtype=np.float32)  # glass
    crop[0, :, :10, :10] = np.array(PURPLE, dtype=np.float32)[:, None, None] / 255  # one purple HR pixel
    f = enc.encode(crop, per_hr=10)
    assert f.shape == (1, 18, 4, 4) and enc.dim == 18
    h, e, dark = f[0, 0], f[0, 1], f[0, 2]
    assert h[0, 0] > 0.1 and h.ravel()[1:].max() < 0.01  # haematoxylin only where the purple pixel is
    assert dark[0, 0] > 0.6 and abs(dark[1, 1] - 0.05) < 1e-3
    assert e[0, 0] > e[2, 2]
    assert np.allclose(f[0, 3:5, 2:, 2:], 0.0, atol=1e-3)  # no texture inside a uniform area
    assert f[0, 5, 0, 0] > f[0, 5, 0, 2] == 0  # gradients at the purple pixel's edges only
    # the smoothed maps (σ = 1, 2, 4 HR pixels of haematoxylin, eosin, darkness, gradient) spread the pixel
    smooth_h = f[0, 6]
    assert smooth_h[0, 0] > smooth_h[0, 1] > smooth_h[0, 3] > 0
    fluo = StainEncoder("fluorescence", n_channels=2)
    g = fluo.encode(np.random.default_rng(0).random((2, 2, 20, 20), dtype=np.float32), per_hr=5)
    assert g.shape == (2, 12, 4, 4) and fluo.dim == 12


def test_make_encoder_spec_and_resolution():
    enc = make_encoder("stain", hr_um=10.0, um_per_px=3.0)
    assert enc.um_per_px == pytest.approx(10.0 / 3)  # a whole number of pixels per HR pixel
    with pytest.raises(ValueError, match="Unknown image encoder 'vit'.*'timm:<model name>'"):
        make_encoder("vit")
    with pytest.raises(ValueError, match="`um_per_px` must be positive"):
        make_encoder("stain", um_per_px=0)


def test_projection_standardises_and_reduces():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5000)) * np.arange(1, 7)[:, None] + 3.0
    x[5] = x[0] * 2 + 0.01 * rng.normal(size=5000)  # a redundant feature
    p = fit_projection(x, 3, rng)
    z = project(x.reshape(6, 50, 100).astype(np.float32), p)
    assert z.shape == (3, 50, 100)
    assert np.allclose(z.reshape(3, -1).mean(axis=1), 0.0, atol=1e-3)
    assert z.reshape(3, -1).var(axis=1)[0] > 1.9  # the redundant pair makes the first component
    full = project(x.reshape(6, 50, 100).astype(np.float32), fit_projection(x, None, rng))
    assert np.allclose(full.reshape(6, -1).std(axis=1), 1.0, atol=1e-3)


def _values(element) -> np.ndarray:
    return np.asarray(image_levels(element)[0].values)


def test_feature_element_is_aligned_with_the_hr_grid(he_features):
    sdata = he_features
    prep = sdata.attrs["diffst"]
    info = prep["image_features"]
    feats = _values(sdata.images[info["key"]])
    grid = Grid.from_dict(prep["grid"])
    assert feats.shape == (18, *grid.hr_shape)
    assert info["n_components"] == 18 and info["encoder"]["name"] == "stain"
    assert list(image_levels(sdata.images[info["key"]])[0].coords["c"].values[:2]) == ["feature_0", "feature_1"]
    # the square's HR pixels (10 µm) have the most haematoxylin; two pixels away it is background
    x0, y0 = grid.origin_um
    rows = slice(int(round((200 - y0) / 10)), int(round((240 - y0) / 10)))
    cols = slice(int(round((300 - x0) / 10)), int(round((340 - x0) / 10)))
    h = feats[0]
    ring = np.ones_like(h, dtype=bool)
    ring[rows.start - 2 : rows.stop + 2, cols.start - 2 : cols.stop + 2] = False
    assert h[rows, cols].min() > h[ring].max()
    # the element's transformation is the prepared HR grid's (the same as the LR element's, scale apart)
    feat_m = affine_to_cs(sdata.images[info["key"]], "global")
    lr_m = affine_to_cs(sdata.images[prep["elements"]["lr"]], "global")
    assert np.allclose(feat_m[:2, :2] * grid.scale, lr_m[:2, :2])
    assert np.allclose(feat_m[:2, 2], lr_m[:2, 2])


def test_features_are_deterministic(he_features):
    again = _he_with_square()
    dst.pp.image_features(again, encoder="stain", n_components=None)
    assert np.array_equal(_values(he_features.images["diffst_features"]), _values(again.images["diffst_features"]))


def test_image_features_refuses_bad_input_before_work():
    sdata = _he_with_square()
    dst.pp.image_features(sdata, encoder="stain", n_components=4)
    assert _values(sdata.images["diffst_features"]).shape[0] == 4
    with pytest.raises(ValueError, match="already exist.*overwrite=True"):
        dst.pp.image_features(sdata, encoder="stain")
    with pytest.raises(ValueError, match="`n_components` must be a positive integer"):
        dst.pp.image_features(sdata, encoder="stain", n_components=0, overwrite=True)
    with pytest.raises(KeyError, match="No prepared data under key 'nope'"):
        dst.pp.image_features(sdata, encoder="stain", prepared_key="nope")
    with pytest.raises(ValueError, match="Unknown image encoder"):
        dst.pp.image_features(sdata, encoder="hipt", overwrite=True)


# ------------------------------------------------------------------------------------------ the model on features

FAST = {**toy.FAST, "max_epochs": 1, "guard": False}


@pytest.fixture(scope="module")
def trained_stain_model(tmp_path_factory):
    sdata = _he_with_square()
    model = dst.tl.train(sdata, image_encoder="stain", checkpoint_dir=tmp_path_factory.mktemp("run"), **FAST)
    return sdata, model


def test_train_computes_features_and_the_model_conditions_on_them(trained_stain_model):
    sdata, model = trained_stain_model
    info = sdata.attrs["diffst"]["image_features"]
    assert model.config.image_encoder == "stain" and model.config.feature_channels == 18 == info["n_components"]
    rec = model.info["image_features"]
    assert rec["fingerprint"] == info["fingerprint"] and rec["um_per_px"] == info["um_per_px"] == 1.0
    assert type(model.net.image_encoder.tissue).__name__ == "FeatureTissueEncoder"
    # the saved model keeps the record
    again = dst.DiffST.load(model.path)
    assert again.info["image_features"]["projection_hash"] == rec["projection_hash"]
    dst.tl.super_resolve(sdata, model=model, n_samples=1, key_added="sr_feat")
    sr = _values(sdata.images["sr_feat"])
    assert np.isfinite(sr).all() and sr.shape[0] == 5


def test_window_carries_the_features_after_the_image(trained_stain_model):
    from diffst.tl._data import Prepared, TileSource

    sdata, model = trained_stain_model
    prep = Prepared.from_sdata(sdata, "diffst")
    src = TileSource.from_sdata(sdata, prep, features="diffst_features")
    cfg = model.config
    win = src.read(0, 0, cfg.lr_px, cfg.image_um, np.ones(len(prep.genes), dtype=np.float32))
    assert win["image"].shape == (3 + 18, cfg.image_px, cfg.image_px)
    feats = _values(sdata.images["diffst_features"])[:, : cfg.hr_px, : cfg.hr_px]
    per_hr = cfg.image_per_hr
    assert np.allclose(win["image"][3:, ::per_hr, ::per_hr], feats)  # each feature repeated over its HR pixel


def test_model_refuses_features_it_was_not_trained_on(trained_stain_model, log_lines, monkeypatch):
    sdata, model = trained_stain_model
    dst.pp.image_features(sdata, encoder="stain", um_per_px=2.0, overwrite=True)
    with pytest.raises(ValueError, match=r"not the ones this model was trained on: they were read at 2 µm/px.*1 µm/px"):
        dst.tl.super_resolve(sdata, model=model, n_samples=1, key_added="sr_bad")
    assert "sr_bad" not in sdata.images
    dst.pp.image_features(sdata, encoder="stain", n_components=8, overwrite=True)
    with pytest.raises(ValueError, match="standardisation/PCA was fitted on other data.*projection=model.info"):
        dst.tl.super_resolve(sdata, model=model, n_samples=1, key_added="sr_bad")
    # without features, the weight-free ones are computed with the model's projection, and then match
    del sdata.images["diffst_features"]
    del sdata.attrs["diffst"]["image_features"]
    monkeypatch.setattr(dst.settings, "verbosity", 1)
    dst.tl.super_resolve(sdata, model=model, n_samples=1, key_added="sr_again")
    assert any("computing the weight-free image features" in line for line in log_lines)
    assert sdata.attrs["diffst"]["image_features"]["projection"] == model.info["image_features"]["projection"]


@pytest.mark.slow
def test_features_are_reused_from_the_zarr_store(tmp_path, log_lines, monkeypatch):
    sdata = _he_with_square()
    sdata.write(tmp_path / "s.zarr")
    dst.pp.image_features(sdata, encoder="stain", n_components=6)
    back = sd.read_zarr(tmp_path / "s.zarr")
    assert back.attrs["diffst"]["image_features"]["n_components"] == 6
    assert np.array_equal(_values(back.images["diffst_features"]), _values(sdata.images["diffst_features"]))
    monkeypatch.setattr(dst.settings, "verbosity", 1)
    before = len(log_lines)
    model = dst.tl.train(back, image_encoder="stain", checkpoint_dir=tmp_path / "run", **FAST)
    assert model.config.feature_channels == 6
    assert any(line.startswith("training preset") for line in log_lines[before:])
    assert not any(line.startswith("image features:") for line in log_lines[before:])  # read, not recomputed


def test_image_encoder_arguments_are_checked():
    from diffst.model import DiffSTConfig

    with pytest.raises(ValueError, match="image_encoder='learned' has no feature channels"):
        DiffSTConfig.preset("tiny", image_encoder="stain")
    sdata = _he_with_square()
    with pytest.raises(ValueError, match="`image_encoder` must be 'learned', 'stain' or 'timm:<model name>'"):
        dst.tl.train(sdata, image_encoder="uni", **FAST)
    with pytest.raises(ValueError, match=r"may not override \['feature_channels'\].*image_encoder="):
        dst.tl.train(sdata, config={"feature_channels": 4}, **FAST)


def test_timm_token_grids_are_stitched_onto_the_hr_pixels():
    # The geometry of TimmEncoder.encode without timm: a stand-in network whose "tokens" are 8 × 8 pixel means of
    # 32-pixel inputs. A crop of 100 × 60 pixels is cut into 4 × 2 inputs (zero-padded), their token grids stitched
    # and averaged over HR pixels of 10 px (coarser than tokens) and of 4 px (finer), weighted by overlap.
    from diffst.features import TimmEncoder

    enc = TimmEncoder.__new__(TimmEncoder)
    enc.input_px, enc.batch_size, enc.dim = 32, 3, 3
    enc._tokens = lambda x: x.reshape(len(x), 3, 4, 8, 4, 8).mean(axis=(3, 5))
    crop = np.zeros((1, 3, 100, 60), dtype=np.float32)
    crop[0, :, 40:60, 20:40] = 1.0  # a bright square: rows 40–59, cols 20–39
    coarse = enc.encode(crop, per_hr=10)
    assert coarse.shape == (1, 3, 10, 6)
    # tokens 2–4 along columns hold 0.5, 1, 1 (the square covers half of token 2, pixels 16–23); rows 5–7: 1, 1, 0.5
    token = np.zeros(16, dtype=np.float32)
    token[[5, 6, 7]] = [1.0, 1.0, 0.5]
    col_token = np.zeros(8, dtype=np.float32)
    col_token[[2, 3, 4]] = [0.5, 1.0, 1.0]
    px_r, px_c = np.repeat(token, 8)[:100], np.repeat(col_token, 8)[:60]  # the token map, per pixel
    expected = np.outer(px_r.reshape(10, 10).mean(1), px_c.reshape(6, 10).mean(1))
    assert np.allclose(coarse[0, 0], expected, atol=1e-6)
    outside = coarse[0, 0].copy()
    outside[4:6, 2:4] = 0
    assert coarse[0, 0, 4:6, 2:4].min() > outside.max()  # the square lands on its HR pixels
    fine = enc.encode(crop, per_hr=4)
    assert fine.shape == (1, 3, 25, 15)
    assert np.allclose(fine[0, 0], np.outer(px_r.reshape(25, 4).mean(1), px_c.reshape(15, 4).mean(1)), atol=1e-6)


def test_weight_free_features_on_a_dapi_image():
    # toy_xenium: a one-channel DAPI image whose bright dots are the nuclei the transcripts cluster around
    sdata = toy_xenium()
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160)
    dst.pp.image_features(sdata, encoder="stain", n_components=None)
    info = sdata.attrs["diffst"]["image_features"]
    assert info["encoder"]["kind"] == "fluorescence" and info["n_components"] == 6  # 6 per channel
    feats = _values(sdata.images["diffst_features"])
    # the mean DAPI feature follows the nuclei, so it follows the transcripts (HR counts summed over genes)
    hr = np.asarray(sdata.images["diffst_hr"].values).sum(axis=0)
    assert np.corrcoef(feats[0].ravel(), hr.ravel())[0, 1] > 0.5


@pytest.mark.slow
def test_the_guard_runs_the_model_on_its_features(tmp_path):
    sdata = _he_with_square()
    model = dst.tl.train(sdata, image_encoder="stain", checkpoint_dir=tmp_path / "run", **{**FAST, "guard": True})
    table = model.guard.validation
    assert set(table) >= {"model", "guarded", "image_floor"} and np.isfinite(table["model"]["pcc"])
    assert len(model.guard.alpha) == len(model.genes)
