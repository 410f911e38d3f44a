"""diffst.metrics on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from diffst import metrics
from diffst._degradation import BinDegradation

# --- strict metrics -----------------------------------------------------------------------------------------------


def test_pearson_by_hand():
    # x − x̄ = (−1, 0, 1), y − ȳ = (−7, −1, 8)/3: r = 5 / (√2 · √(114/9)) = 15 / √228
    assert metrics.pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 7])) == pytest.approx(15 / np.sqrt(228))
    assert metrics.pearson(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)  # signed
    # maps of any shape are flattened
    a = np.array([[1.0, 2], [3, 4]])
    assert metrics.pearson(a, 2 * a + 1) == pytest.approx(1.0)


def test_pearson_is_nan_for_constant_maps_and_rejects_shape_mismatch():
    assert np.isnan(metrics.pearson(np.ones(4), np.arange(4.0)))
    assert np.isnan(metrics.pearson(np.arange(4.0), np.zeros(4)))
    assert np.isnan(metrics.pearson(np.array([1.0]), np.array([2.0])))
    with pytest.raises(ValueError, match="same shape"):
        metrics.pearson(np.zeros(3), np.zeros(4))


def test_rmse_by_hand():
    assert metrics.rmse(np.array([1.0, 2, 3]), np.array([1.0, 2, 5])) == pytest.approx(np.sqrt(4 / 3))
    assert metrics.rmse(np.zeros((2, 1)), np.array([[3.0], [4.0]])) == pytest.approx(np.sqrt(12.5))
    assert metrics.rmse(np.ones(5), np.ones(5)) == 0.0


def test_ssim_window_fits_small_tiles():
    assert metrics.ssim_window((20, 30)) == 7
    assert metrics.ssim_window((7, 7)) == 7
    assert metrics.ssim_window((6, 9)) == 5
    assert metrics.ssim_window((5, 5)) == 5
    assert metrics.ssim_window((3, 10)) == 3
    assert metrics.ssim_window((2, 5)) is None


def test_ssim_identical_is_one_and_small_maps_work():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (20, 20))
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    small = rng.uniform(-1, 1, (5, 6))
    other = rng.uniform(-1, 1, (5, 6))
    expected = structural_similarity(small, other, data_range=2.0, win_size=5)
    assert metrics.ssim(small, other) == pytest.approx(expected)
    assert np.isnan(metrics.ssim(np.zeros((2, 8)), np.zeros((2, 8))))
    with pytest.raises(ValueError, match="2-D"):
        metrics.ssim(np.zeros(9), np.zeros(9))


def test_ssim_by_hand_for_a_shifted_map():
    # one 3×3 window covers the map; a shift keeps σxy = σx² = σy², so only the luminance term is left:
    # (2 μx μy + C1) / (μx² + μy² + C1) with μx = 0.5, μy = 1, C1 = (0.01 · 2)²
    x = np.arange(9.0).reshape(3, 3) / 8
    c1 = (0.01 * 2.0) ** 2
    assert metrics.ssim(x + 0.5, x) == pytest.approx((2 * 0.5 * 1.0 + c1) / (0.25 + 1.0 + c1))


def test_lr_consistency_by_hand():
    op = BinDegradation(2)
    # 1 gene: the 2×2 block sums to 6, LR is 4 → |6 − 4| / 4
    assert metrics.lr_consistency_error(np.array([[1.0, 1], [1, 3]]), np.array([[4.0]]), op) == pytest.approx(0.5)
    sr = np.ones((2, 2, 4))  # two genes, every block sums to 4
    lr = np.array([[[4.0, 4.0]], [[2.0, 100.0]]])
    assert np.allclose(metrics.lr_consistency_error(sr, lr, op), [0.0, (2 + 96) / 102])
    # only observed LR pixels count
    assert np.allclose(metrics.lr_consistency_error(sr, lr, op, observed=np.array([[1.0, 0.0]])), [0.0, 1.0])


def test_lr_consistency_without_counts():
    op = BinDegradation(2)
    assert metrics.lr_consistency_error(np.zeros((2, 2)), np.zeros((1, 1)), op) == 0.0
    assert np.isnan(metrics.lr_consistency_error(np.ones((2, 2)), np.zeros((1, 1)), op))
    with pytest.raises(ValueError, match="shape"):
        metrics.lr_consistency_error(np.ones((2, 2)), np.zeros((2, 2)), op)


# --- paper-compatible metrics -----------------------------------------------------------------------------------


def test_minmax():
    assert np.allclose(metrics.minmax(np.array([2.0, 4, 6])), [0, 0.5, 1])
    assert np.array_equal(metrics.minmax(np.full(3, 7.0)), np.zeros(3))


def test_paper_pcc_takes_abs_and_drops_empty_truth():
    pred, truth = np.array([5.0, 3, 2, 1]), np.array([0.0, 1, 2, 3])
    assert metrics.pearson(pred, truth) < -0.9
    assert metrics.paper_pcc(pred, truth) == pytest.approx(1.0)  # entry 0 dropped, the rest anti-correlated
    # expression predicted where the truth is empty is not scored
    pred, truth = np.array([9.0, 9, 9, 1, 2]), np.array([0.0, 0, 0, 1, 2])
    assert metrics.pearson(pred, truth) < -0.8
    assert metrics.paper_pcc(pred, truth) == pytest.approx(1.0)
    # scaled: p = (1, 1, 1, 0, 1/8), t = (0, 0, 0, 1/2, 1); kept entries 3, 4
    assert metrics.paper_rmse(pred, truth) == pytest.approx(np.sqrt((0.5**2 + (1 - 1 / 8) ** 2) / 2))


def test_paper_metrics_ignore_level_and_range():
    rng = np.random.default_rng(1)
    truth = rng.poisson(2.0, (6, 6)).astype(float)
    pred = 10 * truth + 3
    assert metrics.rmse(pred, truth) > 10
    assert metrics.paper_rmse(pred, truth) == pytest.approx(0.0)
    noisy = truth + rng.normal(0, 1, truth.shape)
    assert metrics.paper_pcc(noisy, truth) == pytest.approx(metrics.paper_pcc(5 * noisy - 2, 3 * truth + 1))


def test_paper_metrics_undefined_cases():
    assert np.isnan(metrics.paper_pcc(np.arange(3.0), np.zeros(3)))  # nothing kept
    assert np.isnan(metrics.paper_rmse(np.arange(3.0), np.full(3, 2.0)))  # constant truth scales to 0
    assert np.isnan(metrics.paper_pcc(np.arange(3.0), np.array([0.0, 0, 1])))  # one entry kept
