"""diffst: image-guided super-resolution of spatial transcriptomics with cross-modal diffusion (Diff-ST)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets, get, pl, pp, tl
from ._settings import settings
from .tl import DiffST

try:
    __version__ = version("diffst")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["DiffST", "__version__", "datasets", "get", "pl", "pp", "settings", "tl"]
