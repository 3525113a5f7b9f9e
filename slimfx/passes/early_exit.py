"""add-exits: BranchyNet-style early exits at nodes that dominate the output.

The pass picks cut points (dominators of the output, spread by cumulative MACs or named with
``at=``), attaches a small classifier head after each, trains the heads on ``calib_data``
(self-distillation by default; BranchyNet joint training with ``joint=true`` and labels),
and chooses an entropy threshold per exit on held-out rows so that agreement with the full
model stays at or above ``agreement``. The graph itself is unchanged: the plan is attached to
it and ``slimfx.compile`` returns ``runtime.early_exit.EarlyExitModel``, which really exits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.errors import PassSpecError
from slimfx.ir.dominators import output_dominators
from slimfx.ir.graph import Graph
from slimfx.passes.base import Decision, Pass, PassContext, PassResult
from slimfx.passes.registry import register
from slimfx.runtime.early_exit import prediction_entropy
from slimfx.train.exits import distill_heads, train_branchynet

PLAN_KEY = "early_exits"


@dataclass
class ExitPlan:
    """What the runtime needs (cut nodes, heads, thresholds) and what the report shows."""

    cuts: list[str]
    heads: nn.ModuleList
    thresholds: list[float]
    stats: list[dict[str, Any]] = field(default_factory=list)
    full_macs_per_sample: float = 0.0
    expected_macs_per_sample: float = 0.0
    agreement: float = 0.0
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "exits": self.stats,
            "full_macs_per_sample": self.full_macs_per_sample,
            "expected_macs_per_sample": self.expected_macs_per_sample,
            "expected_mac_speedup": self.full_macs_per_sample / self.expected_macs_per_sample if self.expected_macs_per_sample else None,
            "agreement": self.agreement,
            "training_losses": self.losses,
        }


def choose_thresholds(
    entropies: Sequence[torch.Tensor], correct: Sequence[torch.Tensor], final_correct: torch.Tensor, required: float
) -> list[float]:
    """Greedy, first exit first: the highest entropy threshold per exit that keeps at least
    ``required`` rows correct overall (rows not yet answered count with the full model's result).
    """
    rows = len(final_correct)
    remaining = torch.ones(rows, dtype=torch.bool)
    settled = 0  # correct answers among rows that already left
    thresholds = []
    for entropy, right in zip(entropies, correct):
        candidates = remaining.nonzero().squeeze(1)
        order = candidates[torch.argsort(entropy[candidates], stable=True)]
        sorted_entropy = entropy[order]
        gained = torch.cumsum(right[order].long(), 0)
        lost = torch.cumsum(final_correct[order].long(), 0)
        base = settled + int(final_correct[order].sum())
        best = 0
        for m in range(len(order), 0, -1):
            tie_boundary = m == len(order) or sorted_entropy[m - 1] < sorted_entropy[m]
            if tie_boundary and base + int(gained[m - 1]) - int(lost[m - 1]) >= required - 1e-9:
                best = m
                break
        if best == 0:
            thresholds.append(-math.inf)
            continue
        thresholds.append(float(sorted_entropy[best - 1]))
        settled += int(gained[best - 1])
        remaining[order[:best]] = False
    return thresholds


@register
@dataclass(frozen=True)
class AddExits(Pass):
    """Early exits with trained heads and entropy thresholds; see the module docstring."""

    name = "add-exits"
    exact = False
    summary = "early exits (BranchyNet) at dominator nodes, self-distilled heads, entropy thresholds"
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

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        inputs, labels = self._calibration(ctx)
        graph.ensure_costs()
        output = next(n for n in graph.nodes() if n.op == "output")
        if not isinstance(output.args[0], fx.Node) or len(graph.info(output).outputs) != 1:
            return PassResult(False, (Decision("output", "declined", "the model must return one tensor of class scores"),))
        cuts, decisions = self._cuts(graph)
        if not cuts:
            reason = "no node dominates the output with work left after it: every path branches, so no exit can cut the model"
            return PassResult(False, tuple(decisions) + (Decision("model", "declined", reason),))
        heads = nn.ModuleList(self._head(graph, cut, graph.info(output).out_shape[-1]) for cut in cuts)
        extractor = _extractor(graph.module, cuts)
        rows = len(inputs)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(ctx.seed))
        held = order[: max(1, int(self.holdout * rows))]
        train = order[len(held):]
        batch = max(1, min(64, len(train)))
        train_batches = [train[i : i + batch] for i in range(0, len(train), batch)]
        if self.joint:
            losses = train_branchynet(extractor, heads, [(inputs[b], labels[b]) for b in train_batches],
                                      epochs=self.epochs, lr=self.lr, progress=ctx.progress)
        else:
            losses = distill_heads(extractor, heads, [inputs[b] for b in train_batches], temperature=self.temperature,
                                   epochs=self.epochs, lr=self.lr, progress=ctx.progress)
        heads.eval()
        plan = self._thresholds(graph, extractor, heads, cuts, inputs[held], None if labels is None else labels[held])
        plan.losses = losses
        graph.attachments[PLAN_KEY] = plan
        for cut, stat in zip(cuts, plan.stats):
            decisions.append(Decision(
                cut, "exit",
                f"exit {stat['exit']}: head {self.head} ({stat['head_macs_per_sample']:,} MACs/sample), entropy threshold "
                f"{stat['threshold']:.4g}; {stat['share']:.1%} of held-out rows leave here",
                details=stat,
            ))
        return PassResult(changed=True, decisions=tuple(decisions))

    # -- data ---------------------------------------------------------------------------------
    def _calibration(self, ctx: PassContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        if ctx.calib_data is None:
            raise PassSpecError("add-exits needs calibration data to train its heads: pass calib_data=[batch, ...] to slimfx.compile "
                                "(--calib on the command line)")
        xs, ys = [], []
        for item in ctx.calib_data:
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor) and item[1].dim() == 1:
                xs.append(item[0])
                ys.append(item[1])
            else:
                xs.append(item[0] if isinstance(item, (tuple, list)) else item)
        if not xs:
            raise PassSpecError("add-exits: calib_data is empty")
        if self.joint and len(ys) != len(xs):
            raise PassSpecError("add-exits: joint=true trains on labels: give calib_data as (inputs, labels) batches")
        inputs = torch.cat(xs)
        if len(inputs) < 10:
            raise PassSpecError(f"add-exits: {len(inputs)} calibration rows are too few to train heads and hold some out")
        return inputs, (torch.cat(ys) if len(ys) == len(xs) else None)

    # -- where ---------------------------------------------------------------------------------
    def _cuts(self, graph: Graph) -> tuple[list[str], list[Decision]]:
        dominators = [n for n in output_dominators(graph) if self._usable(graph, n)]
        cumulative = _cumulative_macs(graph)
        total = max(cumulative[next(n for n in graph.nodes() if n.op == "output").name], 1)
        candidates = [n for n in dominators if cumulative[n.name] < total]  # work left after it
        decisions: list[Decision] = []
        if self.at:
            chosen = []
            for path in self.at:
                node = self._node_for(graph, path)
                if node in candidates:
                    chosen.append(node.name)
                else:
                    why = ("a branch bypasses it (inside a residual block or concat), so it does not dominate the output"
                           if node not in dominators else "nothing but free ops follows it")
                    decisions.append(Decision(path, "declined", f"no exit after '{path}' (node {node.name}): {why}"))
            return chosen, decisions
        # of several cuts with the same MACs before them (conv -> BN -> ReLU -> pool), take the last
        block_ends = [n for i, n in enumerate(candidates)
                      if i + 1 == len(candidates) or cumulative[candidates[i + 1].name] > cumulative[n.name]]
        chosen = []
        for i in range(1, self.exits + 1):
            goal = total * i / (self.exits + 1)
            free = [n for n in block_ends if n.name not in chosen]
            if free:
                chosen.append(min(free, key=lambda n: abs(cumulative[n.name] - goal)).name)
        order = {n.name: i for i, n in enumerate(graph.nodes())}
        return sorted(set(chosen), key=order.__getitem__), decisions

    @staticmethod
    def _usable(graph: Graph, node: fx.Node) -> bool:
        info = graph.info(node)
        batch = graph.example_inputs[0].shape[0]
        return len(info.outputs) == 1 and len(info.out_shape) >= 2 and info.out_shape[0] == batch and info.outputs[0].dtype.is_floating_point

    @staticmethod
    def _node_for(graph: Graph, path: str) -> fx.Node:
        try:
            graph.module.get_submodule(path)
        except AttributeError:
            raise PassSpecError(f"add-exits: at={path!r} is not a module of the model; give module paths such as 'layer2'") from None
        inside = [n for n in graph.nodes() if path in (n.meta.get("nn_module_stack") or {}) or
                  (n.op == "call_module" and (str(n.target) == path or str(n.target).startswith(path + ".")))]
        if not inside:
            raise PassSpecError(f"add-exits: module {path!r} is never called in the traced graph")
        return inside[-1]

    def _head(self, graph: Graph, cut: str, classes: int) -> nn.Module:
        shape = graph.info(graph.node(cut)).out_shape
        channels = shape[1] if len(shape) > 2 else shape[-1]
        layers: list[nn.Module] = []
        if self.head == "conv-pool-linear" and len(shape) == 4:
            width = max(16, channels // 4)
            layers += [nn.Conv2d(channels, width, 1), nn.ReLU()]
            channels = width
        if len(shape) > 2:
            layers += [nn.AdaptiveAvgPool2d(1) if len(shape) == 4 else nn.AdaptiveAvgPool1d(1), nn.Flatten()]
        layers.append(nn.Linear(channels, classes))
        return nn.Sequential(*layers)

    # -- thresholds and cost ---------------------------------------------------------------------
    def _thresholds(self, graph: Graph, extractor: nn.Module, heads: nn.ModuleList, cuts: list[str],
                    inputs: torch.Tensor, labels: torch.Tensor | None) -> ExitPlan:
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
        full = cumulative[next(n for n in graph.nodes() if n.op == "output").name] / batch
        head_macs = [_head_macs(head, graph.info(graph.node(c)).out_shape) / batch for head, c in zip(heads, cuts)]
        stats, expected = [], 0.0
        for k, cut in enumerate(cuts):
            share = float((exit_of == k).float().mean())
            cost = cumulative[cut] / batch + sum(head_macs[: k + 1])
            expected += share * cost
            stats.append({"exit": k + 1, "node": cut, "threshold": thresholds[k], "share": share,
                          "head_macs_per_sample": int(head_macs[k]), "macs_to_exit_per_sample": cost,
                          "agreement_of_exit": float(correct[k][exit_of == k].float().mean()) if share else None})
        final_share = float((exit_of == len(cuts)).float().mean())
        expected += final_share * (full + sum(head_macs))
        stats.append({"exit": "full model", "share": final_share, "macs_to_exit_per_sample": full + sum(head_macs)})
        agreement = float(answer_right.float().mean()) if labels is None else float(answer_right.float().mean() / max(final_correct.float().mean(), 1e-12))
        return ExitPlan(cuts, heads, thresholds, stats, full, expected, agreement)


def _cumulative_macs(graph: Graph) -> dict[str, int]:
    """MACs of every node up to and including each node, in graph order."""
    running, result = 0, {}
    for node in graph.nodes():
        cost = graph.info(node).cost
        running += cost.cost.macs if cost is not None else 0
        result[node.name] = running
    return result


def _extractor(module: fx.GraphModule, cuts: list[str]) -> fx.GraphModule:
    """A module returning the values at ``cuts`` and then the model's output (shares weights)."""
    graph, env = fx.Graph(), {}
    result = graph.graph_copy(module.graph, env)
    by_name = {n.name: n for n in module.graph.nodes}
    graph.output((*[env[by_name[c]] for c in cuts], result))
    return fx.GraphModule(module, graph)


def _head_macs(head: nn.Module, shape: tuple[int, ...]) -> int:
    from slimfx.api import analyze

    return analyze(head, torch.zeros(shape)).totals.macs
