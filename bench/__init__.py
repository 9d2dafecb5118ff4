"""Benchmarks: reproducible commands writing JSON results to bench/results/ (never timed assertions)."""
