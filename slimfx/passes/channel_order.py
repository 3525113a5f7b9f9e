"""Reordering a channel group in a graph: the one way structure rewrites move channels.

``rewrites.permute`` gives the math (a unit permutation, each layer's indices); this applies
it through the pass's ``Rewriter``, to every conv, linear, BatchNorm and depthwise layer
the permutation moves.
"""

from __future__ import annotations

import torch

from slimfx.ir.channels import ChannelAnalysis, ChannelGroup, LayerChannels
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.rewrites.permute import moves, permuted_layer, why_not_permutable


def group_of_outputs(analysis: ChannelAnalysis, layer: LayerChannels) -> ChannelGroup | None:
    """The channel group ``layer``'s output channels belong to (None for a layer without outputs)."""
    if not len(layer.out_units):
        return None
    index = int(analysis.unit_group[layer.out_units[0]])
    return next((g for g in analysis.groups if g.index == index), None)


def why_not_reorder(graph: Graph, analysis: ChannelAnalysis, group: ChannelGroup | None) -> str | None:
    """Why ``group``'s channels cannot be reordered in ``graph``, or None: the analysis's
    reasons, and a member layer whose module also runs elsewhere."""
    if group is None:
        return "its channels belong to no channel group"
    why = why_not_permutable(analysis, group)
    if why is not None:
        return f"its channels cannot be reordered: {why}"
    calls = graph.module_calls()
    for layer in analysis.layers_of(group):
        if calls.get(layer.target, 0) > 1:
            return f"its channels cannot be reordered: module '{layer.target}' runs at several nodes"
    return None


def reorder_channels(
    rewriter: Rewriter,
    graph: Graph,
    analysis: ChannelAnalysis,
    sigma: torch.Tensor,
) -> tuple[str, ...]:
    """Reorder every layer that ``sigma`` moves; returns the module paths reordered."""
    moved = []
    for layer in analysis.layers.values():
        if not (moves(layer.in_units, sigma) or moves(layer.out_units, sigma)):
            continue
        node = graph.node(layer.node)
        rewriter.replace_module(node, permuted_layer(graph.submodule(node), layer, sigma))
        moved.append(layer.target)
    return tuple(moved)
