"""The prepared-data contract (``diffst._contract``): typed records, one window reader, one sub-grid."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import spatialdata as sd

import diffst as dst
from diffst._contract import (
    SCHEMA_VERSION,
    ContractError,
    Prepared,
    PreparedRecord,
    SRRecord,
    keys_of,
    kind_of,
    read_record,
    read_sr,
    read_window,
)
from diffst._degradation import SpotDegradation, hex_lattice
from diffst._grid import Grid

pytestmark = pytest.mark.usefixtures("quiet")

SRC = Path(dst.__file__).parent


@pytest.fixture
def stored(tmp_path: Path) -> sd.SpatialData:
    """A prepared toy section with a bicubic result, written to zarr and read back."""
    from .toy import toy_xenium

    sdata = toy_xenium(size_um=320, n=8000, seed=1)
    dst.pp.prepare(sdata, genes=4, lr_um=40.0, scale=4, tile_um=80.0)
    dst.tl.upsample(sdata, method="bicubic")
    sdata.write(tmp_path / "s.zarr")
    return sd.read_zarr(tmp_path / "s.zarr")


def test_entries_are_told_apart_by_their_schema_tag(stored):
    raw = stored.attrs["diffst"]
    assert raw["diffst_schema"] == f"prepared/{SCHEMA_VERSION}"
    assert kind_of(raw) == "prepared" and kind_of(stored.attrs["bicubic_sr"]) == "sr"
    assert keys_of(stored, "prepared") == ["diffst"] and keys_of(stored, "sr") == ["bicubic_sr"]
    untagged = {k: v for k, v in raw.items() if k != "diffst_schema"}
    assert kind_of(untagged) is None  # no tag, not ours: nothing before the first release needs reading
    record, mean, std = read_sr(stored, "bicubic_sr")
    prep = Prepared.from_sdata(stored, "diffst")
    assert record.method == "bicubic" and record.prepared_key == "diffst" and std is None
    assert record.grid == prep.grid and mean.shape[0] == 4


def test_records_round_trip_every_stored_key(stored):
    for key, cls in (("diffst", PreparedRecord), ("bicubic_sr", SRRecord)):
        raw = dict(stored.attrs[key])
        again = cls.from_dict(raw, key).to_dict()
        assert again == raw
    # keys this version does not know are kept
    raw = dict(stored.attrs["diffst"]) | {"from_the_future": {"a": 1}}
    assert PreparedRecord.from_dict(raw).to_dict()["from_the_future"] == {"a": 1}


def test_a_newer_schema_is_refused_with_the_fix(stored):
    stored.attrs["diffst"] = dict(stored.attrs["diffst"]) | {"diffst_schema": f"prepared/{SCHEMA_VERSION + 1}"}
    with pytest.raises(ContractError, match=r"newer diffst .*pip install -U diffst"):
        Prepared.from_sdata(stored, "diffst")
    with pytest.raises(KeyError, match="No prepared data under key 'nope'.*prepared keys"):
        read_record(stored, "nope")


def test_updating_the_record_writes_it_to_the_store(stored):
    from diffst._contract import update_record

    genes = read_record(stored, "diffst").genes
    update_record(stored, "diffst", model={"path": "elsewhere.pt"})
    back = sd.read_zarr(stored.path)
    assert back.attrs["diffst"]["model"] == {"path": "elsewhere.pt"}
    assert back.attrs["diffst"]["diffst_schema"] == f"prepared/{SCHEMA_VERSION}"
    assert read_record(back, "diffst").genes == genes


def test_read_window_pads_with_zeros_and_picks_channels():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 5, 6)).astype(np.float32)
    padded = np.pad(data, ((0, 0), (4, 4), (4, 4)))
    for rows, cols in (((-2, 3), (1, 9)), ((0, 5), (0, 6)), ((-4, -1), (2, 4)), ((3, 8), (-3, 2))):
        want = padded[:, rows[0] + 4 : rows[1] + 4, cols[0] + 4 : cols[1] + 4]
        np.testing.assert_array_equal(read_window(data, rows, cols), want)
        np.testing.assert_array_equal(read_window(data, rows, cols, channels=[2, 0]), want[[2, 0]])
        np.testing.assert_array_equal(read_window(data[1], rows, cols, dtype=np.float64), want[1])
    assert read_window(data[0] > 0, (-1, 2), (0, 2), dtype=bool).dtype == bool


def test_spot_window_degrades_like_the_whole_operator():
    grid = Grid((0.0, 0.0), 50.0, 5, (12, 12))
    op = SpotDegradation(grid, hex_lattice(grid, 50.0), 40.0)
    hr = np.random.default_rng(1).gamma(2.0, 1.0, size=(2, *grid.hr_shape))
    full = op.degrade(hr)
    r0, c0, r1, c1, m = 3, 4, 8, 10, 1
    sub, inside = op.window(r0, c0, r1, c1, margin=m)
    assert sub.grid.lr_shape == (r1 - r0 + 2 * m, c1 - c0 + 2 * m) and sub.n_spots == len(inside) > 0
    s = grid.scale
    part = sub.degrade(read_window(hr, ((r0 - m) * s, (r1 + m) * s), ((c0 - m) * s, (c1 + m) * s)))
    np.testing.assert_allclose(part[:, m:-m, m:-m], full[:, r0:r1, c0:c1], rtol=1e-6)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
    return out


def test_get_and_pl_import_no_tool_internals():
    for package in ("get", "pl"):
        for path in (SRC / package).glob("*.py"):
            bad = [m for m in _imports(path) if m.startswith("..tl._") or m.startswith("diffst.tl._")]
            assert not bad, f"{path.name} imports {bad}"


def test_only_the_contract_reads_our_attrs_by_string():
    """No module but ``_contract`` indexes ``.attrs`` with a string (the readers' own attrs in ``datasets`` aside)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name in ("_contract.py", "_store.py") or "datasets" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            target = node.value if isinstance(node, ast.Subscript) else None
            if isinstance(target, ast.Attribute) and target.attr == "attrs":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if (
                isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Attribute)
                and target.value.attr == "attrs"
            ):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, offenders
