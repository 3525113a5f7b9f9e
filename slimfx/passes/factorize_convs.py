"""factorize-convs: replace expensive layers by sequences of cheaper ones, where that saves MACs.

The methods (``method=``: spatial-svd, tucker2, cp, separable-3d, linear-svd) live in
``lowrank.factorizers``; this pass picks the layers and ranks, rewrites the graph and reports.
With ``target-macs`` the ranks are spent by the planner's allocator (``cost_model.planner``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.counts import ensure_costs, total_cost
from slimfx.cost_model.latency import PredictedRuntime
from slimfx.cost_model.planner import Item, Option, allocate
from slimfx.details import Details
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.lowrank.factorizers import FACTORIZERS, Factorizer, LayerToFactorize, Method, Ranks
from slimfx.metrics import relative_error
from slimfx.passes.base import Action, Decision, Pass, PassContext, PassResult
from slimfx.passes.candidates import layer_candidates
from slimfx.passes.registry import register

TARGET_GRID = 24  # candidate ranks per layer when spending a MAC budget
EXACT_METHODS = ("spatial-svd", "tucker2", "separable-3d", "linear-svd")  # exact at full rank (cp is not)


@dataclass(frozen=True)
class FactorizeDetails(Details):
    """A factorized layer: method, ranks chosen and full, errors, the new layers and parameters."""

    method: str
    ranks: tuple[int, ...]
    full_ranks: tuple[int, ...]
    weight_error: float
    output_error: float | None
    layers: tuple[str, ...]
    params_before: int
    params_after: int


# -- the pass ------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class FactorizeConvs(Pass):
    """Low-rank factorization of convs (and linears) where it saves MACs.

    Ranks come from one rule: ``energy`` (share of squared singular values kept; the default,
    0.95), ``rank`` (explicit, honoured even where it costs more, with a warning),
    ``rank-ratio`` (share of each layer's full rank) or ``target-macs`` (ranks spread across
    layers, least reconstruction error per MAC saved first, until the model's MACs are at most
    that share of the original). ``round-to`` rounds ranks up to a multiple. ``iterations``
    sets the refinement sweeps: HOOI for tucker2 (default 3), ALS for cp (default 50).
    """

    name = "factorize-convs"
    exact = False
    summary = "low-rank factorization: spatial SVD, Tucker-2, CP, separable 3-D, linear SVD"
    option_help = {
        "method": "spatial-svd, tucker2, cp, separable-3d or linear-svd (see docs/factorize.md)",
        "energy": "smallest rank keeping this share of the squared singular values (default 0.95)",
        "rank": "this rank for every layer (capped at the full rank)",
        "rank_ratio": "this fraction of each full rank (1 is exact)",
        "target_macs": "ranks spread across layers until the model's MACs are at most this fraction",
        "round_to": "ranks rounded up to a multiple of this",
        "iterations": "ALS iterations for cp",
        "runtime": "decline a factorization predicted to be no faster than its layer on this runtime "
        "(this machine's device profile); none: judge by MACs only",
        "exclude": "module-path patterns (fnmatch: layer4.*) left alone",
    }
    runs_after = {"prune-channels": "factorize the layers pruning leaves (pruning needs the original layers)"}

    method: Method = "spatial-svd"
    energy: float | None = None
    rank: int | None = None
    rank_ratio: float | None = None
    target_macs: float | None = None
    round_to: int = 1
    iterations: int | None = None
    runtime: PredictedRuntime | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rules = [o for o in ("energy", "rank", "rank_ratio", "target_macs") if getattr(self, o) is not None]
        if len(rules) > 1:
            names = " and ".join(r.replace("_", "-") for r in rules)
            raise self.invalid(rules[1].replace("_", "-"), getattr(self, rules[1]), f"one rank rule, not {names}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise self.invalid("energy", self.energy, "a share of singular-value energy in (0, 1]")
        if self.rank is not None and self.rank < 1:
            raise self.invalid("rank", self.rank, "an integer >= 1")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise self.invalid("rank-ratio", self.rank_ratio, "a share of the full rank in (0, 1]")
        if self.target_macs is not None and not 0 < self.target_macs < 1:
            raise self.invalid("target-macs", self.target_macs, "a fraction of the original MACs in (0, 1)")
        if self.round_to < 1:
            raise self.invalid("round-to", self.round_to, "an integer >= 1")
        if self.iterations is not None and self.iterations < 0:
            raise self.invalid("iterations", self.iterations, "an integer >= 0")

    def is_exact(self) -> bool:
        """Full rank (``rank-ratio=1`` or ``energy=1``) reconstructs every weight exactly, except with cp."""
        return self.method in EXACT_METHODS and (self.rank_ratio == 1 or self.energy == 1)

    def _honours_rank(self) -> bool:
        """An explicit rank, or full rank, is applied even where it saves no MACs."""
        return self.rank is not None or self.rank_ratio == 1 or self.energy == 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ensure_costs(graph)
        factorizer = FACTORIZERS[self.method]
        order = [
            n.name
            for n in graph.nodes()
            if n.op == "call_module" and isinstance(graph.submodule(n), factorizer.layer_types)
        ]
        layers, decisions = self._candidates(graph, factorizer)
        warnings: list[str] = []
        ranks = self._choose_ranks(graph, factorizer, layers, decisions, warnings)
        inputs = _layer_inputs(graph, [layer.node for layer in layers if layer.node.name in ranks])
        with Rewriter(graph, self.name) as rewriter:
            for layer in layers:
                if layer.node.name not in ranks:
                    continue
                chosen = ranks[layer.node.name]
                ctx.report_progress(f"factorize-convs: {layer.node.target} at rank {chosen}")
                iterations = factorizer.default_iterations if self.iterations is None else self.iterations
                parts, weight_error = factorizer.build(layer, chosen, iterations, ctx.seed)
                macs_after = factorizer.macs(layer, chosen)
                timing = self._predicted(layer, parts, ctx)
                slower = timing is not None and timing[1] >= timing[0]
                if slower and self._honours_rank():
                    warnings.append(
                        f"{layer.node.target}: predicted on {self.runtime} at {timing[1]:.3f} ms factorized vs "
                        f"{timing[0]:.3f} ms as it is; factorized anyway because the rank was given"
                    )
                elif slower:
                    decisions[layer.node.name] = Decision(
                        str(layer.node.target),
                        Action.DECLINED,
                        f"{self.method} rank {'x'.join(map(str, chosen))} predicted no faster on {self.runtime}: "
                        f"{timing[1]:.3f} ms factorized vs {timing[0]:.3f} ms as it is ({macs_after:,} vs "
                        f"{layer.macs:,} MACs)",
                        layer.macs,
                        layer.macs,
                    )
                    continue
                output_error = _output_error(layer.module, parts, inputs.get(layer.node.name))
                if self._honours_rank() and macs_after >= layer.macs:
                    asked = f"rank={self.rank}" if self.rank is not None else "full rank"
                    warnings.append(
                        f"{layer.node.target}: {asked} costs {macs_after:,} MACs, more than the "
                        f"original {layer.macs:,}; factorized anyway because the rank was given"
                    )
                rewriter.replace_with_sequence(layer.node, parts)
                decisions[layer.node.name] = Decision(
                    str(layer.node.target),
                    Action.FACTORIZED,
                    f"{self.method} rank {'x'.join(map(str, chosen))}: weight error {weight_error:.3g}, "
                    f"output error {output_error:.3g} (relative)"
                    + (
                        f"; predicted on {self.runtime}: {timing[0]:.3f} ms -> {timing[1]:.3f} ms"
                        if timing is not None
                        else ""
                    ),
                    layer.macs,
                    macs_after,
                    weight_error,
                    details=FactorizeDetails(
                        self.method,
                        tuple(chosen),
                        tuple(factorizer.full(layer)),
                        weight_error,
                        output_error,
                        tuple(f"{layer.node.target}.{name}" for name, _ in parts),
                        sum(p.numel() for p in layer.module.parameters()),
                        sum(p.numel() for _, m in parts for p in m.parameters()),
                    ),
                )
        for layer in layers:
            if layer.node.name not in decisions:  # only when spending a budget: cheaper cuts sufficed
                decisions[layer.node.name] = Decision(
                    str(layer.node.target),
                    Action.DECLINED,
                    f"not needed: cheaper cuts elsewhere met target-macs={self.target_macs:g}",
                    layer.macs,
                    layer.macs,
                )
        changed = any(d.action is Action.FACTORIZED for d in decisions.values())
        return PassResult(changed=changed, decisions=tuple(decisions[name] for name in order), warnings=tuple(warnings))

    def _predicted(
        self, layer: LayerToFactorize, parts: list[tuple[str, nn.Module]], ctx: PassContext
    ) -> tuple[float, float] | None:
        """(the layer's, its factorization's) predicted ms on ``runtime``, each layer timed alone."""
        if self.runtime is None or layer.in_shape is None:
            return None
        from slimfx.backends.profiler import sequence_ms

        before = sequence_ms([layer.module], tuple(layer.in_shape), self.runtime, ctx.progress)
        after = sequence_ms([module for _, module in parts], tuple(layer.in_shape), self.runtime, ctx.progress)
        return None if before is None or after is None else (before, after)

    # -- which layers ------------------------------------------------------------------------
    def _candidates(self, graph: Graph, factorizer: Factorizer) -> tuple[list[LayerToFactorize], dict[str, Decision]]:
        found = layer_candidates(
            graph, factorizer.layer_types, self.exclude, lambda _node, module: factorizer.why_not(module)
        )
        decisions = {}
        for name, why in found.declined.items():
            node = graph.node(name)
            macs = graph.info(node).cost.cost.macs
            decisions[name] = Decision(str(node.target), Action.DECLINED, why, macs, macs)
        layers = []
        for node in found.eligible:
            module = graph.submodule(node)
            layer = LayerToFactorize(
                node,
                module,
                graph.info(node.args[0]).out_shape,
                graph.info(node).out_shape,
                graph.info(node).cost.cost.macs,
            )
            layer.spectra = factorizer.spectra(module.weight.detach())
            layers.append(layer)
        return layers, decisions

    # -- which ranks -------------------------------------------------------------------------
    def _choose_ranks(
        self,
        graph: Graph,
        factorizer: Factorizer,
        layers: list[LayerToFactorize],
        decisions: dict[str, Decision],
        warnings: list[str],
    ) -> dict[str, Ranks]:
        if self.target_macs is not None:
            return self._ranks_for_target(graph, factorizer, layers, decisions, warnings)
        chosen = {}
        for layer in layers:
            full = factorizer.full(layer)
            if self.rank is not None:
                ranks = tuple(min(self.rank, f) for f in full)
            elif self.rank_ratio is not None:
                ranks = tuple(max(1, math.ceil(self.rank_ratio * f)) for f in full)
            else:
                ranks = factorizer.energy_ranks(layer, self.energy if self.energy is not None else 0.95)
            ranks = self._rounded(factorizer, layer, ranks)
            macs = factorizer.macs(layer, ranks)
            if not self._honours_rank() and macs >= layer.macs:
                decisions[layer.node.name] = Decision(
                    str(layer.node.target),
                    Action.DECLINED,
                    f"{self.method} at rank {'x'.join(map(str, ranks))} would cost {macs:,} MACs, "
                    f"not less than {layer.macs:,}",
                    layer.macs,
                    layer.macs,
                )
                continue
            chosen[layer.node.name] = ranks
        return chosen

    def _ranks_for_target(
        self,
        graph: Graph,
        factorizer: Factorizer,
        layers: list[LayerToFactorize],
        decisions: dict[str, Decision],
        warnings: list[str],
    ) -> dict[str, Ranks]:
        """The planner's allocator over candidate ranks per layer: least estimated error per MAC
        saved first; once one cut reaches the goal, the one that reaches it with the least error."""
        total = total_cost(graph).macs
        goal = self.target_macs * total
        options: dict[str, list[tuple[Ranks, int, float]]] = {}
        for layer in layers:
            candidates = sorted(
                {
                    self._rounded(factorizer, layer, tuple(max(1, math.ceil(f * r)) for r in factorizer.full(layer)))
                    for f in torch.logspace(-2, 0, TARGET_GRID).tolist()
                },
                reverse=True,
            )
            saving = [(r, factorizer.macs(layer, r), factorizer.estimated_error(layer, r)) for r in candidates]
            options[layer.node.name] = [o for o in saving if o[1] < layer.macs]
            if not options[layer.node.name]:
                decisions[layer.node.name] = Decision(
                    str(layer.node.target),
                    Action.DECLINED,
                    f"{self.method} saves no MACs at any rank",
                    layer.macs,
                    layer.macs,
                )
        items = [
            Item(
                layer.node.name,
                (Option(layer.macs, 0.0),) + tuple(Option(m, e) for _, m, e in options[layer.node.name]),
            )
            for layer in layers
        ]
        allocation = allocate(items, goal, fixed_cost=total - sum(layer.macs for layer in layers), finish=True)
        if not allocation.met:
            warnings.append(
                f"factorize-convs: target-macs={self.target_macs:g} cannot be reached with {self.method}; "
                f"best reachable is {int(allocation.total):,} MACs ({allocation.total / total:.3f} of the original)"
            )
        return {name: options[name][index - 1][0] for name, index in allocation.chosen.items() if index > 0}

    def _rounded(self, factorizer: Factorizer, layer: LayerToFactorize, ranks: Ranks) -> Ranks:
        full = factorizer.full(layer)
        if self.round_to > 1:
            ranks = tuple(min(f, math.ceil(r / self.round_to) * self.round_to) for r, f in zip(ranks, full))
        return factorizer.feasible(layer, ranks)


def _layer_inputs(graph: Graph, nodes: Sequence[fx.Node]) -> dict[str, torch.Tensor]:
    """Each layer's input on the example inputs, recorded in one run."""
    wanted = {str(n.target): n.name for n in nodes}
    seen: dict[str, torch.Tensor] = {}
    handles = [
        graph.module.get_submodule(target).register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach())
        )
        for target, name in wanted.items()
    ]
    try:
        graph.run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _output_error(module: nn.Module, parts: list[tuple[str, nn.Module]], x: torch.Tensor | None) -> float | None:
    if x is None:
        return None
    with torch.no_grad():
        expected = module(x)
        actual = x
        for _, part in parts:
            actual = part(actual)
    return relative_error(expected, actual)
