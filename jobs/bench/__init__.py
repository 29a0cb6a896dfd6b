"""Benchmarks: ``python -m jobs.bench NAME [options]``; each NAME is a module in this package."""
