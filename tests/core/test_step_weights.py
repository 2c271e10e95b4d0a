"""The micro-batch weights of THE step: exact ratios of integers, whatever the model's dtype.

A loss that is a mean over tokens is weighted by each micro-batch's share of the batch's tokens.
The counts are integers, so in a float64 model the step must equal a float64 loop that takes the
token mean over the whole batch to float64 rounding (1e-16), not to float32 rounding (1e-8).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit.core.step import Step


class TokenModel(torch.nn.Module):
    """Scores every token of a padded sequence (a stand-in for a language model)."""

    def __init__(self, dtype: torch.dtype, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 8, dtype=dtype)
        self.head = torch.nn.Linear(8, vocab, dtype=dtype)

    def forward(self, tokens, labels=None):
        return self.head(torch.tanh(self.embed(tokens)))


def token_loss(output, batch):
    """Mean over the tokens that count (labels != -100), as language models compute it."""
    return F.cross_entropy(output.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def tokens_that_count(batch) -> torch.Tensor:
    return (batch["labels"] != -100).sum()  # an int64 tensor


def token_batch(num_samples: int = 13, length: int = 17) -> dict[str, torch.Tensor]:
    """Sequences with very uneven numbers of tokens that count (1 to ``length``), so the weights
    are ratios like 37/113 that no binary float holds exactly."""
    rng = np.random.default_rng(3)
    tokens = torch.from_numpy(rng.integers(0, 11, (num_samples, length)))
    labels = torch.roll(tokens, -1, dims=1)
    lengths = torch.from_numpy(rng.integers(1, length + 1, num_samples))
    labels[torch.arange(length)[None, :] >= lengths[:, None]] = -100
    return {"tokens": tokens, "labels": labels}


def hand_written_grads(model: torch.nn.Module, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The token mean over the whole batch, in plain PyTorch: sum of token losses / token count."""
    logits = model(**batch)
    token_losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                   reduction="none")
    loss = token_losses.sum() / (batch["labels"] != -100).sum()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def step_grads(model: torch.nn.Module, batch, micro_batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    step = Step(model, token_loss, None, device=torch.device("cpu"), micro_batch_size=micro_batch_size,
                loss_count=tokens_that_count)
    loss = step.accumulate(batch, len(batch["tokens"])).loss
    grads = [p.grad.clone() for p in model.parameters()]
    step.skip()
    return loss, grads


@pytest.mark.parametrize("micro_batch_size", [1, 3, 5, 12])
def test_step_token_weights_exact_in_float64(micro_batch_size):
    batch = token_batch()
    model = TokenModel(torch.float64)
    loss, grads = step_grads(model, batch, micro_batch_size)
    expected_loss, expected_grads = hand_written_grads(model, batch)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected_loss, rtol=1e-14, atol=0)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float64
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-16)


def test_step_token_weights_float32_model_unchanged():
    """A float32 model gets the float64 ratio in its gradients, as close as float32 allows."""
    batch = token_batch()
    model = TokenModel(torch.float32)
    _, grads = step_grads(model, batch, 4)
    _, expected_grads = hand_written_grads(model, batch)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_step_token_weights_micro_batch_without_tokens_counts_nothing():
    batch = token_batch()
    batch["labels"][:3] = -100  # the first micro-batch has no token that counts: its own mean is NaN
    model = TokenModel(torch.float64)
    loss, grads = step_grads(model, batch, 3)
    expected_loss, expected_grads = hand_written_grads(model, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-14, atol=0)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-16)


def test_step_token_weights_python_int_counts():
    batch = token_batch()
    model = TokenModel(torch.float64)
    step = Step(model, token_loss, None, device=torch.device("cpu"), micro_batch_size=4,
                loss_count=lambda micro: int((micro["labels"] != -100).sum()))
    loss = step.accumulate(batch, len(batch["tokens"])).loss
    grads = [p.grad.clone() for p in model.parameters()]
    step.skip()
    expected_loss, expected_grads = hand_written_grads(model, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-14, atol=0)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-16)


def test_step_token_weights_two_ranks_exact_in_float64():
    """Two ranks replayed in one process: the counts are summed over ranks (here by hand, after the
    backward passes weighed by count / global size), and the mean of the two ranks' gradients (what
    DDP computes) rescaled by the step is the whole batch's token mean."""
    batch = token_batch(14)
    model = TokenModel(torch.float64)
    shares = [{key: value[lo:hi] for key, value in batch.items()} for lo, hi in ((0, 7), (7, 14))]
    totals = [tokens_that_count(share) for share in shares]
    grads, losses = [], []
    for rank, share in enumerate(shares):
        other = totals[1 - rank]
        step = Step(model, token_loss, None, device=torch.device("cpu"), micro_batch_size=3, world_size=2,
                    loss_count=tokens_that_count,
                    sum_over_ranks=lambda total, other=other: lambda: total + other)
        losses.append(step.accumulate(share, 14).loss)
        grads.append([p.grad.clone() for p in model.parameters()])
        step.skip()
    expected_loss, expected_grads = hand_written_grads(model, batch)
    torch.testing.assert_close(losses[0] + losses[1], expected_loss, rtol=1e-14, atol=0)
    for first, second, expected in zip(*grads, expected_grads, strict=True):
        torch.testing.assert_close((first + second) / 2, expected, rtol=1e-12, atol=1e-16)
