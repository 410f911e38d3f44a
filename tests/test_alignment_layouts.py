"""Alignment on the layouts users bring: a transcript (or spot) lands in the expected pixel, and that pixel's centre,
through the element's own transformation, falls on the image pixel under the transcript (or spot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from spatialdata.transformations import get_transformation

import diffst as dst
from diffst._grid import Grid

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


pytestmark = pytest.mark.usefixtures("quiet")


def _affine(element, cs):
    return np.asarray(get_transformation(element, to_coordinate_system=cs).to_affine_matrix(("x", "y"), ("x", "y")))


def _check_point(sdata, key, gene, x, y, cs, image_key, level="hr"):
    """(x, y): the point in its element's own coordinates, already mapped to ``cs`` by the caller."""
    attrs = sdata.attrs[key]
    grid = Grid.from_dict(attrs["grid"])
    u = attrs["um_per_px"]
    row, col = grid.pixel_index(np.array([x * u]), np.array([y * u]), level=level)
    row, col = int(row[0]), int(col[0])
    element = sdata[f"{key}_{level}"]
    raster = element.sel(c=gene).values
    assert raster[row, col] > 0  # the pixel holds counts of this gene
    m = _affine(element, cs)
    x0, y0, _ = m @ np.array([col, row, 1.0])
    x1, y1, _ = m @ np.array([col + 1, row + 1, 1.0])
    assert x0 <= x < x1 and y0 <= y < y1
    cx, cy, _ = m @ np.array([col + 0.5, row + 0.5, 1.0])
    inv = np.linalg.inv(_affine(sdata[image_key], cs))
    under = (inv @ np.array([x, y, 1.0]))[:2]
    centre = (inv @ np.array([cx, cy, 1.0]))[:2]
    pixel = grid.hr_um if level == "hr" else grid.lr_um
    half = 0.5 * pixel / (u * np.sqrt(abs(np.linalg.det(_affine(sdata[image_key], cs)[:2, :2]))))
    assert np.all(np.abs(under - centre) <= half + 1e-6)


def _first_transcript(sdata, gene, cs):
    points = sdata["transcripts"]
    fk = points.attrs["spatialdata_attrs"]["feature_key"]
    df = points[["x", "y", fk]].compute()
    row = df[df[fk] == gene].iloc[len(df[df[fk] == gene]) // 2]
    x, y, _ = _affine(points, cs) @ np.array([row["x"], row["y"], 1.0])
    return x, y


def test_synthetic_xenium_rotated_he():
    sdata = dst.datasets.synthetic_xenium(size_um=800, boundaries=False, he_rotation_deg=2.0)
    dst.pp.prepare(sdata, genes=5, tile_um=200, image_key="he_image")
    gene = sdata.attrs["diffst"]["genes"][0]
    x, y = _first_transcript(sdata, gene, "global")
    _check_point(sdata, "diffst", gene, x, y, "global", "he_image")
    _check_point(sdata, "diffst", gene, x, y, "global", "morphology_focus")


def test_synthetic_visium_spot():
    sdata = dst.datasets.synthetic_visium(size_um=1000)
    dst.pp.prepare(sdata, genes=5, tile_um=200)
    attrs = sdata.attrs["diffst"]
    cs = attrs["coordinate_system"]
    assert attrs["um_per_px"] == pytest.approx(0.5)  # the generator's full-resolution pixel
    gene = attrs["genes"][0]
    table = sdata["table"]
    spot = int(np.argmax(np.asarray(table[:, gene].X.todense()).ravel()))
    geom = sdata[cs].geometry.loc[table.obs["spot_id"].iloc[spot]]
    x, y, _ = _affine(sdata[cs], cs) @ np.array([geom.x, geom.y, 1.0])
    _check_point(sdata, "diffst", gene, x, y, cs, f"{cs}_full_image", level="lr")


@pytest.mark.realdata
def test_cosmx_flipped_y():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    old = dst.settings.datadir
    dst.settings.datadir = SHARED_DATA
    try:
        sdata = dst.datasets.cosmx_lung(fovs=(2,))
    finally:
        dst.settings.datadir = old
    image_key = next(iter(sdata.images))
    dst.pp.prepare(sdata, genes=5, lr_um=20, scale=4, tile_um=40, image_key=image_key)
    assert sdata.attrs["diffst"]["um_per_px"] == pytest.approx(0.18)
    gene = sdata.attrs["diffst"]["genes"][0]
    x, y = _first_transcript(sdata, gene, "global")
    _check_point(sdata, "diffst", gene, x, y, "global", image_key)


def test_crops_from_a_preloaded_region_equal_crops_from_the_whole_level():
    """A rotated H&E read at a coarser resolution than its pixels (anti-aliasing on): crops cut from a preloaded part
    of the level (what inference reads each chunk's windows from) are the crops of the whole level, bit for bit,
    also where they reach past the image; a crop beyond the part is refused."""
    from diffst._image import image_spec, in_memory_level, preload, read_tile

    sdata = dst.datasets.synthetic_xenium(size_um=600, boundaries=False, he_rotation_deg=2.0)
    spec = image_spec(sdata.images["he_image"], key="he_image", cs="global", um_per_px=0.2125, kind="rgb")
    image = in_memory_level(sdata.images["he_image"], spec, 2.0)  # the simulator renders lazily: once here
    side = 160.0
    boxes = [(x, y, x + side, y + side) for y in (-40.0, 60.0) for x in np.arange(0.0, 400.0, 70.0)]
    union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    region = preload(image, spec, union, 2.0)
    assert region.data.shape[1] < 0.8 * region.level_shape[0]  # not the whole level
    for bbox in boxes:
        whole = read_tile(image, spec, bbox, 2.0)
        assert whole.std() > 0
        np.testing.assert_array_equal(read_tile(region, spec, bbox, 2.0), whole)
    part = preload(image, spec, boxes[0], 2.0)
    with pytest.raises(ValueError, match="preloaded part"):
        read_tile(part, spec, boxes[-1], 2.0)
