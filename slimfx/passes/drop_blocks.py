"""drop-blocks: residual blocks with an identity skip removed, least sensitive per saving first (static BlockDrop)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimfx.backends.profiler import ProfiledRuntime
from slimfx.cost_model.counts import ensure_costs, total_cost
from slimfx.cost_model.latency import LatencyPrediction, PredictedRuntime
from slimfx.details import Details
from slimfx.errors import PassError
from slimfx.ir.blocks import ResidualBlock, residual_blocks, without_blocks
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.ir.shapes import ensure_shapes
from slimfx.metrics import output_divergence, top1_agreement
from slimfx.passes.base import Action, DataNeed, Decision, Pass, PassContext, PassResult
from slimfx.passes.candidates import exclusion_reason
from slimfx.passes.registry import register

TRIAL_BATCHES = 8  # calibration batches each block's sensitivity is measured on


@dataclass(frozen=True)
class BlockDetails(Details):
    """A residual block: its modules, what dropping it alone does to the outputs (divergence:
    KL for class scores, else relative error; top-1 agreement), and what it saves alone."""

    block: str
    modules: tuple[str, ...]
    divergence: float
    agreement: float | None
    macs_saved: int
    predicted_ms_saved: float | None


@dataclass(frozen=True)
class _Trial:
    block: ResidualBlock
    divergence: float
    agreement: float | None
    macs: int
    ms: float | None

    @property
    def saving(self) -> float:
        return self.ms if self.ms is not None else float(self.macs)


@register
@dataclass(frozen=True)
class DropBlocks(Pass):
    """Remove residual blocks (y = x + f(x) with an identity skip: the add then passes x on).

    Each block is dropped alone on the calibration data and scored by how far the outputs move
    (KL for class scores) per MAC or predicted millisecond it saves; blocks are dropped in that
    order until ``target-latency`` (a fraction of the original's predicted latency on
    ``runtime``, or N ms) or ``target-macs`` is met, or ``blocks`` of them are gone. Lossy:
    follow with ``distill`` to recover.
    """

    name = "drop-blocks"
    summary = "drop residual blocks (identity skips), least sensitive per saving first (static BlockDrop)"
    option_help = {
        "blocks": "drop this many blocks",
        "target_latency": "drop blocks until the predicted latency is at most this fraction of the original's, or N ms",
        "target_macs": "drop blocks until the model's MACs are at most this fraction of the original's",
        "runtime": "the runtime target-latency predicts on, and savings are ranked by (this machine's device profile)",
        "exclude": "block-name patterns (fnmatch: layer4.*) kept",
    }
    runs_before = {
        "distill": "recovery trains the blocks that are left",
        "prune-channels": "pruning ranks the channels of the blocks that are left",
        "add-exits": "exits are placed on the final graph",
    }

    blocks: int | None = None
    target_latency: str | None = None
    target_macs: float | None = None
    runtime: PredictedRuntime = "torch"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        given = [o for o in ("blocks", "target_latency", "target_macs") if getattr(self, o) is not None]
        if len(given) != 1:
            raise self.invalid(
                "blocks",
                self.blocks,
                "one of blocks=N, target-latency=F (or Nms) or target-macs=F"
                + (f", not {' and '.join(g.replace('_', '-') for g in given)}" if given else ""),
            )
        if self.blocks is not None and self.blocks < 1:
            raise self.invalid("blocks", self.blocks, "an integer >= 1")
        if self.target_macs is not None and not 0 < self.target_macs < 1:
            raise self.invalid("target-macs", self.target_macs, "a fraction of the original MACs in (0, 1)")
        if self.target_latency is not None:
            from slimfx.passes.prune_channels import parse_latency_target

            parse_latency_target(self.target_latency, self.invalid)

    def data_need(self) -> DataNeed:
        return DataNeed.CALIBRATION

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ensure_costs(graph)
        found = residual_blocks(graph)
        kept = {b.name: why for b in found if (why := exclusion_reason(b.name, self.exclude)) is not None}
        droppable = [b for b in found if b.name not in kept]
        if not droppable:
            why = "no residual block with an identity skip" if not found else "every block is excluded"
            return PassResult(False, (Decision("(model)", Action.SUMMARY, f"nothing to drop: {why}"),))
        timer = _Timer.for_graph(graph, self.runtime, ctx) if self.target_latency is not None else None
        self._check_reachable(graph, droppable, timer)
        trials = self._trials(graph, droppable, timer, ctx)
        chosen = self._choose(graph, trials, timer)
        with Rewriter(graph, self.name) as rewriter:
            for trial in chosen:
                add, skip = graph.node(trial.block.add), graph.node(trial.block.input)
                for user in list(add.users):
                    module = graph.submodule(user) if user.op == "call_module" else None
                    if getattr(module, "inplace", False):  # now on the skip, which others read: not in place
                        rewriter.replace_module(user, _out_of_place(module))
                rewriter.bypass(add, skip)
        decisions = [Decision(b.name, Action.DECLINED, why) for b in found if b.name in kept] + self._decisions(
            trials, chosen
        )
        order = {b.name: i for i, b in enumerate(found)}
        decisions.sort(key=lambda d: order.get(d.target, len(order)))
        if timer is not None:
            after = timer.predict(graph)
            decisions.append(
                Decision(
                    "(predicted latency)",
                    Action.SUMMARY,
                    f"{timer.original.total_ms:.3f} ms -> {after:.3f} ms on {self.runtime} "
                    f"(target {self._latency_budget(timer):.3f} ms)",
                )
            )
        return PassResult(changed=bool(chosen), decisions=tuple(decisions))

    # -- targets -----------------------------------------------------------------------------
    def _latency_budget(self, timer: _Timer) -> float:
        from slimfx.passes.prune_channels import parse_latency_target

        return parse_latency_target(self.target_latency or "", self.invalid).budget(timer.original.total_ms)

    def _check_reachable(self, graph: Graph, droppable: list[ResidualBlock], timer: _Timer | None) -> None:
        """A target that dropping every droppable block cannot meet is an error, before the sweep."""
        if self.blocks is not None and self.blocks > len(droppable):
            raise PassError(
                f"drop-blocks: blocks={self.blocks}, but the model has {len(droppable)} droppable residual blocks"
            )
        if self.target_macs is not None:
            floor = total_cost(_graph_of(graph, droppable)).macs
            goal = self.target_macs * total_cost(graph).macs
            if floor > goal:
                raise PassError(
                    f"drop-blocks: target-macs={self.target_macs:g} cannot be met: without all {len(droppable)} "
                    f"droppable blocks the model still costs {floor / total_cost(graph).macs:.3f} of its MACs"
                )
        if timer is not None:
            floor_ms, budget = timer.predict(_graph_of(graph, droppable)), self._latency_budget(timer)
            if floor_ms > budget:
                raise PassError(
                    f"drop-blocks: target-latency={self.target_latency} cannot be met: without all "
                    f"{len(droppable)} droppable blocks the model is predicted at {floor_ms:.3f} ms on "
                    f"{self.runtime}, above {budget:.3f} ms"
                )

    def _choose(self, graph: Graph, trials: list[_Trial], timer: _Timer | None) -> list[_Trial]:
        ranked = sorted(trials, key=lambda t: t.divergence / max(t.saving, 1e-12))
        if self.blocks is not None:
            return ranked[: self.blocks]
        total = total_cost(graph).macs
        chosen: list[_Trial] = []
        for trial in ranked:
            if self.target_macs is not None and total - sum(t.macs for t in chosen) <= self.target_macs * total:
                break
            if timer is not None and chosen:
                if timer.predict(_graph_of(graph, [t.block for t in chosen])) <= self._latency_budget(timer):
                    break
            chosen.append(trial)
        return chosen

    # -- measuring ---------------------------------------------------------------------------
    def _trials(
        self, graph: Graph, blocks: list[ResidualBlock], timer: _Timer | None, ctx: PassContext
    ) -> list[_Trial]:
        batches = [b for _, b in zip(range(TRIAL_BATCHES), ctx.batches(self.name))]
        with torch.no_grad():
            reference = [graph.module(*b.inputs) for b in batches]
            trials = []
            for i, block in enumerate(blocks):
                ctx.report_progress(f"drop-blocks: block {i + 1}/{len(blocks)} ({block.name})")
                module = without_blocks(graph, [block], f"{self.name} (trial)")
                outputs = [module(*b.inputs) for b in batches]
                ref, out = torch.cat(reference), torch.cat(outputs)
                macs = sum(graph.info(graph.node(n)).cost.cost.macs for n in block.branch if _counted(graph, n))
                trials.append(
                    _Trial(
                        block,
                        output_divergence(ref, out),
                        top1_agreement(ref, out) if ref.dim() == 2 else None,
                        macs,
                        timer.saved_ms(block) if timer is not None else None,
                    )
                )
        return trials

    def _decisions(self, trials: list[_Trial], chosen: list[_Trial]) -> list[Decision]:
        dropped = {t.block.name for t in chosen}
        decisions = []
        for trial in trials:
            saving = f"{trial.macs:,} MACs" + (f", {trial.ms:.3f} ms predicted" if trial.ms is not None else "")
            alone = f"dropped alone: divergence {trial.divergence:.4g}" + (
                f", top-1 agreement {trial.agreement:.1%}" if trial.agreement is not None else ""
            )
            details = BlockDetails(
                trial.block.name, trial.block.modules, trial.divergence, trial.agreement, trial.macs, trial.ms
            )
            is_dropped = trial.block.name in dropped
            decisions.append(
                Decision(
                    trial.block.name,
                    Action.REMOVED if is_dropped else Action.DECLINED,
                    (f"dropped: saves {saving}; {alone}" if is_dropped else f"kept: {alone}, would save {saving}"),
                    trial.macs,
                    0 if is_dropped else trial.macs,
                    details=details,
                )
            )
        return decisions


def _out_of_place(module: nn.Module) -> nn.Module:
    """A copy of an in-place activation that returns a new tensor."""
    new = copy.copy(module)
    new.inplace = False
    return new


def _counted(graph: Graph, name: str) -> bool:
    info = graph.info(graph.node(name))
    return info.cost is not None


def _graph_of(graph: Graph, dropped: list[ResidualBlock]) -> Graph:
    """``graph`` without ``dropped`` as a Graph with shapes and costs (sharing the weights)."""
    trial = Graph(without_blocks(graph, dropped, "drop-blocks (trial)"), graph.example_inputs)
    ensure_shapes(trial)
    ensure_costs(trial)
    return trial


@dataclass
class _Timer:
    """The original's prediction on one runtime, and the means to predict copies."""

    profiled: ProfiledRuntime
    original: LatencyPrediction

    @staticmethod
    def for_graph(graph: Graph, runtime: str, ctx: PassContext) -> _Timer:
        profiled = ProfiledRuntime.open(runtime, progress=ctx.progress)
        profiled.fill(graph, progress=ctx.progress)
        return _Timer(profiled, profiled.predict(graph))

    def predict(self, graph: Graph) -> float:
        return self.profiled.predict(graph).total_ms

    def saved_ms(self, block: ResidualBlock) -> float:
        """The predicted ms of the kernels made only of the block's branch and its add."""
        inside = set(block.branch) | {block.add}
        return sum(k.ms for k in self.original.kernels if set(k.kernel.nodes) <= inside)
