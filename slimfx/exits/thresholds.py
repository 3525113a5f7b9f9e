"""Entropy thresholds per exit: the math that decides which rows may leave early (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax of each row of ``logits``."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def choose_thresholds(
    entropies: Sequence[torch.Tensor], correct: Sequence[torch.Tensor], final_correct: torch.Tensor, required: float
) -> list[float]:
    """Greedy, first exit first: the highest entropy threshold per exit that keeps at least
    ``required`` rows correct overall (rows not yet answered count with the full model's result).
    """
    rows = len(final_correct)
    remaining = torch.ones(rows, dtype=torch.bool)
    settled = 0  # correct answers among rows that already left
    thresholds = []
    for entropy, right in zip(entropies, correct):
        candidates = remaining.nonzero().squeeze(1)
        order = candidates[torch.argsort(entropy[candidates], stable=True)]
        sorted_entropy = entropy[order]
        gained = torch.cumsum(right[order].long(), 0)
        lost = torch.cumsum(final_correct[order].long(), 0)
        base = settled + int(final_correct[order].sum())
        best = 0
        for m in range(len(order), 0, -1):
            tie_boundary = m == len(order) or sorted_entropy[m - 1] < sorted_entropy[m]
            if tie_boundary and base + int(gained[m - 1]) - int(lost[m - 1]) >= required - 1e-9:
                best = m
                break
        if best == 0:
            thresholds.append(-math.inf)
            continue
        thresholds.append(float(sorted_entropy[best - 1]))
        settled += int(gained[best - 1])
        remaining[order[:best]] = False
    return thresholds
