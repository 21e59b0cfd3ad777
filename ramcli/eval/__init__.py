"""Benchmark evaluation: the official benchmarks' scores, metrics and plots."""
