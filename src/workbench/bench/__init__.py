"""Benchmarks: kernel micro-benchmarks (and, later, end-to-end training)."""
