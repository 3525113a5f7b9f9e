"""The shape every structure rewrite shares, in three steps over a graph's candidate layers.

1. **Plan** each layer from its own weights (``LayerRewrite.plan``): a ``RewritePlan`` saying
   in which order its replacement writes the layer's output channels, or a declined decision.
2. **Reorder**: each planned order becomes a unit permutation of the layer's channel group
   (one plan per group: a later plan whose group is taken, or cannot be reordered, gets
   ``without_reorder``); all of them are applied at once to every layer they move, the
   planned layers included (their outputs then come out in the planned order).
3. **Build** each replacement from its layer's reordered module (``LayerRewrite.build``),
   so layers rewritten side by side never read channels in a stale order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.counts import ensure_costs
from slimfx.ir.channels import ChannelAnalysis, analyze_channels
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes.base import Action, Decision, Pass, PassContext, PassResult
from slimfx.passes.candidates import layer_candidates
from slimfx.passes.channel_order import group_of_outputs, reorder_channels, why_not_reorder
from slimfx.rewrites.permute import moves, unit_permutation


@dataclass(frozen=True)
class RewritePlan:
    """A layer's planned rewrite: ``order[p]`` is the original output channel its replacement
    writes at position ``p`` (None: the order is kept). Passes add what building needs."""

    order: torch.Tensor | None


@dataclass
class RewriteRun:
    """One run of a rewrite pass: the graph, its channel analysis (from before any change),
    the rewriter and the context."""

    graph: Graph
    analysis: ChannelAnalysis
    rewriter: Rewriter
    ctx: PassContext

    def macs(self, node: fx.Node) -> int:
        return self.graph.info(node).cost.cost.macs

    def in_shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.graph.info(node.args[0]).out_shape)

    def declined(self, node: fx.Node, why: str) -> Decision:
        macs = self.macs(node)
        return Decision(str(node.target), Action.DECLINED, why, macs, macs)


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

    def plan(self, run: RewriteRun, node: fx.Node) -> RewritePlan | Decision:
        raise NotImplementedError

    def without_reorder(self, run: RewriteRun, node: fx.Node, plan: RewritePlan, why: str) -> RewritePlan | Decision:
        """The plan when the layer's channels cannot be reordered (``why``): declined by default."""
        return run.declined(node, why)

    def build(self, run: RewriteRun, node: fx.Node, plan: RewritePlan, reordered: tuple[str, ...]) -> Decision:
        """Replace ``node``, whose module now writes its outputs in the planned order."""
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
            plans = self._plans(run, eligible, decisions)
            sigmas = {name: self._sigma(run, name, plan) for name, plan in plans.items()}
            identity = torch.arange(analysis.num_units)
            combined = identity.clone()
            for sigma in sigmas.values():
                if sigma is not None:  # the groups are disjoint: each sigma moves its own units
                    combined = torch.where(sigma != identity, sigma, combined)
            reorder_channels(rewriter, graph, analysis, combined)
            for name, plan in plans.items():
                sigma = sigmas[name]
                moved = () if sigma is None else self._moved(analysis, sigma, name)
                decisions[name] = self.build(run, graph.node(name), plan, moved)
        changed = any(d.action is Action.REWRITTEN for d in decisions.values())
        return PassResult(changed=changed, decisions=tuple(decisions[name] for name in order))

    def _plans(
        self, run: RewriteRun, eligible: list[fx.Node], decisions: dict[str, Decision]
    ) -> dict[str, RewritePlan]:
        """Plan every eligible layer; one reorder per channel group, the first in graph order."""
        plans: dict[str, RewritePlan] = {}
        taken: set[int] = set()
        for node in eligible:
            run.ctx.report_progress(f"{self.name}: {node.target}")
            plan = self.plan(run, node)
            if isinstance(plan, RewritePlan) and plan.order is not None:
                group = group_of_outputs(run.analysis, run.analysis.layers[node.name])
                why = why_not_reorder(run.graph, run.analysis, group)
                if why is None and group.index in taken:
                    why = "its channels are already reordered for another layer of this pass"
                if why is None:
                    taken.add(group.index)
                else:
                    plan = self.without_reorder(run, node, plan, why)
            if isinstance(plan, RewritePlan):
                plans[node.name] = plan
            else:
                decisions[node.name] = plan
        return plans

    @staticmethod
    def _sigma(run: RewriteRun, name: str, plan: RewritePlan) -> torch.Tensor | None:
        if plan.order is None:
            return None
        return unit_permutation(run.analysis, run.analysis.layers[name], plan.order)

    @staticmethod
    def _moved(analysis: ChannelAnalysis, sigma: torch.Tensor, name: str) -> tuple[str, ...]:
        """The other layers ``sigma`` moves."""
        return tuple(
            layer.target
            for layer in analysis.layers.values()
            if layer.node != name and (moves(layer.in_units, sigma) or moves(layer.out_units, sigma))
        )
