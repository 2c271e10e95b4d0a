"""Training: the trainer, one step, checkpoints, callbacks and history."""
