"""CosMx through ``spatialdata_io.cosmx``: its coordinates are pixels, and diffst takes the instrument's pixel size."""

from __future__ import annotations

import pytest

import diffst as dst

from .cosmx import write_cosmx

spatialdata_io = pytest.importorskip("spatialdata_io")

pytestmark = pytest.mark.usefixtures("quiet")


@pytest.mark.parametrize("generation", ["2021", "2023"])
def test_cosmx_pixels_are_read_at_the_instruments_pixel_size(generation, tmp_path):
    truth = write_cosmx(tmp_path / "run", generation=generation)
    sdata = spatialdata_io.cosmx(tmp_path / "run")
    dst.pp.prepare(sdata, genes=4, lr_um=20, scale=4, points_key="1_points", image_key="1_image")
    attrs = sdata.attrs["diffst"]
    assert attrs["um_per_px"] == pytest.approx(truth["um_per_px"], rel=1e-6)
    assert "CosMx pixel coordinates" in attrs["um_per_px_source"]
    assert attrs["image"]["image_um_per_px"] == pytest.approx(truth["um_per_px"], rel=1e-6)
    # the cells sit in a patch of about 612 px: 110 µm (2021) or 74 µm (2023) across, not 612 µm
    rows, cols = attrs["grid"]["lr_shape"]
    span = max(rows, cols) * 20.0
    assert 612 * truth["um_per_px"] - 40 <= span <= 612 * truth["um_per_px"] + 2 * attrs["tile_um"]


def test_a_cropped_cosmx_image_asks_for_the_pixel_size(tmp_path):
    write_cosmx(tmp_path / "run", image_shape=(3000, 3000))  # a cropped export (as the Giotto mini dataset is)
    sdata = spatialdata_io.cosmx(tmp_path / "run")
    with pytest.raises(ValueError, match=r"CosMx pixel coordinates.*3000 × 3000 px.*um_per_px"):
        dst.pp.prepare(sdata, genes=4, lr_um=20, scale=4, points_key="1_points", image_key="1_image")
    dst.pp.prepare(sdata, genes=4, lr_um=20, scale=4, points_key="1_points", image_key="1_image", um_per_px=0.18)
    assert sdata.attrs["diffst"]["um_per_px"] == 0.18


def test_the_built_in_cosmx_crop_in_um_is_not_taken_for_pixels():
    import pandas as pd
    from spatialdata import SpatialData

    from diffst.pp._inputs import _transcript_units

    points = pd.DataFrame({"x": [1.0], "y": [1.0], "x_local_px": [5.5], "x_global_px": [5.5], "y_global_px": [5.5]})
    assert _transcript_units(SpatialData(), points, "transcripts", None) == (1.0, "transcript coordinates in µm")
