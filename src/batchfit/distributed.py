"""torch.distributed setup and the few collective helpers the trainer needs.

A run started by ``torchrun`` has ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; the trainer then initialises the process group (nccl on CUDA, gloo on CPU)
unless the user already did, and wraps the model in ``DistributedDataParallel``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import DistributedError


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # batchfit initialised the process group and destroys it

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that shows progress and writes files."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place; returned for convenience)."""
        if self.enabled:
            try:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            except Exception as error:  # a peer died or timed out
                raise DistributedError(
                    f"rank {self.rank}: a collective operation failed, another rank has probably "
                    f"failed or stopped ({type(error).__name__}: {error})"
                ) from error
        return tensor

    def close(self) -> None:
        """Destroy the process group if batchfit created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from a torchrun environment, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def setup(device_type: str, timeout_s: float = 300.0) -> DistContext:
    """Join the process group of a torchrun launch (or the one the user created)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistContext(dist.get_rank(), dist.get_world_size(), local)
    found = env_world()
    if found is None or found[1] <= 1 or not dist.is_available():
        return DistContext()
    rank, world, local = found
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, owns_group=True)
