"""Units and layouts of spot and bin inputs: µm/px from the spot pitch, the image kind from the pixels, several
regions in one table, Visium HD bins as circles or behind labels, segmentation-only objects."""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import spatialdata as sd
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

import diffst as dst
from diffst.pp._inputs import lattice_pitch
from diffst.tl._data import Prepared

from .models import untrained
from .toy import toy_visium, toy_xenium


# --------------------------------------------------------------------------------------------------------------------
# µm per pixel of spot data
# --------------------------------------------------------------------------------------------------------------------
def test_lattice_pitch_tells_visium_from_st():
    # Visium: array_col steps by 2, odd rows offset by one; neighbours 100 µm apart (here 200 px at 0.5 µm/px)
    rows, cols = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
    acol = 2 * cols + rows % 2
    x = (acol * 50.0) / 0.5
    y = (rows * 100.0 * np.sqrt(3) / 2) / 0.5
    distance, kind = lattice_pitch(rows.ravel(), acol.ravel(), x.ravel(), y.ravel())
    assert kind == "visium" and distance == pytest.approx(200.0)
    # ST: a square lattice, neighbours 1 apart
    distance, kind = lattice_pitch(rows.ravel(), cols.ravel(), cols.ravel() * 290.0, rows.ravel() * 290.0)
    assert kind == "st" and distance == pytest.approx(290.0)
    assert lattice_pitch(np.array([0]), np.array([0]), np.array([0.0]), np.array([0.0])) is None


def test_visium_um_per_px_comes_from_the_pitch_under_the_65_um_convention(log_lines):
    sdata = toy_visium(um_per_px=0.6)
    dst.pp.prepare(sdata, genes=3, tile_um=200)
    attrs = sdata.attrs["diffst"]
    assert attrs["um_per_px"] == pytest.approx(0.6, rel=1e-6)
    assert "spot pitch" in attrs["um_per_px_source"] and "Visium array" in attrs["um_per_px_source"]
    assert "radius agrees" in attrs["um_per_px_source"]
    assert attrs["degradation"] == {"name": "spots", "spot_diameter_um": 55.0, "spot_pitch_um": 100.0}
    assert not any("using the pitch" in line for line in log_lines)


def test_a_radius_that_disagrees_with_the_pitch_is_a_warning_naming_both(log_lines):
    sdata = toy_visium(um_per_px=0.5)
    shapes = sdata.shapes["toy"]
    shapes["radius"] = 27.5 / 0.5  # written as if the spot were 55 µm wide: 15 % off the 10x convention
    dst.pp.prepare(sdata, genes=3, tile_um=200)
    assert sdata.attrs["diffst"]["um_per_px"] == pytest.approx(0.5, rel=1e-6)  # the pitch wins
    warning = next(line for line in log_lines if "using the pitch" in line)
    assert "0.5 µm per unit" in warning and "0.5909" in warning and "+18 %" in warning


def test_without_array_coordinates_the_radius_is_read_under_the_65_um_convention():
    sdata = toy_visium(um_per_px=0.5)
    sdata.tables["table"].obs = sdata.tables["table"].obs.drop(columns=["array_row", "array_col"])
    dst.pp.prepare(sdata, genes=3, tile_um=200)
    attrs = sdata.attrs["diffst"]
    assert attrs["um_per_px"] == pytest.approx(0.5, rel=1e-6)
    assert "65 µm" in attrs["um_per_px_source"]
    # um_per_px= still overrides
    dst.pp.prepare(sdata, genes=3, tile_um=200, um_per_px=0.55, key_added="given")
    assert sdata.attrs["given"]["um_per_px"] == 0.55 and "given" in sdata.attrs["given"]["um_per_px_source"]


def test_synthetic_visium_writes_the_10x_spot_diameter_and_prepares_at_its_true_scale():
    sdata = dst.datasets.synthetic_visium(size_um=1200, n_genes=8, fullres_um_per_px=0.8)
    assert sdata.attrs["synthetic"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(65.0 / 0.8)
    assert float(sdata.shapes["synthetic_visium"]["radius"].iloc[0]) == pytest.approx(65.0 / 0.8 / 2)
    dst.pp.prepare(sdata, genes=4, tile_um=400)
    assert sdata.attrs["diffst"]["um_per_px"] == pytest.approx(0.8, rel=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# the image kind, from the pixels
# --------------------------------------------------------------------------------------------------------------------
def _with_channels(sdata, key, names):
    image = sdata.images[key]
    sdata.images[key] = Image2DModel.parse(
        image.values, dims=("c", "y", "x"), c_coords=names, transformations=sd.transformations.get_transformation(
            image, get_all=True
        ),
    )  # fmt: skip


def test_he_with_numbered_channels_is_brightfield_and_image_kind_overrides(tmp_path):
    sdata = toy_visium()
    _with_channels(sdata, "toy_full_image", ["0", "1", "2"])
    dst.pp.prepare(sdata, genes=3, tile_um=200)
    image = sdata.attrs["diffst"]["image"]
    assert image["kind"] == "rgb" and "bright background" in image["kind_reason"]
    dst.pp.prepare(sdata, genes=3, tile_um=200, image_kind="fluorescence", key_added="f")
    assert sdata.attrs["f"]["image"]["kind"] == "fluorescence"
    assert sdata.attrs["f"]["image"]["kind_reason"] == "`image_kind='fluorescence'`"
    with pytest.raises(ValueError, match="`image_kind` must be 'rgb'"):
        dst.pp.prepare(sdata, genes=3, tile_um=200, image_kind="he", key_added="x")
    assert "x" not in sdata.attrs


def test_a_dark_three_channel_image_is_fluorescence():
    sdata = toy_visium()
    sdata.images["toy_full_image"] = Image2DModel.parse(
        (255 - sdata.images["toy_full_image"].values) // 4, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
        transformations={"toy": Identity()},
    )  # fmt: skip
    dst.pp.prepare(sdata, genes=3, tile_um=200)
    assert sdata.attrs["diffst"]["image"]["kind"] == "fluorescence"
    assert "dark background" in sdata.attrs["diffst"]["image"]["kind_reason"]


def test_the_image_kind_mismatch_says_why_and_how_to_change_it():
    sdata = toy_xenium(size_um=800, n=60_000, seed=0)
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160)
    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    other = toy_xenium(size_um=800, n=60_000, seed=0)
    dst.pp.prepare(other, genes=model.genes, lr_um=40, scale=4, tile_um=160, image_kind="rgb")
    with pytest.raises(
        ValueError, match=r"the data's image is rgb \(`image_kind='rgb'`\).*`image_kind='fluorescence'`"
    ):
        model.check_compatible(Prepared.from_sdata(other, "diffst"))


# --------------------------------------------------------------------------------------------------------------------
# tables annotating several regions
# --------------------------------------------------------------------------------------------------------------------
def _two_slides():
    a, b = toy_visium(dataset_id="A", seed=0), toy_visium(dataset_id="B", seed=1)
    ta, tb = a.tables["table"], b.tables["table"]
    for t, name in ((ta, "A"), (tb, "B")):
        t.obs["region"] = name
        t.obs_names = [f"{name}{i}" for i in range(t.n_obs)]
    table = ad.concat([ta, tb])
    table.obs["region"] = pd.Categorical(table.obs["region"])
    table.uns = {}
    table = TableModel.parse(table, region=["A", "B"], region_key="region", instance_key="spot_id")
    return sd.SpatialData(
        images={"A_full_image": a.images["A_full_image"], "B_full_image": b.images["B_full_image"]},
        shapes={"A": a.shapes["A"], "B": b.shapes["B"]},
        tables={"table": table},
    )


def test_a_table_of_two_slides_reads_the_slide_of_the_image():
    sdata = _two_slides()
    dst.pp.prepare(sdata, genes=3, tile_um=200, image_key="B_full_image")
    attrs = sdata.attrs["diffst"]
    assert attrs["sources"]["shapes_key"] == "B" and attrs["coordinate_system"] == "B"
    lr = sdata["diffst_lr"].values.sum()
    # the counts are slide B's only
    table = sdata.tables["table"]
    b_rows = (table.obs["region"] == "B").to_numpy()
    genes = attrs["genes"]
    expected = np.asarray(table[b_rows, genes].X.sum())
    assert lr == pytest.approx(expected, rel=1e-6)


def test_several_candidate_regions_ask_for_region():
    sdata = _two_slides()
    # both slides in one coordinate system: the image cannot tell them apart
    from spatialdata.transformations import set_transformation

    for key in ("A", "B"):
        set_transformation(sdata.shapes[key], Identity(), to_coordinate_system="both")
    set_transformation(sdata.images["A_full_image"], Identity(), to_coordinate_system="both")
    with pytest.raises(ValueError, match=r"annotates 2 shapes elements \['A', 'B'\].*pass `region=`"):
        dst.pp.prepare(sdata, genes=3, tile_um=200, image_key="A_full_image")
    dst.pp.prepare(sdata, genes=3, tile_um=200, image_key="A_full_image", region="A")
    assert sdata.attrs["diffst"]["sources"]["shapes_key"] == "A"
    with pytest.raises(ValueError, match="`region='C'` is not annotated"):
        dst.pp.prepare(sdata, genes=3, tile_um=200, image_key="A_full_image", region="C", key_added="c")


# --------------------------------------------------------------------------------------------------------------------
# Visium HD layouts
# --------------------------------------------------------------------------------------------------------------------
def _hd(*, circles: bool = False, labels: bool = False, um_per_px: float = 0.5, n: int = 60):
    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    genes = ["G0", "G1", "G2", "G3"]
    counts = rng.poisson(1 + 3 * (cols.ravel()[:, None] / n) * (np.arange(4)[None] % 2 + 0.5), size=(n * n, 4))
    obs = pd.DataFrame(
        {
            "array_row": rows.ravel(),
            "array_col": cols.ravel(),
            "location_id": np.arange(n * n),
            "region": pd.Categorical(["hd_square_016um"] * (n * n)),
        },
        index=[f"b{i}" for i in range(n * n)],
    )
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    centres = np.column_stack([cols.ravel() * 16.0 + 8.0, rows.ravel() * 16.0 + 8.0]) / um_per_px
    radius = 8.0 / um_per_px
    shapes = ShapesModel.parse(centres, geometry=0, radius=np.full(n * n, radius), index=obs["location_id"].copy(),
                               transformations={"hd": Identity()})  # fmt: skip
    if not circles:
        squares = gpd.GeoDataFrame(geometry=np.asarray(shapes.buffer(radius, cap_style=3)), index=shapes.index)
        shapes = ShapesModel.parse(squares, transformations={"hd": Identity()})
    table = TableModel.parse(adata, region="hd_square_016um", region_key="region", instance_key="location_id")
    size = int(n * 16 / um_per_px)
    img = np.full((3, size, size), 220, dtype=np.uint8)
    image = Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={"hd": Identity()})
    sdata = sd.SpatialData(images={"hd_full_image": image}, shapes={"hd_square_016um": shapes},
                           tables={"square_016um": table})  # fmt: skip
    if labels:
        sdata.tables["square_016um"].X = sdata.tables["square_016um"].X.tocsc()
        labels_element = sd.rasterize_bins(
            sdata, bins="hd_square_016um", table_name="square_016um", row_key="array_row", col_key="array_col",
            value_key=None, return_region_as_labels=True,
        )  # fmt: skip
        sdata["hd_square_016um_labels"] = labels_element
        sd.rasterize_bins_link_table_to_labels(
            sdata, table_name="square_016um", rasterized_labels_name="hd_square_016um_labels"
        )
        sdata.tables["square_016um"].X = sdata.tables["square_016um"].X.tocsr()
    return sdata


@pytest.mark.parametrize("layout", ["squares", "circles", "labels"])
def test_visium_hd_bins_as_squares_circles_or_behind_labels(layout):
    sdata = _hd(circles=layout == "circles", labels=layout == "labels", um_per_px=0.5)
    if layout == "labels":
        assert sdata.tables["square_016um"].uns["spatialdata_attrs"]["region"] == "hd_square_016um_labels"
    dst.pp.prepare(sdata, genes=2, lr_um=160, scale=10, tile_um=320)
    attrs = sdata.attrs["diffst"]
    assert attrs["um_per_px"] == pytest.approx(0.5, rel=1e-6)
    assert attrs["sources"]["shapes_key"] == "hd_square_016um"
    hr = sdata["diffst_hr"]
    table = sdata.tables["square_016um"]
    genes = attrs["genes"]
    assert float(hr.sel(c=genes).values.sum()) == pytest.approx(float(table[:, genes].X.sum()), rel=1e-6)
    if layout == "circles":
        assert "2 × radius" in attrs["um_per_px_source"]


def test_visium_hd_segmentation_only_names_the_reader_option():
    sdata = _hd()
    cells = sdata.tables["square_016um"].copy()
    bins = sdata.shapes["hd_square_016um"]
    polygons = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=np.asarray(bins.geometry), index=bins.index), transformations={"hd": Identity()}
    )
    # as spatialdata_io.visium_hd(..., load_segmentations_only=True) names them
    cells.obs["region"] = pd.Categorical(["hd_cell_segmentations"] * cells.n_obs)
    cells.uns = {}
    cells = TableModel.parse(cells, region="hd_cell_segmentations", region_key="region", instance_key="location_id")
    seg = sd.SpatialData(images={"hd_full_image": sdata.images["hd_full_image"]},
                         shapes={"hd_cell_segmentations": polygons}, tables={"cell_segmentations": cells})  # fmt: skip
    with pytest.raises(ValueError, match="load_segmentations_only=False"):
        dst.pp.prepare(seg, genes=2, lr_um=160, scale=10, tile_um=320)
    with pytest.raises(ValueError, match=r"which are polygons \(cells\?\), not spots.*load_segmentations_only=False"):
        dst.pp.prepare(seg, genes=2, lr_um=160, scale=10, tile_um=320, table_key="cell_segmentations")


def test_xenium_morphology_with_the_all_zero_dummy_channel_of_early_readers():
    """spatialdata-io 0.1.x gave Xenium's morphology image an all-zero second channel named 'dummy'."""
    from diffst._image import ImageSpec
    from diffst.tl._data import TileSource

    sdata = toy_xenium(size_um=800, n=60_000, seed=0)
    dapi = sdata.images["morphology_focus"]
    sdata.images["morphology_focus"] = Image2DModel.parse(
        np.concatenate([dapi.values, np.zeros_like(dapi.values)]), dims=("c", "y", "x"), c_coords=["DAPI", "dummy"],
        transformations={"global": Identity()},
    )  # fmt: skip
    dst.pp.prepare(sdata, genes=4, lr_um=40, scale=4, tile_um=160)
    spec = ImageSpec.from_dict(sdata.attrs["diffst"]["image"])
    assert spec.kind == "fluorescence" and spec.channels == ("DAPI", "dummy") and spec.nuclear_channel == 0
    prep = Prepared.from_sdata(sdata, "diffst")
    item = TileSource.from_sdata(sdata, prep).read(0, 0, 4, 5.0, prep.hr_scale)
    assert np.isfinite(item["image"]).all() and float(np.abs(item["image"][1]).max()) == 0.0
    dst.tl.upsample(sdata, method="image")
    from diffst._spatial import image_levels

    floor = np.asarray(image_levels(sdata["image_floor_sr"])[0].values)
    assert np.isfinite(floor).all() and floor.sum() > 0
