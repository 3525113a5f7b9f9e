"""Layers with quantize/dequantize on their input and weights, built from core torch fake-quant ops.

``torch.fake_quantize_per_tensor_affine`` and ``..._per_channel_affine`` round to the integer
grid and back in float, with straight-through gradients (so the layers also train), and
export to ONNX as QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8
kernels (QLinearConv, QLinearMatMul).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.cost_model.counts import Cost, Op, conv_cost, linear_cost, per_element, register_module_rule
from slimfx.quant.schemes import SCHEME_BITS, binarize_activation, quantize_weight

WEIGHT_QMIN, WEIGHT_QMAX = -128, 127  # int8 weights, symmetric (zero point 0)
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations: the fast path of onnxruntime's x86 kernels


def activation_qparams(threshold: float, non_negative: bool) -> tuple[float, int]:
    """Scale and zero point of uint8 activations covering [0, T] or [-T, T]."""
    threshold = max(threshold, 1e-30)  # tiny but non-zero ranges (random-init nets) stay usable
    if non_negative:
        return threshold / ACT_QMAX, 0
    return 2 * threshold / (ACT_QMAX - ACT_QMIN), 128


REDUCED_QMAX = 63  # 7-bit weights: uint8 x int8 pair sums stay within int16 on CPUs without VNNI


def weight_scales(weight: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Per-output-channel symmetric scales: max |w| of the channel / ``qmax`` (127, or 63 for
    the reduced range), so the stored integers lie in [-qmax, qmax] of the int8 type."""
    top = weight.detach().abs().reshape(weight.shape[0], -1).amax(1)
    return (top / qmax).clamp_min(1e-12).float()


class QuantizedLayer(nn.Module):
    """A conv or linear layer (and the ReLU fused after it, if any) on fake-quantized input
    (per tensor) and weights (per channel), with its output quantized too when
    ``output_scale`` is set.

    Built unfrozen, it runs in float so that calibration sees the float activations;
    ``freeze`` sets the activation grids.
    """

    def __init__(
        self,
        layer: nn.Module,
        activation: nn.Module | None = None,
        scheme: str = "int8",
        block_size: int = 16,
        act_bits: int = 8,
        weight_qmax: int = WEIGHT_QMAX,
    ):
        super().__init__()
        self.layer = layer
        self.activation = activation
        self.scheme, self.block_size, self.act_bits = scheme, int(block_size), int(act_bits)
        self.weight_qmax = int(weight_qmax)  # int8 weights' largest integer: 127, or 63 (reduced range)
        self.input_scale: float | None = None
        self.input_zero_point = 0
        self.output_scale: float | None = None
        self.output_zero_point = 0
        self.register_buffer("weight_scale", weight_scales(layer.weight, self.weight_qmax))
        self.register_buffer("weight_zero_point", torch.zeros(layer.weight.shape[0], dtype=torch.int32))

    def freeze(
        self, input_scale: float, input_zero_point: int, output_scale: float | None = None, output_zero_point: int = 0
    ) -> QuantizedLayer:
        """Quantize from now on: the input on (input_scale, input_zero_point), the output on
        (output_scale, output_zero_point) unless output_scale is None (a float output)."""
        if self.act_bits == 1:  # sign activations: -1 and +1 lie exactly on this uint8 grid
            input_scale, input_zero_point = 1.0, 128
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.output_scale = None if output_scale is None else float(output_scale)
        self.output_zero_point = int(output_zero_point)
        return self

    @property
    def frozen(self) -> bool:
        return self.input_scale is not None

    def quantized_weight(self) -> torch.Tensor:
        if self.scheme == "int8":
            return torch.fake_quantize_per_channel_affine(
                self.layer.weight, self.weight_scale, self.weight_zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
            )
        stored = quantize_weight(self.layer.weight, self.scheme, self.block_size)
        if self.training:
            return stored.weight
        weight, scale = stored.weight, stored.scale
        if torch.onnx.is_in_onnx_export():  # the scheme's result, not its computation, goes into the file
            with warnings.catch_warnings():  # baking these in as constants is the point
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                weight, scale = (
                    None if t is None else torch.from_numpy(t.detach().float().numpy().copy()) for t in (weight, scale)
                )
        if scale is None:  # block: a scale per (channel, block) has no int8 grid per channel; float weights
            return weight
        # integers x per-channel scale, with |integers| <= 8: the same values on an int8 grid,
        # which export as int8 weights that onnxruntime runs with its int8 kernels
        return torch.fake_quantize_per_channel_affine(
            weight, scale, self.weight_zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
        )

    def weight_grid(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The quantized weight and its per-output-channel int8 scale (weight / scale are
        integers in [-128, 127]); None for ``block`` weights, which have no per-channel grid."""
        with torch.no_grad():
            if self.scheme == "int8":
                return self.quantized_weight().detach(), self.weight_scale.clone()
            stored = quantize_weight(self.layer.weight.detach(), self.scheme, self.block_size)
            return None if stored.scale is None else (stored.weight.detach(), stored.scale.float())

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer and its activation compute in float."""
        y = self.layer(x)
        return y if self.activation is None else self.activation(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            return self.float_forward(x)
        if self.act_bits == 1:
            x = binarize_activation(x)
        x = torch.fake_quantize_per_tensor_affine(x, self.input_scale, self.input_zero_point, ACT_QMIN, ACT_QMAX)
        weight = self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, weight, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, weight, self.layer.bias)
        if self.activation is not None:
            y = self.activation(y)
        if self.output_scale is None:
            return y
        # a quantized output lets onnxruntime run the layer as one integer kernel (QLinearConv)
        return torch.fake_quantize_per_tensor_affine(y, self.output_scale, self.output_zero_point, ACT_QMIN, ACT_QMAX)


class Bf16Layer(nn.Module):
    """A conv or linear layer (and its fused activation) computed in bf16: weights rounded to
    bf16 once, the input cast to bf16 and the output back to float32, so torch runs its bf16
    kernels. Exported to ONNX it is the float layer with the bf16-rounded weights (onnxruntime's
    CPU kernels have no bf16 conv), which OpenVINO runs in bf16 at its bf16 precision."""

    def __init__(self, layer: nn.Module, activation: nn.Module | None = None):
        super().__init__()
        self.layer, self.activation = layer, activation
        with torch.no_grad():
            layer.weight.copy_(layer.weight.to(torch.bfloat16).float())

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y if self.activation is None else self.activation(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self.float_forward(x)
        bias = None if self.layer.bias is None else self.layer.bias.to(torch.bfloat16)
        weight, x = self.layer.weight.to(torch.bfloat16), x.to(torch.bfloat16)
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, weight, bias)
        else:
            y = self.layer._conv_forward(x, weight, bias)
        if self.activation is not None:
            y = self.activation(y)
        return y.float()


class ActivationQuant(nn.Module):
    """Per-tensor uint8 fake quantization of one tensor (a matmul input, an add's output...).

    Built unfrozen, it passes its input through (calibration observes it);
    ``freeze(scale, zero_point)`` turns it into the quantize/dequantize pair.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale: float | None = None
        self.zero_point = 0

    def freeze(self, scale: float, zero_point: int) -> ActivationQuant:
        self.scale, self.zero_point = float(scale), int(zero_point)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, ACT_QMIN, ACT_QMAX)


def stored_weight_bits(module: nn.Module) -> int:
    """Bits per weight as the layer is deployed: its scheme's width, 16 for bf16."""
    return 16 if isinstance(module, Bf16Layer) else SCHEME_BITS[module.scheme]


def _quantized_layer_cost(op: Op) -> Cost:
    """A fake-quantized (or bf16) conv or linear costs what the layer inside it costs, plus its
    fused activation; its weights are read at their stored width, not as the float32 the
    simulation keeps (the scales and bias stay counted as they are)."""
    inner = op.with_module(op.module.layer)
    cost = linear_cost(inner) if isinstance(op.module.layer, nn.Linear) else conv_cost(inner)
    weight = op.module.layer.weight
    stored = -(-weight.numel() * stored_weight_bits(op.module) // 8)
    cost = dataclasses.replace(cost, bytes_read=cost.bytes_read - weight.numel() * weight.element_size() + stored)
    return cost if op.module.activation is None else cost + Cost(elem_ops=op.out_numel)


register_module_rule((QuantizedLayer, Bf16Layer), "quantized layer", _quantized_layer_cost)
register_module_rule((ActivationQuant,), "quantize/dequantize", per_element)
