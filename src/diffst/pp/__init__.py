"""Preprocessing: turn a SpatialData into training-ready gene rasters."""
