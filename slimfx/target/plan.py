"""A plan: per item (a channel group, a layer's quantization) the option chosen by the
planner's allocator, what it is predicted to save and its sensitivity, and the plan's
predicted total priced as deployed.

The allocator (``cost_model.planner.allocate``) orders the moves by added sensitivity per
unit saved, on the candidates' savings measured alone; the total of a prefix of those moves
is not their sum (two pruned groups share layers, a float layer between int8 ones adds
quantizers), so the shortest prefix whose deployed total meets the budget is found by pricing
the plan itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slimfx.cost_model.planner import Item, Option, allocate
from slimfx.cost_model.target import Target
from slimfx.target.candidates import Candidate, ItemCandidates, PruneCandidate, QuantCandidate
from slimfx.target.settings import FLOAT, Settings

FRONT_FRACTIONS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)

DeployedTotal = Callable[[Settings], float]


@dataclass(frozen=True)
class Choice:
    """One item in a plan: the chosen candidate and the ones it was chosen among (the first
    of them changes nothing)."""

    chosen: Candidate
    alternatives: tuple[Candidate, ...]

    @property
    def changed(self) -> bool:
        return self.chosen != self.alternatives[0]

    @property
    def price(self) -> float:
        """Sensitivity per unit saved: what giving this choice back recovers per unit lost."""
        return self.chosen.sensitivity / max(self.chosen.saved, 1e-12)

    def given_back(self) -> Choice:
        return Choice(self.alternatives[0], self.alternatives)


@dataclass(frozen=True)
class FrontPoint:
    """One budget of the Pareto front: the plan's additive estimate and summed sensitivity."""

    budget: float
    estimate: float
    sensitivity: float


def settings_of(choices: Sequence[Choice], quantizes: bool) -> Settings:
    """The passes' settings for ``choices``. On an int8 runtime without quantization choices
    (a MACs target) every layer is quantized."""
    widths = {c.chosen.item: c.chosen.width for c in choices if isinstance(c.chosen, PruneCandidate) and c.changed}
    layers = [c.chosen for c in choices if isinstance(c.chosen, QuantCandidate)]
    float_layers = tuple(q.item for q in layers if q.scheme == FLOAT)
    narrow = {q.item: q.scheme for q in layers if q.scheme not in (FLOAT, "int8")}
    quantize = quantizes and (not layers or len(float_layers) < len(layers))
    return Settings(widths, quantize, float_layers if quantize else (), narrow if quantize else {})


@dataclass(frozen=True)
class Plan:
    """Per item the chosen option; the original's figure, the budget and the predicted total."""

    target: Target
    runtime: str
    quantizes: bool  # whether the runtime runs int8
    original: float
    budget: float
    predicted: float
    met: bool
    choices: tuple[Choice, ...]
    front: tuple[FrontPoint, ...] = field(default=())
    given_back: int = 0  # choices returned to no change for accuracy since the plan was made

    @property
    def settings(self) -> Settings:
        return settings_of(self.choices, self.quantizes)

    @property
    def keep(self) -> tuple[str, ...]:
        """``prune-channels:keep`` entries for the pruned groups."""
        return self.settings.keep

    @property
    def sensitivity(self) -> float:
        return sum(c.chosen.sensitivity for c in self.choices)

    def changed_by(self, technique: str) -> tuple[Choice, ...]:
        return tuple(c for c in self.choices if c.changed and c.chosen.technique == technique)

    def to_dict(self) -> dict[str, Any]:
        def candidate(c: Candidate) -> dict[str, Any]:
            return {"technique": c.technique, "setting": c.setting, **dataclasses.asdict(c)}

        return {
            "quantizes": self.quantizes,
            "original": self.original,
            "budget": self.budget,
            "predicted": self.predicted,
            "met": self.met,
            "given_back": self.given_back,
            "sensitivity": self.sensitivity,
            "choices": [
                {**candidate(c.chosen), "alternatives": [candidate(a) for a in c.alternatives]} for c in self.choices
            ],
            "front": [dataclasses.asdict(p) for p in self.front],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def items(table: Sequence[ItemCandidates]) -> list[Item]:
    """The allocator's items: an item's options, costing minus what they save."""
    return [Item(t.key, tuple(Option(-c.saved, c.sensitivity) for c in t.options)) for t in table]


def make_plan(
    table: Sequence[ItemCandidates],
    target: Target,
    runtime: str,
    quantizes: bool,
    original: float,
    base: float,
    budget: float,
    deployed_total: DeployedTotal,
) -> Plan:
    """The plan for ``budget``; ``deployed_total(settings)`` prices a plan as deployed.
    ``original`` is the original's figure, ``base`` the unchanged float model's, where the
    candidates' savings start from."""

    def choices_of(chosen: Mapping[str, int]) -> tuple[Choice, ...]:
        return tuple(Choice(t.options[chosen[t.key]], t.options) for t in table)

    allocation = allocate(
        items(table), budget, fixed_cost=base, measure=lambda c: deployed_total(settings_of(choices_of(c), quantizes))
    )
    return Plan(
        target,
        runtime,
        quantizes,
        original,
        budget,
        allocation.total,
        allocation.met,
        choices_of(allocation.chosen),
        pareto_front(table, original, base),
    )


def pareto_front(table: Sequence[ItemCandidates], original: float, base: float) -> tuple[FrontPoint, ...]:
    """For budgets from 0.9 to 0.1 of the original: the additive estimate (the candidates'
    savings summed) of the plan the allocator finds, and its summed sensitivity. Nothing is
    priced or built: a quick picture of the trade."""
    points = []
    for fraction in FRONT_FRACTIONS:
        allocation = allocate(items(table), fraction * original, fixed_cost=base)
        sensitivity = sum(t.options[allocation.chosen[t.key]].sensitivity for t in table)
        points.append(FrontPoint(fraction * original, allocation.total, sensitivity))
    return tuple(points)


def given_back(plan: Plan, count: int, deployed_total: DeployedTotal) -> tuple[Plan, tuple[Choice, ...]]:
    """``plan`` with its ``count`` changed choices of the worst sensitivity per unit saved
    returned to no change (full width, float), re-priced as deployed, and those choices,
    worst first."""
    worst = sorted((c for c in plan.choices if c.changed), key=lambda c: c.price, reverse=True)[:count]
    choices = tuple(c.given_back() if c in worst else c for c in plan.choices)
    total = deployed_total(settings_of(choices, plan.quantizes))
    smaller = dataclasses.replace(
        plan, choices=choices, predicted=total, met=total <= plan.budget, given_back=plan.given_back + len(worst)
    )
    return smaller, tuple(worst)
