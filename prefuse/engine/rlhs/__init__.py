"""RLHS."""
