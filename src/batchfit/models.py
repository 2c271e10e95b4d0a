"""Built-in models for the demo and for ``batchfit train`` configs: ``mlp``, ``cnn`` and ``text``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def text(**args: Any) -> nn.Module:
    """A pretrained language model loaded offline: the arguments of
    :func:`batchfit.workloads.text.load_text_model` (``name_or_path``, ``task``, ``lora_rank``, ...)."""
    from .workloads.text import load_text_model

    return load_text_model(**args)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "text": text}


class _Residual(nn.Module):
    """Two 3x3 conv-BatchNorm layers and a shortcut (a strided 1x1 conv where the shape changes)."""

    def __init__(self, width_in: int, width_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width_in, width_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width_out),
            nn.ReLU(inplace=True), nn.Conv2d(width_out, width_out, 3, padding=1, bias=False), nn.BatchNorm2d(width_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != width_out:
            self.shortcut = nn.Sequential(nn.Conv2d(width_in, width_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(width_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128),
           blocks: int = 1) -> nn.Module:
    """A small ResNet for images of any size: a 3x3 stem, stages of ``blocks`` residual blocks of
    widths ``widths`` (each stage after the first halves the resolution), global average pooling, a
    linear head. With ``widths=(64, 128, 256, 512), blocks=2`` it has the shape of ResNet-18 (He et
    al., 2016) without its 7x7 stem and max-pool, which suit only large images.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("num_classes", num_classes)
    check_positive_int("blocks", blocks)
    if not widths:
        raise expected("widths", "at least one stage width", widths)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    width = widths[0]
    for stage, out in enumerate(widths):
        check_positive_int("widths", out)
        for block in range(blocks):
            layers.append(_Residual(width, out, 2 if stage > 0 and block == 0 else 1))
            width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


BUILTIN["resnet"] = resnet
