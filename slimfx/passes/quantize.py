"""quantize: calibrated int8 quantize/dequantize on convs, linears, matmuls and what joins them.

``fold-bn`` runs first (the pass requires it; the pipeline inserts it unless ``fold-bn=false``).
Unfrozen quantizers go in (``quant.placement`` says where: each
conv/linear with the ReLU after it fused, matmul inputs, and the outputs of adds, concats and
pools of quantized tensors); one streaming pass over ``calib_data`` fills their |x|
histograms (``quant.calibrate``); a threshold rule (``calib=minmax|percentile|entropy|mse``)
turns each into a uint8 grid, and a quantizer that reads an already-quantized tensor takes
that grid instead. Weights get per-channel symmetric int8 scales (or a low-bit scheme).
``nn.MultiheadAttention`` calls are first written out so their parts quantize too. The
result is still a runnable fx graph, which exports to ONNX as QuantizeLinear/
DequantizeLinear pairs that onnxruntime runs with int8 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx import parallel
from slimfx.cost_model.counts import ensure_costs
from slimfx.cost_model.device import Machine
from slimfx.details import Details
from slimfx.errors import NonFiniteError, PassSpecError
from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.ir.shapes import ensure_shapes
from slimfx.metrics import sqnr_db
from slimfx.passes.base import Action, DataNeed, Decision, Pass, PassContext, PassResult
from slimfx.passes.candidates import excluding_pattern, layer_candidates
from slimfx.passes.fold_bn import FoldBatchNorm
from slimfx.passes.registry import register
from slimfx.quant.attention import AttentionParts, why_not_inlined
from slimfx.quant.calibrate import AbsHistogram, threshold
from slimfx.quant.layers import (
    REDUCED_QMAX,
    WEIGHT_QMAX,
    ActivationQuant,
    Bf16Layer,
    QuantizedLayer,
    activation_qparams,
)
from slimfx.quant.mixed import allocate_widths
from slimfx.quant.placement import grid_source, is_pool, sole_relu_user
from slimfx.quant.schemes import SCHEMES, quantize_weight
from slimfx.quant.size import WeightSize, layer_size

WIDTHS = (8, 4, 2)  # candidate weight widths for bits=auto
_WIDTH_SCHEME = {8: "int8", 4: "int4", 2: "int2"}


def _where(node: fx.Node) -> str:
    """A node as reports name it: the module path for module calls, else the node name."""
    return str(node.target) if node.op == "call_module" else node.name


@dataclass(frozen=True)
class ActivationQuantDetails(Details):
    """A quantized tensor (matmul input, add/concat/pool output): its uint8 grid and where it came from."""

    scheme: str
    bits: int
    threshold: float | None  # None: the grid of the tensor it reads
    observed_max: float | None
    input_scale: float
    input_zero_point: int


@dataclass(frozen=True)
class QuantizedLayerDetails(Details):
    """A quantized conv or linear: weight scheme and size, input and output grids, measured SQNR."""

    scheme: str
    bits: int
    calibration: str
    threshold: float | None
    observed_max: float | None
    size: WeightSize
    input_range: str
    input_grid: str
    input_scale: float
    input_zero_point: int
    fused_activation: str | None
    output_threshold: float | None
    output_observed_max: float
    weight_scale_min: float
    weight_scale_max: float
    output_sqnr_db: float | None


@register
@dataclass(frozen=True)
class Quantize(Pass):
    """Calibrated int8 quantization: conv and linear layers (weights per channel, inputs and
    outputs per tensor), matmul inputs, and the adds, concats and pools between them."""

    name = "quantize"
    exact = False
    quantizes = True
    summary = "calibrated int8 quantize/dequantize on convs, linears, matmuls and the adds/pools between them"
    option_help = {
        "calib": "activation threshold rule: minmax, percentile, entropy (TensorRT's KL search) or mse",
        "percentile": "for calib=percentile",
        "weights": "weight scheme: int8, int4, ternary, binary or block",
        "block_size": "input channels per scale for weights=block",
        "act_bits": "8, or 1 (sign activations) with weights=binary",
        "bits": "fixed, or auto: a weight width of 8, 4 or 2 bits per layer within a budget",
        "target_size": "with bits=auto: weight bytes at most this fraction of fp32",
        "target_macs_bits": "with bits=auto: MACs x weight bits at most this fraction of all-8-bit",
        "exclude": "module-path patterns (fnmatch: layer4.*) left in float",
        "layer_weights": "LAYER@SCHEME entries: a layer's weight scheme instead of weights= (layer1.0.conv1@int4)",
        "weight_range": "int8 weights on 8 bits (full), 7 bits (reduced: no int16 saturation on CPUs without "
        "VNNI), or auto (reduced where this CPU lacks VNNI)",
        "bf16": "layers run in bf16 instead of int8: module-path patterns, or auto (by measured SQNR)",
        "bf16_below": "with bf16=auto: int8 output SQNR (dB) under which a layer runs in bf16",
        "fold_bn": "insert fold-bn before quantize (false keeps the BatchNorms)",
    }
    value_hints = {
        ("bits", "8"): "bits says how widths are chosen; 8-bit weights are the default (weights=int8)",
        ("bits", "4"): "bits says how widths are chosen; for 4-bit weights give weights=int4",
        ("bits", "2"): "bits says how widths are chosen; for 2-bit weights give weights=ternary",
        ("bits", "1"): "bits says how widths are chosen; for 1-bit weights give weights=binary",
    }
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
    layer_weights: tuple[str, ...] = ()
    weight_range: Literal["auto", "full", "reduced"] = "auto"
    bf16: tuple[str, ...] = ()
    bf16_below: float = 30.0
    fold_bn: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise self.invalid("percentile", self.percentile, "a percentile in (0, 100]")
        if self.block_size < 1:
            raise self.invalid("block-size", self.block_size, "an integer >= 1")
        if self.act_bits not in (8, 1):
            raise self.invalid("act-bits", self.act_bits, "8, or 1 with weights=binary")
        if self.act_bits == 1 and self.weights != "binary":
            raise self.invalid(
                "act-bits", self.act_bits, "8 unless weights=binary (binary activations go with binary weights)"
            )
        for entry in self.layer_weights:
            layer, at, scheme = entry.rpartition("@")
            if not at or not layer or scheme not in SCHEMES:
                raise self.invalid("layer-weights", entry, f"LAYER@SCHEME with a scheme among {', '.join(SCHEMES)}")
        if self.layer_weights and self.bits == "auto":
            raise self.invalid(
                "layer-weights", ",".join(self.layer_weights), "per-layer schemes or bits=auto, not both"
            )
        if "auto" in self.bf16 and len(self.bf16) > 1:
            raise self.invalid("bf16", ",".join(self.bf16), "auto alone, or module-path patterns (layer1.*, *)")
        if self.bf16_below != 30.0 and self.bf16 != ("auto",):
            raise self.invalid("bf16-below", self.bf16_below, "a threshold only with bf16=auto")
        budgets = [b for b in (self.target_size, self.target_macs_bits) if b is not None]
        if self.bits == "auto" and len(budgets) != 1:
            raise self.invalid("bits", self.bits, "auto together with exactly one of target-size or target-macs-bits")
        if self.bits == "fixed" and budgets:
            raise self.invalid(
                "target-size" if self.target_size is not None else "target-macs-bits",
                budgets[0],
                "a budget only with bits=auto",
            )
        for name, value in (("target-size", self.target_size), ("target-macs-bits", self.target_macs_bits)):
            if value is not None and not 0 < value <= 1:
                raise self.invalid(
                    name, value, "a fraction in (0, 1] (of the fp32 weight bytes / of the 8-bit MACs x bits)"
                )

    @property
    def reduced_range(self) -> bool:
        """int8 weights on 7 bits: asked for, or ``auto`` on a CPU whose int8 kernels saturate."""
        return self.weight_range == "reduced" or (self.weight_range == "auto" and Machine.here().int8_saturates)

    def requires(self) -> tuple[Pass, ...]:
        """BatchNorms are folded first (exact), as every int8 deployment does: the folded
        weights are the ones quantized, and no float BatchNorm is left between int8 kernels.
        ``fold-bn=false`` keeps them."""
        return (FoldBatchNorm(),) if self.fold_bn else ()

    def data_need(self) -> DataNeed:
        return DataNeed.CALIBRATION

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opened = self._open_attention(graph)
        ensure_costs(graph)
        targets, decisions = self._targets(graph)
        decisions = opened | decisions
        schemes, warnings = {n.name: self.weights for n in targets}, []
        if self.bits == "auto":
            schemes, warnings = self._mixed_precision(graph, targets, ctx)
        schemes |= self._layer_schemes(targets, decisions)
        macs = {n.name: graph.info(n).cost.cost.macs for n in targets}
        points = self._insert_quantizers(graph, targets, schemes)
        if not points:
            listed = [d for d in decisions.values() if d is not None]
            return PassResult(changed=False, decisions=tuple(listed) + (self._nothing_to_quantize(graph),))
        observed = self._calibrate(graph, points, ctx)
        grids: dict[fx.Node, tuple[float, int, str]] = {}  # tensors on a uint8 grid: scale, zero point, who set it
        for point in points:
            decision = self._freeze(graph, point, observed[point.node], grids, macs.get(point.node.name))
            decisions[point.node.name] = decision
        if self.bf16:
            decisions |= self._to_bf16(graph, points, decisions, observed, warnings)
        listed = [d for d in decisions.values() if d is not None]
        return PassResult(changed=True, decisions=tuple(listed) + (_size_summary(listed),), warnings=tuple(warnings))

    @staticmethod
    def _nothing_to_quantize(graph: Graph) -> Decision:
        """Why a run changed nothing: the graph is quantized already, or holds no float layer."""
        done = sum(isinstance(m, (QuantizedLayer, Bf16Layer)) for m in graph.module.modules())
        why = (
            f"the model is quantized already ({done} quantized layers): quantize works on float convs, linears "
            "and matmuls"
            if done
            else "no float conv, linear or matmul to quantize (every one is excluded or there are none)"
        )
        return Decision("(model)", Action.SUMMARY, f"nothing to quantize: {why}")

    def _open_attention(self, graph: Graph) -> dict[str, Decision | None]:
        """Write each nn.MultiheadAttention call out as projections and matmuls (AttentionParts),
        so that they quantize like any linear and matmul; calls that cannot be are declined."""
        ensure_shapes(graph)

        def why_not(node: fx.Node, mha: nn.Module) -> str | None:
            query = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            unbatched = query is not None and len(graph.info(query).out_shape or ()) != 3
            return "unbatched (2-D) inputs" if unbatched else why_not_inlined(mha, node)

        found = layer_candidates(graph, (nn.MultiheadAttention,), self.exclude, why_not, one_input=False)
        declined: dict[str, Decision | None] = {
            name: Decision(str(graph.node(name).target), Action.DECLINED, f"attention left whole: {why}")
            for name, why in found.declined.items()
        }
        with Rewriter(graph, self.name) as rewriter:
            for node in found.eligible:
                mha = graph.submodule(node)
                rewriter.inline_module(
                    node, AttentionParts(mha, need_weights=bool(node.kwargs.get("need_weights", True)))
                )
        return declined

    def _insert_quantizers(self, graph: Graph, targets: list[fx.Node], schemes: dict[str, str]) -> list[_Point]:
        """Unfrozen quantizers (float pass-through while calibrating), in topological order:
        every target layer (with the ReLU that alone follows it fused in), both inputs of every
        matmul, and the outputs of adds, concats and pools whose inputs are quantized."""
        target_names = {n.name for n in targets}
        points: list[_Point] = []
        on_grid: set[fx.Node] = set()  # nodes whose output will be quantized
        removed: set[fx.Node] = set()
        with Rewriter(graph, self.name) as rewriter:
            for node in list(graph.nodes()):
                if node in removed:
                    continue
                if node.name in target_names:
                    relu = sole_relu_user(graph, node)
                    activation = ops.relu_type(relu, graph.submodule)() if relu is not None else None
                    layer = QuantizedLayer(
                        graph.submodule(node),
                        activation,
                        schemes[node.name],
                        self.block_size,
                        self.act_bits,
                        REDUCED_QMAX if self.reduced_range else WEIGHT_QMAX,
                    )
                    rewriter.replace_module(node, layer)
                    if relu is not None:
                        rewriter.bypass(relu, node)
                        removed.add(relu)
                    output = any(u.op == "output" for u in node.users)  # the model's own output stays float
                    points.append(
                        _Point(node, str(node.target), self._inherits(graph, node, on_grid), quantize_output=not output)
                    )
                    if not output:
                        on_grid.add(node)
                elif ops.is_matmul(node) and all(isinstance(a, fx.Node) for a in node.args[:2]):
                    for position, arg in enumerate(node.args[:2]):
                        quant = rewriter.insert_module_after(
                            arg, f"{node.name}_input{position}_quant", ActivationQuant(), (arg,)
                        )
                        rewriter.rewire_input(node, arg, quant)
                        points.append(
                            _Point(quant, f"{node.name} input {position}", self._inherits(graph, quant, on_grid))
                        )
                elif self._output_worth_quantizing(graph, node, on_grid):
                    anchor = sole_relu_user(graph, node) or node
                    quant = rewriter.insert_module_after(
                        anchor, f"{node.name}_output_quant", ActivationQuant(), (anchor,)
                    )
                    rewriter.replace_uses(anchor, quant)
                    after = f" (after {_where(anchor)})" if anchor is not node else ""
                    points.append(_Point(quant, f"{_where(node)} output{after}", self._inherits(graph, quant, on_grid)))
                    on_grid.add(quant)
        return points

    @staticmethod
    def _inherits(graph: Graph, point: fx.Node, on_grid: set[fx.Node]) -> bool:
        """Whether the quantizer at ``point`` reads a tensor already on a grid (through ReLU, max pool...)."""
        return grid_source(graph, point.args[0]) in on_grid

    @staticmethod
    def _output_worth_quantizing(graph: Graph, node: fx.Node, on_grid: set[fx.Node]) -> bool:
        """An add/concat of quantized tensors, or a pool of one: onnxruntime runs it in int8
        (QLinearAdd, QLinearConcat, QLinearAveragePool, uint8 MaxPool) when its output is quantized too."""
        inputs = ops.join_inputs(node) or (node.args[:1] if is_pool(graph, node) else None)
        return inputs is not None and all(grid_source(graph, t) in on_grid for t in inputs)

    def _freeze(
        self,
        graph: Graph,
        point: _Point,
        observed: _Observed,
        grids: dict[fx.Node, tuple[float, int, str]],
        macs: int | None,
    ) -> Decision:
        """Set the point's grids, its input's from the tensor it reads when that is already
        quantized (through ReLU, max pool, reshape...) and from its own histogram otherwise."""
        module = graph.submodule(point.node)
        source = grid_source(graph, point.node.args[0])
        hist = observed.inputs
        if isinstance(module, QuantizedLayer) and self.act_bits == 1:
            scale, zero_point, t, how = 1.0, 128, None, "sign (+-1) activations"
        elif point.inherits:
            scale, zero_point, owner = grids[source]
            t, how = None, f"the grid of {owner}"
        else:
            t = threshold(hist, self.calib, self.percentile)
            scale, zero_point = activation_qparams(t, hist.non_negative)
            how = f"{self.calib} threshold {t:.4g} of observed max {hist.upper:.4g}"
        if isinstance(module, ActivationQuant):
            module.freeze(scale, zero_point)
            grids[point.node] = (scale, zero_point, point.label)
            return Decision(
                point.label,
                Action.QUANTIZED,
                f"uint8 per tensor on {how}",
                details=ActivationQuantDetails(
                    "uint8 activation", 8, t, None if t is None else hist.upper, scale, zero_point
                ),
            )
        out_t, out_scale, out_zero_point = None, None, 0
        if point.quantize_output:
            out_t = threshold(observed.outputs, self.calib, self.percentile)
            out_scale, out_zero_point = activation_qparams(out_t, observed.outputs.non_negative)
            grids[point.node] = (out_scale, out_zero_point, f"{point.label}'s output")
        module.freeze(scale, zero_point, out_scale, out_zero_point)
        error = None
        if observed.sample is not None:
            with torch.no_grad():
                error = sqnr_db(module.float_forward(observed.sample), module(observed.sample))
        return self._layer_decision(point, module, hist, t, how, observed.outputs, out_t, error, macs)

    def _layer_decision(
        self,
        point: _Point,
        module: QuantizedLayer,
        hist: AbsHistogram,
        t: float | None,
        how: str,
        out_hist: AbsHistogram,
        out_t: float | None,
        error: float | None,
        macs: int | None,
    ) -> Decision:
        layer, scheme = module.layer, module.scheme
        ws = module.weight_scale
        stored = quantize_weight(layer.weight.detach(), scheme, self.block_size)
        blocks = 1 if SCHEMES[scheme].per_channel else -(-layer.weight.shape[1] // self.block_size)
        scales = stored.integers.shape[0] * blocks
        size = layer_size(stored.integers, stored.bits, scales, 0 if layer.bias is None else layer.bias.numel())
        fused = None if module.activation is None else type(module.activation).__name__
        details = QuantizedLayerDetails(
            scheme=f"{scheme} weights x {'binary' if self.act_bits == 1 else 'uint8 (per tensor)'} input",
            bits=stored.bits,
            calibration=self.calib,
            threshold=t,
            observed_max=None if t is None else hist.upper,
            size=size,
            input_range="non-negative" if module.input_zero_point == 0 else "signed",
            input_grid=how,
            input_scale=module.input_scale,
            input_zero_point=module.input_zero_point,
            fused_activation=fused,
            output_threshold=out_t,
            output_observed_max=out_hist.upper,
            weight_scale_min=float(ws.min()),
            weight_scale_max=float(ws.max()),
            output_sqnr_db=error,
        )
        sqnr = "not measured" if error is None else f"{error:.1f} dB"
        with_relu = f" with {fused} fused" if fused else ""
        output = "float output (the model's)" if out_t is None else f"uint8 output, threshold {out_t:.4g}"
        width = f"{scheme} ({stored.bits}-bit) weights"
        if scheme == "int8" and module.weight_qmax == REDUCED_QMAX:
            width = "int8 weights on a 7-bit range (weight-range: this CPU has no VNNI, full-range int8 would saturate)"
        reason = f"{width}{with_relu}; input on {how}; {output}; output SQNR {sqnr}"
        return Decision(point.label, Action.QUANTIZED, reason, macs, macs, details=details)

    def _to_bf16(
        self,
        graph: Graph,
        points: list[_Point],
        decisions: dict[str, Decision | None],
        observed: dict[fx.Node, _Observed],
        warnings: list[str],
    ) -> dict[str, Decision]:
        """The layers the ``bf16`` option names (patterns), or, with ``bf16=auto``, those whose
        int8 output SQNR is below ``bf16-below`` dB, run in bf16 instead of int8. The grids
        their neighbours took from them stay: a reader still quantizes its input on it."""
        changed: dict[str, Decision] = {}
        with Rewriter(graph, self.name) as rewriter:
            for point in points:
                module = graph.submodule(point.node)
                decision = decisions.get(point.node.name)
                if not isinstance(module, QuantizedLayer) or decision is None:
                    continue
                int8_sqnr = (
                    decision.details.output_sqnr_db if isinstance(decision.details, QuantizedLayerDetails) else None
                )
                why = self._why_bf16(point.label, int8_sqnr)
                if why is None:
                    continue
                layer = Bf16Layer(module.layer, module.activation)
                rewriter.replace_module(point.node, layer)
                sample = observed[point.node].sample
                sqnr = None
                if sample is not None:
                    with torch.no_grad():
                        sqnr = sqnr_db(layer.float_forward(sample), layer(sample))
                changed[point.node.name] = _bf16_decision(
                    point.label, layer, why, int8_sqnr, sqnr, decision.macs_before
                )
        if changed and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.append(
                f"quantize: {len(changed)} layer(s) run in bf16, but this CPU has no bf16 kernels: in torch eager "
                "they are emulated (slow); OpenVINO and CPUs with AVX-512 BF16 or AMX run them natively"
            )
        return changed

    def _why_bf16(self, label: str, int8_sqnr: float | None) -> str | None:
        if self.bf16 == ("auto",):
            if int8_sqnr is not None and int8_sqnr < self.bf16_below:
                return f"its int8 output SQNR {int8_sqnr:.1f} dB is below bf16-below={self.bf16_below:g} dB"
            return None
        pattern = excluding_pattern(label, self.bf16)
        return None if pattern is None else f"named by bf16 pattern '{pattern}'"

    def _mixed_precision(
        self, graph: Graph, targets: list[fx.Node], ctx: PassContext
    ) -> tuple[dict[str, str], list[str]]:
        """Sensitivity of each layer at 8, 4 and 2 bits (only that layer quantized), then widths
        that meet the budget with the least total sensitivity."""
        inputs = next(ctx.batches(self.name)).inputs
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
                    sensitivity[node.name][bits] = float(
                        (out - reference).pow(2).mean() / reference.pow(2).mean().clamp_min(1e-12)
                    )
                    macs = graph.info(node).cost.cost.macs
                    cost[node.name][bits] = original.numel() * bits / 8 if self.target_size is not None else macs * bits
                layer.weight.data = original
                ctx.report_progress(f"quantize: sensitivity of {node.target}")
        if self.target_size is not None:
            budget = self.target_size * sum(4 * graph.submodule(n).weight.numel() for n in targets)
        else:
            budget = self.target_macs_bits * sum(cost[n.name][8] for n in targets)
        widths, met = allocate_widths(sensitivity, cost, budget, WIDTHS)
        warnings = (
            []
            if met
            else [
                f"quantize: the bits=auto budget cannot be met even at {min(WIDTHS)} bits everywhere; "
                "every layer is at its narrowest width"
            ]
        )
        return {name: _WIDTH_SCHEME[bits] for name, bits in widths.items()}, warnings

    def _layer_schemes(self, targets: list[fx.Node], decisions: dict[str, Decision | None]) -> dict[str, str]:
        """Node name -> scheme for the ``layer_weights`` entries; an entry naming no layer that
        is quantized is an error (with why, when the layer was declined)."""
        by_path = {str(n.target): n.name for n in targets}
        declined = {d.target: d.reason for d in decisions.values() if d is not None}
        schemes = {}
        for entry in self.layer_weights:
            layer, _, scheme = entry.rpartition("@")
            if layer not in by_path:
                why = f"it is left in float: {declined[layer]}" if layer in declined else "no such conv or linear layer"
                raise PassSpecError(f"quantize: layer-weights entry '{entry}' names no quantized layer ({why})")
            schemes[by_path[layer]] = scheme
        return schemes

    def _targets(self, graph: Graph) -> tuple[list[fx.Node], dict[str, Decision | None]]:
        for node in graph.nodes():
            if node.op == "call_module" and isinstance(graph.submodule(node), ops.WEIGHTED_LAYERS):
                if not bool(torch.isfinite(graph.submodule(node).weight).all()):
                    raise NonFiniteError(
                        f"quantize: layer '{node.target}' has non-finite weights (inf or nan); fix the model first"
                    )
        found = layer_candidates(graph, ops.WEIGHTED_LAYERS, self.exclude)
        decisions: dict[str, Decision | None] = {}
        for node in graph.nodes():  # graph order; the quantized layers fill their places later
            if node.name in found.declined:
                decisions[node.name] = Decision(str(node.target), Action.DECLINED, found.declined[node.name])
            elif node in found.eligible:
                decisions[node.name] = None
        return found.eligible, decisions

    def _calibrate(self, graph: Graph, points: list[_Point], ctx: PassContext) -> dict[fx.Node, _Observed]:
        """One streaming pass over ``calib_data``: histograms of each quantizer's input (and a
        layer's output after its fused activation), plus each layer's first input for SQNR."""
        observed = {p.node: _Observed() for p in points}
        handles = []
        for point in points:

            def hook(
                module: nn.Module,
                args: tuple,
                result: torch.Tensor,
                seen: _Observed = observed[point.node],
                label: str = point.label,
                inherits: bool = point.inherits,
            ) -> None:
                try:
                    if not inherits:  # a quantizer on its producer's grid needs no histogram
                        seen.inputs.update(args[0])
                    if isinstance(module, QuantizedLayer):
                        seen.outputs.update(result)
                except NonFiniteError as exc:
                    raise NonFiniteError(f"quantize: {label}: {exc}") from None
                if seen.sample is None and isinstance(module, QuantizedLayer):
                    seen.sample = args[0].detach()

            handles.append(graph.submodule(point.node).register_forward_hook(hook))
        rank, size = parallel.world()
        stream = ctx.batches(self.name)
        if size > 1:  # several processes: each calibrates on its share, histograms merged after
            loaded = list(stream)
            stream = iter(loaded[rank::size] if len(loaded) >= size else loaded)
        failure: Exception | None = None
        try:
            with torch.no_grad():
                for count, batch in enumerate(stream, 1):
                    graph.module(*batch.inputs)
                    ctx.report_progress(f"quantize: calibrating, batch {count}")
        except Exception as exc:  # under torch.distributed, every rank must hear of it before merging
            failure = exc
        finally:
            for handle in handles:
                handle.remove()
        if size > 1:
            if parallel.all_sum([failure is not None])[0] > 0:
                if failure is not None:
                    raise failure
                raise NonFiniteError("quantize: calibration failed on another process; see its error")
            if len(loaded) >= size:
                for seen in observed.values():
                    seen.inputs.merge_ranks()
                    seen.outputs.merge_ranks()
        elif failure is not None:
            raise failure
        return observed


@dataclass
class _Point:
    """A quantizer in the graph: a QuantizedLayer or an ActivationQuant node, and its report label."""

    node: fx.Node
    label: str
    inherits: bool  # reads a tensor already on a grid: takes that grid, calibrates nothing
    quantize_output: bool = False  # layers only: is the output quantized too


@dataclass
class _Observed:
    """What calibration saw at one quantizer."""

    inputs: AbsHistogram = field(default_factory=AbsHistogram)
    outputs: AbsHistogram = field(default_factory=AbsHistogram)
    sample: torch.Tensor | None = None


@dataclass(frozen=True)
class Bf16LayerDetails(Details):
    """A conv or linear run in bf16 instead of int8: why, and both output SQNRs."""

    scheme: str
    bits: int
    reason: str
    int8_output_sqnr_db: float | None
    output_sqnr_db: float | None
    size: WeightSize


def _bf16_decision(
    label: str, layer: Bf16Layer, why: str, int8_sqnr: float | None, sqnr: float | None, macs: int | None
) -> Decision:
    weights = layer.layer.weight.numel()
    bias = 0 if layer.layer.bias is None else layer.layer.bias.numel()
    stored = 2 * weights + 4 * bias
    size = WeightSize(4 * (weights + bias), stored, stored, float((layer.layer.weight == 0).float().mean()))
    sqnr_text = "not measured" if sqnr is None else f"{sqnr:.1f} dB"
    details = Bf16LayerDetails("bf16 weights x bf16 input", 16, why, int8_sqnr, sqnr, size)
    reason = f"bf16 weights and activations, float output: {why}; output SQNR {sqnr_text}"
    return Decision(label, Action.QUANTIZED, reason, macs, macs, details=details)


def _size_summary(decisions: list[Decision]) -> Decision:
    """Deep Compression's accounting over every quantized layer: fp32, chosen widths, Huffman."""
    sized = (QuantizedLayerDetails, Bf16LayerDetails)
    total = sum((d.details.size for d in decisions if isinstance(d.details, sized)), WeightSize(0, 0, 0, 0))
    reason = (
        f"weights of the quantized layers: fp32 {total.fp32_bytes / 1e6:.3f} MB -> "
        f"{total.quantized_bytes / 1e6:.3f} MB at the chosen widths -> {total.huffman_bytes / 1e6:.3f} MB "
        f"Huffman-coded; {total.zero_share:.1%} of weights are 0"
    )
    integer = [d.details for d in decisions if isinstance(d.details, QuantizedLayerDetails)]
    if any(details.bits < 8 for details in integer):
        as_int8 = sum(details.size.fp32_bytes / 4 for details in integer)
        reason += (
            f"; ONNX and OpenVINO files store weights below 8 bits as int8 (these layers' weights: "
            f"{as_int8 / 1e6:.3f} MB there)"
        )
    return Decision("(model size)", Action.SUMMARY, reason, details=total)
