"""diffst.pl."""
