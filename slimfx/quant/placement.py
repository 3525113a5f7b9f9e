"""Where activations are quantized, so that onnxruntime runs whole chains of ops in int8.

onnxruntime fuses a float op into its int8 kernel when every tensor input comes straight from
a DequantizeLinear and the output goes straight into a QuantizeLinear (QLinearConv,
QLinearAdd, QLinearConcat, QLinearGlobalAveragePool). These functions read the fx graph and
say which ops can be fused that way:

- a ReLU/ReLU6 that alone follows a conv or linear is folded into the layer, whose output is
  then quantized after it (a non-negative grid: all 256 levels on values that occur);
- an add or concat whose inputs are all quantized, and a pool whose input is, gets its output
  quantized (after the ReLU that alone follows it, if any); a max pool's output keeps its
  input's grid, so that quantizer changes no value and only tells onnxruntime to pool in uint8;
- ops that keep values on their input's grid (ReLU, max pool, flatten, reshape, dropout...)
  pass that grid on, so the next quantize reuses it and quantizes nothing twice.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx.ir.graph import Graph

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {torch.relu: nn.ReLU, F.relu: nn.ReLU, F.relu6: nn.ReLU6}
_RELU_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU}

# values of the output are values of the (single tensor) input: the grid carries over
_GRID_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.Identity)
_GRID_FUNCTIONS = {torch.relu, F.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, torch.flatten, torch.reshape, torch.squeeze,
                   torch.unsqueeze, torch.transpose, torch.permute, operator.getitem}
_GRID_METHODS = {"relu", "relu_", "flatten", "unflatten", "view", "reshape", "permute", "transpose", "contiguous",
                 "squeeze", "unsqueeze"}

_JOIN_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat}
_JOIN_METHODS = {"add", "add_"}
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d}


def relu_kind(module_of: Callable[[fx.Node], nn.Module], node: fx.Node) -> type[nn.Module] | None:
    """nn.ReLU or nn.ReLU6 when ``node`` applies one to its first input (and nothing else), else
    None; ``module_of`` finds a call_module node's module."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        module = module_of(node)
        return type(module) if type(module) in _RELU_MODULES else None
    if set(node.kwargs) - {"inplace"}:
        return None
    if node.op == "call_function":
        positional = 2 if node.target in (F.relu, F.relu6) else 1  # F.relu(x, inplace)
        return _RELU_FUNCTIONS.get(node.target) if len(node.args) <= positional else None
    if node.op == "call_method" and len(node.args) == 1:
        return _RELU_METHODS.get(str(node.target))
    return None


def sole_relu_user(graph: Graph, node: fx.Node) -> fx.Node | None:
    """The ReLU/ReLU6 that is ``node``'s only user, if there is one."""
    users = list(node.users)
    if len(users) == 1 and users[0].args[:1] == (node,) and relu_kind(graph.submodule, users[0]) is not None:
        return users[0]
    return None


def keeps_grid(graph: Graph, node: fx.Node) -> bool:
    """True when every output value of ``node`` is a value of its first (tensor) input."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    sizes_from_nodes = node.target in (torch.reshape, "view", "reshape")  # x.view(x.size(0), -1)
    if len(node.all_input_nodes) != 1 and not sizes_from_nodes:
        return False
    return calls_one_of(node, graph.submodule, _GRID_MODULES, _GRID_FUNCTIONS, _GRID_METHODS)


def calls_one_of(node: fx.Node, module_of: Callable[[fx.Node], nn.Module], modules: tuple[type, ...],
                 functions: set[Any], methods: set[str]) -> bool:
    """Whether ``node`` calls a module of one of the ``modules`` types, one of the ``functions``,
    or one of the ``methods`` (by name); ``module_of`` finds a call_module node's module."""
    if node.op == "call_module":
        return isinstance(module_of(node), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def grid_source(graph: Graph, node: fx.Node) -> fx.Node:
    """The node whose values ``node`` carries: ``node`` itself, or what it reads through
    grid-keeping ops (ReLU, max pool, reshape...)."""
    while keeps_grid(graph, node):
        node = node.args[0]
    return node


def join_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The tensors an add or concat of two or more tensors joins; None for any other node."""
    if node.op == "call_function" and node.target in _JOIN_FUNCTIONS:
        tensors = node.args[0] if node.target in (torch.cat, torch.concat) else node.args[:2]
    elif node.op == "call_method" and node.target in _JOIN_METHODS:
        tensors = node.args[:2]
    else:
        return None
    if node.target in (torch.add, "add", "add_") and "alpha" in node.kwargs:
        return None
    if isinstance(tensors, (list, tuple)) and len(tensors) >= 2 and all(isinstance(t, fx.Node) for t in tensors):
        return list(tensors)
    return None


def is_pool(graph: Graph, node: fx.Node) -> bool:
    """An average or max pool (module or function)."""
    return calls_one_of(node, graph.submodule, _POOL_MODULES, _POOL_FUNCTIONS, set())
