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
        }
