"""Benchmarks: corral against its reference, measured in the same run (results in BENCHMARKS.md)."""
