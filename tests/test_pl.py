from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer

import diffst as dst
from diffst import pl
from diffst.tl._data import Prepared
from diffst.tl._output import write_sr

from .toy import GENES, toy_visium, toy_xenium

HR_UM, LR_UM = 10.0, 100.0


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def xenium():
    """Toy Xenium (800 µm, H&E) prepared at 100 → 10 µm, an SR in counts (truth + noise) with a std."""
    sdata = toy_xenium(he=True)
    dst.pp.prepare(sdata, genes=GENES[:4], tile_um=200, scale=10, image_key="he_image")
    prep = Prepared.from_sdata(sdata, "diffst")
    hr = sdata["diffst_hr"].values
    rng = np.random.default_rng(0)
    # gene g twice as bright as g - 1, so that per-gene colour scales differ
    gain = 2.0 ** np.arange(hr.shape[0])[:, None, None]
    mean = (np.clip(hr + rng.normal(0, 0.5, hr.shape), 0, None) * gain).astype(np.float32)
    std = (0.1 + 0.2 * mean).astype(np.float32)
    write_sr(
        sdata, prep, key_added="diffst_sr", mean=mean, std=std, genes=prep.genes, units="counts", method="toy",
        params={}, overwrite=False,
    )  # fmt: skip
    return sdata


def _panels(fig):
    """Panel axes (not colorbars) by (gene, column)."""
    return {tuple(ax.get_gid().split(":")): ax for ax in fig.axes if ax.get_gid()}


def _map(ax):
    """The gene-map image of a panel (drawn over the tissue image)."""
    return ax.get_images()[-1]


def _scale_bars(ax):
    return [a for a in ax.artists if a.get_gid() == "scale_bar"]


# --- gene_maps -----------------------------------------------------------------------------------------------


def test_gene_maps_layout_titles_and_one_colour_scale_per_gene(xenium):
    genes = ["G0", "G2"]
    fig = pl.gene_maps(xenium, genes=genes)
    panels = _panels(fig)
    assert sorted(panels) == sorted((g, c) for g in genes for c in ("lr", "sr", "truth", "std"))
    assert len(fig.axes) == 8 + 2 * 2  # panels + one expression and one std colorbar per row
    assert [panels["G0", c].get_title() for c in ("lr", "sr", "truth", "std")] == [
        "LR (100 µm)",
        "SR mean (10 µm)",
        "truth (10 µm)",
        "SR std (10 µm)",
    ]
    assert [panels["G2", c].get_title() for c in ("lr", "sr")] == ["", ""]  # titles on the first row only
    assert [panels[g, "lr"].get_ylabel() for g in genes] == genes

    # one colour scale per gene: LR, SR and truth share limits, computed over the three maps in log1p
    hr = xenium["diffst_hr"]
    sr = xenium["diffst_sr"]
    for g in genes:
        clims = {c: _map(panels[g, c]).get_clim() for c in ("lr", "sr", "truth")}
        assert len(set(clims.values())) == 1
        lr_per_px = xenium["diffst_lr"].sel(c=g).values / (10 * 10)
        values = np.concatenate(
            [np.log1p(lr_per_px).ravel(), np.log1p(sr.sel(c=g).values).ravel(), np.log1p(hr.sel(c=g).values).ravel()]
        )
        assert clims["sr"] == pytest.approx((0.0, np.percentile(values, 99.5)), rel=1e-5)
    # the limits differ between genes, and the std has its own scale and colorbar
    assert _map(panels["G0", "sr"]).get_clim() != _map(panels["G2", "sr"]).get_clim()
    assert _map(panels["G0", "std"]).get_clim() != _map(panels["G0", "sr"]).get_clim()
    # the std stored in counts is shown in log1p to first order: std / (1 + mean)
    shown = _map(panels["G0", "std"]).get_array()
    expected = xenium["diffst_sr_std"].sel(c="G0").values / (1 + sr.sel(c="G0").values)
    assert np.allclose(shown.filled(np.nan)[~shown.mask], expected[~shown.mask], rtol=1e-5)
    fig2 = pl.gene_maps(xenium, genes=["G0"], std_scale="shared")
    p2 = _panels(fig2)
    assert _map(p2["G0", "std"]).get_clim() == _map(p2["G0", "sr"]).get_clim()
    assert len(fig2.axes) == 4 + 1


def test_gene_maps_default_genes_and_region_whole_small_grid(xenium):
    fig = pl.gene_maps(xenium)
    panels = _panels(fig)
    assert sorted({g for g, _ in panels}) == ["G0", "G1", "G2"]  # the first three of the SR
    # the grid is 80 × 80 HR pixels: the whole grid is shown
    assert _map(panels["G0", "sr"]).get_extent() == pytest.approx([0, 800, 800, 0])
    assert "whole grid" in fig._suptitle.get_text()


def test_gene_maps_large_grid_defaults_to_first_test_tile_and_reads_the_pyramid():
    sdata = toy_xenium(seed=2)
    dst.pp.prepare(sdata, genes=GENES[:2], tile_um=200, scale=40)  # 2.5 µm HR pixels: 320 × 320, a pyramid
    prep = Prepared.from_sdata(sdata, "diffst")
    hr = sdata["diffst_hr"].values
    write_sr(
        sdata, prep, key_added="diffst_sr", mean=hr, std=None, genes=prep.genes, units="counts", method="toy",
        params={}, overwrite=False,
    )  # fmt: skip
    assert "scale1" in sdata["diffst_sr"]  # multiscale
    tiles = sdata["diffst_tiles"]
    first_test = tiles.index[tiles["split"] == "test"][0]
    bx0, by0, bx1, by1 = tiles.geometry.loc[first_test].bounds
    fig = pl.gene_maps(sdata, genes="G1", show_image=False)
    panels = _panels(fig)
    assert sorted(panels) == [("G1", "lr"), ("G1", "sr"), ("G1", "truth")]
    assert _map(panels["G1", "sr"]).get_extent() == pytest.approx([bx0, bx1, by1, by0])
    r0, c0 = int(by0 / 2.5), int(bx0 / 2.5)
    expected = np.log1p(hr[1, r0 : r0 + 80, c0 : c0 + 80])  # full resolution, not a pyramid level
    assert np.allclose(_map(panels["G1", "sr"]).get_array(), expected)


def test_gene_maps_pixels_land_on_their_um_position(xenium):
    # a region off the pixel edges is expanded to whole HR pixels
    fig = pl.gene_maps(xenium, genes=["G1"], region=(250, 133, 555, 420))
    panels = _panels(fig)
    x0, y0, x1, y1 = 250, 130, 560, 420
    sr_panel = panels["G1", "sr"]
    assert _map(sr_panel).get_extent() == pytest.approx([x0, x1, y1, y0])  # rows run down in y
    assert sr_panel.get_xlim() == pytest.approx((x0, x1))
    assert sr_panel.get_ylim() == pytest.approx((y1, y0))
    # the shown array is exactly the SR pixels of that region (log1p), pixel (i, j) at x0 + 10 j, y0 + 10 i
    shown = _map(sr_panel).get_array()
    expected = np.log1p(xenium["diffst_sr"].sel(c="G1").values[13:42, 25:56])
    assert shown.shape == expected.shape
    assert np.allclose(shown.filled(np.nan)[~shown.mask], expected[~shown.mask])
    assert np.all(expected[shown.mask] <= 0.02 * _map(sr_panel).get_clim()[1] + 1e-7)  # masked = near zero
    # LR is drawn at its own 100 µm pixels, over the LR pixels that hold the region
    assert _map(panels["G1", "lr"]).get_extent() == pytest.approx([200, 600, 500, 100])
    assert _map(panels["G1", "lr"]).get_array().shape == (4, 4)
    # the tissue image lies under every panel over the same region
    for col in ("lr", "sr", "truth", "std"):
        images = panels["G1", col].get_images()
        assert len(images) == 2
        assert images[0].get_extent() == pytest.approx([x0, x1, y1, y0])
        assert images[0].get_array().shape[-1] == 3  # RGB H&E


def test_gene_maps_tile_and_split_choose_the_tile_region(xenium):
    tiles = xenium["diffst_tiles"]
    tid = tiles.index[5]
    bx0, by0, bx1, by1 = tiles.geometry.loc[tid].bounds
    fig = pl.gene_maps(xenium, genes="G3", tile=tid)
    assert _map(_panels(fig)["G3", "sr"]).get_extent() == pytest.approx([bx0, bx1, by1, by0])
    first_test = tiles.index[tiles["split"] == "test"][0]
    bx0, by0, bx1, by1 = tiles.geometry.loc[first_test].bounds
    fig = pl.gene_maps(xenium, genes="G3", split="test")
    assert _map(_panels(fig)["G3", "truth"]).get_extent() == pytest.approx([bx0, bx1, by1, by0])
    assert f"tile {first_test} (test)" in fig._suptitle.get_text()


def test_gene_maps_scale_bar(xenium):
    fig = pl.gene_maps(xenium, genes=["G0", "G1"])
    panels = _panels(fig)
    for g in ("G0", "G1"):
        (bar,) = _scale_bars(panels[g, "lr"])
        assert bar.txt_label.get_text() == "200 µm"  # a round number near 800 µm / 5
        assert bar.size_bar.get_children()[0].get_width() == pytest.approx(200)  # in data units, i.e. µm
        assert not _scale_bars(panels[g, "sr"])
    fig = pl.gene_maps(xenium, genes="G0", region=(0, 0, 200, 200), scale_bar_um=50)
    (bar,) = _scale_bars(_panels(fig)["G0", "lr"])
    assert bar.txt_label.get_text() == "50 µm"
    fig = pl.gene_maps(xenium, genes="G0", scale_bar_um=False)
    assert not _scale_bars(_panels(fig)["G0", "lr"])


def test_gene_maps_units_counts_and_no_image(xenium):
    fig = pl.gene_maps(xenium, genes="G2", units="counts", show_image=False, region=(0, 0, 200, 200))
    panels = _panels(fig)
    for col in ("lr", "sr", "truth", "std"):
        assert len(panels["G2", col].get_images()) == 1  # no tissue image
    shown = _map(panels["G2", "sr"]).get_array()
    assert not np.any(shown.mask)  # without an image every pixel is drawn
    assert np.allclose(shown, xenium["diffst_sr"].sel(c="G2").values[:20, :20])
    assert np.allclose(_map(panels["G2", "truth"]).get_array(), xenium["diffst_hr"].sel(c="G2").values[:20, :20])
    assert np.allclose(_map(panels["G2", "lr"]).get_array(), xenium["diffst_lr"].sel(c="G2").values[:2, :2] / 100)
    colorbar_labels = [ax.get_ylabel() for ax in fig.axes if not ax.get_gid()]
    assert colorbar_labels == ["counts / 10 µm px", "std, counts / 10 µm px"]


def test_gene_maps_without_truth_or_std_has_lr_and_sr_columns_only():
    sdata = toy_visium()
    dst.pp.prepare(sdata, genes=GENES[:3], tile_um=200)
    prep = Prepared.from_sdata(sdata, "diffst")
    h, w = prep.grid.hr_shape
    mean = np.log1p(np.random.default_rng(1).gamma(2.0, 1.0, (3, h, w))).astype(np.float32)
    write_sr(
        sdata, prep, key_added="sr", mean=mean, std=None, genes=prep.genes, units="log1p", method="toy", params={},
        overwrite=False,
    )  # fmt: skip
    fig = pl.gene_maps(sdata, key="sr", genes=GENES[:2], region=(100, 100, 500, 500))
    panels = _panels(fig)
    assert sorted(panels) == sorted((g, c) for g in GENES[:2] for c in ("lr", "sr"))
    assert len(fig.axes) == 4 + 2
    assert _map(panels["G0", "lr"]).get_clim() == _map(panels["G0", "sr"]).get_clim()
    # log1p stored, log1p shown: the values are the stored ones
    r0, c0 = (np.array([100, 100]) - np.array(prep.grid.origin_um)[::-1]) / prep.grid.hr_um
    shown = _map(panels["G0", "sr"]).get_array()
    stored = mean[0, int(r0) : int(r0) + shown.shape[0], int(c0) : int(c0) + shown.shape[1]]
    assert np.allclose(shown.filled(np.nan)[~shown.mask], stored[~shown.mask])


def test_gene_maps_errors(xenium):
    with pytest.raises(KeyError, match=r"\['NOPE'\].*'G0', 'G1', 'G2', 'G3'"):
        pl.gene_maps(xenium, genes=["G0", "NOPE"])
    with pytest.raises(KeyError, match="No super-resolved result under 'other'"):
        pl.gene_maps(xenium, key="other")
    with pytest.raises(ValueError, match="outside the prepared grid.*x 0–800 µm"):
        pl.gene_maps(xenium, region=(900, 0, 1000, 100))
    with pytest.raises(ValueError, match="x0 < x1"):
        pl.gene_maps(xenium, region=(100, 0, 50, 100))
    with pytest.raises(ValueError, match="only one of"):
        pl.gene_maps(xenium, region=(0, 0, 100, 100), tile=0)
    with pytest.raises(KeyError, match="No tile 999"):
        pl.gene_maps(xenium, tile=999)
    with pytest.raises(ValueError, match="No tile in split 'holdout'"):
        pl.gene_maps(xenium, split="holdout")
    with pytest.raises(ValueError, match="`units`"):
        pl.gene_maps(xenium, units="cpm")


# --- training_history ----------------------------------------------------------------------------------------


def _history():
    rows = []
    for e in range(6):
        row = {"epoch": e, "step": 10 * (e + 1), "train_loss": 1.0 / (e + 1)}
        if e % 2 == 1:  # validation every second epoch
            row |= {"val_loss": 1.2 / (e + 1), "val_pcc": 0.1 * e, "val_pcc_bicubic": 0.25}
        rows.append(row)
    return rows


def test_training_history_lines_and_reference():
    rows = _history()
    fig = pl.training_history(SimpleNamespace(history=rows))  # a DiffST is read through `.history`
    loss_ax, pcc_ax = fig.axes
    assert loss_ax.get_yscale() == "log"
    lines = {ln.get_gid(): ln for ln in loss_ax.get_lines()}
    assert set(lines) == {"train_loss", "val_loss"}
    assert np.array_equal(lines["train_loss"].get_xdata(), np.arange(6))
    assert np.allclose(lines["train_loss"].get_ydata(), [1.0 / (e + 1) for e in range(6)])
    assert np.array_equal(lines["val_loss"].get_xdata(), [1, 3, 5])  # epochs without validation are skipped
    assert np.allclose(lines["val_loss"].get_ydata(), [0.6, 0.3, 0.2])
    assert pcc_ax.get_yscale() == "linear"
    assert pcc_ax.get_title() == "validation PCC"
    pcc = {ln.get_gid(): ln for ln in pcc_ax.get_lines()}
    assert np.allclose(pcc["val_pcc"].get_ydata(), [0.1, 0.3, 0.5])
    assert pcc["val_pcc_bicubic"].get_linestyle() == "--"
    assert np.allclose(pcc["val_pcc_bicubic"].get_ydata(), 0.25)
    assert [t.get_text() for t in pcc_ax.get_legend().get_texts()] == ["model", "bicubic"]


def test_training_history_inputs_axes_and_errors():
    rows = _history()
    fig = pl.training_history(pd.DataFrame(rows), metrics=["train_loss"], x="step")
    (ax,) = fig.axes
    assert np.array_equal(ax.get_lines()[0].get_xdata(), [10, 20, 30, 40, 50, 60])
    # the default drops metrics that the history lacks (training without validation)
    fig = pl.training_history([{k: r[k] for k in ("epoch", "step", "train_loss")} for r in rows])
    assert len(fig.axes) == 1
    outer, axes = plt.subplots(1, 2)
    assert pl.training_history(rows, axes=axes) is outer
    assert len(axes[1].get_lines()) == 2
    with pytest.raises(KeyError, match=r"\['val_ssim'\].*train_loss"):
        pl.training_history(rows, metrics=["val_ssim"])
    with pytest.raises(ValueError, match="`axes` has 1 axes but the plot has 2 panels"):
        pl.training_history(rows, axes=[axes[0]])
    with pytest.raises(ValueError, match="empty"):
        pl.training_history([])


# --- benchmark -----------------------------------------------------------------------------------------------


def _bars(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _best_bars(ax):
    return [c.get_label() for c in _bars(ax) if any(p.get_gid() == "best" for p in c.patches)]


def test_benchmark_wide_highlights_best_per_metric_with_direction():
    table = pd.DataFrame(
        {
            "method": ["diffst", "bicubic", "regression"],
            "pcc": [0.61, 0.42, 0.55],
            "pcc_std": [0.05, 0.04, 0.06],
            "rmse": [0.25, 0.21, 0.30],
            "ssim": [0.5, 0.4, 0.7],
        }
    )
    fig = pl.benchmark(table, metrics=["pcc", "rmse", "ssim"])
    pcc_ax, rmse_ax, ssim_ax = fig.axes
    assert _best_bars(pcc_ax) == ["diffst"]  # higher is better
    assert _best_bars(rmse_ax) == ["bicubic"]  # lower is better
    assert _best_bars(ssim_ax) == ["regression"]
    assert pcc_ax.get_title().startswith("pcc ↑")
    assert rmse_ax.get_title().startswith("rmse ↓")
    heights = {c.get_label(): c.patches[0].get_height() for c in _bars(pcc_ax)}
    assert heights == pytest.approx({"diffst": 0.61, "bicubic": 0.42, "regression": 0.55})
    # error bars from pcc_std, none for rmse
    assert _bars(pcc_ax)[0].errorbar is not None
    assert _bars(rmse_ax)[0].errorbar is None
    assert [t.get_text() for t in pcc_ax.get_xticklabels()] == ["diffst", "bicubic", "regression"]
    # a direction given explicitly wins
    fig = pl.benchmark(table, metrics="rmse", higher_is_better={"rmse": True})
    assert _best_bars(fig.axes[0]) == ["regression"]


def test_benchmark_long_with_groups_and_aggregation():
    rows = []
    for scale, (d, b) in {5: (0.7, 0.6), 10: (0.5, 0.55)}.items():
        for gene, jitter in (("A", -0.05), ("B", 0.05)):  # one row per gene: averaged, spread = std
            rows.append({"method": "diffst", "scale": scale, "gene": gene, "metric": "pcc", "value": d + jitter})
            rows.append({"method": "bicubic", "scale": scale, "gene": gene, "metric": "pcc", "value": b + jitter})
            rows.append({"method": "diffst", "scale": scale, "gene": gene, "metric": "rmse", "value": 0.2})
            rows.append({"method": "bicubic", "scale": scale, "gene": gene, "metric": "rmse", "value": 0.3})
    df = pd.DataFrame(rows)
    fig = pl.benchmark(df, group_col="scale")
    pcc_ax, rmse_ax = fig.axes
    best = {(c.get_label(), k) for c in _bars(pcc_ax) for k, p in enumerate(c.patches) if p.get_gid() == "best"}
    assert best == {("diffst", 0), ("bicubic", 1)}  # best per scale: diffst at 5×, bicubic at 10×
    diffst = next(c for c in _bars(pcc_ax) if c.get_label() == "diffst")
    assert [p.get_height() for p in diffst.patches] == pytest.approx([0.7, 0.5])
    assert diffst.errorbar is not None  # std over the genes
    assert [t.get_text() for t in pcc_ax.get_xticklabels()] == ["5", "10"]
    assert _best_bars(rmse_ax) == ["diffst"]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["diffst", "bicubic"]


def test_benchmark_reads_concatenated_evaluate_tables():
    def evaluate_like(method, pcc):
        df = pd.DataFrame({"pcc": pcc, "rmse": [0.2, 0.3], "method": method}, index=pd.Index(["A", "B"], name="gene"))
        mean = pd.DataFrame({"pcc": [np.mean(pcc)], "rmse": [0.25], "method": method}, index=["mean"])
        return pd.concat([df, mean]).rename_axis("gene")

    table = pd.concat([evaluate_like("diffst", [0.5, 0.7]), evaluate_like("bicubic", [0.4, 0.4])])
    fig = pl.benchmark(table)
    pcc_ax = fig.axes[0]
    bars = {c.get_label(): c for c in _bars(pcc_ax)}
    assert bars["diffst"].patches[0].get_height() == pytest.approx(0.6)
    # the spread is the std over the two genes (the "mean" row is not a third gene)
    (seg,) = bars["diffst"].errorbar.lines[2]  # the vertical error-bar segments
    assert np.ptp(seg.get_segments()[0][:, 1]) / 2 == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert _best_bars(pcc_ax) == ["diffst"]


def test_benchmark_dot_order_axes_and_errors():
    table = pd.DataFrame({"method": ["a", "b"], "pcc": [0.3, 0.4], "rmse": [1.0, 2.0]})
    outer, axes = plt.subplots(1, 2)
    fig = pl.benchmark(table, kind="dot", order=["b", "a"], axes=axes)
    assert fig is outer
    gids = [ln.get_gid() for ln in axes[0].get_lines()]
    assert gids[:2] == ["b", "best:b"]
    assert "best:a" in [ln.get_gid() for ln in axes[1].get_lines()]
    with pytest.raises(KeyError, match=r"\['ssim'\].*Numeric columns: \['pcc', 'rmse'\]"):
        pl.benchmark(table, metrics=["ssim"])
    with pytest.raises(KeyError, match="no column 'tool'"):
        pl.benchmark(table, method_col="tool")
    with pytest.raises(KeyError, match=r"\['c'\] in `order`"):
        pl.benchmark(table, order=["c"])


def test_plots_draw_into_a_given_axes_and_save(xenium, tmp_path):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.plot([0, 1], [0, 1], gid="mine")
    out = pl.gene_maps(xenium, genes=["G1", "G2"], ax=right, save=tmp_path / "maps.png")
    assert out is fig and right not in fig.axes and left in fig.axes  # the axes' place, the rest untouched
    panels = _panels(fig)
    assert sorted(panels) == sorted((g, c) for g in ("G1", "G2") for c in ("lr", "sr", "truth", "std"))
    assert all(p.get_position().x0 >= 0.45 for p in panels.values())  # in the right half, where `right` was
    assert not fig._suptitle  # the user's figure keeps its own title
    assert (tmp_path / "maps.png").stat().st_size > 10_000
    history = pl.training_history(_history(), save=tmp_path / "curves.pdf")
    assert (tmp_path / "curves.pdf").read_bytes()[:4] == b"%PDF" and history.axes
    with pytest.raises(FileNotFoundError, match="folder .* does not exist"):
        pl.gene_maps(xenium, genes=["G1"], save=tmp_path / "nope" / "x.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pl.benchmark(pd.DataFrame({"method": ["a"], "pcc": [0.5]}).set_index("method"), save=tmp_path / "no" / "b.svg")
