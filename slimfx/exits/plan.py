"""The early-exit plan: where the model is cut, the heads, their thresholds and what to expect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from slimfx.details import Details


@dataclass(frozen=True)
class ExitStat(Details):
    """One exit as measured on held-out calibration rows (also the ``details`` of its decision)."""

    exit: int  # 1-based
    node: str
    threshold: float
    share: float  # of held-out rows that leave here
    head_macs_per_sample: int
    macs_to_exit_per_sample: float
    agreement_of_exit: float | None  # of the rows that leave here; None when none do


@dataclass(frozen=True)
class ExitLatency(Details):
    """Predicted latency of one batch: the full model's, and the expected one when rows leave at
    the exits' held-out shares (each stage predicted at the rows that reach it)."""

    runtime: str
    batch: int
    full_ms: float
    expected_ms: float
    stage_rows: tuple[int, ...]  # rows each stage runs on: the batch, then what is left after each exit

    @property
    def speedup(self) -> float | None:
        return self.full_ms / self.expected_ms if self.expected_ms > 0 else None


def expected_stage_rows(batch: int, shares: list[float]) -> tuple[int, ...]:
    """Rows each stage runs on when ``shares`` of the rows leave at the exits before it (at
    least one row, the batch at most)."""
    rows, left = [batch], 1.0
    for share in shares:
        left -= share
        rows.append(max(1, min(batch, round(batch * max(left, 0.0)))))
    return tuple(rows)


@dataclass(frozen=True)
class ExitPlan:
    """What the runtime needs (cut nodes, heads, thresholds) and what the report shows."""

    cuts: tuple[str, ...]
    heads: nn.ModuleList
    thresholds: tuple[float, ...]
    stats: tuple[ExitStat, ...]
    final_share: float  # held-out rows answered by the full model
    final_macs_per_sample: float  # what a row answered by the full model costs (every head included)
    full_macs_per_sample: float
    expected_macs_per_sample: float
    agreement: float
    losses: tuple[float, ...] = ()
    latency: ExitLatency | None = None  # with add-exits:runtime=R: predicted, at the rows each stage sees

    @property
    def head_macs_per_sample(self) -> int:
        return sum(s.head_macs_per_sample for s in self.stats)

    @property
    def expected_mac_speedup(self) -> float | None:
        return self.full_macs_per_sample / self.expected_macs_per_sample if self.expected_macs_per_sample else None

    def to_dict(self) -> dict[str, Any]:
        final = {"exit": "full model", "share": self.final_share, "macs_to_exit_per_sample": self.final_macs_per_sample}
        return {
            "exits": [s.to_dict() for s in self.stats] + [final],
            "full_macs_per_sample": self.full_macs_per_sample,
            "expected_macs_per_sample": self.expected_macs_per_sample,
            "expected_mac_speedup": self.expected_mac_speedup,
            "agreement": self.agreement,
            "training_losses": list(self.losses),
            "latency": None
            if self.latency is None
            else {**self.latency.to_dict(), "expected_latency_speedup": self.latency.speedup},
        }
