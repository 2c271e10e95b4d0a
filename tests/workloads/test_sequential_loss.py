"""SequentialMSE: each event of a batch scored after the SGD steps of the batch's earlier events (to first order),
checked against a hand-written loop that trains one event at a time."""

from __future__ import annotations

import pytest
import torch

import batchfit as bf
from batchfit.workloads.stream import MatrixFactorization, Recipe, SequentialMSE, rmse_loss

# Six events; user 0 rates three items, item 2 is rated by three users, event 5 repeats event 0's pair.
USER = torch.tensor([0, 0, 1, 0, 2, 0])
ITEM = torch.tensor([1, 2, 2, 3, 2, 1])
RATING = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 5.0])


def model(seed: int = 0) -> MatrixFactorization:
    return MatrixFactorization(3, 4, dim=4, init=0.3, seed=seed)


def one_at_a_time(mf: MatrixFactorization, vector_step: float, bias_step: float) -> torch.Tensor:
    """Each event predicted with the weights after the previous events' own SGD steps (gradient 2e), as a
    per-event learner does; returns the predictions."""
    predicted = []
    for k in range(len(USER)):
        u, i = USER[k : k + 1], ITEM[k : k + 1]
        out = mf(u, i)
        predicted.append(out.detach())
        error = (out - RATING[k : k + 1]).sum()
        mf.zero_grad()
        out.sum().backward()
        with torch.no_grad():
            for table, step in ((mf.user_vectors, vector_step), (mf.item_vectors, vector_step),
                                (mf.user_bias, bias_step), (mf.item_bias, bias_step)):
                table.weight -= 2 * step * float(error) * table.weight.grad
    return torch.cat(predicted)


def corrected(mf: MatrixFactorization, vector_step: float, bias_step: float) -> torch.Tensor:
    """The sequential predictions SequentialMSE scores."""
    loss = SequentialMSE(mf, vector_step, bias_step, batch_size=len(USER))
    mf.train()
    out = mf(USER, ITEM)
    assert mf.kept is not None
    user, item, users, items = mf.kept
    errors, _, _ = loss.sequential(out.detach(), RATING, user, item, users.detach(), items.detach())
    return RATING + errors


def one_step(mf: MatrixFactorization, vector_step: float, bias_step: float, sequential: bool) -> MatrixFactorization:
    """One Trainer step of the recipe on the six events (with or without SequentialMSE)."""
    recipe = Recipe(batch_size=6, lr_vectors=vector_step, lr_biases=bias_step, sequential=sequential)
    bf.Trainer(mf, recipe.loss(mf), recipe.optimizer(mf), batch_size=6, shuffle=False, progress=False).fit(
        (USER.numpy(), ITEM.numpy(), RATING.numpy()), epochs=1)
    return mf


def test_with_biases_alone_the_correction_is_exact():
    # Without vector steps the prediction is linear in the biases: one event at a time is reproduced exactly.
    reference = one_at_a_time(model(), 0.0, 0.1)
    stale = model()(USER, ITEM).detach()
    assert (reference - stale).abs().max() > 0.3  # the stale scores really are off
    torch.testing.assert_close(corrected(model(), 0.0, 0.1), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("step", [1e-2, 1e-3])
def test_the_correction_is_right_to_first_order_in_the_step(step):
    reference = one_at_a_time(model(), step, step / 2)
    stale = model()(USER, ITEM).detach()
    off = float((corrected(model(), step, step / 2) - reference).abs().max())
    stale_off = float((stale - reference).abs().max())
    assert stale_off > step  # the stale scores are off by order step
    assert off < 10 * step**2 and off < stale_off / 20, (off, stale_off)


@pytest.mark.parametrize("step", [1e-2, 3e-3])
def test_one_batch_step_lands_where_one_event_at_a_time_does(step):
    # The weights after one step on the batch against six per-event SGD steps: the plain batch step is off by
    # order step^2 (stale errors and vectors), the sequential one by order step^3.
    reference = model()
    one_at_a_time(reference, step, step / 2)

    def off(mf: MatrixFactorization) -> float:
        return max(float((a - b).abs().max()) for a, b in zip(mf.state_dict().values(),
                                                                reference.state_dict().values()))

    plain, ours = off(one_step(model(), step, step / 2, False)), off(one_step(model(), step, step / 2, True))
    assert plain > step**2 and ours < plain / 20, (ours, plain)


def test_the_score_is_that_of_the_sequential_predictions():
    mf = model()
    expected = float(((corrected(model(), 0.05, 0.025) - RATING) ** 2).mean())
    recipe = Recipe(batch_size=6, sequential=True)
    trainer = bf.Trainer(mf, recipe.loss(mf), recipe.optimizer(mf), batch_size=6, shuffle=False, progress=False)
    trainer.fit((USER.numpy(), ITEM.numpy(), RATING.numpy()), epochs=1)
    assert abs(trainer.history.column("loss")[0] - expected) < 1e-5


def test_outside_training_and_for_single_events_it_is_the_plain_error():
    mf = model()
    loss = SequentialMSE(mf, 0.05, 0.025, batch_size=6)
    mf.eval()
    out = mf(USER, ITEM)
    assert mf.kept is None
    torch.testing.assert_close(loss(out, RATING), rmse_loss(out, RATING))
    mf.train()
    out = mf(USER[:1], ITEM[:1])
    torch.testing.assert_close(loss(out, RATING[:1]), rmse_loss(out, RATING[:1]))
    assert mf.kept is None  # used once: a later eval-mode forward never meets stale rows


def forward_substitution(stale, user, item, users, items, vector: float, bias: float):
    """The sequential errors and moved vectors by the definition, one event after another (double loop)."""
    errors, moved_users, moved_items = [], [], []
    for k in range(len(stale)):
        error = float(stale[k])
        moved_user, moved_item = torch.zeros_like(users[k]), torch.zeros_like(items[k])
        for j in range(k):
            if user[j] == user[k]:
                error -= errors[j] * (bias + vector * float(items[j] @ items[k]))
                moved_user -= vector * errors[j] * items[j]
            if item[j] == item[k]:
                error -= errors[j] * (bias + vector * float(users[j] @ users[k]))
                moved_item -= vector * errors[j] * users[j]
        errors.append(error)
        moved_users.append(moved_user)
        moved_items.append(moved_item)
    return torch.tensor(errors, dtype=stale.dtype), torch.stack(moved_users), torch.stack(moved_items)


@pytest.mark.parametrize("block", [7, 16, 64, 200])
def test_the_system_solved_in_blocks_is_the_system(block):
    """70 events of 5 users and 12 items: the errors and moved vectors, solved a block at a time (running sums
    from the earlier blocks) or whole (block 200), equal the event-by-event definition."""
    generator = torch.Generator().manual_seed(3)
    size = 70
    user = torch.randint(0, 5, (size,), generator=generator)
    item = torch.randint(0, 12, (size,), generator=generator) + 100  # ids need not start at 0
    users = torch.randn(size, 4, generator=generator, dtype=torch.float64) * 0.3
    items = torch.randn(size, 4, generator=generator, dtype=torch.float64) * 0.3
    stale = torch.randn(size, generator=generator, dtype=torch.float64)
    mf = MatrixFactorization(5, 112, dim=4)
    loss = SequentialMSE(mf, 0.01, 0.005, batch_size=size, block=block)
    got = loss.sequential(stale, torch.zeros(size, dtype=torch.float64), user, item, users, items)
    want = forward_substitution(stale, user, item, users, items, vector=2 * 0.01, bias=2 * 0.005)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert loss.sequential(stale, stale, user, item, users, items)[0].abs().max() == 0  # no stale error, no move


def test_bad_arguments_are_refused():
    with pytest.raises(bf.InputError, match="model"):
        SequentialMSE(torch.nn.Linear(2, 1), 0.05, 0.025, 8)  # type: ignore[arg-type]
    with pytest.raises(bf.InputError, match="vector_step"):
        SequentialMSE(model(), -1.0, 0.025, 8)
    with pytest.raises(bf.InputError, match="batch_size"):
        SequentialMSE(model(), 0.05, 0.025, 0)
    with pytest.raises(bf.InputError, match="block"):
        SequentialMSE(model(), 0.05, 0.025, 8, block=0)


def test_a_trainer_refuses_to_split_its_batches():
    """Micro-batches, or half batches for the noise scale, would score each piece as if it were the batch."""
    from batchfit.streams import StreamSource

    events = [(int(u), int(i), float(r)) for u, i, r in zip(USER, ITEM, RATING)] * 4
    recipe = Recipe(batch_size=6)
    mf = recipe.model(users=3, items=4)
    with pytest.raises(bf.InputError, match="SequentialMSE scores each batch as a whole.*micro_batch_size"):
        bf.Trainer(mf, recipe.loss(mf), recipe.optimizer(mf), batch_size=6, micro_batch_size=3,
                   progress=False).fit(StreamSource(events))
    mf = recipe.model(users=3, items=4)
    trainer = bf.Trainer(mf, recipe.loss(mf), recipe.optimizer(mf), batch_size=6, progress=False)
    with pytest.raises(bf.InputError, match="noise scale"):
        trainer.fit(StreamSource(events, max_latency=60.0, max_batch_size="auto"))
    mf = recipe.model(users=3, items=4)  # whole batches train
    history = bf.Trainer(mf, recipe.loss(mf), recipe.optimizer(mf), batch_size=6, progress=False).fit(
        StreamSource(events))
    assert history.column("samples")[-1] == len(events)


def test_a_step_over_several_processes_is_refused():
    from batchfit.core.step import Step

    recipe = Recipe(batch_size=6)
    mf = recipe.model(users=3, items=4)
    with pytest.raises(bf.InputError, match="2 processes"):
        Step(mf, recipe.loss(mf), recipe.optimizer(mf), device=torch.device("cpu"), world_size=2)
    Step(mf, rmse_loss, recipe.optimizer(mf), device=torch.device("cpu"), world_size=2)  # a plain loss splits


def test_hashed_ids_in_one_bucket_are_one_user():
    """Two user ids hashed into the same row (one bucket) share their vector: the second event is scored after
    the first's step, as one user's would be; with their own rows it is not."""
    user, item, rating = torch.tensor([5, 9]), torch.tensor([0, 1]), torch.tensor([5.0, 1.0])
    for buckets, corrected_second in ((1, True), (None, False)):
        if buckets is None:
            mf = MatrixFactorization(10, 2, dim=3, init=0.3)
        else:
            mf = MatrixFactorization(buckets, 2, dim=3, init=0.3, hashed=True)
        loss = SequentialMSE(mf, 0.05, 0.025, batch_size=2)
        out = mf(user, item)
        keys, _, users, items = mf.kept
        if buckets is not None:
            assert keys.tolist() == [0, 0]  # the rows read, not the ids
        errors, _, _ = loss.sequential(out.detach(), rating, keys, mf.kept[1], users.detach(), items.detach())
        stale = out.detach() - rating
        assert errors[0] == stale[0]
        assert (abs(float(errors[1] - stale[1])) > 1e-4) == corrected_second


def test_per_event_keeps_the_mean_and_takes_the_gradient_of_the_sum_over_the_batch_size():
    from batchfit.workloads.stream import EventMSE, per_event

    output = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    target = torch.tensor([1.5, 2.0, 3.0])
    loss = EventMSE(batch_size=12)(output, target)
    assert float(loss.detach()) == pytest.approx(float(((output - target) ** 2).mean()))
    loss.backward()
    torch.testing.assert_close(output.grad, 2 * (output - target).detach() / 12)
    mean = torch.tensor(2.5, requires_grad=True)
    assert per_event(mean, 12, 12) is mean  # a full batch: the mean itself
