"""The prepared-data contract (``diffst._contract``): typed records, old stores, one window reader, one sub-grid."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
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
from diffst.tl._model import fingerprint

pytestmark = pytest.mark.usefixtures("quiet")

SRC = Path(dst.__file__).parent
#: Written by diffst 0.1.0.dev0 at commit 3e6d65e, before the contract module (tests/data/make_prepared_0.1.0.dev0.py).
OLD_STORE = Path(__file__).parent / "data" / "prepared_0.1.0.dev0.zarr"


@pytest.fixture
def old(tmp_path: Path) -> sd.SpatialData:
    path = tmp_path / "old.zarr"
    shutil.copytree(OLD_STORE, path)
    return sd.read_zarr(path)


def test_a_store_written_before_the_contract_module_still_loads(old):
    raw = old.attrs["diffst"]
    assert "diffst_schema" not in raw  # written before the tag existed
    assert kind_of(raw) == "prepared" and kind_of(old.attrs["bicubic_sr"]) == "sr"
    assert keys_of(old, "prepared") == ["diffst"] and keys_of(old, "sr") == ["bicubic_sr"]
    prep = Prepared.from_sdata(old, "diffst")
    assert prep.genes == raw["genes"] == ["G2", "G6", "G4", "G3"]
    assert prep.grid.to_dict() == raw["grid"]
    assert prep.record.tile_um == 80.0 and prep.tile_lr == 2
    assert prep.record.split.tiles == {k: raw["split"][k] for k in ("train", "val", "test")}
    assert prep.record.model["path"] == "/nonexistent/model.pt"
    # the fingerprint a model records of its training data is the one the old code computed: old models still apply
    old_key = json.dumps(
        {k: raw.get(k) for k in ("grid", "genes", "sources", "coordinate_system", "normalisation", "measurement")},
        sort_keys=True,
        default=str,
    )
    assert fingerprint(prep) == hashlib.sha256(old_key.encode()).hexdigest()[:12]
    record, mean, std = read_sr(old, "bicubic_sr")
    assert record.method == "bicubic" and record.prepared_key == "diffst" and std is None
    assert record.grid == prep.grid and mean.shape[0] == 4
    # and everything after prepare reads it
    df = dst.tl.evaluate(old, key="bicubic_sr")
    assert np.isfinite(df.loc["mean", "pcc"]) and -1 <= df.loc["mean", "pcc"] <= 1
    adata = dst.get.pixels(old, key="bicubic_sr", genes=["G2"], tissue_only=False)
    assert adata.n_vars == 1 and adata.n_obs == int(np.prod(prep.grid.hr_shape))


def test_records_round_trip_every_stored_key(old):
    for key, cls in (("diffst", PreparedRecord), ("bicubic_sr", SRRecord)):
        raw = dict(old.attrs[key])
        again = cls.from_dict(raw, key).to_dict()
        assert again.pop("diffst_schema") == f"{'prepared' if key == 'diffst' else 'sr'}/{SCHEMA_VERSION}"
        assert again == raw
    # keys this version does not know are kept
    raw = dict(old.attrs["diffst"]) | {"from_the_future": {"a": 1}}
    assert PreparedRecord.from_dict(raw).to_dict()["from_the_future"] == {"a": 1}


def test_a_newer_schema_is_refused_with_the_fix(old):
    old.attrs["diffst"] = dict(old.attrs["diffst"]) | {"diffst_schema": f"prepared/{SCHEMA_VERSION + 1}"}
    with pytest.raises(ContractError, match=r"newer diffst .*pip install -U diffst"):
        Prepared.from_sdata(old, "diffst")
    with pytest.raises(KeyError, match="No prepared data under key 'nope'.*prepared keys"):
        read_record(old, "nope")


def test_updating_the_record_writes_it_to_the_store(old):
    from diffst._contract import update_record

    update_record(old, "diffst", model={"path": "elsewhere.pt"})
    back = sd.read_zarr(old.path)
    assert back.attrs["diffst"]["model"] == {"path": "elsewhere.pt"}
    assert back.attrs["diffst"]["diffst_schema"] == f"prepared/{SCHEMA_VERSION}"
    assert read_record(back, "diffst").genes == ("G2", "G6", "G4", "G3")


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
