"""The largest micro-batch whose forward pass, backward pass and optimizer step fit in memory.

Both devices share one search (:func:`search_largest`) over a function ``size -> peak bytes``
of one real training step:

* CUDA: the step runs in this process; the peak is ``torch.cuda.max_memory_allocated`` and an
  out-of-memory error counts as an infinite peak. The budget keeps a 10 % margin under the
  memory this process can get.
* CPU: running out of host memory does not raise, the kernel kills the process. So every trial
  runs in a forked child that reports how far its resident memory (``VmHWM``) rose above where it
  started. A child that dies or cannot allocate counts as an infinite peak, and trials only go
  to sizes a linear model ``peak ≈ a + b·size`` of the sizes measured so far predicts to fit.
  Where fork or ``/proc`` is missing, the peak is estimated in-process by adding up the bytes
  of the batch, of the tensors saved for backward, of the gradients and of new optimizer state.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import resource
import select
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..data.batcher import Batcher
from ..data.sources import Batch, Source, as_source
from ..errors import BatchfitError, check_positive_int, expected
from ..train.batch import LossFn, forward_loss
from .state import batch_to, preserved, probe, resolve_device

logger = logging.getLogger(__name__)

CPU_BUDGET_FRACTION = 0.5
CUDA_MARGIN = 0.10
TRIAL_TIMEOUT_S = 600.0
MiB = 2**20


# ----------------------------------------------------------------------------- the search


def next_trial_size(points: dict[int, float], budget: float, cap: int, margin: float = 1.25) -> int:
    """The next size to measure, given ``points`` (size -> peak bytes) measured so far.

    With no size over budget yet it grows at most twofold and no further than the linear model
    ``peak ≈ a + b·size`` through the two largest fitting sizes (slope ``b`` times ``margin``)
    predicts to fit. Between the largest fitting and the smallest failing size it interpolates
    the line through them, or bisects when the failure was an out-of-memory error (infinite
    peak). Returns the largest fitting size when nothing is left worth measuring (a step of
    less than ~3 %).
    """
    fitting = sorted(s for s, p in points.items() if p <= budget)
    if not fitting:
        smallest = min(points)
        return max(1, min(smallest - 1, int(smallest * budget / points[smallest])))
    best = fitting[-1]
    failing = sorted(s for s, p in points.items() if p > budget and s > best)
    high = min(cap, failing[0] - 1) if failing else cap
    if failing:
        worst = failing[0]
        slope = (points[worst] - points[best]) / (worst - best)  # inf when `worst` ran out of memory
        aim = best + (budget - points[best]) / slope if math.isfinite(slope) else (best + worst) / 2
    else:
        below = [s for s in fitting if s < best]
        slope = (points[best] - points[below[-1]]) / (best - below[-1]) * margin if below else 0.0
        aim = 2 * best if slope <= 0 else min(2 * best, best + (budget - points[best]) / slope)
    size = min(high, int(aim))
    # Stop once the step left is within ~3 % of the size: trials at large sizes are the costly ones.
    return size if size > best and size - best >= max(1, best // 32) else best


def search_largest(peak_of: Callable[[int], float], budget: float, cap: int, start: int = 2) -> int:
    """The largest size up to ``cap`` whose measured ``peak_of(size)`` is at most ``budget``.

    Every size returned was measured. Raises :class:`BatchfitError` when even size 1 does not fit.
    """
    points: dict[int, float] = {}
    size = min(start, cap)
    while size not in points:
        points[size] = peak_of(size)
        logger.info("micro-batch %d: peak %.1f MiB of a %.1f MiB budget", size, points[size] / MiB, budget / MiB)
        if size == 1 and points[size] > budget:
            raise BatchfitError(
                f"Even a micro-batch of 1 sample needs {points[1] / MiB:.1f} MiB, more than "
                f"memory_budget={budget:.0f} bytes ({budget / MiB:.1f} MiB). Free memory or use a smaller model."
            )
        size = next_trial_size(points, budget, cap)
    return size


# ----------------------------------------------------------------------------- one step


def _train_step(
    model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer | None, batch: Batch
) -> None:
    # Gradients are allocated afresh each step, as zero_grad(set_to_none=True) makes a trainer do.
    model.zero_grad(set_to_none=True)
    loss, _ = forward_loss(model, loss_fn, batch)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def _drawer(source: Source, seed: int) -> Callable[[int], Batch]:
    def draw(size: int) -> Batch:
        return next(iter(Batcher(source, batch_size=size, shuffle=True, seed=seed)))

    return draw


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ----------------------------------------------------------------------------- CUDA


def cuda_budget(device: torch.device) -> int:
    """Bytes a step may peak at on ``device``: 90 % of what is free plus what torch already holds."""
    free, _ = torch.cuda.mem_get_info(device)
    return int((1 - CUDA_MARGIN) * (free + torch.cuda.memory_reserved(device)))


def _free_cuda(device: torch.device) -> None:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def _cuda_peak(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer | None,
    draw: Callable[[int], Batch],
    device: torch.device,
) -> Callable[[int], float]:
    def peak_of(size: int) -> float:
        host_batch = draw(size)
        _free_cuda(device)
        torch.cuda.reset_peak_memory_stats(device)
        out_of_memory = False
        try:
            _train_step(model, loss_fn, optimizer, batch_to(host_batch, device))
            torch.cuda.synchronize(device)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is expected here
            if not _is_out_of_memory(error):
                raise
            out_of_memory = True  # leave the except block first so its traceback frees the tensors
        model.zero_grad(set_to_none=True)
        peak = math.inf if out_of_memory else float(torch.cuda.max_memory_allocated(device))
        _free_cuda(device)
        return peak

    return peak_of


# ----------------------------------------------------------------------------- CPU


def host_budget() -> int:
    """Half the host memory available now: ``MemAvailable`` of ``/proc/meminfo``, capped by a cgroup limit."""
    return int(CPU_BUDGET_FRACTION * available_host_memory())


def available_host_memory() -> int:
    """Bytes of host memory available to this process now (Linux ``/proc`` and cgroups, else sysconf)."""
    candidates = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                candidates.append(int(limit) - int(Path(usage_file).read_text()))
    if not candidates:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if not candidates:
        with contextlib.suppress(ImportError):
            import psutil  # type: ignore[import-untyped]

            candidates.append(int(psutil.virtual_memory().available))
    if not candidates:
        raise BatchfitError("Cannot tell how much host memory is available; pass `memory_budget` in bytes.")
    return max(0, min(candidates))


def _proc_status() -> dict[str, int]:
    """Byte counts of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmData``, ...)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0]) * 1024
    return values


def can_fork_measure() -> bool:
    """Whether CPU trials can run in forked children that read their own peak memory."""
    return hasattr(os, "fork") and Path("/proc/self/status").exists()


def _prepare_child(budget: float) -> int:
    """Make this forked child safe to measure in; returns its starting resident bytes."""
    torch.set_num_threads(1)  # OpenMP's thread pool does not survive fork
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")  # if memory runs out, kill this child first
    gc.disable()  # a collection here would only copy pages shared with the parent, slowly
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so growth is counted honestly
    status = _proc_status()
    # A hard ceiling a little above the budget: a trial that would outgrow it fails to allocate
    # (an infinite peak) instead of eating the machine's memory, so any size is safe to try.
    ceiling = status.get("VmData", 0) + int(1.25 * budget) + 64 * MiB
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard == resource.RLIM_INFINITY or ceiling < hard:
            resource.setrlimit(resource.RLIMIT_DATA, (ceiling, hard))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        return _proc_status()["VmRSS"]
    except OSError:
        return max(status["VmHWM"], _proc_status()["VmRSS"])


def measure_in_child(run: Callable[[], None], budget: float, timeout: float = TRIAL_TIMEOUT_S) -> float:
    """Peak growth of resident memory, in bytes, while a forked child calls ``run()``.

    ``inf`` when the child runs out of memory or is killed. Other errors are raised here.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, and leave without running any exit handlers
        message = "error unknown"
        try:
            os.close(read_end)
            start = _prepare_child(budget)
            run()
            message = f"ok {_proc_status()['VmHWM'] - start}"
        except BaseException as error:  # noqa: BLE001 - every outcome must reach the parent
            message = "oom" if _is_out_of_memory(error) else f"error {type(error).__name__}: {error}"
        finally:
            with contextlib.suppress(BaseException):
                os.write(write_end, message.encode()[:60000])
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        chunks = []
        while ready:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    message = b"".join(chunks).decode(errors="replace")
    if not ready:
        raise BatchfitError(f"A memory trial took longer than {timeout:.0f} s and was stopped.")
    if message.startswith("ok "):
        return float(message[3:])
    if message == "oom" or os.WIFSIGNALED(status) or not message:
        return math.inf
    raise BatchfitError(f"A memory trial failed in its child process: {message[6:]}")


def _nbytes(tensors: Iterator[torch.Tensor]) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def accounted_peak(
    model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer | None, batch: Batch
) -> float:
    """An in-process estimate of a step's peak growth in bytes, where fork or ``/proc`` is missing.

    Adds up the batch, the tensors autograd saves for backward (weights excluded), one gradient
    per parameter, new optimizer state and one parameter-sized temporary of the update. Buffers
    freed before the peak are not seen; temporaries inside a kernel are not either.
    """
    resident = _nbytes(model.parameters()) | _nbytes(model.buffers()) | _nbytes(_optimizer_tensors(optimizer))
    inputs = _nbytes(batch.values() if isinstance(batch, dict) else iter(batch))
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident and storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = forward_loss(model, loss_fn, batch)
    loss.backward()
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    state_before = sum(_nbytes(_optimizer_tensors(optimizer)).values())
    if optimizer is not None:
        optimizer.step()
    new_state = sum(_nbytes(_optimizer_tensors(optimizer)).values()) - state_before
    model.zero_grad(set_to_none=True)
    return float(sum(inputs.values()) + sum(saved.values()) + 2 * grads + new_state)


def _cpu_peak(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer | None,
    draw: Callable[[int], Batch],
    budget: float,
    cap: int,
) -> Callable[[int], float]:
    if not can_fork_measure():
        logger.warning("No fork or /proc here: CPU micro-batch memory is estimated, not measured.")

        def estimate(size: int) -> float:
            with preserved(model, optimizer):  # so each trial sees the optimizer state of a first step
                return accounted_peak(model, loss_fn, optimizer, draw(size))

        return estimate

    # One step in this process first, so errors in the user's model surface with their traceback;
    # undone at once, so the children see the optimizer state the caller has.
    with preserved(model, optimizer):
        _train_step(model, loss_fn, optimizer, draw(min(2, cap)))
    gc.collect()

    def peak_of(size: int) -> float:
        # The batch is drawn inside the child, so its memory counts too.
        return measure_in_child(lambda: _train_step(model, loss_fn, optimizer, draw(size)), budget)

    return peak_of


# ----------------------------------------------------------------------------- the API


def _check_budget(memory_budget: Any) -> float | None:
    if memory_budget is None:
        return None
    if (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, (int, float))
        or not math.isfinite(memory_budget)
        or memory_budget <= 0
    ):
        raise expected("memory_budget", "None or a positive number of bytes", memory_budget)
    return float(memory_budget)


def find_micro_batch_size(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    src: Any,
    device: str | torch.device = "auto",
    memory_budget: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    max_size: int | None = None,
    seed: int = 0,
) -> int:
    """The largest micro-batch whose forward pass, backward pass and ``optimizer`` step fit in memory.

    ``memory_budget`` is in bytes. On CUDA it bounds the step's peak of allocated device memory
    (model, gradients and optimizer state included); by default 90 % of what this process can
    get. On the CPU it bounds how far a step raises resident memory above what the process
    holds already; by default half the available host memory. Without ``optimizer`` the
    optimizer's state and update are not counted. The result is at most ``len(src)`` and
    ``max_size``. Every trial is a real step on samples of ``src``; weights, gradients,
    optimizer state and random state are restored afterwards.
    """
    source = as_source(src, "src")
    budget = _check_budget(memory_budget)
    if max_size is not None:
        check_positive_int("max_size", max_size)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise expected("optimizer", "None or a torch.optim.Optimizer", type(optimizer).__name__)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise expected("seed", "an integer", seed)
    cap = len(source) if max_size is None else min(len(source), max_size)
    target = resolve_device(device, model)
    draw = _drawer(source, seed)
    with probe(model, optimizer, target) as (net, opt):
        net.train()
        if target.type == "cuda":
            budget = cuda_budget(target) if budget is None else budget
            peak_of = _cuda_peak(net, loss_fn, opt, draw, target)
        else:
            budget = host_budget() if budget is None else budget
            peak_of = _cpu_peak(net, loss_fn, opt, draw, budget, cap)
        size = search_largest(peak_of, budget, cap)
    logger.info("largest micro-batch that fits: %d (budget %.1f MiB on %s)", size, budget / MiB, target)
    return size
