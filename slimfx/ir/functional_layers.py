"""Functional batch norms taken as the layers they stand for.

``F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, ...)``
in a module's own ``forward`` (a frozen BatchNorm, a custom norm layer) traces into a bare
call that no pass knows. When its statistics and affine parameters are constants of the
model (``get_attr`` nodes) and it normalizes with them (``training=False``), it is exactly an
``nn.BatchNorm{1,2,3}d`` in eval mode holding those tensors: capture puts one in its place, so
counting, folding, pruning and quantization treat it as the layer it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx.ir.graph import Graph, attribute
from slimfx.ir.meta import TakenLayer
from slimfx.ir.rewrite import Rewriter

_BATCHNORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def functional_batch_norms_as_layers(graph: Graph) -> tuple[TakenLayer, ...]:
    """Replace every functional batch norm over constant statistics by an eval-mode BatchNorm
    layer (at the path of the module that owns the tensors when it owns nothing else used)."""
    taken = []
    calls = [n for n in graph.nodes() if n.op == "call_function" and n.target is F.batch_norm]
    if not calls:
        return ()
    with Rewriter(graph, "capture") as rewriter:
        for node in calls:
            layer = _as_layer(graph, node)
            if layer is None:
                continue
            module, path, source = layer
            rewriter.replace_with_module(node, path, module, (source,))
            taken.append(TakenLayer(f"F.batch_norm at node '{node.name}'", path, type(module).__name__))
    return tuple(taken)


def _as_layer(graph: Graph, node: fx.Node) -> tuple[nn.Module, str, fx.Node] | None:
    """The BatchNorm layer ``node`` stands for, its path, and its input node; None if it is not one."""
    bound = _DEFAULTS | dict(zip(_ARGUMENTS, node.args)) | dict(node.kwargs)
    tensors = {k: bound.get(k) for k in ("running_mean", "running_var", "weight", "bias")}
    if bound["training"] is not False or not isinstance(bound["input"], fx.Node):
        return None
    if any(not _is_attribute(tensors[k]) for k in ("running_mean", "running_var")):
        return None  # statistics computed in the graph, or none: batch statistics
    if (tensors["weight"] is None) != (tensors["bias"] is None) or any(
        v is not None and not _is_attribute(v) for v in (tensors["weight"], tensors["bias"])
    ):
        return None
    rank = len(graph.info(bound["input"]).out_shape or ())
    if rank not in _BATCHNORM_BY_RANK or not isinstance(bound["eps"], float):
        return None
    values = {k: attribute(graph.module, str(v.target)) for k, v in tensors.items() if v is not None}
    channels = values["running_mean"].numel()
    momentum = bound["momentum"] if isinstance(bound["momentum"], float) else 0.1
    module = _BATCHNORM_BY_RANK[rank](channels, eps=bound["eps"], momentum=momentum, affine="weight" in values).eval()
    module.running_mean, module.running_var = values["running_mean"], values["running_var"]
    if "weight" in values:
        module.weight, module.bias = _parameter(values["weight"]), _parameter(values["bias"])
    return module, _path_for(graph, node, [str(v.target) for v in tensors.values() if v is not None]), bound["input"]


def _path_for(graph: Graph, node: fx.Node, targets: list[str]) -> str:
    """The owner's path when it owns only these tensors in the graph (the layer takes its
    place), else a new path inside the owner (``<owner>.batch_norm``), or at the top level."""
    owners = {t.rpartition(".")[0] for t in targets}
    owner = owners.pop() if len(owners) == 1 else ""
    if owner:
        inside = owner + "."
        reads = {str(n.target) for n in graph.nodes() if n.op == "get_attr" and str(n.target).startswith(inside)}
        calls = [n for n in graph.nodes() if n.op == "call_module" and str(n.target).startswith(inside)]
        if reads <= set(targets) and not calls and _readers_are(graph, targets, node):
            return owner
        return _unique_name(graph, inside + "batch_norm")
    return _unique_name(graph, node.name)


def _readers_are(graph: Graph, targets: list[str], node: fx.Node) -> bool:
    """Whether ``node`` is the only reader of the get_attr nodes of ``targets``."""
    readers = [n for n in graph.nodes() if n.op == "get_attr" and str(n.target) in targets]
    return all(set(r.users) == {node} for r in readers)


def _unique_name(graph: Graph, base: str) -> str:
    existing = dict(graph.module.named_modules()) | dict(graph.module.named_parameters())
    existing |= dict(graph.module.named_buffers())
    name, index = base, 1
    while name in existing:
        name, index = f"{base}_{index}", index + 1
    return name


def _is_attribute(value: Any) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _parameter(value: torch.Tensor) -> nn.Parameter:
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
