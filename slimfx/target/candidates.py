"""Candidates: per channel group, the widths it may be pruned to, each with what it saves and
what it costs in fidelity, both measured with only that change applied.

The saving is the target's figure of the original minus that of the trial (predicted ms on
the runtime's float flavour, counted MACs or stored bytes); the sensitivity is the mean KL
divergence of the trial's class scores from the original's on the calibration batches (the
relative output error for outputs that are not class scores). Tables are cached per group
and width for the life of the table, so re-planning and giving back measure nothing again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from slimfx.data import Batch
from slimfx.ir.graph import Graph
from slimfx.ir.verify import run_outputs
from slimfx.metrics import output_divergence
from slimfx.passes.prune_channels import PrunableGroup, PruneChannels, PruneTrials
from slimfx.target.meter import Meter

KEEP_FRACTIONS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # the widths offered, as shares of the channels
SENSITIVITY_ROWS = 256  # calibration rows the sensitivity is measured on, at most


@dataclass(frozen=True)
class Candidate:
    """Group ``source`` pruned to ``width`` of its ``channels``, alone: what it saves (the
    target's unit) and its sensitivity (KL to the original's outputs)."""

    source: str
    width: int
    channels: int
    saved: float
    sensitivity: float

    @property
    def keep(self) -> str:
        """The ``prune-channels:keep`` entry for this choice."""
        return f"{self.source}@{self.width}"


@dataclass(frozen=True)
class GroupCandidates:
    """A group and its candidates, widest first (the first keeps every channel)."""

    group: PrunableGroup
    options: tuple[Candidate, ...]


def offered_widths(channels: int, step: int, min_channels: int = 1) -> list[int]:
    """The widths offered for a group of ``channels``: each ``KEEP_FRACTIONS`` share rounded
    to a multiple of ``step`` (the runtime's latency staircase), narrower than the group, at
    least ``min_channels``, each once, widest first."""
    widths = []
    for fraction in KEEP_FRACTIONS:
        width = max(round(channels * fraction / step) * step, step, min_channels)
        if width < channels and width not in widths:
            widths.append(width)
    return sorted(widths, reverse=True)


def sensitivity_batches(batches: Sequence[Batch], rows: int = SENSITIVITY_ROWS) -> list[Batch]:
    """The first batches holding at most ``rows`` rows (at least one batch)."""
    kept, count = [], 0
    for batch in batches:
        if kept and count + batch.rows > rows:
            break
        kept.append(batch)
        count += batch.rows
    return kept


class CandidateTable:
    """Measures and caches each group's candidates on one graph."""

    def __init__(
        self,
        graph: Graph,
        meter: Meter,
        batches: Sequence[Batch],
        step: int = 1,
        progress: Callable[[str], None] | None = None,
    ):
        self.graph, self.meter, self.step, self.progress = graph, meter, step, progress
        self.batches = sensitivity_batches(batches)
        self.reference = self._outputs(graph)
        self.original = meter.original(graph)  # the original's figure, fp32
        self.base = meter.of_float(graph)  # the same at the deployed weight width: what savings start from
        self.trials = PruneTrials(PruneChannels(), graph)
        self.groups = self.trials.groups()
        self._measured: dict[tuple[str, int], Candidate] = {}

    def build(self) -> list[GroupCandidates]:
        """Every group's candidates, measured (with progress) where not cached."""
        found = []
        total = sum(len(offered_widths(g.channels, self.step)) for g in self.groups)
        done = 0
        for group in self.groups:
            options = [Candidate(group.source, group.channels, group.channels, 0.0, 0.0)]
            for width in offered_widths(group.channels, self.step):
                done += 1
                if self.progress is not None and (group.source, width) not in self._measured:
                    self.progress(f"target: sensitivity of {group.source} at {width}/{group.channels} ({done}/{total})")
                options.append(self.candidate(group, width))
            found.append(GroupCandidates(group, tuple(options)))
        return found

    def candidate(self, group: PrunableGroup, width: int) -> Candidate:
        """``group`` pruned to ``width`` alone, measured once."""
        key = (group.source, width)
        if key not in self._measured:
            trial = self.pruned({group.source: width})
            outputs = self._outputs(trial)
            sensitivity = sum(output_divergence(r, o) for r, o in zip(self.reference, outputs)) / len(outputs)
            saved = self.base - self.meter.of_float(trial)
            self._measured[key] = Candidate(group.source, width, group.channels, saved, sensitivity)
        return self._measured[key]

    def pruned(self, widths: dict[str, int]) -> Graph:
        """A copy of the graph with each named group pruned to its width."""
        return self.trials.pruned(widths)

    def _outputs(self, graph: Graph) -> list[torch.Tensor]:
        per_batch = [run_outputs(graph.module, b.inputs) for b in self.batches]
        return [torch.cat([outs[k].float() for outs in per_batch]) for k in range(len(per_batch[0]))]
