"""Reach a target: plan, build, measure, correct, and give back under an accuracy bound.

1. Measure every candidate (``candidates.CandidateTable``) and plan for the budget.
2. Latency targets only: build the plan's structure (pruned, folded, quantized min-max as the
   plan says on an int8 runtime), time it, and when it misses the goal by more than
   ``CHECK_TOLERANCE``, plan again for a budget scaled by the miss, or, once checks fell on
   both sides of the goal, interpolated between them (``next_budget``; at most
   ``CORRECTIONS`` measurements; the measured plan closest to the goal is built).
3. Build the model for real through the pass manager: prune to the plan, distil when training
   data is given, fold BatchNorm, quantize the layers the plan quantizes on an int8 runtime;
   every pass verified and scored.
4. With ``max_drop``: while accuracy (labels) or top-1 agreement (none) fell by more than
   ``max_drop`` points, give back the choices (a pruned group to full width, a quantized layer
   to float) of the worst sensitivity per unit saved and build again (at most
   ``GIVE_BACK_ROUNDS`` times); each give-back is reported.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from slimfx.backends.runtimes import Workspace, get_runtime
from slimfx.cost_model.counts import ensure_costs, total_cost
from slimfx.cost_model.target import Target
from slimfx.fidelity import EvalSet, Fidelity
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import snapshot
from slimfx.passes.base import Pass, PassContext
from slimfx.passes.distill import Distill
from slimfx.passes.fold_bn import FoldBatchNorm
from slimfx.passes.manager import PassManager, PipelineResult
from slimfx.passes.prune_channels import PruneChannels
from slimfx.target.candidates import CandidateTable
from slimfx.target.meter import Meter, quantized_copy, stored_bytes
from slimfx.target.plan import Choice, Plan, given_back, make_plan
from slimfx.target.settings import Settings

LATENCY_TOLERANCE = 0.10  # a measured latency within this share of the target is on it
CHECK_TOLERANCE = LATENCY_TOLERANCE / 2  # what the latency checks aim within
CORRECTIONS = 3
GIVE_BACK_ROUNDS = 4
REPEATS = 20
SESSIONS = 3


@dataclass(frozen=True)
class Correction:
    """One latency check: the predicted budget planned for, and what the build measured."""

    budget: float  # predicted ms planned for
    predicted: float  # the plan's predicted ms
    measured: float  # the built structure's measured ms
    goal: float  # the target in measured ms


@dataclass(frozen=True)
class GiveBack:
    """Choices returned to no change (full width, float) after a build fell more than ``max_drop``."""

    drop: float  # points lost by the build before this give-back
    returned: tuple[Choice, ...]


@dataclass(frozen=True)
class TargetReport:
    """How a target was reached: the final plan, the latency corrections, the give-backs, and
    the figures: the goal and the built model's, in the measured unit (ms measured in the
    runtime, MACs counted, bytes stored), with the original's."""

    plan: Plan
    corrections: tuple[Correction, ...]
    give_backs: tuple[GiveBack, ...]
    goal: float
    measured: float
    original_measured: float
    max_drop: float | None
    drop: float | None  # points the built model lost (accuracy with labels, else agreement)
    labelled: bool = False  # whether ``drop`` is in accuracy (else top-1 agreement)

    @property
    def unit(self) -> str:
        return self.plan.target.symbol

    @property
    def on_target(self) -> bool:
        """Measured within ``LATENCY_TOLERANCE`` of the goal (latency), or within the budget."""
        if self.plan.target.unit == "latency":
            return abs(self.measured / self.goal - 1) <= LATENCY_TOLERANCE
        return self.measured <= self.goal

    @property
    def warnings(self) -> tuple[str, ...]:
        found = []
        if self.give_backs and not self.on_target:
            returned = sum(len(g.returned) for g in self.give_backs)
            found.append(
                f"target {self.plan.target} not met: {returned} choice(s) were given back to keep the loss "
                f"within max-drop {self.max_drop:g} (measured {self.measured:.4g} {self.unit}, goal {self.goal:.4g})"
            )
        elif not self.plan.met and not self.on_target:
            found.append(
                f"target {self.plan.target} cannot be reached by pruning the groups that can be pruned"
                f"{' and quantizing every layer' if self.plan.quantizes else ''}: the best reachable plan is built "
                f"(measured {self.measured:.4g} {self.unit}, goal {self.goal:.4g})"
            )
        elif not self.on_target:
            found.append(
                f"target {self.plan.target}: measured {self.measured:.4g} {self.unit} is "
                f"{self.measured / self.goal:.2f}x the goal of {self.goal:.4g} "
                f"after {len(self.corrections)} measurement(s)"
            )
        if self.max_drop is not None and self.drop is not None and self.drop > self.max_drop:
            found.append(
                f"the compiled model lost {self.drop:.2f} points, more than max-drop {self.max_drop:g}, "
                "after giving back what could be given back"
            )
        return tuple(found)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.plan.target),
            "unit": self.unit,
            "runtime": self.plan.runtime,
            "goal": self.goal,
            "measured": self.measured,
            "original": self.original_measured,
            "on_target": self.on_target,
            "max_drop": self.max_drop,
            "drop": self.drop,
            "drop_in": "accuracy" if self.labelled else "agreement",
            "plan": self.plan.to_dict(),
            "corrections": [dataclasses.asdict(c) for c in self.corrections],
            "given_back": [
                {
                    "drop": g.drop,
                    "choices": [{"technique": c.chosen.technique, "item": c.chosen.item} for c in g.returned],
                }
                for g in self.give_backs
            ],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class TargetOutcome:
    """The built graph, the pipeline's result on it, and the report."""

    graph: Graph
    run: PipelineResult
    report: TargetReport


def drop_points(fidelity: Fidelity) -> float | None:
    """Points lost against the original: accuracy with labels, else top-1 agreement."""
    if fidelity.accuracy is not None and fidelity.original_accuracy is not None:
        return 100 * (fidelity.original_accuracy - fidelity.accuracy)
    return None if fidelity.agreement is None else 100 * (1 - fidelity.agreement)


def next_budget(checks: Sequence[tuple[float, float]], goal: float) -> float:
    """The predicted budget to plan for next, from the (budget, measured ms) of the checks so
    far: between the closest checks on either side of ``goal``, the straight line's budget at
    ``goal``; with all on one side, the last budget scaled by goal over its measurement."""
    over = [c for c in checks if c[1] > goal]
    under = [c for c in checks if c[1] <= goal]
    if over and under:
        (b1, m1), (b2, m2) = min(over, key=lambda c: c[1]), max(under, key=lambda c: c[1])
        return b2 + (goal - m2) * (b1 - b2) / (m1 - m2)
    budget, measured = checks[-1]
    return budget * goal / measured


class TargetRun:
    """Reaches ``target`` from the captured ``graph`` (left untouched: every build is on a copy)."""

    def __init__(
        self,
        graph: Graph,
        target: Target,
        runtime: str | None,
        ctx: PassContext,
        evaluation: EvalSet,
        *,
        max_drop: float | None = None,
        profile: str | None = None,
        make_manager: Callable[[Sequence[Pass]], PassManager] = PassManager,
    ):
        self.graph, self.target, self.runtime, self.ctx = graph, target, runtime, ctx
        self.evaluation, self.max_drop, self.make_manager = evaluation, max_drop, make_manager
        ensure_costs(graph)
        self.meter = Meter.open(target, runtime, graph, ctx.progress, profile)
        self.original_measured = self._original_measured()
        if target.unit == "latency":
            int8_ms = (
                self._measure_ms(quantized_copy(graph, ctx, Settings(quantize=True)).module)
                if self.meter.quantizes
                else None
            )
            self.meter.anchor(graph, self.original_measured, int8_ms, ctx)
        step = max(int(self.meter.float_side.profile.channel_step), 1) if self.meter.float_side else 1
        self.table = CandidateTable(graph, self.meter, ctx, step, ctx.progress)

    def plan(self, budget: float | None = None) -> Plan:
        """The plan for ``budget`` (default: the target's, on the original's predicted figure)."""
        candidates = self.table.build()
        budget = self.target.budget(self.table.original) if budget is None else budget
        return make_plan(
            candidates,
            self.target,
            self.meter.where,
            self.meter.quantizes,
            self.table.original,
            self.table.base,
            budget,
            self._deployed_total,
        )

    def reach(self) -> TargetOutcome:
        plan = self.plan()
        original = self.original_measured
        goal = self.target.budget(original)
        corrections: list[Correction] = []
        if self.target.unit == "latency":
            plan, corrections = self._correct(plan, goal)
        graph, run = self._build(plan)
        give_backs: list[GiveBack] = []
        drop = drop_points(run.fidelity)
        while self.max_drop is not None and drop is not None and drop > self.max_drop:
            changed = sum(c.changed for c in plan.choices)
            if not changed or len(give_backs) == GIVE_BACK_ROUNDS:
                break
            count = changed if len(give_backs) == GIVE_BACK_ROUNDS - 1 else max(1, math.ceil(changed / 4))
            plan, returned = given_back(plan, count, self._deployed_total)
            give_backs.append(GiveBack(drop, returned))
            self.ctx.report_progress(f"target: {drop:.2f} points lost, giving back {len(returned)} choice(s)")
            graph, run = self._build(plan)
            drop = drop_points(run.fidelity)
        measured = self._figure(run.module, graph)
        labelled = run.fidelity.accuracy is not None
        report = TargetReport(
            plan, tuple(corrections), tuple(give_backs), goal, measured, original, self.max_drop, drop, labelled
        )
        return TargetOutcome(graph, run, report)

    # -- steps -----------------------------------------------------------------------------
    def _correct(self, plan: Plan, goal: float) -> tuple[Plan, list[Correction]]:
        """Re-plan until the measured structure is within ``CHECK_TOLERANCE`` of ``goal`` (half
        the tolerance the result is judged by: the final build's own measurement has noise too);
        the measured plan closest to the goal is kept (every plan kept was measured)."""
        corrections: list[Correction] = []
        closest: tuple[float, Plan] | None = None
        for _ in range(CORRECTIONS):
            measured = self._measure_ms(self._structure(plan).module)
            corrections.append(Correction(plan.budget, plan.predicted, measured, goal))
            miss = abs(measured / goal - 1)
            if closest is None or miss < closest[0]:
                closest = (miss, plan)
            if miss <= CHECK_TOLERANCE or (not plan.met and measured > goal):
                break
            if len(corrections) < CORRECTIONS:
                self.ctx.report_progress(f"target: measured {measured:.3f} ms against {goal:.3f} ms; planning again")
                plan = self.plan(next_budget([(c.budget, c.measured) for c in corrections], goal))
        assert closest is not None
        return closest[1], corrections

    def _passes(self, plan: Plan) -> list[Pass]:
        settings = plan.settings
        passes: list[Pass] = [PruneChannels(keep=settings.keep)] if settings.widths else []
        if self.ctx.train_data is not None:
            passes.append(Distill())
        passes.append(FoldBatchNorm())
        quantize = settings.quantize_pass()
        if quantize is not None:
            passes.append(quantize)
        return passes

    def _build(self, plan: Plan) -> tuple[Graph, PipelineResult]:
        settings = plan.settings
        floats = f", {len(settings.float_layers)} layer(s) in float" if settings.float_layers else ""
        self.ctx.report_progress(f"target: building the plan ({len(settings.widths)} group(s) pruned{floats})")
        graph = snapshot(self.graph)
        run = self.make_manager(self._passes(plan)).run(graph, self.ctx, self.evaluation)
        return graph, run

    def _structure(self, plan: Plan) -> Graph:
        """The plan's deployed structure, quickly: pruned, and folded and quantized min-max on int8."""
        settings = plan.settings
        pruned = self.table.pruned(dict(settings.widths))
        return quantized_copy(pruned, self.ctx, settings) if settings.quantize else pruned

    def _deployed_total(self, settings: Settings) -> float:
        return self.meter.of_plan(self.table.pruned(dict(settings.widths)), settings, self.ctx)

    # -- measuring -------------------------------------------------------------------------
    def _original_measured(self) -> float:
        if self.target.unit != "latency":
            return self._figure(self.graph.module, self.graph)
        flavour = get_runtime(self.runtime or "torch").float_flavour
        self.ctx.report_progress(f"target: measuring the original in {flavour}")
        return self._measure_ms(self.graph.module, flavour)

    def _figure(self, module: nn.Module, graph: Graph) -> float:
        if self.target.unit == "latency":
            return self._measure_ms(module)
        ensure_costs(graph)
        if self.target.unit == "macs":
            return float(total_cost(graph).macs)
        return stored_bytes(module)

    def _measure_ms(self, module: nn.Module, runtime: str | None = None) -> float:
        """The median over ``SESSIONS`` sessions of each one's median over ``REPEATS`` runs (one
        session's figure is steady, a new session's can differ by 15%: memory placement)."""
        name = runtime or self.runtime or "torch"
        with warnings.catch_warnings(), Workspace(self.graph.example_inputs) as workspace:
            warnings.simplefilter("ignore")  # the exporter's notes on a build only timed, not the file the user gets
            figures = [
                get_runtime(name).session(module, workspace).latency_ms(self.graph.example_inputs, REPEATS)
                for _ in range(SESSIONS)
            ]
            return statistics.median(figures)
