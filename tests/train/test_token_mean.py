"""The batch loss of a language model is the mean over every target token of the whole batch.

A tiny randomly initialised Llama (a ``transformers`` config: no files, no download) trains on
variable-length sequences whose labels hold ignored (-100) prompt tokens and are padded with an
ordinary token id (the shards' pad value), as ragged shards deliver them. One batch of 32 through a
plain PyTorch loop is the reference; batchfit splits it into micro-batches of 8, into token-budget
micro-batches (sorted, trimmed), and over 2 gloo ranks, and must land on the same weights — where
the mean of micro-batch means (Hugging Face Trainer's gradient-accumulation bug of 2024) lands
elsewhere, which is asserted too.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import traceback
from typing import Any

import numpy as np
import pytest
import torch

from batchfit import ArraySource, Trainer
from batchfit.core.batch import micro_batches, token_count

# The text extra (pip install -e ".[text]"; .ci/run installs it): without it these tests skip.
transformers = pytest.importorskip("transformers")

BATCH, SAMPLES, LR = 32, 64, 0.5
RANK_TIMEOUT = 120.0


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def token_data(num: int = SAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences of 2–24 tokens; the first 0–5 labels of each are an ignored prompt, and some
    samples are all prompt (no target at all). Padding is token 3 in both arrays, not -100."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 25, num)
    ids = np.full((num, 24), 3, dtype=np.int64)
    labels = np.full((num, 24), 3, dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(4, 61, length)
        labels[row, :length] = ids[row, :length]
        prompt = length if row % 11 == 5 else rng.integers(0, 6)
        labels[row, :prompt] = -100
    return {"input_ids": ids, "input_ids_lengths": lengths, "labels": labels, "labels_lengths": lengths}


def reference_batch(data: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """What a hand-written loop feeds the model: a mask from the lengths, padding labelled -100."""
    ids = torch.from_numpy(data["input_ids"][lo:hi])
    lengths = torch.from_numpy(data["input_ids_lengths"][lo:hi])
    inside = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    labels = torch.from_numpy(data["labels"][lo:hi]).masked_fill(~inside, -100)
    return {"input_ids": ids, "attention_mask": inside.long(), "labels": labels}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain_loop(data: dict[str, np.ndarray], micro_means: int | None = None) -> dict[str, torch.Tensor]:
    """One epoch of batches of 32 by hand; ``micro_means``: the buggy mean of that many micro-batch means."""
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for lo in range(0, SAMPLES, BATCH):
        if micro_means is None:
            model(**reference_batch(data, lo, lo + BATCH)).loss.backward()
        else:
            size = BATCH // micro_means
            for start in range(lo, lo + BATCH, size):
                (model(**reference_batch(data, start, start + size)).loss / micro_means).backward()
        optimizer.step()
        optimizer.zero_grad()
    return weights(model)


def batchfit_run(data: dict[str, np.ndarray], **options: Any) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=LR), batch_size=BATCH, shuffle=False,
                      progress=False, **options)
    trainer.fit(ArraySource(**data), epochs=1)
    return weights(model)


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return token_data()


@pytest.fixture(scope="module")
def reference(data) -> dict[str, torch.Tensor]:
    return plain_loop(data)


def test_the_mean_of_micro_batch_means_would_differ(data, reference):
    """The test can fail: the buggy accumulation moves the weights far beyond the tolerance."""
    assert largest_difference(plain_loop(data, micro_means=4), reference) > 1e-3


@pytest.mark.parametrize("options", [{"micro_batch_size": 8}, {"micro_batch_tokens": 96},
                                     {"micro_batch_tokens": 40, "micro_batch_size": 3}],
                         ids=["micro-8", "tokens-96", "tokens-40-and-3"])
def test_micro_batches_give_the_weights_of_one_batch(data, reference, options):
    assert_same(batchfit_run(data, **options), reference)


def test_token_budget_pieces_are_sorted_trimmed_and_within_budget(data):
    batch = {k: torch.from_numpy(v[:BATCH]) for k, v in data.items()}
    pieces = list(micro_batches(batch, None, 96))
    assert sum(size for _, size in pieces) == BATCH and len(pieces) > 1
    longest = [int(piece["input_ids_lengths"].max()) for piece, _ in pieces]
    assert longest == sorted(longest, reverse=True)
    for piece, size in pieces:
        width = piece["input_ids"].shape[1]
        assert width == int(piece["input_ids_lengths"].max()) == piece["labels"].shape[1]
        assert size * width <= 96 or size == 1
    padded = sum(piece["input_ids"].numel() for piece, _ in pieces)
    assert padded < batch["input_ids"].numel()  # less padding than the batch padded to its longest
    model = tiny_llama()
    assert sum(int(token_count(model, piece)) for piece, _ in pieces) == int(token_count(model, batch))


def test_token_count_is_that_of_the_shifted_labels(data):
    batch = {k: torch.from_numpy(v[:4]) for k, v in data.items()}
    labels = reference_batch(data, 0, 4)["labels"]
    assert int(token_count(tiny_llama(), batch)) == int((labels[:, 1:] != -100).sum())
    encoder = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    assert int(token_count(encoder, batch)) == int((labels != -100).sum())


def test_validation_loss_is_the_token_mean_of_the_whole_set(data):
    model = tiny_llama()
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=LR), batch_size=BATCH, progress=False,
                      eval_batch_size=5)
    with torch.no_grad():
        expected = float(model(**reference_batch(data, 0, SAMPLES)).loss)
    assert trainer.evaluate(ArraySource(**data))["loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- 2 gloo ranks


RANK_OPTIONS = {"2x16": {}, "2x(token budget)": {"micro_batch_tokens": 64}}


def rank_main(rank: int, port: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    try:
        outcome: dict[str, Any] = {name: batchfit_run(token_data(), **options)
                                   for name, options in RANK_OPTIONS.items()}
    except BaseException as error:
        outcome = {"error": traceback.format_exc(), "type": type(error).__name__}
    torch.save(outcome, result + ".tmp")
    os.replace(result + ".tmp", result)
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """Both splits of RANK_OPTIONS trained by 2 gloo ranks (one launch: ranks start in seconds)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "batchfit", __name__])
    folder, port = tmp_path_factory.mktemp("ranks"), free_port()
    results = [str(folder / f"rank{rank}.pt") for rank in range(2)]
    ranks = [context.Process(target=rank_main, args=(rank, port, results[rank])) for rank in range(2)]
    start = time.monotonic()
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(max(0.1, start + RANK_TIMEOUT - time.monotonic()))
    for process in ranks:
        if process.is_alive():
            process.kill()
    return [torch.load(path, weights_only=False) if os.path.exists(path) else {"error": "no result"}
            for path in results]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RANK_OPTIONS))
def test_two_gloo_ranks_give_the_weights_of_one_batch(two_ranks, reference, name):
    for outcome in two_ranks:
        assert name in outcome, outcome.get("error")
        assert_same(outcome[name], reference)
