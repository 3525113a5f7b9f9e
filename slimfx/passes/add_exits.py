"""add-exits: BranchyNet-style early exits at nodes that dominate the output.

The pass picks cut points (dominators of the output, spread by cumulative MACs or named with
``at=``), attaches a small classifier head after each (``exits.heads``), trains the heads on
the calibration data (self-distillation by default; BranchyNet joint training with
``joint=true`` and labels), and chooses an entropy threshold per exit on held-out rows so
that agreement with the full model stays at or above ``agreement`` (``exits.thresholds``).
The graph itself is unchanged: the pass returns an ``ExitPlan`` on its result, and the pass
manager builds the runtime that really exits (``backends.early_exit``) and verifies it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.backends.profiler import ProfiledRuntime
from slimfx.cost_model.counts import ensure_costs
from slimfx.cost_model.latency import PredictedRuntime
from slimfx.errors import DataError, PassSpecError
from slimfx.exits.heads import head_macs, make_head
from slimfx.exits.plan import ExitLatency, ExitPlan, ExitStat, expected_stage_rows
from slimfx.exits.thresholds import choose_thresholds, prediction_entropy
from slimfx.ir.dominators import output_dominators
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import with_outputs
from slimfx.passes.base import Action, DataNeed, Decision, Pass, PassContext, PassResult
from slimfx.passes.registry import register
from slimfx.train.exits import distill_heads, train_branchynet


@register
@dataclass(frozen=True)
class AddExits(Pass):
    """Early exits with trained heads and entropy thresholds; see the module docstring."""

    name = "add-exits"
    exact = False
    makes_early_exits = True
    summary = "early exits (BranchyNet) at dominator nodes, self-distilled heads, entropy thresholds"
    option_help = {
        "exits": "number of exits, spread over the candidate cut points (when at= is not given)",
        "at": "module paths to put exits after (instead of exits=N)",
        "head": "pool-linear (global average pool + linear) or conv-pool-linear (a 1x1 conv bottleneck first)",
        "temperature": "softening of the full model's outputs the heads learn from (self-distillation)",
        "epochs": "head training epochs (Adam)",
        "lr": "head learning rate",
        "agreement": "share of held-out rows each exit must agree on with the full model's top-1",
        "joint": "BranchyNet: train backbone and heads together on labels (needs labelled calibration data)",
        "holdout": "share of the calibration rows kept aside to choose the thresholds",
        "runtime": "place exits by latency predicted on this runtime (this machine's device profile) instead of "
        "MACs, and report the expected latency at the rows each stage sees; none: by MACs",
    }
    runs_after = {
        "prune-channels": "exits cut the final graph, so structural passes come first",
        "factorize-convs": "exits cut the final graph, so structural passes come first",
        "fold-bn": "exits cut the final graph, so fold-bn comes first",
        "quantize": "the runtime splits the final (quantized) graph; exit heads stay in float",
    }

    exits: int = 2
    at: tuple[str, ...] = ()
    head: Literal["pool-linear", "conv-pool-linear"] = "pool-linear"
    temperature: float = 2.0
    epochs: int = 60
    lr: float = 0.01
    agreement: float = 0.99
    joint: bool = False
    holdout: float = 0.3
    runtime: PredictedRuntime | None = None

    def __post_init__(self) -> None:
        if self.exits < 1:
            raise self.invalid("exits", self.exits, "at least 1 exit")
        if not 0 < self.agreement <= 1:
            raise self.invalid("agreement", self.agreement, "a share in (0, 1]")
        if self.temperature <= 0:
            raise self.invalid("temperature", self.temperature, "a positive number")
        if self.epochs < 1:
            raise self.invalid("epochs", self.epochs, "at least 1")
        if self.lr <= 0:
            raise self.invalid("lr", self.lr, "a positive number")
        if not 0 < self.holdout < 1:
            raise self.invalid("holdout", self.holdout, "a share of the calibration rows in (0, 1)")

    def data_need(self) -> DataNeed:
        return DataNeed.LABELLED if self.joint else DataNeed.CALIBRATION

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        inputs, labels = self._calibration(ctx)
        ensure_costs(graph)
        output = graph.output_node()
        if not isinstance(output.args[0], fx.Node) or len(graph.info(output).outputs) != 1:
            return PassResult(
                False, (Decision("output", Action.DECLINED, "the model must return one tensor of class scores"),)
            )
        timer = _StageTimer(graph, self.runtime, ctx) if self.runtime is not None else None
        cumulative = timer.cumulative(graph) if timer is not None else _cumulative_macs(graph)
        cuts, decisions = self._cuts(graph, cumulative)
        if not cuts:
            reason = (
                "no node dominates the output with work left after it: every path branches, "
                "so no exit can cut the model"
            )
            return PassResult(False, tuple(decisions) + (Decision("model", Action.DECLINED, reason),))
        classes = graph.info(output).out_shape[-1]
        heads = nn.ModuleList(make_head(self.head, graph.info(graph.node(cut)).out_shape, classes) for cut in cuts)
        extractor = with_outputs(graph.module, cuts, self.name)
        rows = len(inputs)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(ctx.seed))
        held = order[: max(1, int(self.holdout * rows))]
        train = order[len(held) :]
        batch = max(1, min(64, len(train)))
        train_batches = [train[i : i + batch] for i in range(0, len(train), batch)]
        if self.joint:
            losses = train_branchynet(
                extractor,
                heads,
                [(inputs[b], labels[b]) for b in train_batches],
                epochs=self.epochs,
                lr=self.lr,
                progress=ctx.progress,
            )
        else:
            losses = distill_heads(
                extractor,
                heads,
                [inputs[b] for b in train_batches],
                temperature=self.temperature,
                epochs=self.epochs,
                lr=self.lr,
                progress=ctx.progress,
            )
        heads.eval()
        held_labels = None if labels is None else labels[held]
        plan = self._plan(graph, extractor, heads, cuts, inputs[held], held_labels, losses)
        while plan.stats and any(stat.share == 0 for stat in plan.stats):  # an exit nobody takes only costs
            untaken = [stat for stat in plan.stats if stat.share == 0]
            decisions += [
                Decision(
                    stat.node,
                    Action.DECLINED,
                    f"exit {stat.exit} dropped: no held-out row leaves here at the entropy threshold that keeps "
                    f"agreement at {self.agreement:g} ({stat.threshold:.4g}); its head would run on every row "
                    "for nothing",
                )
                for stat in untaken
            ]
            kept = [k for k, stat in enumerate(plan.stats) if stat.share > 0]
            if not kept:
                return PassResult(False, tuple(decisions) + (self._no_exit_taken(),))
            cuts, heads = [cuts[k] for k in kept], nn.ModuleList(heads[k] for k in kept)
            extractor = with_outputs(graph.module, cuts, self.name)
            plan = self._plan(graph, extractor, heads, cuts, inputs[held], held_labels, losses)
        if timer is not None:
            plan = replace(plan, latency=timer.expected(graph, cuts, [s.share for s in plan.stats]))
        for stat in plan.stats:
            decisions.append(
                Decision(
                    stat.node,
                    Action.EXIT,
                    f"exit {stat.exit}: head {self.head} ({stat.head_macs_per_sample:,} MACs/sample), "
                    f"entropy threshold {stat.threshold:.4g}; {stat.share:.1%} of held-out rows leave here",
                    details=stat,
                )
            )
        return PassResult(changed=False, decisions=tuple(decisions), exit_plan=plan)

    def _no_exit_taken(self) -> Decision:
        return Decision(
            "model",
            Action.DECLINED,
            f"no exit kept: at agreement {self.agreement:g} no held-out row could leave early at any exit; lower "
            "agreement=, train the heads longer (epochs=) or give more calibration data",
        )

    # -- data ---------------------------------------------------------------------------------
    def _calibration(self, ctx: PassContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All calibration rows (single-input models) and their labels when every batch has them."""
        if len(ctx.example_inputs) != 1:
            raise DataError(
                f"add-exits trains heads on single-input models; this one takes {len(ctx.example_inputs)} inputs"
            )
        xs, ys = [], []
        for batch in ctx.batches(self.name):
            xs.append(batch.inputs[0])
            if batch.labels is not None:
                ys.append(batch.labels)
        if self.joint and len(ys) != len(xs):
            raise DataError("add-exits: joint=true trains on labels: give calib_data as (inputs, labels) batches")
        inputs = torch.cat(xs)
        if len(inputs) < 10:
            raise DataError(f"add-exits: {len(inputs)} calibration rows are too few to train heads and hold some out")
        return inputs, (torch.cat(ys) if len(ys) == len(xs) else None)

    # -- where ---------------------------------------------------------------------------------
    def _cuts(self, graph: Graph, cumulative: dict[str, float]) -> tuple[list[str], list[Decision]]:
        """Exit points: the ``at`` modules, or ``exits`` cuts spread evenly over ``cumulative``
        (MACs, or predicted ms, up to each node)."""
        dominators = [n for n in output_dominators(graph) if self._usable(graph, n)]
        macs = _cumulative_macs(graph)
        total = max(cumulative[graph.output_node().name], 1e-12)
        candidates = [n for n in dominators if macs[n.name] < macs[graph.output_node().name]]  # work left after it
        decisions: list[Decision] = []
        if self.at:
            chosen = []
            for path in self.at:
                node = self._node_for(graph, path)
                if node in candidates:
                    chosen.append(node.name)
                else:
                    why = (
                        "a branch bypasses it (inside a residual block or concat), so it does not dominate the output"
                        if node not in dominators
                        else "nothing but free ops follows it"
                    )
                    decisions.append(
                        Decision(path, Action.DECLINED, f"no exit after '{path}' (node {node.name}): {why}")
                    )
            return chosen, decisions
        # of several cuts with the same MACs before them (conv -> BN -> ReLU -> pool), take the last
        block_ends = [
            n
            for i, n in enumerate(candidates)
            if i + 1 == len(candidates) or macs[candidates[i + 1].name] > macs[n.name]
        ]
        chosen = []
        for i in range(1, self.exits + 1):
            goal = total * i / (self.exits + 1)
            free = [n for n in block_ends if n.name not in chosen]
            if free:
                chosen.append(min(free, key=lambda n: abs(cumulative[n.name] - goal)).name)
        if block_ends and len(block_ends) < self.exits:
            decisions.append(
                Decision(
                    "model",
                    Action.SUMMARY,
                    f"exits={self.exits} asked for, but this model has {len(block_ends)} place(s) to cut (block ends "
                    f"that dominate the output with work after them): {len(block_ends)} exit(s) planned",
                )
            )
        order = {n.name: i for i, n in enumerate(graph.nodes())}
        return sorted(set(chosen), key=order.__getitem__), decisions

    @staticmethod
    def _usable(graph: Graph, node: fx.Node) -> bool:
        info = graph.info(node)
        batch = graph.example_inputs[0].shape[0]
        return (
            len(info.outputs) == 1
            and len(info.out_shape) >= 2
            and info.out_shape[0] == batch
            and info.outputs[0].dtype.is_floating_point
        )

    @staticmethod
    def _node_for(graph: Graph, path: str) -> fx.Node:
        try:
            graph.module.get_submodule(path)
        except AttributeError:
            raise PassSpecError(
                f"add-exits: at={path!r} is not a module of the model; give module paths such as 'layer2'"
            ) from None
        inside = [
            n
            for n in graph.nodes()
            if path in (n.meta.get("nn_module_stack") or {})
            or (n.op == "call_module" and (str(n.target) == path or str(n.target).startswith(path + ".")))
        ]
        if not inside:
            raise PassSpecError(f"add-exits: module {path!r} is never called in the traced graph")
        return inside[-1]

    # -- thresholds and cost ---------------------------------------------------------------------
    def _plan(
        self,
        graph: Graph,
        extractor: nn.Module,
        heads: nn.ModuleList,
        cuts: list[str],
        inputs: torch.Tensor,
        labels: torch.Tensor | None,
        losses: list[float],
    ) -> ExitPlan:
        with torch.no_grad():
            *features, final = extractor(inputs)
            logits = [head(f) for head, f in zip(heads, features)]
        reference = final.argmax(-1) if labels is None else labels
        final_correct = final.argmax(-1) == reference
        correct = [lg.argmax(-1) == reference for lg in logits]
        required = self.agreement * (len(reference) if labels is None else int(final_correct.sum()))
        entropies = [prediction_entropy(lg) for lg in logits]
        thresholds = choose_thresholds(entropies, correct, final_correct, required)

        exit_of = torch.full((len(reference),), len(cuts), dtype=torch.long)
        answer_right = final_correct.clone()
        for k, (entropy, right, threshold) in enumerate(zip(entropies, correct, thresholds)):
            leaving = (exit_of == len(cuts)) & (entropy <= threshold)
            exit_of[leaving] = k
            answer_right[leaving] = right[leaving]
        batch = graph.example_inputs[0].shape[0]
        cumulative = _cumulative_macs(graph)
        full = cumulative[graph.output_node().name] / batch
        per_head = [head_macs(head, graph.info(graph.node(c)).out_shape) / batch for head, c in zip(heads, cuts)]
        stats, expected = [], 0.0
        for k, cut in enumerate(cuts):
            share = float((exit_of == k).float().mean())
            cost = cumulative[cut] / batch + sum(per_head[: k + 1])
            expected += share * cost
            agreement = float(correct[k][exit_of == k].float().mean()) if share else None
            stats.append(ExitStat(k + 1, cut, thresholds[k], share, int(per_head[k]), cost, agreement))
        final_share = float((exit_of == len(cuts)).float().mean())
        expected += final_share * (full + sum(per_head))
        agreement = (
            float(answer_right.float().mean())
            if labels is None
            else float(answer_right.float().mean() / max(final_correct.float().mean(), 1e-12))
        )
        return ExitPlan(
            tuple(cuts),
            heads,
            tuple(thresholds),
            tuple(stats),
            final_share,
            full + sum(per_head),
            full,
            expected,
            agreement,
            tuple(losses),
        )


def _cumulative_macs(graph: Graph) -> dict[str, int]:
    """MACs of every node up to and including each node, in graph order."""
    running, result = 0, {}
    for node in graph.nodes():
        cost = graph.info(node).cost
        running += cost.cost.macs if cost is not None else 0
        result[node.name] = running
    return result


class _StageTimer:
    """Predicted latency of the graph's stages on one runtime, at any number of rows."""

    def __init__(self, graph: Graph, runtime: str, ctx: PassContext):
        self.runtime, self.ctx = runtime, ctx
        self.profiled = ProfiledRuntime.open(runtime, progress=ctx.progress)

    def node_ms(self, graph: Graph) -> dict[str, float]:
        """Each node's predicted ms (a kernel's time on its first node), measuring what the profile lacks."""
        self.profiled.fill(graph, progress=self.ctx.progress)
        return self.profiled.predict(graph).node_ms()

    def cumulative(self, graph: Graph) -> dict[str, float]:
        """Predicted ms of every node up to and including each node, in graph order."""
        per_node, running, result = self.node_ms(graph), 0.0, {}
        for node in graph.nodes():
            running += per_node.get(node.name, 0.0)
            result[node.name] = running
        return result

    def expected(self, graph: Graph, cuts: list[str], shares: list[float]) -> ExitLatency:
        """The full batch's predicted time, and the expected one: stage k predicted at the rows
        left after exit k (the exit heads' own time is left out: a pool and a linear layer)."""
        batch = int(graph.example_inputs[0].shape[0])
        rows = expected_stage_rows(batch, shares)
        boundaries = [*cuts, graph.output_node().name]
        full = self._stage_ms(graph, batch, boundaries)
        expected = sum(self._stage_ms(graph, n, boundaries)[k] for k, n in enumerate(rows))
        return ExitLatency(self.runtime, batch, sum(full), expected, rows)

    def _stage_ms(self, graph: Graph, rows: int, boundaries: list[str]) -> list[float]:
        """Predicted ms of each stage (up to each boundary node) with ``rows`` rows."""
        at = graph if rows == graph.example_inputs[0].shape[0] else _at_rows(graph, rows)
        per_node = self.node_ms(at)
        stages, current = [0.0] * len(boundaries), 0
        for node in at.nodes():
            stages[current] += per_node.get(node.name, 0.0)
            if current < len(boundaries) - 1 and node.name == boundaries[current]:
                current += 1
        stages[-1] += self.profiled.profile.roofline.call_overhead_ms
        return stages


def _at_rows(graph: Graph, rows: int) -> Graph:
    """A copy of the graph with ``rows`` rows in its example inputs, shapes propagated (a copy:
    the annotations live on the nodes)."""
    from slimfx.ir.shapes import ensure_shapes

    resized = Graph(
        copy.deepcopy(graph.module), tuple(x[:rows] for x in graph.example_inputs), graph.opaque, graph.fixed_shapes
    )
    resized.taken_layers = graph.taken_layers
    ensure_shapes(resized)
    return resized
