"""Reordering the channels of a channel group, exactly (pure functions over the channel analysis).

A rewrite that wants a layer's output channels in another order (CReLU's pairs side by side,
MixConv's channels sorted by kernel size, a grouped conv's inputs contiguous per group) cannot
reorder one layer alone: every producer of the group (the layers a residual add couples)
and every consumer must move alike. A *unit permutation* ``sigma`` (one entry per unit of the
analysis, the identity outside the group) says it: wherever a tensor held unit ``u``, it now
holds what unit ``sigma[u]`` held. Each layer then reads its weights through an index per side
(``new[p] = old[index[p]]``), which :func:`permuted_layer` applies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from slimfx.ir.channels import ChannelAnalysis, ChannelGroup, LayerChannels, LayerKind, SplitSizes


def why_not_permutable(analysis: ChannelAnalysis, group: ChannelGroup) -> str | None:
    """Why the channels of ``group`` cannot be reordered, or None when they can.

    Blocked groups (model inputs or outputs, unknown ops, parameters read as tensors), groups
    cut by literal split sizes or slice bounds, and groups read by a grouped (not depthwise)
    conv are refused: reordering would move channels across those boundaries.
    """
    if group.blocked:
        return group.blocked[0]
    units = set(group.units.tolist())
    for literal in analysis.literals:
        parts = literal.part_units if isinstance(literal, SplitSizes) else (literal.units,)
        if any(units & set(p.tolist()) for p in parts):
            return f"node '{literal.node}' splits or slices these channels at fixed positions"
    members = torch.zeros(analysis.num_units, dtype=torch.bool)
    members[group.units] = True
    for layer in analysis.layers_of(group):
        if layer.groups > 1 and not layer.per_channel:
            return f"grouped conv '{layer.target}' ({layer.groups} groups) reads or writes these channels"
        for units in (layer.in_units, layer.out_units):
            inside = units[members[units]]
            counts = torch.bincount(inside, minlength=analysis.num_units)[group.units]
            if len(inside) and int(counts.min()) != int(counts.max()):
                return f"layer '{layer.target}' reads some of these channels more often than others"
    return None


def unit_permutation(analysis: ChannelAnalysis, units: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The unit permutation that puts channel ``order[p]`` of a tensor whose channels are
    ``units`` (one layer side: a conv's outputs or inputs) at position ``p``; every other place
    those units appear follows. Raises ValueError when ``order`` is not a permutation of the
    channels or a unit appears twice among them."""
    count = len(units)
    if sorted(order.tolist()) != list(range(count)):
        raise ValueError(f"order is not a permutation of the {count} channels")
    if len(torch.unique(units)) != count:
        raise ValueError("a channel unit appears twice among these channels: they cannot be reordered alone")
    sigma = torch.arange(analysis.num_units)
    sigma[units] = units[order]
    return sigma


def side_index(units: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Index of one side of a layer under ``sigma``: position ``p`` (unit ``u``) reads the old
    position holding ``sigma[u]``; a unit spread over several positions (a flatten's features)
    maps its k-th position to the k-th position of ``sigma[u]``.

    Raises ValueError when ``sigma[u]`` appears a different number of times than ``u``.
    """
    if not len(units):
        return torch.arange(0)
    order = torch.argsort(units, stable=True)  # positions grouped by unit, in position order
    counts = torch.bincount(units, minlength=len(sigma))
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(units)) - start[units[order]]
    targets = sigma[units]
    if not torch.equal(counts[targets], counts[units]):
        raise ValueError("a unit and its image under the permutation appear a different number of times")
    return order[start[targets] + rank]


def moves(units: torch.Tensor, sigma: torch.Tensor) -> bool:
    """Whether ``sigma`` moves any of ``units``."""
    return bool((sigma[units] != units).any())


def permuted_layer(module: nn.Module, layer: LayerChannels, sigma: torch.Tensor) -> nn.Module:
    """A copy of ``module`` (conv, linear, BatchNorm, depthwise conv) reading and writing its
    channels in the order ``sigma`` gives; the same function on reordered tensors."""
    new = copy.copy(module)
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    in_index = side_index(layer.in_units, sigma)
    out_index = in_index if layer.per_channel else side_index(layer.out_units, sigma)
    if layer.kind is LayerKind.BATCHNORM:
        for name in ("weight", "bias", "running_mean", "running_var"):
            _set(new, module, name, lambda t: t[in_index])
        return new
    if layer.kind is LayerKind.DEPTHWISE:
        _set(new, module, "weight", lambda t: t[in_index])
        _set(new, module, "bias", lambda t: t[in_index])
        return new
    if layer.groups > 1:
        raise ValueError(f"{layer.target}: a grouped conv's channels cannot be reordered across its groups")
    _set(new, module, "weight", lambda t: t[out_index][:, in_index])
    _set(new, module, "bias", lambda t: t[out_index])
    return new


def _set(new: nn.Module, old: nn.Module, name: str, reorder: Callable[[torch.Tensor], torch.Tensor]) -> None:
    value = getattr(old, name, None)
    if value is None:
        return
    moved = reorder(value.detach()).clone()
    setattr(new, name, nn.Parameter(moved, value.requires_grad) if isinstance(value, nn.Parameter) else moved)
