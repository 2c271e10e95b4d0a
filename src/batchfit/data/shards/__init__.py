"""Shards: data larger than memory, on disk, memory-mapped and checksummed (see format.py)."""

from .format import CHUNK_BYTES, FORMAT, MANIFEST, VERSION, read_manifest
from .read import ShardSource, verify
from .write import write_shards

__all__ = ["CHUNK_BYTES", "FORMAT", "MANIFEST", "VERSION", "ShardSource", "read_manifest", "verify", "write_shards"]
