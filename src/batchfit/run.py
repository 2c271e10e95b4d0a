"""Runs described by a configuration: build the pieces, train, write the run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .config import (
    Config,
    build_callbacks,
    build_loss,
    build_metrics,
    build_model,
    build_optimizer,
    build_schedule,
    load_train_val,
    trainer_options,
)
from .core.durable import atomic_write
from .errors import ConfigError, mask_secrets
from .report import tune
from .train.callbacks import CSVLogger
from .train.history import History
from .train.saving import load_model
from .train.trainer import Trainer


def new_run_dir(out: str | Path) -> Path:
    """A fresh ``out/<timestamp>`` folder."""
    run_dir = Path(out) / time.strftime("%Y%m%d-%H%M%S")
    while run_dir.exists():  # two runs in the same second
        run_dir = run_dir.with_name(run_dir.name + "_")
    run_dir.mkdir(parents=True)
    return run_dir


def write_run_files(run_dir: Path, history: History, summary: dict[str, Any], config_path: Path | None = None) -> None:
    """metrics.csv, epochs.csv, curves.png, summary.json (and a copy of the config, passwords masked) in ``run_dir``."""
    history.to_csv(run_dir / "metrics.csv", run_dir / "epochs.csv")
    if len(history):
        history.plot(run_dir / "curves.png")
    if config_path is not None:  # a copy without the passwords of its URLs (a [stream] redis = "redis://:pw@...")
        text = mask_secrets(config_path.read_text())

        def write(handle: IO[Any]) -> None:
            handle.write(text)

        atomic_write(run_dir / config_path.name, write, text=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def build_run(config: Config) -> tuple[Trainer, tuple[Any, ...], tuple[Any, ...] | None]:
    """The trainer, training data and validation data of a configuration."""
    train, val = load_train_val(config)
    torch.manual_seed(config["train"]["seed"])
    model = build_model(config, *(train if isinstance(train, tuple) else (train,)))
    optimizer = build_optimizer(config, model)
    trainer = Trainer(model, build_loss(config), optimizer, options=trainer_options(config),
                      lr_schedule=build_schedule(config, optimizer), callbacks=build_callbacks(config),
                      metrics=build_metrics(config))
    return trainer, train, val


def run_config(config: Config) -> dict[str, Any] | None:
    """Train as configured; rank 0 writes the run folder and returns the summary."""
    trainer, train, val = build_run(config)
    try:
        return _train_and_write(trainer, train, val, config)
    finally:
        # Every rank leaves the process group here, together and while everything is alive, not
        # at interpreter exit: a rank whose gloo threads are torn down during finalisation can
        # abort, and torchrun then kills the others mid-write.
        trainer.dist.close()


def _train_and_write(trainer: Trainer, train: Any, val: Any, config: Config) -> dict[str, Any] | None:
    # The run folder exists from the start: metrics.csv and epochs.csv grow while the run goes.
    run_dir = new_run_dir(config["train"]["out"]) if trainer.dist.is_main else None
    if run_dir is not None:
        trainer.callbacks.append(CSVLogger(run_dir))
    start = time.perf_counter()
    history = trainer.fit(train, epochs=config["train"]["epochs"], val=val, resume=config["train"]["resume"])
    if run_dir is None:
        return None
    summary: dict[str, Any] = {"steps": trainer.step, "samples": trainer.samples_seen,
                               "seconds": round(time.perf_counter() - start, 3),
                               "world_size": trainer.dist.world_size}
    if history.epochs:
        summary.update({k: v for k, v in history.epochs[-1].items() if k not in ("steps", "samples", "seconds")})
    trainer.save(run_dir / "model.pt")
    write_run_files(run_dir, history, summary, config.path)
    summary["run_dir"] = str(run_dir)
    summary["model"] = str(run_dir / "model.pt")
    return summary


def evaluate_config(config: Config, model_path: str | Path) -> dict[str, float]:
    """``batchfit evaluate``: the saved model on the config's validation data (else its training data)."""
    trainer, train, val = build_run(config)
    load_model(model_path, trainer.module)
    return trainer.evaluate(val if val is not None else train)


def predict_config(config: Config, model_path: str | Path, data_path: str | Path, out: str | Path) -> Path:
    """``batchfit predict``: outputs of the saved model for the inputs in ``data_path`` (.npy, or the x of an .npz)."""
    trainer, _, _ = build_run(config)
    load_model(model_path, trainer.module)
    path = Path(data_path)
    if not path.is_file():
        raise ConfigError(f"`--data`: file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            key = config["data"]["x"]
            if key not in archive.files:
                raise ConfigError(f"`--data`: {path} has no array {key!r} (has {sorted(archive.files)})")
            inputs = archive[key]
    else:
        inputs = np.load(path, allow_pickle=False)
    outputs = trainer.predict(inputs).numpy()
    out = Path(out)
    atomic_write(out, lambda handle: np.save(handle, outputs))
    return out


def tune_config(config: Config) -> str:
    """``batchfit tune CONFIG``: tune the configured model and data, save the report, return its summary."""
    train, val = load_train_val(config)
    seed = config["train"]["seed"]

    def make_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(config, *(train if isinstance(train, tuple) else (train,)))

    options = config["tune"]
    base = config["train"]["base_batch_size"] or config["train"]["batch_size"]
    report = tune(make_model, build_loss(config), lambda model: build_optimizer(config, model), train, val=val,
                  base_batch_size=base if isinstance(base, int) else 32, epochs=options["epochs"],
                  target_loss=options["target_loss"], device=config["train"]["device"], seed=seed,
                  batch_sizes=options["batch_sizes"], precision=config["train"]["precision"])
    folder = report.save(new_run_dir(options["out"]))
    return report.summary() + f"\nwrote {folder}/report.md, report.json, sweep.png, lr_range.png, throughput.png"
