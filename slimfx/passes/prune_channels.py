"""prune-channels: remove whole channels, physically, one group of coupled channels at a time.

Groups come from ``slimfx.ir.channels`` (which fails closed on anything it does not know);
scores from ``channel_importance``; how many and which channels each group loses from
``channel_selection``. The chosen channels are then cut out of every conv, linear and
BatchNorm that touches them, through ``ir.rewrite``, so the result is really smaller.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from slimfx.cost_model.counts import total_cost
from slimfx.errors import PassSpecError
from slimfx.ir.channels import (
    ChannelAnalysis,
    ChannelGroup,
    LayerChannels,
    analyze_channels,
)
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes.base import Decision, Pass, PassContext, PassResult
from slimfx.passes.channel_importance import (
    UnitScores,
    bn_scale_scores,
    collect_contributions,
    l1_scores,
    thinet_consumers,
)
from slimfx.passes.channel_selection import (
    choose_removed,
    common_partition,
    greedy_removal_order,
    kept_channels,
    least_squares_scales,
)
from slimfx.passes.registry import register

Criterion = Literal["l1", "bn-scale", "thinet"]


@dataclass
class _Plan:
    """A prunable group: its units' scores (local order) and grouped-conv rows, if any."""

    group: ChannelGroup
    scores: torch.Tensor
    rows: torch.Tensor | None
    macs_per_unit: torch.Tensor
    removed: torch.Tensor | None = None  # local positions, once chosen


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

    ratio: float = 0.5
    criterion: Criterion = "l1"
    global_: bool = False
    min_channels: int = 1
    round_to: int = 1
    target_macs: float | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise self.invalid("ratio", self.ratio, "a number in [0, 1)")
        if self.min_channels < 1:
            raise self.invalid("min-channels", self.min_channels, "an integer >= 1")
        if self.round_to < 1:
            raise self.invalid("round-to", self.round_to, "an integer >= 1")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise self.invalid("target-macs", self.target_macs, "a fraction of the original MACs in (0, 1]")

    # -- run ---------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.criterion == "thinet" and ctx.calib_data is None:
            raise PassSpecError(
                "prune-channels: criterion=thinet needs calibration data; pass calib_data=[batch, ...] "
                "to slimfx.compile (--calib on the command line), or choose criterion=l1 or bn-scale"
            )
        graph.ensure_costs()
        analysis = analyze_channels(graph)
        layer_macs = {name: _macs(graph, name) for name in analysis.layers}
        scores, contributions = self._scores(graph, analysis, ctx)
        plans, decisions = [], {}
        for group in analysis.groups:
            plan_or_reason = self._plan(group, analysis, scores, contributions, layer_macs)
            if isinstance(plan_or_reason, str):
                decisions[group.index] = _declined(group, analysis, plan_or_reason, layer_macs)
            else:
                plans.append(plan_or_reason)
        warnings = self._choose(plans, analysis, layer_macs, graph)
        removed = _removed_units(plans, analysis)
        scales = _thinet_refit(analysis, contributions, removed) if self.criterion == "thinet" else {}
        with Rewriter(graph, self.name) as rewriter:
            for layer in analysis.layers.values():
                keep_in, keep_out = ~removed[layer.in_units], ~removed[layer.out_units]
                if not (keep_in.all() and keep_out.all()):
                    module = graph.module.get_submodule(layer.target)
                    node = graph.node(layer.node)
                    rewriter.replace_module(node, sliced_layer(module, layer, keep_in, keep_out, scales.get(layer.node)))
        graph.ensure_costs()
        for plan in plans:
            decisions[plan.group.index] = self._decision(plan, analysis, layer_macs, graph, removed)
        ordered = tuple(decisions[g.index] for g in analysis.groups)
        return PassResult(changed=bool(removed.any()), decisions=ordered, warnings=tuple(warnings))

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
        return None, collect_contributions(graph, readers.values(), ctx.calib_data, ctx.seed)

    def _plan(
        self, group: ChannelGroup, analysis: ChannelAnalysis, scores: UnitScores | None,
        contributions: dict, layer_macs: dict[str, int],
    ) -> _Plan | str:
        if group.blocked:
            more = f" (and {len(group.blocked) - 1} more)" if len(group.blocked) > 1 else ""
            return f"unprunable: {group.blocked[0]}{more}"
        for pattern in self.exclude:
            hit = next((s for s in group.sources if fnmatch.fnmatchcase(s, pattern)), None)
            if hit:
                return f"excluded by pattern '{pattern}' (matches {hit})"
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
    def _choose(self, plans: list[_Plan], analysis: ChannelAnalysis, layer_macs: dict[str, int], graph: Graph) -> list[str]:
        if self.target_macs is not None:
            return self._choose_for_target(plans, analysis, layer_macs, graph)
        if self.global_:
            self._remove_by_prefix(plans, _global_order(plans, per_mac=False), round(self.ratio * _count(plans)))
        else:
            for plan in plans:
                self._remove(plan, int(self.ratio * len(plan.scores) + 1e-9))
        return []

    def _choose_for_target(
        self, plans: list[_Plan], analysis: ChannelAnalysis, layer_macs: dict[str, int], graph: Graph
    ) -> list[str]:
        total = total_cost(graph).macs
        goal = self.target_macs * total
        order = _global_order(plans, per_mac=True)

        def macs_after(prefix: int) -> int:
            self._remove_by_prefix(plans, order, prefix)
            return predicted_macs(analysis, layer_macs, total, _removed_units(plans, analysis))

        low, high = 0, len(order)
        if macs_after(high) > goal:
            best = macs_after(high)
            return [
                f"prune-channels: target-macs={self.target_macs:g} cannot be reached within min-channels="
                f"{self.min_channels} and the groups that can be pruned; best reachable is {best:,} MACs "
                f"({best / total:.3f} of the original)"
            ]
        while low < high:  # smallest prefix of the ranking that meets the goal
            mid = (low + high) // 2
            if macs_after(mid) <= goal:
                high = mid
            else:
                low = mid + 1
        macs_after(low)
        return []

    def _remove_by_prefix(self, plans: list[_Plan], order: list[tuple[int, int]], prefix: int) -> None:
        counts = [0] * len(plans)
        for plan_index, _ in order[:prefix]:
            counts[plan_index] += 1
        for plan, count in zip(plans, counts):
            self._remove(plan, count)

    def _remove(self, plan: _Plan, count: int) -> None:
        total = len(plan.scores)
        count = total - kept_channels(total, total - count, self.min_channels, self.round_to)
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
        details = _group_details(group, analysis, total, total - cut)
        details["importance"] = {
            "criterion": self.criterion,
            "removed_max": _stat(plan.scores[~kept_mask], torch.max),
            "kept_min": _stat(plan.scores[kept_mask], torch.min),
            "kept_median": _stat(plan.scores[kept_mask], torch.median),
        }
        details["macs_saved_alone"] = int(plan.macs_per_unit[plan.removed].sum()) if cut else 0
        if cut == 0:
            reason = f"keeps all {total} channels (ratio, min-channels={self.min_channels} and round-to={self.round_to})"
            return Decision(group.name, "declined", reason, before, after, details=details)
        importance = details["importance"]
        reason = (
            f"{self.criterion}: removed {cut} of {total} channels with the lowest importance "
            f"(largest removed {importance['removed_max']:.4g}, smallest kept {importance['kept_min']:.4g}"
        )
        tied = importance["kept_min"] is not None and importance["removed_max"] >= importance["kept_min"]
        reason += "; ties broken by channel order)" if tied else ")"
        if plan.rows is not None:
            reason += f", {cut // plan.rows.shape[0]} from each of {plan.rows.shape[0]} conv groups"
        return Decision(group.name, "pruned", reason, before, after, details=details)


# -- helpers -----------------------------------------------------------------------------------
def _macs(graph: Graph, node_name: str) -> int:
    cost = graph.info(graph.node(node_name)).cost
    return cost.cost.macs if cost is not None else 0


def predicted_macs(analysis: ChannelAnalysis, layer_macs: dict[str, int], total: int, removed: torch.Tensor) -> int:
    """Total MACs once ``removed`` units are gone: each layer scales with its kept in x out share."""
    saved = 0.0
    for layer in analysis.layers.values():
        keep_in = float((~removed[layer.in_units]).float().mean()) if len(layer.in_units) else 1.0
        keep_out = keep_in if layer.per_channel else float((~removed[layer.out_units]).float().mean())
        scale = keep_in if layer.per_channel else keep_in * keep_out
        saved += layer_macs[layer.node] * (1 - scale)
    return int(round(total - saved))


def _macs_per_unit(analysis: ChannelAnalysis, group: ChannelGroup, layer_macs: dict[str, int]) -> torch.Tensor:
    """MACs one unit's removal saves alone: each layer's MACs per channel, over every place it appears."""
    per_unit = torch.zeros(analysis.num_units, dtype=torch.float64)
    for layer in analysis.layers_of(group):
        macs = layer_macs[layer.node]
        sides = (layer.in_units,) if layer.per_channel else (layer.in_units, layer.out_units)
        for units in sides:
            if len(units):
                per_unit.index_add_(0, units, torch.full((len(units),), macs / len(units), dtype=torch.float64))
    return per_unit[group.units]


def _global_order(plans: list[_Plan], per_mac: bool) -> list[tuple[int, int]]:
    """(plan, position) of every unit, least important first; scores normalized per group."""
    keys, owners = [], []
    for i, plan in enumerate(plans):
        normalized = plan.scores.double() / max(float(plan.scores.double().mean()), 1e-12)
        if per_mac:
            normalized = normalized / plan.macs_per_unit.clamp_min(1.0)
        keys.append(normalized)
        owners.extend((i, p) for p in range(len(plan.scores)))
    if not keys:
        return []
    order = torch.argsort(torch.cat(keys), stable=True).tolist()
    return [owners[k] for k in order]


def _count(plans: list[_Plan]) -> int:
    return sum(len(p.scores) for p in plans)


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


def sliced_layer(
    module: nn.Module, layer: LayerChannels, keep_in: torch.Tensor, keep_out: torch.Tensor,
    in_scale: torch.Tensor | None = None,
) -> nn.Module:
    """A copy of ``module`` with only the kept channels (weights, bias, running stats sliced)."""
    new = _shallow_copy(module)
    if layer.kind == "batchnorm":
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, name)
            if value is not None:
                sliced = value.detach()[keep_in].clone()
                setattr(new, name, nn.Parameter(sliced) if isinstance(value, nn.Parameter) else sliced)
        new.num_features = int(keep_in.sum())
        return new
    weight = module.weight.detach()
    if in_scale is not None:
        weight = weight * in_scale.reshape(1, -1, *([1] * (weight.dim() - 2)))
    if layer.kind == "depthwise":
        new.weight = nn.Parameter(weight[keep_in].clone())
        new.in_channels = new.out_channels = new.groups = int(keep_in.sum())
    elif layer.kind == "linear":
        new.weight = nn.Parameter(weight[keep_out][:, keep_in].clone())
        new.in_features, new.out_features = int(keep_in.sum()), int(keep_out.sum())
    else:
        new.weight = nn.Parameter(_sliced_conv_weight(weight, layer.groups, keep_in, keep_out))
        new.in_channels, new.out_channels = int(keep_in.sum()), int(keep_out.sum())
    if module.bias is not None:
        keep_bias = keep_in if layer.kind == "depthwise" else keep_out
        new.bias = nn.Parameter(module.bias.detach()[keep_bias].clone())
    return new


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same settings whose tensors can be replaced independently."""
    new = copy.copy(module)
    new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    return new


def _sliced_conv_weight(weight: torch.Tensor, groups: int, keep_in: torch.Tensor, keep_out: torch.Tensor) -> torch.Tensor:
    """Conv weight (out, in/groups, *k) with kept channels; each group keeps its own inputs."""
    in_per_group = keep_in.reshape(groups, -1)  # (groups, in/groups)
    index = torch.stack([row.nonzero().squeeze(1) for row in in_per_group])  # equal counts per group
    out_group = torch.arange(weight.shape[0]) // (weight.shape[0] // groups)
    kept = weight[keep_out]
    gather = index[out_group[keep_out]].reshape(kept.shape[0], -1, *([1] * (weight.dim() - 2)))
    return torch.gather(kept, 1, gather.expand(-1, -1, *weight.shape[2:])).clone()


def _group_details(group: ChannelGroup, analysis: ChannelAnalysis, before: int, after: int) -> dict:
    return {
        "sources": list(group.sources),
        "members": [layer.target for layer in analysis.layers_of(group)],
        "channels_before": before,
        "channels_after": after,
    }


def _declined(group: ChannelGroup, analysis: ChannelAnalysis, reason: str, layer_macs: dict[str, int]) -> Decision:
    details = _group_details(group, analysis, len(group.units), len(group.units))
    details["blocked"] = list(group.blocked[:5])
    macs = sum(layer_macs[m.node] for m in analysis.layers_of(group))
    return Decision(group.name, "declined", reason, macs, macs, details=details)


def _stat(values: torch.Tensor, fn) -> float | None:
    return float(fn(values)) if values.numel() else None
