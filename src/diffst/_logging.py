"""Messages to the user: short, and silenced by ``dst.settings.verbosity = 0``."""

from __future__ import annotations

import logging
import sys

from ._settings import settings

logger = logging.getLogger("diffst")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("diffst: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def info(msg: str) -> None:
    """Say something the user should see (verbosity >= 1)."""
    if settings.verbosity >= 1:
        logger.info(msg)


def debug(msg: str) -> None:
    """Say a detail (verbosity >= 2)."""
    if settings.verbosity >= 2:
        logger.info(msg)


def warn(msg: str) -> None:
    """Warn the user whatever the verbosity."""
    logger.warning(msg)


def interactive() -> bool:
    """A terminal or a notebook, where a tqdm bar redraws in place (in a log file its redraws would pile up)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules
