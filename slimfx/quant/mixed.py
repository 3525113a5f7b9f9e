"""Mixed precision: per-layer weight widths that meet a budget with the least total sensitivity.

HAQ's goal (Wang et al. 2019) with a greedy, cost-model-guided search instead of RL: every
layer starts at the widest width and the planner's allocator takes the narrowing with the
least added sensitivity per unit of budget saved, until the budget holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from slimfx.cost_model.planner import Item, Option, allocate


def allocate_widths(
    sensitivity: Mapping[str, Mapping[int, float]],
    cost: Mapping[str, Mapping[int, float]],
    budget: float,
    widths: Sequence[int] = (8, 4, 2),
) -> tuple[dict[str, int], bool]:
    """Width per layer and whether the budget was met (else every layer at its narrowest).

    ``sensitivity[layer][bits]`` is the output error with only that layer at ``bits``;
    ``cost[layer][bits]`` is what the layer costs at ``bits`` (bytes, or MACs x bits).
    """
    order = sorted(widths, reverse=True)
    items = [
        Item(layer, tuple(Option(cost[layer][bits], sensitivity[layer][bits]) for bits in order))
        for layer in sensitivity
    ]
    allocation = allocate(items, budget)
    return {layer: order[index] for layer, index in allocation.chosen.items()}, allocation.met
