"""diffst.model."""
