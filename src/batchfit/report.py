"""``tune()``: measure, then recommend batch size, micro-batch size and learning rate.

The measurements, in order: the largest micro-batch that fits memory, throughput against
micro-batch size, a learning-rate range test at a base batch size, the gradient noise scale,
and a short sweep of batch sizes trained from the same initial weights, each with the lr the
scaling rule gives, recording steps, samples and seconds to reach a target loss (the three
regimes of Shallue et al. 2018, "Measuring the Effects of Data Parallelism on Neural Network
Training": perfect scaling, diminishing returns, maximal data parallelism). The recommended
batch size is the one that reached the target in the least measured time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core.batch import LossFn
from .core.device import resolve_device
from .core.figures import new_figure, save_figure
from .core.maths import ema
from .core.precision import PRECISIONS
from .data.sources import as_source, source_lengths
from .errors import check_choice, check_positive_int, expected
from .measure.auto import measure_throughput, powers_of_two
from .measure.lr import scale_lr
from .measure.memory import find_micro_batch_size, find_micro_batch_tokens
from .measure.noise import estimate_noise_scale
from .measure.range_test import lr_range_test
from .train.trainer import Trainer

logger = logging.getLogger("batchfit")
ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


@dataclass
class SweepPoint:
    """One fixed batch size of the sweep: its lr and how long it took to reach the target."""

    batch_size: int
    lr: float
    steps_to_target: int | None
    samples_to_target: int | None
    seconds_to_target: float | None
    final_loss: float
    curve: list[tuple[int, int, float, float]] = field(default_factory=list)  # (step, samples, seconds, loss)


@dataclass
class TuneReport:
    """The recommendation and the evidence behind each part of it."""

    batch_size: int
    micro_batch_size: int | None
    lr: float
    base_batch_size: int
    lr_rule: str
    micro_batch_fit: int
    throughput: dict[int, float]
    noise_scale: float
    grad_sq: float
    trace_cov: float
    range_test_lr: float
    range_test: dict[str, list[float]]
    target_loss: float
    sweep: list[SweepPoint]
    reasons: dict[str, str]
    micro_batch_tokens: int | None = None  # for variable-length data: the token budget that fits memory

    def summary(self) -> str:
        """The recommendation with its evidence, as printed by ``batchfit tune``."""
        lines = [f"recommended batch_size={self.batch_size}  micro_batch_size={self.micro_batch_size}  "
                 f"lr={self.lr:.4g}"]
        lines += [f"  {name}: {reason}" for name, reason in self.reasons.items()]
        lines.append(f"  sweep (to target loss {self.target_loss:.4g}):")
        for point in self.sweep:
            reached = (f"{point.steps_to_target} steps, {point.samples_to_target} samples, "
                       f"{point.seconds_to_target:.2f} s" if point.steps_to_target is not None else "not reached")
            lines.append(f"    batch {point.batch_size:>6}  lr {point.lr:.4g}  {reached}")
        lines += ["", "to use it, put this in the run's config:", self.config_block()]
        return "\n".join(lines)

    def config_block(self) -> str:
        """The recommendation as TOML to paste into a run configuration."""
        lines = ["[optimizer]", f"lr = {self.lr:.6g}", "", "[train]", f"batch_size = {self.batch_size}"]
        if self.micro_batch_tokens is not None:
            lines.append(f"micro_batch_tokens = {self.micro_batch_tokens}")
        elif self.micro_batch_size is not None:
            lines.append(f"micro_batch_size = {self.micro_batch_size}")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> Path:
        """Write ``report.md``, ``report.json`` and PNG plots into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(asdict(self), indent=2, default=_json_default))
        self._plot_sweep(folder / "sweep.png")
        self._plot_range_test(folder / "lr_range.png")
        self._plot_throughput(folder / "throughput.png")
        (folder / "report.md").write_text(self._markdown())
        return folder

    def _markdown(self) -> str:
        rows = "\n".join(
            f"| {p.batch_size} | {p.lr:.4g} | {p.steps_to_target if p.steps_to_target is not None else '—'} | "
            f"{p.samples_to_target if p.samples_to_target is not None else '—'} | "
            f"{'—' if p.seconds_to_target is None else f'{p.seconds_to_target:.2f}'} | {p.final_loss:.4g} |"
            for p in self.sweep)
        reasons = "\n".join(f"- **{name}**: {reason}" for name, reason in self.reasons.items())
        return (f"# batchfit tune report\n\n"
                f"**batch_size = {self.batch_size}, micro_batch_size = {self.micro_batch_size}, "
                f"lr = {self.lr:.4g}**\n\n{reasons}\n\n"
                f"## Sweep (target loss {self.target_loss:.4g})\n\n"
                f"| batch size | lr | steps | samples | seconds | final loss |\n|---|---|---|---|---|---|\n{rows}\n\n"
                f"![steps and samples to target](sweep.png)\n\n![lr range test](lr_range.png)\n\n"
                f"![throughput](throughput.png)\n\n## For the run's config\n\n```toml\n{self.config_block()}\n```\n")

    def _plot_sweep(self, path: Path) -> None:
        fig, axes = new_figure(1, 3, (14, 4))
        reached = [p for p in self.sweep if p.steps_to_target is not None]
        sizes = [p.batch_size for p in reached]
        for ax, values, label in ((axes[0][0], [p.steps_to_target for p in reached], "steps to target"),
                                  (axes[0][1], [p.samples_to_target for p in reached], "samples to target"),
                                  (axes[0][2], [p.seconds_to_target for p in reached], "seconds to target")):
            ax.plot(sizes, values, marker="o")
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=label, title=label)
            ax.axvline(self.batch_size, color="tab:green", ls="--", label=f"recommended {self.batch_size}")
            if math.isfinite(self.noise_scale):
                ax.axvline(self.noise_scale, color="tab:orange", ls=":", label=f"B_simple {self.noise_scale:.0f}")
            ax.legend()
        save_figure(fig, path)

    def _plot_range_test(self, path: Path) -> None:
        fig, axes = new_figure(1, 1, (6, 4))
        ax = axes[0][0]
        ax.plot(self.range_test["lrs"], self.range_test["losses"])
        ax.axvline(self.range_test_lr, color="tab:red", ls="--", label=f"suggested {self.range_test_lr:.3g}")
        ax.set(xscale="log", xlabel=f"learning rate (batch {self.base_batch_size})", ylabel="smoothed loss",
               title="learning-rate range test")
        ax.legend()
        save_figure(fig, path)

    def _plot_throughput(self, path: Path) -> None:
        fig, axes = new_figure(1, 1, (6, 4))
        ax = axes[0][0]
        ax.plot(list(self.throughput), list(self.throughput.values()), marker="o")
        ax.axvline(self.micro_batch_fit, color="tab:red", ls="--", label=f"memory fit {self.micro_batch_fit}")
        ax.set(xscale="log", xlabel="micro-batch size", ylabel="samples/s", title="throughput")
        ax.legend()
        save_figure(fig, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def lr_rule_for(optimizer: torch.optim.Optimizer) -> str:
    """"sqrt" for Adam-type optimizers, "linear" otherwise (Goyal et al. 2017; Malladi et al. 2022)."""
    return "sqrt" if isinstance(optimizer, ADAM_LIKE) else "linear"


def tune(
    make_model: Callable[[], torch.nn.Module],
    loss_fn: LossFn | None,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    src: Any,
    *,
    val: Any = None,
    base_batch_size: int = 32,
    batch_sizes: list[int] | None = None,
    epochs: int = 3,
    target_loss: float | None = None,
    lr_rule: str | None = None,
    device: str | torch.device = "auto",
    memory_budget: float | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> TuneReport:
    """Measure and recommend ``batch_size``, ``micro_batch_size`` and ``lr`` for this model and data.

    ``make_model()`` and ``make_optimizer(model)`` build fresh copies (the sweep trains several
    from the same initial weights). ``epochs`` is each sweep point's budget. The target is
    ``target_loss`` on ``val`` (or the training loss without ``val``); by default the loosest
    best loss among the sweep points, so that every point can be compared. Every measurement
    and the sweep run under ``precision``, as training will.
    """
    for name, value in (("make_model", make_model), ("make_optimizer", make_optimizer)):
        if not callable(value):
            raise expected(name, "a callable that builds a fresh one", value)
    if batch_sizes is not None:
        if not isinstance(batch_sizes, (list, tuple)) or not batch_sizes:
            raise expected("batch_sizes", "a non-empty list of positive integers or None", batch_sizes)
        for size in batch_sizes:
            check_positive_int("batch_sizes", size)
    if target_loss is not None and (isinstance(target_loss, bool) or not isinstance(target_loss, (int, float))):
        raise expected("target_loss", "a number or None", target_loss)
    source = as_source(src, "src")
    check_positive_int("base_batch_size", base_batch_size)
    check_positive_int("epochs", epochs)
    check_choice("precision", precision, PRECISIONS)
    target_device = resolve_device(device)
    torch.manual_seed(seed)
    model = make_model().to(target_device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model)
    rule = lr_rule or lr_rule_for(optimizer)

    fit = find_micro_batch_size(model, loss_fn, source, device=target_device, memory_budget=memory_budget,
                                optimizer=optimizer, seed=seed, precision=precision)
    # Variable-length data: a random draw says little about the longest sequences; the token budget
    # is measured on copies of the longest sample, the worst micro-batch it allows.
    lengths = source_lengths(source)
    longest = 0 if lengths is None else int(lengths.max())
    tokens = None if lengths is None else find_micro_batch_tokens(
        model, loss_fn, source, device=target_device, memory_budget=memory_budget, optimizer=optimizer,
        max_rows=fit, seed=seed, precision=precision)
    throughput = measure_throughput(model, loss_fn, source, powers_of_two(1, min(fit, len(source))), target_device,
                                    seed=seed, precision=precision)
    range_result = lr_range_test(model, loss_fn, optimizer, source, batch_size=min(base_batch_size, len(source)),
                                 seed=seed, device=target_device, precision=precision)
    small = min(32, max(1, len(source) // 16))
    noise = estimate_noise_scale(model, loss_fn, source, small_batch=small, big_batch=8 * small, seed=seed,
                                 device=target_device, precision=precision)
    lr = range_result.suggested_lr  # the range test's own rule: steepest descent, capped below the blow-up
    sizes = batch_sizes or powers_of_two(8, max(8, len(source) // 8))
    sweep = []
    for size in sizes:
        scaled = scale_lr(lr, base_batch_size, size, rule)
        logger.info("tune sweep: batch %d, lr %.4g", size, scaled)
        model.load_state_dict(initial)
        sweep_optimizer = make_optimizer(model)
        for group in sweep_optimizer.param_groups:
            group["lr"] = scaled
        # The target is checked about 8 times an epoch, not only at epoch ends.
        val_every = max(1, -(-len(source) // size) // 8) if val is not None else None
        split = {"micro_batch_tokens": tokens} if tokens is not None else \
            {"micro_batch_size": fit if size > fit else None}
        trainer = Trainer(model, loss_fn, sweep_optimizer, batch_size=size, progress=False, seed=seed,
                          val_every=val_every, device=target_device, precision=precision, **split)
        sweep.append(_sweep_point(trainer, source, val, size, scaled, epochs))
    target = target_loss if target_loss is not None else default_target(sweep)
    for point in sweep:
        _reach(point, target)
    reached = [(seconds, p) for p in sweep if (seconds := p.seconds_to_target) is not None]
    best = min(reached, key=lambda r: r[0])[1] if reached else min(sweep, key=lambda p: p.final_loss)
    model.load_state_dict(initial)
    micro = None if best.batch_size <= fit else fit
    reasons = {
        "micro_batch_size": (f"all {len(source)} samples fit in memory at once" if fit >= len(source) else
                             f"the largest micro-batch that fits memory is {fit}")
                            + ("" if micro else f", so a batch of {best.batch_size} needs no accumulation"),
        **({} if tokens is None else {"micro_batch_tokens": (
            f"{tokens // longest} copies of the longest sample ({longest} tokens) fit in memory: micro-batches "
            f"of at most {tokens} padded tokens, cut after sorting each batch by length")}),
        "lr": f"range test at batch {base_batch_size} suggests {lr:.4g} (steepest descent of the smoothed loss, "
              f"at most a tenth of the lr of the lowest loss); "
              f"scaled by the {rule} rule to batch {best.batch_size}: {best.lr:.4g}",
        "batch_size": f"reached the target loss {target:.4g} in the least time "
                      f"({best.seconds_to_target or math.nan:.2f} s, {best.steps_to_target} steps) among "
                      f"{[p.batch_size for p in sweep]}; gradient noise scale B_simple = {noise.b_simple:.4g}",
    }
    return TuneReport(best.batch_size, micro, best.lr, base_batch_size, rule, fit, throughput, noise.b_simple,
                      noise.grad_sq, noise.trace_cov, lr, {"lrs": list(range_result.lrs),
                                                            "losses": list(range_result.losses)},
                      target, sweep, reasons, tokens)


def _sweep_point(trainer: Trainer, source: Any, val: Any, size: int, lr: float, epochs: int) -> SweepPoint:
    """Train one batch size for ``epochs`` epochs, recording (step, samples, seconds, loss)."""
    history = trainer.fit(source, epochs=epochs, val=val)
    if val is not None:
        points = {v["step"]: (v["step"], v["samples"], v["seconds"], v["val_loss"]) for v in history.validations}
        points.update({e["steps"]: (e["steps"], e["samples"], e["seconds"], e["val_loss"]) for e in history.epochs})
        curve = [points[step] for step in sorted(points)]
    else:
        curve = list(zip(history.column("step"), history.column("samples"), history.column("seconds"),
                         ema(history.losses())))
    final = curve[-1][3] if curve else math.nan
    return SweepPoint(size, lr, None, None, None, final, curve)


def default_target(sweep: list[SweepPoint]) -> float:
    """The loosest best loss among the sweep points that learned (best loss below their first)."""
    learned = [min(c[3] for c in p.curve) for p in sweep if p.curve and min(c[3] for c in p.curve) < p.curve[0][3]]
    if not learned:
        return min((p.final_loss for p in sweep), default=math.nan)
    return max(learned)


def _reach(point: SweepPoint, target: float) -> None:
    for step, samples, seconds, loss in point.curve:
        if loss <= target:
            point.steps_to_target, point.samples_to_target, point.seconds_to_target = step, samples, seconds
            return
