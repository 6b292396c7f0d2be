"""Bytewax dataflows that keep per-project insight state in Redis."""
