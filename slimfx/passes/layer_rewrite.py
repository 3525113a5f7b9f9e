"""The shape every structure rewrite shares, in three steps over a graph's candidate layers.

1. **Plan** each layer from its own weights (``LayerRewrite.plan``): a ``RewritePlan`` saying
   in which order its replacement writes the layer's output channels (and, for a grouped
   conv, reads its inputs), or a declined decision. Each order becomes a unit permutation of
   that side's channel group; one plan per group, the first in graph order: a later plan
   whose group is taken or cannot be reordered gets ``without_reorder``, and a plan can ask
   (``RewriteRun.side_free``, ``current_index``) how a side stands before choosing.
2. **Reorder**: all permutations are applied at once to every layer they move, the planned
   layers included (their channels then come in the planned order).
3. **Build** each replacement from its layer's reordered module (``LayerRewrite.build``),
   so layers rewritten side by side never read channels in a stale order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.counts import ensure_costs
from slimfx.ir.channels import ChannelAnalysis, ChannelGroup, analyze_channels
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes.base import Action, Decision, Pass, PassContext, PassResult
from slimfx.passes.candidates import layer_candidates
from slimfx.passes.channel_order import reorder_channels, why_not_reorder
from slimfx.rewrites.permute import moves, side_index, unit_permutation

Side = Literal["out", "in"]


@dataclass(frozen=True)
class RewritePlan:
    """A layer's planned rewrite: ``order[p]`` is the original output channel its replacement
    writes at position ``p``, ``input_order[p]`` the input channel it reads there (None: that
    side's order is kept). Passes add what building needs."""

    order: torch.Tensor | None
    input_order: torch.Tensor | None = field(default=None, kw_only=True)


@dataclass
class RewriteRun:
    """One run of a rewrite pass: the graph, its channel analysis (from before any change),
    the rewriter, the context, the groups already given an order and the permutation so far."""

    graph: Graph
    analysis: ChannelAnalysis
    rewriter: Rewriter
    ctx: PassContext
    taken: set[int] = field(default_factory=set)
    sigma: torch.Tensor = field(default_factory=lambda: torch.arange(0))
    prepared: Any = None  # what the pass's ``prepare`` measured for its plans

    def __post_init__(self) -> None:
        self.sigma = torch.arange(self.analysis.num_units)

    def macs(self, node: fx.Node) -> int:
        return self.graph.info(node).cost.cost.macs

    def in_shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.graph.info(node.args[0]).out_shape)

    def declined(self, node: fx.Node, why: str) -> Decision:
        macs = self.macs(node)
        return Decision(str(node.target), Action.DECLINED, why, macs, macs)

    def units(self, node: fx.Node, side: Side) -> torch.Tensor:
        layer = self.analysis.layers[node.name]
        return layer.out_units if side == "out" else layer.in_units

    def side_free(self, node: fx.Node, side: Side) -> str | None:
        """Why layer ``node``'s channels on ``side`` cannot be given a new order, or None."""
        units = self.units(node, side)
        if not len(units):
            return "it has no channels there"
        groups = torch.unique(self.analysis.unit_group[units]).tolist()
        if len(groups) != 1:
            return "they come from several channel groups"
        group = self.group(groups[0])
        why = why_not_reorder(self.graph, self.analysis, group)
        if why is None and group.index in self.taken:
            why = "its channels are already reordered for another layer of this pass"
        if why is None and len(torch.unique(units)) != len(units):
            why = "a channel appears twice among them"
        return why

    def current_index(self, node: fx.Node, side: Side) -> torch.Tensor:
        """Which of the layer's original channels on ``side`` each position will hold, given
        the orders planned so far."""
        return side_index(self.units(node, side), self.sigma)

    def claim(self, node: fx.Node, side: Side, order: torch.Tensor) -> torch.Tensor:
        """Give ``side`` of layer ``node`` the planned order; returns that side's permutation."""
        units = self.units(node, side)
        self.taken.add(int(self.analysis.unit_group[units[0]]))
        sigma = unit_permutation(self.analysis, units, order)
        identity = torch.arange(self.analysis.num_units)
        self.sigma = torch.where(sigma != identity, sigma, self.sigma)  # groups are disjoint
        return sigma

    def group(self, index: int) -> ChannelGroup | None:
        return next((g for g in self.analysis.groups if g.index == index), None)


class LayerRewrite(Pass):
    """A pass that rewrites layers of ``layer_types`` (those it ``considers``; all by default)
    after the shared eligibility rule and its own ``why_not``: one decision per considered
    layer, in graph order."""

    layer_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv2d,)

    def considers(self, module: nn.Module) -> bool:
        return True

    def why_not(self, graph: Graph, node: fx.Node, module: nn.Module) -> str | None:
        return None

    def check(self, graph: Graph, eligible: list[fx.Node]) -> None:
        """Refuse options no layer of this model can take, before any change (raise PassError)."""

    def prepare(self, run: RewriteRun, eligible: list[fx.Node]) -> Any:
        """What planning needs measured first (activations on calibration data, say), kept as
        ``run.prepared``; nothing by default."""
        return None

    def plan(self, run: RewriteRun, node: fx.Node) -> RewritePlan | Decision:
        raise NotImplementedError

    def without_reorder(self, run: RewriteRun, node: fx.Node, plan: RewritePlan, why: str) -> RewritePlan | Decision:
        """The plan when the layer's output channels cannot be reordered (``why``): declined by default."""
        return run.declined(node, why)

    def build(self, run: RewriteRun, node: fx.Node, plan: RewritePlan, reordered: tuple[str, ...]) -> Decision:
        """Replace ``node``, whose module now reads and writes its channels in the planned order."""
        raise NotImplementedError

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ensure_costs(graph)
        analysis = analyze_channels(graph)
        found = layer_candidates(
            graph, self.layer_types, getattr(self, "exclude", ()), lambda n, m: self.why_not(graph, n, m)
        )
        order = [
            n.name
            for n in graph.nodes()
            if n.op == "call_module"
            and isinstance(graph.submodule(n), self.layer_types)
            and self.considers(graph.submodule(n))
        ]
        eligible = [n for n in found.eligible if n.name in set(order)]
        self.check(graph, eligible)
        decisions: dict[str, Decision] = {}
        with Rewriter(graph, self.name) as rewriter:
            run = RewriteRun(graph, analysis, rewriter, ctx)
            for name in order:
                if name in found.declined:
                    decisions[name] = run.declined(graph.node(name), found.declined[name])
            run.prepared = self.prepare(run, eligible) if eligible else None
            plans, sigmas = self._plans(run, eligible, decisions)
            reorder_channels(rewriter, graph, analysis, run.sigma)
            for name, plan in plans.items():
                moved = self._moved(analysis, sigmas[name], name)
                decisions[name] = self.build(run, graph.node(name), plan, moved)
        changed = any(d.action is Action.REWRITTEN for d in decisions.values())
        return PassResult(changed=changed, decisions=tuple(decisions[name] for name in order))

    def _plans(
        self, run: RewriteRun, eligible: list[fx.Node], decisions: dict[str, Decision]
    ) -> tuple[dict[str, RewritePlan], dict[str, list[torch.Tensor]]]:
        """Plan every eligible layer and claim the orders it asks for, in graph order."""
        plans: dict[str, RewritePlan] = {}
        sigmas: dict[str, list[torch.Tensor]] = {}
        for node in eligible:
            run.ctx.report_progress(f"{self.name}: {node.target}")
            plan = self.plan(run, node)
            if isinstance(plan, RewritePlan) and plan.order is not None:
                why = run.side_free(node, "out")
                if why is not None:
                    plan = self.without_reorder(run, node, plan, why)
            if not isinstance(plan, RewritePlan):
                decisions[node.name] = plan
                continue
            if plan.input_order is not None and run.side_free(node, "in") is not None:
                raise RuntimeError(f"{self.name}: planned an input order for {node.target}, whose inputs are not free")
            sigmas[node.name] = [
                run.claim(node, side, side_order)
                for side, side_order in (("out", plan.order), ("in", plan.input_order))
                if side_order is not None
            ]
            plans[node.name] = plan
        return plans, sigmas

    @staticmethod
    def _moved(analysis: ChannelAnalysis, sigmas: list[torch.Tensor], name: str) -> tuple[str, ...]:
        """The other layers the plan's permutations move."""
        return tuple(
            layer.target
            for layer in analysis.layers.values()
            if layer.node != name
            and any(moves(layer.in_units, sigma) or moves(layer.out_units, sigma) for sigma in sigmas)
        )
