"""torch.distributed setup and the few collective helpers the trainer needs.

A run started by ``torchrun`` has ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; the trainer then initialises the process group (nccl on CUDA, gloo on CPU)
unless the user already did, and wraps the model in ``DistributedDataParallel`` (or, with
``strategy="fsdp"``, shards it: :mod:`batchfit.sharding`).

Failures: a rank that raises leaves the process group at once (:meth:`DistContext.abort`),
after posting its error in the group's key-value store, so that the other ranks stop within
moments with a :class:`DistributedError` that names it, instead of waiting for the timeout.
A rank that dies without a word (SIGKILL) closes its connections, which the others see as a
failed collective; a rank that hangs is caught by the process-group timeout
(``BATCHFIT_DIST_TIMEOUT`` seconds, default 300).
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .core.step import NoiseSample
from .errors import DistributedError, expected

TIMEOUT_ENV = "BATCHFIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
ABORT_LEAVE_S = 5.0  # how long a failing rank waits to leave the group before it goes on
_ERROR_KEY = "batchfit/failed"  # where a failing rank posts its error for the others
# Words of the errors a collective raises when a peer is gone, hung or left (gloo, nccl, the c10d
# store), matched in lower case; tests/test_distributed_errors.py holds the messages seen.
_PEER_GONE = ("connection closed", "connection reset", "connection refused", "broken pipe", "timed out", "timeout",
              "pair closure", "socket", "unreachable", "gloo", "nccl", "tcpstore")


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
        return self._all_reduce(tensor, dist.ReduceOp.SUM) if self.enabled else tensor

    def start_all_reduce_sum(self, tensor: torch.Tensor) -> Any:
        """Start summing ``tensor`` over ranks in the background; :meth:`wait` for the returned work."""
        try:
            return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        except Exception as error:
            raise self.peer_failure(error) from error

    def sum_later(self, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start summing ``tensor`` over ranks (in place); the returned function waits for the sum and returns it."""
        work = self.start_all_reduce_sum(tensor)

        def result() -> torch.Tensor:
            self.wait(work)
            return tensor

        return result

    def wait(self, work: Any) -> None:
        """Wait for a collective started in the background."""
        try:
            work.wait()
        except Exception as error:  # a peer died, left or timed out
            raise self.peer_failure(error) from error

    def reduce_min(self, value: float) -> float:
        """The smallest ``value`` over ranks (float64; one small collective)."""
        return -self.reduce_max(-value)

    def reduce_max(self, value: float) -> float:
        """The largest ``value`` over ranks (float64; one small collective; ``inf`` passes through)."""
        if not self.enabled:
            return value
        found = self._all_reduce(torch.tensor([value], dtype=torch.float64, device=self._device()),
                                 dist.ReduceOp.MAX)
        return float(found[0])

    def all_equal(self, value: int) -> bool:
        """Whether every rank passed the same ``value`` (one small collective)."""
        if not self.enabled:
            return True
        both = self._all_reduce(torch.tensor([value, -value], dtype=torch.int64, device=self._device()),
                                dist.ReduceOp.MAX)
        return int(both[0]) == -int(both[1])

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        try:
            dist.all_reduce(tensor, op=op)
        except Exception as error:  # a peer died, left or timed out
            raise self.peer_failure(error) from error
        return tensor

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def peer_failure(self, error: BaseException) -> DistributedError:
        """The error to raise on this rank when ``error`` came from a collective that another rank broke."""
        if isinstance(error, DistributedError):
            return error
        posted = self._posted_error()
        if posted is not None:
            return DistributedError(f"rank {self.rank}: stopped because {posted}")
        return DistributedError(
            f"rank {self.rank}: a collective operation failed; another rank has probably died or stopped "
            f"responding ({type(error).__name__}: {_first_line(error)})")

    def abort(self, error: BaseException) -> DistributedError | None:
        """Leave the process group after ``error`` so that the other ranks stop now, not at the timeout.

        Returns the :class:`DistributedError` to raise instead of ``error`` when ``error`` was caused
        by another rank's failure, or None when it is this rank's own error; that one is posted
        first, so that the other ranks can name it. The group is destroyed even when the user
        created it: a group whose ranks have left mid-step cannot be used again.
        """
        replacement = None
        if _is_peer_gone(error) or (isinstance(error, RuntimeError) and self._posted_error() is not None):
            replacement = self.peer_failure(error)
        else:
            self._post_error(f"rank {self.rank} failed: {type(error).__name__}: {_first_line(error)}")
        if dist.is_initialized():
            _leave_group(ABORT_LEAVE_S)
        self.owns_group = False
        return replacement

    def _post_error(self, message: str) -> None:
        try:
            _store().set(_ERROR_KEY, message)
        except Exception:  # no store (or it went with a dead rank 0): the others get the generic message
            pass

    def _posted_error(self) -> str | None:
        try:
            store = _store()
            if store.check([_ERROR_KEY]):  # never waits, unlike get
                return store.get(_ERROR_KEY).decode(errors="replace")
        except Exception:
            pass
        return None

    def close(self) -> None:
        """Destroy the process group if batchfit created it, once every rank has come to close it.

        The ranks wait for each other first (at most a minute), so that no rank tears its
        connections down while another is still finishing; a rank that has already gone ends
        the wait at once.
        """
        if self.owns_group and dist.is_initialized():
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
            except Exception:  # another rank failed or left: leave all the same
                pass
            dist.destroy_process_group()
        self.owns_group = False


@dataclass(frozen=True)
class Agreed:
    """What every rank learns from a step's agreement, identically."""

    loss: torch.Tensor  # the batch's mean loss (the ranks' shares summed)
    stop: bool  # some rank asked to stop after the previous step
    signal: bool  # some rank received SIGTERM/SIGINT
    noise: NoiseSample | None  # the ranks' noise samples averaged (at the harmonic mean of their sizes)


class StepAgreement:
    """The one small all-reduce of each distributed step: the loss, and what all ranks must decide alike.

    Besides this rank's loss share it carries whether this rank asked to stop or received a
    signal, and its noise sample, whose first micro-batch gradient is local to the rank: the
    samples are averaged, so every rank's noise tracker (and with it the batch size and the
    learning rate) stays the same. :meth:`start` is called just before the step's last backward,
    so that the all-reduce travels while the backward computes instead of adding a wait of its own.

    Under DDP (given the model's :class:`GradientCarrier`) the values ride in the gradient all-reduce
    itself, as the gradient of a parameter of their own: they cost no collective and no Python on
    DDP's path — on a busy CPU each extra collective costs far more than its bytes. They ride only
    where they fit the carrier's dtype exactly (float32 or float64 gradients, no noise sample, no
    fp16 loss scale); otherwise, identically on every rank, they travel in an all-reduce of their own.
    """

    def __init__(self, context: DistContext, device: torch.device, carrier: GradientCarrier | None = None) -> None:
        self.context, self.device, self.carrier = context, device, carrier
        self._pending: tuple[torch.Tensor, Any] | None = None
        self._flags: dict[tuple[bool, bool, torch.dtype], torch.Tensor] = {}  # stop and signal flags, made once

    def start(self, loss: torch.Tensor | None, noise: NoiseSample | None, stop: bool, signal: bool,
              ride: bool = False) -> torch.Tensor | None:
        """Start summing this rank's ``loss`` share, ``stop``/``signal`` flags and ``noise`` over ranks.

        ``ride``: the gradient all-reduce of a DDP backward follows on every rank, and may carry them.
        Returns what the caller must add to the loss of that backward (``None`` without ``ride``): a
        term whose value is zero and whose gradient is the carrier's numbers (zeros when they do not ride).
        """
        small_sq, inverse_b = (noise.small_sq, 1.0 / noise.b_small) if noise is not None else (0.0, 0.0)
        carrier = self.carrier if ride else None
        if carrier is not None and noise is None and carrier.exact:
            dtype = carrier.dtype
            flags = self._flags.get((stop, signal, dtype))
            if flags is None:
                flags = torch.tensor([float(stop), float(signal)], dtype=dtype, device=self.device)
                self._flags[stop, signal, dtype] = flags
            share = torch.zeros(1, dtype=dtype, device=self.device) if loss is None else \
                loss.detach().reshape(1).to(dtype)
            self._pending = (flags, None)
            return carrier.term(torch.cat([share, flags]))  # in the carrier's precision (float32 at least)
        values = torch.tensor([0.0, float(stop), float(signal), small_sq, inverse_b, float(noise is not None)],
                              dtype=torch.float64, device=self.device)
        if loss is not None:
            values[0] = loss.detach()
        self._pending = (values, self.context.start_all_reduce_sum(values))
        return None if carrier is None else carrier.term(None)  # DDP expects a gradient of every parameter

    def finish(self) -> Agreed:
        """Wait for the all-reduce :meth:`start` began; what every rank now knows."""
        assert self._pending is not None, "finish() without start()"
        values, work = self._pending
        self._pending = None
        if work is None:  # carried by the gradient all-reduce
            assert self.carrier is not None
            values = self.carrier.unload()
        else:
            self.context.wait(work)
            if self.carrier is not None:
                self.carrier.clear()
        numbers = values.tolist()
        loss, stops, signals = numbers[:3]
        small_sum, inverse_b_sum, measured = numbers[3:] if len(numbers) == 6 else (0.0, 0.0, 0.0)
        # E|G_b|² = |G|² + tr(Σ)/b, so the mean over ranks of measurements at sizes b_r is one
        # at their harmonic mean.
        noise = NoiseSample(small_sum / measured, measured / inverse_b_sum) if measured else None
        return Agreed(values[0].float(), stops > 0.5, signals > 0.5, noise)


class AgreementSlot(torch.nn.Module):
    """The user's module (``.module``, called as it is) beside one parameter of three numbers, ``slot``,
    whose gradient carries the step's agreement through DDP's own gradient all-reduce."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.module = module
        self.slot = torch.nn.Parameter(torch.zeros(3, dtype=dtype, device=device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The user's module's forward, untouched."""
        return self.module(*args, **kwargs)


class GradientCarrier:
    """Sums a few numbers over ranks in the gradient all-reduce of a DDP backward, without a hook.

    :attr:`slot` (an :class:`AgreementSlot` around the user's module) is what DDP wraps. The
    slot's parameter is not the optimizer's; the loss of every synchronising backward gets the term
    ``slot · values`` (:meth:`term`), whose value is zero and whose gradient is ``values``, so DDP's
    built-in all-reduce sums them with the model's gradients, in the same bucket, as a hand-written
    DDP loop does (divided by the world size, as DDP does, and multiplied back: exact for 2, 4, 8 ...
    ranks, within one rounding of the sum otherwise). The parameter has the dtype of the model's
    first parameter, so that it joins a bucket that exists anyway; the numbers ride only where that
    dtype holds them exactly (float32, float64): :attr:`exact`.
    """

    def __init__(self, module: torch.nn.Module, world_size: int) -> None:
        first = next((p for p in module.parameters() if p.is_floating_point()), None)
        dtype = torch.float32 if first is None else first.dtype
        device = torch.device("cpu") if first is None else first.device
        self.slot = AgreementSlot(module, dtype, device)
        self.world_size = world_size
        self.dtype = dtype
        self.exact = dtype in (torch.float32, torch.float64)
        self._zeros = torch.zeros(3, dtype=dtype, device=device)

    def term(self, values: torch.Tensor | None) -> torch.Tensor:
        """What to add to the loss of the next synchronising backward: zero, with ``values`` (or zeros) as the
        gradient of the slot."""
        return torch.dot(self.slot.slot, self._zeros if values is None else values)

    def unload(self) -> torch.Tensor:
        """The sums over ranks of the values of the last :meth:`term`, after its backward."""
        grad = self.slot.slot.grad
        if grad is None:
            raise RuntimeError("batchfit: the step's agreement was to ride on a gradient all-reduce that never ran")
        self.slot.slot.grad = None  # the next backward starts from nothing
        return grad * self.world_size

    def clear(self) -> None:
        """Drop the slot's gradient of a backward whose numbers did not ride."""
        self.slot.slot.grad = None


def _leave_group(seconds: float) -> None:
    """Destroy the process group, waiting at most ``seconds`` for it.

    Destroying a group while another rank is still inside a collective can block (seen with
    gloo); the error that led here must not wait on it. If it blocks, this rank goes on and its
    exit closes the connections, which is what the other ranks need to notice.
    """
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # leaving a broken group may fail too; the ranks stop either way
            pass
        finally:
            done.set()

    threading.Thread(target=destroy, name="batchfit-leave-group", daemon=True).start()
    done.wait(seconds)


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from a torchrun environment, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def timeout_from_env() -> float:
    """Seconds a collective may wait for the other ranks: ``BATCHFIT_DIST_TIMEOUT`` or 300."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise expected(TIMEOUT_ENV, "a positive number of seconds", text)
    return seconds


def setup(device_type: str, timeout_s: float | None = None) -> DistContext:
    """Join the process group of a torchrun launch (or the one the user created).

    ``timeout_s`` (default :func:`timeout_from_env`) bounds how long a collective waits for a
    rank that stopped answering; a rank that died is usually noticed at once (closed connections).
    """
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
    timeout = timeout_from_env() if timeout_s is None else timeout_s
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout), store=_attempt_store(world, timeout))
    context = DistContext(rank, world, local, owns_group=True)
    atexit.register(context.close)
    return context


def _attempt_store(world: int, timeout: float) -> Any:
    """Under torchrun's elastic agent, the agent's store seen through a prefix of this attempt; else ``None``.

    The agent keeps one store across restarts, so the keys of the group that failed are still in
    it: a rank of the restarted group that asks for a peer's address before the peer has written
    its new one reads the dead process's, and the connection is refused. A prefix per attempt
    (``TORCHELASTIC_RESTART_COUNT``) keeps every attempt's keys apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    return dist.PrefixStore(f"batchfit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _store() -> Any:
    """The key-value store every rank of the default process group shares."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _first_line(error: BaseException) -> str:
    """The gist of an error message: its first line without a ``[file.cc:123]`` prefix, at most 300 characters."""
    lines = str(error).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else "")
    return line if len(line) <= 300 else line[:297] + "..."


def _is_peer_gone(error: BaseException) -> bool:
    """Whether ``error`` is what a collective raises when another rank died, left or hung.

    By type first (``torch.distributed``'s DistError family: backend, network and store errors),
    then by the words of the message, for the RuntimeErrors that older builds and gloo raise.
    """
    if isinstance(error, (DistributedError, dist.DistError)):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error).lower() for word in _PEER_GONE)
