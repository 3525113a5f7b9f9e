"""Predicted latency: per kernel the runtime really runs, from measured tables or the roofline.

A runtime does not run the graph's nodes one by one: onnxruntime folds a BatchNorm into the
conv before it and runs the activation (and on x86 a residual add) inside the conv kernel,
torch's int8 kernels carry their ReLU, graph runtimes make views free. ``kernels`` groups a
graph's nodes by the runtime's ``FusionRules``; ``predict`` prices each kernel from the
profile's layer table when it holds the configuration (or a width sweep of the same layer,
read on its staircase), else by the roofline, and adds the runtime's per-call overhead. Pure
functions of a graph with current costs and a ``RuntimeProfile``: measuring is in
``backends/profiler.py``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.counts import ensure_costs
from slimfx.cost_model.device import (
    LayerConfig,
    LayerTiming,
    OpClass,
    Roofline,
    RuntimeProfile,
    family_of,
    padded_work,
    round_up,
    signature_family,
)
from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.ir.meta import Cost, function_name

_STRUCTURAL = ("placeholder", "output", "get_attr")
PredictedRuntime = Literal["torch", "torch-int8", "onnxruntime", "onnxruntime-int8"]  # the keys of FUSION_RULES


@dataclass(frozen=True)
class FusionRules:
    """What one runtime merges into a conv or linear kernel, and whether views cost anything."""

    runtime: str
    folds_batchnorm: bool  # a BatchNorm right after a conv runs inside it
    fuses_add: bool  # a residual add right after a conv runs inside it (onnxruntime's NCHWc "Sum")
    activations: frozenset[str]  # activations that run inside the conv or linear kernel before them
    free_views: bool  # views and shape queries cost nothing (graph runtimes); else each costs view_overhead
    boundary_copies: bool  # a layer measured alone converts its input and output (layout or Q/DQ)


FUSION_RULES: dict[str, FusionRules] = {
    "torch": FusionRules("torch", False, False, frozenset(), False, False),
    "torch-int8": FusionRules("torch-int8", False, False, frozenset(), False, True),
    "onnxruntime": FusionRules(
        "onnxruntime",
        True,
        True,
        frozenset({"relu", "clip", "sigmoid", "tanh", "leaky_relu", "hardsigmoid"}),
        True,
        True,
    ),
    "onnxruntime-int8": FusionRules("onnxruntime-int8", True, False, frozenset({"relu", "clip"}), True, True),
}

_ACTIVATION_NAMES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "clip",
    nn.Hardtanh: "clip",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.LeakyReLU: "leaky_relu",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardswish: "hardswish",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
}


def rules_for(runtime: str) -> FusionRules:
    """The fusion rules of ``runtime`` (a runtime without rules here has no latency model)."""
    if runtime not in FUSION_RULES:
        from slimfx.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"no latency model for runtime {runtime}; predicted latency covers {', '.join(FUSION_RULES)}"
        )
    return FUSION_RULES[runtime]


@dataclass(frozen=True)
class Kernel:
    """Nodes the runtime runs as one kernel: the first is the anchor, the rest are fused into it."""

    nodes: tuple[str, ...]
    op_class: OpClass
    cost: Cost
    config: LayerConfig | None = None  # the table key of a conv or linear kernel
    signature: str | None = None  # the table key of any other kernel that can be measured alone

    @property
    def key(self) -> str | None:
        """What the kernel's timing is stored under: its layer configuration or its signature."""
        return self.config.key() if self.config is not None else self.signature


@dataclass(frozen=True)
class KernelPrediction:
    """A kernel's predicted milliseconds and where the figure came from."""

    kernel: Kernel
    ms: float
    source: str  # "table", "sweep" (a measured width sweep), "roofline", "free"


@dataclass(frozen=True)
class LatencyPrediction:
    """A graph's predicted latency on one runtime: per kernel, and the per-call overhead."""

    runtime: str
    batch: int
    threads: int
    profile: str | None  # the profile file, None for one held in memory
    kernels: tuple[KernelPrediction, ...]
    overhead_ms: float

    @property
    def kernels_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    @property
    def total_ms(self) -> float:
        return self.kernels_ms + self.overhead_ms

    def node_ms(self) -> dict[str, float]:
        """Node name -> ms: a kernel's time on its anchor, 0 on the nodes fused into it."""
        found: dict[str, float] = {}
        for prediction in self.kernels:
            anchor, *fused = prediction.kernel.nodes
            found[anchor] = prediction.ms
            found.update(dict.fromkeys(fused, 0.0))
        return found

    def fused_into(self) -> dict[str, str]:
        """Node name -> the anchor it runs inside, for every fused node."""
        return {n: p.kernel.nodes[0] for p in self.kernels for n in p.kernel.nodes[1:]}

    def source_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for prediction in self.kernels:
            counts[prediction.source] = counts.get(prediction.source, 0) + 1
        return counts


# -- pure pricing ----------------------------------------------------------------------------------
def roofline_ms(cost: Cost, op_class: OpClass, roofline: Roofline) -> float:
    """A kernel's time by the roofline: fixed overhead plus the larger of compute and memory time."""
    if op_class is OpClass.VIEW:
        return roofline.view_overhead_ms
    compute = cost.macs / roofline.macs_per_ms(op_class) + cost.elem_ops / roofline.elements_per_ms
    memory = (cost.bytes_read + cost.bytes_written) / roofline.bytes_per_ms
    return roofline.kernel_overhead_ms + max(compute, memory)


def staircase_ms(sweep: Sequence[tuple[float, float]], work: float) -> float:
    """Latency at padded ``work`` (or channels) read off a measured sweep of (work, ms) points:
    linear between points, proportional to the work below the first and above the last (never
    along a segment's slope, which noise can make negative). Padding the work to the channel
    step beforehand is what makes it a staircase."""
    points = sorted(sweep)
    if not points:
        raise ValueError("an empty sweep has no latency to read")
    first_work, first_ms = points[0]
    if work <= first_work:
        return first_ms * work / first_work if first_work > 0 else first_ms
    for (w0, t0), (w1, t1) in zip(points, points[1:]):
        if work <= w1:
            return t0 + (t1 - t0) * (work - w0) / (w1 - w0) if w1 > w0 else t1
    last_work, last_ms = points[-1]
    return last_ms * work / last_work if last_work > 0 else last_ms


def find_channel_step(widths: Sequence[int], ms: Sequence[float], flatness: float = 0.15) -> int:
    """The channel step of a kernel from latencies measured at evenly spaced widths: the
    largest of 4, 8, 16, 32, 64 whose plateaus (widths rounding up to the same multiple) rise
    one after another while the points stray from their plateau's median, typically (the
    median deviation: one slow run does not count), by at most ``flatness`` times the typical
    rise between plateaus; 1 when none does (latency then grows with every channel, or the
    widths are too far apart to tell)."""
    by_width = dict(zip(widths, ms))
    best = 1
    for step in (4, 8, 16, 32, 64):
        plateaus: dict[int, list[float]] = {}
        for width, value in sorted(by_width.items()):
            plateaus.setdefault(-(-width // step), []).append(value)
        groups = [plateaus[k] for k in sorted(plateaus)]
        if len(groups) < 2 or not any(len(values) > 1 for values in groups):
            continue  # the widths are at least a step apart, or all on one plateau: nothing to see
        medians = [statistics.median(values) for values in groups]
        rises = [after - before for before, after in zip(medians, medians[1:])]
        stray = statistics.median(abs(v - m) for values, m in zip(groups, medians) for v in values)
        if min(rises) > 0 and stray <= flatness * statistics.median(rises):
            best = step
    return best


def table_ms(config: LayerConfig, profile: RuntimeProfile) -> tuple[float, str] | None:
    """A conv or linear kernel's ms from the profile's tables: the exact configuration, else the
    width sweeps of the same layer (``swept_ms``, of a layer at least as wide where there is one);
    None when neither."""
    exact = profile.tables.get(config.key())
    if exact is not None:
        return exact.ms, "table"
    swept = [t for t in profile.families().get(family_of(config.key()), []) if t.swept]
    if not swept:
        return None
    step = profile.channel_step
    work = padded_work(config.in_channels, config.out_channels, config.groups, step)

    def distance(timing: LayerTiming) -> tuple[bool, float]:
        """Layers at least as wide first (read between their points, not beyond), then the nearest."""
        wider = timing.in_channels >= config.in_channels and timing.out_channels >= config.out_channels
        return (not wider, abs(padded_work(timing.in_channels, timing.out_channels, timing.groups, step) - work))

    ms = swept_ms(min(swept, key=distance), config.in_channels, config.out_channels, step)
    return max(ms, profile.roofline.kernel_overhead_ms), "sweep"


def swept_ms(timing: LayerTiming, in_channels: int, out_channels: int, step: int) -> float:
    """A layer's ms at other channel counts, from its measured sweeps: its time scaled by the
    input-channel sweep's ratio at ``in_channels`` times the output-channel sweep's at
    ``out_channels``, each read on the staircase (channels rounded up to the step; a depthwise
    layer has one sweep, of both together)."""

    def ratio(sweep: Sequence[tuple[int, float]], full: int, channels: int) -> float:
        points = {round_up(width, step): ms for width, ms in sweep}
        points[round_up(full, step)] = timing.ms
        return staircase_ms([(float(w), ms) for w, ms in points.items()], float(round_up(channels, step))) / timing.ms

    if timing.ms <= 0:
        return 0.0
    if timing.groups > 1 and timing.groups == timing.in_channels:  # depthwise
        return timing.ms * ratio(timing.out_sweep, timing.out_channels, out_channels)
    scale_in = ratio(timing.in_sweep, timing.in_channels, in_channels) if timing.in_sweep else 1.0
    scale_out = ratio(timing.out_sweep, timing.out_channels, out_channels) if timing.out_sweep else 1.0
    return timing.ms * scale_in * scale_out


def signature_ms(kernel: Kernel, profile: RuntimeProfile) -> tuple[float, str] | None:
    """A kernel's ms from its measured signature, else from a measured kernel of the same ops
    on other channel counts, scaled by the elements moved (such kernels are memory bound)."""
    exact = profile.tables.get(kernel.signature or "")
    if exact is not None:
        return exact.ms, "table"
    family = signature_family(kernel.signature or "")
    moved = kernel.cost.bytes_read + kernel.cost.bytes_written
    relatives = [t for t in profile.families().get(family, []) if t.moved_bytes > 0]
    if not relatives or moved <= 0:
        return None
    nearest = min(relatives, key=lambda t: abs(t.moved_bytes - moved))
    fixed = profile.roofline.kernel_overhead_ms
    return fixed + max(nearest.ms - fixed, 0.0) * moved / nearest.moved_bytes, "scaled"


# -- grouping nodes into kernels -------------------------------------------------------------------
def activation_name(graph: Graph, node: fx.Node) -> str | None:
    """The activation a node applies to its one input, by the names fusion rules use."""
    if node.op == "call_module":
        return _ACTIVATION_NAMES.get(type(graph.submodule(node)))
    relu = ops.relu_type(node, graph.submodule)
    if relu is not None:
        return "relu" if relu is nn.ReLU else "clip"
    return None


def layer_config(graph: Graph, node: fx.Node, fused: tuple[str, ...] = ()) -> LayerConfig | None:
    """The table key of a conv or linear module call (a quantized layer counts as its inner layer)."""
    if node.op != "call_module":
        return None
    module = graph.submodule(node)
    dtype = "fp32"
    inner = getattr(module, "layer", None)
    if inner is not None and hasattr(module, "weight_scale"):  # quant.layers.QuantizedLayer
        dtype = "int8" if getattr(module, "scheme", "int8") != "block" else "fp32"
        activation = getattr(module, "activation", None)
        if activation is not None and type(activation) in _ACTIVATION_NAMES:
            fused = (_ACTIVATION_NAMES[type(activation)], *fused)
        module = inner
    inputs = node.all_input_nodes
    if not inputs:
        return None
    in_meta = graph.info(inputs[0]).outputs
    if len(in_meta) != 1:
        return None
    return config_of(module, tuple(in_meta[0].shape), fused, dtype)


def config_of(
    module: nn.Module, in_shape: tuple[int, ...], fused: tuple[str, ...] = (), dtype: str = "fp32"
) -> LayerConfig | None:
    """The table key of a conv or linear layer on an input of ``in_shape``; None for other modules."""
    if isinstance(module, ops.CONVS):
        padding = module.padding
        if isinstance(padding, str):
            padding = (-1,) if padding == "same" else (0,) * (len(in_shape) - 2)
        return LayerConfig(
            f"conv{len(in_shape) - 2}d",
            in_shape,
            module.out_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            tuple(padding),
            tuple(module.dilation),
            module.groups,
            module.bias is not None,
            fused,
            dtype,
        )
    if isinstance(module, nn.Linear):
        return LayerConfig(
            "linear", in_shape, module.out_features, bias=module.bias is not None, fused=fused, dtype=dtype
        )
    return None


def op_class(graph: Graph, node: fx.Node) -> OpClass:
    """The roofline class of one node."""
    cost = graph.info(node).cost
    if cost is not None and cost.rule == "view":
        return OpClass.VIEW
    if node.op == "call_module":
        module = graph.submodule(node)
        module = getattr(module, "layer", module)
        if isinstance(module, ops.CONVS):
            if module.groups > 1 and module.groups == module.in_channels:
                return OpClass.DEPTHWISE_CONV
            if all(k == 1 for k in module.kernel_size):
                return OpClass.POINTWISE_CONV
            return OpClass.DENSE_CONV
        if isinstance(module, nn.Linear):
            return OpClass.LINEAR
    if cost is not None and cost.rule in ("matmul", "linear", "attention"):
        return OpClass.LINEAR
    if cost is not None and cost.rule == "conv":
        return OpClass.DENSE_CONV
    return OpClass.ELEMENTWISE


def kernels(graph: Graph, rules: FusionRules) -> list[Kernel]:
    """The graph's nodes grouped into the kernels ``rules``' runtime runs, in graph order.

    A conv absorbs, in this order and each only when it is the sole user of what came before,
    a BatchNorm (``folds_batchnorm``), a residual add (``fuses_add``) and an activation the
    rules name; a linear layer absorbs an activation. Structural nodes run no kernel.
    """
    ensure_costs(graph)
    taken: set[str] = set()
    found = []
    for node in graph.nodes():
        if node.op in _STRUCTURAL or node.name in taken:
            continue
        group = [node]
        config = layer_config(graph, node)
        if config is not None:
            group, fused = _absorb(graph, node, rules, config.op != "linear")
            config = layer_config(graph, node, fused)
        taken.update(n.name for n in group)
        cost = Cost()
        for member in group:
            cost = cost + graph.info(member).cost.cost
        kind = op_class(graph, node)
        signature = None if config is not None or kind is OpClass.VIEW else kernel_signature(graph, group)
        found.append(Kernel(tuple(n.name for n in group), kind, cost, config, signature))
    return found


def external_inputs(group: Sequence[fx.Node]) -> list[fx.Node]:
    """The nodes outside ``group`` whose values it reads, in first-use order."""
    inside, found = set(group), []
    for node in group:
        for source in node.all_input_nodes:
            if source not in inside and source not in found:
                found.append(source)
    return found


def kernel_signature(graph: Graph, group: Sequence[fx.Node]) -> str | None:
    """A key naming what a kernel computes and on what shapes, so that equal kernels share one
    measurement: per node its op, target (a module's type and settings) and constant arguments,
    and the shapes and dtypes of the tensors it reads. None when it cannot be run alone (an
    input that is not one tensor, an opaque or uncounted node)."""
    sources = external_inputs(group)
    metas = []
    for source in sources:
        outputs = graph.info(source).outputs
        if len(outputs) != 1:
            return None
        metas.append([list(outputs[0].shape), str(outputs[0].dtype)])
    position = {n: f"%{i}" for i, n in enumerate(sources)} | {n: f"@{i}" for i, n in enumerate(group)}
    described = []
    for node in group:
        info = graph.info(node)
        if info.cost is None or not info.cost.counted or str(node.target) in graph.opaque:
            return None
        if node.op == "call_module":
            target = f"{type(graph.submodule(node)).__qualname__}:{graph.submodule(node)}"
        else:
            target = f".{node.target}" if node.op == "call_method" else function_name(node.target)
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: position.get(n, "?"))
        described.append([node.op, target, repr(args)])
    return json.dumps([described, metas], separators=(",", ":"))


def _absorb(graph: Graph, anchor: fx.Node, rules: FusionRules, is_conv: bool) -> tuple[list[fx.Node], tuple[str, ...]]:
    group, fused = [anchor], []
    stages = ("batchnorm", "add", "activation") if is_conv else ("activation",)
    for stage in stages:
        users = list(group[-1].users)
        if len(users) != 1:
            break
        user = users[0]
        if stage == "batchnorm" and rules.folds_batchnorm and _is_batchnorm(graph, user):
            group.append(user)
            fused.append("batchnorm")
        elif stage == "add" and rules.fuses_add and _is_add(user):
            group.append(user)
            fused.append("add")
        elif stage == "activation":
            name = activation_name(graph, user)
            if name is not None and name in rules.activations:
                group.append(user)
                fused.append(name)
    return group, tuple(fused)


def _is_add(node: fx.Node) -> bool:
    """An add of two tensors (not a concat)."""
    return ops.join_inputs(node) is not None and (node.target in ops.ADDS.functions or node.target in ops.ADDS.methods)


def _is_batchnorm(graph: Graph, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(graph.submodule(node), ops.BATCHNORMS)


def predict(graph: Graph, profile: RuntimeProfile, threads: int, profile_path: str | None = None) -> LatencyPrediction:
    """``graph``'s predicted latency on ``profile``'s runtime (tables first, roofline otherwise)."""
    rules = rules_for(profile.runtime)
    priced = []
    for kernel in kernels(graph, rules):
        priced.append(_price(kernel, profile, rules))
    batch = graph.example_inputs[0].shape[0] if graph.example_inputs and graph.example_inputs[0].dim() else 1
    return LatencyPrediction(
        profile.runtime, int(batch), threads, profile_path, tuple(priced), profile.roofline.call_overhead_ms
    )


def _price(kernel: Kernel, profile: RuntimeProfile, rules: FusionRules) -> KernelPrediction:
    if kernel.op_class is OpClass.VIEW and rules.free_views:
        return KernelPrediction(kernel, 0.0, "free")
    if kernel.config is not None:
        found = table_ms(kernel.config, profile)
        if found is not None:
            return KernelPrediction(kernel, found[0], found[1])
    if kernel.signature is not None:
        found = signature_ms(kernel, profile)
        if found is not None:
            return KernelPrediction(kernel, found[0], found[1])
    return KernelPrediction(kernel, roofline_ms(kernel.cost, kernel.op_class, profile.roofline), "roofline")
