"""MixConv (MixNet): a depthwise conv whose channels each take the smallest kernel that holds
their weight energy, and the layer that runs those channel groups side by side."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def outer_energy(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per output channel of a square-kernel weight (C, 1, k, k): the share of its squared
    weights outside the central ``kernel`` x ``kernel`` window (0 for an all-zero channel)."""
    k = weight.shape[-1]
    crop = (k - kernel) // 2
    ring = torch.ones(k, k, dtype=torch.bool)
    ring[crop : k - crop, crop : k - crop] = False
    squares = weight.pow(2)
    outer = (squares * ring).flatten(1).sum(1)  # summed apart, so an all-zero ring is exactly 0
    total = squares.flatten(1).sum(1)
    return torch.where(total > 0, outer / total.clamp_min(torch.finfo(weight.dtype).tiny), 0.0)


def kernel_per_channel(weight: torch.Tensor, kernels: Sequence[int], energy: float) -> torch.Tensor:
    """The kernel size each channel of a depthwise weight (C, 1, k, k) takes: the smallest of
    ``kernels`` (of k's parity, at most k; k itself always allowed) whose cropped-away ring
    holds at most ``energy`` of the channel's squared weights."""
    k = weight.shape[-1]
    allowed = sorted({s for s in kernels if s <= k and s % 2 == k % 2} | {k})
    chosen = torch.full((weight.shape[0],), k, dtype=torch.long)
    for size in reversed(allowed[:-1]):  # larger first, so the smallest that fits wins
        chosen = torch.where(outer_energy(weight, size) <= energy, torch.tensor(size), chosen)
    return chosen


def cropped_depthwise(conv: nn.Conv2d, channels: torch.Tensor, kernel: int) -> nn.Conv2d:
    """A depthwise conv over ``channels`` of ``conv`` with their weights' central ``kernel`` x
    ``kernel`` window; padding shrinks with the kernel so the output keeps its size."""
    k, dilation = conv.kernel_size[0], conv.dilation[0]
    crop = (k - kernel) // 2
    new = nn.Conv2d(
        len(channels),
        len(channels),
        kernel,
        stride=conv.stride,
        padding=conv.padding[0] - dilation * crop,
        dilation=conv.dilation,
        groups=len(channels),
        bias=conv.bias is not None,
    )
    weight = conv.weight.detach()[channels][..., crop : k - crop, crop : k - crop]
    new.weight = nn.Parameter(weight.clone())
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias.detach()[channels].clone())
    return new


class MixedDepthwise(nn.Module):
    """Channel groups, in order, each through its own depthwise conv; outputs concatenated."""

    def __init__(self, sizes: Sequence[int], convs: Sequence[nn.Conv2d]):
        super().__init__()
        self.sizes = list(sizes)
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.sizes, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1)
