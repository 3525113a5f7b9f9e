"""Cutting channels out of layers, and what the model then costs (pure functions over the channel analysis)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from slimfx.ir.channels import ChannelAnalysis, LayerChannels, LayerKind


def predicted_macs(analysis: ChannelAnalysis, layer_macs: dict[str, int], total: int, removed: torch.Tensor) -> int:
    """Total MACs once ``removed`` units are gone: each layer scales with its kept in x out share."""
    saved = 0.0
    for layer in analysis.layers.values():
        keep_in = float((~removed[layer.in_units]).float().mean()) if len(layer.in_units) else 1.0
        keep_out = keep_in if layer.per_channel else float((~removed[layer.out_units]).float().mean())
        scale = keep_in if layer.per_channel else keep_in * keep_out
        saved += layer_macs[layer.node] * (1 - scale)
    return int(round(total - saved))


def sliced_layer(
    module: nn.Module,
    layer: LayerChannels,
    keep_in: torch.Tensor,
    keep_out: torch.Tensor,
    in_scale: torch.Tensor | None = None,
) -> nn.Module:
    """A copy of ``module`` with only the kept channels (weights, bias, running stats sliced)."""
    new = _shallow_copy(module)
    if layer.kind is LayerKind.BATCHNORM:
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, name, None)
            if value is not None:
                sliced = value.detach()[keep_in].clone()
                setattr(new, name, nn.Parameter(sliced) if isinstance(value, nn.Parameter) else sliced)
        if isinstance(module, nn.GroupNorm):  # one channel per group (ops.is_per_channel_norm)
            new.num_channels = new.num_groups = int(keep_in.sum())
        else:
            new.num_features = int(keep_in.sum())
        return new
    weight = module.weight.detach()
    if in_scale is not None:
        weight = weight * in_scale.reshape(1, -1, *([1] * (weight.dim() - 2)))
    if layer.kind is LayerKind.DEPTHWISE:
        new.weight = nn.Parameter(weight[keep_in].clone())
        new.in_channels = new.out_channels = new.groups = int(keep_in.sum())
    elif layer.kind is LayerKind.LINEAR:
        new.weight = nn.Parameter(weight[keep_out][:, keep_in].clone())
        new.in_features, new.out_features = int(keep_in.sum()), int(keep_out.sum())
    else:
        new.weight = nn.Parameter(_sliced_conv_weight(weight, layer.groups, keep_in, keep_out))
        new.in_channels, new.out_channels = int(keep_in.sum()), int(keep_out.sum())
    if module.bias is not None:
        keep_bias = keep_in if layer.kind is LayerKind.DEPTHWISE else keep_out
        new.bias = nn.Parameter(module.bias.detach()[keep_bias].clone())
    return new


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same settings whose tensors can be replaced independently."""
    new = copy.copy(module)
    new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    return new


def _sliced_conv_weight(
    weight: torch.Tensor, groups: int, keep_in: torch.Tensor, keep_out: torch.Tensor
) -> torch.Tensor:
    """Conv weight (out, in/groups, *k) with kept channels; each group keeps its own inputs."""
    in_per_group = keep_in.reshape(groups, -1)  # (groups, in/groups)
    index = torch.stack([row.nonzero().squeeze(1) for row in in_per_group])  # equal counts per group
    out_group = torch.arange(weight.shape[0]) // (weight.shape[0] // groups)
    kept = weight[keep_out]
    gather = index[out_group[keep_out]].reshape(kept.shape[0], -1, *([1] * (weight.dim() - 2)))
    return torch.gather(kept, 1, gather.expand(-1, -1, *weight.shape[2:])).clone()
