"""Get: super-resolved maps as AnnData, per HR pixel or aggregated over cells, for scanpy and squidpy."""

from ._aggregate import aggregate
from ._pixels import pixels

__all__ = ["aggregate", "pixels"]
