"""A graph's figure in a target's unit: predicted milliseconds, counted MACs or stored bytes.

Float trials (pruned only) are priced on the chosen runtime's float flavour; the plan's own
total is priced as it will be deployed: on an int8 runtime the pruned graph is folded and
quantized as the plan says (min-max on one batch: scales do not change which kernels run) and
predicted there; bytes count each layer's weights at the width the plan stores them.

Predicted milliseconds are anchored to measurement: once the original has been timed in the
float flavour (and, all int8, in an int8 runtime), every prediction on that side is scaled by
measured over predicted for the original, so that per-layer predictions that run high or low
on this machine (a lone int8 kernel timed with its conversions) do not steer the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch.nn as nn

from slimfx.backends.profiler import ProfiledRuntime
from slimfx.backends.runtimes import get_runtime
from slimfx.cost_model.counts import ensure_costs, total_cost
from slimfx.cost_model.latency import FUSION_RULES
from slimfx.cost_model.target import Target
from slimfx.errors import InvalidArgumentError
from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import snapshot
from slimfx.passes.base import PassContext
from slimfx.passes.fold_bn import FoldBatchNorm
from slimfx.quant.layers import Bf16Layer, QuantizedLayer, stored_weight_bits
from slimfx.target.settings import FLOAT_BITS, Settings


def check_target_runtime(target: Target, runtime: str | None) -> None:
    """Errors before any work: a latency target without one runtime that has a latency model."""
    if target.unit != "latency":
        if runtime is not None:
            get_runtime(runtime)  # an unknown name fails here
        return
    if runtime is None or runtime == "auto":
        modelled = ", ".join(FUSION_RULES)
        raise InvalidArgumentError(f"a latency target needs one runtime to aim at (--runtime): one of {modelled}")
    get_runtime(runtime)
    if runtime not in FUSION_RULES:
        modelled = ", ".join(FUSION_RULES)
        raise InvalidArgumentError(
            f"runtime {runtime!r} has no latency model to plan with; aim a latency target at one of {modelled}, "
            "or give a macs or size target"
        )


@dataclass
class Meter:
    """Prices graphs for one target on one runtime (``None``: torch eager, no quantization)."""

    target: Target
    runtime: str | None
    quantizes: bool
    float_side: ProfiledRuntime | None = None
    deployed_side: ProfiledRuntime | None = None
    float_scale: float = 1.0  # measured / predicted ms of the original, float flavour
    deployed_scale: float = 1.0  # the same for the all-int8 original on an int8 runtime

    @staticmethod
    def open(
        target: Target,
        runtime: str | None,
        graph: Graph,
        progress: Callable[[str], None] | None = None,
        profile: str | None = None,
    ) -> Meter:
        """A meter for ``graph``'s target; for latency, the profiles measured for its layers first."""
        quantizes = runtime is not None and get_runtime(runtime).runs_int8
        meter = Meter(target, runtime, quantizes)
        if target.unit == "latency" and runtime is not None:
            flavour = get_runtime(runtime).float_flavour
            meter.float_side = ProfiledRuntime.open(flavour, profile, progress=progress)
            meter.float_side.fill(graph, sweep=True, progress=progress)
            meter.deployed_side = (
                ProfiledRuntime.open(runtime, profile, progress=progress) if quantizes else meter.float_side
            )
        return meter

    @property
    def plans_quantization(self) -> bool:
        """Whether each layer's quantization is planned (int8 runtime, latency or size target);
        for a MACs target int8 changes nothing counted, so every layer is quantized."""
        return self.quantizes and self.target.unit in ("latency", "size")

    @property
    def where(self) -> str:
        """The runtime the deployed figure is on, as reports name it."""
        return self.runtime or "torch"

    def of_float(self, graph: Graph) -> float:
        """A float (unquantized) graph's figure; of the original, what fractions are of:
        latency in the runtime's float flavour, MACs, fp32 bytes."""
        ensure_costs(graph)
        if self.target.unit == "macs":
            return float(total_cost(graph).macs)
        if self.target.unit == "size":
            return stored_bytes(graph.module)
        assert self.float_side is not None
        return self.float_side.predict(graph).total_ms * self.float_scale

    def anchor(self, graph: Graph, float_ms: float, int8_ms: float | None, ctx: PassContext) -> None:
        """Scale later predictions by the original's measured ms over its predicted ms: in the
        float flavour (``float_ms``) and, on an int8 runtime, all int8 (``int8_ms``)."""
        self.float_scale = 1.0
        self.float_scale = float_ms / self.of_float(graph)
        if int8_ms is not None:
            self.deployed_scale = 1.0
            self.deployed_scale = int8_ms / self.of_plan(graph, Settings(quantize=True), ctx)

    def of_plan(self, pruned: Graph, settings: Settings, ctx: PassContext) -> float:
        """The figure of ``pruned`` deployed with ``settings`` (folded and quantized as they say)."""
        if self.target.unit == "size":  # counted as deployed: BatchNorm folded, weights at their widths
            folded = snapshot(pruned)
            FoldBatchNorm().run(folded, ctx)
            layers = [str(n.target) for n in folded.nodes() if n.op == "call_module"]
            return stored_bytes(folded.module, settings.weight_bits(layers))
        if self.target.unit != "latency" or not settings.quantize:
            return self.of_float(pruned)
        deployed = quantized_copy(pruned, ctx, settings)
        assert self.deployed_side is not None
        self.deployed_side.fill(deployed)
        return self.deployed_side.predict(deployed).total_ms * self.deployed_scale


def quantized_copy(graph: Graph, ctx: PassContext, settings: Settings, calib: str = "minmax") -> Graph:
    """``graph`` folded and quantized by ``settings`` on a copy. By default calibrated min-max on
    the first batch: the deployed structure, for pricing (scales do not change which kernels
    run; the real build calibrates properly); with ``calib``, on every batch of ``ctx``."""
    trial = snapshot(graph)
    if calib == "minmax":
        first = next(ctx.batches("target planner"))
        ctx = PassContext([first.inputs], ctx.example_inputs, ctx.seed, None, ctx.fixed_rows)
    FoldBatchNorm().run(trial, ctx)
    quantize = settings.quantize_pass(calib=calib)
    if quantize is not None:
        quantize.run(trial, ctx)
    ensure_costs(trial)
    return trial


def stored_bytes(module: nn.Module, layer_bits: Mapping[str, int] | None = None) -> float:
    """Bytes of the parameters: each conv and linear weight at ``layer_bits[module path]``
    (fp32 if absent; a quantized layer's at its scheme's width), every other parameter fp32."""
    bits = dict(layer_bits or {})
    for path, layer in module.named_modules():
        if isinstance(layer, QuantizedLayer | Bf16Layer):
            bits[f"{path}.layer" if path else "layer"] = stored_weight_bits(layer)
    total = 0.0
    for path, layer in module.named_modules():
        for name, parameter in layer.named_parameters(recurse=False):
            weight = name == "weight" and isinstance(layer, ops.CONVS + (nn.Linear,))
            total += parameter.numel() * (bits.get(path, FLOAT_BITS) if weight else FLOAT_BITS) / 8
    return total
