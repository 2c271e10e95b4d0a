"""The ``batchfit`` command: a thin layer over the library.

    batchfit demo                 train a small CNN on scikit-learn's handwritten digits
    batchfit train CONFIG.toml    a run described by a TOML file (--nproc N for N processes)
    batchfit evaluate CONFIG.toml --model run/model.pt      a saved model on the validation data
    batchfit predict CONFIG.toml --model run/model.pt --data x.npy --out y.npy
    batchfit tune CONFIG.toml     measure and recommend batch size, micro-batch size and lr
    batchfit shards write IN OUT  .npy/.npz/.csv/image folder into a shard folder
    batchfit shards verify PATH   check every checksum of a shard folder
    batchfit bench                batchfit's data path and training step against plain PyTorch, on this machine
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from .errors import BatchfitError, InputError, mask_secrets


def not_shown(record: logging.LogRecord) -> bool:
    """Whether a log record still needs printing: not one the trainer already wrote under its progress bar.

    A record printed has the passwords of the URLs in it masked."""
    if getattr(record, "shown", False):
        return False
    record.msg, record.args = mask_secrets(record.getMessage()), None
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``batchfit`` script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="batchfit: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(not_shown)
    if args.command in ("demo", "train", "tune", "evaluate", "predict", "bench"):
        import torch

        torch.set_num_threads(args.threads if args.threads else default_threads())
    try:
        return int(args.run(args) or 0)
    except BatchfitError as error:
        print(f"batchfit: error: {mask_secrets(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that cannot be read or written (missing, no permission, a full disk)
        print(f"batchfit: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("batchfit: interrupted", file=sys.stderr)
        return 130


THREADS_HELP = "CPU threads (default: OMP_NUM_THREADS, else half the cores)"


def default_threads() -> int:
    """CPU threads for one training process: ``OMP_NUM_THREADS`` when set, else half the cores (at least 1).

    torch's default (every core) oversubscribes a machine that also gathers batches or runs
    other work.
    """
    text = os.environ.get("OMP_NUM_THREADS", "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    return max(1, (os.cpu_count() or 2) // 2)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _nnodes(text: str) -> tuple[int, int]:
    """``--nnodes``: ``N`` or ``MIN:MAX`` machines (agents), as (min, max)."""
    parts = text.split(":")
    try:
        if len(parts) > 2:
            raise ValueError
        low, high = int(parts[0]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be N or MIN:MAX (positive integers), got {text!r}") from None
    if low < 1 or high < low:
        raise argparse.ArgumentTypeError(f"must be N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _endpoint(text: str) -> str:
    """``--rdzv-endpoint``: ``HOST:PORT`` (an IPv6 address in brackets)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port from 1 to 65535, got {text!r}")
    return text


def _rdzv_conf(text: str) -> str:
    """``--rdzv-conf``: ``KEY=VALUE[,KEY=VALUE...]``, handed to the c10d rendezvous as given."""
    if not all(key.strip() and sep for key, sep, _ in (item.partition("=") for item in text.split(","))):
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return text


def _rdzv_id(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be a non-empty name without spaces, got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchfit", description="Mini-batch training that measures batch size "
                                     "and learning rate instead of guessing them.")
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("batchfit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"batchfit {installed}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a small CNN on real handwritten digits (scikit-learn)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--out", default="runs", help="folder for the run's files (default: runs)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument("--threads", type=_positive, help=THREADS_HELP)
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="a run described by a TOML file")
    train.add_argument("config", help="the TOML file (see examples/)")
    train.add_argument("--nproc", type=_positive, default=1, help="local processes (torch.distributed, gloo/nccl)")
    train.add_argument("--max-restarts", type=_non_negative, default=0,
                       help="restart every process up to this many times when one fails (torchrun's elastic agent); "
                            "each restart resumes from the newest checkpoint of train.checkpoint_dir")
    nodes = train.add_argument_group(
        "several machines (torchrun's c10d rendezvous; run the same command on each machine, see docs/distributed.md)")
    nodes.add_argument("--nnodes", type=_nnodes, metavar="N|MIN:MAX",
                       help="machines taking part (default 1); with MIN:MAX and --max-restarts the machines left after "
                            "one fails (at least MIN) go on, resuming from the newest checkpoint")
    nodes.add_argument("--rdzv-endpoint", type=_endpoint, metavar="HOST:PORT",
                       help="where the machines meet: an address of one of them (its agent holds the "
                            "rendezvous); required with more than one machine")
    nodes.add_argument("--rdzv-id", type=_rdzv_id, default="batchfit",
                       help="the run's name, the same on every machine (default: batchfit)")
    nodes.add_argument("--rdzv-conf", type=_rdzv_conf, metavar="KEY=VALUE,...",
                       help="settings of the c10d rendezvous, e.g. last_call_timeout=10,join_timeout=300")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--out", help="override train.out")
    train.add_argument("--threads", type=_positive, help=THREADS_HELP)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="a saved model on the config's validation data")
    evaluate.add_argument("config", help="the TOML file the model was trained with")
    evaluate.add_argument("--model", required=True, help="model.pt written by batchfit train (or a checkpoint)")
    evaluate.add_argument("--threads", type=_positive, help=THREADS_HELP)
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="outputs of a saved model for new inputs")
    predict.add_argument("config", help="the TOML file the model was trained with")
    predict.add_argument("--model", required=True, help="model.pt written by batchfit train (or a checkpoint)")
    predict.add_argument("--data", required=True, help="inputs: an .npy file, or an .npz with the config's x array")
    predict.add_argument("--out", default="predictions.npy",
                         help="where to write the outputs (.npy; with --classes also .csv); never an input file")
    predict.add_argument("--classes", action="store_true",
                         help="write each sample's predicted class (its name where the training data has class "
                              "names) instead of the raw outputs; a .csv --out adds the probability")
    predict.add_argument("--threads", type=_positive, help=THREADS_HELP)
    predict.set_defaults(run=_predict)

    tune = commands.add_parser("tune", help="measure and recommend batch size, micro-batch size and lr")
    tune.add_argument("config", help="the TOML file (see examples/)")
    tune.add_argument("--out", help="override tune.out")
    tune.add_argument("--threads", type=_positive, help=THREADS_HELP)
    tune.set_defaults(run=_tune)

    shards = commands.add_parser("shards", help="write or verify a shard folder")
    shard_commands = shards.add_subparsers(dest="shard_command", required=True, metavar="ACTION")
    write = shard_commands.add_parser("write", help=".npy/.npz/.csv/image folder -> shard folder")
    write.add_argument("input")
    write.add_argument("output")
    write.add_argument("--target", help="target column of a .csv / target array of an .npz")
    write.add_argument("--image-size", type=int, help="decode images and resize them to this square size")
    write.add_argument("--decode", action="store_true",
                       help="store images decoded (uint8 pixels of one size) instead of their encoded bytes")
    write.add_argument("--max-side", type=_positive, help="re-encode images whose longer side exceeds this")
    write.add_argument("--on-corrupt", choices=("error", "skip"), default="error",
                       help="an image that cannot be decoded: refuse the folder (default) or skip it with a warning")
    write.add_argument("--mode", choices=("RGB", "L"),
                       help="colour mode of every image (default: L when every image is grayscale, else RGB)")
    write.add_argument("--follow-symlinks", action="store_true",
                       help="read images that are symbolic links out of the folder (refused by default)")
    write.add_argument("--workers", type=int, help="processes decoding images (default: CPU count, at most 8)")
    write.add_argument("--shard-size", type=int, help="samples per shard file")
    write.add_argument("--overwrite", action="store_true", help="replace an existing shard folder at OUT")
    text = write.add_argument_group("text (.txt, .csv, .tsv, .jsonl tokenised once; see docs/text.md)")
    text.add_argument("--tokenizer", help="the model's tokenizer: smollm2, minilm, a local folder or .gguf file, "
                      "or a hub name in the local cache (never downloaded)")
    text.add_argument("--text-column", default="text", help="the column of texts (default: text)")
    text.add_argument("--label-column", help="a column of class labels: classification")
    text.add_argument("--prompt-column", help="with --response-column: causal LM of the response only")
    text.add_argument("--response-column", help="with --prompt-column: causal LM of the response only")
    text.add_argument("--max-length", type=_positive, help="cut longer token sequences to this many tokens")
    text.add_argument("--classes-from", help="a text shard folder whose class names (and order) to use "
                      "(write a validation set with the training set's classes)")
    write.set_defaults(run=_shards_write)
    verify = shard_commands.add_parser("verify", help="check every shard's checksum")
    verify.add_argument("path")
    verify.set_defaults(run=_shards_verify)

    bench = commands.add_parser(
        "bench", help="batchfit's data path and training step against plain PyTorch, on this machine",
        epilog="The other benchmarks (shards, several processes, batch size, text, images, streams) need a "
               "checkout of the repository: python benchmarks/run.py --help")
    bench.add_argument("--quick", action="store_true", help="smaller workloads and fewer repeats (a rough check)")
    bench.add_argument("--only", choices=("data", "train"),
                       help="data: batches from memory against DataLoader and a hand-written gather; "
                            "train: Trainer.fit against a hand-written loop")
    bench.add_argument("--threads", type=_positive, help=THREADS_HELP)
    bench.set_defaults(run=_bench)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    summary = run_demo(batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, out=args.out,
                       progress=not args.no_progress)
    print(format_summary(summary))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.nproc > 1 or args.max_restarts or args.nnodes is not None or args.rdzv_endpoint is not None:
        return _launch(args)
    from .config import load_config
    from .run import run_config

    config = load_config(args.config)
    if args.epochs is not None:
        config["train"]["epochs"] = args.epochs
    if args.out is not None:
        config["train"]["out"] = args.out
    summary = run_config(config)
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import evaluate_config

    print(json.dumps(evaluate_config(load_config(args.config), args.model), indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import predict_config

    out = predict_config(load_config(args.config), args.model, args.data, args.out, classes=args.classes)
    print(f"wrote {out}")
    return 0


def launch_command(args: argparse.Namespace) -> list[str]:
    """The torch.distributed.run (torchrun) command that ``batchfit train`` runs for ``--nproc``/``--nnodes``.

    One machine without ``--rdzv-endpoint``: torchrun's ``--standalone`` (a rendezvous on a free
    local port). Otherwise the c10d rendezvous at ``--rdzv-endpoint``, which every machine's
    command names alike (with the same ``--rdzv-id``); torchrun's elastic agent on each machine
    starts ``--nproc`` workers, and with ``--nnodes MIN:MAX`` restarts the group on the machines
    left (at least MIN) when one fails, ``--max-restarts`` times at most.
    """
    low, high = args.nnodes if args.nnodes is not None else (1, 1)
    if args.rdzv_endpoint is None:
        if high > 1:
            nnodes = str(low) if low == high else f"{low}:{high}"
            raise InputError(f"`--nnodes {nnodes}` needs `--rdzv-endpoint HOST:PORT`: the address where the "
                             f"machines meet (the same on every machine)")
        if args.rdzv_conf is not None:
            raise InputError("`--rdzv-conf` needs `--rdzv-endpoint HOST:PORT`: on one machine without an endpoint "
                             "the rendezvous is torchrun's --standalone one")
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={low}:{high}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                      f"--rdzv-id={args.rdzv_id}"]
        if args.rdzv_conf is not None:
            rendezvous.append(f"--rdzv-conf={args.rdzv_conf}")
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={args.nproc}",
            f"--max-restarts={args.max_restarts}", "-m", "batchfit", "train", args.config]


def _launch(args: argparse.Namespace) -> int:
    """Start ``nproc`` local processes through torch.distributed.run (torchrun), alone or with other machines."""
    command = launch_command(args)
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    if args.out is not None:
        command += ["--out", args.out]
    return subprocess.call(command, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


def _tune(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import tune_config

    config = load_config(args.config)
    if args.out is not None:
        config["tune"]["out"] = args.out
    print(tune_config(config))
    return 0


def _shards_write(args: argparse.Namespace) -> int:
    from .data.convert import convert

    start = time.perf_counter()
    text_options = [f"--{name.replace('_', '-')}" for name in ("label_column", "prompt_column", "response_column",
                                                                "classes_from", "max_length")
                    if getattr(args, name) is not None] + (["--text-column"] if args.text_column != "text" else [])
    if args.tokenizer is None and text_options:
        raise InputError(f"`--tokenizer` is required with {text_options[0]}: texts are stored as the model's "
                            f"token ids (give smollm2, minilm, a local folder or .gguf file)")
    if args.tokenizer is not None or args.input.lower().endswith((".txt", ".jsonl")):
        return _text_shards_write(args, start)
    images = {}
    if os.path.isdir(args.input):  # an image folder: encoded bytes unless decoded pixels are asked for
        images = dict(encoded=not (args.decode or args.image_size), max_side=args.max_side,
                      on_corrupt=args.on_corrupt, workers=args.workers, progress=True, mode=args.mode,
                      follow_symlinks=args.follow_symlinks)
    try:
        source = convert(args.input, args.output, target=args.target, image_size=args.image_size,
                         shard_size=args.shard_size, overwrite=args.overwrite, **images)
    except ImportError as error:  # Pillow, for image folders
        raise InputError(f"{error} (pip install 'batchfit[images]')") from error
    print(f"wrote {len(source)} samples to {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


def _text_shards_write(args: argparse.Namespace, start: float) -> int:
    from .data.shards import ShardSource
    from .data.text import write_text_shards

    if args.tokenizer is None:
        raise InputError(f"`--tokenizer` is required to write text ({args.input}) as token shards: the model's "
                            "tokenizer (smollm2, minilm, a local folder or .gguf file)")
    if args.target is not None:
        raise InputError("`--target` is for numbers; for text give --label-column (or --prompt-column and "
                            "--response-column)")
    classes = None
    if args.classes_from is not None:
        classes = ShardSource(args.classes_from).classes
        if classes is None:
            raise InputError(f"`--classes-from` must be a shard folder with class names. Received: "
                                f"{args.classes_from}, which has none")
    source = write_text_shards(args.input, args.output, args.tokenizer, text_column=args.text_column,
                               label_column=args.label_column, prompt_column=args.prompt_column,
                               response_column=args.response_column, max_length=args.max_length, classes=classes,
                               shard_size=args.shard_size, overwrite=args.overwrite, progress=True)
    counts = source.metadata.get("counts", {})
    print(f"wrote {len(source)} samples ({counts.get('tokens', 0):,} tokens, {counts.get('truncated', 0)} cut to "
          f"--max-length) to {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from .data.convert import verify_path

    print(verify_path(args.path))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    print(run_bench(quick=args.quick, only=args.only))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
