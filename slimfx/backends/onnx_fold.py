"""Fold the quantization of constant weights in an exported ONNX graph.

torch's exporter writes each fake-quantized weight as float initializer -> QuantizeLinear ->
DequantizeLinear. Folding the QuantizeLinear stores the weight as int8 (a quarter of the
bytes, as any int8 deployment ships it). A DequantizeLinear of a constant whose consumer
cannot become an int8 kernel (a Conv whose output is not quantized) would run on every
inference; it is folded to the float values it produces, the same numbers, computed once
here. A Gemm of two dequantized inputs (the model's float head) gets its bias as int32, so
onnxruntime runs it as QGemm with a float output.
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
    producers = {out: node for node in graph.node for out in node.output}
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
        elif (
            node.op_type == "DequantizeLinear"
            and len(node.input) == 3
            and constants.all(node.input)
            and not _feeds_integer_kernel(node, consumers, producers)
        ):
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
    folded["Gemm bias"] = _quantize_gemm_biases(graph, constants)
    _drop_unused(graph)
    return {k: v for k, v in folded.items() if v}


def _feeds_integer_kernel(dq: Any, consumers: dict[str, list[Any]], producers: dict[str, Any]) -> bool:
    """Whether some consumer of this DequantizeLinear can become an int8 kernel: a
    Conv/Gemm/MatMul whose output is quantized, a Gemm/MatMul whose other input is
    dequantized too (onnxruntime's QGemm and MatMulIntegerToFloat give float outputs), or any
    other op (left alone to be safe)."""
    for user in consumers.get(dq.output[0], []):
        if user.op_type not in _INTEGER_KERNEL_OPS or _reaches_quantize(user, consumers):
            return True
        other = producers.get(user.input[0]) if user.input[1] == dq.output[0] else None
        if user.op_type in ("Gemm", "MatMul") and other is not None and other.op_type == "DequantizeLinear":
            return True
    return False


def _quantize_gemm_biases(graph: Any, constants: _Constants) -> int:
    """Give each Gemm of two dequantized inputs its bias as int32 on the grid input scale x
    weight scale (zero point 0), as onnxruntime needs to fuse it into QGemm: the bias moves
    by at most half of that step, far below one step of the input."""
    from onnx import helper, numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    count = 0
    for gemm in [n for n in graph.node if n.op_type == "Gemm" and len(n.input) == 3]:
        a, b = producers.get(gemm.input[0]), producers.get(gemm.input[1])
        attrs = {x.name: helper.get_attribute_value(x) for x in gemm.attribute}
        if (
            a is None
            or b is None
            or a.op_type != "DequantizeLinear"
            or b.op_type != "DequantizeLinear"
            or gemm.input[2] not in constants.values
            or attrs.get("beta", 1.0) != 1.0
            or attrs.get("transB", 0) != 1
            or not (constants.all(a.input[1:2]) and constants.all(b.input[1:2]))
        ):
            continue
        bias = constants.values[gemm.input[2]].astype(np.float64)
        scale = (np.float64(constants.values[a.input[1]]) * constants.values[b.input[1]].astype(np.float64)).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        integers = np.rint(bias / scale).astype(np.int32)
        name = f"{gemm.input[2]}_int32"
        graph.initializer.extend(
            [
                numpy_helper.from_array(integers, name),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros_like(integers), f"{name}_zero_point"),
            ]
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [name, f"{name}_scale", f"{name}_zero_point"],
            [f"{name}_dequantized"],
            axis=0,
            name=f"{gemm.name}_bias_dequantize",
        )
        graph.node.insert(0, dq)
        gemm.input[2] = dq.output[0]
        count += 1
    return count


def _reaches_quantize(node: Any, consumers: dict[str, list[Any]]) -> bool:
    """Whether the output of ``node`` goes into a QuantizeLinear, directly or through the
    Relu/Clip that onnxruntime folds into the quantization."""
    for user in consumers.get(node.output[0], []):
        if (
            user.op_type == "QuantizeLinear"
            or user.op_type in _FOLDED_ACTIVATIONS
            and _reaches_quantize(user, consumers)
        ):
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


def signed_grids_as_int8(model: Any) -> int:
    """Store every signed uint8 grid (zero point 128) as int8 with zero point 0, in place;
    returns how many QuantizeLinear/DequantizeLinear nodes changed.

    The two grids hold the same values (``sat_u8(round(x / s) + 128) - 128 == sat_i8(round(x / s))``
    at the same scale), so the model means the same numbers: onnxruntime gives identical
    outputs for both. onnxruntime's x86 kernels prefer uint8 activations, so slimfx's export
    keeps them; OpenVINO runs a convolution on a signed int8 input without the zero-point
    compensation a uint8 one needs (its kernels round a little differently on the two paths:
    0.4% relative output difference on resnet18).
    """
    from onnx import numpy_helper

    constants = _Constants(model.graph)
    replacements: dict[str, str] = {}
    changed = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) != 3:
            continue
        zero_point = constants.values.get(node.input[2])
        if zero_point is None or zero_point.dtype != np.uint8 or zero_point.size != 1 or int(zero_point.item()) != 128:
            continue
        name = node.input[2]
        if name not in replacements:
            replacements[name] = f"{name}_as_int8"
            model.graph.initializer.append(
                numpy_helper.from_array(np.zeros(zero_point.shape, np.int8), replacements[name])
            )
        node.input[2] = replacements[name]
        changed += 1
    retyped = {
        n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in replacements.values()
    }
    kept = [v for v in model.graph.value_info if v.name not in retyped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    _drop_unused(model.graph)
    return changed
