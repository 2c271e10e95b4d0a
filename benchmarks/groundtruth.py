"""The batch-size ground truth: a batch × lr grid per task against ``tune()``, ``"auto"`` and ``"adaptive"``.

    python benchmarks/groundtruth.py [--tasks mlp,cnn,transformer,mf,linear | --quick] [--out DIR] [--reuse]

Per task, a plain PyTorch loop (``groundtruth_loop.py``) trains every (batch size, lr) of the
grid from the same initial weights until the validation loss reaches the target, on ``--seeds``
data orders (steps: their mean; a point reaches the target only if every order does). Time to
target = steps × the median seconds per step of that batch size, measured interleaved in the
same process, so load on the machine cancels out. From the grid: the best point, the best lr
per batch size, and S_min, E_min, B_crit of McCandlish et al. (2018) fitted to the steps at
each size's best lr (S = S_min + E_min / B, B_crit = E_min / S_min). Then batchfit's answers,
each trained by the same plain loop and timed the same way: ``tune()`` from the task's
everyday lr at batch 32, ``batch_size="auto"`` given the grid's best lr at batch 32, and
``batch_size="adaptive"`` from there. Writes ``groundtruth.json``, ``groundtruth.md`` and per
task a heat map and a steps-against-batch plot into ``--out`` (``--reuse`` keeps the grids
already there and reruns only batchfit's side; ``--retime`` with it measures the step times
again: steps to target do not depend on the machine, so grids run on a busy machine can be
timed on a quiet one).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT):  # run as a script from a checkout: its library and benchmarks first
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import batchfit as bf  # noqa: E402
from batchfit.train.callbacks import Callback  # noqa: E402
from benchmarks.groundtruth_loop import initial_state, next_check, plain_run, step_seconds  # noqa: E402
from benchmarks.groundtruth_tasks import TASKS, Task  # noqa: E402

BASE_BATCH = 32
WARMUP_STEPS = 25  # choose_batch_size's default warm-up
USER_LR = {"Adam": 1e-3, "AdamW": 1e-3, "SGD m=0.9": 0.01, "SGD": 0.01}  # what a user writes without tuning
RULE = {"Adam": "sqrt", "AdamW": "sqrt", "SGD m=0.9": "linear", "SGD": "linear"}


def repeated_run(task: Task, init: dict[str, torch.Tensor], size: int, lr: float, seeds: int) -> dict[str, Any]:
    """The plain loop on ``seeds`` data orders: the mean steps to target, or ``None`` if any order missed it."""
    runs = [plain_run(task, init, size, lr, seed=seed) for seed in range(seeds)]
    reached = all(run["steps"] is not None for run in runs)
    return {"steps": statistics.mean(run["steps"] for run in runs) if reached else None,
            "per_order": [run["steps"] for run in runs], "steps_run": sum(run["steps_run"] for run in runs),
            "diverged": any(run["diverged"] for run in runs)}


def run_grid(task: Task, init: dict[str, torch.Tensor], times: dict[int, float], seeds: int) -> dict[str, Any]:
    """Every (batch size, lr) of the grid: steps to target, time to target, and what the grid cost."""
    points, cost, step_cost = [], 0.0, 0.0
    for size in task.batch_sizes:
        for lr in task.lrs:
            begin = time.perf_counter()
            run = repeated_run(task, init, size, lr, seeds)
            cost += time.perf_counter() - begin
            step_cost += run["steps_run"] * times[size]
            seconds = None if run["steps"] is None else run["steps"] * times[size]
            points.append({"batch_size": size, "lr": lr, **run, "seconds": seconds})
            print(f"  grid {task.name}: batch {size}, lr {lr:.4g}: {run['per_order']} steps", flush=True)
    return {"points": points, "wall_seconds": cost, "step_seconds": step_cost, "seeds": seeds}


def fit_critical_batch(best_steps: dict[int, int]) -> dict[str, float]:
    """S_min and E_min of ``S = S_min + E_min / B`` by least squares in relative error, and B_crit = E_min / S_min."""
    sizes = np.array(sorted(best_steps), dtype=float)
    steps = np.array([best_steps[int(b)] for b in sizes], dtype=float)
    design = np.stack([np.ones_like(sizes), 1 / sizes], 1) / steps[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(steps), rcond=None)
    b_crit = e_min / s_min if s_min > 0 else math.inf
    return {"s_min": float(s_min), "e_min": float(e_min), "b_crit": float(b_crit)}


def time_of(task: Task, init: dict[str, torch.Tensor], grid: dict[str, Any], times: dict[int, float],
            size: int, lr: float) -> tuple[float | None, float | None]:
    """Steps and time to target of (size, lr) by the plain loop, on the grid's data orders (its own run if a point)."""
    for point in grid["points"]:
        if point["batch_size"] == size and math.isclose(point["lr"], lr, rel_tol=1e-6):
            return point["steps"], point["seconds"]
    if size not in times:
        add_step_time(task, times, size)
    steps = repeated_run(task, init, size, lr, grid.get("seeds", 1))["steps"]
    return steps, None if steps is None else steps * times[size]


def add_step_time(task: Task, times: dict[int, float], size: int) -> None:
    """The step time of a batch size the grid has none for, timed interleaved with the nearest that it has.

    The grid's times may come from another moment (a quiet machine, ``--retime``); the new size's
    is its measured ratio to the nearest grid size, times that size's time in the grid.
    """
    near = min(times, key=lambda known: abs(math.log2(known / size)))
    both = step_seconds(task, [near, size])
    times[size] = times[near] * both[size] / both[near]


def make_model(task: Task, init: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = task.make_model()
    model.load_state_dict(init)
    return model


def noise_scales(task: Task, init: dict[str, torch.Tensor], lr: float, steps: int | None) -> dict[str, float]:
    """B_simple at the initial weights, after "auto"'s warm-up and half-way along the run at batch 32 (best lr)."""
    model = make_model(task, init)
    out = {"b_simple_init": bf.estimate_noise_scale(model, task.loss_fn, task.train, small_batch=16, big_batch=256,
                                                    num_batches=20, device="cpu").b_simple}
    if task.exact_noise_scale is not None:
        out["b_noise_exact_init"] = task.exact_noise_scale(model)
    if steps:
        optimizer = task.make_optimizer(model, lr)
        x, y = task.train
        generator = torch.Generator().manual_seed(0)
        for step in range(int(steps) // 2):
            if step == WARMUP_STEPS:  # where "auto" measures
                out["b_simple_warm"] = bf.estimate_noise_scale(model, task.loss_fn, task.train, small_batch=16,
                                                               big_batch=256, num_batches=20, device="cpu").b_simple
            index = torch.randint(len(y), (BASE_BATCH,), generator=generator)
            task.loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out["b_simple_mid"] = bf.estimate_noise_scale(model, task.loss_fn, task.train, small_batch=16,
                                                      big_batch=256, num_batches=20, device="cpu").b_simple
        if task.exact_noise_scale is not None:
            out["b_noise_exact_mid"] = task.exact_noise_scale(model)
    return out


class _FirstStep(Callback):
    """Records the batch size and lr ``"auto"`` chose, and stops."""

    def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self.batch_size, self.lr = record["batch_size"], record["lr"]
        trainer.stop_training = True


class _Sizes(Callback):
    """Per step of an adaptive run: its batch size; stops at the target (checked as the plain loop does)."""

    def __init__(self, task: Task) -> None:
        self.task, self.sizes, self.check, self.steps = task, [], 1, None

    def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self.sizes.append(record["batch_size"])
        step = record["step"]
        if step == self.check:
            self.check = next_check(step)
            if trainer.evaluate(self.task.val)["loss"] <= self.task.target:
                self.steps = step
                trainer.stop_training = True


def batchfit_side(task: Task, init: dict[str, torch.Tensor], grid: dict[str, Any],
                  times: dict[int, float]) -> dict[str, Any]:
    """tune(), "auto" and "adaptive" on the task, their picks timed by the plain loop."""
    out: dict[str, Any] = {}
    user_lr = USER_LR[task.optimizer]
    begin = time.perf_counter()
    report = bf.tune(lambda: make_model(task, init), task.loss_fn, lambda m: task.make_optimizer(m, user_lr),
                     task.train, val=task.val, target_loss=task.target, base_batch_size=BASE_BATCH,
                     batch_sizes=task.batch_sizes, device="cpu", drop_last=True, progress=False)
    tune_seconds = time.perf_counter() - begin
    steps, seconds = time_of(task, init, grid, times, report.batch_size, report.lr)
    for size in {r.batch_size for r in report.sweep} - set(times):
        add_step_time(task, times, size)
    out["tune"] = {"batch_size": report.batch_size, "lr": report.lr, "steps": steps, "seconds": seconds,
                   "wall_seconds": tune_seconds, "runs": len(report.sweep), "b_simple_probe": report.noise_scale,
                   "step_seconds": sum(r.steps_run * times[r.batch_size] for r in report.sweep),
                   "trials": [(r.batch_size, r.lr, r.steps, r.steps_run, r.stopped, r.reorder) for r in report.sweep]}
    at_base = [p for p in grid["points"] if p["batch_size"] == BASE_BATCH and p["seconds"] is not None]
    base_lr = min(at_base, key=lambda p: p["seconds"])["lr"]
    rule = RULE[task.optimizer]
    for mode in ("auto", "adaptive"):
        model = make_model(task, init)
        watch = _FirstStep() if mode == "auto" else _Sizes(task)
        trainer = bf.Trainer(model, task.loss_fn, task.make_optimizer(model, base_lr), batch_size=mode,
                             lr_scaling=rule, base_batch_size=BASE_BATCH, progress=False, device="cpu",
                             callbacks=[watch])
        begin = time.perf_counter()
        trainer.fit(task.train, epochs=max(1, task.budget_samples // len(task.train[1])))
        wall = time.perf_counter() - begin
        probe = sum(e.get("probe_seconds", 0.0) for e in trainer.history.events)
        if mode == "auto":
            steps, seconds = time_of(task, init, grid, times, watch.batch_size, watch.lr)
            out["auto"] = {"batch_size": watch.batch_size, "lr": watch.lr, "base_lr": base_lr, "rule": rule,
                           "steps": steps, "seconds": seconds, "probe_seconds": probe}
        else:
            for size in set(watch.sizes) - set(times):
                add_step_time(task, times, size)
            seconds = None if watch.steps is None else sum(times[s] for s in watch.sizes[: watch.steps])
            changes = [e["batch_size"] for e in trainer.history.events if e["kind"] == "batch_size"]
            out["adaptive"] = {"sizes": changes, "steps": watch.steps, "seconds": seconds,
                               "probe_seconds": probe, "wall_seconds": wall, "base_lr": base_lr, "rule": rule}
    return out


def study(task: Task, out: Path, reuse: bool, retime: bool = False, seeds: int = 2) -> dict[str, Any]:
    cached = out / f"grid-{task.name.split()[0].lower()}.json"
    init = initial_state(task)
    if reuse and cached.exists():
        saved = json.loads(cached.read_text())
        times, grid = {int(k): v for k, v in saved["step_seconds"].items()}, saved["grid"]
        if retime:  # steps to target do not depend on the machine; step times do: measure them again here
            times = step_seconds(task, task.batch_sizes)
            for point in grid["points"]:
                point["seconds"] = None if point["steps"] is None else point["steps"] * times[point["batch_size"]]
            grid["step_seconds"] = sum(p["steps_run"] * times[p["batch_size"]] for p in grid["points"])
            cached.write_text(json.dumps({"step_seconds": times, "grid": grid}, indent=1))
    else:
        times = step_seconds(task, task.batch_sizes)
        grid = run_grid(task, init, times, seeds)
        cached.write_text(json.dumps({"step_seconds": times, "grid": grid}, indent=1))
    points = grid["points"]
    grid.setdefault("step_seconds", sum(p["steps_run"] * times[p["batch_size"]] for p in points))
    reached = [p for p in points if p["seconds"] is not None]
    best = min(reached, key=lambda p: p["seconds"])
    best_per_size = {}
    for size in task.batch_sizes:
        at = [p for p in reached if p["batch_size"] == size]
        if at:
            best_per_size[size] = min(at, key=lambda p: p["seconds"])
    fitted = fit_critical_batch({s: p["steps"] for s, p in best_per_size.items()})
    at_base = best_per_size.get(BASE_BATCH)
    noise = noise_scales(task, init, at_base["lr"] if at_base else task.lrs[0], at_base["steps"] if at_base else None)
    side = batchfit_side(task, init, grid, times)
    result = {"task": task.name, "data": task.data, "optimizer": task.optimizer, "target": task.target,
              "step_seconds": times, "best": best, "best_lr_per_batch": {s: p["lr"] for s, p in best_per_size.items()},
              "best_steps_per_batch": {s: p["steps"] for s, p in best_per_size.items()},
              "fit": fitted, "noise": noise, "grid_wall_seconds": grid["wall_seconds"], **side}
    for mode in ("tune", "auto", "adaptive"):
        seconds = result[mode]["seconds"]
        result[mode]["ratio"] = None if seconds is None else seconds / best["seconds"]
    # What tune cost against the grid: its runs' steps × step time over the grid's (the same
    # measure as time to target), and its whole wall time (probes, checks) over the grid's.
    result["tune"]["cost_share"] = result["tune"]["step_seconds"] / grid["step_seconds"]
    result["tune"]["wall_share"] = result["tune"]["wall_seconds"] / grid["wall_seconds"]
    plot(task, result, points, out)
    return result


def plot(task: Task, result: dict[str, Any], points: list[dict[str, Any]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8))
    FigureCanvasAgg(fig)
    heat, curve = fig.subplots(1, 2)
    sizes, lrs = task.batch_sizes, task.lrs
    table = np.full((len(lrs), len(sizes)), np.nan)
    for p in points:
        if p["seconds"] is not None:
            table[lrs.index(p["lr"]), sizes.index(p["batch_size"])] = p["seconds"] / result["best"]["seconds"]
    image = heat.imshow(table, origin="lower", cmap="viridis_r", norm=LogNorm(vmin=1, vmax=max(2, np.nanmax(table))),
                        aspect="auto")
    fig.colorbar(image, ax=heat, label="time to target / best")
    heat.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    heat.set_yticks(range(len(lrs)), [f"{lr:.3g}" for lr in lrs])
    heat.set(xlabel="batch size", ylabel="learning rate", title=f"{task.name}: time to loss {task.target:.3g}")
    for mode, marker, color in (("tune", "o", "red"), ("auto", "s", "white")):
        pick = result[mode]
        x = math.log2(pick["batch_size"] / sizes[0])
        y = math.log2(pick["lr"] / lrs[0])
        heat.scatter([x], [y], marker=marker, s=260, facecolors="none", edgecolors=color, linewidths=2,
                     label=f"{mode}: {pick['batch_size']}, {pick['lr']:.3g}")
    heat.legend(fontsize="small", loc="upper left")
    steps = result["best_steps_per_batch"]
    b = np.array(sorted(steps), dtype=float)
    curve.plot(b, [steps[int(s)] for s in b], "o", label="steps at each size's best lr")
    grid_b = np.geomspace(b[0], b[-1], 50)
    fitted = result["fit"]
    curve.plot(grid_b, fitted["s_min"] + fitted["e_min"] / grid_b, "-",
               label=f"S_min (1 + B_crit/B), B_crit = {fitted['b_crit']:.0f}")
    curve.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps to target", title="steps against batch")
    curve.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / f"groundtruth-{task.name.split()[0].lower()}.png", dpi=90)


def markdown(results: list[dict[str, Any]]) -> str:
    def pick(r: dict[str, Any], mode: str) -> str:
        p = r[mode]
        ratio = "not reached" if p["ratio"] is None else f"{p['ratio']:.2f}×"
        return f"{p['batch_size']}, {p['lr']:.3g} → {ratio}"

    lines = ["| task | grid best (B, lr, time) | tune (B, lr → ratio) | tune cost / grid (wall) | "
             "auto (B, lr → ratio) | adaptive → ratio | B_crit (fit) | B_simple init / 25 steps / mid | "
             "ratio to B_crit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        best, noise = r["best"], r["noise"]
        adaptive = r["adaptive"]
        sizes = "→".join(str(s) for s in adaptive["sizes"])
        adaptive_text = f"{sizes} → " + ("not reached" if adaptive["ratio"] is None else f"{adaptive['ratio']:.2f}×")
        b_crit = r["fit"]["b_crit"]
        mid, warm = noise.get("b_simple_mid", math.nan), noise.get("b_simple_warm", math.nan)
        lines.append(
            f"| {r['task']} | {best['batch_size']}, {best['lr']:.3g}, {best['seconds']:.3g} s "
            f"({best['steps']:.0f} st.) | "
            f"{pick(r, 'tune')} | {100 * r['tune']['cost_share']:.0f} % ({100 * r['tune']['wall_share']:.0f} %, "
            f"{r['tune']['runs']} runs) | "
            f"{pick(r, 'auto')} | {adaptive_text} | {b_crit:.0f} | {noise['b_simple_init']:.0f} / {warm:.0f} / "
            f"{mid:.0f} | {noise['b_simple_init'] / b_crit:.2f} / {warm / b_crit:.2f} / {mid / b_crit:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="the two fastest tasks only (mlp, linear)")
    parser.add_argument("--out", default="runs/groundtruth", help="where the tables, plots and cached grids go")
    parser.add_argument("--reuse", action="store_true", help="keep the grids already in --out")
    parser.add_argument("--seeds", type=int, default=2, help="data orders per grid point (steps: their mean)")
    parser.add_argument("--retime", action="store_true",
                        help="with --reuse: measure the step times again (on a quiet machine) and recompute the times")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    names = args.tasks.split(",") if args.tasks else ["mlp", "linear"] if args.quick else list(TASKS)
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    for name in names:
        print(f"{name}:", flush=True)
        results.append(study(TASKS[name](), out, args.reuse, args.retime, args.seeds))
        (out / "groundtruth.json").write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (out / "groundtruth.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
