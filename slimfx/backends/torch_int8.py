"""Run a quantized graph on torch's own int8 CPU kernels (``quantized::conv2d`` and friends).

``quantize`` leaves a fake-quant graph: float ops that simulate int8, good for calibration,
QAT and ONNX export, but no faster in torch. ``lower_int8`` rewrites it into a graph whose
tensors are real ``quint8`` tensors between int8 kernels (oneDNN engine when present):
layers become packed ``quantized::conv2d(_relu)`` / ``quantized::linear(_relu)`` calls,
quantized adds and concats become ``quantized::add(_relu)`` / ``quantized::cat``, and max
pools, average pools, ReLUs and reshapes run on the quantized tensors directly. Everything
else dequantizes its inputs and runs in float, and is listed in ``Lowered.float_ops``.

Only the core ``torch.ops.quantized`` kernels and quantized tensors are used, not
``torch.ao.quantization``'s FX API. torch 2.14 deprecates quantized tensors (pytorch#184982):
this runtime works while they exist, and ``lower_int8`` fails with a clear error once they do
not. The ONNX export is the route that does not depend on them.

The integer arithmetic rounds a little differently from the fake-quant simulation (the
kernels requantize in their own order); the tests bound the difference.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx.backends.early_exit import EarlyExitModel
from slimfx.errors import BackendError
from slimfx.ir import ops
from slimfx.ir.graph import attribute
from slimfx.ir.rewrite import GraphBuilder
from slimfx.quant.layers import ActivationQuant, QuantizedLayer

Grid = tuple[float, int]
PROVENANCE = "torch-int8"

# what torch's quantized CPU kernels run on a quint8 tensor, returning one on the same grid
_QUINT8_OPS = ops.op_set(
    (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Identity),
    (torch.relu, F.relu, F.max_pool2d, F.adaptive_avg_pool2d, F.avg_pool2d, torch.flatten, torch.reshape, F.dropout),
    ("relu", "flatten", "view", "reshape", "contiguous"),
)


class Int8Layer(nn.Module):
    """A conv2d or linear on int8 kernels: quint8 in, quint8 out, weights packed once."""

    def __init__(self, quantized: QuantizedLayer, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        layer = quantized.layer
        with _quantized_tensors_allowed():
            qweight = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
            )
        bias = None if layer.bias is None else layer.bias.detach().float()
        relu = quantized.activation is not None
        if isinstance(layer, nn.Conv2d):
            self.packed = torch.ops.quantized.conv2d_prepack(
                qweight, bias, list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups
            )
            self.kernel = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
        else:
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
            self.kernel = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
        self.output_scale, self.output_zero_point = quantized.output_scale, quantized.output_zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.packed, self.output_scale, self.output_zero_point)


@contextlib.contextmanager
def _quantized_tensors_allowed() -> Iterator[None]:
    """torch 2.14 deprecates creating quint8/qint8 tensors (pytorch#184982) and warns on each
    new call site; this runtime is built on them, and says so in its docs, so it asks once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated")
        yield


class QuantizePerTensor(nn.Module):
    """float -> quint8 on one grid (the entry into a chain of int8 kernels)."""

    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _quantized_tensors_allowed():
            return torch.quantize_per_tensor(x, self.scale, self.zero_point, torch.quint8)


@dataclass
class Lowered:
    """The lowered module, the int8 kernels it calls, and what still runs in float (and why)."""

    module: nn.Module  # a GraphModule, or an EarlyExitModel of lowered stages
    engine: str
    kernels: Counter[str] = field(default_factory=Counter)
    float_ops: list[str] = field(default_factory=list)


# oneDNN first: fbgemm (engines "x86", "fbgemm") adds u8 x s8 products pairwise in int16 on
# CPUs without VNNI and saturates; on efficientnet_b0 that cost 11 dB of SQNR (10.6 vs 21.7)
# at the same speed. The packed weights carry their engine, so packing decides.
ENGINE_PREFERENCE = ("onednn", "x86", "fbgemm", "qnnpack")


def choose_engine(supported: tuple[str, ...] | list[str]) -> str | None:
    """The int8 engine to pack for, from the ones this torch build supports."""
    return next((e for e in ENGINE_PREFERENCE if e in supported), None)


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def lower_int8(module: fx.GraphModule) -> Lowered:
    """A new GraphModule running ``module`` (a quantized slimfx graph) on int8 kernels."""
    engine = choose_engine(list(torch.backends.quantized.supported_engines))
    if engine is None:
        raise BackendError(
            "this torch build has no int8 CPU engine (torch.backends.quantized); use the ONNX export instead"
        )
    try:
        with _engine(engine):
            return _Lowering(module, engine).run()
    except (AttributeError, RuntimeError, NotImplementedError) as exc:  # kernels missing from this torch build
        raise BackendError(
            f"torch's int8 kernels failed here ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "use the ONNX export for int8 speed"
        ) from exc


class _Lowering:
    def __init__(self, source: fx.GraphModule, engine: str):
        self.source, self.engine = source, engine
        self.builder = GraphBuilder(PROVENANCE)
        self.env: dict[fx.Node, Any] = {}
        self.grids: dict[fx.Node, Grid] = {}  # new-graph values that are quint8 tensors
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.float_notes: dict[fx.Node, str] = {}  # new nodes that run in float next to int8 ones
        self.kernels: Counter[str] = Counter()

    def run(self) -> Lowered:
        for node in self.source.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.builder.copy(node, lambda n: n)
            elif node.op == "output":
                self.builder.output(fx.node.map_arg(node.args[0], lambda n: self._float(self.env[n])))
            elif node.op == "call_module" and isinstance(self._module(node), QuantizedLayer):
                self.env[node] = self._layer(node)
            elif node.op == "call_module" and isinstance(self._module(node), ActivationQuant):
                self.env[node] = self._activation_quant(node)
            elif self._keeps_grid(node) and node.args[0] in self.env and self.env[node.args[0]] in self.grids:
                self.env[node] = self._copy(node, keep=True)
                self.grids[self.env[node]] = self.grids[self.env[node.args[0]]]
            else:
                self.env[node] = self._copy(node, keep=False)
        lowered = self.builder.build()  # drops the float adds that int8 adds replaced
        alive = set(lowered.graph.nodes)
        return Lowered(
            lowered, self.engine, self.kernels, [note for node, note in self.float_notes.items() if node in alive]
        )

    # -- values ---------------------------------------------------------------------------
    def _module(self, node: fx.Node) -> nn.Module:
        return self.source.get_submodule(str(node.target))

    def _float(self, value: Any) -> Any:
        """The value as a float tensor (dequantized once, on first need)."""
        if isinstance(value, fx.Node) and value in self.grids:
            if value not in self.dequantized:
                self.dequantized[value] = self.builder.call_method("dequantize", (value,))
            return self.dequantized[value]
        return value

    def _quantized(self, value: fx.Node, grid: Grid) -> fx.Node:
        """The value as a quint8 tensor on ``grid`` (re-quantized if it is on another one)."""
        if self.grids.get(value) == grid:
            return value
        name = f"quantize_{len([k for k in self.builder.modules if k.startswith('quantize_')])}"
        node = self.builder.call_module(name, QuantizePerTensor(*grid), (self._float(value),))
        self.grids[node] = grid
        self.kernels["quantize_per_tensor"] += 1
        return node

    def _copy(self, node: fx.Node, keep: bool) -> fx.Node:
        """The node as it was; inputs dequantized unless ``keep`` (an op that takes quint8)."""
        lookup = (lambda n: self.env[n]) if keep else (lambda n: self._float(self.env[n]))
        copy = self.builder.copy(node, lookup)
        if node.op in ("call_module", "get_attr"):
            self.builder.modules[str(node.target)] = attribute(self.source, str(node.target))
        touches_int8 = any(self.env.get(n) in self.grids for n in node.all_input_nodes)
        if touches_int8 and not keep:
            self.float_notes[copy] = f"{node.name}: {_describe(node)} has no int8 kernel here; runs in float"
        return copy

    def _keeps_grid(self, node: fx.Node) -> bool:
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        return _QUINT8_OPS.matches(node, self._module)

    # -- quantized ops --------------------------------------------------------------------
    def _layer(self, node: fx.Node) -> fx.Node:
        layer: QuantizedLayer = self._module(node)
        why = _why_float(layer)
        source = self.env[node.args[0]]
        if layer.frozen and layer.output_scale is None and layer.act_bits == 8 and layer.weight_grid() is not None:
            name = str(node.target).replace(".", "_") + "_float"  # float output: a float kernel, weights baked in
            on_grid = self._quantized(source, (layer.input_scale, layer.input_zero_point))
            call = self.builder.call_module(name, _float_layer(layer), (self._float(on_grid),))
            self.float_notes[call] = (
                f"{node.target}: its output stays float (the model's output); float kernel, int8-grid weights"
            )
            return call
        if why is not None:  # the fake-quant layer itself, on float input: same numbers, float speed
            call = self.builder.call_module(str(node.target), layer, (self._float(source),))
            self.float_notes[call] = f"{node.target}: {why}; runs as fake quantization in float"
            return call
        weight, scale = layer.weight_grid()
        name = str(node.target).replace(".", "_") + "_int8"
        kind = "conv2d" if isinstance(layer.layer, nn.Conv2d) else "linear"
        self.kernels[f"quantized::{kind}" + ("_relu" if layer.activation is not None else "")] += 1
        on_grid = self._quantized(source, (layer.input_scale, layer.input_zero_point))
        out = self.builder.call_module(name, Int8Layer(layer, weight, scale), (on_grid,))
        self.grids[out] = (layer.output_scale, layer.output_zero_point)
        return out

    def _activation_quant(self, node: fx.Node) -> fx.Node:
        quant: ActivationQuant = self._module(node)
        grid = (quant.scale, quant.zero_point)
        fused = self._fused_join(node.args[0], grid)
        return fused if fused is not None else self._quantized(self.env[node.args[0]], grid)

    def _fused_join(self, read: fx.Node, grid: Grid) -> fx.Node | None:
        """``quantized::add(_relu)`` or ``quantized::cat`` for an add/concat of quint8 tensors
        whose output (or the ReLU after it) this quantizer quantizes."""
        join, relu = read, False
        if (
            ops.relu_type(read, self._module) is nn.ReLU and len(read.args[0].users) == 1
        ):  # not ReLU6: add_relu clips at 0 only
            join, relu = read.args[0], True
        joined = ops.join_inputs(join)
        if joined is None or any(self.env.get(a) not in self.grids for a in joined):
            return None
        inputs = [self.env[a] for a in joined]
        if join.target in ops.CONCATS.functions:
            if relu:
                return None
            kind, args = "cat", (inputs, join.args[1] if len(join.args) > 1 else join.kwargs.get("dim", 0))
        else:
            kind, args = "add_relu" if relu else "add", tuple(inputs)
        self.kernels[f"quantized::{kind}"] += 1
        out = self.builder.call_function(getattr(torch.ops.quantized, kind), (*args, grid[0], grid[1]))
        self.grids[out] = grid
        return out


def _float_layer(quantized: QuantizedLayer) -> nn.Module:
    """The layer with its quantized weights baked in (and its fused activation), run in float."""
    layer = copy.deepcopy(quantized.layer)
    with torch.no_grad():
        layer.weight.copy_(quantized.weight_grid()[0])
    return layer if quantized.activation is None else nn.Sequential(layer, quantized.activation)


def _why_float(layer: QuantizedLayer) -> str | None:
    """Why a quantized layer cannot run on an int8 kernel, or None when it can."""
    if not layer.frozen:
        return "not calibrated"
    if layer.output_scale is None:
        return "its output stays float (the model's output)"
    if not isinstance(layer.layer, (nn.Conv2d, nn.Linear)):
        return f"no int8 kernel used here for {type(layer.layer).__name__}"
    if layer.act_bits == 1:
        return "sign activations"
    if layer.weight_grid() is None:
        return "block weights have no per-channel int8 grid"
    if isinstance(layer.activation, nn.ReLU6) and layer.output_scale * 255 > 6 + 1e-6:
        return "ReLU6 clips inside its output range"
    if layer.activation is not None and not isinstance(layer.activation, (nn.ReLU, nn.ReLU6)):
        return f"fused {type(layer.activation).__name__}"
    return None


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    return getattr(node.target, "__name__", str(node.target))


def lower_int8_model(module: nn.Module) -> Lowered:
    """``lower_int8`` for a compiled model: a quantized graph, or an early-exit model whose
    stages are lowered one by one (its exit heads stay in float)."""
    if not isinstance(module, EarlyExitModel):
        if not isinstance(module, fx.GraphModule):
            raise BackendError(f"int8 lowering needs a graph module, not a {type(module).__name__}")
        return lower_int8(module)
    stages = [lower_int8(stage) for stage in module.stages]
    kernels: Counter[str] = sum((stage.kernels for stage in stages), Counter())
    runtime = EarlyExitModel([stage.module for stage in stages], module.heads, module.thresholds)
    return Lowered(runtime, stages[0].engine, kernels, [op for stage in stages for op in stage.float_ops])


def has_quantized_layers(module: nn.Module) -> bool:
    """Whether ``module`` holds slimfx's fake-quantized layers (a graph ``quantize`` produced)."""
    return any(isinstance(m, (QuantizedLayer, ActivationQuant)) for m in module.modules())
