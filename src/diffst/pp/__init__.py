"""Preprocessing: turn a SpatialData into training-ready gene rasters."""

from ._prepare import prepare

__all__ = ["prepare"]
