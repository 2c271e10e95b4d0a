"""Recommendations updated in near real time: MovieLens-100k replayed as a stream, a matrix factorisation.

The data is MovieLens-100k as shipped inside the ``recbole`` package (``pip install --no-deps recbole``
and ``pandas``), read with pandas without importing recbole, in timestamp order. MovieLens terms:
research use; cite F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and Context",
ACM TiiS 5(4), 2015.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BatchfitError, check_positive_int, expected

ML100K_FIELDS = ("user", "item", "rating")


def movielens_100k_path() -> Path:
    """The ``ml-100k.inter`` file inside the installed ``recbole`` package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise BatchfitError("MovieLens-100k is read from the recbole package: pip install --no-deps recbole pandas")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise BatchfitError(f"the recbole package has no MovieLens-100k file at {path}")
    return path


def load_movielens_100k() -> dict[str, np.ndarray]:
    """The 100,000 ratings in timestamp order (ties in file order): ``user``, ``item`` (0-based int64),
    ``rating`` (float32, 1-5) and ``timestamp`` (int64, seconds)."""
    import pandas as pd

    frame = pd.read_csv(movielens_100k_path(), sep="\t")
    frame.columns = ["user", "item", "rating", "timestamp"]
    frame = frame.sort_values("timestamp", kind="stable")
    return {"user": frame["user"].to_numpy(np.int64) - 1, "item": frame["item"].to_numpy(np.int64) - 1,
            "rating": frame["rating"].to_numpy(np.float32), "timestamp": frame["timestamp"].to_numpy(np.int64)}


class MatrixFactorization(torch.nn.Module):
    """rating ≈ mean + user bias + item bias + <user vector, item vector> (Koren et al. 2009, biased MF).

    ``sparse=True`` makes the embedding gradients sparse (only the rows of a batch's users and items),
    for ``torch.optim.SparseAdam`` or plain SGD.
    """

    def __init__(self, users: int, items: int, dim: int = 16, mean: float = 3.5, sparse: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        check_positive_int("users", users)
        check_positive_int("items", items)
        check_positive_int("dim", dim)
        generator = torch.Generator().manual_seed(seed)
        self.user_vectors = torch.nn.Embedding(users, dim, sparse=sparse)
        self.item_vectors = torch.nn.Embedding(items, dim, sparse=sparse)
        self.user_bias = torch.nn.Embedding(users, 1, sparse=sparse)
        self.item_bias = torch.nn.Embedding(items, 1, sparse=sparse)
        with torch.no_grad():
            for table in (self.user_vectors, self.item_vectors):
                table.weight.copy_(0.01 * torch.randn(table.weight.shape, generator=generator))
            self.user_bias.weight.zero_()
            self.item_bias.weight.zero_()
        self.mean = float(mean)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of ``(user, item)`` pairs."""
        dot = (self.user_vectors(user) * self.item_vectors(item)).sum(-1)
        return self.mean + self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1) + dot


def replay(client: Any, stream: str, columns: Mapping[str, np.ndarray], fields: Sequence[str] = ML100K_FIELDS,
           rate: float | None = None, chunk: int = 100, limit: int | None = None) -> list[str]:
    """``XADD`` the rows of ``columns`` to ``stream`` in order, ``chunk`` per pipeline, at about ``rate`` events/s
    (``None``: as fast as Redis takes them); returns the stream ids."""
    if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
        raise expected("rate", "a positive number of events per second or None", rate)
    check_positive_int("chunk", chunk)
    count = len(columns[fields[0]]) if limit is None else min(limit, len(columns[fields[0]]))
    text = {f: [repr(v) for v in np.asarray(columns[f][:count]).tolist()] for f in fields}
    ids: list[str] = []
    start = time.perf_counter()
    for first in range(0, count, chunk):
        pipe = client.pipeline(transaction=False)
        for row in range(first, min(first + chunk, count)):
            pipe.xadd(stream, {f: text[f][row] for f in fields})
        ids += [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]
        if rate is not None:
            ahead = start + len(ids) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    return ids


def rmse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of predicted ratings (its prequential mean's square root is the prequential RMSE)."""
    return torch.nn.functional.mse_loss(output, target.to(output.dtype))
