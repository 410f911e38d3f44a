"""diffst.get."""
