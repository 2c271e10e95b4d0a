"""Runs described by a configuration: build the pieces, train, write the run folder."""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
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
from .data.sources import as_source
from .data.text import TEXT_SUFFIXES
from .errors import ConfigError, mask_secrets
from .report import tune
from .train.callbacks import CSVLogger
from .train.first_batch import check_first_batch
from .train.history import History
from .train.saving import load_model
from .train.trainer import Trainer

logger = logging.getLogger("batchfit")


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
    trainer = Trainer(model, build_loss(config, model), optimizer, options=trainer_options(config),
                      lr_schedule=build_schedule(config, optimizer), callbacks=build_callbacks(config),
                      metrics=build_metrics(config))
    return trainer, train, val


def run_config(config: Config) -> dict[str, Any] | None:
    """Train as configured; rank 0 writes the run folder and returns the summary.

    Under torchrun's elastic agent (``batchfit train --max-restarts K``), a restarted group
    resumes from the newest checkpoint of ``train.checkpoint_dir``; without one it would start
    over, so a restart refuses instead.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart:
        if config["train"]["checkpoint_dir"] is None:
            raise ConfigError(f"{config.path}: restarted after a failure (restart {restart}) but "
                              f"`train.checkpoint_dir` is not set, so the run would start over; set it "
                              f"(with `train.checkpoint_every`) to resume after a failure")
        config["train"]["resume"] = True
        logger.warning("restart %d after a failure: resuming from the newest checkpoint in %s", restart,
                       config["train"]["checkpoint_dir"])
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
        if trainer.sharded:
            trainer.save(None)  # the sharded weights are gathered by every rank, written by rank 0
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


def predict_config(config: Config, model_path: str | Path, data_path: str | Path, out: str | Path,
                   classes: bool = False) -> Path:
    """``batchfit predict``: outputs of the saved model for the inputs in ``data_path`` (.npy, or the x of an .npz).

    ``out`` is an .npy file of the outputs, or with ``classes`` of each sample's predicted class
    (its name where the training data names classes) — an .npy of names, or a .csv of
    ``class,probability`` lines. Nothing is written over an input (``--data``, ``--model``, the
    config), and nothing at all when the inputs are refused.
    """
    path, out = Path(data_path), Path(out)
    if not path.is_file():
        raise ConfigError(f"`--data`: file not found: {path}")
    _refuse_overwriting_inputs(out, {"--data": path, "--model": Path(model_path), "config": config.path})
    suffixes = (".npy", ".csv") if classes else (".npy",)
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"`--out` must be a {' or '.join(suffixes)} file. Received: --out {out}")
    if out.is_dir():
        raise ConfigError(f"`--out` must be a file to write. Received: --out {out}, which is a folder")
    text_model = config["model"]["name"] == "text"
    inputs: Any
    if text_model and path.suffix.lower() in TEXT_SUFFIXES:  # texts, tokenised as the training shards were
        inputs = _tokenised(load_train_val(config)[0], path)
    else:
        inputs = _read_inputs(config, path)
        if text_model and (inputs.dtype.kind not in "iu" or inputs.ndim != 2):
            raise ConfigError(f"`--data`: a text model takes texts (a .txt, .csv or .jsonl file) or token ids (an "
                              f"integer array of shape (samples, tokens)). Received: {path}, an array of shape "
                              f"{inputs.shape} and dtype {inputs.dtype}")
    trainer, train, _ = build_run(config)
    load_model(model_path, trainer.module)
    outputs = trainer.predict(inputs).numpy()
    write: Any
    if classes:
        names = getattr(train, "classes", None) if not isinstance(train, tuple) else None
        if outputs.ndim != 2 or outputs.shape[1] < 2:
            raise ConfigError(f"`--classes` needs a classifier's outputs (one score per class); this model outputs "
                              f"shape {outputs.shape[1:]} a sample")
        scores = torch.softmax(torch.from_numpy(outputs).float(), dim=1)
        probability, index = scores.max(dim=1)
        labels = [str(names[i]) if names and i < len(names) else str(i) for i in index.tolist()]
        if out.suffix.lower() == ".csv":
            lines = "class,probability\n" + "".join(f"{_csv_field(n)},{p:.6g}\n"
                                                    for n, p in zip(labels, probability.tolist()))

            def write(handle: Any) -> None:
                handle.write(lines)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, write, text=True)
            return out
        array = np.asarray(labels) if names else index.numpy()

        def write(handle: Any) -> None:
            np.save(handle, array)
    else:
        def write(handle: Any) -> None:
            np.save(handle, outputs)
    out.parent.mkdir(parents=True, exist_ok=True)  # a new folder for the predictions is made
    atomic_write(out, write)
    return out


def _tokenised(train: Any, path: Path) -> dict[str, np.ndarray]:
    """The texts of ``path`` (its ``text`` column, or its lines) as padded token ids and their lengths, by the
    tokenizer (and ``max_length``) the training shards were written with."""
    from .data.text import default_max_length, load_tokenizer, read_records

    metadata = getattr(train, "metadata", None) or {}
    name = metadata.get("tokenizer")
    if not name:
        raise ConfigError(f"`--data`: {path} holds texts, but the training data records no tokenizer to read them "
                          f"with; give token ids (an .npy of integers) instead")
    tokenizer = load_tokenizer(name)
    texts = [str(record.get("text") or "") for _, record in read_records(path, ["text"])]
    if not texts:
        raise ConfigError(f"`--data`: {path} holds no text")
    limit = metadata.get("max_length") or default_max_length(tokenizer)
    encoded = tokenizer(texts, truncation=limit is not None, max_length=limit)["input_ids"]
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    ids = np.full((len(encoded), max(1, int(lengths.max()))), int(metadata.get("pad_token_id") or 0), np.int64)
    for row, sequence in enumerate(encoded):
        ids[row, : len(sequence)] = sequence
    return {"input_ids": ids, "input_ids_lengths": lengths}


def _csv_field(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def _refuse_overwriting_inputs(out: Path, inputs: dict[str, Path]) -> None:
    """``--out`` must not be one of the command's input files (it would be replaced by the outputs)."""
    for name, path in inputs.items():
        same = out.resolve() == path.resolve()
        if not same and out.exists() and path.exists():
            same = out.samefile(path)
        if same:
            raise ConfigError(f"`--out` {out} is the {name} file: predictions never overwrite an input. "
                              f"Give another --out (e.g. predictions.npy)")


def _read_inputs(config: Config, path: Path) -> np.ndarray:
    """The inputs of ``batchfit predict --data``: an .npy array, or an .npz's x array; numbers only."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                key = config["data"]["x"]
                if key not in archive.files:
                    raise ConfigError(f"`--data`: {path} has no array {key!r} (has {sorted(archive.files)})")
                inputs = archive[key]
        else:
            inputs = np.load(path, allow_pickle=False)
    except ConfigError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        why = "it holds Python objects (an object array), not numbers" if "allow_pickle" in str(error) else \
            f"{type(error).__name__}: {error}"
        raise ConfigError(f"`--data`: {path} is not a NumPy array of numbers: {why}") from None
    if not isinstance(inputs, np.ndarray) or inputs.dtype.kind not in "biuf" or inputs.ndim == 0:
        what = f"dtype {inputs.dtype}" if isinstance(inputs, np.ndarray) else type(inputs).__name__
        raise ConfigError(f"`--data`: {path} must hold an array of numbers with a sample dimension. Received: "
                          f"{what}" + (", 0-d" if isinstance(inputs, np.ndarray) and inputs.ndim == 0 else ""))
    return inputs


def tune_config(config: Config) -> str:
    """``batchfit tune CONFIG``: tune the configured model and data, save the report, return its summary."""
    train, val = load_train_val(config)
    seed = config["train"]["seed"]

    def make_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(config, *(train if isinstance(train, tuple) else (train,)))

    options = config["tune"]
    base = config["train"]["base_batch_size"] or config["train"]["batch_size"]
    # The loss checked against the data as training checks it (targets (N,) for outputs (N, 1) reshaped, not broadcast).
    loss = build_loss(config)
    if isinstance(train, tuple) or hasattr(train, "gather"):
        loss, _ = check_first_batch(make_model(), loss, as_source(train, "train"), None, torch.device("cpu"),
                                    logger.info)
    report = tune(make_model, loss, lambda model: build_optimizer(config, model), train, val=val,
                  base_batch_size=base if isinstance(base, int) else 32, epochs=options["epochs"],
                  target_loss=options["target_loss"], device=config["train"]["device"], seed=seed,
                  batch_sizes=options["batch_sizes"], precision=config["train"]["precision"])
    folder = report.save(new_run_dir(options["out"]))
    return report.summary() + f"\nwrote {folder}/report.md, report.json, sweep.png, lr_range.png, throughput.png"
