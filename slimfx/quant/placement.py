"""Where activations are quantized, so that onnxruntime runs whole chains of ops in int8.

onnxruntime fuses a float op into its int8 kernel when every tensor input comes straight from
a DequantizeLinear and the output goes straight into a QuantizeLinear (QLinearConv,
QLinearAdd, QLinearConcat, QLinearGlobalAveragePool). These functions (with
``ir.ops.join_inputs`` and ``ir.ops.relu_type``) read the fx graph and say which ops can be
fused that way:

- a ReLU/ReLU6 that alone follows a conv or linear is folded into the layer, whose output is
  then quantized after it (a non-negative grid: all 256 levels on values that occur);
- an add or concat whose inputs are all quantized, and a pool whose input is, gets its output
  quantized (after the ReLU that alone follows it, if any); a max pool's output keeps its
  input's grid, so that quantizer changes no value and only tells onnxruntime to pool in uint8;
- ops that keep values on their input's grid (ReLU, max pool, flatten, reshape, dropout...)
  pass that grid on, so the next quantize reuses it and quantizes nothing twice.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from slimfx.ir import ops
from slimfx.ir.graph import Graph


def sole_relu_user(graph: Graph, node: fx.Node) -> fx.Node | None:
    """The ReLU/ReLU6 that is ``node``'s only user, if there is one."""
    users = list(node.users)
    if len(users) == 1 and users[0].args[:1] == (node,) and ops.relu_type(users[0], graph.submodule) is not None:
        return users[0]
    return None


def keeps_grid(graph: Graph, node: fx.Node) -> bool:
    """True when every output value of ``node`` is a value of its first (tensor) input."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    sizes_from_nodes = node.target in (torch.reshape, "view", "reshape")  # x.view(x.size(0), -1)
    if len(node.all_input_nodes) != 1 and not sizes_from_nodes:
        return False
    return ops.VALUE_PRESERVING.matches(node, graph.submodule)


def grid_source(graph: Graph, node: fx.Node) -> fx.Node:
    """The node whose values ``node`` carries: ``node`` itself, or what it reads through
    grid-keeping ops (ReLU, max pool, reshape...)."""
    while keeps_grid(graph, node):
        node = node.args[0]
    return node


_POOLS = ops.op_set(
    (*ops.WINDOW_POOLS.modules, *ops.ADAPTIVE_AVG_POOLS.modules),
    (*ops.WINDOW_POOLS.functions, *ops.ADAPTIVE_AVG_POOLS.functions),
)


def is_pool(graph: Graph, node: fx.Node) -> bool:
    """An average or max pool (module or function)."""
    return _POOLS.matches(node, graph.submodule)
