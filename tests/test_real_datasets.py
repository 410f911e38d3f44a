"""Real datasets: registry, local copy / pooch paths, layouts, µm per pixel and image alignment.

The data tests read ``../shared/data`` (beside the repository) and skip when it is absent; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pooch
import pytest
from spatialdata.transformations import get_transformation

import diffst
from diffst.datasets import _real
from diffst.datasets._real import REGISTRY, cosmx_lung, her2st, merfish_mouse_brain

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
realdata = pytest.mark.realdata  # needs ../shared/data


def _need_data() -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the shared development data beside the repository)")


@pytest.fixture(scope="module")
def datadir():
    """Point ``diffst.settings.datadir`` at ``../shared/data`` for the module (skip when it is absent)."""
    _need_data()
    old = diffst.settings.datadir
    diffst.settings.datadir = SHARED_DATA
    yield SHARED_DATA
    diffst.settings.datadir = old


@pytest.fixture
def settings_restored():
    old = (diffst.settings.datadir, diffst.settings.cachedir)
    yield diffst.settings
    diffst.settings.datadir, diffst.settings.cachedir = old


@pytest.fixture(scope="module")
def merfish(datadir):
    return merfish_mouse_brain()


@pytest.fixture(scope="module")
def st(datadir):
    return her2st("C3")


@pytest.fixture(scope="module")
def cosmx(datadir):
    return cosmx_lung()


def _affine(element, cs: str) -> np.ndarray:
    return get_transformation(element, cs).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def _is_count_matrix(x) -> bool:
    values = x.data if hasattr(x, "data") else np.asarray(x)
    return bool((values >= 0).all() and np.array_equal(values, np.round(values)))


# ---------------------------------------------------------------------------------------------------------- registry


@realdata
def test_registry_checksums_match_local_copies(datadir):
    missing = [rel for rel in REGISTRY if not (datadir / rel).is_file()]
    assert not missing, f"registered files absent from {datadir}: {missing}"
    for rel, (url, sha256) in REGISTRY.items():
        assert url.startswith("https://raw.githubusercontent.com/"), url
        assert ("1dc55ee8195104a81549b9e3fad04bd459b226de" in url) or (
            "85df7411b987a7dec3feff9718b869a7a82091ec" in url
        )
        digest = hashlib.sha256((datadir / rel).read_bytes()).hexdigest()
        assert digest == sha256, rel


def test_missing_local_file_names_path_and_env_var(settings_restored, tmp_path):
    settings_restored.datadir = tmp_path  # an empty local copy
    with pytest.raises(FileNotFoundError, match="DIFFST_DATA_DIR") as err:
        merfish_mouse_brain()
    assert str(tmp_path / "merfish_mousebrain_giotto") in str(err.value)


def test_pooch_gets_pinned_url_and_hash(settings_restored, tmp_path, monkeypatch):
    calls = []

    def fake_retrieve(url, known_hash, fname=None, path=None, **kwargs):
        calls.append((url, known_hash, fname, Path(path)))
        out = Path(path) / fname
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("fov,x_global_px,y_global_px\n")
        return str(out)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    settings_restored.datadir = None
    settings_restored.cachedir = tmp_path
    rel = "cosmx_lung_giotto/Lung12_fov_positions_file.csv"
    path = _real._fetch(rel)
    url, sha256 = REGISTRY[rel]
    assert calls == [(url, f"sha256:{sha256}", "Lung12_fov_positions_file.csv", tmp_path / "cosmx_lung_giotto")]
    assert url == (
        "https://raw.githubusercontent.com/josschavezf/GiottoData/1dc55ee8195104a81549b9e3fad04bd459b226de/"
        "inst/Mini_datasets/CosMx/Raw/Lung12_fov_positions_file.csv"
    )
    assert path == tmp_path / rel  # the cache has the layout of a local copy


@realdata
def test_loader_through_pooch_cache(settings_restored, tmp_path, monkeypatch):
    """With no datadir a loader fetches every file via pooch (pinned URL + hash) into the cache, nothing else."""
    _need_data()
    by_url = {url: (rel, sha) for rel, (url, sha) in REGISTRY.items()}
    seen = []

    def fake_retrieve(url, known_hash, fname=None, path=None, **kwargs):
        rel, sha = by_url[url]  # KeyError: an unregistered URL
        assert known_hash == f"sha256:{sha}"
        out = Path(path) / fname
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / rel, out)
        seen.append(rel)
        return str(out)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    settings_restored.datadir = None
    settings_restored.cachedir = tmp_path
    sdata = cosmx_lung(fovs=[3])
    assert set(sdata.images) == {"3_image"}
    assert sorted(seen) == sorted(
        [
            "cosmx_lung_giotto/Lung12_fov_positions_file.csv",
            "cosmx_lung_giotto/Lung12_tx_file.csv",
            "cosmx_lung_giotto/CellLabels/CellLabels_F003.tif",
            "cosmx_lung_giotto/CellComposite/CellComposite_F003.jpg",
        ]
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: her2st("A1"), r"B4.*C6"),
        (lambda: cosmx_lung(fovs=(2, 4)), "subset"),
        (lambda: cosmx_lung(fovs=()), "subset"),
        (lambda: merfish_mouse_brain(z=3), "0 or 1"),
    ],
)
def test_bad_arguments(call, match, settings_restored, tmp_path):
    settings_restored.datadir = tmp_path  # would fail differently if the arguments were not checked first
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------- MERFISH


@realdata
def test_merfish_layout(merfish):
    assert set(merfish.images) == {"morphology"}
    assert set(merfish.points) == {"transcripts"}
    assert set(merfish.shapes) == {"cell_boundaries"}
    assert set(merfish.coordinate_systems) == {"global"}
    image = merfish.images["morphology"]["scale0"]["image"]
    assert list(image.coords["c"].values) == ["DAPI", "PolyT"]
    assert image.dtype == np.uint8 and image.shape == (2, 4143, 4603)
    assert len(merfish.images["morphology"]) > 1  # multiscale
    pts = merfish.points["transcripts"].compute()
    assert {"x", "y", "z", "gene"} <= set(pts.columns)
    assert not pts["gene"].astype(str).str.startswith("Blank-").any()
    assert np.allclose(_affine(merfish.images["morphology"], "global"), np.eye(3))


@realdata
def test_merfish_um_per_px_from_transform(merfish):
    m = _affine(merfish.points["transcripts"], "global")
    assert 1 / m[0, 0] == pytest.approx(0.10863, rel=2e-4)
    assert 1 / m[1, 1] == pytest.approx(0.10863, rel=2e-4)
    # the image's top-left corner is at (6400.029, 4699.967) µm
    assert m @ [6400.029, 4699.967, 1] == pytest.approx([0, 0, 1], abs=1e-6)
    assert np.allclose(_affine(merfish.shapes["cell_boundaries"], "global"), m)


@realdata
def test_merfish_transcripts_on_nuclei_and_polyT(merfish):
    image = merfish.images["morphology"]["scale0"]["image"].values
    pts = merfish.points["transcripts"].compute()
    pts = pts[pts["z"] == 0]
    m = _affine(merfish.points["transcripts"], "global")
    col = np.floor(m[0, 0] * pts["x"] + m[0, 2]).astype(int).clip(0, image.shape[2] - 1)
    row = np.floor(m[1, 1] * pts["y"] + m[1, 2]).astype(int).clip(0, image.shape[1] - 1)
    dapi = image[0]
    assert dapi[row, col].mean() > 2 * np.median(dapi)
    # transcript density follows the polyT (mRNA) stain on a ~10 µm grid; a y-flip drops this to ~0.3
    b = 92
    ny, nx = image.shape[1] // b, image.shape[2] // b
    density = np.histogram2d(row, col, bins=[ny, nx], range=[[0, ny * b], [0, nx * b]])[0]
    poly_t = image[1, : ny * b, : nx * b].reshape(ny, b, nx, b).mean(axis=(1, 3))
    assert np.corrcoef(density.ravel(), poly_t.ravel())[0, 1] > 0.6


@realdata
def test_merfish_cells_and_table(merfish):
    cells = merfish.shapes["cell_boundaries"]
    table = merfish.tables["table"]
    assert len(cells) == 498 and cells.geom_type.isin(["Polygon", "MultiPolygon"]).all()
    # polygons lie in the image's µm extent (y un-flipped)
    xmin, ymin, xmax, ymax = cells.total_bounds
    assert 6395 < xmin < xmax < 6905 and 4690 < ymin < ymax < 5160
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "cell_boundaries" and attrs["instance_key"] == "cell_id"
    assert set(table.obs["cell_id"]) == set(cells.index)
    assert _is_count_matrix(table.X)
    assert not table.var_names.str.startswith("Blank-").any()
    assert 0.2 * 80_006 < table.X.sum() < 80_006  # only transcripts inside polygons are counted
    per_cell = np.asarray(table.X.sum(axis=1)).ravel()
    assert np.median(per_cell) > 20


# ---------------------------------------------------------------------------------------------------------- her2st


@realdata
def test_her2st_layout_and_um_per_px(st):
    assert set(st.images) == {"C3_full_image"}
    assert set(st.shapes) == {"C3"}
    assert set(st.coordinate_systems) == {"C3"}
    image = st.images["C3_full_image"]["scale0"]["image"]
    assert list(image.coords["c"].values) == ["r", "g", "b"] and image.dtype == np.uint8
    assert np.allclose(_affine(st.images["C3_full_image"], "C3"), np.eye(3))
    table = st.tables["table"]
    assert table.uns["spot_diameter_um"] == 100.0 and table.uns["spot_pitch_um"] == 200.0
    assert {"array_row", "array_col", "in_tissue", "spot_id", "region"} <= set(table.obs.columns)
    assert table.obs_names[0].count("x") == 1
    assert set(table.obs["spot_id"]) == set(st.shapes["C3"].index)
    assert _is_count_matrix(table.X) and table.X.sum() > 0
    # µm/px from the lattice, measured here independently: neighbours one array step apart are 200 µm apart
    xy = table.obsm["spatial"]
    arr = table.obs[["array_col", "array_row"]].to_numpy()
    step = np.abs(arr[:, None, :] - arr[None, :, :]).sum(-1) == 1
    pitch_px = np.median(np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=-1)[step])
    um_per_px = 50.0 / st.shapes["C3"]["radius"].iloc[0]
    assert um_per_px == pytest.approx(200.0 / pitch_px, rel=0.02)
    assert um_per_px == pytest.approx(0.69, rel=0.03)  # the figure in the data README


@realdata
def test_her2st_spots_on_tissue(st):
    levels = st.images["C3_full_image"]
    full = levels["scale0"]["image"]
    small = levels["scale3"]["image"]  # 8x smaller
    factor = full.shape[1] / small.shape[1]
    grey = small.values.mean(axis=0)
    xy = st.tables["table"].obsm["spatial"]
    assert ((xy >= 0) & (xy < [full.shape[2], full.shape[1]])).all()
    col = (xy[:, 0] / factor).astype(int)
    row = (xy[:, 1] / factor).astype(int)
    background = np.percentile(grey, 75)  # most of the slide is bright glass
    under_spots = np.array([grey[r - 2 : r + 3, c - 2 : c + 3].mean() for r, c in zip(row, col, strict=True)])
    assert (under_spots < background - 20).mean() > 0.8


# ---------------------------------------------------------------------------------------------------------- CosMx


@realdata
def test_cosmx_layout_and_um_per_px(cosmx):
    assert set(cosmx.images) == {"2_image", "3_image"}
    assert set(cosmx.labels) == {"2_labels", "3_labels"}
    assert set(cosmx.points) == {"transcripts"}
    assert set(cosmx.coordinate_systems) == {"global"}
    m = _affine(cosmx.points["transcripts"], "global")
    assert 1 / m[0, 0] == pytest.approx(0.18) and 1 / m[1, 1] == pytest.approx(0.18)
    # FOV 3 sits right of FOV 2 (FOV positions file), same rows
    t2, t3 = (_affine(cosmx.images[f"{f}_image"], "global") for f in (2, 3))
    assert t3[0, 2] - t2[0, 2] == pytest.approx(672, abs=1) and t3[1, 2] == pytest.approx(t2[1, 2])
    table = cosmx.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region_key"] == "fov_labels" and attrs["instance_key"] == "cell_ID"
    assert not table.var_names.str.startswith("NegPrb").any()
    assert cosmx.points["transcripts"]["target"].compute().astype(str).str.startswith("NegPrb").any()
    assert _is_count_matrix(table.X)
    for fov in (2, 3):
        ids = set(np.unique(cosmx.labels[f"{fov}_labels"].values)) - {0}
        assert set(table.obs.loc[table.obs["fov"] == str(fov), "cell_ID"]) == ids


@realdata
def test_cosmx_transcripts_land_on_their_cells(cosmx):
    pts = cosmx.points["transcripts"].compute()
    to_global = _affine(cosmx.points["transcripts"], "global")
    gx = to_global[0, 0] * pts["x"].to_numpy() + to_global[0, 2]
    gy = to_global[1, 1] * pts["y"].to_numpy() + to_global[1, 2]
    for fov in (2, 3):
        labels = cosmx.labels[f"{fov}_labels"]
        lab = labels.values
        t = _affine(labels, "global")
        sel = (pts["fov"] == fov).to_numpy()
        col = np.floor(gx[sel] - t[0, 2]).astype(int)
        row = np.floor(gy[sel] - t[1, 2]).astype(int)
        inside = (col >= 0) & (col < lab.shape[1]) & (row >= 0) & (row < lab.shape[0])
        assert inside.mean() > 0.99
        value = lab[row.clip(0, lab.shape[0] - 1), col.clip(0, lab.shape[1] - 1)]
        cell = pts.loc[sel, "cell_ID"].to_numpy()
        assigned = (cell > 0) & inside
        assert (value[assigned] > 0).mean() > 0.8
        assert (value[assigned] == cell[assigned]).mean() > 0.95


@realdata
@pytest.mark.slow
def test_her2st_tiles_default_to_four_spot_pitches(datadir, log_lines, monkeypatch):
    # The ST array's spots are 200 µm apart: a 400 µm tile would hold about four spots, too few to learn from
    monkeypatch.setattr(diffst.settings, "verbosity", 1)
    st = her2st("C3")
    diffst.pp.prepare(st, genes=5, lr_um=100, scale=5)
    assert st.attrs["diffst"]["tile_um"] == 800.0
    assert any("tiles of 800 µm" in line for line in log_lines)
