"""Mixed precision: per-layer weight widths that meet a budget with the least total sensitivity.

HAQ's goal (Wang et al. 2019) with a greedy, cost-model-guided search instead of RL: start
every layer at the widest width and repeatedly take the one-step narrowing with the least
added sensitivity per unit of budget saved, until the budget holds.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def allocate_widths(
    sensitivity: Mapping[str, Mapping[int, float]], cost: Mapping[str, Mapping[int, float]], budget: float,
    widths: Sequence[int] = (8, 4, 2),
) -> tuple[dict[str, int], bool]:
    """Width per layer and whether the budget was met (else every layer at its narrowest).

    ``sensitivity[layer][bits]`` is the output error with only that layer at ``bits``;
    ``cost[layer][bits]`` is what the layer costs at ``bits`` (bytes, or MACs x bits).
    """
    order = sorted(widths, reverse=True)
    chosen = {layer: order[0] for layer in sensitivity}
    total = sum(cost[layer][order[0]] for layer in chosen)
    while total > budget:
        best = None
        for layer, bits in chosen.items():
            step = order.index(bits) + 1
            if step == len(order):
                continue
            narrower = order[step]
            saved = cost[layer][bits] - cost[layer][narrower]
            if saved <= 0:
                continue
            price = (sensitivity[layer][narrower] - sensitivity[layer][bits]) / saved
            if best is None or price < best[0]:
                best = (price, layer, narrower, saved)
        if best is None:
            return chosen, False
        _, layer, narrower, saved = best
        chosen[layer] = narrower
        total -= saved
    return chosen, True
