"""Fold the quantization of constant weights in an exported ONNX graph.

torch's exporter writes each fake-quantized weight as float initializer -> QuantizeLinear ->
DequantizeLinear. Folding the QuantizeLinear stores the weight as int8 (a quarter of the
bytes, as any int8 deployment ships it). A DequantizeLinear of a constant whose consumer
cannot become an int8 kernel (a Conv/Gemm/MatMul whose output is not quantized, like the
model's float head) would run on every inference; it is folded to the float values it
produces, the same numbers, computed once here.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

_INTEGER_KERNEL_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}
_FOLDED_ACTIVATIONS = {"Relu", "Clip"}


def _quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point)."""
    shape = [1] * x.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = -1
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x / scale.reshape(shape)) + zero_point.astype(np.int64).reshape(shape)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = -1
    return ((q.astype(np.int64) - zero_point.astype(np.int64).reshape(shape)) * scale.reshape(shape)).astype(np.float32)


class _Constants:
    """Constant tensors of a graph by name: initializers, Constant nodes, and Identity of either."""

    def __init__(self, graph: Any):
        from onnx import numpy_helper

        self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            elif node.op_type == "Identity" and node.input[0] in self.values:
                self.values[node.output[0]] = self.values[node.input[0]]

    def all(self, names: Any) -> bool:
        return all(n in self.values for n in names)


def fold_constant_quantization(model: Any) -> dict[str, int]:
    """Fold in place; returns how many QuantizeLinear and DequantizeLinear nodes were folded."""
    from onnx import numpy_helper

    graph = model.graph
    constants = _Constants(graph)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded: Counter[str] = Counter()
    new_initializers, removed = [], set()
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type == "QuantizeLinear" and len(node.input) == 3 and constants.all(node.input):
            x, scale, zero_point = (constants.values[n] for n in node.input)
            value = _quantize(x, scale, zero_point, axis)
        elif (node.op_type == "DequantizeLinear" and len(node.input) == 3 and constants.all(node.input)
              and not _feeds_integer_kernel(node, consumers)):
            q, scale, zero_point = (constants.values[n] for n in node.input)
            value = _dequantize(q, scale, zero_point, axis)
        else:
            continue
        constants.values[node.output[0]] = value
        new_initializers.append(numpy_helper.from_array(value, node.output[0]))
        removed.add(id(node))
        folded[node.op_type] += 1
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_initializers)
    _drop_unused(graph)
    return dict(folded)


def _feeds_integer_kernel(dq: Any, consumers: dict[str, list[Any]]) -> bool:
    """Whether some consumer of this DequantizeLinear can become an int8 kernel: a
    Conv/Gemm/MatMul whose output is quantized, or any other op (left alone to be safe)."""
    for user in consumers.get(dq.output[0], []):
        if user.op_type not in _INTEGER_KERNEL_OPS or _reaches_quantize(user, consumers):
            return True
    return False


def _reaches_quantize(node: Any, consumers: dict[str, list[Any]]) -> bool:
    """Whether the output of ``node`` goes into a QuantizeLinear, directly or through the
    Relu/Clip that onnxruntime folds into the quantization."""
    for user in consumers.get(node.output[0], []):
        if user.op_type == "QuantizeLinear" or user.op_type in _FOLDED_ACTIVATIONS and _reaches_quantize(user, consumers):
            return True
    return False


def _drop_unused(graph: Any) -> None:
    """Remove nodes and initializers nothing reads any more (a few passes: chains of Identity)."""
    while True:
        needed = {o.name for o in graph.output} | {name for node in graph.node for name in node.input}
        dead = [n for n in graph.node if n.op_type in ("Constant", "Identity") and not set(n.output) & needed]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    needed = {o.name for o in graph.output} | {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
