"""Benchmarks: `python -m benchmarks [--quick] [--only NAME ...]` (see README, Performance)."""
