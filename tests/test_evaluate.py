"""dst.tl.evaluate on toy data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

import diffst as dst
from diffst._normalise import to_model_units
from diffst.tl._data import Prepared
from diffst.tl._evaluate import evaluate
from diffst.tl._output import write_sr

from .toy import GENES, toy_visium, toy_xenium

COLUMNS = ["pcc", "rmse", "ssim", "lr_consistency", "paper_pcc", "paper_rmse", "n_tiles", "n_tiles_pcc", "method"]


@pytest.fixture
def prepared():
    sdata = toy_xenium(seed=1, size_um=1200)
    dst.pp.prepare(sdata, genes=GENES[:4], tile_um=200, scale=10)
    return sdata, Prepared.from_sdata(sdata, "diffst")


def _write(sdata, prep, data, key="sr", units="counts", method="test"):
    write_sr(
        sdata, prep, key_added=key, mean=data, std=None, genes=list(prep.genes), units=units, method=method,
        params={}, overwrite=True,
    )  # fmt: skip


def _test_windows(sdata, prep, split="test"):
    t, s = prep.tile_lr, prep.grid.scale
    tiles = prep.tiles(sdata, split)
    return [(r * s, c * s, (r + t) * s, (c + t) * s) for r, c in zip(tiles["lr_row0"], tiles["lr_col0"], strict=True)]


def test_truth_scores_perfectly(prepared):
    sdata, prep = prepared
    hr = sdata["diffst_hr"].values
    _write(sdata, prep, hr, method="oracle")
    df = evaluate(sdata, key="sr")
    assert list(df.columns) == COLUMNS
    assert list(df.index) == [*prep.genes, "mean"]
    assert df.index.name == "gene"
    n_test = int((sdata["diffst_tiles"]["split"] == "test").sum())
    assert (df["n_tiles"] == n_test).all()
    assert np.allclose(df["pcc"], 1.0)
    assert np.allclose(df["rmse"], 0.0)
    assert np.allclose(df["ssim"], 1.0)
    assert np.allclose(df["lr_consistency"], 0.0)
    assert np.allclose(df["paper_pcc"], 1.0) and np.allclose(df["paper_rmse"], 0.0)
    assert (df["method"] == "oracle").all()
    assert df.attrs["method"] == "oracle" and df.attrs["split"] == "test" and df.attrs["truth"] == "diffst_hr"


def test_log1p_units_give_the_same_scores(prepared):
    sdata, prep = prepared
    hr = sdata["diffst_hr"].values
    noisy = hr + np.random.default_rng(0).poisson(1.0, hr.shape)
    _write(sdata, prep, noisy, key="a")
    _write(sdata, prep, np.log1p(noisy), key="b", units="log1p")
    a, b = evaluate(sdata, key="a"), evaluate(sdata, key="b")
    num = a.columns.drop("method")
    assert np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-4, atol=1e-5)


def test_noisy_sr_matches_numpy(prepared):
    sdata, prep = prepared
    hr = sdata["diffst_hr"].values.astype(np.float64)
    sr = np.clip(hr + np.random.default_rng(1).normal(0, 1.0, hr.shape), 0, None).astype(np.float32)
    _write(sdata, prep, sr)
    genes = [prep.genes[2], prep.genes[0]]
    df = evaluate(sdata, key="sr", genes=genes, split="val")
    assert list(df.index) == [*genes, "mean"]

    idx = [prep.genes.index(g) for g in genes]
    scale_g = prep.hr_scale[idx]
    x_sr, x_hr = to_model_units(sr[idx], scale_g), to_model_units(hr[idx], scale_g)
    windows = _test_windows(sdata, prep, "val")
    lr = sdata["diffst_lr"].values[idx]
    s = prep.grid.scale
    for k, g in enumerate(genes):
        tiles = [(x_sr[k, r0:r1, c0:c1], x_hr[k, r0:r1, c0:c1]) for r0, c0, r1, c1 in windows]
        pcc = np.mean([np.corrcoef(p.ravel(), q.ravel())[0, 1] for p, q in tiles])
        rmse = np.mean([np.sqrt(np.mean((p - q) ** 2)) for p, q in tiles])
        ssim = np.mean([structural_similarity(p, q, data_range=2.0, win_size=7) for p, q in tiles])
        err = total = 0.0
        for r0, c0, r1, c1 in windows:
            block = sr[idx[k], r0:r1, c0:c1].astype(np.float64)
            binned = block.reshape((r1 - r0) // s, s, (c1 - c0) // s, s).sum(axis=(1, 3))
            observed = lr[k, r0 // s : r1 // s, c0 // s : c1 // s]
            err += np.abs(binned - observed).sum()
            total += observed.sum()
        assert df.loc[g, "pcc"] == pytest.approx(pcc, abs=1e-5)
        assert df.loc[g, "rmse"] == pytest.approx(rmse, abs=1e-5)
        assert df.loc[g, "ssim"] == pytest.approx(ssim, abs=1e-5)
        assert df.loc[g, "lr_consistency"] == pytest.approx(err / total, rel=1e-5)
    assert df.loc["mean", "pcc"] == pytest.approx(df.loc[genes, "pcc"].mean())
    assert 0.2 < df.loc["mean", "pcc"] < 1.0


def test_spatially_permuted_sr_has_no_correlation(prepared):
    sdata, prep = prepared
    hr = sdata["diffst_hr"].values
    g, h, w = hr.shape
    perm = np.random.default_rng(2).permutation(h * w)
    _write(sdata, prep, hr.reshape(g, -1)[:, perm].reshape(g, h, w))
    df = evaluate(sdata, key="sr", split="train")
    assert np.all(np.abs(df["pcc"]) < 0.1)
    assert np.all(df["rmse"] > 0.1)


def test_truth_key_and_constant_prediction(prepared):
    sdata, prep = prepared
    hr = sdata["diffst_hr"].values
    _write(sdata, prep, np.zeros_like(hr), key="zeros")
    _write(sdata, prep, hr, key="copy")
    df = evaluate(sdata, key="zeros")
    assert np.allclose(df["pcc"], 0.0)  # a constant map on a varying truth counts as r = 0, not as a skipped tile
    assert (df["n_tiles_pcc"] == df["n_tiles"]).all()
    assert np.allclose(df["lr_consistency"], 1.0)  # nothing of the observed counts is reproduced
    # any image on the HR grid can be the truth
    df = evaluate(sdata, key="zeros", truth_key="zeros")
    assert np.allclose(df["rmse"], 0.0)
    assert df.attrs["truth"] == "zeros"


def test_visium_degradation_consistency_uses_the_spot_operator():
    sdata = toy_xenium(seed=4)
    dst.pp.prepare(sdata, genes=3, tile_um=200, degradation="visium")
    prep = Prepared.from_sdata(sdata, "diffst")
    hr = sdata["diffst_hr"].values
    _write(sdata, prep, hr, key="same")
    _write(sdata, prep, 2 * hr, key="double")
    assert np.allclose(evaluate(sdata, key="same")["lr_consistency"], 0.0, atol=1e-5)
    assert np.allclose(evaluate(sdata, key="double")["lr_consistency"], 1.0, atol=1e-5)  # |2 LR − LR| / LR


def test_spot_data_without_truth_report_only_consistency():
    sdata = toy_visium()
    dst.pp.prepare(sdata, genes=GENES[:3], tile_um=200)
    dst.tl.upsample(sdata, method="bicubic")
    df = evaluate(sdata, key="bicubic_sr", split="train")
    assert list(df.columns) == ["lr_consistency", "n_tiles", "method"]
    assert np.isfinite(df["lr_consistency"]).all()
    assert df.attrs["truth"] is None


def test_errors(prepared):
    sdata, prep = prepared
    hr = sdata["diffst_hr"].values
    _write(sdata, prep, hr)
    with pytest.raises(KeyError, match="No super-resolved result under 'nope'"):
        evaluate(sdata, key="nope")
    with pytest.raises(ValueError, match=r"not in the SR result"):
        evaluate(sdata, key="sr", genes=["G0", "NOT_A_GENE"])
    with pytest.raises(ValueError, match="Unknown split"):
        evaluate(sdata, key="sr", split="holdout")
    with pytest.raises(KeyError, match="truth_key"):
        evaluate(sdata, key="sr", truth_key="missing")
    with pytest.raises(ValueError, match="is not aligned|has shape"):
        evaluate(sdata, key="sr", truth_key="diffst_lr")


def test_split_without_tiles_is_an_error():
    sdata = toy_xenium(seed=1)
    dst.pp.prepare(sdata, genes=GENES[:2], tile_um=200, split=(0.7, 0.3, 0.0))
    prep = Prepared.from_sdata(sdata, "diffst")
    _write(sdata, prep, sdata["diffst_hr"].values)
    with pytest.raises(ValueError, match="No 'test' tiles"):
        evaluate(sdata, key="sr")


def test_sr_on_another_grid_is_an_error(prepared):
    sdata, _ = prepared
    dst.pp.prepare(sdata, genes=GENES[:4], tile_um=200, scale=5, key_added="coarse")
    coarse = Prepared.from_sdata(sdata, "coarse")
    _write(sdata, coarse, sdata["coarse_hr"].values, key="sr5")
    assert evaluate(sdata, key="sr5")["pcc"].iloc[0] == pytest.approx(1.0)
    sdata.attrs["sr5"]["prepared_key"] = "diffst"  # claims to belong to the 10× data
    with pytest.raises(ValueError, match="was made on grid"):
        evaluate(sdata, key="sr5")
