"""Fixtures shared by the test modules."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import diffst as dst

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from diffst import DiffST


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a fixture which trains a model (named ``trained…``) is slow, like one that trains itself."""
    for item in items:
        if any(name.startswith("trained") for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _settings_restored() -> Iterator[None]:
    """``dst.settings`` after each test as it was before it: a test that changes them does not change the next."""
    import dataclasses

    before = dataclasses.replace(dst.settings)
    yield
    for f in dataclasses.fields(before):
        setattr(dst.settings, f.name, getattr(before, f.name))


@pytest.fixture(autouse=True)
def _training_is_marked_slow(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test that trains a model (``dst.tl.train`` past its checks) without being marked ``slow``.

    ``python -m pytest -m "not slow"`` is the quick suite; it must train nothing. Fixtures that train are named
    ``trained…`` (see :func:`pytest_collection_modifyitems`).
    """
    if request.node.get_closest_marker("slow") is not None:
        return
    from diffst.tl import _train

    def refuse(self, *args, **kwargs):
        pytest.fail(f"{request.node.nodeid} trains a model but is not marked slow (@pytest.mark.slow)")

    monkeypatch.setattr(_train._Fit, "run", refuse)


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a test that starts a dask ``LocalCluster``: its nannies set ``OMP_NUM_THREADS=1`` & co. in this process's
    environment; the variables are restored after the test."""
    import os

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "DASK_PARENT"):
        present = name in os.environ
        monkeypatch.setenv(name, os.environ.get(name, ""))  # monkeypatch now restores its state at teardown
        if not present:
            monkeypatch.delenv(name)


@pytest.fixture
def quiet() -> Iterator[None]:
    """``dst.settings.verbosity = 0`` for one test (modules opt in with ``pytestmark = usefixtures("quiet")``)."""
    before = dst.settings.verbosity
    dst.settings.verbosity = 0
    yield
    dst.settings.verbosity = before


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """The messages of the ``diffst`` logger during one test (it does not propagate to pytest's ``caplog``)."""
    handler = _Lines()
    logger = logging.getLogger("diffst")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def prepared() -> SpatialData:
    """The toy section most training tests share (:func:`tests.toy.toy_prepared`), one per test module."""
    from tests.toy import toy_prepared

    before = dst.settings.verbosity
    dst.settings.verbosity = 0
    try:
        return toy_prepared()
    finally:
        dst.settings.verbosity = before


@pytest.fixture
def prepared_toy() -> SpatialData:
    """A tiny prepared section (tests/toy.py: 320 µm, 3 genes, 40 → 10 µm, 160 µm tiles), fresh for each test."""
    from tests.toy import toy_xenium

    sdata = toy_xenium(size_um=320, n=8000, seed=1)
    before = dst.settings.verbosity
    dst.settings.verbosity = 0
    try:
        dst.pp.prepare(sdata, genes=3, lr_um=40.0, scale=4, tile_um=160.0)
    finally:
        dst.settings.verbosity = before
    return sdata


@pytest.fixture
def untrained_model(prepared_toy: SpatialData) -> DiffST:
    """An untrained ``tiny`` Diff-ST for :func:`prepared_toy` (its output is the mask-aware bicubic baseline)."""
    from diffst._contract import Prepared
    from tests.models import untrained

    return untrained(Prepared.from_sdata(prepared_toy, "diffst"))
