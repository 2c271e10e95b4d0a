"""The Trainer against hand-written PyTorch loops, one test per invariant of docs/design.md.

1. Batch means batch: the same weights for every micro-batch size and world size; the loss
   of a batch is the mean over its samples (or tokens).
2. Special cases are the general case: batch_size=1 is SGD, batch_size="full" is gradient descent.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit import ArraySource, Batcher, Trainer
from batchfit.core.step import Step
from batchfit.data.order import epoch_order


def order_of(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.as_tensor(np.asarray(epoch_order(num_samples, True, seed, epoch)))


def test_trainer_batch_size_1_is_sgd_over_samples_in_order(make_mlp, regression, assert_close):
    x, y = map(torch.from_numpy, regression)
    model = make_mlp(out_features=1)
    reference = copy.deepcopy(model)

    trainer = Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05),
                      batch_size=1, shuffle=False, progress=False)
    history = trainer.fit((x, y), epochs=2)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        for i in range(len(x)):
            loss = F.mse_loss(reference(x[i : i + 1]), y[i : i + 1])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert_close(model.state_dict(), reference.state_dict())
    assert len(history.steps) == 2 * len(x)
    np.testing.assert_allclose(history.losses(), losses, rtol=1e-5)


def test_trainer_full_batch_is_gradient_descent(make_mlp, regression, assert_close):
    x, y = map(torch.from_numpy, regression)
    model = make_mlp(out_features=1)
    reference = copy.deepcopy(model)

    trainer = Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1),
                      batch_size="full", shuffle=True, progress=False)
    history = trainer.fit((x, y), epochs=6)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(6):
        loss = F.mse_loss(reference(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_close(model.state_dict(), reference.state_dict())
    assert [r["batch_size"] for r in history.steps] == [len(x)] * 6


def test_trainer_shuffled_batches_match_a_loop_over_epoch_order(make_mlp, classification, assert_close):
    x, y = map(torch.from_numpy, classification)
    model = make_mlp()
    reference = copy.deepcopy(model)

    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      batch_size=64, shuffle=True, seed=11, progress=False)
    history = trainer.fit((x, y), epochs=2)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for epoch in range(2):
        order = order_of(len(x), 11, epoch)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(reference(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert_close(model.state_dict(), reference.state_dict())
    np.testing.assert_allclose(history.losses(), losses, rtol=1e-5)
    assert [r["batch_size"] for r in history.steps] == [64, 36] * 2


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.Adam(params, lr=0.01),
], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("micro_batch_size", [16, 21, 64])
def test_trainer_micro_batches_give_the_weights_of_the_whole_batch(make_mlp, make_optimizer, micro_batch_size,
                                                                      assert_close):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((150, 5)).astype(np.float32)  # batches of 64, 64 and 22
    y = rng.integers(0, 3, 150)

    def train(micro):
        model = make_mlp()
        trainer = Trainer(model, F.cross_entropy, make_optimizer(model.parameters()), batch_size=64,
                          micro_batch_size=micro, shuffle=True, seed=4, progress=False)
        history = trainer.fit((x, y), epochs=1)
        return model.state_dict(), history.losses()

    whole_weights, whole_losses = train(None)
    weights, losses = train(micro_batch_size)
    assert_close(weights, whole_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-5)


def test_trainer_loss_of_a_batch_is_the_mean_over_its_samples(make_mlp, classification):
    x, y = map(torch.from_numpy, classification)
    model = make_mlp()
    reference = copy.deepcopy(model)
    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), batch_size=40,
                      micro_batch_size=15, shuffle=False, progress=False)
    history = trainer.fit((x, y), epochs=1)  # batches of 40, 40, 20 in micro-batches of 15, 15, 10 and 15, 5

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    losses = []
    for start in range(0, 100, 40):
        loss = F.cross_entropy(reference(x[start : start + 40]), y[start : start + 40])
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    np.testing.assert_allclose(history.losses(), losses, rtol=1e-6)


class TokenModel(torch.nn.Module):
    """Scores every token of a padded sequence (a stand-in for a language model)."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 6)
        self.head = torch.nn.Linear(6, vocab)

    def forward(self, tokens, labels=None):
        return self.head(torch.tanh(self.embed(tokens)))


def token_loss(output, batch):
    """Mean over the tokens that count (labels != -100), as language models compute it."""
    return F.cross_entropy(output.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def token_data(num_samples: int = 20, length: int = 9):
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 7, (num_samples, length))
    labels = np.roll(tokens, -1, axis=1)
    # very uneven lengths: sample i has between 1 and `length` tokens that count
    lengths = 1 + (np.arange(num_samples) * 5) % length
    labels[np.arange(length)[None, :] >= lengths[:, None]] = -100
    return torch.from_numpy(tokens), torch.from_numpy(labels)


def test_trainer_loss_count_weights_micro_batches_per_token():
    tokens, labels = token_data()
    model, reference = TokenModel(), TokenModel()

    trainer = Trainer(model, token_loss, torch.optim.SGD(model.parameters(), lr=0.5), batch_size=10,
                      micro_batch_size=4, shuffle=False, progress=False,
                      loss_count=lambda batch: (batch["labels"] != -100).sum())
    history = trainer.fit({"tokens": tokens, "labels": labels}, epochs=1)  # micro-batches of 4, 4 and 2

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    losses = []
    for start in (0, 10):
        batch = {"tokens": tokens[start : start + 10], "labels": labels[start : start + 10]}
        logits = reference(**batch)
        # the token mean over the whole batch, written out by hand
        token_losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                       reduction="none")
        loss = token_losses.sum() / (batch["labels"] != -100).sum()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    np.testing.assert_allclose(history.losses(), losses, rtol=1e-6)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-7)

    # and a mean of micro-batch means (what a naive accumulation computes) would have differed
    batch = {"tokens": tokens[:10], "labels": labels[:10]}
    micro_means = [token_loss(TokenModel()(**{k: v[s : s + 4] for k, v in batch.items()}),
                              {k: v[s : s + 4] for k, v in batch.items()}).item() for s in (0, 4, 8)]
    assert abs(np.mean(micro_means) - losses[0]) > 1e-3


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("num_samples", "batch_size", "micro_batch_size"),
                         [(40, 8, None), (23, 7, None), (23, 7, 2), (5, 1, None), (9, 9, 4)])
def test_step_ranks_average_to_the_single_process_gradient(make_mlp, num_samples, batch_size,
                                                                   micro_batch_size):
    """What DDP does on two ranks, replayed on one process: each rank's gradient, then their mean."""
    rng = np.random.default_rng(num_samples)
    source = ArraySource(rng.standard_normal((num_samples, 5)).astype(np.float32), rng.integers(0, 3, num_samples))
    single = Batcher(source, batch_size, shuffle=True, seed=2)
    ranks = [Batcher(source, batch_size, shuffle=True, seed=2, rank=r, world_size=2) for r in range(2)]
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step_grads(runner: Step, batch, global_size: int):
        optimizer.zero_grad()
        loss = runner.accumulate(batch, global_size).loss
        return loss, grads_of(model)

    one = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"))
    two = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"), micro_batch_size=micro_batch_size,
               world_size=2)
    for whole, share0, share1 in zip(single, *ranks):
        size = whole[0].shape[0]
        loss, grads = step_grads(one, whole, size)
        loss0, grads0 = step_grads(two, share0, size)
        loss1, grads1 = step_grads(two, share1, size)
        torch.testing.assert_close(loss0 + loss1, loss, rtol=1e-6, atol=1e-7)
        for g, g0, g1 in zip(grads, grads0, grads1):
            torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-5, atol=1e-7)  # DDP averages over ranks


def test_evaluate_with_loss_count_is_the_mean_over_tokens():
    tokens, labels = token_data()
    model = TokenModel()
    trainer = Trainer(model, token_loss, torch.optim.SGD(model.parameters(), lr=0.5), progress=False,
                      loss_count=lambda batch: (batch["labels"] != -100).sum())
    result = trainer.evaluate({"tokens": tokens, "labels": labels}, batch_size=6)  # batches of 6, 6, 6, 2
    with torch.no_grad():
        expected = token_loss(model(tokens), {"labels": labels}).item()  # all tokens of the data at once
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_trainer_loss_count_micro_batch_without_tokens():
    tokens, labels = token_data(8)
    labels[:2] = -100  # the first micro-batch has no token that counts: its own mean is NaN
    model, reference = TokenModel(), TokenModel()
    trainer = Trainer(model, token_loss, torch.optim.SGD(model.parameters(), lr=0.5), batch_size=8,
                      micro_batch_size=2, shuffle=False, progress=False, on_nan="raise",
                      loss_count=lambda batch: (batch["labels"] != -100).sum())
    history = trainer.fit({"tokens": tokens, "labels": labels}, epochs=1)
    loss = token_loss(reference(tokens), {"labels": labels})
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    assert history.losses() == pytest.approx([loss.item()], rel=1e-6)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-7)
