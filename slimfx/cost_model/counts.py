"""Per-node cost counts: MACs, element ops, params and bytes, one rule per op kind.

Units: MACs count multiply-accumulates of conv, linear, matmul and attention (FLOPs are
2 x MACs). Element ops count the per-element work of normalization, pooling, elementwise
ops and activations (one per output element; pooling one per window element). Bytes count
activation and weight traffic of ops that touch memory; views and shape arithmetic are free.
An op that no rule knows gets ``counted=False`` and is listed by the report: never zero in
silence.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx.ir.nodeinfo import META_KEY, NodeInfo, TensorMeta, function_name
from slimfx.quant.modules import ActivationQuant, QuantizedLayer

if TYPE_CHECKING:
    from slimfx.ir.graph import Graph


@dataclass(frozen=True)
class Cost:
    """Counts that add up: over nodes, over a graph."""

    macs: int = 0
    elem_ops: int = 0
    params: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True)
class NodeCost:
    """The cost of one node and the rule that computed it (``counted=False``: no rule)."""

    cost: Cost
    rule: str
    counted: bool = True


FREE = Cost()


# -- the view a rule gets of its node ----------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """What a cost rule may look at: the node, its module, input and output tensor metas."""

    node: fx.Node
    module: nn.Module | None
    outputs: tuple[TensorMeta, ...]

    def value(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``index`` (or keyword ``name``), with nodes replaced by their TensorMeta."""
        if index < len(self.node.args):
            raw = self.node.args[index]
        elif name is not None and name in self.node.kwargs:
            raw = self.node.kwargs[name]
        else:
            return default
        return _resolve(raw)

    def tensor_inputs(self) -> list[TensorMeta]:
        metas = []
        for inp in self.node.all_input_nodes:
            info = inp.meta.get(META_KEY)
            if isinstance(info, NodeInfo) and len(info.outputs) == 1:
                metas.append(info.outputs[0])
        return metas

    @property
    def out(self) -> TensorMeta:
        return self.outputs[0]

    @property
    def out_numel(self) -> int:
        return sum(t.numel for t in self.outputs)

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    @property
    def in_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensor_inputs())

    def module_param_stats(self) -> tuple[int, int]:
        """(numel, bytes) of the module's parameters."""
        if self.module is None:
            return 0, 0
        params = list(self.module.parameters())
        return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)

    def compute(self, macs: int = 0, elem_ops: int = 0) -> Cost:
        """A cost that reads inputs and weights and writes outputs."""
        numel, nbytes = self.module_param_stats()
        return Cost(macs, elem_ops, numel, self.in_bytes + nbytes, self.out_bytes)


def _resolve(raw: Any) -> Any:
    if isinstance(raw, fx.Node):
        info = raw.meta.get(META_KEY)
        if isinstance(info, NodeInfo) and len(info.outputs) == 1:
            return info.outputs[0]
        return None
    if isinstance(raw, (list, tuple)):
        return type(raw)(_resolve(r) for r in raw)
    return raw


Rule = Callable[[Op], Cost]


# -- rules ------------------------------------------------------------------------------------
def conv_macs(out_numel: int, weight_shape: tuple[int, ...]) -> int:
    """Conv: every output element takes (Cin / groups) x kernel volume multiply-adds."""
    return out_numel * math.prod(weight_shape[1:])


def transposed_conv_macs(in_numel: int, weight_shape: tuple[int, ...]) -> int:
    """Transposed conv: every input element scatters into (Cout / groups) x kernel volume."""
    return in_numel * math.prod(weight_shape[1:])


def matmul_macs(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """``torch.matmul`` semantics: 1-D operands promoted, batch dims broadcast."""
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    m, k, n = a2[-2], a2[-1], b2[-1]
    batch = torch.broadcast_shapes(a2[:-2], b2[:-2])
    return math.prod(batch) * m * k * n


def einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int | None:
    """Multiply-adds of a one- or two-operand einsum: the product of every index size."""
    lhs = equation.replace(" ", "").split("->")[0]
    terms = lhs.split(",")
    if len(terms) != len(shapes) or len(terms) > 2 or any("..." in t for t in terms):
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        if len(term) != len(shape):
            return None
        sizes.update(zip(term, shape))
    return math.prod(sizes.values()) if len(terms) == 2 else 0


def attention_macs(batch: int, q_len: int, kv_len: int, qk_dim: int, v_dim: int) -> int:
    """Scores Q K^T plus the weighted sum with V, summed over batch x heads."""
    return batch * q_len * kv_len * (qk_dim + v_dim)


def _conv(op: Op) -> Cost:
    weight = tuple(op.module.weight.shape)
    if getattr(op.module, "transposed", False):
        return op.compute(macs=transposed_conv_macs(op.tensor_inputs()[0].numel, weight))
    return op.compute(macs=conv_macs(op.out_numel, weight))


def _linear(op: Op) -> Cost:
    return op.compute(macs=op.out_numel * op.module.in_features)


def _bilinear(op: Op) -> Cost:
    return op.compute(macs=op.out_numel * op.module.in1_features * op.module.in2_features)


def _multihead_attention(op: Op) -> Cost:
    """nn.MultiheadAttention: in-projections, attention and out-projection."""
    mha: nn.MultiheadAttention = op.module
    q, k, v = (op.value(i, n) for i, n in enumerate(("query", "key", "value")))
    seq_dim = 1 if mha.batch_first else 0
    batch = q.shape[1 - seq_dim] if len(q.shape) == 3 else 1
    q_len, kv_len = q.shape[seq_dim if len(q.shape) == 3 else 0], k.shape[seq_dim if len(k.shape) == 3 else 0]
    e = mha.embed_dim
    projections = batch * (q_len * e * e + kv_len * mha.kdim * e + kv_len * mha.vdim * e + q_len * e * e)
    attention = attention_macs(batch, q_len, kv_len, e, e)  # summed over heads: head_dim x heads = e
    softmax = batch * mha.num_heads * q_len * kv_len
    return op.compute(macs=projections + attention, elem_ops=softmax)


def _sdpa(op: Op) -> Cost:
    q, k, v = op.value(0, "query"), op.value(1, "key"), op.value(2, "value")
    batch = math.prod(q.shape[:-2])
    l, s = q.shape[-2], k.shape[-2]
    return op.compute(macs=attention_macs(batch, l, s, q.shape[-1], v.shape[-1]), elem_ops=batch * l * s)


def _per_element(op: Op) -> Cost:
    return op.compute(elem_ops=op.out_numel)


def _per_input_element(op: Op) -> Cost:
    return op.compute(elem_ops=sum(t.numel for t in op.tensor_inputs()))


def _window_pool(op: Op) -> Cost:
    kernel = op.module.kernel_size if op.module is not None else op.value(1, "kernel_size")
    return op.compute(elem_ops=op.out_numel * _volume(kernel, len(op.out.shape) - 2))


def _volume(kernel: int | tuple[int, ...], spatial_dims: int) -> int:
    return kernel**spatial_dims if isinstance(kernel, int) else math.prod(kernel)


def _data_movement(op: Op) -> Cost:
    return Cost(bytes_read=op.in_bytes, bytes_written=op.out_bytes)


def _view(op: Op) -> Cost:
    return FREE


def _elementwise_or_scalar(op: Op) -> Cost:
    """Arithmetic on tensors is elementwise; on Python numbers (shape math) it is free."""
    return _per_element(op) if op.outputs else FREE


def _matmul(op: Op) -> Cost:
    a, b = op.value(0), op.value(1)
    return op.compute(macs=matmul_macs(a.shape, b.shape))


def _functional_linear(op: Op) -> Cost:
    weight = op.value(1, "weight")
    return op.compute(macs=op.out_numel * weight.shape[-1])


def _functional_conv(op: Op) -> Cost:
    return op.compute(macs=conv_macs(op.out_numel, op.value(1, "weight").shape))


def _einsum(op: Op) -> Cost:
    equation = op.value(0, "equation")
    operands = [v for v in op.node.args[1:]]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    shapes = [_resolve(o).shape for o in operands]
    macs = einsum_macs(equation, shapes)
    if macs is None:
        raise _NoRule(f"einsum '{equation}' with {len(shapes)} operands is not counted")
    return op.compute(macs=macs, elem_ops=0 if macs else op.out_numel)


def _stochastic_depth(op: Op) -> Cost:
    training = op.value(3, "training", default=True)
    return _per_element(op) if training else FREE


def _shifted_window_attention(op: Op) -> Cost:
    """torchvision Swin window attention (an fx-wrapped function): qkv, attention, proj."""
    x = op.value(0, "input")
    window = op.value(4, "window_size")
    b, h, w, c = x.shape
    hp = math.ceil(h / window[0]) * window[0]
    wp = math.ceil(w / window[1]) * window[1]
    tokens = b * hp * wp
    per_window = window[0] * window[1]
    heads = op.value(5, "num_heads")
    macs = tokens * c * 3 * c + attention_macs(tokens, 1, per_window, c, c) + tokens * c * c
    return op.compute(macs=macs, elem_ops=tokens * per_window * heads)


class _NoRule(Exception):
    """A rule saw an op it cannot count; the message says why."""


def _quantized_layer(op: Op) -> Cost:
    """A fake-quantized conv or linear costs what the layer inside it costs, plus its fused activation."""
    inner = Op(op.node, op.module.layer, op.outputs)
    cost = _linear(inner) if isinstance(op.module.layer, nn.Linear) else _conv(inner)
    return cost if op.module.activation is None else cost + Cost(elem_ops=op.out_numel)


# -- rule tables ------------------------------------------------------------------------------
_MODULE_RULES: list[tuple[tuple[type, ...], str, Rule]] = [
    ((nn.modules.conv._ConvNd,), "conv", _conv),
    ((QuantizedLayer,), "quantized layer", _quantized_layer),
    ((ActivationQuant,), "quantize/dequantize", _per_element),
    ((nn.Linear,), "linear", _linear),
    ((nn.Bilinear,), "bilinear", _bilinear),
    ((nn.MultiheadAttention,), "attention", _multihead_attention),
    (
        (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm),
        "normalization",
        _per_element,
    ),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "pooling", _window_pool),
    (
        (
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
        ),
        "pooling",
        _per_input_element,
    ),
    (
        (
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
            nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
            nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Threshold, nn.GLU,
        ),
        "activation",
        _per_element,
    ),
    ((nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle), "resample", _per_element),
    ((nn.Embedding,), "lookup", _data_movement),
    ((nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d), "data movement", _data_movement),
    ((nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd), "view", _view),
]

_ELEMENTWISE_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.sigmoid, torch.tanh, torch.relu, torch.exp,
    torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.pow, torch.clamp, torch.where, torch.erf,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid,
    F.tanh, F.leaky_relu, F.elu, F.softplus, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
    F.layer_norm, F.group_norm,
    F.batch_norm, F.instance_norm, F.normalize, F.interpolate, F.dropout,
]
_SCALAR_FUNCTIONS = [operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch._assert]
_VIEW_FUNCTIONS = [
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.squeeze,
    torch.unsqueeze, torch.chunk, torch.split, torch.narrow, torch.t, operator.getitem, getattr,
]
_DATA_MOVEMENT_FUNCTIONS = [torch.cat, torch.stack, torch.roll, F.pad, torch.gather, torch.index_select]
_REDUCTION_FUNCTIONS = [
    torch.mean, torch.sum, torch.amax, torch.amin, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
]
_WINDOW_POOL_FUNCTIONS = [
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d,
]


@functools.cache
def _function_rules() -> dict[Any, tuple[str, Rule]]:
    rules: dict[Any, tuple[str, Rule]] = {}
    for fns, name, rule in [
        (_ELEMENTWISE_FUNCTIONS, "elementwise", _elementwise_or_scalar),
        (_SCALAR_FUNCTIONS, "scalar", _view),
        (_VIEW_FUNCTIONS, "view", _view),
        (_DATA_MOVEMENT_FUNCTIONS, "data movement", _data_movement),
        (_REDUCTION_FUNCTIONS, "reduction", _per_input_element),
        (_WINDOW_POOL_FUNCTIONS, "pooling", _window_pool),
        ([torch.matmul, operator.matmul, torch.bmm, torch.mm], "matmul", _matmul),
        ([torch.einsum], "matmul", _einsum),
        ([F.scaled_dot_product_attention], "attention", _sdpa),
        ([F.linear], "linear", _functional_linear),
        ([F.conv1d, F.conv2d, F.conv3d], "conv", _functional_conv),
    ]:
        for fn in fns:
            rules[fn] = (name, rule)
    rules.update(_torchvision_rules())
    return rules


def _torchvision_rules() -> dict[Any, tuple[str, Rule]]:
    """Rules for torchvision functions that fx keeps whole (they are ``torch.fx.wrap``-ed)."""
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:
        return {}
    rules: dict[Any, tuple[str, Rule]] = {stochastic_depth: ("stochastic depth", _stochastic_depth)}
    for name, rule_name, rule in [
        ("shifted_window_attention", "attention", _shifted_window_attention),
        ("_get_relative_position_bias", "data movement", _data_movement),
        ("_patch_merging_pad", "data movement", _data_movement),
    ]:
        if hasattr(swin_transformer, name):
            rules[getattr(swin_transformer, name)] = (rule_name, rule)
    return rules


_METHOD_RULES: dict[str, tuple[str, Rule]] = {
    **{m: ("view", _view) for m in (
        "view", "reshape", "permute", "transpose", "flatten", "unflatten", "size", "dim", "unsqueeze",
        "squeeze", "expand", "expand_as", "chunk", "split", "unbind", "narrow", "t", "view_as",
    )},
    **{m: ("data movement", _data_movement) for m in ("contiguous", "clone", "to", "float", "half", "repeat", "roll")},
    **{m: ("elementwise", _elementwise_or_scalar) for m in (
        "add", "sub", "mul", "div", "sigmoid", "tanh", "relu", "exp", "sqrt", "pow", "clamp",
        "masked_fill", "softmax", "neg", "abs", "add_", "mul_", "sigmoid_", "relu_",
    )},
    **{m: ("reduction", _per_input_element) for m in ("mean", "sum", "amax", "amin", "max", "min", "norm")},
    **{m: ("matmul", _matmul) for m in ("matmul", "bmm", "mm")},
}

_STRUCTURAL_OPS = {"placeholder", "output", "get_attr"}


# -- applying the rules -----------------------------------------------------------------------
def _lookup(node: fx.Node, module: nn.Module | None) -> tuple[str, Rule] | str:
    """The (rule name, rule) for a node, or a sentence saying why none applies."""
    if node.op == "call_module":
        for types, name, rule in _MODULE_RULES:
            if isinstance(module, types):
                return name, rule
        return f"no cost rule for module type {type(module).__module__}.{type(module).__name__}"
    if node.op == "call_function":
        found = _function_rules().get(node.target)
        return found or f"no cost rule for function {function_name(node.target)}"
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target)) or f"no cost rule for tensor method .{node.target}()"
    return f"no cost rule for {node.op} nodes"


def count_node(node: fx.Node, module: nn.Module | None) -> NodeCost:
    """The cost of one node whose NodeInfo (shapes) is current."""
    if node.op in _STRUCTURAL_OPS:
        return NodeCost(_attribute_cost(node, module), "structural")
    found = _lookup(node, module)
    if isinstance(found, str):
        return NodeCost(FREE, found, counted=False)
    name, rule = found
    op = Op(node, module, node.meta[META_KEY].outputs)
    try:
        return NodeCost(rule(op), name)
    except _NoRule as why:
        return NodeCost(FREE, str(why), counted=False)
    except (AttributeError, IndexError, TypeError) as exc:  # arguments the rule did not expect
        return NodeCost(FREE, f"{name} rule could not read its arguments ({exc})", counted=False)


def _attribute_cost(node: fx.Node, attribute: Any) -> Cost:
    """A ``get_attr`` of a Parameter owns that parameter's count."""
    if isinstance(attribute, nn.Parameter):
        return Cost(params=attribute.numel())
    return FREE


def annotate_costs(graph: Graph) -> None:
    """Store a ``NodeCost`` in every node's NodeInfo (shapes must be current)."""
    for node in graph.nodes():
        if node.op == "call_module":
            target = graph.submodule(node)
        elif node.op == "get_attr":
            target = _fetch_attr(graph.module, str(node.target))
        else:
            target = None
        node.meta[META_KEY] = replace(node.meta[META_KEY], cost=count_node(node, target))


def _fetch_attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def total_cost(graph: Graph) -> Cost:
    """Sum over nodes; a module or attribute used by several nodes counts its params once."""
    graph.ensure_costs()
    total = Cost()
    seen: set[str] = set()
    for node in graph.nodes():
        cost = node.meta[META_KEY].cost.cost
        if node.op in ("call_module", "get_attr"):
            if str(node.target) in seen:
                cost = Cost(cost.macs, cost.elem_ops, 0, cost.bytes_read, cost.bytes_written)
            seen.add(str(node.target))
        total = total + cost
    return total
