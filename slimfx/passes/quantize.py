"""quantize: calibrated int8 quantize/dequantize on the inputs and weights of convs and linears.

Calibration streams ``calib_data`` through the model once, keeping one |x| histogram per
layer input (``quant.calibrate``); a threshold rule (``calib=minmax|percentile|entropy|mse``)
turns each histogram into a uint8 scale. Weights get per-channel symmetric int8 scales. Each
layer becomes a ``quant.modules.QuantizedLayer`` (still a runnable fx graph), which exports to
ONNX as QuantizeLinear/DequantizeLinear pairs that onnxruntime runs with int8 kernels.
"""
from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.errors import PassSpecError
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes.base import Decision, Pass, PassContext, PassResult
from slimfx.passes.registry import register
from slimfx.quant.calibrate import AbsHistogram, threshold
from slimfx.quant.mixed import allocate_widths
from slimfx.quant.modules import ActivationQuant, QuantizedLayer, activation_qparams
from slimfx.quant.schemes import quantize_weight
from slimfx.quant.size import layer_size

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
WIDTHS = (8, 4, 2)  # candidate weight widths for bits=auto
_WIDTH_SCHEME = {8: "int8", 4: "int4", 2: "int2"}


def _is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.matmul, operator.matmul, torch.bmm)
    return node.op == "call_method" and node.target in ("matmul", "bmm")


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    reference, approximation = reference.detach().double(), approximation.detach().double()
    noise = float((reference - approximation).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf


@register
@dataclass(frozen=True)
class Quantize(Pass):
    """Calibrated int8 quantization of conv and linear layers (weights per channel, inputs per tensor)."""

    name = "quantize"
    exact = False
    summary = "calibrated int8 quantize/dequantize on conv/linear inputs and weights"
    runs_after = {
        "prune-channels": "quantize the final structure",
        "factorize-convs": "quantize the final structure",
        "fold-bn": "fold BatchNorm first so the folded weights are the ones quantized",
    }

    calib: Literal["minmax", "percentile", "entropy", "mse"] = "entropy"
    percentile: float = 99.99
    weights: Literal["int8", "int4", "ternary", "binary", "block"] = "int8"
    block_size: int = 16
    act_bits: int = 8
    bits: Literal["fixed", "auto"] = "fixed"
    target_size: float | None = None
    target_macs_bits: float | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise self.invalid("percentile", self.percentile, "a percentile in (0, 100]")
        if self.block_size < 1:
            raise self.invalid("block-size", self.block_size, "an integer >= 1")
        if self.act_bits not in (8, 1):
            raise self.invalid("act-bits", self.act_bits, "8, or 1 with weights=binary")
        if self.act_bits == 1 and self.weights != "binary":
            raise self.invalid("act-bits", self.act_bits, "8 unless weights=binary (binary activations go with binary weights)")
        budgets = [b for b in (self.target_size, self.target_macs_bits) if b is not None]
        if self.bits == "auto" and len(budgets) != 1:
            raise self.invalid("bits", self.bits, "auto together with exactly one of target-size or target-macs-bits")
        if self.bits == "fixed" and budgets:
            raise self.invalid("target-size" if self.target_size is not None else "target-macs-bits", budgets[0],
                               "a budget only with bits=auto")
        for name, value in (("target-size", self.target_size), ("target-macs-bits", self.target_macs_bits)):
            if value is not None and not 0 < value <= 1:
                raise self.invalid(name, value, "a fraction in (0, 1] (of the fp32 weight bytes / of the 8-bit MACs x bits)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.calib_data is None:
            raise PassSpecError("quantize needs calibration data: pass calib_data=[batch, ...] to slimfx.compile "
                                "(or --calib-random N on the command line)")
        graph.ensure_costs()
        observers = self._observe_matmul_inputs(graph)
        graph.ensure_costs()
        targets, decisions = self._targets(graph)
        histograms, samples = self._calibrate(graph, targets, ctx)  # input and output histograms
        schemes, warnings = {n.name: self.weights for n in targets}, []
        if self.bits == "auto":
            schemes, warnings = self._mixed_precision(graph, targets, ctx)
        with Rewriter(graph, self.name) as rewriter:
            for node in targets:
                decisions[node.name] = self._quantize_one(graph, rewriter, node, histograms[node.name], samples.get(node.name),
                                                          schemes[node.name])
        listed = [d for d in decisions.values() if d is not None] + [self._freeze(name, o) for name, o in observers]
        return PassResult(changed=bool(targets or observers), decisions=tuple(listed) + (_size_summary(listed),),
                          warnings=tuple(warnings))

    def _observe_matmul_inputs(self, graph: Graph) -> list[tuple[str, ActivationQuant]]:
        """Put an observing ActivationQuant on both inputs of every matmul/bmm (function or method)."""
        matmuls = [n for n in graph.nodes() if _is_matmul(n) and all(isinstance(a, fx.Node) for a in n.args[:2])]
        observers = []
        with Rewriter(graph, self.name) as rewriter:
            for node in matmuls:
                for position, arg in enumerate(node.args[:2]):
                    observer = ActivationQuant()
                    observer.observer = AbsHistogram()
                    inserted = rewriter.insert_module_after(arg, f"{node.name}_input{position}_quant", observer, (arg,))
                    rewriter.rewire_input(node, arg, inserted)
                    observers.append((f"{node.name} input {position}", observer))
        return observers

    def _freeze(self, name: str, quant: ActivationQuant) -> Decision:
        hist = quant.observer
        t = threshold(hist, self.calib, self.percentile)
        scale, zero_point = activation_qparams(t, hist.non_negative)
        quant.freeze(scale, zero_point)
        return Decision(name, "quantized", f"uint8 per tensor, {self.calib} threshold {t:.4g} of observed max {hist.upper:.4g}",
                        details={"scheme": "uint8 activation (matmul input)", "bits": 8, "threshold": t,
                                 "observed_max": hist.upper, "input_scale": scale, "input_zero_point": zero_point})

    def _mixed_precision(self, graph: Graph, targets: list[fx.Node], ctx: PassContext) -> tuple[dict[str, str], list[str]]:
        """Sensitivity of each layer at 8, 4 and 2 bits (only that layer quantized), then widths
        that meet the budget with the least total sensitivity."""
        batch = next(iter(ctx.calib_data))
        inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
        with torch.no_grad():
            reference = graph.module(*inputs)
            sensitivity, cost = {}, {}
            for node in targets:
                layer = graph.submodule(node)
                original = layer.weight.data.clone()
                sensitivity[node.name], cost[node.name] = {}, {}
                for bits in WIDTHS:
                    layer.weight.data = quantize_weight(original, _WIDTH_SCHEME[bits]).weight
                    out = graph.module(*inputs)
                    sensitivity[node.name][bits] = float((out - reference).pow(2).mean() / reference.pow(2).mean().clamp_min(1e-12))
                    macs = graph.info(node).cost.cost.macs
                    cost[node.name][bits] = original.numel() * bits / 8 if self.target_size is not None else macs * bits
                layer.weight.data = original
                ctx.report_progress(f"quantize: sensitivity of {node.target}")
        if self.target_size is not None:
            budget = self.target_size * sum(4 * graph.submodule(n).weight.numel() for n in targets)
        else:
            budget = self.target_macs_bits * sum(cost[n.name][8] for n in targets)
        widths, met = allocate_widths(sensitivity, cost, budget, WIDTHS)
        warnings = [] if met else [f"quantize: the bits=auto budget cannot be met even at {min(WIDTHS)} bits everywhere; "
                                   "every layer is at its narrowest width"]
        return {name: _WIDTH_SCHEME[bits] for name, bits in widths.items()}, warnings

    def _targets(self, graph: Graph) -> tuple[list[fx.Node], dict[str, Decision]]:
        calls = graph.module_calls()
        targets, decisions = [], {}
        for node in graph.nodes():
            if node.op != "call_module" or not isinstance(graph.submodule(node), _LAYERS):
                continue
            module, target = graph.submodule(node), str(node.target)
            if not bool(torch.isfinite(module.weight).all()):
                raise PassSpecError(f"quantize: layer '{target}' has non-finite weights (inf or nan); fix the model first")
            why = None
            if calls[target] > 1:
                why = f"module called {calls[target]} times"
            elif len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                why = "called with extra arguments"
            elif any(fnmatch.fnmatchcase(target, p) for p in self.exclude):
                why = "excluded by pattern"
            decisions[node.name] = Decision(target, "declined", why) if why else None
            if not why:
                targets.append(node)
        return targets, decisions

    def _calibrate(self, graph: Graph, targets: list[fx.Node], ctx: PassContext) -> tuple[dict[str, AbsHistogram], dict[str, Any]]:
        """One streaming pass: a histogram per layer input, plus the first batch's inputs for SQNR."""
        histograms = {n.name: AbsHistogram() for n in targets}
        outputs = {n.name: AbsHistogram() for n in targets}
        samples: dict[str, torch.Tensor] = {}
        handles = []
        for node in targets:
            def hook(_m: nn.Module, args: tuple, result: torch.Tensor, name: str = node.name) -> None:
                try:
                    histograms[name].update(args[0])
                    outputs[name].update(result)
                except ValueError as exc:
                    raise PassSpecError(f"quantize: layer '{name}': {exc}") from None
                samples.setdefault(name, args[0].detach())
            handles.append(graph.submodule(node).register_forward_hook(hook))
        batches = 0
        try:
            with torch.no_grad():
                for batch in ctx.calib_data:
                    graph.module(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
                    batches += 1
                    ctx.report_progress(f"quantize: calibrating, batch {batches}")
        finally:
            for handle in handles:
                handle.remove()
        if batches == 0:
            raise PassSpecError("quantize: calib_data is empty")
        return {name: (histograms[name], outputs[name]) for name in histograms}, samples

    def _quantize_one(self, graph: Graph, rewriter: Rewriter, node: fx.Node, hists: tuple[AbsHistogram, AbsHistogram],
                      sample: torch.Tensor | None, scheme: str) -> Decision:
        layer = graph.submodule(node)
        hist, out_hist = hists
        t = threshold(hist, self.calib, self.percentile)
        scale, zero_point = activation_qparams(t, hist.non_negative)
        out_t = threshold(out_hist, self.calib, self.percentile)
        out_scale, out_zero_point = activation_qparams(out_t, out_hist.non_negative)
        last = any(u.op == "output" for u in node.users)  # the model's own output stays float
        quantized = QuantizedLayer(layer, scale, zero_point, None if last else out_scale, out_zero_point,
                                   scheme, self.block_size, self.act_bits)
        error = None
        if sample is not None:
            with torch.no_grad():
                error = sqnr_db(layer(sample), quantized(sample))
        macs = graph.info(node).cost.cost.macs
        rewriter.replace_module(node, quantized)
        ws = quantized.weight_scale
        stored = quantize_weight(layer.weight.detach(), scheme, self.block_size)
        scales = stored.integers.shape[0] * (-(-layer.weight.shape[1] // self.block_size) if scheme == "block" else 1)
        size = layer_size(stored.integers, stored.bits, scales, 0 if layer.bias is None else layer.bias.numel())
        details = {
            "scheme": f"{scheme} weights x {'binary' if self.act_bits == 1 else 'uint8 (per tensor)'} input",
            "bits": stored.bits, "calibration": self.calib, "threshold": t, "observed_max": hist.upper, "size": size,
            "input_range": "non-negative" if hist.non_negative else "signed",
            "input_scale": scale, "input_zero_point": zero_point,
            "output_threshold": None if last else out_t, "output_observed_max": out_hist.upper,
            "weight_scale_min": float(ws.min()), "weight_scale_max": float(ws.max()), "output_sqnr_db": error,
        }
        sqnr = "not measured" if error is None else f"{error:.1f} dB"
        reason = (f"{scheme} ({stored.bits}-bit) weights, {self.calib} input threshold {t:.4g} of observed max "
                  f"{hist.upper:.4g}; output SQNR {sqnr}")
        return Decision(str(node.target), "quantized", reason, macs, macs, details=details)


def _size_summary(decisions: list[Decision]) -> Decision:
    """Deep Compression's accounting over every quantized layer: fp32, chosen widths, Huffman."""
    sizes = [d.details["size"] for d in decisions if d.action == "quantized" and "size" in d.details]
    total = {k: sum(s[k] for s in sizes) for k in ("fp32_bytes", "quantized_bytes", "huffman_bytes")}
    weights = sum(s["fp32_bytes"] for s in sizes) or 1
    zero_share = sum(s["zero_share"] * s["fp32_bytes"] for s in sizes) / weights
    total["zero_share"] = zero_share
    reason = (f"weights of the quantized layers: fp32 {total['fp32_bytes'] / 1e6:.3f} MB -> {total['quantized_bytes'] / 1e6:.3f} MB "
              f"at the chosen widths -> {total['huffman_bytes'] / 1e6:.3f} MB Huffman-coded; {zero_share:.1%} of weights are 0")
    return Decision("(model size)", "summary", reason, details=total)
