"""A graph's figure in a target's unit: predicted milliseconds, counted MACs or stored bytes.

Float trials (pruned only) are priced on the chosen runtime's float flavour; the plan's own
total is priced as it will be deployed: on an int8 runtime the pruned graph is folded and
quantized (min-max on one batch: scales do not change which kernels run) and predicted there.
"""

from __future__ import annotations

from collections.abc import Callable
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
from slimfx.passes.quantize import Quantize


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
    def where(self) -> str:
        """The runtime the deployed figure is on, as reports name it."""
        return self.runtime or "torch"

    def original(self, graph: Graph) -> float:
        """The original's figure: latency predicted in the runtime's float flavour, MACs, fp32 bytes."""
        if self.target.unit == "size":
            return float(stored_bytes(graph.module, 4))
        return self.of_float(graph)

    def of_float(self, graph: Graph) -> float:
        """A float (unquantized) graph's figure; bytes at the width the deployed model stores."""
        ensure_costs(graph)
        if self.target.unit == "macs":
            return float(total_cost(graph).macs)
        if self.target.unit == "size":
            return float(stored_bytes(graph.module, 1 if self.quantizes else 4))
        assert self.float_side is not None
        return self.float_side.predict(graph).total_ms

    def of_plan(self, pruned: Graph, ctx: PassContext) -> float:
        """The figure of ``pruned`` as it will be deployed (folded and quantized on an int8 runtime)."""
        if self.target.unit != "latency" or not self.quantizes:
            return self.of_float(pruned)
        deployed = quantized_copy(pruned, ctx)
        assert self.deployed_side is not None
        self.deployed_side.fill(deployed)
        return self.deployed_side.predict(deployed).total_ms


def quantized_copy(graph: Graph, ctx: PassContext) -> Graph:
    """``graph`` folded and quantized on a copy, calibrated min-max on the first batch: the
    deployed structure, for pricing only (the real build calibrates properly)."""
    trial = snapshot(graph)
    first = next(ctx.batches("target planner"))
    quick = PassContext([first.inputs], ctx.example_inputs, ctx.seed, None, ctx.fixed_rows)
    FoldBatchNorm().run(trial, quick)
    Quantize(calib="minmax").run(trial, quick)
    ensure_costs(trial)
    return trial


def stored_bytes(module: nn.Module, weight_bytes: int) -> int:
    """Bytes of the parameters: conv and linear weights at ``weight_bytes`` each, the rest fp32."""
    total = 0
    for layer in module.modules():
        for name, parameter in layer.named_parameters(recurse=False):
            width = weight_bytes if name == "weight" and isinstance(layer, ops.CONVS + (nn.Linear,)) else 4
            total += parameter.numel() * width
    return total
