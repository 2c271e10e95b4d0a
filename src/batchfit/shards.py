"""Data larger than memory: shard folders, memory-mapped and checksummed.

Reached as ``bf.shards`` (``bf.ShardSource`` and ``bf.write_shards`` are also at the top)::

    import batchfit as bf

    src = bf.shards.write("data/train", (x, y))      # or bf.write_shards
    src = bf.shards.ShardSource("data/train")         # open it again
    bf.shards.verify("data/train", "full")            # every checksum

``bf.verify_shards`` still works.
"""

from .data.shards import ShardSource, verify, write_shards

write = write_shards

__all__ = ["ShardSource", "verify", "write", "write_shards"]
