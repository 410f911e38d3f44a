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
