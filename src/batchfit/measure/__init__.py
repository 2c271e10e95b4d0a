"""Batch size and learning rate: memory fit, noise scale, lr rules and range test, tuning."""
