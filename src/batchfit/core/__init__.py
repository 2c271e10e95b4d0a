"""The core every other layer builds on: batches, the one training step, precision, devices,
gradient norms, random state, durable writes and small shared maths. Imports nothing of batchfit
but its errors."""
