"""Run configurations in TOML: parsed, checked key by key, and turned into a Trainer and data.

Sections: ``[data]``, ``[model]``, ``[optimizer]``, ``[loss]``, ``[train]`` (and ``[tune]`` for
``batchfit tune``). Unknown keys and values of the wrong type are errors naming the key.
See ``examples/digits.toml``.
"""

from __future__ import annotations

import importlib
import math
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.streams import StreamSource
from .errors import BatchfitError, ConfigError
from .models import BUILTIN
from .train.options import TrainerOptions, option_names, toml_types

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_INT, _FLOAT, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
_LIST, _TABLE = (list,), (dict,)

# key -> (accepted types, default); a type tuple with str accepts the listed words too.
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "data": {
        "train": (_STR + _TABLE, None), "val": (_STR + _TABLE, None), "val_split": (_FLOAT, None),
        "x": (_STR, "x"), "y": (_STR, "y"), "split_seed": (_INT, 0),
        # image shards (bf.images.write_image_shards): the side decoded images are cropped to, and
        # whether training batches are augmented (random-resized crop and flip) or only resized.
        "image_size": (_INT, None), "augment": (_BOOL, True),
    },
    "model": {"name": (_STR, "mlp"), "args": (_TABLE, {})},
    "optimizer": {"name": (_STR, "sgd"), "lr": (_FLOAT, 0.01), "args": (_TABLE, {})},
    # A loss built for the model: name = "package.module:Factory", args = {...} calls Factory(model, **args).
    "loss": {"name": (_STR, "cross_entropy"), "args": (_TABLE, None)},
    # Every Trainer option (derived from TrainerOptions), plus what a run adds around the trainer.
    "train": {**toml_types(), "epochs": (_INT, 1), "resume": (_BOOL, False), "out": (_STR, "runs")},
    "tune": {
        "target_loss": (_FLOAT, None), "batch_sizes": (_LIST, None), "epochs": (_INT, 3), "out": (_STR, "runs"),
    },
    # A torch lr scheduler by its class name in torch.optim.lr_scheduler, with its arguments.
    "schedule": {"name": (_STR, None), "args": (_TABLE, {})},
    # Metrics by name: f1 = "my_metrics:f1" (a function f(output, target), or a class with
    # update/compute/reset, made with no arguments).
    "metrics": {},
    # Built-in callbacks, each a table of its arguments: early_stopping = { patience = 3 }.
    "callbacks": {"early_stopping": (_TABLE, None), "model_checkpoint": (_TABLE, None),
                  "tensorboard": (_TABLE, None), "snapshots": (_TABLE, None)},
    # Training from a Redis stream instead of [data] (each rank is consumer "<consumer>-<rank>" of the group).
    "stream": {"redis": (_STR, "redis://127.0.0.1:6379/0"), "stream": (_STR, None), "group": (_STR, "batchfit"),
               "consumer": (_STR, "trainer"), "fields": (_LIST, None), "start": (_STR, "0"),
               "max_latency": (_FLOAT, None), "idle_timeout": (_FLOAT, None), "claim_idle": (_FLOAT, 30.0),
               "ranges": (_TABLE, None), "dead_letters": (_STR, ""), "retry_for": (_FLOAT, 30.0),
               "max_batch_size": (_INT + _STR, None)},
}
TRAINER_KEYS = option_names()
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop,
}
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": torch.nn.functional.cross_entropy, "mse": torch.nn.functional.mse_loss,
    "l1": torch.nn.functional.l1_loss, "bce_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
}


@dataclass
class Config:
    """A checked configuration: one dict per section, defaults filled in."""

    path: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]


def load_config(path: str | Path) -> Config:
    """Read and check a TOML run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    return check_config(raw, path)


def check_config(raw: dict[str, Any], path: Path) -> Config:
    """Fill defaults and refuse unknown sections, unknown keys and wrong types (naming the key)."""
    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}]; expected one of {sorted(SCHEMA)}")
    config = Config(path)
    for section, keys in SCHEMA.items():
        config.sections[section] = _check_section(path, section, keys, raw.get(section, {}))
    try:
        trainer_options(config)  # every [train] value checked now, not when the run starts
    except ConfigError:
        raise
    except BatchfitError as error:
        raise ConfigError(f"{path}: [train] {error}") from error
    lr = config["optimizer"]["lr"]
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"{path}: `optimizer.lr` must be a finite, non-negative number. Received: optimizer.lr={lr}")
    sizes = config["tune"]["batch_sizes"]
    if sizes is not None and (not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                                   for b in sizes)):
        raise ConfigError(f"{path}: `tune.batch_sizes` must be a list of positive integers. "
                          f"Received: tune.batch_sizes={sizes!r}")
    for section in ("train", "tune"):
        out = config[section]["out"]
        if Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"{path}: `{section}.out` must be a folder for run folders. Received: "
                              f"{section}.out={out!r}, which is a file")
    if config["data"]["train"] is None and config["stream"]["stream"] is None:
        raise ConfigError(f"{path}: `data.train` is required (an .npz file or a table of .npy files), "
                          f"or `stream.stream` (a Redis stream)")
    return config


def _check_section(path: Path, section: str, keys: dict[str, Any], given: Any) -> dict[str, Any]:
    """One section's values, defaults filled in; unknown keys and wrong types refused (naming the key)."""
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: `{section}` must be a table [{section}]. Received: {given!r}")
    if section == "metrics":  # free names, each a "package.module:attribute" string
        for key, value in given.items():
            if not isinstance(value, str):
                raise ConfigError(f"{path}: `metrics.{key}` must be a 'package.module:function' string. "
                                  f"Received: metrics.{key}={value!r}")
        return dict(given)
    for key in given:
        if key not in keys:
            raise ConfigError(f"{path}: unknown key `{section}.{key}`; expected one of {sorted(keys)}")
    values = {}
    for key, (types, default) in keys.items():
        value = given.get(key, default)
        if value is not None and not _has_type(value, types):
            names = " or ".join(sorted({t.__name__ for t in types}))
            raise ConfigError(f"{path}: `{section}.{key}` must be {names}. Received: {section}.{key}={value!r}")
        values[key] = value
    return values


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def resolve_path(config: Config, value: str) -> Path:
    """A path from the config, relative to the config file's folder."""
    path = Path(value)
    return path if path.is_absolute() else config.path.parent / path


def load_arrays(config: Config, which: str) -> Any:
    """The ``(x, y)`` arrays of ``data.train`` or ``data.val`` — or, for a shard folder, its ``ShardSource``."""
    data = config["data"]
    spec = data[which]
    if spec is None:
        return None
    if isinstance(spec, str):
        path = resolve_path(config, spec)
        if path.is_dir():
            from .data.shards import ShardSource
            from .data.sources import Selected

            source = ShardSource(path)
            if isinstance(source.metadata.get("images"), dict):
                return _image_source(config, which, source)
            # Named arrays (what `batchfit shards write` makes of an .npz) train a plain model as (x, y);
            # a text model takes token shards' dict batches (input_ids, labels, lengths) as they are.
            if source.names is None or config["model"]["name"] == "text":
                return source
            return Selected(source, (data["x"], data["y"]))
        if path.suffix != ".npz":
            raise ConfigError(f"`data.{which}` must be an .npz file or a table {{x = ..., y = ...}} of .npy files. "
                              f"Received: {spec!r}")
        arrays = _load(path)
        missing = [k for k in (data["x"], data["y"]) if k not in arrays]
        if missing:
            raise ConfigError(f"`data.{which}`: {path} has no array {missing[0]!r} (has {sorted(arrays)}); "
                              f"set data.x / data.y")
        x, y = arrays[data["x"]], arrays[data["y"]]
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y) or len(x) == 0:
            shapes = f"{data['x']} {x.shape}, {data['y']} {y.shape}"
            raise ConfigError(f"`data.{which}`: {path} must hold x and y with the same number of samples (at least "
                              f"one) in their first dimension. Received: {shapes}")
        return x, y
    unknown = sorted(set(spec) - {"x", "y"})
    if unknown or "x" not in spec or "y" not in spec:
        raise ConfigError(f"`data.{which}` as a table needs exactly the keys x and y (.npy paths). Received: {spec}")
    return _load_npy(config, which, spec["x"]), _load_npy(config, which, spec["y"])


def _image_source(config: Config, which: str, source: Any) -> Any:
    """A shard folder of images, decoded per batch: augmented for training, resized and centre-cropped else."""
    from .data.images import ImageSource, eval_transform, train_transform

    size = config["data"]["image_size"]
    if size is None:
        raise ConfigError(f"`data.image_size` is required: data.{which} is a shard folder of images, decoded and "
                          "cropped to image_size x image_size pixels")
    augment = which == "train" and config["data"]["augment"]
    return ImageSource(source, train_transform(size) if augment else eval_transform(size))


def _load_npy(config: Config, which: str, name: str) -> np.ndarray:
    path = resolve_path(config, name)
    if not path.is_file():
        raise ConfigError(f"`data.{which}`: data file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        why = "it holds Python objects, not numbers" if "allow_pickle" in str(error) else str(error)
        raise ConfigError(f"`data.{which}`: {path} is not a NumPy .npy file of numbers: {why}") from error
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise ConfigError(f"`data.{which}`: {path} must hold numbers. Received: "
                          f"{getattr(array, 'dtype', type(array).__name__)}")
    return array


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        why = "an array holds Python objects, not numbers" if "allow_pickle" in str(error) else \
            f"{type(error).__name__}: {error}"
        raise ConfigError(f"{path} is not an .npz of numeric arrays: {why}") from None
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ConfigError(f"{path}: array {name!r} must hold numbers. Received: dtype {array.dtype}")
    return arrays


def split_val(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Hold out ``fraction`` of the samples (stratified by class when targets are integers)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"`data.val_split` must be a fraction in (0, 1). Received: data.val_split={fraction}")
    rng = np.random.default_rng(seed)
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        val_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(1, round(fraction * (y == c).sum()))]
                                  for c in np.unique(y)])
    else:
        val_idx = rng.permutation(len(y))[: max(1, round(fraction * len(y)))]
    mask = np.zeros(len(y), dtype=bool)
    mask[val_idx] = True
    if mask.all() or not mask.any():
        raise ConfigError(f"`data.val_split` = {fraction} of {len(y)} sample(s) leaves no "
                          f"{'training' if mask.all() else 'validation'} sample (every class keeps at least one for "
                          f"validation): give more data, a smaller val_split, or data.val")
    return x[~mask], y[~mask], x[mask], y[mask]


def import_object(spec: str, what: str, folder: Path | None = None) -> Any:
    """``package.module:attribute`` imported, which runs the module's code.

    The module is looked for on ``sys.path`` and then in ``folder`` (the config file's folder),
    so that a ``model.py`` next to the config is found as ``model:build``.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"`{what}` must be a built-in name or 'package.module:function'. Received: {spec!r}")
    added = folder is not None and str(folder) not in sys.path
    if added:
        sys.path.append(str(folder))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"`{what}`: cannot import {spec!r}: {error}") from error
    except Exception as error:  # the module's own code failed while it was imported
        raise ConfigError(f"`{what}`: importing {module_name!r} raised {type(error).__name__}: {error}") from error
    finally:
        if added:
            sys.path.remove(str(folder))
    try:
        return getattr(module, attribute)
    except AttributeError as error:
        raise ConfigError(f"`{what}`: {module_name!r} has no {attribute!r}") from error


def build_model(config: Config, *train: Any) -> torch.nn.Module:
    """The model of ``[model]``; built-ins get their input and output sizes from the training data
    (``x, y`` arrays, or a shard folder's source)."""
    spec, args = config["model"]["name"], dict(config["model"]["args"])
    if spec == "text":  # a pretrained language model; a classifier's classes from the token shards
        classes = getattr(train[0], "classes", None) if len(train) == 1 else None
        if args.get("task") == "classification" and classes and not {"classes", "num_labels"} & set(args):
            args["classes"] = classes
    else:
        x, outputs = _data_shapes(config, train)
        if spec == "mlp":
            args.setdefault("in_features", int(np.prod(x.shape[1:])))
            args.setdefault("out_features", outputs)
        elif spec == "resnet":
            args.setdefault("in_channels", 1 if x.ndim == 3 else int(x.shape[1]))
            args.setdefault("num_classes", outputs)
        elif spec == "cnn":
            args.setdefault("in_channels", 1 if x.ndim == 3 else int(x.shape[1]))
            args.setdefault("image_size", int(x.shape[-1]))
            args.setdefault("num_classes", outputs)
    builder = BUILTIN.get(spec) or import_object(spec, "model.name", config.path.parent.resolve())
    try:
        model = builder(**args)
    except TypeError as error:
        raise ConfigError(f"`model.args` do not fit {spec!r}: {error}") from error
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"`model.name` {spec!r} must return a torch.nn.Module. Received: {type(model).__name__}")
    return model


def _data_shapes(config: Config, train: tuple[Any, ...]) -> tuple[np.ndarray, int]:
    """One input sample (with a leading batch dimension) and the number of outputs a model needs."""
    if len(train) == 1 and isinstance(train[0], StreamSource):
        if config["model"]["name"] in BUILTIN:
            raise ConfigError("`model.name`: the built-in models are sized from arrays; to train from [stream], "
                              "name a 'package.module:function' and give its sizes in model.args")
        return np.zeros((1, 1), dtype=np.float32), 1  # unused: a model of one's own is sized by model.args
    if len(train) == 2:
        x, y = train
    else:  # a source: a shard folder
        source = train[0]
        first = source.gather(np.zeros(1, dtype=np.int64))
        if isinstance(first, dict):
            x, y = first[config["data"]["x"]].numpy(), first[config["data"]["y"]].numpy()
        else:
            x, y = first[0].numpy(), first[-1].numpy()
        classes = getattr(source, "classes", None)
        if classes:
            return x, len(classes)
        if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:  # every label, a chunk at a time
            top = 0
            for start in range(0, len(source), 65536):
                batch = source.gather(np.arange(start, min(len(source), start + 65536), dtype=np.int64))
                labels = batch[config["data"]["y"]] if isinstance(batch, dict) else batch[-1]
                top = max(top, int(labels.max()))
            return x, top + 1
    classes = int(y.max()) + 1 if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 else None
    return x, classes if classes is not None else int(np.prod(y.shape[1:])) or 1


def build_optimizer(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``[optimizer]``: a built-in name over the model's parameters, or a
    ``package.module:function`` called as ``function(model, lr=lr, **args)`` (an optimizer with parameter
    groups of its own, such as :func:`batchfit.workloads.stream.recipe_optimizer`)."""
    name, lr, args = config["optimizer"]["name"], config["optimizer"]["lr"], config["optimizer"]["args"]
    if name not in OPTIMIZERS and ":" not in name:
        raise ConfigError(f"`optimizer.name` must be one of {sorted(OPTIMIZERS)} or 'package.module:function'. "
                          f"Received: optimizer.name={name!r}")
    try:
        if name in OPTIMIZERS:
            return OPTIMIZERS[name](model.parameters(), lr=lr, **args)
        optimizer = import_object(name, "optimizer.name", config.path.parent.resolve())(model, lr=lr, **args)
    except (TypeError, ValueError) as error:  # torch's own refusals (betas, momentum, ...) are ValueErrors
        raise ConfigError(f"`optimizer.args` do not fit {name!r}: {error}") from error
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"`optimizer.name`: {name!r} must return a torch.optim.Optimizer. "
                          f"Received: {type(optimizer).__name__}")
    return optimizer


def build_loss(config: Config, model: torch.nn.Module | None = None) -> Callable[..., torch.Tensor] | None:
    """The loss function of ``[loss]``; ``None`` for ``"model"``, the model's own ``.loss`` (a
    Hugging Face model's, kept an exact token mean over micro-batches and ranks). With ``args``, the named
    ``package.module:Factory`` builds the loss for ``model``: ``Factory(model, **args)`` (a loss that reads the
    model, such as :class:`batchfit.workloads.stream.SequentialMSE`)."""
    name, args = config["loss"]["name"], config["loss"]["args"]
    if args is None:
        if name == "model":
            return None
        return LOSSES.get(name) or import_object(name, "loss.name", config.path.parent.resolve())
    if ":" not in name:
        raise ConfigError(f"`loss.args` build a loss for the model: `loss.name` must then be 'package.module:Factory', "
                          f"called as Factory(model, **args). Received: loss.name={name!r}")
    if model is None:
        raise ConfigError("`loss.args` build a loss for one model, and `batchfit tune` trains many: leave "
                          "`loss.args` out to tune")
    factory = import_object(name, "loss.name", config.path.parent.resolve())
    try:
        loss = factory(model, **args)
    except TypeError as error:
        raise ConfigError(f"`loss.args` do not fit {name!r}: {error}") from error
    if not callable(loss):
        raise ConfigError(f"`loss.name`: {name!r} with `loss.args` must return a loss function. "
                          f"Received: {type(loss).__name__}")
    return loss


def trainer_options(config: Config) -> TrainerOptions:
    """The Trainer's options from ``[train]``, paths resolved (checked: errors name the option)."""
    train = config["train"]
    options = {key: train[key] for key in TRAINER_KEYS}
    if options["checkpoint_dir"] is not None:
        options["checkpoint_dir"] = str(resolve_path(config, options["checkpoint_dir"]))
    return TrainerOptions(**options)


def build_schedule(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    """The torch lr scheduler of ``[schedule]`` over ``optimizer`` (``None`` without one)."""
    name, args = config["schedule"]["name"], config["schedule"]["args"]
    if name is None:
        return None
    kind = getattr(torch.optim.lr_scheduler, name, None)
    if not (isinstance(kind, type) and issubclass(kind, (torch.optim.lr_scheduler.LRScheduler,
                                                         torch.optim.lr_scheduler.ReduceLROnPlateau))):
        raise ConfigError(f"`schedule.name` must be a scheduler of torch.optim.lr_scheduler (StepLR, "
                          f"CosineAnnealingLR, OneCycleLR, ReduceLROnPlateau, ...). Received: schedule.name={name!r}")
    try:
        return kind(optimizer, **args)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"`schedule.args` do not fit {name!r}: {error}") from error


def build_metrics(config: Config) -> dict[str, Any]:
    """The metrics of ``[metrics]``: each imported; a class is made with no arguments."""
    metrics = {}
    for name, spec in config["metrics"].items():
        value = import_object(spec, f"metrics.{name}", config.path.parent.resolve())
        metrics[name] = value() if isinstance(value, type) else value
    return metrics


def build_callbacks(config: Config) -> list[Any]:
    """The built-in callbacks of ``[callbacks]``, paths relative to the config file."""
    from .train.callbacks import EarlyStopping, ModelCheckpoint, TensorBoardLogger
    from .train.callbacks.snapshots import PublishSnapshots

    kinds: dict[str, Any] = {"early_stopping": EarlyStopping, "model_checkpoint": ModelCheckpoint,
                             "tensorboard": TensorBoardLogger, "snapshots": PublishSnapshots}
    made = []
    for key, kind in kinds.items():
        args = config["callbacks"][key]
        if args is None:
            continue
        args = dict(args)
        for path_key in ("path", "log_dir", "folder"):
            if isinstance(args.get(path_key), str):
                args[path_key] = str(resolve_path(config, args[path_key]))
        try:
            made.append(kind(**args))
        except TypeError as error:
            raise ConfigError(f"`callbacks.{key}` does not fit {kind.__name__}: {error}") from error
        except BatchfitError as error:
            raise ConfigError(f"`callbacks.{key}`: {error}") from error
    return made


def load_train_val(config: Config) -> tuple[Any, Any]:
    """The training and validation data: ``(x, y)`` arrays, or sources of shard folders
    (``data.val``, or ``data.val_split`` of the training arrays held out); with ``[stream]``, the stream."""
    if config["stream"]["stream"] is not None:
        return build_stream(config), load_arrays(config, "val")
    train = load_arrays(config, "train")
    assert train is not None
    val = load_arrays(config, "val")
    if val is None and config["data"]["val_split"] is not None:
        if not isinstance(train, tuple):
            raise ConfigError("`data.val_split` holds out part of arrays; with a shard folder as `data.train`, "
                              "give the validation data as `data.val` (another shard folder or an .npz)")
        x_all, y_all = train
        x_train, y_train, x_val, y_val = split_val(x_all, y_all, config["data"]["val_split"],
                                                   config["data"]["split_seed"])
        train, val = (x_train, y_train), (x_val, y_val)
    return train, val


def build_stream(config: Config) -> Any:
    """The :class:`~batchfit.StreamSource` of ``[stream]``: this rank's consumer (``<consumer>-<RANK>``)."""
    import os

    from .data.redis_streams import RedisStream

    options = config["stream"]
    fields = options["fields"]
    if fields is not None and (not fields or not all(isinstance(f, str) for f in fields)):
        raise ConfigError(f"`stream.fields` must be a list of field names, e.g. ['user', 'item', 'rating']. "
                          f"Received: stream.fields={fields!r}")
    consumer = RedisStream(options["redis"], options["stream"], options["group"],
                           f"{options['consumer']}-{os.environ.get('RANK', '0')}", fields=fields,
                           start=options["start"], claim_idle=options["claim_idle"],
                           idle_timeout=options["idle_timeout"], dead_letters=options["dead_letters"],
                           retry_for=options["retry_for"])
    ranges, cap = options["ranges"], options["max_batch_size"]
    if cap is not None and ((cap != "auto" if isinstance(cap, str) else cap < 1) or options["max_latency"] is None):
        raise ConfigError(f"`stream.max_batch_size` must be a positive integer or \"auto\", with a "
                          f"`stream.max_latency` (the lag it reacts to), e.g. max_latency = 0.05, "
                          f"max_batch_size = 512. Received: "
                          f"stream.max_batch_size={cap!r}, stream.max_latency={options['max_latency']!r}")
    try:
        return StreamSource(consumer, max_latency=options["max_latency"], max_batch_size=cap,
                            ranges=None if ranges is None else {k: tuple(v) for k, v in ranges.items()})
    except (TypeError, BatchfitError) as error:
        raise ConfigError(f"`stream.ranges` must map field names to [low, high], e.g. {{ user = [0, 943] }}. "
                          f"Received: stream.ranges={ranges!r}") from error
