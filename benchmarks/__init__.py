"""batchfit's benchmarks: run from a checkout with ``python benchmarks/run.py`` (not installed with the library)."""
