"""Data: sources of samples, the shard format, the batcher and prefetching."""
