"""diffst on what spatialdata-io's own readers make of (small but complete) 10x Genomics output folders.

The folders are written by :mod:`tests.tenx` from diffst's synthetic tissue, read back with ``spatialdata_io.visium``,
``visium_hd`` and ``xenium``, checked at the reader level (that the folders are what 10x writes), then prepared,
trained and super-resolved with diffst, with the ground truth of the written folders as reference.
"""

from __future__ import annotations

import numpy as np
import pytest

spatialdata_io = pytest.importorskip("spatialdata_io")

import spatialdata as sd  # noqa: E402
import tifffile  # noqa: E402
from spatialdata.transformations import get_transformation  # noqa: E402

import diffst as dst  # noqa: E402
from diffst._degradation import degradation_for  # noqa: E402
from diffst._grid import Grid  # noqa: E402
from diffst._image import ImageSpec  # noqa: E402
from diffst.tl._data import Prepared  # noqa: E402

from .tenx import VISIUM_SCALEFACTOR_SPOT_UM, XENIUM_STAINS, from_synthetic  # noqa: E402

VISIUM_SIZE_UM = 600.0
HD_SIZE_UM = 400.0
XENIUM_SIZE_UM = 400.0


@pytest.fixture(autouse=True)
def _quiet():
    before = dst.settings.verbosity
    dst.settings.verbosity = 0
    yield
    dst.settings.verbosity = before


def _affine(element, cs):
    return np.asarray(get_transformation(element, to_coordinate_system=cs).to_affine_matrix(("x", "y"), ("x", "y")))


def _level0(image):
    if hasattr(image, "children") and image.children:
        return image[next(iter(image.children))]["image"]
    return image


def _to_pixels(element, cs, x, y):
    """Continuous pixel coordinates (col, row) of points (x, y) of ``cs`` in a raster element."""
    inv = np.linalg.inv(_affine(element, cs))
    p = inv @ np.vstack([np.asarray(x, float), np.asarray(y, float), np.ones(len(np.atleast_1d(x)))])
    return p[0], p[1]


def _histogram(element, cs, x, y, weights=None):
    """Sum of ``weights`` per pixel of ``element`` for points (x, y) of ``cs`` (those outside are dropped)."""
    h, w = _level0(element).shape[-2:]
    col, row = _to_pixels(element, cs, x, y)
    col, row = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
    ok = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    wts = np.ones(len(col)) if weights is None else np.asarray(weights, float)
    return np.bincount(row[ok] * w + col[ok], weights=wts[ok], minlength=h * w).reshape(h, w)


def _train_a_few_steps(sdata, run):
    """One epoch of the tiny preset: enough to run super_resolve through a trained model's code path."""
    return dst.tl.train(
        sdata, preset="tiny", max_epochs=1, val_steps=2, guard=False, time_budget=None, checkpoint_dir=run
    )


# ====================================================================================================================
# Visium
# ====================================================================================================================
@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    return from_synthetic("visium", tmp_path_factory.mktemp("visium") / "outs", size_um=VISIUM_SIZE_UM)


def _read_visium(folder, fullres=False):
    kw = folder.reader_kwargs()
    if fullres:
        kw["fullres_image_file"] = folder.fullres_image
    return spatialdata_io.visium(folder.path, **kw)


@pytest.mark.parametrize("positions", ["csv", "csv_v1", "csv_v1_header"])
def test_visium_folder_reads_back(tmp_path, positions):
    folder = from_synthetic("visium", tmp_path / "outs", size_um=VISIUM_SIZE_UM, positions=positions)
    sdata = _read_visium(folder)
    ds = folder.dataset_id
    spots = folder.truth["spots"].set_index("barcode")
    u = folder.um_per_px

    # shapes: one circle per in-tissue spot, radius = spot_diameter_fullres / 2 = 32.5 µm in full-res pixels
    circles = sdata.shapes[ds]
    table = sdata["table"]
    assert table.n_obs == int(spots["in_tissue"].sum()) == len(circles)
    assert np.allclose(circles["radius"], VISIUM_SCALEFACTOR_SPOT_UM / u / 2)
    # spot centres are the pixel coordinates written, matched by barcode
    geom = circles.geometry.loc[table.obs["spot_id"].to_numpy()]
    truth = spots.loc[table.obs_names]
    assert np.allclose(geom.x.to_numpy(), truth["pxl_col"].to_numpy())
    assert np.allclose(geom.y.to_numpy(), truth["pxl_row"].to_numpy())
    assert np.allclose(table.obsm["spatial"], truth[["pxl_col", "pxl_row"]].to_numpy())
    # array indices stay in obs; the hexagonal lattice has array_row + array_col even
    assert (table.obs["array_row"].to_numpy() == truth["array_row"].to_numpy()).all()
    assert (table.obs["array_col"].to_numpy() == truth["array_col"].to_numpy()).all()
    assert ((table.obs["array_row"] + table.obs["array_col"]) % 2 == 0).all()
    # counts by barcode
    idx = folder.truth["spots"].reset_index().set_index("barcode").loc[table.obs_names, "index"].to_numpy()
    assert np.array_equal(np.asarray(table.X.todense()), folder.truth["counts"][idx])
    assert list(table.var_names) == folder.genes
    # images: hires and lowres, mapped onto full-resolution pixels
    assert {f"{ds}_hires_image", f"{ds}_lowres_image"} <= set(sdata.images)
    for name in ("hires", "lowres"):
        img = sdata[f"{ds}_{name}_image"]
        m = _affine(img, ds)
        assert img.sizes["c"] == 3
        # the whole downscaled image covers the whole full-resolution one
        h, w = img.shape[-2:]
        x1, y1, _ = m @ np.array([w, h, 1.0])
        he_h, he_w = _fullres_shape(folder)
        assert x1 == pytest.approx(he_w, rel=0.01) and y1 == pytest.approx(he_h, rel=0.01)


def test_visium_library_id_prefix(tmp_path):
    """Downloaded datasets prefix the counts file with the library id; the reader names the elements after it."""
    folder = from_synthetic("visium", tmp_path / "outs", size_um=300, library_id="V1_Sample")
    assert (folder.path / "V1_Sample_filtered_feature_bc_matrix.h5").exists()
    sdata = spatialdata_io.visium(folder.path)
    assert "V1_Sample" in sdata.shapes and "V1_Sample_hires_image" in sdata.images
    dst.pp.prepare(sdata, genes=5, lr_um=100, scale=10, tile_um=100)
    assert sdata.attrs["diffst"]["um_per_px"] == pytest.approx(folder.um_per_px, rel=0.02)


def _fullres_shape(folder):
    with tifffile.TiffFile(folder.fullres_image) as tif:
        return tif.pages[0].shape[:2]


def test_visium_fullres_image_reads_back(visium):
    sdata = _read_visium(visium, fullres=True)
    ds = visium.dataset_id
    full = sdata[f"{ds}_full_image"]
    arr = np.asarray(_level0(full).values)
    assert np.array_equal(np.moveaxis(arr, 0, -1), tifffile.imread(visium.fullres_image))
    assert np.allclose(_affine(full, ds), np.eye(3))


@pytest.mark.parametrize("fullres", [False, True], ids=["hires", "fullres"])
def test_visium_prepare_um_per_px(visium, fullres):
    """10x's spot_diameter_fullres is a 65 µm spot: µm per full-resolution pixel must come out exactly."""
    sdata = _read_visium(visium, fullres=fullres)
    dst.pp.prepare(sdata, genes=5, lr_um=100, scale=10, tile_um=200)
    attrs = sdata.attrs["diffst"]
    assert attrs["coordinate_system"] == visium.dataset_id
    assert attrs["sources"]["image_key"].endswith("_full_image" if fullres else "_hires_image")
    assert attrs["um_per_px"] == pytest.approx(visium.um_per_px, rel=0.02)
    # an LR pixel spans lr_um of tissue
    m = _affine(sdata["diffst_lr"], visium.dataset_id)
    assert np.hypot(*m[:2, 0]) * visium.um_per_px == pytest.approx(100.0, rel=0.02)


def test_a_coarse_image_in_place_of_the_full_resolution_one_is_a_warning_with_the_fix(visium, log_lines):
    """The reader skips a ``fullres_image_file`` it cannot find beside the outs folder (a relative name); prepare
    then only has Space Ranger's downscaled images (on a whole slide the hires one is several µm per pixel) and says
    how to give it the full one."""
    import shutil

    elsewhere = visium.path.parent / "images"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(visium.fullres_image, elsewhere / "slide.tif")
    sdata = spatialdata_io.visium(visium.path, **visium.reader_kwargs(), fullres_image_file="slide.tif")
    assert not any(k.endswith("_full_image") for k in sdata.images)  # skipped: it is not under outs/
    lowres = f"{visium.dataset_id}_lowres_image"  # as coarse as the hires image of a whole slide
    dst.pp.prepare(sdata, genes=5, lr_um=100, scale=10, tile_um=200, image_key=lowres)
    assert sdata.attrs["diffst"]["image"]["image_um_per_px"] > 3.0
    assert any("coarser than the 2 µm per pixel" in line and "fullres_image_file" in line for line in log_lines)
    log_lines.clear()
    full = spatialdata_io.visium(visium.path, **visium.reader_kwargs(), fullres_image_file=elsewhere / "slide.tif")
    dst.pp.prepare(full, genes=5, lr_um=100, scale=10, tile_um=200)  # an absolute path: read, no warning
    assert full.attrs["diffst"]["image"]["image_um_per_px"] < 3.0
    assert not any("coarser than" in line for line in log_lines)


def test_visium_image_kind_rgb(visium):
    sdata = _read_visium(visium)
    image_key = f"{visium.dataset_id}_hires_image"
    # spatialdata 0.7 names the channels of 3-channel images r, g, b when the reader passes rgb=None
    assert [str(c) for c in sdata[image_key].coords["c"].values] == ["r", "g", "b"]
    dst.pp.prepare(sdata, genes=5, lr_um=100, scale=10, tile_um=200)
    assert sdata.attrs["diffst"]["image"]["kind"] == "rgb"


@pytest.mark.parametrize("names", [["0", "1", "2"], [0, 1, 2]], ids=["str", "int"])
def test_visium_image_kind_rgb_unnamed_channels(visium, names):
    """An H&E whose channels are named 0, 1, 2 (images parsed without channel names, older spatialdata/-io stores):
    diffst must still see a brightfield RGB image."""
    sdata = _read_visium(visium)
    image_key = f"{visium.dataset_id}_hires_image"
    sdata.images[image_key] = sdata[image_key].assign_coords(c=names)
    assert list(sdata[image_key].coords["c"].values) == names
    dst.pp.prepare(sdata, genes=5, lr_um=100, scale=10, tile_um=200)
    assert sdata.attrs["diffst"]["image"]["kind"] == "rgb"


def test_visium_spot_counts_land_under_their_spots(visium):
    """Each spot's counts sit in the LR pixel that, by the LR element's transformation, holds the spot centre."""
    sdata = _read_visium(visium, fullres=True)
    dst.pp.prepare(sdata, genes=5, lr_um=100, scale=10, tile_um=200)
    attrs = sdata.attrs["diffst"]
    ds = visium.dataset_id
    spots = visium.truth["spots"]
    counts = visium.truth["counts"]
    lr = sdata["diffst_lr"]
    for gene in attrs["genes"][:3]:
        g = visium.genes.index(gene)
        expected = _histogram(lr, ds, spots["pxl_col"], spots["pxl_row"], counts[:, g])
        assert np.allclose(lr.sel(c=gene).values, expected)
    # the grid agrees with the element's transformation
    grid = Grid.from_dict(attrs["grid"])
    u = attrs["um_per_px"]
    row, col = grid.pixel_index(spots["pxl_col"].to_numpy() * u, spots["pxl_row"].to_numpy() * u, level="lr")
    c2, r2 = _to_pixels(lr, ds, spots["pxl_col"], spots["pxl_row"])
    inside = (row >= 0) & (row < grid.lr_shape[0]) & (col >= 0) & (col < grid.lr_shape[1])
    assert inside.sum() > 10
    assert np.array_equal(row[inside], np.floor(r2[inside]).astype(int))
    assert np.array_equal(col[inside], np.floor(c2[inside]).astype(int))


def test_visium_zarr_round_trip(visium, tmp_path):
    sdata = _read_visium(visium, fullres=True)
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    ds = visium.dataset_id
    assert set(back.images) == set(sdata.images)
    assert np.allclose(back.shapes[ds]["radius"], sdata.shapes[ds]["radius"])
    dst.pp.prepare(back, genes=5, lr_um=100, scale=10, tile_um=200)
    attrs = back.attrs["diffst"]
    assert attrs["sources"]["image_key"] == f"{ds}_full_image"
    assert attrs["um_per_px"] == pytest.approx(visium.um_per_px, rel=0.02)
    assert attrs["image"]["kind"] == "rgb"
    # prepare wrote into the backed store
    again = sd.read_zarr(tmp_path / "s.zarr")
    assert "diffst_lr" in again.images


@pytest.mark.slow
def test_visium_slide_alone_trains_from_its_spots_and_super_resolves(tmp_path):
    """The one-call path for the commonest user: a Space Ranger folder, no HR data, read by spatialdata-io."""
    folder = from_synthetic("visium", tmp_path / "outs", size_um=2000.0)
    sdata = _read_visium(folder, fullres=True)
    dst.pp.prepare(sdata, genes=5, lr_um=100, scale=10, tile_um=400)
    model = dst.tl.train(sdata, preset="tiny", max_epochs=2, time_budget=None, checkpoint_dir=tmp_path / "run")
    assert model.config.supervision == "lr"
    assert model.guard.spots > 0
    dst.tl.super_resolve(sdata, model=model, n_samples=2)
    prep = Prepared.from_sdata(sdata, "diffst")
    mean = np.asarray(_level0(sdata.images["diffst_sr"]).values, dtype=np.float64)
    lr = np.asarray(sdata["diffst_lr"].values)
    # each measured spot's counts are kept exactly, on the slide's own spots in its pixel frame
    np.testing.assert_allclose(degradation_for(sdata, prep).degrade(mean), lr, rtol=1e-4, atol=1e-3)
    # 10 µm HR pixels in the slide's full-resolution pixel frame
    m = _affine(_level0(sdata.images["diffst_sr"]), folder.dataset_id)
    assert np.hypot(*m[:2, 0]) * folder.um_per_px == pytest.approx(10.0, rel=0.02)


# ====================================================================================================================
# Visium HD
# ====================================================================================================================
@pytest.fixture(scope="module")
def visium_hd(tmp_path_factory):
    return from_synthetic("visium_hd", tmp_path_factory.mktemp("visium_hd") / "outs", size_um=HD_SIZE_UM)


def _read_hd(folder, **kw):
    kw = {"load_segmentations_only": False} | kw
    return spatialdata_io.visium_hd(folder.path, **folder.reader_kwargs(), **kw)


def _block_sums(hr, s):
    """Sum of every ``s × s`` block of ``(..., H, W)`` (what bin degradation does)."""
    *lead, h, w = hr.shape
    return hr.reshape(*lead, h // s, s, w // s, s).sum(axis=(-3, -1))


def _aggregate(counts, k):
    r, c, g = counts.shape
    rr, cc = -(-r // k), -(-c // k)
    pad = np.zeros((rr * k, cc * k, g), counts.dtype)
    pad[:r, :c] = counts
    return pad.reshape(rr, k, cc, k, g).sum(axis=(1, 3))


def test_visium_hd_folder_reads_back(visium_hd):
    sdata = _read_hd(visium_hd)
    ds = visium_hd.dataset_id
    u = visium_hd.um_per_px
    x0, y0 = visium_hd.truth["origin_px"]
    assert {"square_002um", "square_008um", "square_016um"} <= set(sdata.tables)
    assert {f"{ds}_full_image", f"{ds}_hires_image", f"{ds}_lowres_image"} <= set(sdata.images)
    for b in (2, 8, 16):
        table = sdata[f"square_{b:03d}um"]
        shapes = sdata[f"{ds}_square_{b:03d}um"]
        assert table.uns["spatialdata_attrs"]["region"] == f"{ds}_square_{b:03d}um"
        geom = shapes.geometry.loc[table.obs["location_id"].to_numpy()]
        # squares of side b µm, centred on the bin centres written
        assert np.allclose(np.sqrt(geom.area), b / u)
        r = table.obs["array_row"].to_numpy()
        c = table.obs["array_col"].to_numpy()
        assert np.allclose(geom.centroid.x, x0 + (c + 0.5) * b / u)
        assert np.allclose(geom.centroid.y, y0 + (r + 0.5) * b / u)
        agg = _aggregate(visium_hd.truth["counts"], b // 2)
        assert np.array_equal(np.asarray(table.X.todense()), agg[r, c])


@pytest.mark.parametrize(
    ("fullres", "prefix"),
    [("tissue_image", "Sample_"), ("microscope_image", ""), (None, "")],
    ids=["prefixed-tissue_image", "microscope_image", "fullres_image_file"],
)
def test_visium_hd_fullres_image_locations(tmp_path, fullres, prefix):
    folder = from_synthetic("visium_hd", tmp_path / "outs", size_um=200, fullres=fullres, prefix=prefix)
    kw = {"fullres_image_file": folder.fullres_image} if fullres is None else {}
    sdata = spatialdata_io.visium_hd(folder.path, **folder.reader_kwargs(), load_segmentations_only=False, **kw)
    ds = folder.dataset_id or prefix.rstrip("_")
    assert f"{ds}_full_image" in sdata.images and f"{ds}_square_002um" in sdata.shapes
    full = _level0(sdata[f"{ds}_full_image"])
    assert full.shape[-2:] == tifffile.imread(folder.fullres_image).shape[:2]
    dst.pp.prepare(sdata, genes=5, lr_um=80, scale=10, tile_um=80)
    attrs = sdata.attrs["diffst"]
    assert attrs["sources"]["image_key"] == f"{ds}_full_image"
    assert attrs["um_per_px"] == pytest.approx(folder.um_per_px, rel=0.02)


def test_visium_hd_prepare_squares(visium_hd):
    sdata = _read_hd(visium_hd)
    dst.pp.prepare(sdata, genes=5, lr_um=80, scale=10, tile_um=160)
    attrs = sdata.attrs["diffst"]
    assert attrs["sources"]["table_key"] == "square_008um"
    assert attrs["um_per_px"] == pytest.approx(visium_hd.um_per_px, rel=0.02)
    _check_hd_hr(sdata, visium_hd)


def _check_hd_hr(sdata, folder):
    """Each 8 µm bin's counts land in the HR pixel under its centre (by the HR element's transformation)."""
    attrs = sdata.attrs["diffst"]
    cs = attrs["coordinate_system"]
    u = folder.um_per_px
    x0, y0 = folder.truth["origin_px"]
    agg = _aggregate(folder.truth["counts"], 4)
    rr, cc = np.meshgrid(np.arange(agg.shape[0]), np.arange(agg.shape[1]), indexing="ij")
    bx = x0 + (cc.ravel() + 0.5) * 8 / u
    by = y0 + (rr.ravel() + 0.5) * 8 / u
    hr = sdata["diffst_hr"]
    for gene in attrs["genes"][:3]:
        g = folder.genes.index(gene)
        expected = _histogram(hr, cs, bx, by, agg[..., g].ravel())
        assert np.allclose(hr.sel(c=gene).values, expected)
        assert expected.sum() > 0


@pytest.mark.slow
def test_visium_hd_prepare_train_super_resolve_alignment(visium_hd, tmp_path):
    """Visium HD read with the reader's defaults, prepared, trained and super-resolved: the SR map sits on the HR
    grid, a known 8 µm bin lands where ``Grid.pixel_index`` says, in full-resolution pixels and µm alike."""
    with pytest.warns(FutureWarning, match="load_segmentations_only"):
        sdata = spatialdata_io.visium_hd(visium_hd.path, **visium_hd.reader_kwargs())
    dst.pp.prepare(sdata, genes=5, lr_um=80, scale=10, tile_um=160)
    attrs = sdata.attrs["diffst"]
    cs = attrs["coordinate_system"]
    u = attrs["um_per_px"]  # µm per full-resolution pixel, as prepare measured it
    assert cs == visium_hd.dataset_id
    assert attrs["sources"]["table_key"] == "square_008um"
    assert u == pytest.approx(visium_hd.um_per_px, rel=0.02)
    _check_hd_hr(sdata, visium_hd)

    model = _train_a_few_steps(sdata, tmp_path / "run")
    dst.tl.super_resolve(sdata, model=model, n_samples=1, steps=2)
    hr = sdata["diffst_hr"]
    sr = sdata["diffst_sr"]
    m = _affine(sr, cs)
    assert np.allclose(m, _affine(hr, cs))
    grid = Grid.from_dict(attrs["grid"])
    # units: an SR pixel spans hr_um of tissue, in full-resolution pixels of u µm; values are counts per HR pixel
    assert grid.hr_um == pytest.approx(8.0)
    assert np.hypot(*m[:2, 0]) * u == pytest.approx(grid.hr_um, rel=1e-6)
    assert np.hypot(*m[:2, 1]) * u == pytest.approx(grid.hr_um, rel=1e-6)
    assert sdata.attrs["diffst_sr"]["units"] == "counts"

    # a known 8 µm bin with counts of a gene, its centre well inside an HR pixel
    x0, y0 = visium_hd.truth["origin_px"]
    agg = _aggregate(visium_hd.truth["counts"], 4)  # (rows, cols, genes) of 8 µm bins
    gene = attrs["genes"][0]
    g = visium_hd.genes.index(gene)
    rr, cc = np.nonzero(agg[..., g] > 0)
    bx_px = x0 + (cc + 0.5) * 8 / visium_hd.um_per_px  # bin centres, full-resolution pixels
    by_px = y0 + (rr + 0.5) * 8 / visium_hd.um_per_px
    fx = (bx_px * u - grid.origin_um[0]) / grid.hr_um
    fy = (by_px * u - grid.origin_um[1]) / grid.hr_um
    ok = (
        (np.abs(fx - np.round(fx)) > 0.1)
        & (np.abs(fy - np.round(fy)) > 0.1)
        & (fx >= 0)
        & (fy >= 0)
        & (fx < grid.hr_shape[1])
        & (fy < grid.hr_shape[0])
    )
    assert ok.sum() > 10
    i = int(np.flatnonzero(ok)[ok.sum() // 2])
    row, col = grid.pixel_index(np.array([bx_px[i] * u]), np.array([by_px[i] * u]), level="hr")
    row, col = int(row[0]), int(col[0])
    c_px, r_px = _to_pixels(hr, cs, [bx_px[i]], [by_px[i]])
    assert (row, col) == (int(np.floor(r_px[0])), int(np.floor(c_px[0])))
    assert hr.sel(c=gene).values[row, col] >= agg[rr[i], cc[i], g] > 0
    cx, cy, _ = m @ np.array([col + 0.5, row + 0.5, 1.0])
    half = 0.5 * grid.hr_um / u  # half an HR pixel, in full-resolution pixels
    assert abs(cx - bx_px[i]) <= half and abs(cy - by_px[i]) <= half

    mean = np.asarray(_level0(sr).values)
    assert mean.shape == (len(attrs["genes"]), *hr.shape[-2:])
    assert np.isfinite(mean).all() and mean.min() >= 0
    # consistency: every observed tissue LR pixel keeps its counts
    lr = np.asarray(sdata["diffst_lr"].values)
    observed = (np.asarray(sdata["diffst_lr_mask"].values)[0] > 0) & (np.asarray(sdata["diffst_tissue"].values) > 0)
    assert observed.sum() > 0
    np.testing.assert_allclose(_block_sums(mean, grid.scale)[:, observed], lr[:, observed], rtol=1e-3, atol=1e-3)


def test_visium_hd_prepare_circles(visium_hd):
    """``bins_as_squares=False`` gives circles: the bin side is their diameter."""
    sdata = _read_hd(visium_hd, bins_as_squares=False)
    ds = visium_hd.dataset_id
    assert np.allclose(sdata[f"{ds}_square_008um"]["radius"], 4 / visium_hd.um_per_px)
    dst.pp.prepare(sdata, genes=5, lr_um=80, scale=10, tile_um=160)
    attrs = sdata.attrs["diffst"]
    assert attrs["sources"]["table_key"] == "square_008um"
    assert attrs["um_per_px"] == pytest.approx(visium_hd.um_per_px, rel=0.02)
    _check_hd_hr(sdata, visium_hd)


def test_visium_hd_prepare_tables_annotating_labels(visium_hd):
    """``annotate_table_by_labels=True``: the tables annotate labels; the bins are still the ``*_square_XXXum``
    shapes, which prepare must find."""
    sdata = _read_hd(visium_hd, annotate_table_by_labels=True)
    ds = visium_hd.dataset_id
    assert sdata["square_008um"].uns["spatialdata_attrs"]["region"] == f"{ds}_square_008um_labels"
    assert f"{ds}_square_008um" in sdata.shapes
    dst.pp.prepare(sdata, genes=5, lr_um=80, scale=10, tile_um=160)
    attrs = sdata.attrs["diffst"]
    assert attrs["um_per_px"] == pytest.approx(visium_hd.um_per_px, rel=0.02)
    _check_hd_hr(sdata, visium_hd)


def test_visium_hd_segmentations_only(visium_hd):
    """``load_segmentations_only=True`` reads only cells (no bins): prepare must say clearly that it needs bins."""
    sdata = _read_hd(visium_hd, load_segmentations_only=True)
    ds = visium_hd.dataset_id
    assert not any(t.startswith("square_") for t in sdata.tables)
    cells = sdata[f"{ds}_cell_segmentations"]
    table = sdata["cell_segmentations"]
    assert len(cells) == table.n_obs > 0
    assert set(table.var_names) == set(visium_hd.genes)
    with pytest.raises(ValueError, match=r"load_segmentations_only=True.*read it with `load_segmentations_only=False`"):
        dst.pp.prepare(sdata, genes=5, lr_um=80, scale=10, tile_um=160)


# ====================================================================================================================
# Xenium
# ====================================================================================================================
@pytest.fixture(scope="module")
def xenium(tmp_path_factory):
    return from_synthetic("xenium", tmp_path_factory.mktemp("xenium") / "outs", size_um=XENIUM_SIZE_UM)


def test_xenium_folder_reads_back(xenium):
    sdata = spatialdata_io.xenium(xenium.path)
    ps = xenium.um_per_px
    tx = xenium.truth["transcripts"]
    points = sdata["transcripts"]
    df = points.compute()
    assert len(df) == len(tx)
    # sorted the same way on both sides: coordinates and genes as written
    a = df[["x", "y"]].to_numpy(float)
    b = tx[["x_location", "y_location"]].to_numpy(float)
    assert np.allclose(np.sort(a[:, 0]), np.sort(b[:, 0])) and np.allclose(np.sort(a[:, 1]), np.sort(b[:, 1]))
    assert df["feature_name"].astype(str).value_counts().to_dict() == tx["feature_name"].value_counts().to_dict()
    assert np.allclose(_affine(points, "global"), np.diag([1 / ps, 1 / ps, 1]))
    # images
    focus = sdata["morphology_focus"]
    assert list(focus["scale0"]["image"].coords["c"].values) == ["DAPI"]
    h, w = focus["scale0"]["image"].shape[-2:]
    assert w * ps == pytest.approx(xenium.truth["size_um"][0], abs=2 * ps)
    he = sdata["he_image"]
    assert list(_level0(he).coords["c"].values) == ["r", "g", "b"]
    assert np.allclose(_affine(he, "global"), xenium.truth["he_to_global"])
    # cells
    table = sdata["table"]
    assert table.n_obs == xenium.truth["n_cells"]
    assert {"cell_labels", "nucleus_labels"} <= set(sdata.labels)
    assert {"cell_boundaries", "nucleus_boundaries"} <= set(sdata.shapes)
    assert set(xenium.genes) <= set(table.var_names)
    n_assigned = int((points["cell_id"].compute().astype(str) != "UNASSIGNED").sum())
    assert n_assigned > 0.3 * len(tx)


def test_xenium_reader_options(xenium):
    circ = spatialdata_io.xenium(xenium.path, cells_as_circles=True, cells_labels=False, nucleus_labels=False)
    assert "cell_circles" in circ.shapes and not circ.labels
    table = circ["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "cell_circles"
    radius = circ["cell_circles"]["radius"].loc[table.obs["cell_id"].to_numpy()].to_numpy()
    assert np.allclose(radius, np.sqrt(table.obs["cell_area"].to_numpy() / np.pi))
    # transcripts and the image only
    lean = spatialdata_io.xenium(
        xenium.path,
        cells_boundaries=False,
        nucleus_boundaries=False,
        cells_labels=False,
        nucleus_labels=False,
        cells_table=False,
        aligned_images=False,
    )
    assert set(lean.images) == {"morphology_focus"} and set(lean.points) == {"transcripts"}
    dst.pp.prepare(lean, genes=5, lr_um=40, scale=4, tile_um=160)
    assert lean.attrs["diffst"]["um_per_px"] == pytest.approx(xenium.um_per_px)
    assert lean.attrs["diffst"]["image"]["kind"] == "fluorescence"


def test_xenium_v1_layout(tmp_path):
    folder = from_synthetic("xenium", tmp_path / "outs", size_um=200, layout="v1")
    sdata = spatialdata_io.xenium(folder.path)
    assert {"morphology_focus", "morphology_mip", "he_image"} <= set(sdata.images)
    assert sdata["transcripts"]["feature_name"].compute().astype(str).isin(folder.genes).any()
    assert sdata["table"].n_obs == folder.truth["n_cells"]
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=80, image_key="morphology_focus")
    assert sdata.attrs["diffst"]["um_per_px"] == pytest.approx(folder.um_per_px)


@pytest.fixture(scope="module")
def xenium_multimodal(tmp_path_factory):
    return from_synthetic(
        "xenium", tmp_path_factory.mktemp("xenium_mm") / "outs", size_um=XENIUM_SIZE_UM, stains="multimodal"
    )


# pims (which dask_image.imread reads the OME series with) reads the planes of the other three files after tifffile has
# closed them; tifffile reopens them and warns
@pytest.mark.filterwarnings("ignore:.*reading array from closed file:UserWarning")
@pytest.mark.slow  # writes and reads a four-file OME-TIFF Xenium folder twice
@pytest.mark.parametrize("order", ["xoa", "dapi_third"])
def test_xenium_multimodal_morphology_focus(xenium_multimodal, order):
    """XOA ≥ 2.0 with the multimodal segmentation kit: four morphology_focus_000k.ome.tif, which the reader combines
    into one 4-channel image named after the stains; diffst must read it as fluorescence, take DAPI (found by name,
    also when it is not the first channel) as the nuclear stain of the image floor, and the floor must keep every
    LR pixel's counts."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation as get_tf

    folder = xenium_multimodal
    files = sorted((folder.path / "morphology_focus").glob("*.ome.tif"))
    assert [f.name for f in files] == [f"morphology_focus_{k:04d}.ome.tif" for k in range(4)]
    sdata = spatialdata_io.xenium(folder.path)
    focus = sdata["morphology_focus"]
    level0 = _level0(focus)
    assert level0.sizes["c"] == 4
    assert [str(c) for c in level0.coords["c"].values] == list(XENIUM_STAINS) == folder.truth["stains"]
    # the four files, one channel each (not one file read four times)
    arr = np.asarray(level0.values)
    for k, f in enumerate(files):
        with tifffile.TiffFile(f) as tif:
            assert np.array_equal(arr[k], tif.pages[0].asarray())
    assert not np.array_equal(arr[0], arr[1])
    assert np.allclose(_affine(focus, "global"), np.eye(3))

    image_key = "morphology_focus"
    if order == "dapi_third":
        perm = [1, 2, 0, 3]
        image_key = "morphology_permuted"
        sdata.images[image_key] = Image2DModel.parse(
            level0.data[perm],
            dims=("c", "y", "x"),
            c_coords=[XENIUM_STAINS[k] for k in perm],
            transformations=get_tf(focus, get_all=True),
            scale_factors=[2, 2],
        )
    names = [str(c) for c in _level0(sdata[image_key]).coords["c"].values]
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160, image_key=image_key)
    attrs = sdata.attrs["diffst"]
    assert attrs["sources"]["image_key"] == image_key
    assert attrs["um_per_px"] == pytest.approx(folder.um_per_px)
    assert attrs["image"]["kind"] == "fluorescence"
    assert list(attrs["image"]["channels"]) == names
    assert ImageSpec.from_dict(attrs["image"]).nuclear_channel == names.index("DAPI") == (2 if order != "xoa" else 0)

    dst.tl.upsample(sdata, method="image")
    floor = np.asarray(_level0(sdata["image_floor_sr"]).values)
    lr = np.asarray(sdata["diffst_lr"].values)
    grid = Grid.from_dict(attrs["grid"])
    assert floor.shape == (len(attrs["genes"]), *grid.hr_shape)
    assert np.isfinite(floor).all() and floor.min() >= 0
    assert np.allclose(_affine(sdata["image_floor_sr"], "global"), _affine(sdata["diffst_hr"], "global"))
    observed = (np.asarray(sdata["diffst_lr_mask"].values)[0] > 0) & (np.asarray(sdata["diffst_tissue"].values) > 0)
    assert observed.sum() > 10
    np.testing.assert_allclose(_block_sums(floor, grid.scale)[:, observed], lr[:, observed], rtol=1e-4, atol=1e-4)


def test_xenium_he_image_kind(xenium):
    sdata = spatialdata_io.xenium(xenium.path)
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160, image_key="he_image")
    attrs = sdata.attrs["diffst"]
    assert attrs["image"]["kind"] == "rgb"
    assert attrs["um_per_px"] == pytest.approx(xenium.um_per_px)
    assert attrs["image"]["image_um_per_px"] == pytest.approx(0.5, rel=0.01)


@pytest.mark.slow
def test_xenium_prepare_train_super_resolve_alignment(xenium, tmp_path):
    sdata = spatialdata_io.xenium(xenium.path)
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160, image_key="morphology_focus")
    attrs = sdata.attrs["diffst"]
    ps = xenium.um_per_px
    assert attrs["coordinate_system"] == "global"
    assert attrs["um_per_px"] == pytest.approx(ps)

    # every transcript of a gene kept by the default quality filter (qv >= 20) lands in the HR pixel holding it
    tx = xenium.truth["transcripts"]
    assert (tx["qv"] < 20).any()
    tx = tx[tx["qv"] >= 20]
    hr = sdata["diffst_hr"]
    for gene in attrs["genes"][:2]:
        sel = tx["feature_name"] == gene
        x = tx.loc[sel, "x_location"].to_numpy(float) / ps
        y = tx.loc[sel, "y_location"].to_numpy(float) / ps
        expected = _histogram(hr, "global", x, y)
        got = hr.sel(c=gene).values
        assert got.sum() == pytest.approx(expected.sum(), rel=1e-3)
        assert np.abs(got - expected).sum() <= 1e-3 * expected.sum() + 2  # float32 positions on pixel edges

    model = _train_a_few_steps(sdata, tmp_path / "run")
    dst.tl.super_resolve(sdata, model=model, n_samples=1, steps=2)
    sr = sdata["diffst_sr"]
    assert np.allclose(_affine(sr, "global"), _affine(hr, "global"))

    # a transcript well inside an HR pixel: Grid.pixel_index, the HR raster and the SR transformation agree
    grid = Grid.from_dict(attrs["grid"])
    gene = attrs["genes"][0]
    sel = tx[tx["feature_name"] == gene]
    x_um = sel["x_location"].to_numpy(float)
    y_um = sel["y_location"].to_numpy(float)
    fx = (x_um - grid.origin_um[0]) / grid.hr_um
    fy = (y_um - grid.origin_um[1]) / grid.hr_um
    away = (np.abs(fx - np.round(fx)) > 0.1) & (np.abs(fy - np.round(fy)) > 0.1)
    i = int(np.flatnonzero(away)[len(np.flatnonzero(away)) // 2])
    row, col = grid.pixel_index(np.array([x_um[i]]), np.array([y_um[i]]), level="hr")
    row, col = int(row[0]), int(col[0])
    assert (row, col) == (int(np.floor(fy[i])), int(np.floor(fx[i])))
    assert hr.sel(c=gene).values[row, col] > 0
    m = _affine(sr, "global")
    cx, cy, _ = m @ np.array([col + 0.5, row + 0.5, 1.0])
    half = 0.5 * grid.hr_um / ps  # half an HR pixel, in morphology pixels
    assert abs(cx - x_um[i] / ps) <= half and abs(cy - y_um[i] / ps) <= half
    mean = np.asarray(_level0(sr).sel(c=gene).values)
    assert mean.shape == hr.shape[-2:]
    assert np.isfinite(mean).all() and mean.min() >= 0
