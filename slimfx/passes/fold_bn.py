"""fold-bn: fold an inference-mode BatchNorm into the conv or linear layer before it."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.counts import ensure_costs
from slimfx.details import Details
from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes.base import Action, Decision, Pass, PassContext, PassResult
from slimfx.passes.registry import register


@dataclass(frozen=True)
class FoldDetails(Details):
    """A folded BatchNorm: the element ops its removal saves."""

    elem_ops_saved: int | None


def fold_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of ``bn(layer(x))`` as one layer; output channels on ``weight``'s dim 0.

    ``bn(y) = (y - mean) / sqrt(var + eps) * gamma + beta``, so each output channel's weights
    scale by ``gamma / sqrt(var + eps)`` and the bias becomes ``(bias - mean) * scale + beta``.
    """
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = beta if beta is not None else torch.zeros_like(mean)
    bias = bias if bias is not None else torch.zeros_like(mean)
    folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = (bias - mean) * scale + shift
    return folded_weight, folded_bias


@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold each BatchNorm into the conv/linear whose output only it reads (exact)."""

    name = "fold-bn"
    exact = True
    summary = "fold BatchNorm into the preceding conv or linear layer (exact)"
    runs_after = {"prune-channels": "pruning reads the BatchNorm scales that fold-bn removes"}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ensure_costs(graph)
        decisions = []
        with Rewriter(graph, self.name) as rewriter:
            for bn_node in [n for n in graph.nodes() if self._is_batchnorm(graph, n)]:
                decisions.append(self._fold_one(graph, rewriter, bn_node))
        folded = any(d.action is Action.FOLDED for d in decisions)
        return PassResult(changed=folded, decisions=tuple(decisions))

    @staticmethod
    def _is_batchnorm(graph: Graph, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(graph.submodule(node), ops.BATCHNORMS)

    def _fold_one(self, graph: Graph, rewriter: Rewriter, bn_node: fx.Node) -> Decision:
        bn = graph.submodule(bn_node)
        bn_cost = graph.info(bn_node).cost
        target = str(bn_node.target)
        why_not = self._why_not(graph, bn_node, bn)
        if why_not:
            return Decision(target, Action.DECLINED, why_not)
        layer_node = bn_node.args[0]
        layer = graph.submodule(layer_node)
        macs = graph.info(layer_node).cost.cost.macs
        rewriter.replace_module(layer_node, _folded(layer, bn))
        kept = [m for m in ops.norm_activation_tail(bn) or () if not isinstance(m, nn.Identity)]
        if kept:  # a norm+activation layer: its activation stays where the layer was
            rewriter.replace_module(bn_node, kept[0] if len(kept) == 1 else nn.Sequential(*kept))
        else:
            rewriter.bypass(bn_node)
        stays = f"; its {', '.join(type(m).__name__ for m in kept)} stays" if kept else ""
        return Decision(
            target,
            Action.FOLDED,
            f"folded into {layer_node.target} ({type(layer).__name__}){stays}",
            macs_before=macs,
            macs_after=macs,
            details=FoldDetails(bn_cost.cost.elem_ops if bn_cost else None),
        )

    @staticmethod
    def _why_not(graph: Graph, bn_node: fx.Node, bn: nn.Module) -> str | None:
        if bn.training:
            return "BatchNorm is in training mode (batch statistics); call model.eval() before compiling"
        if bn.running_mean is None or bn.running_var is None:
            return "BatchNorm keeps no running statistics (track_running_stats=False)"
        producer = bn_node.args[0] if bn_node.args else None
        if len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(producer, fx.Node):
            return "BatchNorm is called with extra arguments"
        if producer.op != "call_module" or not isinstance(graph.submodule(producer), ops.WEIGHTED_LAYERS):
            what = graph.info(producer).kind
            return f"its input comes from {producer.name} ({what}), not a conv or linear layer"
        layer = graph.submodule(producer)
        readers = [u for u in producer.users if u is not bn_node and not _reads_only_shape(graph, u)]
        if readers:
            others = ", ".join(u.name for u in readers)
            return f"{producer.target}'s output is also read by {others}; folding would change them"
        why = graph.why_not_single_call(producer)
        if why is not None:
            return f"{producer.target}: {why}; folding it would change every call"
        if isinstance(layer, nn.Linear) and len(graph.info(producer).out_shape or ()) != 2:
            return "BatchNorm1d after a linear on a sequence normalizes dim 1, not the linear's features"
        out_channels = layer.out_channels if isinstance(layer, ops.CONVS) else layer.out_features
        if out_channels != bn.num_features:
            return f"{producer.target} has {out_channels} output channels but BatchNorm has {bn.num_features}"
        return None


def _reads_only_shape(graph: Graph, node: fx.Node) -> bool:
    """A size query (``x.shape``, ``x.ndim``, ``x.size(1)``): folding leaves what it reads alone."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device")
    return ops.SIZES.matches(node, graph.submodule)


def _folded(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    weight, bias = fold_bn_weights(
        layer.weight.detach(),
        None if layer.bias is None else layer.bias.detach(),
        bn.running_mean,
        bn.running_var,
        None if bn.weight is None else bn.weight.detach(),
        None if bn.bias is None else bn.bias.detach(),
        bn.eps,
    )
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(weight)
    folded.bias = nn.Parameter(bias)
    return folded
