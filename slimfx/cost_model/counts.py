"""Per-node cost counts: MACs, element ops, params and bytes, from a registry of cost rules.

Units: MACs count multiply-accumulates of conv, linear, matmul and attention (FLOPs are
2 x MACs). Element ops count the per-element work of normalization, pooling, elementwise
ops and activations (one per output element; pooling one per window element). Bytes count
activation and weight traffic of ops that touch memory; views and shape arithmetic are free.
An op that no rule knows gets ``counted=False`` and is listed by the report: never zero in
silence.

The rules for torch's own layers and functions are registered here; other packages register
theirs for their own modules (``quant`` for its fake-quantized layers) with
``register_module_rule``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx.ir import ops
from slimfx.ir.graph import Graph, attribute
from slimfx.ir.meta import META_KEY, Cost, NodeCost, NodeInfo, TensorMeta, function_name
from slimfx.ir.shapes import ensure_shapes

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

    def with_module(self, module: nn.Module) -> Op:
        """The same node seen as running ``module`` (a wrapper's inner layer)."""
        return Op(self.node, module, self.outputs)

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


class NoRule(Exception):
    """A rule saw an op it cannot count; the message says why."""


# -- MAC formulas (pure) -------------------------------------------------------------------------
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


# -- rules ------------------------------------------------------------------------------------
def conv_cost(op: Op) -> Cost:
    """A conv module (transposed or not) on its input."""
    weight = tuple(op.module.weight.shape)
    if getattr(op.module, "transposed", False):
        return op.compute(macs=transposed_conv_macs(op.tensor_inputs()[0].numel, weight))
    return op.compute(macs=conv_macs(op.out_numel, weight))


def linear_cost(op: Op) -> Cost:
    """An nn.Linear on its input."""
    return op.compute(macs=op.out_numel * op.module.in_features)


def per_element(op: Op) -> Cost:
    """One element op per output element."""
    return op.compute(elem_ops=op.out_numel)


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
    queries, keys = q.shape[-2], k.shape[-2]
    return op.compute(
        macs=attention_macs(batch, queries, keys, q.shape[-1], v.shape[-1]), elem_ops=batch * queries * keys
    )


def _normalization(op: Op) -> Cost:
    """One element op per output element, and one more per activation a norm layer applies itself."""
    tail = ops.norm_activation_tail(op.module) or ()
    return op.compute(elem_ops=op.out_numel * (1 + sum(not isinstance(m, nn.Identity) for m in tail)))


def _per_input_element(op: Op) -> Cost:
    return op.compute(elem_ops=sum(t.numel for t in op.tensor_inputs()))


def _window_pool(op: Op) -> Cost:
    kernel = op.module.kernel_size if op.module is not None else op.value(1, "kernel_size")
    return op.compute(elem_ops=op.out_numel * _volume(kernel, len(op.out.shape) - 2))


def _volume(kernel: int | tuple[int, ...], spatial_dims: int) -> int:
    return kernel**spatial_dims if isinstance(kernel, int) else math.prod(kernel)


def _data_movement(op: Op) -> Cost:
    return Cost(bytes_read=op.in_bytes, bytes_written=op.out_bytes)


def _free(op: Op) -> Cost:
    return FREE


def _elementwise_or_scalar(op: Op) -> Cost:
    """Arithmetic on tensors is elementwise; on Python numbers (shape math) it is free."""
    return per_element(op) if op.outputs else FREE


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
    operands = list(op.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    shapes = [_resolve(o).shape for o in operands]
    macs = einsum_macs(equation, shapes)
    if macs is None:
        raise NoRule(f"einsum '{equation}' with {len(shapes)} operands is not counted")
    return op.compute(macs=macs, elem_ops=0 if macs else op.out_numel)


def _stochastic_depth(op: Op) -> Cost:
    training = op.value(3, "training", default=True)
    return per_element(op) if training else FREE


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


# -- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CostRule:
    """A named rule: ``count`` turns an ``Op`` into its ``Cost``."""

    name: str
    count: Rule


class CostRules:
    """Cost rules by module type (first registered match wins), function and tensor method."""

    def __init__(self) -> None:
        self._modules: list[tuple[tuple[type, ...], CostRule]] = []
        self._functions: dict[Any, CostRule] = {}
        self._methods: dict[str, CostRule] = {}

    def add_modules(self, types: Iterable[type], name: str, rule: Rule) -> None:
        self._modules.append((tuple(types), CostRule(name, rule)))

    def add_functions(self, functions: Iterable[Any], name: str, rule: Rule) -> None:
        for fn in functions:
            self._functions[fn] = CostRule(name, rule)

    def add_methods(self, methods: Iterable[str], name: str, rule: Rule) -> None:
        for method in methods:
            self._methods[method] = CostRule(name, rule)

    def add(self, ops_: ops.OpSet, name: str, rule: Rule) -> None:
        """Every module, function and method of an op set."""
        if ops_.modules:
            self.add_modules(ops_.modules, name, rule)
        self.add_functions(ops_.functions, name, rule)
        self.add_methods(ops_.methods, name, rule)

    def lookup(self, node: fx.Node, module: nn.Module | None) -> CostRule | str:
        """The rule for a node, or a sentence saying why none applies."""
        if node.op == "call_module":
            for types, rule in self._modules:
                if isinstance(module, types):
                    return rule
            return f"no cost rule for module type {type(module).__module__}.{type(module).__name__}"
        if node.op == "call_function":
            _register_torchvision_rules()
            return self._functions.get(node.target) or f"no cost rule for function {function_name(node.target)}"
        if node.op == "call_method":
            return self._methods.get(str(node.target)) or f"no cost rule for tensor method .{node.target}()"
        return f"no cost rule for {node.op} nodes"


RULES = CostRules()


def register_module_rule(types: Iterable[type], name: str, rule: Rule) -> None:
    """Teach the cost model a module type (e.g. a package's own wrapper layers)."""
    RULES.add_modules(types, name, rule)


def _register_builtin_rules(rules: CostRules) -> None:
    # modules: the first registered type that matches wins
    rules.add_modules((nn.modules.conv._ConvNd,), "conv", conv_cost)
    rules.add_modules((nn.Linear,), "linear", linear_cost)
    rules.add_modules((nn.Bilinear,), "bilinear", _bilinear)
    rules.add_modules((nn.MultiheadAttention,), "attention", _multihead_attention)
    rules.add_modules(ops.NORMALIZATIONS, "normalization", _normalization)
    rules.add_modules(ops.WINDOW_POOLS.modules, "pooling", _window_pool)
    rules.add_modules(ops.ADAPTIVE_POOLS.modules, "pooling", _per_input_element)
    rules.add_modules((ops.ACTIVATIONS | ops.CHANNEL_ACTIVATIONS | ops.SOFTMAX).modules, "activation", per_element)
    rules.add_modules(ops.RESAMPLE.modules, "resample", per_element)
    rules.add_modules((nn.Embedding,), "lookup", _data_movement)
    rules.add_modules(ops.PADDING.modules, "data movement", _data_movement)
    rules.add_modules((ops.IDENTITY | ops.RESHAPES | ops.DROPOUT).modules, "view", _free)
    # functions and tensor methods
    arithmetic = (
        ops.BINARY_ARITHMETIC | ops.SCALAR_ARITHMETIC | ops.UNARY_MATH | ops.ACTIVATIONS | ops.SOFTMAX | ops.CLAMP
    )
    rules.add_functions(
        (*arithmetic.functions, *ops.NORM_FUNCTIONS, F.interpolate, F.dropout), "elementwise", _elementwise_or_scalar
    )
    rules.add_methods(arithmetic.methods, "elementwise", _elementwise_or_scalar)
    rules.add_functions(ops.COMPARISONS.functions, "scalar", _free)
    rules.add_functions((ops.VIEWS | ops.SIZES).functions, "view", _free)
    rules.add_methods((ops.VIEWS | ops.SIZES).methods, "view", _free)
    rules.add_functions(ops.COPIES.functions, "data movement", _data_movement)
    rules.add_methods((ops.COPIES | ops.CASTS).methods, "data movement", _data_movement)
    rules.add_functions((*ops.REDUCTIONS.functions, *ops.ADAPTIVE_POOLS.functions), "reduction", _per_input_element)
    rules.add_methods(ops.REDUCTIONS.methods, "reduction", _per_input_element)
    rules.add_functions(ops.WINDOW_POOLS.functions, "pooling", _window_pool)
    rules.add(ops.MATMULS, "matmul", _matmul)
    rules.add_functions((torch.einsum,), "matmul", _einsum)
    rules.add_functions((F.scaled_dot_product_attention,), "attention", _sdpa)
    rules.add_functions((F.linear,), "linear", _functional_linear)
    rules.add_functions((F.conv1d, F.conv2d, F.conv3d), "conv", _functional_conv)


_register_builtin_rules(RULES)
_torchvision_registered = False


def _register_torchvision_rules() -> None:
    """Rules for torchvision functions that fx keeps whole (they are ``torch.fx.wrap``-ed);
    registered on first need so that torchvision stays optional."""
    global _torchvision_registered
    if _torchvision_registered:
        return
    _torchvision_registered = True
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:
        return
    RULES.add_functions((stochastic_depth,), "stochastic depth", _stochastic_depth)
    for name, rule_name, rule in [
        ("shifted_window_attention", "attention", _shifted_window_attention),
        ("_get_relative_position_bias", "data movement", _data_movement),
        ("_patch_merging_pad", "data movement", _data_movement),
    ]:
        if hasattr(swin_transformer, name):
            RULES.add_functions((getattr(swin_transformer, name),), rule_name, rule)


# -- applying the rules -----------------------------------------------------------------------
_STRUCTURAL_OPS = {"placeholder", "output", "get_attr"}


def count_node(node: fx.Node, module: Any) -> NodeCost:
    """The cost of one node whose NodeInfo (shapes) is current; ``module`` is what a
    call_module runs or what a get_attr fetches."""
    if node.op in _STRUCTURAL_OPS:
        params = module.numel() if isinstance(module, nn.Parameter) else 0  # a get_attr owns its parameter
        return NodeCost(Cost(params=params), "structural")
    found = RULES.lookup(node, module)
    if isinstance(found, str):
        return NodeCost(FREE, found, counted=False)
    op = Op(node, module, node.meta[META_KEY].outputs)
    try:
        return NodeCost(found.count(op), found.name)
    except NoRule as why:
        return NodeCost(FREE, str(why), counted=False)
    except (AttributeError, IndexError, TypeError) as exc:  # arguments the rule did not expect
        return NodeCost(FREE, f"{found.name} rule could not read its arguments ({exc})", counted=False)


class _ModuleFlopCounter(fx.Interpreter):
    """Runs the graph, counting FLOPs inside the given modules with ``FlopCounterMode``."""

    def __init__(self, module: fx.GraphModule, targets: frozenset[str]):
        super().__init__(module)
        self.targets, self.flops = targets, {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if str(target) not in self.targets:
            return super().call_module(target, args, kwargs)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            result = super().call_module(target, args, kwargs)
        self.flops[str(target)] = self.flops.get(str(target), 0) + counter.get_total_flops()
        return result


def measure_modules(graph: Graph, targets: frozenset[str]) -> dict[str, int]:
    """MACs (FLOPs / 2, by ``FlopCounterMode``) of the modules at ``targets``, from one run of
    the graph on its example inputs: modules kept whole (opaque ones branch on values; a user's
    leaf module has no rule) are measured, not counted."""
    counter = _ModuleFlopCounter(graph.module, targets)
    with torch.no_grad():
        counter.run(*graph.example_inputs)
    return {target: flops // 2 for target, flops in counter.flops.items()}


def annotate_costs(graph: Graph) -> None:
    """Store a ``NodeCost`` in every node's NodeInfo (shapes must be current). A module without
    a cost rule (opaque, or a leaf the user named) is measured: its MACs by ``FlopCounterMode``,
    its own parameters and bytes counted."""
    costs = {}
    for node in graph.nodes():
        if node.op == "call_module":
            target = graph.submodule(node)
        elif node.op == "get_attr":
            target = attribute(graph.module, str(node.target))
        else:
            target = None
        costs[node] = (target, count_node(node, target))
    whole = frozenset(str(n.target) for n, (_, c) in costs.items() if n.op == "call_module" and not c.counted)
    measured = measure_modules(graph, whole) if whole else {}
    for node, (target, cost) in costs.items():
        if node.op == "call_module" and str(node.target) in measured:
            kind = "opaque module" if str(node.target) in graph.opaque else "leaf module without a cost rule"
            op = Op(node, target, node.meta[META_KEY].outputs)
            cost = NodeCost(op.compute(macs=measured[str(node.target)]), f"measured by FlopCounterMode ({kind})")
        node.meta[META_KEY] = replace(node.meta[META_KEY], cost=cost)


def ensure_costs(graph: Graph) -> None:
    """Make sure every node carries current shapes and cost counts (cached per graph version)."""
    ensure_shapes(graph)
    graph.cached("costs", lambda: annotate_costs(graph))


def sum_costs(graph: Graph) -> Cost:
    """Sum of the annotated node costs; a module or attribute used by several nodes counts its
    params once. Costs must be current (``ensure_costs``)."""
    total = Cost()
    seen: set[str] = set()
    for node in graph.nodes():
        cost = graph.info(node).cost.cost
        if node.op in ("call_module", "get_attr"):
            if str(node.target) in seen:
                cost = cost.without_params()
            seen.add(str(node.target))
        total = total + cost
    return total


def total_cost(graph: Graph) -> Cost:
    """The graph's total cost, counting first where the counts are stale."""
    ensure_costs(graph)
    return sum_costs(graph)
