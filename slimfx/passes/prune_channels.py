"""prune-channels: remove whole channels, physically, one group of coupled channels at a time.

Groups come from ``slimfx.ir.channels`` (which fails closed on anything it does not know);
scores from ``prune.importance``; how many and which channels each group loses from
``prune.selection`` and, for a global ratio or a MAC target, from the planner's allocator
(``cost_model.planner``). The chosen channels are then cut out of every conv, linear and
BatchNorm that touches them (``prune.slicing``), through ``ir.rewrite``, so the result is
really smaller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from slimfx.backends.profiler import ProfiledRuntime
from slimfx.cost_model.counts import ensure_costs, total_cost
from slimfx.cost_model.latency import LatencyPrediction, PredictedRuntime
from slimfx.cost_model.planner import Item, Option, allocate
from slimfx.cost_model.target import Target, parse_target
from slimfx.details import Details
from slimfx.errors import InvalidArgumentError, PassError
from slimfx.ir.channels import ChannelAnalysis, ChannelGroup, LiteralArgument, analyze_channels
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter, snapshot
from slimfx.ir.shapes import trial_run
from slimfx.passes.base import Action, DataNeed, Decision, Pass, PassContext, PassResult
from slimfx.passes.candidates import excluding_pattern
from slimfx.passes.registry import register
from slimfx.prune.importance import (
    UnitScores,
    bn_scale_scores,
    collect_contributions,
    l1_scores,
    thinet_consumers,
)
from slimfx.prune.selection import (
    choose_removed,
    common_partition,
    greedy_removal_order,
    kept_channels,
    least_squares_scales,
)
from slimfx.prune.slicing import predicted_macs, sliced_layer

Criterion = Literal["l1", "bn-scale", "thinet"]


@dataclass(frozen=True)
class ImportanceStats(Details):
    """Scores around the cut: the largest removed, the smallest and median kept."""

    criterion: str
    removed_max: float | None
    kept_min: float | None
    kept_median: float | None


@dataclass(frozen=True)
class PruneDetails(Details):
    """A group of coupled channels: where its channels come from, the layers it touches,
    channels before and after, and (pruned or kept) the importance around the cut, or
    (declined) what blocks it."""

    sources: tuple[str, ...]
    members: tuple[str, ...]
    channels_before: int
    channels_after: int
    importance: ImportanceStats | None = None
    macs_saved_alone: int | None = None
    blocked: tuple[str, ...] | None = None

    def channels(self) -> tuple[int, int]:
        return self.channels_before, self.channels_after


@dataclass
class _Plan:
    """A prunable group: its units' scores (local order) and grouped-conv rows, if any."""

    group: ChannelGroup
    scores: torch.Tensor
    rows: torch.Tensor | None
    macs_per_unit: torch.Tensor
    removed: torch.Tensor | None = None  # local positions, once chosen

    @property
    def channels(self) -> int:
        return len(self.scores)

    def keep(self, width: int) -> None:
        """Remove all but ``width`` channels, the least important first."""
        self.removed = choose_removed(self.scores, self.channels - width, self.rows)


@dataclass(frozen=True)
class PrunableGroup:
    """A group this configuration may prune: its first source layer (the ``keep`` key), the
    group's name in reports, and how many channels it has."""

    source: str
    name: str
    channels: int


@register
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Structured channel pruning by BatchNorm scale, filter L1 norm or ThiNet.

    ``ratio`` removes that share of each group's channels; ``global=true`` ranks channels
    across groups (scores normalized by each group's mean) and removes the lowest ``ratio``
    of all; ``target-macs=F`` removes channels, least important per MAC saved first, until the
    model's MACs are at most F times the original (it overrides ``ratio``). Every group keeps
    at least ``min-channels`` channels, a multiple of ``round-to``. ``exclude`` takes module
    name patterns (``layer4.*``): groups whose channels those layers create are left alone.
    """

    name = "prune-channels"
    exact = False
    summary = "remove whole channels physically (bn-scale, l1 or thinet importance)"
    option_help = {
        "ratio": "share of each group's channels to remove, in [0, 1)",
        "criterion": "l1 (filter L1 norm), bn-scale (|gamma|) or thinet (needs calibration data)",
        "global_": "rank channels across groups and remove the lowest ratio of all",
        "min_channels": "every group keeps at least this many channels",
        "round_to": "kept widths are multiples of this; auto: the runtime's channel step (its latency staircase)",
        "target_macs": "remove channels until the model's MACs are at most this fraction (overrides ratio)",
        "target_latency": "remove channels until the predicted latency is at most this fraction of the original's, "
        "or N ms (overrides ratio)",
        "runtime": "the runtime target-latency and round-to=auto predict on (this machine's device profile)",
        "exclude": "module-path patterns (fnmatch: layer4.*) whose groups are left alone",
        "keep": "the width each named group keeps, by its first source layer (conv1@32,layer1.0.conv1@16; "
        "what the target planner chooses); groups not named keep theirs; overrides ratio and targets",
    }

    ratio: float = 0.5
    criterion: Criterion = "l1"
    global_: bool = False
    min_channels: int = 1
    round_to: int | Literal["auto"] = 1
    target_macs: float | None = None
    target_latency: str | None = None
    runtime: PredictedRuntime = "torch"
    exclude: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for entry in self.keep:
            source, at, width = entry.rpartition("@")
            if not at or not source or not width.isdigit() or int(width) < 1:
                raise self.invalid("keep", entry, "SOURCE@WIDTH: a group's first source layer, the channels it keeps")
        if not 0 <= self.ratio < 1:
            raise self.invalid("ratio", self.ratio, "a number in [0, 1)")
        if self.min_channels < 1:
            raise self.invalid("min-channels", self.min_channels, "an integer >= 1")
        if self.round_to != "auto" and self.round_to < 1:
            raise self.invalid("round-to", self.round_to, "an integer >= 1, or auto")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise self.invalid("target-macs", self.target_macs, "a fraction of the original MACs in (0, 1]")
        if self.target_latency is not None:
            parse_latency_target(self.target_latency, self.invalid)
            if self.target_macs is not None:
                raise self.invalid("target-latency", self.target_latency, "one target: target-macs or target-latency")

    @property
    def predicts_latency(self) -> bool:
        return self.target_latency is not None or self.round_to == "auto"

    # -- run ---------------------------------------------------------------------------------
    def data_need(self) -> DataNeed:
        return DataNeed.CALIBRATION if self.criterion == "thinet" else DataNeed.NONE

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ensure_costs(graph)
        analysis = analyze_channels(graph)
        layer_macs = {name: _macs(graph, name) for name in analysis.layers}
        timer = _LatencyTimer.for_graph(graph, self.runtime, ctx) if self.predicts_latency else None
        step = timer.channel_step if timer is not None and self.round_to == "auto" else self.round_to
        scores, contributions = self._scores(graph, analysis, ctx)
        plans, decisions = [], {}
        for group in analysis.groups:
            plan_or_reason = self._plan(group, analysis, scores, contributions, layer_macs)
            if isinstance(plan_or_reason, str):
                decisions[group.index] = _declined(group, analysis, plan_or_reason, layer_macs)
            else:
                plans.append(plan_or_reason)
        summary: list[Decision] = []
        if self.keep:
            warnings = self._keep_widths(plans, analysis, decisions)
        elif self.target_latency is not None and timer is not None:
            warnings, summary = self._choose_for_latency(plans, analysis, graph, contributions, timer, int(step))
        else:
            warnings = self._choose(plans, analysis, layer_macs, graph, int(step))
        plans, broken = self._runnable(graph, analysis, plans, contributions)
        for plan, why in broken:
            decisions[plan.group.index] = _declined(plan.group, analysis, why, layer_macs)
        removed = _removed_units(plans, analysis)
        modules, arguments = _edits(graph, analysis, removed, contributions, self.criterion)
        with Rewriter(graph, self.name) as rewriter:
            for layer_node, module in modules.items():
                rewriter.replace_module(graph.node(layer_node), module)
            for literal, value in arguments:
                rewriter.set_argument(graph.node(literal.node), literal.position, literal.keyword, value)
        ensure_costs(graph)
        for plan in plans:
            decisions[plan.group.index] = self._decision(plan, analysis, layer_macs, graph, removed)
        ordered = tuple(decisions[g.index] for g in analysis.groups) + tuple(summary)
        if broken:
            warnings.append(
                f"prune-channels: {len(broken)} group(s) left unpruned because the pruned graph would not run"
            )
        return PassResult(changed=bool(removed.any()), decisions=ordered, warnings=tuple(warnings))

    def prunable_groups(self, graph: Graph, ctx: PassContext | None = None) -> list[PrunableGroup]:
        """The groups this configuration may prune (the others are declined by ``run``, with why)."""
        return PruneTrials(self, graph, ctx).groups()

    def _runnable(
        self, graph: Graph, analysis: ChannelAnalysis, plans: list[_Plan], contributions: dict
    ) -> tuple[list[_Plan], list[tuple[_Plan, str]]]:
        """The plans whose pruned graph runs, and those that would break it, with why.

        The channel analysis should never plan a graph that fails; if it does (a bug), the
        groups that break it alone are declined, then all of them if the rest still fail."""

        def failure(subset: list[_Plan]) -> str | None:
            removed = _removed_units(subset, analysis)
            modules, arguments = _edits(graph, analysis, removed, contributions, self.criterion)
            paths = {str(graph.node(name).target): module for name, module in modules.items()}
            return trial_run(
                graph, paths, {lit.node: _with_argument(graph.node(lit.node), lit, v) for lit, v in arguments}
            )

        pruned = [plan for plan in plans if len(plan.removed)]
        if failure(pruned) is None:
            return plans, []
        broken = [(plan, why) for plan in pruned if (why := failure([plan])) is not None]
        rest = [plan for plan in pruned if all(plan is not b for b, _ in broken)]
        why = failure(rest)
        if why is not None:
            broken += [(plan, why) for plan in rest]
        runnable = [plan for plan in plans if all(plan is not b for b, _ in broken)]
        note = "the pruned graph would not run ({}); a slimfx bug, please report it"
        return runnable, [(plan, note.format(why)) for plan, why in broken]

    # -- scoring -----------------------------------------------------------------------------
    def _scores(self, graph: Graph, analysis: ChannelAnalysis, ctx: PassContext) -> tuple[UnitScores | None, dict]:
        if self.criterion == "bn-scale":
            return bn_scale_scores(graph, analysis), {}
        if self.criterion == "l1":
            return l1_scores(graph, analysis), {}
        readers = {}
        for group in analysis.groups:
            consumers = thinet_consumers(analysis, group.units)
            if not group.blocked and not isinstance(consumers, str):
                readers.update({layer.node: layer for layer in consumers})
        ctx.report_progress(f"prune-channels: ThiNet calibration over {len(readers)} layers")
        return None, collect_contributions(
            graph, readers.values(), ctx.batches(f"{self.name}: criterion=thinet"), ctx.seed
        )

    def _plan(
        self,
        group: ChannelGroup,
        analysis: ChannelAnalysis,
        scores: UnitScores | None,
        contributions: dict,
        layer_macs: dict[str, int],
    ) -> _Plan | str:
        if group.blocked:
            more = f" (and {len(group.blocked) - 1} more)" if len(group.blocked) > 1 else ""
            return f"unprunable: {group.blocked[0]}{more}"
        for source in group.sources:
            pattern = excluding_pattern(source, self.exclude)
            if pattern is not None:
                return f"excluded by pattern '{pattern}' (matches {source})"
        rows = common_partition(group.units, group.partitions)
        if isinstance(rows, str):
            return rows
        if self.criterion == "thinet":
            local = _thinet_scores(analysis, group, contributions)
            if isinstance(local, str):
                return f"thinet: {local}"
        else:
            if not scores.has_score[group.units].all():
                what = "BatchNorm normalizes" if self.criterion == "bn-scale" else "conv or linear creates"
                hint = "; use criterion=l1" if self.criterion == "bn-scale" else ""
                return f"{self.criterion}: no {what} some of these channels{hint}"
            local = scores.values[group.units].float()
        return _Plan(group, local, rows, _macs_per_unit(analysis, group, layer_macs))

    # -- how many and which ------------------------------------------------------------------
    def _choose(
        self, plans: list[_Plan], analysis: ChannelAnalysis, layer_macs: dict[str, int], graph: Graph, step: int
    ) -> list[str]:
        if self.target_macs is not None:
            return self._choose_for_target(plans, analysis, layer_macs, graph, step)
        if self.global_:  # the lowest normalized scores of all groups: a budget of units to keep
            items = [_unit_item(i, plan, saved=None) for i, plan in enumerate(plans)]
            units = sum(len(plan.scores) for plan in plans)
            allocation = allocate(items, units - round(self.ratio * units))
            self._apply(plans, items, allocation.chosen, step)
        else:
            for plan in plans:
                self._remove(plan, int(self.ratio * len(plan.scores) + 1e-9), step)
        return []

    def _choose_for_latency(
        self,
        plans: list[_Plan],
        analysis: ChannelAnalysis,
        graph: Graph,
        contributions: dict,
        timer: _LatencyTimer,
        step: int,
    ) -> tuple[list[str], list[Decision]]:
        """Least important per predicted millisecond saved first, until the latency predicted
        for the pruned graph (built on a copy, priced from the layers' width sweeps) is within
        the target."""
        before = timer.original.total_ms
        budget = parse_latency_target(self.target_latency or "", self.invalid).budget(before)
        layer_ms = timer.layer_ms(analysis)
        items = [_unit_item(i, plan, saved=_per_unit(analysis, plan.group, layer_ms)) for i, plan in enumerate(plans)]

        def predicted(chosen: dict[str, int]) -> float:
            self._apply(plans, items, chosen, step)
            removed = _removed_units(plans, analysis)
            return timer.predict_pruned(graph, *_edits(graph, analysis, removed, contributions, self.criterion))

        allocation = allocate(items, budget, measure=predicted)
        self._apply(plans, items, allocation.chosen, step)
        reason = (
            f"predicted on {self.runtime} ({timer.where}): {before:.3f} ms -> {allocation.total:.3f} ms "
            f"({allocation.total / before:.3f} of the original), target {budget:.3f} ms"
        )
        summary = [Decision("(predicted latency)", Action.SUMMARY, reason)]
        if allocation.met:
            return [], summary
        return [
            f"prune-channels: target-latency={self.target_latency} cannot be reached within min-channels="
            f"{self.min_channels} and the groups that can be pruned; best predicted is {allocation.total:.3f} ms "
            f"({allocation.total / before:.3f} of the original)"
        ], summary

    def _choose_for_target(
        self, plans: list[_Plan], analysis: ChannelAnalysis, layer_macs: dict[str, int], graph: Graph, step: int
    ) -> list[str]:
        """Least important per MAC saved first, until the model's MACs (predicted from the kept
        channels of every layer) are within the target."""
        total = total_cost(graph).macs
        items = [_unit_item(i, plan, saved=plan.macs_per_unit.clamp_min(1.0)) for i, plan in enumerate(plans)]

        def measured(chosen: dict[str, int]) -> float:
            self._apply(plans, items, chosen, step)
            return predicted_macs(analysis, layer_macs, total, _removed_units(plans, analysis))

        allocation = allocate(items, self.target_macs * total, measure=measured)
        self._apply(plans, items, allocation.chosen, step)
        if allocation.met:
            return []
        best = int(allocation.total)
        return [
            f"prune-channels: target-macs={self.target_macs:g} cannot be reached within min-channels="
            f"{self.min_channels} and the groups that can be pruned; best reachable is {best:,} MACs "
            f"({best / total:.3f} of the original)"
        ]

    def _keep_widths(self, plans: list[_Plan], analysis: ChannelAnalysis, decisions: dict[int, Decision]) -> list[str]:
        """Each named group keeps the width ``keep`` gives it (least important channels out first)."""
        widths = {source: int(width) for source, _, width in (e.rpartition("@") for e in self.keep)}
        by_source = {plan.group.sources[0]: plan for plan in plans if plan.group.sources}
        unknown = [s for s in widths if s not in by_source]
        if unknown:
            declined = {g.sources[0]: d.reason for g in analysis.groups if g.sources and (d := decisions.get(g.index))}
            why = "; ".join(f"{s}: {declined[s]}" if s in declined else f"{s}: no group starts there" for s in unknown)
            raise PassError(f"prune-channels: keep names groups it cannot prune ({why})")
        for source, width in widths.items():
            if width > by_source[source].channels:
                raise PassError(
                    f"prune-channels: keep={source}@{width}, but the group has {by_source[source].channels} channels"
                )
        for plan in plans:
            plan.keep(widths.get(plan.group.sources[0], plan.channels) if plan.group.sources else plan.channels)
        return []

    def _apply(self, plans: list[_Plan], items: list[Item], chosen: dict[str, int], step: int) -> None:
        """Remove, from each plan, as many channels as its item's chosen option says."""
        for plan, item in zip(plans, items):
            self._remove(plan, chosen[item.name], step)

    def _remove(self, plan: _Plan, count: int, step: int) -> None:
        total = len(plan.scores)
        count = total - kept_channels(total, total - count, self.min_channels, step)
        plan.removed = choose_removed(plan.scores, count, plan.rows)

    # -- report ------------------------------------------------------------------------------
    def _decision(
        self, plan: _Plan, analysis: ChannelAnalysis, layer_macs: dict[str, int], graph: Graph, removed: torch.Tensor
    ) -> Decision:
        group, total, cut = plan.group, len(plan.scores), len(plan.removed)
        members = analysis.layers_of(group)
        before = sum(layer_macs[m.node] for m in members)
        after = sum(_macs(graph, m.node) for m in members)
        kept_mask = torch.ones(total, dtype=torch.bool)
        kept_mask[plan.removed] = False
        importance = ImportanceStats(
            self.criterion,
            _stat(plan.scores[~kept_mask], torch.max),
            _stat(plan.scores[kept_mask], torch.min),
            _stat(plan.scores[kept_mask], torch.median),
        )
        details = PruneDetails(
            group.sources,
            tuple(m.target for m in members),
            total,
            total - cut,
            importance,
            int(plan.macs_per_unit[plan.removed].sum()) if cut else 0,
        )
        if cut == 0:
            reason = f"keeps all {total} channels (ratio or target, min-channels={self.min_channels} and round-to)"
            return Decision(group.name, Action.DECLINED, reason, before, after, details=details)
        per = " per predicted ms saved" if self.target_latency is not None else ""
        reason = (
            f"{self.criterion}: removed {cut} of {total} channels with the lowest importance{per} "
            f"(largest removed {importance.removed_max:.4g}, smallest kept {importance.kept_min:.4g}"
        )
        tied = importance.kept_min is not None and importance.removed_max >= importance.kept_min
        reason += "; ties broken by channel order)" if tied else ")"
        if plan.rows is not None:
            reason += f", {cut // plan.rows.shape[0]} from each of {plan.rows.shape[0]} conv groups"
        return Decision(group.name, Action.PRUNED, reason, before, after, details=details)


# -- helpers -----------------------------------------------------------------------------------
def _macs(graph: Graph, node_name: str) -> int:
    cost = graph.info(graph.node(node_name)).cost
    return cost.cost.macs if cost is not None else 0


def _macs_per_unit(analysis: ChannelAnalysis, group: ChannelGroup, layer_macs: dict[str, int]) -> torch.Tensor:
    """MACs one unit's removal saves alone: each layer's MACs per channel, over every place it appears."""
    return _per_unit(analysis, group, {name: float(macs) for name, macs in layer_macs.items()})


def _per_unit(analysis: ChannelAnalysis, group: ChannelGroup, layer_cost: dict[str, float]) -> torch.Tensor:
    """What one unit's removal saves alone of a per-layer cost (MACs, predicted ms): each
    layer's cost per channel, over every place the unit appears."""
    per_unit = torch.zeros(analysis.num_units, dtype=torch.float64)
    for layer in analysis.layers_of(group):
        macs = layer_cost.get(layer.node, 0.0)
        sides = (layer.in_units,) if layer.per_channel else (layer.in_units, layer.out_units)
        for units in sides:
            if len(units):
                per_unit.index_add_(0, units, torch.full((len(units),), macs / len(units), dtype=torch.float64))
    return per_unit[group.units]


def _unit_item(index: int, plan: _Plan, saved: torch.Tensor | None) -> Item:
    """A group as an allocator item: option k removes its k least important units.

    Scores are normalized by the group's mean so that groups compare; with ``saved`` (per
    unit: the MACs or predicted ms its removal saves alone), each unit's price is its
    normalized score over what it saves, and the item's cost is in that unit; without, in
    units. Units are taken in order of that price, so every step costs more than the one before.
    """
    normalized = plan.scores.double() / max(float(plan.scores.double().mean()), 1e-12)
    saved = torch.ones(len(plan.scores), dtype=torch.float64) if saved is None else saved.double().clamp_min(1e-12)
    order = torch.argsort(normalized / saved, stable=True)
    cost = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(saved[order], 0)])
    penalty = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(normalized[order], 0)])
    top = float(cost[-1])
    return Item(str(index), tuple(Option(top - float(c), float(p)) for c, p in zip(cost, penalty)))


def _edits(
    graph: Graph, analysis: ChannelAnalysis, removed: torch.Tensor, contributions: dict, criterion: str
) -> tuple[dict[str, torch.nn.Module], list[tuple[LiteralArgument, Any]]]:
    """What removing ``removed`` units changes: each touched layer's sliced module (by node
    name) and each literal argument's new value (split sizes, slice bounds)."""
    scales = _thinet_refit(analysis, contributions, removed) if criterion == "thinet" else {}
    modules = {}
    for layer in analysis.layers.values():
        keep_in, keep_out = ~removed[layer.in_units], ~removed[layer.out_units]
        if not (keep_in.all() and keep_out.all()):
            module = graph.module.get_submodule(layer.target)
            modules[layer.node] = sliced_layer(module, layer, keep_in, keep_out, scales.get(layer.node))
    literals = [(lit, new) for lit in analysis.literals if (new := lit.argument_after(removed)) is not None]
    return modules, literals


def _with_argument(node: torch.fx.Node, literal: LiteralArgument, value: Any) -> tuple[tuple, dict]:
    """``node``'s (args, kwargs) with the literal argument replaced by ``value``."""
    if len(node.args) > literal.position:
        args = list(node.args)
        args[literal.position] = value
        return tuple(args), dict(node.kwargs)
    return tuple(node.args), {**node.kwargs, literal.keyword: value}


def _removed_units(plans: list[_Plan], analysis: ChannelAnalysis) -> torch.Tensor:
    removed = torch.zeros(analysis.num_units, dtype=torch.bool)
    for plan in plans:
        removed[plan.group.units[plan.removed]] = True
    return removed


def _thinet_scores(analysis: ChannelAnalysis, group: ChannelGroup, contributions: dict) -> torch.Tensor | str:
    """Scores from ThiNet's greedy order: the first channel it would remove scores lowest."""
    consumers = thinet_consumers(analysis, group.units)
    if isinstance(consumers, str):
        return consumers
    position = torch.full((analysis.num_units,), -1, dtype=torch.long)
    position[group.units] = torch.arange(len(group.units))
    blocks = []
    for layer in consumers:
        if layer.node not in contributions:
            return f"{layer.target} never ran on the calibration data"
        x, _ = contributions[layer.node]
        local = position[layer.in_units]
        mine = local >= 0
        block = torch.zeros(len(x), len(group.units), dtype=x.dtype)
        block.index_add_(1, local[mine], x[:, mine])
        blocks.append(block)
    order = greedy_removal_order(torch.cat(blocks), len(group.units))
    scores = torch.empty(len(group.units))
    scores[order] = torch.arange(1, len(order) + 1, dtype=torch.float32)
    return scores


def _thinet_refit(analysis: ChannelAnalysis, contributions: dict, removed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per next layer, least-squares scales for its kept input channels (ThiNet's last step)."""
    scales = {}
    for name, (x, y) in contributions.items():
        keep = ~removed[analysis.layers[name].in_units]
        if keep.all() or not keep.any():
            continue
        scale = torch.ones(len(keep))
        scale[keep] = least_squares_scales(x[:, keep], y)
        scales[name] = scale
    return scales


def _declined(group: ChannelGroup, analysis: ChannelAnalysis, reason: str, layer_macs: dict[str, int]) -> Decision:
    members = analysis.layers_of(group)
    details = PruneDetails(
        group.sources,
        tuple(m.target for m in members),
        len(group.units),
        len(group.units),
        blocked=tuple(group.blocked[:5]),
    )
    macs = sum(layer_macs[m.node] for m in members)
    return Decision(group.name, Action.DECLINED, reason, macs, macs, details=details)


def _stat(values: torch.Tensor, fn) -> float | None:
    return float(fn(values)) if values.numel() else None


# -- latency targets ---------------------------------------------------------------------------
def parse_latency_target(text: str, invalid: Any) -> Target:
    """A latency target from its spec text (``0.5`` or ``8ms``); ``invalid(option, value, expected)``
    builds the error."""
    try:
        return parse_target(f"latency={text}")
    except InvalidArgumentError:
        raise invalid(
            "target-latency", text, "a fraction of the original's predicted latency in (0, 1], or N ms (8ms)"
        ) from None


@dataclass
class _LatencyTimer:
    """The original graph's prediction on one runtime, and the means to predict pruned copies."""

    profiled: ProfiledRuntime
    original: LatencyPrediction
    where: str

    @staticmethod
    def for_graph(graph: Graph, runtime: str, ctx: PassContext) -> _LatencyTimer:
        """Measure what the cached device profile lacks for ``graph`` (with width sweeps) and predict it."""
        profiled = ProfiledRuntime.open(runtime, progress=ctx.progress)
        profiled.fill(graph, sweep=True, progress=ctx.progress)
        where = f"batch {graph.example_inputs[0].shape[0] if graph.example_inputs else 1}, {profiled.threads} threads"
        return _LatencyTimer(profiled, profiled.predict(graph), where)

    @property
    def channel_step(self) -> int:
        return max(int(self.profiled.profile.channel_step), 1)

    def layer_ms(self, analysis: ChannelAnalysis) -> dict[str, float]:
        """Predicted ms per analysed layer: each kernel's time on the first of its nodes that is an
        analysed layer (a conv with its fused BatchNorm and ReLU: all on the conv)."""
        found: dict[str, float] = {}
        for kernel in self.original.kernels:
            owner = next((name for name in kernel.kernel.nodes if name in analysis.layers), None)
            if owner is not None:
                found[owner] = found.get(owner, 0.0) + kernel.ms
        return found

    def predict_pruned(self, graph: Graph, modules: dict, arguments: list) -> float:
        """The predicted ms of ``graph`` with these edits, on a copy (nothing new is measured)."""
        return self.profiled.predict(_edited_copy(graph, modules, arguments)).total_ms


def _edited_copy(graph: Graph, modules: dict, arguments: list) -> Graph:
    """A copy of ``graph`` with pruned layers and literal arguments put in, costs counted."""
    trial = snapshot(graph)
    with Rewriter(trial, "prune-channels (trial)") as rewriter:
        for layer_node, module in modules.items():
            rewriter.replace_module(trial.node(layer_node), module)
        for literal, value in arguments:
            rewriter.set_argument(trial.node(literal.node), literal.position, literal.keyword, value)
    ensure_costs(trial)
    return trial


class PruneTrials:
    """Pruned copies of one graph at chosen widths per group, for planners that try many: the
    channel analysis and the importance scores are made once (``run`` makes them each time)."""

    def __init__(self, config: PruneChannels, graph: Graph, ctx: PassContext | None = None):
        ensure_costs(graph)
        self.config, self.graph = config, graph
        self.analysis = analyze_channels(graph)
        layer_macs = {name: _macs(graph, name) for name in self.analysis.layers}
        scores, self.contributions = config._scores(graph, self.analysis, ctx or PassContext())
        self.plans: dict[str, _Plan] = {}
        for group in self.analysis.groups:
            plan = config._plan(group, self.analysis, scores, self.contributions, layer_macs)
            if not isinstance(plan, str) and group.sources:
                self.plans[group.sources[0]] = plan

    def groups(self) -> list[PrunableGroup]:
        """The groups the configuration may prune."""
        return [PrunableGroup(source, p.group.name, p.channels) for source, p in self.plans.items()]

    def pruned(self, widths: Mapping[str, int]) -> Graph:
        """A copy of the graph with each named group cut to its width (least important out first)."""
        for source, plan in self.plans.items():
            plan.keep(widths.get(source, plan.channels))
        removed = _removed_units(list(self.plans.values()), self.analysis)
        modules, arguments = _edits(self.graph, self.analysis, removed, self.contributions, self.config.criterion)
        return _edited_copy(self.graph, modules, arguments)
