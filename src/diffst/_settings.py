"""Package-wide settings: where datasets, models and caches live."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pooch

__all__ = ["settings"]


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


@dataclass
class _Settings:
    """Settings of diffst.

    Attributes
    ----------
    cachedir
        Where downloaded datasets and trained models without a home are kept.
        Defaults to ``$DIFFST_CACHE_DIR`` or the operating system's user cache (``pooch.os_cache("diffst")``).
    datadir
        A local copy of the public raw dataset files (the layout of the download cache, one folder per dataset,
        e.g. ``merfish_mousebrain_giotto/``). When set, :mod:`diffst.datasets` reads from it and downloads nothing.
        Defaults to ``$DIFFST_DATA_DIR``.
    verbosity
        0 silent, 1 progress and short summaries (default), 2 details.
    progress_every
        Seconds between two progress lines of :func:`diffst.tl.train` (step, loss, latest validation, time left);
        plain lines, so they read the same in a terminal, a notebook and a log file.

    """

    cachedir: Path = field(default_factory=lambda: _env_path("DIFFST_CACHE_DIR") or Path(pooch.os_cache("diffst")))
    datadir: Path | None = field(default_factory=lambda: _env_path("DIFFST_DATA_DIR"))
    verbosity: int = 1
    progress_every: float = 30.0


settings = _Settings()
