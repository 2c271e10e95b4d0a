"""The in-memory data path and the training-step overhead against hand-written baselines.

Reference workload (DESIGN.md): 200,000 x 64 float32 samples, 10 classes, shuffled, batch 256.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F

from ..data.batcher import Batcher
from ..data.sources import ArraySource
from ..train.trainer import Trainer
from .common import Row, interleaved, ratio_row


def reference_data(num_samples: int, features: int = 64, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random float32 features and integer labels of the reference workload."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, features, generator=generator)
    y = torch.randint(0, classes, (num_samples,), generator=generator)
    return x, y


def data_path_rows(num_samples: int = 200_000, batch_size: int = 256, repeats: int = 5,
                   dataloader_batches: int = 200) -> list[Row]:
    """Batches from memory: batchfit vs DataLoader(TensorDataset) and a hand-written gather."""
    x, y = reference_data(num_samples)
    batcher = Batcher(ArraySource(x, y), batch_size=batch_size, shuffle=True, seed=0)

    def batchfit_epoch() -> int:
        count = 0
        for xb, _ in cast("Iterable[tuple[torch.Tensor, torch.Tensor]]", batcher):  # ArraySource(x, y): pairs
            count += xb.shape[0]
        return count

    x_buffer = torch.empty(batch_size, x.shape[1])
    y_buffer = torch.empty(batch_size, dtype=y.dtype)

    def hand_gather() -> int:
        order = torch.randperm(num_samples)
        count = 0
        for start in range(0, num_samples, batch_size):
            index = order[start : start + batch_size]
            n = index.shape[0]
            torch.index_select(x, 0, index, out=x_buffer[:n])
            torch.index_select(y, 0, index, out=y_buffer[:n])
            count += n
        return count

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)

    def dataloader_part() -> int:
        # A part of an epoch: the DataLoader fetches sample by sample, so a full epoch is slow.
        count = 0
        for i, (xb, _) in enumerate(loader):
            count += xb.shape[0]
            if i + 1 == dataloader_batches:
                break
        return count

    rates = interleaved({"batchfit Batcher": batchfit_epoch, "hand-written index_select": hand_gather,
                         "DataLoader(TensorDataset)": dataloader_part}, repeats)
    return [
        ratio_row("batchfit Batcher", "DataLoader(TensorDataset)", rates, ">=50"),
        ratio_row("batchfit Batcher", "hand-written index_select", rates, ">=0.8"),
    ]


def mlp(seed: int = 0) -> torch.nn.Module:
    """The reference MLP 64-256-256-10."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


def step_overhead_rows(batch_sizes: tuple[int, ...] = (32, 256), num_samples: int = 50_000,
                       repeats: int = 5) -> list[Row]:
    """Trainer.fit (progress bar on) vs a hand-written loop: randperm + indexing + SGD."""
    x, y = reference_data(num_samples)
    rows = []
    for batch_size in batch_sizes:
        hand_model, fit_model = mlp(), mlp()
        hand_opt = torch.optim.SGD(hand_model.parameters(), lr=0.01)
        fit_opt = torch.optim.SGD(fit_model.parameters(), lr=0.01)
        trainer = Trainer(fit_model, F.cross_entropy, fit_opt, batch_size=batch_size, device="cpu",
                          progress=True, seed=0)

        def hand_epoch(model: torch.nn.Module = hand_model, opt: torch.optim.Optimizer = hand_opt,
                       batch: int = batch_size) -> int:
            order = torch.randperm(num_samples)
            for start in range(0, num_samples, batch):
                index = order[start : start + batch]
                loss = F.cross_entropy(model(x[index]), y[index])
                opt.zero_grad()
                loss.backward()
                opt.step()
            return num_samples

        def fit_epoch(trainer: Trainer = trainer) -> int:
            # The bar is drawn (formatted and written) as usual, into a sink instead of the terminal.
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                trainer.fit((x, y), epochs=1)
            return num_samples

        hand_epoch(), fit_epoch()  # warm-up: first-call allocations and lazy imports
        rates = interleaved({f"Trainer.fit, batch {batch_size}": fit_epoch,
                             f"hand-written loop, batch {batch_size}": hand_epoch}, repeats)
        rows.append(ratio_row(f"Trainer.fit, batch {batch_size}", f"hand-written loop, batch {batch_size}",
                              rates, ">=0.97"))
    return rows
