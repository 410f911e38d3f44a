"""Add elements to a SpatialData (and its zarr store) all-or-nothing, never replacing anything unasked."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _logging as log

if TYPE_CHECKING:
    import dask.array as da
    from spatialdata import SpatialData

_KINDS = ("images", "labels", "points", "shapes", "tables")


def element_names(key: str) -> dict[str, str]:
    """Names of the elements ``dst.pp.prepare`` writes under ``key``."""
    return {
        "lr": f"{key}_lr",
        "lr_mask": f"{key}_lr_mask",
        "hr": f"{key}_hr",
        "tissue": f"{key}_tissue",
        "tiles": f"{key}_tiles",
        "spots": f"{key}_spots",
        "context": f"{key}_context",
    }


def _in_memory(sdata: SpatialData, name: str) -> bool:
    return any(name in getattr(sdata, kind) for kind in _KINDS)


def _on_disk(sdata: SpatialData) -> set[str]:
    if sdata.path is None or not sdata.path.exists():
        return set()
    return {p.split("/", 1)[1] for p in sdata.elements_paths_on_disk()}


class ElementWriter:
    """Write new elements and attrs into a SpatialData in one step.

    Nothing is touched until :meth:`commit`, which adds everything in memory and, for a zarr-backed object, on disk;
    if anything fails on the way, what was added is removed again and ``attrs`` restored, so the SpatialData is as it
    was (elements that ``overwrite=True`` replaced cannot be brought back).
    """

    def __init__(self, sdata: SpatialData, *, overwrite: bool) -> None:
        self.sdata = sdata
        self.overwrite = overwrite

    def check_free(self, names: Iterable[str], *, attrs_key: str | None = None) -> None:
        """Raise before any work if a name is taken (in memory, on disk or in attrs) and ``overwrite`` is off."""
        if self.overwrite:
            return
        disk = _on_disk(self.sdata)
        taken = [n for n in names if _in_memory(self.sdata, n) or n in disk]
        if attrs_key is not None and attrs_key in self.sdata.attrs:
            taken.append(f"attrs[{attrs_key!r}]")
        if taken:
            msg = f"{', '.join(taken)} already exist in this SpatialData. Pass `overwrite=True` to replace them, or choose another `key_added`."
            raise ValueError(msg)

    def commit(self, elements: dict[str, tuple[str, Any]], *, attrs: dict[str, Any], stale: Iterable[str] = ()) -> None:
        """Add ``{name: (kind, element)}`` and ``attrs``; ``stale`` names are removed (when overwriting)."""
        sdata = self.sdata
        backed = sdata.path is not None and sdata.path.exists()
        disk = _on_disk(sdata)
        old_attrs = copy.deepcopy(dict(sdata.attrs))
        added: list[str] = []
        try:
            for name in list(elements) + [n for n in stale if n not in elements]:
                if _in_memory(sdata, name):
                    del sdata[name]
                if name in disk:
                    sdata.delete_element_from_disk(name)
            for name, (kind, element) in elements.items():
                getattr(sdata, kind)[name] = element
                added.append(name)
                if backed:
                    sdata.write_element(name)
            sdata.attrs.update(copy.deepcopy(attrs))
            if backed:
                sdata.write_attrs()
                _reload(sdata, elements)
        except BaseException:
            for name in added:
                if _in_memory(sdata, name):
                    del sdata[name]
                if backed and name in _on_disk(sdata):
                    sdata.delete_element_from_disk(name)
            sdata.attrs.clear()
            sdata.attrs.update(old_attrs)
            if backed:
                try:
                    sdata.write_attrs()
                except Exception as e:  # noqa: BLE001 - the original error matters more
                    log.warn(f"could not restore attrs on disk: {e}")
            raise
        if backed:
            log.info(f"wrote {', '.join(elements)} to {sdata.path}")


def _reload(sdata: SpatialData, elements: dict[str, tuple[str, Any]]) -> None:
    """Point the in-memory elements at what was just written, so they do not depend on temporary data."""
    from spatialdata import read_zarr

    kinds = tuple(sorted({kind for kind, _ in elements.values()} - {"tables"}))
    if not kinds:
        return
    fresh = read_zarr(sdata.path, selection=kinds)
    for name, (kind, _) in elements.items():
        if kind in kinds:
            getattr(sdata, kind)[name] = fresh[name]


@contextlib.contextmanager
def scratch_beside(sdata: SpatialData | None) -> Iterator[Path | None]:
    """A temporary folder beside a zarr-backed SpatialData (same disk), else None."""
    if sdata is None or sdata.path is None or not Path(sdata.path).exists():
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix=".diffst-tmp-", dir=Path(sdata.path).parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def distributed_client() -> bool:
    """Whether a ``dask.distributed`` client is active (its scheduler then runs the graphs diffst computes)."""
    try:
        from distributed import get_client

        get_client()
    except (ImportError, ValueError):
        return False
    return True


def materialise(stack: da.Array, scratch: Path | None) -> Any:
    """Compute a lazy raster chunk by chunk, into a zarr store in ``scratch`` (read back lazily) or into memory.

    With a ``scratch`` folder, memory stays bounded by a few chunks whatever the raster's size.

    Without a ``dask.distributed`` client the chunks run one after the other in this thread (torch already uses every
    core, and the network runs markedly slower in a worker thread than in the calling one); with one, on its cluster.
    The result is written once, so a multiscale element built on it does not compute the chunks again per level.
    """
    import dask
    import dask.array as da

    local = contextlib.nullcontext() if distributed_client() else dask.config.set(scheduler="synchronous")
    with local:
        if scratch is not None:
            target = str(scratch / "raster.zarr")
            stack.to_zarr(target)
            return da.from_zarr(target)
        return np.asarray(stack.compute())


def trim_memory() -> None:
    """Give memory freed by large arrays back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Each chunk allocates and frees arrays of tens of MB; glibc keeps freed ones below its (growing) mmap threshold
    in the heap, so without this the process's memory creeps up with the number of chunks (dask.distributed trims
    its workers for the same reason).
    """
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - not glibc: AttributeError
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None
