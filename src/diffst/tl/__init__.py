"""diffst.tl."""
