"""diffst: image-guided super-resolution of spatial transcriptomics with cross-modal diffusion (Diff-ST)."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ._settings import settings

if TYPE_CHECKING:  # imported on first use (below), so that `diffst --help` does not load torch
    from . import datasets, get, pl, pp, tl
    from .tl import DiffST, Interrupted

try:
    __version__ = version("diffst")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["DiffST", "Interrupted", "__version__", "datasets", "get", "pl", "pp", "settings", "tl"]

_SUBMODULES = {"datasets", "get", "pl", "pp", "tl"}


def __getattr__(name: str) -> Any:
    """``dst.pp``, ``dst.tl`` … and ``dst.DiffST``, imported when first used (PEP 562)."""
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in ("DiffST", "Interrupted"):
        cls = getattr(importlib.import_module(".tl", __name__), name)
        globals()[name] = cls
        return cls
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
