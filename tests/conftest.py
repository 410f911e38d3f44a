"""Fixtures shared by the test modules."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import diffst as dst


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
