"""``prepare`` reads transcripts partition by partition (``pp/_transcripts.py``): the rasters do not depend on how the
points are partitioned, on whether they come back from a zarr store, or on a dask cluster running the partitions,
and no step holds every transcript at once."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import PointsModel
from spatialdata.transformations import get_transformation

import diffst as dst
from diffst.pp import _transcripts

from .toy import toy_xenium

N = 20_000
PREPARE = {"lr_um": 40, "scale": 4, "tile_um": 160}


def _slide(npartitions: int):
    """The toy Xenium slide with a quality column (every fifth transcript below 20), its points in ``npartitions``."""
    sdata = toy_xenium(size_um=400, n=N, seed=3)
    points = sdata.points["transcripts"]
    df = points.compute()
    df["qv"] = np.where(np.arange(len(df)) % 5 == 0, 12.0, 35.0).astype(np.float32)
    sdata.points["transcripts"] = PointsModel.parse(
        dd.from_pandas(df, npartitions=npartitions, sort=False), coordinates={"x": "x", "y": "y"},
        feature_key="feature_name", transformations=get_transformation(points, get_all=True),
    )  # fmt: skip
    return sdata, df


def _rasters(sdata) -> dict[str, np.ndarray]:
    return {k: np.asarray(sdata[k].values) for k in ("diffst_hr", "diffst_lr", "diffst_tissue")}


def test_the_partitions_and_the_store_do_not_change_a_count(tmp_path):
    one, df = _slide(1)
    dst.pp.prepare(one, genes=4, **PREPARE)
    genes = list(one.attrs["diffst"]["genes"])
    want = _rasters(one)
    kept = df[df["qv"] >= 20]
    per_gene = kept["feature_name"].astype(str).value_counts()
    # every kept transcript of a chosen gene is counted once (the toy's transcripts all lie under the image)
    np.testing.assert_array_equal(want["diffst_hr"].sum(axis=(1, 2)), per_gene[genes].to_numpy())

    many, _ = _slide(7)
    assert many.points["transcripts"].npartitions == 7
    dst.pp.prepare(many, genes=genes, **PREPARE)
    # read back from zarr, as a user's slide is: parquet partitions, nothing in memory
    stored, _ = _slide(5)
    stored.write(tmp_path / "slide.zarr")
    stored = sd.read_zarr(tmp_path / "slide.zarr")
    dst.pp.prepare(stored, genes=genes, **PREPARE)
    for other in (many, stored):
        assert other.attrs["diffst"]["grid"] == one.attrs["diffst"]["grid"]
        for key, value in _rasters(other).items():
            np.testing.assert_array_equal(value, want[key], err_msg=key)


def test_no_step_holds_every_transcript_at_once(monkeypatch, log_lines):
    seen: list[int] = []
    read = _transcripts._Reader.__call__

    def spy(self, df):
        seen.append(len(df))
        return read(self, df)

    monkeypatch.setattr(_transcripts._Reader, "__call__", spy)
    monkeypatch.setattr(_transcripts, "ROWS_AT_ONCE", 1000)
    sdata, _ = _slide(8)  # partitions of 2,500
    dst.pp.prepare(sdata, genes=3, **PREPARE)
    assert max(seen) == 1000  # a slice of a partition at a time, never the whole frame
    assert len(seen) >= 3 * 8 * 3  # the passes (the scan, every gene's LR counts, the chosen genes' HR counts)
    assert any(f"quality filter: {N // 5:,} of {N:,} transcripts have qv < 20" in line for line in log_lines)


@pytest.mark.slow
def test_a_distributed_cluster_gives_the_same_rasters(cluster_env):
    distributed = pytest.importorskip("distributed")
    local, _ = _slide(6)
    dst.pp.prepare(local, genes=4, **PREPARE)
    remote, _ = _slide(6)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        dst.pp.prepare(remote, genes=4, **PREPARE)
        ran = client.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
    assert all(n > 0 for n in ran.values()), ran  # both workers ran partitions
    assert remote.attrs["diffst"]["genes"] == local.attrs["diffst"]["genes"]
    for key, value in _rasters(remote).items():
        np.testing.assert_array_equal(value, _rasters(local)[key], err_msg=key)
