"""Octave convolution (OctConv; BigLittle-Net is its two-branch case): a conv's channels split
into a high-frequency part at full resolution and a low-frequency part at half resolution,
the four paths between them initialized from the original weight's blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def smoothness_loss(x: torch.Tensor) -> torch.Tensor:
    """Per channel of activations (N, C, H, W): the share of their energy lost by keeping them
    at half resolution (2x2 average pool, then nearest upsampling); low for smooth channels."""
    coarse = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
    lost = (x - coarse).pow(2).sum((0, 2, 3))
    total = x.pow(2).sum((0, 2, 3))
    return torch.where(total > 0, lost / total.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def octave_order(loss: torch.Tensor, low: int) -> torch.Tensor:
    """Channels in octave order: the high-frequency ones (channel order), then the ``low``
    channels that lose least at half resolution (channel order)."""
    chosen = torch.argsort(loss, stable=True)[:low]
    mask = torch.zeros(len(loss), dtype=torch.bool)
    mask[chosen] = True
    return torch.cat([(~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)])


def octave_macs(conv: nn.Conv2d, hw: tuple[int, int], low_in: int, low_out: int) -> int:
    """MACs of one sample's octave conv (the four paths; the pools and upsamplings not counted)."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    high_in, high_out = conv.in_channels - low_in, conv.out_channels - low_out
    full, half = hw[0] * hw[1], (hw[0] // 2) * (hw[1] // 2)
    return k * (high_out * high_in * full + (high_out * low_in + low_out * high_in + low_out * low_in) * half)


class OctaveConv(nn.Module):
    """The input's first ``high_in`` channels at full resolution, the rest average-pooled to
    half; four convs between the parts (high to high, low to high, high to low, low to low);
    the low output upsampled (nearest) and concatenated after the high one."""

    def __init__(self, high_in: int, hh: nn.Conv2d, lh: nn.Conv2d, hl: nn.Conv2d, ll: nn.Conv2d):
        super().__init__()
        self.high_in = high_in
        self.hh, self.lh, self.hl, self.ll = hh, lh, hl, ll

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high, low = x[:, : self.high_in], F.avg_pool2d(x[:, self.high_in :], 2)
        y_high = self.hh(high) + F.interpolate(self.lh(low), scale_factor=2.0, mode="nearest")
        y_low = self.hl(F.avg_pool2d(high, 2)) + self.ll(low)
        return torch.cat([y_high, F.interpolate(y_low, scale_factor=2.0, mode="nearest")], 1)


def half_resolution_mix(kernel: int) -> torch.Tensor:
    """(k, k) matrix A such that ``A K A^T`` is the kernel that, run at half resolution, best
    stands for kernel K at full resolution on inputs constant over 2x2 blocks: each full-res
    tap lands on the half-res tap it reads, averaged over the two parities of the position."""
    radius = kernel // 2
    mix = torch.zeros(kernel, kernel)
    for parity in (0, 1):
        for d in range(-radius, radius + 1):
            e = (parity + d) // 2
            if -radius <= e <= radius:
                mix[e + radius, d + radius] += 0.5
    return mix


def octave_conv(conv: nn.Conv2d, low_in: int, low_out: int) -> OctaveConv:
    """The octave conv standing for ``conv`` (its inputs and outputs in octave order: the low
    channels last), each path a block of the original weight; paths that run at half
    resolution take it through ``half_resolution_mix``; the bias goes to both outputs."""
    high_in, high_out = conv.in_channels - low_in, conv.out_channels - low_out
    weight = conv.weight.detach()
    mix_h, mix_w = half_resolution_mix(conv.kernel_size[0]), half_resolution_mix(conv.kernel_size[1])

    def path(rows: slice, cols: slice, bias: bool, half: bool = True) -> nn.Conv2d:
        block = weight[rows, cols]
        if half:
            block = torch.einsum("ek,oikl,fl->oief", mix_h, block, mix_w)
        new = nn.Conv2d(block.shape[1], block.shape[0], conv.kernel_size, 1, conv.padding, conv.dilation, bias=bias)
        new.weight = nn.Parameter(block.clone())
        if bias:
            new.bias = nn.Parameter(conv.bias.detach()[rows].clone())
        return new

    has_bias = conv.bias is not None
    high_o, low_o, high_i, low_i = slice(0, high_out), slice(high_out, None), slice(0, high_in), slice(high_in, None)
    return OctaveConv(
        high_in,
        path(high_o, high_i, has_bias, half=False),
        path(high_o, low_i, False),
        path(low_o, high_i, has_bias),
        path(low_o, low_i, False),
    )
