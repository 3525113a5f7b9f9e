"""crelu: convs whose filters come in near-negated pairs compute each pair once (concatenated ReLU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.latency import PredictedRuntime
from slimfx.details import Details
from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.passes.base import Action, Decision, Pass
from slimfx.passes.fold_bn import FoldBatchNorm
from slimfx.passes.layer_rewrite import LayerRewrite, RewritePlan, RewriteRun
from slimfx.passes.registry import register
from slimfx.passes.rewrite_speed import PredictedSpeed, predicted_speed
from slimfx.rewrites.crelu import CReLUConv, channel_order, crelu_conv, filter_vectors, most_negated, negated_pairs


@dataclass(frozen=True)
class CReLUDetails(Details):
    """A conv whose negated filter pairs are computed once: the pairs, their worst cosine
    similarity, the relative weight error, the layers reordered and the predicted ms."""

    pairs: tuple[tuple[int, int], ...]
    worst_similarity: float
    weight_error: float
    reordered: tuple[str, ...]
    predicted_ms_before: float | None
    predicted_ms_after: float | None


@dataclass(frozen=True)
class CReLUPlan(RewritePlan):
    """How many pairs (the first ``pairs`` planned outputs are twinned by the last), their worst
    cosine similarity, the predicted speed."""

    pairs: int = 0
    worst_similarity: float = -1.0
    speed: PredictedSpeed | None = None


@register
@dataclass(frozen=True)
class CReLU(LayerRewrite):
    """Where a conv's output filters come in near-negated pairs (cosine similarity at most
    ``-similarity``), keep one filter per pair: conv (K + M outputs) then ``cat(u, -u[:, :K])``
    before the ReLU, the consumers' channels reordered (across residual adds). Exact when the
    pairs are exactly negated, biases included; BatchNorms are folded first."""

    name = "crelu"
    summary = "concatenated ReLU: near-negated filter pairs of a conv computed once"
    option_help = {
        "similarity": "pair filters whose cosine similarity is at most minus this (default 0.9; 1: exact pairs only)",
        "runtime": "decline a conv whose rewrite is predicted no faster on this runtime (torch, onnxruntime, ...)",
        "exclude": "module-path patterns (fnmatch: layer4.*) left alone",
        "fold_bn": "insert fold-bn before crelu (a BatchNorm between conv and ReLU breaks the pairing)",
    }
    runs_after = {"prune-channels": "pruning sees the original convs"}

    similarity: float = 0.9
    runtime: PredictedRuntime | None = None
    exclude: tuple[str, ...] = ()
    fold_bn: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.similarity <= 1:
            raise self.invalid("similarity", self.similarity, "a cosine similarity in (0, 1]")

    def requires(self) -> tuple[Pass, ...]:
        return (FoldBatchNorm(),) if self.fold_bn else ()

    def is_exact(self) -> bool:
        return self.similarity == 1

    def why_not(self, graph: Graph, node: fx.Node, conv: nn.Module) -> str | None:
        if conv.groups != 1:
            return f"a grouped conv ({conv.groups} groups)"
        users = list(node.users)
        if len(users) != 1 or ops.relu_type(users[0], graph.submodule) is None:
            return "its output does not go to a ReLU alone (fold-bn first where a BatchNorm sits between)"
        return None

    def plan(self, run: RewriteRun, node: fx.Node) -> CReLUPlan | Decision:
        conv = run.graph.submodule(node)
        vectors = filter_vectors(conv)
        pairs = negated_pairs(vectors, self.similarity)
        if not len(pairs):
            return run.declined(
                node,
                f"no filters come in negated pairs (cosine similarity <= -{self.similarity:g}); "
                f"the most negated pair has {most_negated(vectors):.3f}",
            )
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
        worst = float((unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(1).max())
        speed = None
        if self.runtime is not None:
            activation = _activation(run.graph, node)
            before, after = nn.Sequential(conv, activation), nn.Sequential(crelu_conv(conv, pairs), activation)
            speed = predicted_speed(before, after, run.in_shape(node), self.runtime, run.ctx.progress)
            if not speed.pays:
                return run.declined(node, f"{len(pairs)} negated pairs, but the rewrite is no faster: {speed}")
        return CReLUPlan(channel_order(pairs, conv.out_channels), len(pairs), worst, speed)

    def build(self, run: RewriteRun, node: fx.Node, plan: CReLUPlan, reordered: tuple[str, ...]) -> Decision:
        conv = run.graph.submodule(node)  # its outputs now in the planned order
        macs = run.macs(node)
        k, channels = plan.pairs, conv.out_channels
        pairs = torch.stack([torch.arange(k), torch.arange(channels - k, channels)], 1)
        replacement = crelu_conv(conv, pairs)
        run.rewriter.inline_module(node, replacement)
        weight_error = _weight_error(conv, replacement)
        after = macs * replacement.conv.out_channels // channels
        speed = plan.speed
        reason = (
            f"{k} of {channels} filters are negated twins of others, computed once "
            f"(cosine similarity <= {plan.worst_similarity:.3f}); weight error {weight_error:.3g} (relative)"
            + (f"; {len(reordered)} layers reordered" if reordered else "")
            + (f"; {speed}" if speed is not None else "")
        )
        details = CReLUDetails(
            tuple((int(i), int(j)) for i, j in zip(plan.order[:k].tolist(), plan.order[channels - k :].tolist())),
            plan.worst_similarity,
            weight_error,
            reordered,
            speed.before_ms if speed else None,
            speed.after_ms if speed else None,
        )
        return Decision(str(node.target), Action.REWRITTEN, reason, macs, after, weight_error, details)


def _activation(graph: Graph, node: fx.Node) -> nn.Module:
    """The ReLU (or ReLU6) module that the conv's sole user applies."""
    return ops.relu_type(next(iter(node.users)), graph.submodule)()


def _weight_error(conv: nn.Conv2d, replacement: CReLUConv) -> float:
    """Relative error of the filters the rewritten layer computes, against ``conv``'s (whose
    outputs are in the rewritten order)."""
    new = replacement.conv.weight.detach()
    rebuilt = torch.cat([new, -new[: replacement.pairs]])
    original = conv.weight.detach()
    return float((rebuilt - original).norm() / original.norm().clamp_min(1e-30))
