"""The largest micro-batch whose forward pass, backward pass and optimizer step fit in memory.

Both devices share one search (:func:`search_largest`) over a function ``size -> peak bytes``
of one real training step, and the peak the search accepts stays 10 % under the budget.

* CUDA: the peak is ``torch.cuda.max_memory_allocated``; an out-of-memory error counts as an
  infinite peak, so the search grows by doubling and then closes in (bisecting after an error).
* CPU: running out of host memory does not raise, the kernel kills the process, so a trial
  must never be too big. The peak is what PyTorch's CPU allocator reports to the profiler (the
  batch, activations, gradients, optimizer state and temporaries, exactly and the same on every
  run, unlike resident memory, which depends on how fragmented the heap already is). Such a
  peak is linear in the size, ``peak ≈ a + b·size``, and trials only go to sizes the line
  through the largest sizes measured so far predicts to fit. Where the profiler is unavailable
  the peak is estimated from the tensors autograd saves for backward, gradients and state.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..core.batch import Batch, LossFn, param_dtype, tensors_of, to_device
from ..core.device import resolve_device
from ..core.precision import PRECISIONS
from ..core.step import Step
from ..data.batcher import Batcher
from ..data.sources import Source, as_source, source_lengths
from ..errors import InputError, check_choice, check_positive_int, check_seed, expected
from .state import probe

logger = logging.getLogger(__name__)

CPU_BUDGET_FRACTION = 0.5  # of the available host memory: the rest absorbs heap fragmentation
MARGIN = 0.10  # accepted peaks stay this far under the budget
MiB = 2**20


# ----------------------------------------------------------------------------- the search


def next_trial_size(points: dict[int, float], limit: float, cap: int, margin: float = 1.25) -> int:
    """The next size to measure, given ``points`` (size -> peak bytes) measured so far.

    A step's peak is close to a line ``a + b·size`` with ``a ≥ 0``, so ``peak(best)·size/best``
    bounds it from above for sizes beyond the largest fitting one, ``best``: growth up to where
    that bound meets ``limit`` is safe, however far. Beyond it, the search grows at most twofold
    and no further than the line through the two largest fitting sizes (its slope times
    ``margin``) predicts to fit; a single point blocked by the bound asks for a smaller size to
    get a slope. Between the largest fitting and the smallest failing size it interpolates the
    line through them, or bisects when the failure was an out-of-memory error (infinite peak).
    Returns ``best`` when nothing is left worth measuring (a step of less than ~3 %).
    """
    fitting = sorted(s for s, p in points.items() if p <= limit)
    if not fitting:
        smallest = min(points)
        return max(1, min(smallest - 1, int(smallest * limit / points[smallest])))
    best = fitting[-1]
    failing = sorted(s for s, p in points.items() if p > limit and s > best)
    high = min(cap, failing[0] - 1) if failing else cap
    if failing:
        worst = failing[0]
        slope = (points[worst] - points[best]) / (worst - best)  # inf when `worst` ran out of memory
        aim = best + (limit - points[best]) / slope if math.isfinite(slope) else (best + worst) / 2
    else:
        proportional = best * limit / max(points[best], 1.0)
        if len(fitting) == 1:
            if int(proportional) <= best and best > 1 and best // 2 not in points:
                return best // 2
            fitted = proportional
        else:
            slope = (points[best] - points[fitting[-2]]) / (best - fitting[-2]) * margin
            fitted = 2 * best if slope <= 0 else min(2 * best, best + (limit - points[best]) / slope)
        aim = max(proportional, fitted)
    size = min(high, int(aim))
    return size if size > best and size - best >= max(1, best // 32) else best


def search_largest(peak_of: Callable[[int], float], limit: float, cap: int, start: int = 2) -> int:
    """The largest size up to ``cap`` whose measured ``peak_of(size)`` is at most ``limit`` bytes.

    Every size returned was measured; 0 when not even size 1 fits.
    """
    points: dict[int, float] = {}
    size = min(start, cap)
    while size not in points:
        points[size] = peak_of(size)
        logger.info("micro-batch %d: peak %.2f MiB, limit %.2f MiB", size, points[size] / MiB, limit / MiB)
        if size == 1 and points[size] > limit:
            return 0
        size = next_trial_size(points, limit, cap)
    return size


# ----------------------------------------------------------------------------- one step


def _train_step(step: Step, batch: Batch) -> None:
    # Gradients are allocated afresh each step, as zero_grad(set_to_none=True) makes a trainer do.
    step.model.zero_grad(set_to_none=True)
    step.run(batch)
    step.model.zero_grad(set_to_none=True)


def _drawer(source: Source, seed: int, device: torch.device, dtype: torch.dtype | None) -> Callable[[int], Batch]:
    def draw(size: int) -> Batch:
        return to_device(next(iter(Batcher(source, batch_size=size, shuffle=True, seed=seed))), device, dtype)

    return draw


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Bytes of each distinct storage of ``tensors`` (of a sharded DTensor, this rank's local shard)."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}


def _state_tensors(optimizer: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    for state in [] if optimizer is None else optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    return sum(_storage_bytes(_state_tensors(optimizer)).values())


# ----------------------------------------------------------------------------- CUDA


def cuda_budget(device: torch.device) -> int:
    """Bytes this process can get on ``device``: what is free plus what torch's cache already holds."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_cuda(device: torch.device) -> None:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def _cuda_peak(step: Step, draw: Callable[[int], Batch], device: torch.device) -> Callable[[int], float]:
    def peak_of(size: int) -> float:
        _free_cuda(device)
        out_of_memory = False
        try:
            batch = draw(size)
            torch.cuda.reset_peak_memory_stats(device)
            _train_step(step, batch)
            del batch
            torch.cuda.synchronize(device)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is expected here
            if not _is_out_of_memory(error):
                raise
            out_of_memory = True  # leave the except block first, so its traceback frees the tensors
        step.model.zero_grad(set_to_none=True)
        peak = math.inf if out_of_memory else float(torch.cuda.max_memory_allocated(device))
        _free_cuda(device)
        return peak

    return peak_of


# ----------------------------------------------------------------------------- CPU


def available_host_memory() -> int:
    """Bytes of host memory available now: ``MemAvailable``, capped by a cgroup limit; else sysconf."""
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
        raise InputError("Cannot tell how much host memory is available; pass `memory_budget` in bytes.")
    return max(0, min(candidates))


def host_budget() -> int:
    """The default CPU budget: half the host memory available now."""
    return int(CPU_BUDGET_FRACTION * available_host_memory())


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 briefly: some profiler builds print a line at every start and stop."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiled_peak(run: Callable[[], None]) -> float:
    """Peak bytes PyTorch's CPU allocator held while ``run()`` ran, above what it held at the start.

    Replays the allocation and free events the profiler records (``profile_memory=True``) in
    time order. Raises ``RuntimeError`` when the profiler cannot run (e.g. one is running already).
    """
    from torch.profiler import DeviceType, ProfilerActivity, profile

    running = getattr(torch._C._autograd, "_profiler_enabled", lambda: False)
    if running():
        raise RuntimeError("another profiler is running")  # starting ours would end the caller's session
    recording = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        recording.start()
    try:
        run()
    finally:
        with _quiet_stderr():
            recording.stop()
    results = getattr(recording.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("the profiler recorded no allocation events")
    events = [e for e in results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()  # negative for a free
        peak = max(peak, total)
    return float(peak)


def accounted_peak(step: Step, batch: Batch) -> float:
    """A rough estimate of a step's peak bytes, for where the profiler is unavailable.

    The batch, plus the tensors autograd saves for backward (weights excluded), plus twice the
    largest of them (the gradient flowing in and out of one layer during backward), plus one
    gradient per parameter. Optimizer state and kernel temporaries are not seen.
    """
    model = step.model
    resident = _storage_bytes(model.parameters()) | _storage_bytes(model.buffers())
    inputs = _storage_bytes(tensors_of(batch))
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in resident and pointer not in inputs:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step.accumulate(batch, len(tensors_of(batch)[0]))
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    largest = max(saved.values(), default=0)
    return float(sum(inputs.values()) + sum(saved.values()) + 2 * largest + grads)


def _cpu_peak(step: Step, draw: Callable[[int], Batch], cap: int) -> Callable[[int], float]:
    # A first, small step: errors in the user's model surface here, and it creates the optimizer
    # state a fresh optimizer would, which every later step holds too.
    state_before = _state_bytes(step.optimizer)
    _train_step(step, draw(min(2, cap)))
    new_state = _state_bytes(step.optimizer) - state_before
    try:
        profiled_peak(lambda: None)
    except RuntimeError as error:
        warnings.warn(f"PyTorch's profiler is unavailable ({error}); micro-batch memory is estimated.", stacklevel=5)

        def estimate(size: int) -> float:
            return accounted_peak(step, draw(size)) + new_state

        return estimate

    def measure(size: int) -> float:
        return profiled_peak(lambda: _train_step(step, draw(size))) + new_state

    return measure


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


@contextlib.contextmanager
def _step_peaks(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    src: Any,
    device: str | torch.device,
    memory_budget: Any,
    optimizer: torch.optim.Optimizer | None,
    max_size: int | None,
    seed: int,
    precision: str,
    ranks: Ranks | None = None,
) -> Iterator[tuple[Callable[[int], float], float, int, torch.device]]:
    """``(size -> peak bytes, budget, largest size allowed, device)`` inside a probe of the model.

    With ``ranks`` (a distributed run) every rank measures, and each peak is the largest over the
    ranks and the budget the smallest: every rank sees the same numbers, so the search takes the
    same steps on every rank (a sharded model's trial steps are collectives) and ends on the same size.
    """
    source = as_source(src, "src")
    budget = _check_budget(memory_budget)
    if max_size is not None:
        check_positive_int("max_size", max_size)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise expected("optimizer", "None or a torch.optim.Optimizer", type(optimizer).__name__)
    check_seed(seed, negative=True)  # any integer seeds a torch.Generator
    check_choice("precision", precision, PRECISIONS)
    cap = len(source) if max_size is None else min(len(source), max_size)
    target = resolve_device(device, model)
    if target.type not in ("cpu", "cuda"):
        raise expected("device", '"cpu" or a CUDA device (memory is measured there only)', device)
    with probe(model, optimizer, target) as (net, opt):
        net.train()
        step = Step(net, loss_fn, opt, device=target, precision=precision)
        draw = _drawer(source, seed, target, param_dtype(net))
        if target.type == "cuda":
            budget = cuda_budget(target) if budget is None else budget
            peak_of = _cuda_peak(step, draw, target)
        else:
            budget = host_budget() if budget is None else budget
            peak_of = _cpu_peak(step, draw, cap)
        if ranks is not None and ranks.enabled:
            yield _largest_over(ranks, peak_of), ranks.reduce_min(budget), cap, target
        else:
            yield peak_of, budget, cap, target


class Ranks(Protocol):
    """What a distributed measurement needs of :class:`~batchfit.distributed.DistContext`."""

    @property
    def enabled(self) -> bool: ...

    def reduce_min(self, value: float) -> float: ...

    def reduce_max(self, value: float) -> float: ...


def _largest_over(ranks: Ranks, peak_of: Callable[[int], float]) -> Callable[[int], float]:
    def agreed(size: int) -> float:
        return ranks.reduce_max(peak_of(size))

    return agreed


def find_micro_batch_size(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    src: Any,
    device: str | torch.device = "auto",
    memory_budget: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    max_size: int | None = None,
    seed: int = 0,
    precision: str = "fp32",
    ranks: Ranks | None = None,
) -> int:
    """The largest micro-batch whose forward pass, backward pass and ``optimizer`` step fit in memory.

    ``memory_budget`` is in bytes, and the measured peak of a step stays 10 % under it. On CUDA
    it bounds the peak of allocated device memory (model, gradients and optimizer state
    included); by default all this process can get. On the CPU it bounds the peak of what a
    step allocates beyond what the process holds already (batch, activations, gradients,
    temporaries and the optimizer state a first step creates); by default half the available
    host memory, leaving the other half for what the allocator keeps but does not use. Without
    ``optimizer`` the optimizer's state and update are not counted. The result is at most
    ``len(src)`` and ``max_size``. Every trial is a real step on samples of ``src``; weights,
    gradients, optimizer state and random state are restored afterwards. Each trial is the
    training step itself under ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``), with the
    batch cast to the model's dtype, so the memory measured is the memory training will use.

    ``ranks`` (a :class:`~batchfit.distributed.DistContext`; every rank calls this at once): each
    rank measures its own steps, and the ranks agree on the largest peak of each trial and the
    smallest budget, so every rank returns the same size, the one that fits on every rank. A
    sharded (FSDP) ``model`` measures its sharded step, weights gathered block by block included.
    """
    with _step_peaks(model, loss_fn, src, device, memory_budget, optimizer, max_size, seed, precision, ranks) as (
        peak_of,
        budget,
        cap,
        target,
    ):
        size = search_largest(peak_of, (1 - MARGIN) * budget, cap)
    if size == 0:
        raise InputError(
            f"Even a micro-batch of 1 sample does not fit in memory_budget={budget:.0f} bytes "
            f"({budget / MiB:.1f} MiB, keeping {MARGIN:.0%} free) on {target}. Free memory or use a smaller model."
        )
    logger.info("largest micro-batch that fits: %d (budget %.1f MiB on %s)", size, budget / MiB, target)
    return size


def find_micro_batch_tokens(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    src: Any,
    device: str | torch.device = "auto",
    memory_budget: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    precision: str = "fp32",
    ranks: Ranks | None = None,
) -> int:
    """The largest token budget for ``micro_batch_tokens``: padded tokens a micro-batch may hold and fit in memory.

    A micro-batch of ``n`` rows padded to length ``L`` costs memory in proportion to ``n * L``
    (and its attention to ``n * L**2``), so the worst micro-batch under a budget is made of the
    longest sequences. The trials are therefore real steps (as :func:`find_micro_batch_size`
    runs them, under the same budget rules) on ``n`` copies of the source's longest sample, for
    the largest ``n`` up to ``max_rows`` that fits; the budget is ``n`` times that length.
    ``src`` must have variable-length arrays (``NAME_lengths``). ``ranks``: as :func:`find_micro_batch_size`.
    """
    source = as_source(src, "src")
    lengths = source_lengths(source)
    if lengths is None:
        raise expected("src", "a source with variable-length arrays (NAME_lengths) for micro_batch_tokens='auto'",
                       repr(source))
    longest = int(np.argmax(lengths))
    rows = max_rows if max_rows is not None else len(source)
    copies = _Repeated(source, longest, check_positive_int("max_rows", rows))
    fits = find_micro_batch_size(model, loss_fn, copies, device, memory_budget, optimizer, rows, seed, precision,
                                 ranks)
    tokens = fits * int(lengths[longest])
    logger.info("largest token budget that fits: %d (%d rows of the longest sample, %d tokens)",
                tokens, fits, int(lengths[longest]))
    return tokens


class _Repeated:
    """``count`` copies of sample ``index`` of ``src``: the worst micro-batches a token budget allows."""

    def __init__(self, src: Source, index: int, count: int) -> None:
        self.src, self.index, self.count = src, index, count
        self.names = getattr(src, "names", None)

    def __len__(self) -> int:
        return self.count

    def gather(self, indices: np.ndarray, pin_memory: bool = False) -> Batch:
        return self.src.gather(np.full(len(indices), self.index, dtype=np.int64), pin_memory)


def measure_step_peak(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    src: Any,
    size: int,
    device: str | torch.device = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> float:
    """Peak bytes of one training step on ``size`` samples, measured as :func:`find_micro_batch_size` does.

    ``inf`` when a CUDA step runs out of memory. Model, optimizer and random state are restored.
    """
    check_positive_int("size", size)
    with _step_peaks(model, loss_fn, src, device, None, optimizer, size, seed, precision) as (peak_of, _, cap, _):
        if size > cap:
            raise expected("size", f"at most the number of samples ({cap})", size)
        return peak_of(size)
