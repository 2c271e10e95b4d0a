"""Built-in models for the demo and for ``batchfit train`` configs: ``mlp`` and ``cnn``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import check_positive_int, expected


def mlp(in_features: int, out_features: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0) -> nn.Module:
    """A multi-layer perceptron: Linear-ReLU blocks of widths ``hidden``, then a linear head.

    Inputs of any shape are flattened after the sample dimension.
    """
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    if not 0.0 <= dropout < 1.0:
        raise expected("dropout", "a number in [0, 1)", dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        check_positive_int("hidden", size)
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class _AddChannel(nn.Module):
    """Accept (N, H, W) images by adding a channel dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x


def cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, channels: Sequence[int] = (32, 64),
        hidden: int = 128, dropout: float = 0.25) -> nn.Module:
    """A small convolutional classifier: 3x3 conv-ReLU blocks (max-pool after each but the first), then an MLP head.

    Sized for small images such as scikit-learn's 8x8 digits; works for any ``image_size``.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("num_classes", num_classes)
    check_positive_int("image_size", image_size)
    layers: list[nn.Module] = [_AddChannel()]
    width, size = in_channels, image_size
    for index, out in enumerate(channels):
        check_positive_int("channels", out)
        layers += [nn.Conv2d(width, out, kernel_size=3, padding=1), nn.ReLU()]
        if index > 0 and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        width = out
    layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * size * size, hidden), nn.ReLU(),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}
