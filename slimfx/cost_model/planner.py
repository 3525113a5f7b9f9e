"""The one budget allocator: per item (a layer, a channel group) one option, least penalty for the budget.

A multiple-choice knapsack solved greedily. Every item starts at its first option (no
change); the allocator repeatedly takes the move, on any item, to a cheaper option with the
least added penalty per unit of cost saved, until the total cost is within the budget.
Pruning (channels removed per group), factorization (ranks per layer) and mixed precision
(bits per layer) all spend their budgets here; they differ only in the options they offer.

With ``finish=True``, once some single move reaches the budget, the one of those with the
least added penalty is taken instead (a big cheap cut need not be followed by needless
small ones). With ``measure``, the true total is not the sum of option costs (pruning: a
layer's MACs scale with its kept inputs times its kept outputs, two groups' choices): the
greedy order is computed on the additive costs, then the shortest prefix of it whose
measured total meets the budget is taken.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Option:
    """One way to treat an item: what the item then costs and the penalty it then incurs."""

    cost: float
    penalty: float


@dataclass(frozen=True)
class Item:
    """Something the budget is spent on; ``options[0]`` is its starting state."""

    name: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Allocation:
    """The chosen option index per item, the total cost it gives, and whether the budget holds."""

    chosen: Mapping[str, int]
    total: float
    met: bool


Measure = Callable[[Mapping[str, int]], float]


def allocate(
    items: Sequence[Item],
    budget: float,
    *,
    fixed_cost: float = 0.0,
    finish: bool = False,
    measure: Measure | None = None,
) -> Allocation:
    """Choose one option per item so that the total cost is at most ``budget``.

    ``fixed_cost`` is what the parts that no item covers cost. When the budget cannot be met,
    every item ends at its cheapest reachable option and ``met`` is False.
    """
    by_name = {item.name: item for item in items}
    chosen = {item.name: 0 for item in items}
    total = fixed_cost + sum(item.options[0].cost for item in items)
    moves: list[tuple[str, int]] = []
    tables = {
        item.name: (
            torch.tensor([o.cost for o in item.options], dtype=torch.float64),
            torch.tensor([o.penalty for o in item.options], dtype=torch.float64),
        )
        for item in items
    }
    heap = [entry for i, item in enumerate(items) if (entry := _best_move(item, 0, i, tables)) is not None]
    heapq.heapify(heap)
    order = {item.name: i for i, item in enumerate(items)}
    while heap and (measure is not None or total > budget):
        if finish and measure is None:
            finishing = _finishing_move(items, chosen, total - budget)
            if finishing is not None:
                name, target = finishing
                total -= by_name[name].options[chosen[name]].cost - by_name[name].options[target].cost
                chosen[name] = target
                break
        _, _, _, name, target = heapq.heappop(heap)
        item = by_name[name]
        total -= item.options[chosen[name]].cost - item.options[target].cost
        chosen[name] = target
        moves.append((name, target))
        entry = _best_move(item, target, order[name], tables)
        if entry is not None:
            heapq.heappush(heap, entry)
    if measure is None:
        return Allocation(chosen, total, total <= budget + 1e-9)
    return _shortest_prefix(items, moves, budget, measure)


def _best_move(
    item: Item, current: int, position: int, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, int, int, str, int] | None:
    """The cheapest-per-unit move of ``item`` from option ``current`` as a heap entry (price,
    item position, option index, ...), or None when no option is cheaper."""
    costs, penalties = tables[item.name]
    saved = costs[current] - costs[current + 1 :]
    if not bool((saved > 0).any()):
        return None
    price = (penalties[current + 1 :] - penalties[current]) / saved.clamp_min(1e-300)
    price = torch.where(saved > 0, price, torch.full_like(price, math.inf))
    index = current + 1 + int(torch.argmin(price))  # first of equal prices: the mildest option
    return (float(price[index - current - 1]), position, index, item.name, index)


def _finishing_move(items: Sequence[Item], chosen: Mapping[str, int], gap: float) -> tuple[str, int] | None:
    """Of the single moves that close ``gap`` alone, the one with the least added penalty."""
    best: tuple[float, str, int] | None = None
    for item in items:
        now = item.options[chosen[item.name]]
        for index in range(chosen[item.name] + 1, len(item.options)):
            option = item.options[index]
            if now.cost - option.cost >= gap and now.cost > option.cost:
                added = option.penalty - now.penalty
                if best is None or added < best[0]:
                    best = (added, item.name, index)
    return None if best is None else (best[1], best[2])


def _shortest_prefix(
    items: Sequence[Item], moves: list[tuple[str, int]], budget: float, measure: Measure
) -> Allocation:
    """The shortest prefix of the greedy ``moves`` whose measured total is within the budget."""

    def state(prefix: int) -> dict[str, int]:
        chosen = {item.name: 0 for item in items}
        for name, target in moves[:prefix]:
            chosen[name] = target
        return chosen

    low, high = 0, len(moves)
    everything = measure(state(high))
    if everything > budget:
        return Allocation(state(high), everything, False)
    while low < high:  # measured totals fall as the prefix grows
        middle = (low + high) // 2
        if measure(state(middle)) <= budget:
            high = middle
        else:
            low = middle + 1
    chosen = state(low)
    return Allocation(chosen, measure(chosen), True)
