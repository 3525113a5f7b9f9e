"""Pure functions that decide how many channels a group loses and which ones."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def kept_channels(total: int, keep: int, min_keep: int = 1, round_to: int = 1) -> int:
    """``keep`` raised to at least ``min_keep`` and to a multiple of ``round_to`` (never above ``total``)."""
    keep = max(keep, min(min_keep, total), 1 if total else 0)
    if round_to > 1 and total >= round_to:
        keep = math.ceil(keep / round_to) * round_to
    return min(keep, total)


def removal_count(total: int, ratio: float, min_keep: int = 1, round_to: int = 1) -> int:
    """How many of ``total`` channels a ``ratio`` removes, after the floor and rounding rules."""
    removed = math.floor(ratio * total + 1e-9)
    return total - kept_channels(total, total - removed, min_keep, round_to)


def common_partition(units: torch.Tensor, partitions: Sequence[torch.Tensor]) -> torch.Tensor | str | None:
    """The (G, m) matrix of positions in ``units`` that grouped convs impose, or why there is none.

    Every row must lose the same number of channels. Returns None without constraints and a
    reason string when the constraints cannot all hold at once.
    """
    if not partitions:
        return None
    position = {int(u): i for i, u in enumerate(units.tolist())}
    local = []
    for matrix in partitions:
        if any(int(u) not in position for u in matrix.reshape(-1).tolist()):
            return "a grouped conv reads these channels together with channels of another group"
        local.append(torch.tensor([[position[int(u)] for u in row] for row in matrix.tolist()]))
    first = local[0]
    if first.numel() != len(units) or len(torch.unique(first)) != len(units):
        return "a grouped conv covers only part of these channels"
    for other in local[1:]:
        if other.shape != first.shape or not torch.equal(torch.sort(other, 1).values, torch.sort(first, 1).values):
            return "grouped convs split these channels into different groups"
    return first


def choose_removed(scores: torch.Tensor, count: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``count`` lowest ``scores``; with ``rows``, the same number from each row."""
    if rows is None:
        return torch.argsort(scores, stable=True)[:count]
    per_row = min(count // rows.shape[0], rows.shape[1] - 1)
    if per_row <= 0:
        return torch.zeros(0, dtype=torch.long)
    picks = [row[torch.argsort(scores[row], stable=True)[:per_row]] for row in rows]
    return torch.sort(torch.cat(picks)).values


def greedy_removal_order(contributions: torch.Tensor, count: int) -> torch.Tensor:
    """ThiNet's greedy choice: channels whose removal least changes the next layer's output.

    ``contributions`` is (samples, channels): each channel's additive share of a sampled output
    value. Step by step, the channel that keeps ``||sum of removed contributions||^2`` smallest
    joins the removed set; returns the first ``count`` channels in the order they were chosen.
    """
    gram = contributions.T.double() @ contributions.double()
    accumulated = torch.zeros(gram.shape[0], dtype=torch.float64)
    available = torch.ones(gram.shape[0], dtype=torch.bool)
    order = []
    for _ in range(min(count, gram.shape[0])):
        # ||r + x_c||^2 - ||r||^2 = 2 r.x_c + x_c.x_c, with r.x_c accumulated from the Gram matrix
        cost = 2 * accumulated + torch.diagonal(gram)
        cost[~available] = math.inf
        chosen = int(torch.argmin(cost))
        order.append(chosen)
        available[chosen] = False
        accumulated += gram[chosen]
    return torch.tensor(order, dtype=torch.long)


def least_squares_scales(kept: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-channel scales ``w`` minimizing ``||target - kept @ w||^2`` (ThiNet's refit)."""
    solution = torch.linalg.lstsq(kept.double(), target.double().unsqueeze(1)).solution
    return solution.squeeze(1).to(kept.dtype)
