"""Gradient noise scale: estimators against an exact per-sample oracle, tracker, probe hygiene."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from batchfit.errors import BatchfitError
from batchfit.measure.noise import (
    NoiseScaleTracker,
    estimate_noise_scale,
    grad_sq_estimate,
    noise_fit_errors,
    noise_from_sizes,
    simple_noise_scale,
    squared_grad_norm,
    trace_cov_estimate,
)

SMALL, BIG, DRAWS = 8, 64, 200




def classification(n: int = 1000, features: int = 10, classes: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, classes, generator=generator)
    y = torch.argmax(x @ w + 1.5 * torch.randn(n, classes, generator=generator), dim=1)
    return x, y


def logistic_regression() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(10, 2)


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def exact_grad_sq_and_trace_cov(model, loss_fn, x, y) -> tuple[float, float]:
    """``|G|²`` and ``tr(Σ)`` from every per-sample gradient, the data set being the population."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_sample.values()], dim=1).double()
    mean = flat.mean(0)
    return float(mean @ mean), float(((flat - mean) ** 2).sum(1).mean())


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std() / math.sqrt(len(values)))


@pytest.fixture(params=[(logistic_regression, 2), (small_mlp, 3)], ids=["logistic", "mlp"])
def oracle(request):
    """A model, its data, the loss, and the exact ``|G|²`` and ``tr(Σ)`` over that data."""
    make_model, classes = request.param
    model = make_model()
    x, y = classification(classes=classes)
    loss_fn = torch.nn.functional.cross_entropy
    return (model, x, y, loss_fn, *exact_grad_sq_and_trace_cov(model, loss_fn, x, y))


def squared_norms_of_draws(model, loss_fn, x, y, sizes, generator) -> list[float]:
    """``|G_B|²`` of one batch drawn with replacement for each size in ``sizes``."""
    params = list(model.parameters())
    norms = []
    for size in sizes:
        index = torch.randint(len(x), (size,), generator=generator)
        norms.append(squared_grad_norm(torch.autograd.grad(loss_fn(model(x[index]), y[index]), params)))
    return norms


def test_estimate_noise_scale_matches_exact_oracle(oracle):
    model, x, y, loss_fn, true_grad_sq, true_trace_cov = oracle
    noise = estimate_noise_scale(model, loss_fn, (x, y), small_batch=SMALL, big_batch=BIG, num_batches=DRAWS)

    pairs = list(zip(noise.small_sq, noise.big_sq))
    assert noise.num_batches == DRAWS == len(pairs)
    # Each draw's estimate is unbiased: the mean over draws is within a few standard errors.
    mean, stderr = mean_and_stderr([grad_sq_estimate(s, b, SMALL, BIG) for s, b in pairs])
    assert abs(mean - true_grad_sq) < 4 * stderr
    mean, stderr = mean_and_stderr([trace_cov_estimate(s, b, SMALL, BIG) for s, b in pairs])
    assert abs(mean - true_trace_cov) < 4 * stderr
    # A ratio of averages over enough draws lands near the true noise scale.
    assert noise.b_simple == pytest.approx(true_trace_cov / true_grad_sq, rel=0.2)
    assert noise.b_simple == pytest.approx(noise.trace_cov / noise.grad_sq)


def test_estimate_noise_scale_leaves_weights_grads_and_rng_unchanged():
    model = small_mlp()
    x, y = classification(classes=3)
    model(x[:4]).sum().backward()  # gradients the probe must not disturb
    model.eval()
    weights = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    estimate_noise_scale(model, torch.nn.functional.cross_entropy, (x, y), small_batch=4, big_batch=16, num_batches=3)

    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.training


def test_estimate_noise_scale_restores_batchnorm_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    buffers = copy.deepcopy(dict(model.named_buffers()))
    x, y = classification()
    estimate_noise_scale(model, torch.nn.functional.cross_entropy, (x, y), small_batch=4, big_batch=16, num_batches=2)
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())


def test_estimate_noise_scale_is_deterministic_for_a_seed():
    model = logistic_regression()
    x, y = classification()
    loss_fn = torch.nn.functional.cross_entropy
    first = estimate_noise_scale(model, loss_fn, (x, y), small_batch=4, big_batch=16, num_batches=4, seed=3)
    again = estimate_noise_scale(model, loss_fn, (x, y), small_batch=4, big_batch=16, num_batches=4, seed=3)
    other = estimate_noise_scale(model, loss_fn, (x, y), small_batch=4, big_batch=16, num_batches=4, seed=4)
    assert first == again
    assert first != other


def test_estimate_noise_scale_micro_batches_give_same_measurement():
    model = logistic_regression()
    x, y = classification()
    loss_fn = torch.nn.functional.cross_entropy
    whole = estimate_noise_scale(model, loss_fn, (x, y), small_batch=8, big_batch=32, num_batches=3)
    split = estimate_noise_scale(model, loss_fn, (x, y), small_batch=8, big_batch=32, num_batches=3, micro_batch_size=3)
    assert split.small_sq == pytest.approx(whole.small_sq, rel=1e-5)
    assert split.big_sq == pytest.approx(whole.big_sq, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"small_batch": 0}, r"`small_batch` must be a positive integer. Received: small_batch=0"),
        ({"big_batch": 20}, r"`big_batch` must be a multiple of small_batch=8 larger than it. Received: big_batch=20"),
        ({"big_batch": 8}, r"`big_batch` must be a multiple .* Received: big_batch=8"),
        ({"num_batches": -1}, r"`num_batches` must be a positive integer. Received: num_batches=-1"),
        ({"seed": "0"}, r"`seed` must be an integer. Received: seed='0'"),
        ({"device": "tpu:7"}, r"`device` must be .* Received: device='tpu:7'"),
    ],
)
def test_estimate_noise_scale_bad_input_names_argument(kwargs, match):
    x, y = classification()
    args = {"small_batch": 8, "big_batch": 32, "num_batches": 2} | kwargs
    with pytest.raises(BatchfitError, match=match):
        estimate_noise_scale(logistic_regression(), torch.nn.functional.cross_entropy, (x, y), **args)


def test_grad_sq_and_trace_cov_estimates_invert_the_expectation():
    # E|G_B|² = |G|² + tr(Σ)/B: feed exact expectations, get the exact values back.
    grad_sq, trace_cov = 2.0, 30.0
    small_sq, big_sq = grad_sq + trace_cov / 4, grad_sq + trace_cov / 32
    assert grad_sq_estimate(small_sq, big_sq, 4, 32) == pytest.approx(grad_sq)
    assert trace_cov_estimate(small_sq, big_sq, 4, 32) == pytest.approx(trace_cov)
    assert simple_noise_scale(grad_sq, trace_cov) == pytest.approx(15.0)


def test_grad_sq_estimate_rejects_big_not_above_small():
    with pytest.raises(BatchfitError, match=r"`b_big` must be a batch size larger than b_small=8. Received: b_big=8"):
        grad_sq_estimate(1.0, 0.5, 8, 8)
    with pytest.raises(BatchfitError, match=r"`b_small` must be a positive batch size. Received: b_small=0"):
        trace_cov_estimate(1.0, 0.5, 0, 8)


def test_simple_noise_scale_non_positive_signal_is_inf():
    assert simple_noise_scale(0.0, 1.0) == math.inf
    assert simple_noise_scale(-1.0, 1.0) == math.inf


def test_squared_grad_norm_sums_over_tensors_and_skips_none():
    grads = [torch.tensor([3.0, 4.0]), None, torch.tensor([[1.0], [2.0]])]
    assert squared_grad_norm(grads) == pytest.approx(30.0)
    assert squared_grad_norm([None]) == 0.0


def test_noise_scale_tracker_constant_measurements_give_exact_b_simple():
    tracker = NoiseScaleTracker(beta=0.9)
    assert math.isnan(tracker.b_simple)
    for _ in range(5):
        tracker.update(2.0 + 30.0 / 4, 2.0 + 30.0 / 32, 4, 32)
    # Bias correction: constant inputs give the constant, not a value pulled towards 0.
    assert tracker.grad_sq == pytest.approx(2.0)
    assert tracker.trace_cov == pytest.approx(30.0)
    assert tracker.b_simple == pytest.approx(15.0)
    assert tracker.count == 5


def test_noise_scale_tracker_ignores_non_finite_measurements():
    tracker = NoiseScaleTracker()
    tracker.update(math.inf, 1.0, 4, 32)
    assert tracker.count == 0


def test_noise_scale_tracker_state_dict_resumes_exactly():
    measurements = [(9.0 + i, 3.0 + i / 2, 4, 32) for i in range(6)]
    straight = NoiseScaleTracker(beta=0.8)
    for m in measurements:
        straight.update(*m)
    first = NoiseScaleTracker(beta=0.8)
    for m in measurements[:3]:
        first.update(*m)
    resumed = NoiseScaleTracker()
    resumed.load_state_dict(first.state_dict())
    for m in measurements[3:]:
        resumed.update(*m)
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.b_simple == straight.b_simple


def test_noise_scale_tracker_stderr_and_lower_bound_equal_the_weighted_formulas():
    """The standard error of the averaged |G|², against the weights of the debiased average written out."""
    generator = torch.Generator().manual_seed(0)
    beta = 0.97
    tracker = NoiseScaleTracker(beta=beta)
    measurements = [(20.0 + 10 * float(a), 5.0 + 3 * float(b), 4, 32)
                    for a, b in torch.randn(60, 2, generator=generator)]
    for m in measurements:
        tracker.update(*m)
    g = torch.tensor([grad_sq_estimate(*m) for m in measurements], dtype=torch.float64)
    t = torch.tensor([trace_cov_estimate(*m) for m in measurements], dtype=torch.float64)
    weights = beta ** torch.arange(len(g) - 1, -1, -1, dtype=torch.float64)
    weights /= weights.sum()
    mean = float((weights * g).sum())
    stderr = math.sqrt(float((weights * (g - mean) ** 2).sum() * (weights**2).sum()))
    assert tracker.grad_sq == pytest.approx(mean)
    assert tracker.grad_sq_stderr == pytest.approx(stderr)
    assert tracker.b_simple_lower(2.0) == pytest.approx(float((weights * t).sum()) / (mean + 2 * stderr))
    assert tracker.b_simple_lower(2.0) < tracker.b_simple_lower(1.0) < tracker.b_simple
    assert tracker.b_simple_lower(0.0) == pytest.approx(tracker.b_simple)


def test_noise_scale_tracker_lower_bound_of_constant_measurements_and_of_an_older_state():
    tracker = NoiseScaleTracker(beta=0.9)
    assert math.isnan(tracker.grad_sq_stderr) and math.isnan(tracker.b_simple_lower())
    for _ in range(5):
        tracker.update(2.0 + 30.0 / 4, 2.0 + 30.0 / 32, 4, 32)
    assert tracker.grad_sq_stderr == pytest.approx(0.0, abs=1e-6)
    assert tracker.b_simple_lower() == pytest.approx(15.0)
    older = {k: v for k, v in tracker.state_dict().items() if k != "grad_sq_sq"}  # written before the squares
    resumed = NoiseScaleTracker()
    resumed.load_state_dict(older)
    assert resumed.grad_sq_stderr == pytest.approx(0.0, abs=1e-6) and resumed.b_simple == pytest.approx(15.0)
    negative = NoiseScaleTracker(beta=0.0)
    negative.update(1.0, 2.0, 4, 32)  # |G|² estimated negative: no bound
    assert math.isnan(negative.b_simple_lower())


def test_noise_scale_tracker_bad_beta_names_argument():
    with pytest.raises(BatchfitError, match=r"`beta` must be a number in \[0, 1\). Received: beta=1.0"):
        NoiseScaleTracker(beta=1.0)


def test_noise_from_sizes_two_sizes_equal_the_two_size_estimators():
    small_sq, big_sq = 3.0, 1.25
    grad_sq, trace_cov = noise_from_sizes([8, 8, 64, 64], [small_sq, small_sq, big_sq, big_sq])
    assert grad_sq == pytest.approx(grad_sq_estimate(small_sq, big_sq, 8, 64))
    assert trace_cov == pytest.approx(trace_cov_estimate(small_sq, big_sq, 8, 64))


def test_noise_from_sizes_matches_exact_oracle(oracle):
    model, x, y, loss_fn, true_grad_sq, true_trace_cov = oracle
    generator = torch.Generator().manual_seed(0)
    sizes, norms, fits = [], [], []
    for _ in range(DRAWS):
        draw_sizes = [4, 16, 64]
        draw_norms = squared_norms_of_draws(model, loss_fn, x, y, draw_sizes, generator)
        fits.append(noise_from_sizes(draw_sizes, draw_norms))
        sizes += draw_sizes
        norms += draw_norms
    # Every draw's fit is unbiased: the mean over draws is within a few standard errors of the truth.
    mean, stderr = mean_and_stderr([grad_sq for grad_sq, _ in fits])
    assert abs(mean - true_grad_sq) < 4 * stderr
    mean, stderr = mean_and_stderr([trace_cov for _, trace_cov in fits])
    assert abs(mean - true_trace_cov) < 4 * stderr
    grad_sq, trace_cov = noise_from_sizes(sizes, norms)
    assert simple_noise_scale(grad_sq, trace_cov) == pytest.approx(true_trace_cov / true_grad_sq, rel=0.2)


def test_noise_from_sizes_needs_two_sizes_and_one_norm_each():
    with pytest.raises(ValueError, match="sizes"):
        noise_from_sizes([8, 8], [1.0, 2.0])
    with pytest.raises(ValueError, match="squared_norms"):
        noise_from_sizes([8, 16], [1.0])


def test_noise_fit_errors_shrink_with_more_draws_and_cover_the_truth(oracle):
    model, x, y, loss_fn, true_grad_sq, true_trace_cov = oracle
    sizes = [4, 16, 64] * 400
    norms = squared_norms_of_draws(model, loss_fn, x, y, sizes, torch.Generator().manual_seed(1))
    few = noise_fit_errors(sizes[:60], norms[:60])
    many = noise_fit_errors(sizes, norms)
    assert many[0] < few[0] and many[1] < few[1]
    grad_sq, trace_cov = noise_from_sizes(sizes, norms)
    assert abs(grad_sq - true_grad_sq) < 4 * many[0]
    assert abs(trace_cov - true_trace_cov) < 4 * many[1]
    assert noise_fit_errors([4, 16], [2.0, 1.0]) == (math.inf, math.inf)  # two points: no scatter to judge by
