"""Overhead benchmarks for lightning_sphere; run ``python benchmarks/run.py`` (see README.md here)."""
