"""Exit heads: the small classifiers attached after a cut, and what they cost."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from slimfx.cost_model.counts import total_cost
from slimfx.ir.capture import capture

HeadKind = Literal["pool-linear", "conv-pool-linear"]


def make_head(kind: HeadKind, feature_shape: tuple[int, ...], classes: int) -> nn.Module:
    """A head for features of ``feature_shape`` (batch first): global pooling for feature
    maps (after a 1x1 conv for ``conv-pool-linear``), then a linear layer to ``classes``."""
    channels = feature_shape[1] if len(feature_shape) > 2 else feature_shape[-1]
    layers: list[nn.Module] = []
    if kind == "conv-pool-linear" and len(feature_shape) == 4:
        width = max(16, channels // 4)
        layers += [nn.Conv2d(channels, width, 1), nn.ReLU()]
        channels = width
    if len(feature_shape) > 2:
        layers += [nn.AdaptiveAvgPool2d(1) if len(feature_shape) == 4 else nn.AdaptiveAvgPool1d(1), nn.Flatten()]
    layers.append(nn.Linear(channels, classes))
    return nn.Sequential(*layers)


def head_macs(head: nn.Module, feature_shape: tuple[int, ...]) -> int:
    """MACs of ``head`` on features of ``feature_shape``, from the cost model."""
    return total_cost(capture(head, (torch.zeros(feature_shape),))).macs
