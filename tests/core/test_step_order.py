"""Step.step: the whole order in one call, against a hand-written loop; the non-finite check; a passed-in
reduction over ranks (one collective, as the stream ranks use it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchfit.core.step import Step
from batchfit.distributed import DistContext
from batchfit.train.stream_ranks import grad_reducer

CPU = torch.device("cpu")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(size: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 4, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def test_step_step_equals_a_hand_written_step_with_clipping():
    hand, mine = _model(), _model()
    hand_opt = torch.optim.SGD(hand.parameters(), lr=0.5)
    mine_opt = torch.optim.SGD(mine.parameters(), lr=0.5)
    x, y = _batch()
    loss = F.cross_entropy(hand(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hand.parameters(), 0.1)
    hand_opt.step()
    hand_opt.zero_grad(set_to_none=True)
    step = Step(mine, F.cross_entropy, mine_opt, device=CPU, micro_batch_size=5, max_grad_norm=0.1)
    result = step.step((x, y), len(x))
    assert result.applied and result.value is not None and abs(result.value - loss.item()) < 1e-6
    for a, b in zip(hand.parameters(), mine.parameters()):
        torch.testing.assert_close(a, b)
        assert b.grad is None  # zeroed


def test_step_step_never_applies_a_non_finite_loss():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    step = Step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), device=CPU)
    x, y = _batch()
    x[3] = float("nan")
    result = step.step((x, y), len(x))
    assert not result.applied and result.value is not None and result.value != result.value
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, model.parameters()))


def test_step_step_stops_when_the_ranks_agree_to():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    step = Step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), device=CPU)

    def agree(result):
        result.stop = True
        return result

    result = step.step(_batch(), 12, after_sync=agree)
    assert result.stop and not result.applied
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, model.parameters()))


class TwoRanks(DistContext):
    """A stand-in for two ranks that hold the same values: an all-reduce doubles them (and is counted)."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2)
        self.reductions = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.reductions += 1
        return tensor.mul_(2)


def test_grad_reducer_sums_gradients_and_numbers_in_one_all_reduce():
    model = _model()
    unused = torch.nn.Parameter(torch.zeros(2))  # no gradient on any rank: keeps none
    params = [*model.parameters(), unused]
    context = TwoRanks()
    step = Step(model, F.cross_entropy, torch.optim.SGD(params, lr=0.0), device=CPU, world_size=2,
                reduce_grads=grad_reducer(context, [False] * len(params)))
    x, y = _batch()
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    seen = []

    def keep(result):  # the gradients after the reduction, before the update zeroes them
        seen.extend(p.grad.clone() if p.grad is not None else None for p in params)
        return result

    result = step.step((x, y), 24, numbers=[3.0, 0.5], after_sync=keep)
    assert context.reductions == 1
    assert result.numbers == [6.0, 1.0]  # and the loss shares summed to the mean loss:
    assert result.value is not None and abs(result.value - F.cross_entropy(model(x), y).item()) < 1e-5
    # Each rank weighs its loss by its share of the 24 samples, times the world size (as for DDP's mean):
    # the mean over ranks of the two equal halves is the gradient of the 12 samples' mean.
    for grad, want in zip(seen, expected):
        torch.testing.assert_close(grad, want)
    assert seen[-1] is None
