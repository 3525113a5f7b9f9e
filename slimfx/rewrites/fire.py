"""SqueezeNet's fire module as a rewrite: a k x k conv becomes a 1x1 squeeze to ``s`` channels
and two expands (1x1 and k x k) whose outputs concatenate to the original width.

The split is a low-rank factorization over input channels: every output keeps its k x k
kernel through the squeeze, except the outputs chosen for the 1x1 expand, which keep only
their centre tap (those whose centre holds most of their energy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def centre_share(weight: torch.Tensor) -> torch.Tensor:
    """Per output filter of a (O, C, k, k) weight: the share of its squared weights at the centre tap."""
    k = weight.shape[-1]
    centre = weight[..., k // 2, k // 2].pow(2).sum(1)
    total = weight.pow(2).flatten(1).sum(1)
    return torch.where(total > 0, centre / total.clamp_min(torch.finfo(weight.dtype).tiny), 1.0)


def fire_order(weight: torch.Tensor, ones: int) -> torch.Tensor:
    """Output channels in the fire module's order: the ``ones`` filters with the largest centre
    share (they become 1x1), then the rest, each part in channel order."""
    chosen = torch.argsort(centre_share(weight), descending=True, stable=True)[:ones]
    mask = torch.zeros(weight.shape[0], dtype=torch.bool)
    mask[chosen] = True
    return torch.cat([mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)])


@dataclass(frozen=True)
class FireSplit:
    """The weights of a fire module: squeeze (s, C, 1, 1), 1x1 expand (ones, s, 1, 1) and k x k
    expand (O - ones, s, k, k), and the relative error of the weight they stand for."""

    squeeze: torch.Tensor
    expand1: torch.Tensor
    expand3: torch.Tensor
    weight_error: float


def fire_split(weight: torch.Tensor, order: torch.Tensor, ones: int, squeeze: int) -> FireSplit:
    """Best rank-``squeeze`` split (SVD) of the reordered ``weight`` over its input channels,
    the first ``ones`` filters reduced to their centre tap."""
    out, cin, k, _ = weight.shape
    w = weight[order]
    centre = w[:ones, :, k // 2, k // 2]  # (ones, C)
    spatial = w[ones:].permute(0, 2, 3, 1).reshape(-1, cin)  # (O3*k*k, C)
    matrix = torch.cat([centre, spatial])
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    rank = min(squeeze, len(s))
    left = (u[:, :rank] * s[:rank]).to(weight.dtype)
    right = vh[:rank].to(weight.dtype)
    if rank < squeeze:  # more squeeze channels than the matrix has rank: pad with zeros
        left = torch.cat([left, left.new_zeros(len(left), squeeze - rank)], 1)
        right = torch.cat([right, right.new_zeros(squeeze - rank, cin)])
    expand1 = left[:ones].reshape(ones, squeeze, 1, 1)
    expand3 = left[ones:].reshape(out - ones, k, k, squeeze).permute(0, 3, 1, 2).contiguous()
    rebuilt = torch.zeros_like(w)
    rebuilt[:ones, :, k // 2, k // 2] = left[:ones] @ right
    rebuilt[ones:] = torch.einsum("oskl,sc->ockl", expand3, right)
    error = float((rebuilt - w).norm() / w.norm().clamp_min(torch.finfo(w.dtype).tiny))
    return FireSplit(right.reshape(squeeze, cin, 1, 1), expand1, expand3, error)


def fire_macs(conv: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int], ones: int, squeeze: int) -> int:
    """MACs of the fire module for one sample: squeeze at the input's size, expands at the output's."""
    k = conv.kernel_size[0]
    at_out = out_hw[0] * out_hw[1]
    return (
        squeeze * conv.in_channels * in_hw[0] * in_hw[1]
        + ones * squeeze * at_out
        + (conv.out_channels - ones) * squeeze * k * k * at_out
    )


class Fire(nn.Module):
    """Squeeze, then the 1x1 and k x k expands side by side, concatenated."""

    def __init__(self, squeeze: nn.Conv2d, expand1: nn.Conv2d | None, expand3: nn.Conv2d):
        super().__init__()
        self.squeeze, self.expand1, self.expand3 = squeeze, expand1, expand3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        if self.expand1 is None:
            return self.expand3(s)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


def fire_module(conv: nn.Conv2d, order: torch.Tensor, ones: int, squeeze: int) -> tuple[Fire, float]:
    """The fire module standing for ``conv`` (outputs in ``order``), and its weight error."""
    split = fire_split(conv.weight.detach(), order, ones, squeeze)
    bias = conv.bias.detach()[order] if conv.bias is not None else None
    squeeze_conv = nn.Conv2d(conv.in_channels, squeeze, 1, bias=False)
    squeeze_conv.weight = nn.Parameter(split.squeeze.clone())
    expand1 = None
    if ones:
        expand1 = nn.Conv2d(squeeze, ones, 1, stride=conv.stride, bias=bias is not None)
        expand1.weight = nn.Parameter(split.expand1.clone())
        if bias is not None:
            expand1.bias = nn.Parameter(bias[:ones].clone())
    expand3 = nn.Conv2d(
        squeeze,
        conv.out_channels - ones,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=bias is not None,
    )
    expand3.weight = nn.Parameter(split.expand3.clone())
    if bias is not None:
        expand3.bias = nn.Parameter(bias[ones:].clone())
    return Fire(squeeze_conv, expand1, expand3), split.weight_error
