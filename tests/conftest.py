"""Shared small fixtures: tiny models and tiny data sets, all deterministic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Tests never reach a model hub: loads pass local_files_only=True, and this keeps huggingface_hub
# from even asking (set before transformers is first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The test models are tiny: a second intra-op thread only spins, and on a busy 2-core machine
# it made the suite three times slower. (Results do not depend on it: each test compares runs
# made in the same process.)
torch.set_num_threads(1)


def _mlp(in_features: int = 5, hidden: int = 8, out_features: int = 3, seed: int = 0,
         dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(in_features, hidden), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(hidden, out_features))
    return torch.nn.Sequential(*layers)


@pytest.fixture
def make_mlp():
    """A factory of tiny MLPs (5 -> 8 -> 3 by default) whose initial weights depend only on ``seed``."""
    return _mlp


@pytest.fixture
def classification() -> tuple[np.ndarray, np.ndarray]:
    """100 samples of 5 float32 features and int64 labels in 3 classes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


@pytest.fixture
def regression() -> tuple[np.ndarray, np.ndarray]:
    """37 samples (an odd number, so batches leave remainders) of 5 features and 1 float32 target."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 5)).astype(np.float32)
    y = (x @ rng.standard_normal((5, 1)) + 0.1 * rng.standard_normal((37, 1))).astype(np.float32)
    return x, y


@pytest.fixture
def assert_close():
    """Compare two state dicts (or tensors) to a relative tolerance."""

    def check(actual, expected, rtol: float = 1e-5, atol: float = 1e-7) -> None:
        if isinstance(actual, dict):
            assert actual.keys() == expected.keys()
            for key in actual:
                torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol,
                                           msg=lambda message, key=key: f"{key}: {message}")
        else:
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)

    return check


@pytest.fixture
def redis_server(tmp_path):
    """A ``redis-server`` of its own on 127.0.0.1 (a free port, a temporary folder), stopped afterwards.

    Yields its URL; skips the test where the binary or the ``redis`` client is absent.
    """
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    from redis_server import temporary_redis_server  # tests/redis_server.py

    with temporary_redis_server(tmp_path / "redis") as url:
        yield url
