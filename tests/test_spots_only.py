"""Super-resolving a spot slide from that slide alone (supervision='lr'): the footprint, hidden spots, the loss,
leave-spots-out prediction, training, the guard on held-out spots and super_resolve."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch

import diffst as dst
from diffst._degradation import BinDegradation, SpotDegradation, degradation_for, hex_lattice
from diffst._grid import Grid
from diffst.model import weak
from diffst.model.diffusion import dihedral, undihedral
from diffst.tl import _train
from diffst.tl._data import Prepared

from .toy import toy_visium

pytestmark = pytest.mark.usefixtures("quiet")


def _spots(n_lr: int = 6, scale: int = 10):
    g = Grid((0.0, 0.0), 100.0, scale, (n_lr, n_lr))
    op = SpotDegradation(g, hex_lattice(g, 100.0), 55.0)
    foot, offset = op.footprint()
    as_batch = {"foot": torch.tensor(foot)[None, None], "offset": torch.tensor(offset, dtype=torch.float32)[None]}
    return g, op, as_batch


def test_footprint_reproduces_the_spot_degradation():
    g, op, b = _spots()
    hr = np.random.default_rng(0).poisson(1.0, (3, *g.hr_shape)).astype(np.float32)
    means, weight = weak.spot_means(torch.tensor(hr)[None], b["foot"], b["offset"], g.scale)
    area = torch.tensor(op.coverage())[None, None] * g.scale**2
    whole = weak.whole(weight, area)[0, 0].numpy()
    assert whole.sum() == (op.coverage() > 0).sum()  # the window is the whole grid: every spot is whole
    lr = op.degrade(hr)
    expected = lr / np.maximum(op.coverage() * g.scale**2, 1e-9)
    np.testing.assert_allclose(means[0].numpy()[:, whole], expected[:, whole], rtol=1e-5, atol=1e-6)
    # HR pixels outside every disc carry no weight; inside, the weight is the disc's area fraction
    assert 0 < float(b["foot"].sum()) < g.hr_shape[0] * g.hr_shape[1]
    assert float(b["foot"].max()) == pytest.approx(1.0)


def test_bin_footprint_is_sum_pooling():
    foot, offset = BinDegradation(4).footprint((8, 12))
    hr = torch.rand(1, 2, 8, 12)
    means, weight = weak.spot_means(hr, torch.tensor(foot)[None, None], torch.tensor(offset)[None].float(), 4)
    np.testing.assert_allclose(means[0].numpy(), torch.nn.functional.avg_pool2d(hr, 4)[0].numpy(), rtol=1e-6)
    assert torch.all(weight == 16)


def test_a_spot_cut_by_the_window_is_not_whole():
    g, op, b = _spots()
    area = torch.tensor(op.coverage())[None, None] * g.scale**2
    # the left half of the grid as a window: spots whose discs cross its right edge are not whole
    cut = {k: v[..., : g.hr_shape[1] // 2] for k, v in b.items()}
    _, weight = weak.spot_means(torch.ones(1, 1, g.hr_shape[0], g.hr_shape[1] // 2), cut["foot"], cut["offset"], 10)
    whole = weak.whole(weight, area[..., : g.lr_shape[1] // 2])
    full = weak.whole(weak.spot_means(torch.ones(1, 1, *g.hr_shape), b["foot"], b["offset"], 10)[1], area)
    assert whole.sum() < full[..., : g.lr_shape[1] // 2].sum()


def test_weak_loss_scores_only_hidden_spots():
    g, op, b = _spots()
    scale_g = torch.tensor([1.5, 2.0])
    hr = torch.tensor(np.random.default_rng(1).poisson(2.0, (2, *g.hr_shape)).astype(np.float32))[None]
    cov = torch.tensor(op.coverage())[None, None]
    area = cov * g.scale**2
    lr_counts = torch.tensor(op.degrade(hr[0].numpy()), dtype=torch.float32)[None]
    lr = weak.to_units(lr_counts / area.clamp_min(1e-9), scale_g)
    hidden = weak.hide(cov, 0.5, generator=torch.Generator().manual_seed(0))
    assert 0 < int(hidden.sum()) < int((cov > 0).sum())
    pred = weak.to_units(hr, scale_g)
    args = (b["foot"], b["offset"], area, scale_g, g.scale)
    assert float(weak.weak_loss(pred, lr, hidden, *args)) < 1e-8  # the truth reproduces the spots
    # changing the map inside a spot that is not hidden costs nothing; inside a hidden one it does
    key = weak.key_pixel(b["foot"], b["offset"], g.scale)[0]
    visible_px = (b["foot"][0, 0] > 0) & ~hidden.flatten()[key]
    hidden_px = (b["foot"][0, 0] > 0) & hidden.flatten()[key]
    assert float(weak.weak_loss(pred + 0.5 * visible_px, lr, hidden, *args)) < 1e-8
    assert float(weak.weak_loss(pred + 0.5 * hidden_px, lr, hidden, *args)) > 1e-3


def test_leave_out_predicts_every_pixel_with_its_own_spot_hidden():
    g, op, b = _spots()
    mask = torch.tensor(op.coverage() > 0, dtype=torch.float32)[None, None]
    lr = torch.zeros(1, 1, *g.lr_shape)
    group = torch.rand(1, 1, *g.lr_shape, generator=torch.Generator().manual_seed(3)) < 0.5

    def observed_there(lr_, mask_):  # each HR pixel: was the LR pixel it is scored in visible to this run?
        key = weak.key_pixel(b["foot"], b["offset"], g.scale)
        return (
            mask_.flatten(1)[:, None].expand(-1, 1, -1).gather(2, key.flatten(1)[:, None]).reshape(1, 1, *key.shape[1:])
        )

    out = weak.leave_out(observed_there, lr, mask, b["foot"], b["offset"], g.scale, group)
    assert torch.all(out == 0)
    # the same function without leaving out sees the measured spots
    assert observed_there(lr, mask).sum() > 0


def test_undihedral_inverts_dihedral():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for k in range(8):
        assert torch.equal(undihedral(dihedral(x, k), k), x)


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained_visium():
    before = dst.settings.verbosity
    dst.settings.verbosity = 0
    sdata = dst.datasets.synthetic_visium(n_genes=30, seed=0)
    dst.pp.prepare(sdata, genes=6, tile_um=400)
    model = dst.tl.train(sdata, preset="tiny", max_epochs=3, time_budget=None)
    dst.settings.verbosity = before
    return sdata, model


def test_spot_data_train_from_the_spots_alone(trained_visium):
    sdata, model = trained_visium
    prep = Prepared.from_sdata(sdata, "diffst")
    assert not prep.has_hr
    assert model.config.supervision == "lr" and model.config.objective == "regression"
    np.testing.assert_array_equal(model.gene_scale, prep.lr_scale)
    guard = model.guard
    assert guard.spots > 20 and guard.coverage_val is None
    assert set(guard.validation) == {"model", "guarded", "bicubic", "image_floor"}
    assert all(0.0 <= a <= 1.0 for a in guard.alpha)
    rows = [r for r in model.history if "val_pcc" in r]
    assert rows and {"val_pcc_floor", "val_pcc_bicubic", "val_pcc_nearest"} <= set(rows[-1])


@pytest.mark.slow
def test_spots_only_super_resolve_is_lr_consistent_with_a_std(trained_visium):
    sdata, model = trained_visium
    out = dst.tl.super_resolve(sdata, model=model, n_samples=2, inplace=False, seed=1)
    again = dst.tl.super_resolve(sdata, model=model, n_samples=2, inplace=False, seed=1)
    mean, std = np.asarray(out["mean"].values), np.asarray(out["std"].values)
    np.testing.assert_array_equal(mean, np.asarray(again["mean"].values))  # same seed, same map
    assert np.all(std >= 0) and std.mean() > 0
    prep = Prepared.from_sdata(sdata, "diffst")
    op = degradation_for(sdata, prep)
    lr = np.asarray(sdata[prep.elements["lr"]].values)
    # the guard blends with the LR-consistent floor, so the result stays exactly consistent with every spot
    np.testing.assert_allclose(op.degrade(mean.astype(np.float64)), lr, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_supervision_lr_never_reads_the_hr_truth():
    sdata = dst.datasets.synthetic_xenium(seed=0, boundaries=False)
    dst.pp.prepare(sdata, genes=5, degradation="visium", image_key="he_image", tile_um=400)
    prep = Prepared.from_sdata(sdata, "diffst")
    hr = sdata.images[prep.elements["hr"]]
    sdata.images[prep.elements["hr"]] = hr * np.nan  # any read of it would poison the weights
    model = dst.tl.train(sdata, preset="tiny", max_epochs=1, time_budget=None, supervision="lr", guard=False)
    assert all(torch.isfinite(p).all() for p in model.net.parameters())
    np.testing.assert_array_equal(model.gene_scale, prep.lr_scale)


@pytest.mark.slow
def test_implicit_training_on_spot_data_says_so(trained_visium, monkeypatch, log_lines):
    sdata, _ = trained_visium
    sdata = dst.tl._super_resolve._detached(sdata)
    del sdata.attrs["diffst"]["model"]
    monkeypatch.setattr(_train, "train", functools.partial(_train.train, preset="tiny", max_epochs=1, guard=False))
    monkeypatch.setattr(dst.settings, "verbosity", 1)
    dst.tl.super_resolve(sdata)
    assert any("learning from the spots alone" in line for line in log_lines)
    assert "diffst_sr" in sdata.images


def test_too_few_spots_and_hr_supervision_without_hr_are_refused():
    sdata = toy_visium(n_side=9)
    dst.pp.prepare(sdata, genes=4, tile_um=200, lr_um=100)
    with pytest.raises(ValueError, match=r"Only \d+ measured LR pixels .* needs at least 100"):
        dst.tl.train(sdata, preset="tiny", max_epochs=1)
    with pytest.raises(ValueError, match="no HR truth.*supervision='lr'"):
        dst.tl.train(sdata, preset="tiny", max_epochs=1, supervision="hr")
    with pytest.raises(ValueError, match="`supervision` must be"):
        dst.tl.train(sdata, supervision="weak")


def test_spots_the_image_does_not_cover_are_refused_or_reported(log_lines):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    sdata = toy_visium(n_side=12)
    key = "toy_full_image"
    full = sdata.images[key]
    for frac, fails in ((0.3, True), (0.8, False)):
        side = int(full.shape[-1] * frac)
        crop = full.values[:, :, :side]  # the left part of the slide only
        sdata.images[key] = Image2DModel.parse(crop, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                               transformations={"toy": Identity()})  # fmt: skip
        if fails:
            with pytest.raises(ValueError, match=r"spots \(\d+%\) lie outside the image.*does not cover the spots"):
                dst.pp.prepare(sdata, genes=4, tile_um=200, overwrite=True)
        else:
            dst.settings.verbosity = 1
            dst.pp.prepare(sdata, genes=4, tile_um=200, overwrite=True)
            assert any("lie outside the image" in line and "left out" in line for line in log_lines)


def test_spots_without_counts_are_refused():
    import scipy.sparse as sp

    sdata = toy_visium(n_side=12)
    table = sdata.tables["table"]
    table.X = sp.csr_matrix(table.X.shape, dtype=np.float32)
    with pytest.raises(ValueError, match="has any counts.*all zeros"):
        dst.pp.prepare(sdata, genes=4, tile_um=200)


def test_evaluate_spots_scores_held_out_spots_for_every_method(trained_visium):
    sdata, model = trained_visium
    df = dst.tl.evaluate_spots(sdata)
    assert list(df.index[:-1]) == list(model.genes) and df.index[-1] == "mean"
    assert set(df.columns.get_level_values("method")) == {"diffst", "bicubic", "nearest", "image_floor"}
    assert df.attrs["spots"] > 20
    pcc = df.xs("pcc", axis=1, level="metric")
    assert np.all(np.abs(pcc.loc["mean"].to_numpy()) <= 1)
    # the same spots and halves for every method: the mean row is the mean of the genes
    np.testing.assert_allclose(pcc.loc["mean"], pcc.iloc[:-1].mean(), rtol=1e-12)
    same = dst.tl.evaluate_spots(sdata, model=model, seed=0)
    pd.testing.assert_frame_equal(df, same)
    with pytest.raises(ValueError, match="`split` must be"):
        dst.tl.evaluate_spots(sdata, split="everything")
