"""Synthetic Xenium / Visium / Visium HD datasets: layouts, units, determinism, shared tissue, realism."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from scipy.spatial import cKDTree
from spatialdata.models import get_model
from spatialdata.transformations import Affine, Identity, Scale, get_transformation

import diffst as dst
from diffst.datasets import _sim as T

SIZE = 600.0
SEED = 3


@pytest.fixture(scope="module")
def xen():
    return dst.datasets.synthetic_xenium(size_um=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def vis():
    return dst.datasets.synthetic_visium(size_um=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def hd():
    return dst.datasets.synthetic_visium_hd(size_um=(SIZE, 400.0), seed=SEED)


@pytest.fixture(scope="module")
def xen_1mm():
    return dst.datasets.synthetic_xenium(size_um=1000, seed=SEED, boundaries=False)


@pytest.fixture(scope="module")
def xen_points(xen):
    return xen.points["transcripts"].compute()


def _matrix(t) -> np.ndarray:
    return t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def _validate(sdata) -> None:
    for _, _name, element in sdata.gen_elements():
        get_model(element).validate(element)
    for name in sdata.tables:
        sdata.validate_table_in_spatialdata(sdata.tables[name])


# ---------------------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------------------
def test_xenium_layout(xen):
    assert set(xen.images) == {"morphology_focus", "he_image"}
    assert set(xen.points) == {"transcripts"}
    assert set(xen.shapes) == {"cell_circles", "cell_boundaries", "nucleus_boundaries"}
    assert set(xen.tables) == {"table"}
    assert xen.coordinate_systems == ["global"]
    assert xen.attrs["spatialdata_io_reader"] == "xenium"
    assert xen.attrs["spatialdata_io_software_version"] == "diffst-synthetic"
    json.dumps(xen.attrs["synthetic"])

    ps = 0.2125
    pts = xen.points["transcripts"]
    t = get_transformation(pts, get_all=True)
    assert set(t) == {"global"} and isinstance(t["global"], Scale)
    np.testing.assert_allclose(_matrix(t["global"])[:2, :2], np.eye(2) / ps)
    assert pts.attrs["spatialdata_attrs"] == {"feature_key": "feature_name", "instance_key": "cell_id"}
    assert list(pts.columns) == ["x", "y", "z", "feature_name", "cell_id", "overlaps_nucleus", "qv", "transcript_id"]
    for name in ("cell_circles", "cell_boundaries", "nucleus_boundaries"):
        t = get_transformation(xen.shapes[name], get_all=True)
        np.testing.assert_allclose(_matrix(t["global"])[:2, :2], np.eye(2) / ps)
    assert "radius" in xen.shapes["cell_circles"]

    dapi = xen.images["morphology_focus"]
    assert list(dapi.children) == [f"scale{k}" for k in range(5)]
    level0 = dapi["scale0"]["image"]
    assert level0.dtype == np.uint16 and list(level0.coords["c"].values) == ["DAPI"]
    assert level0.shape[1:] == (int(np.ceil(SIZE / ps)),) * 2
    assert isinstance(get_transformation(dapi), Identity)

    he = xen.images["he_image"]
    assert he["scale0"]["image"].dtype == np.uint8
    assert list(he["scale0"]["image"].coords["c"].values) == ["r", "g", "b"]
    aff = get_transformation(he)
    assert isinstance(aff, Affine)
    np.testing.assert_allclose(_matrix(aff)[:2, :2], np.eye(2) * 0.5 / ps)

    table = xen.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs == {"region": "cell_circles", "region_key": "region", "instance_key": "cell_id"}
    for col in ("cell_id", "transcript_counts", "cell_area", "nucleus_area", "cell_type", "domain", "region"):
        assert col in table.obs
    assert list(table.var.columns[:2]) == ["gene_ids", "feature_types"]
    assert table.var_names[:3].tolist() == ["EPCAM", "KRT8", "ERBB2"]
    assert table.X.format == "csr" and table.obsm["spatial"].shape == (table.n_obs, 2)
    assert (table.obs["cell_id"].values == xen.shapes["cell_circles"].index.values).all()
    assert set(table.obs["cell_type"].cat.categories) == set(T.CELL_TYPES)
    assert table.obs["cell_type"].nunique() >= 5
    _validate(xen)


def test_visium_layout(vis):
    did = "synthetic_visium"
    assert set(vis.images) == {f"{did}_full_image", f"{did}_hires_image", f"{did}_lowres_image"}
    assert set(vis.shapes) == {did} and set(vis.tables) == {"table"}
    assert set(vis.coordinate_systems) == {did, f"{did}_downscaled_hires", f"{did}_downscaled_lowres"}
    assert vis.attrs["spatialdata_io_reader"] == "visium"
    um_px = 0.5
    circles = vis.shapes[did]
    np.testing.assert_allclose(circles["radius"], 65.0 / 2 / um_px)  # Space Ranger: the width of a 65 µm spot
    t = get_transformation(circles, get_all=True)
    sf = vis.attrs["synthetic"]["scalefactors"]
    assert isinstance(t[did], Identity)
    assert t[f"{did}_downscaled_hires"].axes == ("y", "x")
    np.testing.assert_allclose(t[f"{did}_downscaled_hires"].scale, [sf["tissue_hires_scalef"]] * 2)
    np.testing.assert_allclose(t[f"{did}_downscaled_lowres"].scale, [sf["tissue_lowres_scalef"]] * 2)
    full = vis.images[f"{did}_full_image"]
    assert len(full.children) == 5 and list(full["scale0"]["image"].coords["c"].values) == ["r", "g", "b"]
    for name, cap in (("hires", 2000), ("lowres", 600)):
        img = vis.images[f"{did}_{name}_image"]
        assert max(img.shape[1:]) <= cap and list(img.coords["c"].values) == ["r", "g", "b"]
        t = get_transformation(img, get_all=True)
        assert isinstance(t[f"{did}_downscaled_{name}"], Identity)
        np.testing.assert_allclose(_matrix(t[did])[0, 0], 1 / sf[f"tissue_{name}_scalef"])

    table = vis.tables["table"]
    assert table.uns["spatialdata_attrs"] == {"region": did, "region_key": "region", "instance_key": "spot_id"}
    assert (table.obs["spot_id"].values == np.arange(table.n_obs)).all()
    assert (table.obs["in_tissue"] == 1).all()
    assert table.obs_names.is_unique and all(re.fullmatch(r"[ACGT]{16}-1", b) for b in table.obs_names)
    assert list(table.obs_names) == sorted(table.obs_names)
    assert {"gene_ids", "feature_types", "genome"} <= set(table.var.columns)
    np.testing.assert_allclose(table.obsm["spatial"], np.column_stack([circles.geometry.x, circles.geometry.y]))
    # hexagonal lattice: array_col parity follows array_row; 100 µm pitch; rows 86.6 µm apart
    row, col = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    assert ((row - col) % 2 == 0).all()
    xy_um = table.obsm["spatial"] * um_px
    np.testing.assert_allclose(np.diff(np.unique(np.round(xy_um[:, 1], 6))).min(), 100 * np.sqrt(3) / 2, rtol=1e-6)
    nn = cKDTree(xy_um).query(xy_um, k=2)[0][:, 1]
    np.testing.assert_allclose(nn, 100.0, rtol=1e-6)
    _validate(vis)


def test_visium_hd_layout(hd):
    did = "synthetic_visium_hd"
    assert set(hd.tables) == {"square_002um", "square_008um", "square_016um"}
    assert set(hd.shapes) == {f"{did}_square_{b:03d}um" for b in (2, 8, 16)}
    assert hd.attrs["spatialdata_io_reader"] == "visium_hd"
    um_px = 0.5
    for b in (2, 8, 16):
        table = hd.tables[f"square_{b:03d}um"]
        region = f"{did}_square_{b:03d}um"
        assert table.uns["spatialdata_attrs"] == {
            "region": region,
            "region_key": "region",
            "instance_key": "location_id",
        }
        assert (table.obs["location_id"].values == np.arange(table.n_obs)).all()
        assert re.fullmatch(rf"s_{b:03d}um_\d{{5}}_\d{{5}}-1", table.obs_names[0])
        shapes = hd.shapes[region]
        assert len(shapes) == table.n_obs
        bounds = shapes.geometry.bounds.to_numpy()
        np.testing.assert_allclose(bounds[:, 2] - bounds[:, 0], b / um_px)
        np.testing.assert_allclose((bounds[:, 0] + bounds[:, 2]) / 2, table.obsm["spatial"][:, 0])
        # centres follow array_col / array_row
        np.testing.assert_allclose(table.obsm["spatial"][:, 0], (table.obs["array_col"] + 0.5) * b / um_px)
        t = get_transformation(shapes, get_all=True)
        assert t[f"{did}_downscaled_hires"].axes == ("x", "y")
    _validate(hd)


def test_hd_larger_bins_are_exact_sums_of_2um_bins(hd):
    t2, t8 = hd.tables["square_002um"], hd.tables["square_008um"]
    key2 = dict(zip(zip(t2.obs["array_row"], t2.obs["array_col"], strict=True), range(t2.n_obs), strict=True))
    checked = 0
    for i in np.random.default_rng(0).choice(t8.n_obs, 200, replace=False):
        r, c = t8.obs["array_row"].iat[i], t8.obs["array_col"].iat[i]
        children = [key2.get((4 * r + dr, 4 * c + dc)) for dr in range(4) for dc in range(4)]
        if None in children:  # a child bin off tissue is not in the filtered 2 µm matrix
            continue
        np.testing.assert_array_equal(t2.X[children].sum(axis=0).A1, t8.X[i].toarray().ravel())
        checked += 1
    assert checked > 100


# ---------------------------------------------------------------------------------------------------------------------
# units and alignment
# ---------------------------------------------------------------------------------------------------------------------
def _cells_in_view(table, margin_um, size_um, types):
    obs = table.obs
    xy = table.obsm["spatial"]
    keep = (
        obs["cell_type"].isin(types).to_numpy() & (xy.min(axis=1) > margin_um) & (xy.max(axis=1) < size_um - margin_um)
    )
    return xy[keep]


def test_xenium_cell_centroid_maps_onto_its_nucleus(xen):
    table = xen.tables["table"]
    xy = _cells_in_view(table, 20, SIZE, ["T_cell", "B_cell"])[:40]
    assert len(xy) >= 10
    # µm -> global (morphology pixels) with the transcripts' transformation
    to_global = _matrix(get_transformation(xen.points["transcripts"]))
    g = (to_global @ np.column_stack([xy, np.ones(len(xy))]).T).T[:, :2]
    dapi = xen.images["morphology_focus"]["scale0"]["image"]
    r, c = np.floor(g[:, 1]).astype(int), np.floor(g[:, 0]).astype(int)
    window = dapi.isel(y=slice(r.min() - 2, r.max() + 3), x=slice(c.min() - 2, c.max() + 3)).values[0]
    at_nuclei = window[r - r.min() + 2, c - c.min() + 2].astype(float)
    # a lymphocyte nucleus is ~3 µm in radius: 10 µm away is off the nucleus
    off = window[np.clip(r - r.min() + 2 + 47, 0, window.shape[0] - 1), c - c.min() + 2].astype(float)
    assert np.median(at_nuclei) > 3 * np.median(off)
    assert np.median(at_nuclei) > 15000

    # global -> H&E pixels with the inverse of the H&E Affine: the nucleus is dark purple
    he_t = get_transformation(xen.images["he_image"])
    to_he = np.linalg.inv(_matrix(he_t))
    p = (to_he @ np.column_stack([g, np.ones(len(g))]).T).T[:, :2]
    he = xen.images["he_image"]["scale0"]["image"]
    pr, pc = np.floor(p[:, 1]).astype(int), np.floor(p[:, 0]).astype(int)
    rgb = he.isel(y=slice(pr.min(), pr.max() + 1), x=slice(pc.min(), pc.max() + 1)).values
    px = rgb[:, pr - pr.min(), pc - pc.min()].astype(float)
    assert np.median(px.sum(axis=0)) < 420  # dark (the background is ~700)
    assert np.median(px[2] - px[1]) > 30  # blue over green: hematoxylin


def test_rotated_he_is_aligned():
    sdata = dst.datasets.synthetic_xenium(size_um=300, seed=SEED, he_rotation_deg=30.0, he_um_per_px=0.4)
    aff = _matrix(get_transformation(sdata.images["he_image"]))
    th = np.deg2rad(30)
    np.testing.assert_allclose(
        aff[:2, :2], 0.4 / 0.2125 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    )
    table = sdata.tables["table"]
    xy = _cells_in_view(table, 20, 300, ["T_cell", "B_cell", "fibroblast", "tumour_epithelial"])[:30]
    g = xy / 0.2125
    p = (np.linalg.inv(aff) @ np.column_stack([g, np.ones(len(g))]).T).T[:, :2]
    he = sdata.images["he_image"]["scale0"]["image"].values.astype(float)
    at = he[:, np.floor(p[:, 1]).astype(int), np.floor(p[:, 0]).astype(int)].sum(axis=0)
    assert np.median(at) < 450


def test_pyramid_levels_agree(vis):
    full = vis.images["synthetic_visium_full_image"]
    l0 = full["scale0"]["image"].isel(y=slice(0, 512), x=slice(0, 512)).values.astype(float)
    l2 = full["scale2"]["image"].isel(y=slice(0, 128), x=slice(0, 128)).values.astype(float)
    down = l0.reshape(3, 128, 4, 128, 4).mean(axis=(2, 4))
    assert np.abs(down - l2).mean() < 12
    assert np.corrcoef(down.ravel(), l2.ravel())[0, 1] > 0.8


# ---------------------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_data_different_seed_different(xen, xen_points):
    again = dst.datasets.synthetic_xenium(size_um=SIZE, seed=SEED)
    pd.testing.assert_frame_equal(again.points["transcripts"].compute(), xen_points)
    crop = {"y": slice(1000, 1400), "x": slice(900, 1300)}
    a = xen.images["morphology_focus"]["scale0"]["image"].isel(**crop).values
    b = again.images["morphology_focus"]["scale0"]["image"].isel(**crop).values
    np.testing.assert_array_equal(a, b)
    other = dst.datasets.synthetic_xenium(size_um=SIZE, seed=SEED + 1)
    assert len(other.points["transcripts"]) != len(xen_points)
    c = other.images["morphology_focus"]["scale0"]["image"].isel(**crop).values
    assert np.abs(a.astype(float) - c).mean() > 500


def test_pixels_do_not_depend_on_chunking():
    tissue = T.simulate_tissue(400, 400, seed=SEED)
    aff = np.array([[0.5, 0, 0], [0, 0.5, 0]])
    whole = T.render(tissue, "he", aff, (100, 420), (60, 380))
    part = T.render(tissue, "he", aff, (237, 300), (123, 311))
    np.testing.assert_array_equal(whole[:, 137:200, 63:251], part)
    rot = np.array([[0.3, -0.2, 150.0], [0.2, 0.3, 20.0]])
    whole = T.render(tissue, "dapi", rot, (0, 300), (0, 300))
    part = T.render(tissue, "dapi", rot, (101, 170), (40, 90))
    np.testing.assert_array_equal(whole[:, 101:170, 40:90], part)


# ---------------------------------------------------------------------------------------------------------------------
# one tissue, three assays
# ---------------------------------------------------------------------------------------------------------------------
def test_visium_measures_the_xenium_tissue(xen, xen_points, vis):
    eff = vis.attrs["synthetic"]["capture_efficiency"]
    table = vis.tables["table"]
    centres = table.obsm["spatial"] * 0.5
    # the same cells: cells centred in each disc, counted from the Xenium table
    cells = xen.tables["table"]
    tree = cKDTree(cells.obsm["spatial"])
    n_cells = np.array([len(v) for v in tree.query_ball_point(centres, 27.5)])
    np.testing.assert_array_equal(n_cells, table.obs["n_cells"].to_numpy())
    np.testing.assert_array_equal(n_cells, table.obsm["cell_type_counts"].to_numpy().sum(axis=1))
    # the same molecules: a spot's counts are ~ efficiency x the Xenium gene molecules in its disc
    genes = xen_points["feature_name"].isin(cells.var_names) & (xen_points["cell_id"] != "UNASSIGNED")
    xy = xen_points.loc[genes, ["x", "y"]].to_numpy()
    in_disc = np.array([len(v) for v in cKDTree(xy).query_ball_point(centres, 27.5)])
    counts = np.asarray(table.X.sum(axis=1)).ravel()
    busy = in_disc > 200
    assert busy.sum() >= 10
    ratio = counts[busy].sum() / in_disc[busy].sum()
    assert abs(ratio - eff) < 0.1 * eff
    # per spot within Poisson (plus diffusion and ambient) tolerance
    z = (counts[busy] - eff * in_disc[busy]) / np.sqrt(eff * in_disc[busy])
    assert np.median(np.abs(z)) < 2.5
    assert np.corrcoef(counts, in_disc)[0, 1] > 0.95


def test_visium_hd_measures_the_same_tissue(hd):
    xen = dst.datasets.synthetic_xenium(size_um=(SIZE, 400.0), seed=SEED, boundaries=False)
    pts = xen.points["transcripts"].compute()
    genes = pts["feature_name"].isin(xen.tables["table"].var_names) & (pts["cell_id"] != "UNASSIGNED")
    eff = hd.attrs["synthetic"]["capture_efficiency"]
    t16 = hd.tables["square_016um"]
    col, row = np.floor(pts.loc[genes, "x"] / 16).astype(int), np.floor(pts.loc[genes, "y"] / 16).astype(int)
    xen_bins = pd.Series(1, index=pd.MultiIndex.from_arrays([row, col])).groupby(level=[0, 1]).sum()
    idx = pd.MultiIndex.from_arrays([t16.obs["array_row"], t16.obs["array_col"]])
    expected = eff * xen_bins.reindex(idx, fill_value=0).to_numpy()
    counts = np.asarray(t16.X.sum(axis=1)).ravel()
    assert np.corrcoef(counts, expected)[0, 1] > 0.9
    assert abs(counts.sum() / expected.sum() - 1) < 0.15


# ---------------------------------------------------------------------------------------------------------------------
# biology and image content
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gene", "cell_type"),
    [
        ("CD3E", "T_cell"),
        ("MS4A1", "B_cell"),
        ("CD68", "macrophage"),
        ("PECAM1", "endothelial"),
        ("COL1A1", "fibroblast"),
        ("EPCAM", "tumour_epithelial"),
        ("ADIPOQ", "adipocyte"),
    ],
)
def test_markers_concentrate_in_their_cell_type(gene, cell_type, xen_1mm):
    table = xen_1mm.tables["table"]
    x = table[:, gene].X.toarray().ravel() / np.maximum(table.obs["transcript_counts"].to_numpy(), 1)
    is_type = (table.obs["cell_type"] == cell_type).to_numpy()
    assert is_type.sum() >= 3
    assert x[is_type].mean() > 5 * x[~is_type].mean()


def test_co_expression_modules_and_gradients():
    tissue = T.simulate_tissue(1000, 1000, seed=SEED)
    panel = T.gene_panel(300, seed=SEED)
    tum = tissue.cells["type"] == T.TUM
    lam = np.exp(panel.log_expression(tissue, np.flatnonzero(tum)))
    names = panel.names
    corr = np.corrcoef(np.log(lam[:, [names.index(g) for g in ("ERBB2", "GRB7", "ESR1", "MKI67", "TOP2A")]]).T)
    assert corr[0, 1] > 0.8  # the ERBB2 amplicon
    assert corr[0, 2] < -0.3  # ERBB2 clone vs luminal ESR1 clone
    assert corr[3, 4] > 0.8  # proliferation
    assert panel.gradient_loading[names.index("SCGB2A2")] != 0
    # a small panel is the start of a larger one
    small = T.gene_panel(50, seed=SEED)
    assert small.names == names[:50]
    np.testing.assert_array_equal(small.type_log, panel.type_log[:, :50])
    assert len(set(names)) == 300 and not any(n.startswith("GENE") for n in names)


def test_many_structures_are_smaller_than_a_visium_spot():
    tissue = T.simulate_tissue(1500, 1500, seed=SEED)
    from scipy import ndimage

    sizes = []
    for dom in (T.VESSEL, T.GLAND, T.IMMUNE, T.TUMOUR):
        lab, n = ndimage.label(tissue.domain == dom)
        sizes.append(np.bincount(lab.ravel())[1:] * tissue.grid_um**2)
    sizes = np.concatenate(sizes)
    spot_area = np.pi * 27.5**2
    assert (sizes < spot_area).sum() >= 50
    assert sizes.max() > 1e5  # and large tumour nests too
    assert tissue.summary["n_glands"] > 0 and tissue.summary["n_vessels"] > 20
    assert 0.5 < tissue.tissue.mean() < 0.95


def test_image_shows_cell_types(xen):
    """A nearest-centroid classifier on H&E pixels around each nucleus recovers the cell type far above chance."""
    table = xen.tables["table"]
    types = ["tumour_epithelial", "fibroblast", "T_cell", "macrophage", "endothelial", "normal_epithelial"]
    obs = table.obs
    xy = table.obsm["spatial"]
    keep = obs["cell_type"].isin(types).to_numpy() & (xy.min(axis=1) > 15) & (xy.max(axis=1) < SIZE - 15)
    xy, y_true = xy[keep], obs["cell_type"].to_numpy()[keep]
    he_px = 0.5
    he = xen.images["he_image"]["scale0"]["image"]
    aff_um = np.linalg.inv(_matrix(get_transformation(he))) @ np.diag([1 / 0.2125, 1 / 0.2125, 1])
    img = he.values.astype(np.float32)
    feats = []
    offs = np.arange(-12, 13)
    oy, ox = np.meshgrid(offs, offs, indexing="ij")
    rad = np.hypot(oy, ox) * he_px
    rings = [(rad <= 1.5), (rad > 1.5) & (rad <= 3.5), (rad > 3.5) & (rad <= 6)]
    p = (aff_um @ np.column_stack([xy, np.ones(len(xy))]).T).T[:, :2]
    for cx, cy in p:
        r, c = int(cy), int(cx)
        patch = img[:, r - 12 : r + 13, c - 12 : c + 13]
        feats.append(np.concatenate([patch[:, m].mean(axis=1) for m in rings]))
    feats = np.array(feats)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    rng = np.random.default_rng(0)
    train = rng.random(len(feats)) < 0.5
    labels = sorted(set(y_true))
    cent = np.array([feats[train & (y_true == k)].mean(0) for k in labels])
    pred = np.array(labels)[np.argmin(((feats[~train, None, :] - cent[None]) ** 2).sum(-1), axis=1)]
    acc = (pred == y_true[~train]).mean()
    chance = max((y_true[~train] == k).mean() for k in labels)
    assert acc > chance + 0.2, (acc, chance)


def test_transcripts_and_controls(xen, xen_points):
    pts = xen_points
    names = pts["feature_name"].astype(str)
    for prefix in T.CONTROL_PREFIXES:
        assert names.str.startswith(prefix).sum() > 0, prefix
    n_ctrl = names.str.match("|".join(T.CONTROL_PREFIXES)).sum()
    assert 0.001 < n_ctrl / len(pts) < 0.02
    assert (pts["cell_id"] == "UNASSIGNED").mean() > 0.005
    assert pts["qv"].between(0, 40).all() and pts["qv"].median() > 30
    assert pts["z"].between(0, 25).all()
    assert set(np.unique(pts["overlaps_nucleus"])) == {0, 1}
    assert pts["transcript_id"].is_unique
    assert pts["x"].between(0, SIZE).all() and pts["y"].between(0, SIZE).all()
    # the table counts the gene molecules assigned to each cell
    table = xen.tables["table"]
    assigned = pts[(pts["cell_id"] != "UNASSIGNED") & names.isin(table.var_names)]
    per_cell = assigned.groupby("cell_id", observed=True).size()
    np.testing.assert_array_equal(
        per_cell.reindex(table.obs_names, fill_value=0).to_numpy(), table.obs["transcript_counts"]
    )
    # transcripts sit around their cell: most within ~2 cell radii of the centroid
    centres = pd.DataFrame(table.obsm["spatial"], index=table.obs_names, columns=["cx", "cy"])
    sample = assigned.sample(5000, random_state=0).join(centres, on="cell_id")
    d = np.hypot(sample["x"] - sample["cx"], sample["y"] - sample["cy"])
    radius = np.sqrt(table.obs.loc[sample["cell_id"], "cell_area"].to_numpy() / np.pi)
    assert np.mean(d < 2 * radius) > 0.97
    mean_tpc = table.obs["transcript_counts"].mean()
    assert 30 < mean_tpc < 70


def test_transcripts_per_cell_scales_counts():
    a = dst.datasets.synthetic_xenium(size_um=300, seed=SEED, transcripts_per_cell=20, boundaries=False)
    b = dst.datasets.synthetic_xenium(size_um=300, seed=SEED, transcripts_per_cell=80, boundaries=False)
    ratio = len(b.points["transcripts"]) / len(a.points["transcripts"])
    assert 3.6 < ratio < 4.4
    assert a.tables["table"].n_obs == b.tables["table"].n_obs


def test_default_sizes_and_transcript_budget():
    from diffst.datasets._synthetic import _size

    assert _size("default") == (3000.0, 3000.0)
    assert _size("slide") == (6500.0, 6500.0)
    assert _size((500, 700)) == (500.0, 700.0)
    assert 40 <= T.default_transcripts_per_cell(50) <= 80
    # ~10 M transcripts for the benchmark slide: cells per mm² of tissue x tissue area x molecules per cell
    tissue = T.simulate_tissue(1500, 1500, seed=0)
    n_cells_slide = tissue.summary["cells_per_mm2"] * 0.8 * 6.5**2
    estimate = n_cells_slide * T.default_transcripts_per_cell(300) * 1.027
    assert 8.5e6 < estimate < 11.5e6


# ---------------------------------------------------------------------------------------------------------------------
# arguments and storage
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (dst.datasets.synthetic_xenium, {"size_um": "huge"}, "size_um='huge'"),
        (dst.datasets.synthetic_xenium, {"size_um": 20}, "between 100 and 25000"),
        (dst.datasets.synthetic_xenium, {"size_um": (500, 1e6)}, "out of range"),
        (dst.datasets.synthetic_xenium, {"n_genes": 0}, "n_genes=0"),
        (dst.datasets.synthetic_xenium, {"n_genes": 2.5}, "integer"),
        (dst.datasets.synthetic_xenium, {"seed": -1}, "seed=-1"),
        (dst.datasets.synthetic_xenium, {"transcripts_per_cell": 0}, "transcripts_per_cell=0"),
        (dst.datasets.synthetic_xenium, {"pixel_size_um": float("nan")}, "pixel_size_um"),
        (dst.datasets.synthetic_visium, {"capture_efficiency": 1.5}, "capture_efficiency=1.5"),
        (dst.datasets.synthetic_visium, {"dataset_id": "a b"}, "dataset_id='a b'"),
        (dst.datasets.synthetic_visium_hd, {"bin_sizes": (2, 7)}, "even"),
        (dst.datasets.synthetic_visium_hd, {"bin_sizes": ()}, "non-empty"),
    ],
)
def test_bad_arguments(fn, kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        fn(**kwargs)


@pytest.mark.slow  # three datasets written and read back: the slowest of the quick suite
def test_zarr_round_trip(tmp_path):
    for name, sdata in {
        "xenium": dst.datasets.synthetic_xenium(size_um=150, seed=SEED),
        "visium": dst.datasets.synthetic_visium(size_um=250, seed=SEED, dataset_id="vis1"),
        "visium_hd": dst.datasets.synthetic_visium_hd(size_um=150, seed=SEED, bin_sizes=(2, 16)),
    }.items():
        path = tmp_path / f"{name}.zarr"
        sdata.write(path)
        back = sd.read_zarr(path)
        assert set(back.images) == set(sdata.images) and set(back.shapes) == set(sdata.shapes)
        assert set(back.points) == set(sdata.points) and set(back.tables) == set(sdata.tables)
        for _, key, element in sdata.gen_spatial_elements():
            before, after = get_transformation(element, get_all=True), get_transformation(back[key], get_all=True)
            assert set(after) == set(before), key
            for cs in before:
                np.testing.assert_allclose(_matrix(after[cs]), _matrix(before[cs]), err_msg=f"{key} {cs}")
        for key in sdata.images:
            img, img2 = sdata[key], back[key]
            level = (lambda e: e["scale0"]["image"]) if hasattr(img, "children") else (lambda e: e)
            assert list(level(img2).coords["c"].values) == list(level(img).coords["c"].values)
            np.testing.assert_array_equal(level(img2).values[:, :50, :50], level(img).values[:, :50, :50])
        assert back.attrs["spatialdata_io_reader"] == name
        assert back.attrs["synthetic"]["seed"] == SEED
        for key in sdata.tables:
            assert (back[key].obs_names == sdata[key].obs_names).all()
            assert back[key].uns["spatialdata_attrs"] == sdata[key].uns["spatialdata_attrs"]


def _digest(sdata) -> str:
    """SHA-256 (first 16 hex digits) of every element's values, in a fixed order."""
    import hashlib

    from diffst._spatial import image_levels

    h = hashlib.sha256()
    for kind in ("images", "labels", "points", "shapes", "tables"):
        for name in sorted(getattr(sdata, kind)):
            el = getattr(sdata, kind)[name]
            h.update(f"{kind}/{name}".encode())
            if kind in ("images", "labels"):
                h.update(np.ascontiguousarray(image_levels(el)[0].values).tobytes())
            elif kind == "points":
                df = el.compute()
                for c in sorted(df.columns):
                    h.update(c.encode() + pd.util.hash_pandas_object(df[c], index=False).to_numpy().tobytes())
            elif kind == "shapes":
                h.update(np.ascontiguousarray(el.geometry.bounds.to_numpy()).tobytes())
                for c in sorted(c for c in el.columns if c != "geometry"):
                    h.update(c.encode() + pd.util.hash_pandas_object(el[c], index=False).to_numpy().tobytes())
            else:
                x = el.X.toarray() if hasattr(el.X, "toarray") else np.asarray(el.X)
                h.update(np.ascontiguousarray(x).tobytes())
                h.update(pd.util.hash_pandas_object(el.obs.astype(str), index=True).to_numpy().tobytes())
                h.update("|".join(map(str, el.var_names)).encode())
    return h.hexdigest()[:16]


@pytest.mark.slow  # digests of every element of three datasets
def test_the_same_seed_gives_the_same_datasets_as_before_the_simulator_was_split(xen, vis, hd):
    """Pinned digests of every element, computed with the single-module simulator (diffst 0.1.0.dev0)."""
    assert _digest(xen) == "9ec53e0cf59b6813"
    assert _digest(vis) == "fa6588da8a1c9bdc"
    assert _digest(hd) == "2b41ee9928d3e74f"
