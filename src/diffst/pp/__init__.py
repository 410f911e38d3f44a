"""Preprocessing: turn a SpatialData into training-ready gene rasters."""

from ._image_features import image_features
from ._prepare import prepare

__all__ = ["image_features", "prepare"]
