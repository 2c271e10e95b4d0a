"""The micro-batch memory search: budgets hold, the search is tight, probes leave no trace."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from batchfit.core.step import Step
from batchfit.errors import BatchfitError
from batchfit.measure import memory
from batchfit.measure.memory import (
    available_host_memory,
    find_micro_batch_size,
    measure_step_peak,
    next_trial_size,
    search_largest,
)

MiB = 2**20
cross_entropy = torch.nn.functional.cross_entropy




def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def wide_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 10),
    )


def data(shape: tuple[int, ...], n: int):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((n, *shape), generator=generator), torch.randint(0, 10, (n,), generator=generator)


# Models whose memory differs by orders of magnitude, each with a budget it fills well below len(src).
CASES = {
    "tiny_mlp": (tiny_mlp, (32,), 50_000, 4 * MiB),
    "wide_mlp": (wide_mlp, (64,), 4_000, 24 * MiB),
    "small_cnn": (small_cnn, (1, 28, 28), 1_000, 16 * MiB),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_find_micro_batch_size_peak_at_result_within_budget(case):
    make_model, shape, n, budget = CASES[case]
    model = make_model()
    src = data(shape, n)
    optimizer = torch.optim.Adam(model.parameters())

    size = find_micro_batch_size(model, cross_entropy, src, optimizer=optimizer, memory_budget=budget)
    tighter = find_micro_batch_size(model, cross_entropy, src, optimizer=optimizer, memory_budget=budget / 2)

    assert 1 < size < n  # limited by the budget, not by the data
    assert measure_step_peak(model, cross_entropy, src, size, optimizer=optimizer) <= budget
    assert tighter < size
    assert measure_step_peak(model, cross_entropy, src, tighter, optimizer=optimizer) <= budget / 2
    # Tight: a quarter more samples would no longer fit under the 10 % margin.
    assert measure_step_peak(model, cross_entropy, src, min(n, math.ceil(1.25 * size)), optimizer=optimizer) > (
        0.9 * budget
    )


def test_measure_step_peak_matches_activation_count_of_mlp():
    # Linear-ReLU-Linear-ReLU-Linear: at the start of backward the input, both ReLU outputs and
    # the gradients flowing through the second block are alive: (inputs + 4·hidden) floats a sample.
    model = wide_mlp()
    src = data((64,), 2_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    small = measure_step_peak(model, cross_entropy, src, 500, optimizer=optimizer)
    large = measure_step_peak(model, cross_entropy, src, 1_500, optimizer=optimizer)
    per_sample = (large - small) / 1_000
    assert per_sample == pytest.approx(4 * (64 + 4 * 512), rel=0.1)


def test_measure_step_peak_is_reproducible():
    model, src = small_cnn(), data((1, 28, 28), 200)
    first = measure_step_peak(model, cross_entropy, src, 64)
    assert measure_step_peak(model, cross_entropy, src, 64) == first


def test_find_micro_batch_size_counts_optimizer_state():
    model, src = wide_mlp(), data((64,), 4_000)
    with_sgd = find_micro_batch_size(model, cross_entropy, src, memory_budget=24 * MiB)
    adam = torch.optim.Adam(model.parameters())
    with_adam = find_micro_batch_size(model, cross_entropy, src, optimizer=adam, memory_budget=24 * MiB)
    assert with_adam < with_sgd  # Adam's two moments and its update take memory activations had


def test_find_micro_batch_size_leaves_model_and_adam_state_bit_identical():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(64, 10),
    )
    x, y = data((32,), 5_000)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for start in (0, 64):
        optimizer.zero_grad()
        cross_entropy(model(x[start : start + 64]), y[start : start + 64]).backward()
        optimizer.step()
    model.eval()
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    find_micro_batch_size(model, cross_entropy, (x, y), optimizer=optimizer, memory_budget=4 * MiB)

    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # BatchNorm stats too
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for index, saved in state["state"].items():
        assert all(torch.equal(saved[k], after["state"][index][k]) for k in saved)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.training


def test_find_micro_batch_size_fresh_optimizer_stays_fresh():
    model, src = tiny_mlp(), data((32,), 1_000)
    optimizer = torch.optim.Adam(model.parameters())
    find_micro_batch_size(model, cross_entropy, src, optimizer=optimizer, memory_budget=4 * MiB)
    assert len(optimizer.state) == 0


def test_find_micro_batch_size_caps_at_len_src_and_max_size():
    model = tiny_mlp()
    assert find_micro_batch_size(model, cross_entropy, data((32,), 300), memory_budget=256 * MiB) == 300
    assert find_micro_batch_size(model, cross_entropy, data((32,), 300), memory_budget=256 * MiB, max_size=37) == 37


def test_find_micro_batch_size_default_budget_is_host_memory():
    assert available_host_memory() > 0
    assert find_micro_batch_size(tiny_mlp(), cross_entropy, data((32,), 5_000), max_size=128) == 128


def test_find_micro_batch_size_nothing_fits_raises():
    with pytest.raises(BatchfitError, match=r"Even a micro-batch of 1 sample does not fit in memory_budget=1000 bytes"):
        find_micro_batch_size(wide_mlp(), cross_entropy, data((64,), 100), memory_budget=1000)


def test_find_micro_batch_size_without_profiler_estimates(monkeypatch):
    def unavailable(run):
        raise RuntimeError("profiler busy")

    monkeypatch.setattr(memory, "profiled_peak", unavailable)
    model, src = wide_mlp(), data((64,), 4_000)
    with pytest.warns(UserWarning, match="profiler is unavailable"):
        size = find_micro_batch_size(model, cross_entropy, src, memory_budget=24 * MiB)
    assert 1 < size < 4_000
    cpu = torch.device("cpu")
    draw = memory._drawer(memory.as_source(src), 0, cpu, torch.float32)
    assert memory.accounted_peak(Step(model, cross_entropy, None, device=cpu), draw(size)) <= 24 * MiB


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory_budget": -1}, r"`memory_budget` must be None or a positive number of bytes. Received: .*=-1"),
        ({"memory_budget": "1GB"}, r"`memory_budget` must be .* Received: memory_budget='1GB'"),
        ({"max_size": 0}, r"`max_size` must be a positive integer. Received: max_size=0"),
        ({"optimizer": "adam"}, r"`optimizer` must be None or a torch.optim.Optimizer. Received: optimizer='str'"),
        ({"seed": 1.5}, r"`seed` must be an integer. Received: seed=1.5"),
        ({"device": "gpu"}, r"`device` must be .* Received: device='gpu'"),
        ({"src": (torch.zeros(0, 32), torch.zeros(0))}, r"`src` must be at least one sample"),
    ],
)
def test_find_micro_batch_size_bad_input_names_argument(kwargs, match):
    args = {"src": data((32,), 10)} | kwargs
    with pytest.raises(BatchfitError, match=match):
        find_micro_batch_size(tiny_mlp(), cross_entropy, **args)


def test_measure_step_peak_size_above_samples_raises():
    with pytest.raises(BatchfitError, match=r"`size` must be at most the number of samples \(10\). Received: size=11"):
        measure_step_peak(tiny_mlp(), cross_entropy, data((32,), 10), 11)


@pytest.mark.parametrize("threshold", [1, 2, 3, 17, 100, 1000, 4097, 65_537])
def test_search_largest_out_of_memory_never_returns_failing_size(threshold):
    # As on CUDA: a real step raises out-of-memory (an infinite peak) beyond `threshold` samples.
    tried = []

    def peak_of(size: int) -> float:
        tried.append(size)
        return 1e6 + 10.0 * size if size <= threshold else math.inf

    size = search_largest(peak_of, limit=1e12, cap=10**6)
    assert threshold * 0.96 <= size <= threshold
    assert len(tried) < 60


@pytest.mark.parametrize(("constant", "per_sample"), [(0.0, 1.0), (5e6, 1e3), (9e8, 1e3), (1e3, 1e5)])
def test_search_largest_linear_peak_is_tight_and_within_limit(constant, per_sample):
    limit = 1e9
    tried = []

    def peak_of(size: int) -> float:
        tried.append(size)
        return constant + per_sample * size

    size = search_largest(peak_of, limit, cap=10**9)
    largest = int((limit - constant) / per_sample)
    assert 0.96 * largest <= size <= largest
    # A trial never goes far beyond the limit: the line bounds every step.
    assert max(peak_of(s) for s in tried[:-1]) <= 1.3 * limit


def test_search_largest_returns_zero_when_one_does_not_fit():
    assert search_largest(lambda size: 100.0 * size, limit=50.0, cap=1000) == 0


def test_next_trial_size_bisects_after_out_of_memory():
    assert next_trial_size({64: 10.0, 128: math.inf}, limit=100.0, cap=1000) == 96


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_find_micro_batch_size_cuda_result_runs_without_out_of_memory():
    device = torch.device("cuda")
    model = wide_mlp().to(device)
    optimizer = torch.optim.Adam(model.parameters())
    x, y = data((64,), 20_000)
    budget = torch.cuda.memory_allocated(device) + 64 * MiB
    size = find_micro_batch_size(model, cross_entropy, (x, y), device=device, optimizer=optimizer, memory_budget=budget)
    assert 1 < size < 20_000
    torch.cuda.reset_peak_memory_stats(device)
    optimizer.zero_grad(set_to_none=True)
    cross_entropy(model(x[:size].to(device)), y[:size].to(device)).backward()
    optimizer.step()
    torch.cuda.synchronize(device)
    assert torch.cuda.max_memory_allocated(device) <= budget
    # With the default budget (all the device can give) the result also runs.
    optimizer.zero_grad(set_to_none=True)
    size = find_micro_batch_size(model, cross_entropy, (x, y), device=device, optimizer=optimizer, max_size=4096)
    cross_entropy(model(x[:size].to(device)), y[:size].to(device)).backward()
    optimizer.step()


def test_probe_twin_optimizer_has_same_kind_state_and_groups():
    # What a probe on another device uses: an optimizer of the same kind and state over a copy.
    from batchfit.measure.state import _optimizer_for

    model, (x, y) = tiny_mlp(), data((32,), 64)
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[2].parameters()}])
    cross_entropy(model(x), y).backward()
    optimizer.step()
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # wraps optimizer.step
    twin = copy.deepcopy(model)
    twin_optimizer = _optimizer_for(optimizer, model, twin)

    assert type(twin_optimizer) is torch.optim.AdamW
    assert [list(map(id, g["params"])) for g in twin_optimizer.param_groups] == [
        list(map(id, twin[0].parameters())),
        list(map(id, twin[2].parameters())),
    ]
    ours, theirs = optimizer.state_dict(), twin_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, state in ours["state"].items():
        assert all(torch.equal(v, theirs["state"][index][k]) for k, v in state.items())
        assert all(v is not theirs["state"][index][k] for k, v in state.items() if isinstance(v, torch.Tensor))

    weights = [p.clone() for p in model.parameters()]
    cross_entropy(twin(x), y).backward()
    twin_optimizer.step()  # steps the twin, never the original
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert not any(torch.equal(w, p) for w, p in zip(weights, twin.parameters()))


def test_find_micro_batch_size_inside_user_profiler_keeps_it_running():
    from torch.profiler import ProfilerActivity, profile

    model, src = tiny_mlp(), data((32,), 1_000)
    with profile(activities=[ProfilerActivity.CPU]) as recording:
        with pytest.warns(UserWarning, match="another profiler is running"):
            size = find_micro_batch_size(model, cross_entropy, src, memory_budget=MiB)
        torch.cdist(src[0][:4], src[0][:4])  # the caller's session still records after the probe
    assert 1 <= size <= 1_000
    assert any(event.key == "aten::cdist" for event in recording.key_averages())


def test_find_micro_batch_size_model_error_surfaces_and_model_is_restored():
    model = tiny_mlp()
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        find_micro_batch_size(model, cross_entropy, data((31,), 100), memory_budget=MiB)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
