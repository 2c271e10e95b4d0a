"""Evaluation and prediction: the model in eval mode over a source, in order, without gradients."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from ..core.batch import Batch, LossFn, batch_len, forward, has_token_labels, loss_of, target_of, token_count
from ..core.precision import autocast
from ..data.batcher import Batcher
from ..data.prefetch import device_prefetch
from ..data.sources import Source
from ..distributed import DistContext
from ..errors import InputError
from .first_batch import explain_forward_error
from .guards import non_finite_data
from .metrics import Metric, MetricSums, correct_count, is_classification, is_stateful

logger = logging.getLogger("batchfit")


@dataclass
class Evaluator:
    """Evaluates ``module`` as the trainer trains it: same device, dtype, precision and loss.

    ``default_batch_size()`` gives the batch size when neither the call nor ``batch_size`` does.
    """

    module: torch.nn.Module
    loss_fn: LossFn | None
    device: torch.device
    precision: str
    default_batch_size: Callable[[], int]
    batch_size: int | None = None
    loss_count: Callable[[Batch], Any] | None = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    collective: bool = False  # a sharded model: every forward gathers weights from all ranks

    def evaluate(self, src: Source, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss over ``src`` (and accuracy for class-index targets, and user metrics)."""
        return self._told(self.sums(src, batch_size).result(), src)

    def _told(self, result: dict[str, float], src: Source) -> dict[str, float]:
        """``result``; when its loss is not finite, the data is searched (only then) and the NaN/inf named."""
        loss = result.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            batcher = Batcher(src, min(1024, len(src)), shuffle=False, seed=0)
            done = 0
            for batch, position in batcher.positioned():
                found = non_finite_data(batch, np.arange(done, position.samples_done))
                done = position.samples_done
                if found:
                    logger.warning("the evaluation loss is %s because %s", loss,
                                   found.replace("the batch's data", "the data"))
                    break
        return result

    def validate(self, src: Source, dist: DistContext) -> dict[str, float]:
        """Validation metrics, the same on every rank.

        In a distributed run each rank evaluates its share of ``src`` and one all-reduce sums the
        shares: world-size times less work than each rank evaluating everything, and the sums
        that every rank divides are the same numbers. A sharded model's forward is a collective,
        which every rank must run as often as the others: then every rank evaluates all of ``src``.
        """
        if not dist.enabled or len(src) < dist.world_size or self.collective:
            return self.evaluate(src)
        sums = self.sums(src, None, dist.rank, dist.world_size)
        sums.all_reduce(dist.all_reduce_sum)
        return self._told(sums.result(), src) if dist.is_main else sums.result()

    def sums(self, src: Source, batch_size: int | None, rank: int = 0, world_size: int = 1) -> MetricSums:
        """Loss, accuracy and metric sums over ``src`` (this rank's share of each batch)."""
        sums = MetricSums()
        sums.stateful = {name: metric for name, metric in self.metrics.items() if is_stateful(metric)}
        for metric in sums.stateful.values():
            metric.reset()
        for output, batch, n in self._outputs(src, batch_size, rank, world_size):
            loss = loss_of(output, batch, self.loss_fn)
            # The mean over tokens when the loss counts tokens, as in training.
            sums.add("loss", loss, self._count(batch, n))
            target = target_of(batch)
            if target is not None and getattr(self.loss_fn, "flatten", False):  # class indices of shape (N, 1)
                target = target.reshape(target.shape[0])
            scores = _scores(output)  # a Hugging Face classifier's .logits count too
            if scores is not None and not has_token_labels(batch) and is_classification(scores, target):
                assert target is not None
                sums.add_correct(correct_count(scores, target), n)
            for name, metric in self.metrics.items():
                if is_stateful(metric):
                    metric.update(output, target)
                else:  # typed on tensor targets; a batch without one passes None through
                    sums.add(name, metric(output, cast(torch.Tensor, target)), n)
            sums.count += n
        return sums

    def _count(self, batch: Batch, size: int) -> Any:
        """What a batch's mean loss averages over: ``loss_count``, the tokens a model's own loss counts, or samples."""
        if self.loss_count is not None:
            return self.loss_count(batch)
        tokens = token_count(self.module, batch) if self.loss_fn is None else None
        return size if tokens is None else tokens

    def predict(self, src: Source, batch_size: int | None = None, targets: bool = True) -> torch.Tensor:
        """Model outputs for every sample of ``src`` in order, concatenated on the CPU.

        Batches follow the training conventions (a tuple's last element is the target, left out
        of the model's inputs; a dict goes in as keywords), unless ``targets=False``: then every
        element of a tuple is an input. The output kept is the model's tensor, its ``logits``, or
        of a dict or tuple output the ``logits``/``predictions`` entry or the first tensor.
        """
        outputs = self._outputs(src, batch_size, targets=targets)
        return torch.cat([prediction_of(output).float().cpu() for output, _, _ in outputs])

    def _outputs(self, src: Source, batch_size: int | None, rank: int = 0, world_size: int = 1,
                 targets: bool = True) -> Iterator[tuple[Any, Batch, int]]:
        """``(output, batch, samples)`` for each non-empty batch, in eval mode and without gradients."""
        size = batch_size or self.batch_size or max(256, self.default_batch_size())
        batcher = Batcher(src, min(size * world_size, len(src)), shuffle=False, seed=0, rank=rank,
                          world_size=world_size, pin_memory=self.device.type == "cuda")
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), None)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                for batch, _ in device_prefetch(batcher.positioned(), self.device, dtype):
                    n = batch_len(batch)
                    if n == 0:  # this rank's share of a last batch smaller than the world
                        continue
                    try:
                        with autocast(self.precision, self.device.type):
                            output = forward(self.module, batch) if targets or isinstance(batch, dict) \
                                else self.module(*batch)
                    except (RuntimeError, IndexError) as error:  # the data's width against the first layer, in words
                        explained = explain_forward_error(self.module, batch, error, targets)
                        if explained is None:
                            raise
                        raise explained from error
                    yield output, batch, n
        finally:
            self.module.train(was_training)


def _scores(output: Any) -> torch.Tensor | None:
    """The output's class scores for accuracy: the output itself or its ``.logits``; ``None`` otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def prediction_of(output: Any) -> torch.Tensor:
    """The tensor of a model's output that is its prediction (see :meth:`Evaluator.predict`)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        for key in ("logits", "predictions", "prediction", "output"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        tensors = [v for k, v in output.items() if isinstance(v, torch.Tensor) and k != "loss"]
        if len(tensors) == 1:
            return tensors[0]
    if isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    raise InputError(f"predict() cannot tell which part of the model's output is its prediction. Received: "
                        f"{type(output).__name__}" + (f" with keys {sorted(output)}" if isinstance(output, Mapping)
                                                      else "") + "; return a tensor, or a dict with 'logits'")
