"""Embedded tiny setup (random tiny models of the real classes, synthetic corpus)."""
