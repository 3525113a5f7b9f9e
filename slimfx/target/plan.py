"""A plan: per group the width chosen by the planner's allocator, what it is predicted to
save and its sensitivity, and the plan's predicted total priced as deployed.

The allocator (``cost_model.planner.allocate``) orders the moves by added sensitivity per
unit saved, on the candidates' savings measured alone; the total of a prefix of those moves
is not their sum (two pruned groups share layers, and int8 changes every kernel), so the
shortest prefix whose deployed total meets the budget is found by pricing the plan itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slimfx.cost_model.planner import Item, Option, allocate
from slimfx.cost_model.target import Target
from slimfx.target.candidates import Candidate, GroupCandidates

FRONT_FRACTIONS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)


@dataclass(frozen=True)
class Choice:
    """One group in a plan: the chosen candidate and the ones it was chosen among."""

    chosen: Candidate
    alternatives: tuple[Candidate, ...]

    @property
    def pruned(self) -> bool:
        return self.chosen.width < self.chosen.channels

    @property
    def price(self) -> float:
        """Sensitivity per unit saved: what giving this choice back recovers per unit lost."""
        return self.chosen.sensitivity / max(self.chosen.saved, 1e-12)


@dataclass(frozen=True)
class FrontPoint:
    """One budget of the Pareto front: the plan's additive estimate and summed sensitivity."""

    budget: float
    estimate: float
    sensitivity: float


@dataclass(frozen=True)
class Plan:
    """Per group the chosen width; the original's figure, the budget and the predicted total."""

    target: Target
    runtime: str
    quantizes: bool
    original: float
    budget: float
    predicted: float
    met: bool
    choices: tuple[Choice, ...]
    front: tuple[FrontPoint, ...] = field(default=())

    @property
    def keep(self) -> tuple[str, ...]:
        """``prune-channels:keep`` entries for the pruned groups."""
        return tuple(c.chosen.keep for c in self.choices if c.pruned)

    @property
    def sensitivity(self) -> float:
        return sum(c.chosen.sensitivity for c in self.choices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantizes": self.quantizes,
            "original": self.original,
            "budget": self.budget,
            "predicted": self.predicted,
            "met": self.met,
            "sensitivity": self.sensitivity,
            "choices": [
                {**dataclasses.asdict(c.chosen), "alternatives": [dataclasses.asdict(a) for a in c.alternatives]}
                for c in self.choices
            ],
            "front": [dataclasses.asdict(p) for p in self.front],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def widths(self) -> dict[str, int]:
        return {c.chosen.source: c.chosen.width for c in self.choices if c.pruned}


def items(table: Sequence[GroupCandidates]) -> list[Item]:
    """The allocator's items: a group's options, costing minus what they save."""
    return [Item(g.group.source, tuple(Option(-c.saved, c.sensitivity) for c in g.options)) for g in table]


def make_plan(
    table: Sequence[GroupCandidates],
    target: Target,
    runtime: str,
    quantizes: bool,
    original: float,
    base: float,
    budget: float,
    deployed_total: Callable[[Mapping[str, int]], float],
) -> Plan:
    """The plan for ``budget``; ``deployed_total(widths)`` prices a plan as deployed. ``original``
    is the original's figure, ``base`` the same with no group pruned as deployed, where the
    candidates' savings start from."""
    by_source = {g.group.source: g for g in table}

    def widths_of(chosen: Mapping[str, int]) -> dict[str, int]:
        return {s: by_source[s].options[i].width for s, i in chosen.items() if i > 0}

    allocation = allocate(items(table), budget, fixed_cost=base, measure=lambda c: deployed_total(widths_of(c)))
    choices = tuple(Choice(g.options[allocation.chosen[g.group.source]], g.options) for g in table)
    return Plan(
        target,
        runtime,
        quantizes,
        original,
        budget,
        allocation.total,
        allocation.met,
        choices,
        pareto_front(table, original, base),
    )


def pareto_front(table: Sequence[GroupCandidates], original: float, base: float) -> tuple[FrontPoint, ...]:
    """For budgets from 0.9 to 0.1 of the original: the additive estimate (the candidates'
    savings summed, on the float flavour for latency) of the plan the allocator finds, and its
    summed sensitivity. Nothing is priced or built: a quick picture of the trade."""
    points = []
    for fraction in FRONT_FRACTIONS:
        allocation = allocate(items(table), fraction * original, fixed_cost=base)
        sensitivity = sum(g.options[allocation.chosen[g.group.source]].sensitivity for g in table)
        points.append(FrontPoint(fraction * original, allocation.total, sensitivity))
    return tuple(points)


def given_back(
    plan: Plan, count: int, deployed_total: Callable[[Mapping[str, int]], float]
) -> tuple[Plan, tuple[Choice, ...]]:
    """``plan`` with its ``count`` pruned choices of the worst sensitivity per unit saved
    returned to full width (re-priced as deployed), and those choices, worst first."""
    worst = sorted((c for c in plan.choices if c.pruned), key=lambda c: c.price, reverse=True)[:count]
    returned = {c.chosen.source for c in worst}
    choices = tuple(
        Choice(c.alternatives[0], c.alternatives) if c.chosen.source in returned else c for c in plan.choices
    )
    widths = {c.chosen.source: c.chosen.width for c in choices if c.pruned}
    total = deployed_total(widths)
    return dataclasses.replace(plan, choices=choices, predicted=total, met=total <= plan.budget), tuple(worst)
