"""Benchmarks of the performance table in DESIGN.md, as ratios against baselines run side by side."""
