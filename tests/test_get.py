"""dst.get: SR maps as pixel × gene and cell × gene AnnData, checked against the rasters they come from."""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from spatialdata.models import Labels2DModel, ShapesModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation, get_transformation

import diffst as dst
from diffst.get import _aggregate as aggregate_module
from diffst.tl._data import Prepared
from diffst.tl._output import write_sr

from .toy import toy_xenium

PX = 0.2125  # µm per `global` unit of the synthetic Xenium data
HR = 10.0  # HR pixel size in µm (lr_um 40, scale 4)


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def xenium():
    """600 µm synthetic Xenium, prepared on a 64 × 64 HR grid of 10 µm; ``truth_sr`` = the HR truth (with a std)."""
    sdata = dst.datasets.synthetic_xenium(size_um=600, seed=0)
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160, image_key="he_image")
    prep = Prepared.from_sdata(sdata, "diffst")
    hr = np.asarray(sdata["diffst_hr"].values)
    write_sr(
        sdata, prep, key_added="truth_sr", mean=hr, std=0.1 * hr + 0.5, genes=list(prep.genes), units="counts",
        method="truth", params={}, overwrite=False,
    )  # fmt: skip
    dst.tl.upsample(sdata, key_added="bicubic_sr")
    return sdata


def _hr_truth(sdata):
    return np.asarray(sdata["diffst_hr"].values, dtype=np.float64)


def _shapes(polygons, transform, index):
    gdf = gpd.GeoDataFrame(geometry=polygons, index=pd.Index(index, name="cell_id"))
    return ShapesModel.parse(gdf, transformations={"global": transform})


# --- pixels -------------------------------------------------------------------------------------------------


def test_pixels_are_the_tissue_hr_pixels_with_values_coordinates_and_std(xenium, tmp_path):
    sdata = xenium
    adata = dst.get.pixels(sdata, key="truth_sr")
    tissue = np.asarray(sdata["diffst_tissue"].values) > 0
    assert adata.n_obs == tissue.sum() * 16  # every HR pixel of every tissue LR pixel, nothing else
    assert tissue[adata.obs["row"] // 4, adata.obs["col"] // 4].all()
    genes = sdata.attrs["diffst"]["genes"]
    assert list(adata.var_names) == genes
    assert adata.X.dtype == np.float32
    r, c = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
    assert np.array_equal(adata.X, _hr_truth(sdata)[:, r, c].T.astype(np.float32))
    assert np.allclose(adata.layers["std"], 0.1 * adata.X + 0.5)
    # obsm['spatial'] is the HR grid's transformation applied to the pixel centre (global = morphology pixels)
    m = get_transformation(sdata["truth_sr"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    expected = (m @ np.vstack([c + 0.5, r + 0.5, np.ones_like(r)]))[:2].T
    assert np.allclose(adata.obsm["spatial"], expected)
    assert np.allclose(adata.obs["x_um"], (c + 0.5) * HR) and np.allclose(adata.obs["y_um"], (r + 0.5) * HR)
    assert np.allclose(adata.obsm["spatial"] * PX, adata.obs[["x_um", "y_um"]].to_numpy())
    # tile_split: the split of the prepared tile holding the pixel
    for _, tile in sdata["diffst_tiles"].iterrows():  # tiles are 4 × 4 LR pixels
        inside = (r // 4 >= tile["lr_row0"]) & (r // 4 < tile["lr_row0"] + 4)
        inside &= (c // 4 >= tile["lr_col0"]) & (c // 4 < tile["lr_col0"] + 4)
        assert (adata.obs["tile_split"][inside] == tile["split"]).all()
    assert adata.obs["tile_split"].notna().any()
    assert adata.uns["diffst"]["units"] == "counts" and adata.uns["diffst"]["hr_um"] == HR
    adata.write_h5ad(tmp_path / "pixels.h5ad")  # uns and obs are writable


def test_pixels_reads_genes_in_order_the_hr_truth_and_the_whole_grid(xenium):
    sdata = xenium
    genes = sdata.attrs["diffst"]["genes"]
    sr = dst.get.pixels(sdata, key="bicubic_sr", genes=[genes[2], genes[0]])
    assert list(sr.var_names) == [genes[2], genes[0]] and "std" not in sr.layers  # bicubic has no std
    assert "std" not in dst.get.pixels(sdata, key="truth_sr", layer_std=False).layers
    truth = dst.get.pixels(sdata, key="diffst_hr", genes=[genes[2], genes[0]], tissue_only=False)
    assert truth.n_obs == 64 * 64 and truth.uns["diffst"]["units"] == "counts"
    r, c = truth.obs["row"].to_numpy(), truth.obs["col"].to_numpy()
    assert np.array_equal(truth.X, _hr_truth(sdata)[[2, 0]][:, r, c].T.astype(np.float32))
    assert set(sr.obs_names) <= set(truth.obs_names)
    with pytest.raises(ValueError, match="HR grid"):
        dst.get.pixels(sdata, key="he_image")
    with pytest.raises(KeyError, match="neither"):
        dst.get.pixels(sdata, key="no_such_sr")
    with pytest.raises(KeyError, match="not channels"):
        dst.get.pixels(sdata, key="truth_sr", genes=["NOT_A_GENE"])


def test_squidpy_morans_i_sees_structure_and_not_its_shuffled_copy():
    sq = pytest.importorskip("squidpy")
    rng = np.random.default_rng(0)
    n = 300_000
    x, y = rng.uniform(0, 800, n), rng.uniform(0, 800, n)
    keep = rng.random(n) < 0.5 + 0.45 * np.sin(x / 120) * np.cos(y / 150)
    sdata = toy_xenium(
        size_um=800, n=20_000, extra=pd.DataFrame({"x": x[keep], "y": y[keep], "feature_name": "SMOOTH"})
    )
    dst.pp.prepare(sdata, genes=["SMOOTH", "G1"], lr_um=40, scale=4, tile_um=160)
    dst.tl.upsample(sdata, key_added="diffst_sr")
    adata = dst.get.pixels(sdata, genes=["SMOOTH"], tissue_only=False)
    # the control: the same values shuffled over the pixels, so no spatial structure is left
    adata = ad.concat([adata, _renamed(adata, "SMOOTH_shuffled", rng.permutation(adata.X[:, 0]))], axis=1, merge="same")
    spatial_neighbors_grid = getattr(sq.gr, "spatial_neighbors_grid", None)  # squidpy ≥ 1.8; older: generic call
    if spatial_neighbors_grid is not None:
        spatial_neighbors_grid(adata, n_neighs=4)
    else:
        sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=4)
    assert np.allclose(adata.obsp["spatial_connectivities"].sum(axis=1).A1.max(), 4)  # the 4-neighbour HR lattice
    sq.gr.spatial_autocorr(adata, mode="moran", genes=["SMOOTH", "SMOOTH_shuffled"], n_perms=None, n_jobs=1)
    moran = adata.uns["moranI"]["I"]
    assert moran["SMOOTH"] > 0.8
    assert abs(moran["SMOOTH_shuffled"]) < 0.05


def _renamed(adata, name, values):
    out = ad.AnnData(X=values[:, None].astype(np.float32), obs=adata.obs, obsm=dict(adata.obsm))
    out.var_names = [name]
    return out


# --- aggregate ----------------------------------------------------------------------------------------------

# squares on HR pixel edges, in µm: (x0, y0, x1, y1)
SQUARES = {"a": (100, 150, 200, 250), "b": (300, 200, 380, 260), "c": (410, 40, 470, 90)}


def _box_sum(truth, box):
    x0, y0, x1, y1 = (int(v / HR) for v in box)
    return truth[:, y0:y1, x0:x1].sum(axis=(1, 2))


def test_aggregate_sums_the_truth_over_squares_whatever_their_transform(xenium):
    sdata = xenium
    truth = _hr_truth(sdata)
    boxes = [shapely.box(*b) for b in SQUARES.values()]
    # the same squares: in µm with Scale(1/pixel size) (as Xenium's cell_boundaries), in global pixels, and in a
    # frame shifted by 1000 µm whose transformation translates back
    sdata.shapes["squares_um"] = _shapes(boxes, Scale([1 / PX, 1 / PX], axes=("x", "y")), list(SQUARES))
    px = [shapely.affinity.scale(b, 1 / PX, 1 / PX, origin=(0, 0)) for b in boxes]
    sdata.shapes["squares_px"] = _shapes(px, Identity(), list(SQUARES))
    shifted = [shapely.affinity.translate(b, -1000, -1000) for b in boxes]
    to_global = Sequence([Translation([1000, 1000], axes=("x", "y")), Scale([1 / PX, 1 / PX], axes=("x", "y"))])
    sdata.shapes["squares_shifted"] = _shapes(shifted, to_global, list(SQUARES))

    expected = np.stack([_box_sum(truth, b) for b in SQUARES.values()])
    for name in ("squares_um", "squares_px", "squares_shifted"):
        cells = dst.get.aggregate(sdata, key="truth_sr", shapes_key=name, how="sum")
        assert list(cells.obs_names) == list(SQUARES)
        assert np.allclose(cells.X, expected, rtol=1e-5), name
        assert list(cells.obs["n_pixels"]) == [100, 48, 30]
        centres = np.array([[(x0 + x1) / 2, (y0 + y1) / 2] for x0, y0, x1, y1 in SQUARES.values()]) / PX
        assert np.allclose(cells.obsm["spatial"], centres)
    mean = dst.get.aggregate(sdata, key="diffst_hr", shapes_key="squares_um", how="mean")
    assert np.allclose(mean.X, expected / np.array([100, 48, 30])[:, None], rtol=1e-5)
    assert mean.uns["diffst"]["units"] == "counts" and mean.uns["diffst"]["how"] == "mean"


def test_aggregate_circles_overlaps_and_table(xenium):
    sdata = xenium
    truth = _hr_truth(sdata)
    # a circle of 20 µm radius: the HR pixels whose centres lie within it
    centre, radius = np.array([252.0, 303.0]), 20.0  # no pixel centre on the circle
    sdata.shapes["disc"] = ShapesModel.parse(
        (centre / PX)[None], geometry=0, radius=np.array([radius / PX]), index=pd.Index(["d"]),
        transformations={"global": Identity()},
    )  # fmt: skip
    rr, cc = np.mgrid[0:64, 0:64]
    within = np.hypot((cc + 0.5) * HR - centre[0], (rr + 0.5) * HR - centre[1]) <= radius
    disc = dst.get.aggregate(sdata, key="truth_sr", shapes_key="disc")
    assert disc.obs["n_pixels"].iloc[0] == within.sum()
    assert np.allclose(disc.X[0], truth[:, within].sum(axis=1), rtol=1e-5)

    # overlapping squares: each pixel counted once, to the cell with the nearest centroid
    boxes = [shapely.box(100, 100, 200, 200), shapely.box(150, 100, 300, 200)]
    sdata.shapes["overlap"] = _shapes(boxes, Scale([1 / PX, 1 / PX], axes=("x", "y")), ["left", "right"])
    cells = dst.get.aggregate(sdata, key="truth_sr", shapes_key="overlap", table_key_added="overlap_table")
    assert cells.obs["n_pixels"].sum() == 20 * 10
    assert np.allclose(cells.X.sum(axis=0), _box_sum(truth, (100, 100, 300, 200)), rtol=1e-5)
    # the overlap 150–200 µm is nearer the left centroid (150) up to x = 187.5 µm: pixel columns 15–18
    assert list(cells.obs["n_pixels"]) == [90, 110]
    table = sdata.tables["overlap_table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "overlap" and attrs["instance_key"] == "cell_id"
    assert list(table.obs["cell_id"]) == ["left", "right"]
    with pytest.raises(ValueError, match="already exist"):
        dst.get.aggregate(sdata, key="truth_sr", shapes_key="overlap", table_key_added="overlap_table")
    dst.get.aggregate(sdata, key="truth_sr", shapes_key="overlap", table_key_added="overlap_table", overwrite=True)


@pytest.mark.parametrize("window", [512, 7], ids=["one_window", "cells_across_windows"])
def test_aggregate_xenium_cell_boundaries_match_pixel_centres_in_polygons(xenium, monkeypatch, window):
    sdata = xenium
    truth = _hr_truth(sdata)
    monkeypatch.setattr(aggregate_module, "_WINDOW", window)
    cells = dst.get.aggregate(sdata, key="truth_sr", shapes_key="cell_boundaries")
    polygons = sdata["cell_boundaries"]
    assert list(cells.obs_names) == list(polygons.index)
    rr, cc = np.mgrid[0:64, 0:64]
    x, y = ((cc + 0.5) * HR).ravel(), ((rr + 0.5) * HR).ravel()  # the polygons are in µm
    member = np.stack([shapely.intersects_xy(g, x, y) for g in polygons.geometry])
    assert (member.sum(axis=0) > 1).any()  # the synthetic cells overlap: some pixels lie in several
    # brute force: each pixel to the containing cell with the nearest centroid
    cxy = shapely.get_coordinates(polygons.geometry.centroid)
    d2 = (x[None] - cxy[:, :1]) ** 2 + (y[None] - cxy[:, 1:]) ** 2
    owner = np.where(member, d2, np.inf).argmin(axis=0)
    covered = member.any(axis=0)
    assign = np.zeros_like(member)
    assign[owner[covered], np.flatnonzero(covered)] = True
    expected = assign.astype(float) @ truth.reshape(len(truth), -1).T
    assert np.allclose(cells.X, expected, rtol=1e-5)
    assert np.array_equal(cells.obs["n_pixels"].to_numpy(), assign.sum(axis=1))
    assert (cells.obs["n_pixels"] > 0).mean() > 0.5  # cells of ~100 µm² on 10 µm pixels: many hold no centre
    centroids = shapely.get_coordinates(polygons.geometry.centroid) / PX
    assert np.allclose(cells.obsm["spatial"], centroids)


def test_aggregate_labels_at_their_own_resolution(xenium):
    sdata = xenium
    truth = _hr_truth(sdata)
    # a 2 µm segmentation of 300 × 300 pixels, shifted by 4 µm: label pixel (i, j) covers µm x 4 + 2j …
    seg = np.zeros((300, 300), dtype=np.int32)
    for label, (x0, y0, x1, y1) in zip((7, 3, 12), SQUARES.values(), strict=True):
        seg[(y0 - 4) // 2 : (y1 - 4) // 2, (x0 - 4) // 2 : (x1 - 4) // 2] = label
    to_global = Sequence([Scale([2 / PX, 2 / PX], axes=("y", "x")), Translation([4 / PX, 4 / PX], axes=("y", "x"))])
    sdata.labels["seg"] = Labels2DModel.parse(seg, dims=("y", "x"), transformations={"global": to_global})
    cells = dst.get.aggregate(sdata, key="truth_sr", labels_key="seg", table_key_added="seg_table")
    assert list(cells.obs["cell_id"]) == [3, 7, 12] and list(cells.obs_names) == ["3", "7", "12"]
    expected = np.stack([_box_sum(truth, SQUARES[k]) for k in ("b", "a", "c")])
    assert np.allclose(cells.X, expected, rtol=1e-5)
    assert list(cells.obs["n_pixels"]) == [48, 100, 30]
    assert sdata.tables["seg_table"].uns["spatialdata_attrs"]["region"] == "seg"


def test_aggregate_log1p_sr_in_counts_and_errors(xenium):
    sdata = xenium
    dst.tl.upsample(sdata, key_added="bicubic_log1p", units="log1p")
    boxes = [shapely.box(*b) for b in SQUARES.values()]
    sdata.shapes["sq"] = _shapes(boxes, Scale([1 / PX, 1 / PX], axes=("x", "y")), list(SQUARES))
    counts = dst.get.aggregate(sdata, key="bicubic_sr", shapes_key="sq")
    from_log = dst.get.aggregate(sdata, key="bicubic_log1p", shapes_key="sq")
    assert np.allclose(counts.X, from_log.X, rtol=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        dst.get.aggregate(sdata, key="truth_sr", shapes_key="sq", labels_key="diffst_tissue")
    with pytest.raises(ValueError, match="exactly one"):
        dst.get.aggregate(sdata, key="truth_sr")
    with pytest.raises(ValueError, match="`how`"):
        dst.get.aggregate(sdata, key="truth_sr", shapes_key="sq", how="median")
    with pytest.raises(KeyError, match="shapes_key"):
        dst.get.aggregate(sdata, key="truth_sr", shapes_key="cell_boundary")
