"""fire: k x k convs become SqueezeNet fire modules (squeeze, then 1x1 and k x k expands)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.latency import PredictedRuntime
from slimfx.details import Details
from slimfx.ir.graph import Graph
from slimfx.passes.base import Action, Decision
from slimfx.passes.layer_rewrite import LayerRewrite, RewritePlan, RewriteRun
from slimfx.passes.registry import register
from slimfx.passes.rewrite_speed import PredictedSpeed, predicted_speed
from slimfx.rewrites.fire import fire_macs, fire_module, fire_order


@dataclass(frozen=True)
class FireDetails(Details):
    """A conv become a fire module: squeeze width, outputs per expand, the weight error, the
    layers reordered and the predicted ms."""

    squeeze: int
    expand1x1: int
    expand_kxk: int
    weight_error: float
    layers: tuple[str, ...]
    reordered: tuple[str, ...]
    predicted_ms_before: float | None
    predicted_ms_after: float | None


@dataclass(frozen=True)
class FirePlan(RewritePlan):
    """Squeeze width, outputs given a 1x1 expand (the first ``ones`` planned), MACs after, speed."""

    squeeze: int = 0
    ones: int = 0
    macs_after: int = 0
    speed: PredictedSpeed | None = None


@register
@dataclass(frozen=True)
class FireModules(LayerRewrite):
    """Replace each k x k conv (C -> O) by a fire module: a 1x1 squeeze to ``s`` channels, then
    a 1x1 expand for the ``expand1x1`` share of outputs whose kernels hold most energy at the
    centre and a k x k expand for the rest, concatenated (the channels around reordered).

    ``s`` is ``squeeze`` or ``squeeze-ratio`` x O. The weights come from the best rank-``s``
    split over input channels (SVD); lossy, for distillation to recover. Declined where the
    module costs no fewer MACs than the conv, or is predicted no faster on ``runtime``.
    """

    name = "fire"
    summary = "SqueezeNet fire modules: a squeeze and two expands (1x1, k x k) from a low-rank split"
    option_help = {
        "squeeze": "squeeze width for every conv (overrides squeeze-ratio)",
        "squeeze_ratio": "squeeze width as a share of the conv's outputs (default 0.25)",
        "expand1x1": "share of outputs given a 1x1 expand (default 0.5)",
        "runtime": "decline a conv whose fire module is predicted no faster on this runtime",
        "exclude": "module-path patterns (fnmatch: layer4.*) left alone",
    }
    runs_after = {"prune-channels": "pruning sees the original convs"}

    squeeze: int | None = None
    squeeze_ratio: float = 0.25
    expand1x1: float = 0.5
    runtime: PredictedRuntime | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.squeeze is not None and self.squeeze < 1:
            raise self.invalid("squeeze", self.squeeze, "an integer >= 1")
        if not 0 < self.squeeze_ratio <= 1:
            raise self.invalid("squeeze-ratio", self.squeeze_ratio, "a share of the outputs in (0, 1]")
        if not 0 <= self.expand1x1 < 1:
            raise self.invalid("expand1x1", self.expand1x1, "a share of the outputs in [0, 1)")

    def why_not(self, graph: Graph, node: fx.Node, conv: nn.Module) -> str | None:
        k = conv.kernel_size
        if len(k) != 2 or k[0] != k[1] or k[0] % 2 == 0 or k[0] == 1:
            return f"kernel {'x'.join(map(str, k))} is not square, odd and larger than 1x1"
        if conv.groups != 1:
            return f"a grouped conv ({conv.groups} groups)"
        if conv.padding_mode != "zeros" or conv.padding != tuple(d * (k[0] - 1) // 2 for d in conv.dilation):
            return f"padding {conv.padding} is not the 'same' zero padding a 1x1 expand can match"
        return None

    def plan(self, run: RewriteRun, node: fx.Node) -> FirePlan | Decision:
        conv = run.graph.submodule(node)
        macs = run.macs(node)
        squeeze = self.squeeze or max(1, math.ceil(self.squeeze_ratio * conv.out_channels))
        ones = int(self.expand1x1 * conv.out_channels)
        in_shape = run.in_shape(node)
        out_shape = tuple(run.graph.info(node).out_shape)
        after = fire_macs(conv, in_shape[2:], out_shape[2:], ones, squeeze) * in_shape[0]
        if after >= macs:
            return run.declined(
                node, f"a fire module with squeeze {squeeze} costs {after:,} MACs, not less than {macs:,}"
            )
        order = fire_order(conv.weight.detach(), ones)
        speed = None
        if self.runtime is not None:
            module, _ = fire_module(conv, order, ones, squeeze)
            speed = predicted_speed(conv, module, in_shape, self.runtime, run.ctx.progress)
            if not speed.pays:
                return run.declined(node, f"the fire module is no faster: {speed}")
        return FirePlan(order if ones else None, squeeze, ones, after, speed)

    def without_reorder(self, run: RewriteRun, node: fx.Node, plan: FirePlan, why: str) -> Decision:
        k = run.graph.submodule(node).kernel_size[0]
        return run.declined(node, f"its 1x1 and {k}x{k} outputs need reordering, and {why}")

    def build(self, run: RewriteRun, node: fx.Node, plan: FirePlan, reordered: tuple[str, ...]) -> Decision:
        conv = run.graph.submodule(node)  # its outputs now in the planned order
        macs = run.macs(node)
        module, weight_error = fire_module(conv, torch.arange(conv.out_channels), plan.ones, plan.squeeze)
        run.rewriter.inline_module(node, module)
        k, speed = conv.kernel_size[0], plan.speed
        reason = (
            f"squeeze {conv.in_channels} -> {plan.squeeze}, expand to {plan.ones} (1x1) + "
            f"{conv.out_channels - plan.ones} ({k}x{k}): weight error {weight_error:.3g} (relative)"
            + (f"; {len(reordered)} layers reordered" if reordered else "")
            + (f"; {speed}" if speed is not None else "")
        )
        parts = ("squeeze", "expand1", "expand3") if plan.ones else ("squeeze", "expand3")
        details = FireDetails(
            plan.squeeze,
            plan.ones,
            conv.out_channels - plan.ones,
            weight_error,
            tuple(f"{node.target}.{p}" for p in parts),
            reordered,
            speed.before_ms if speed else None,
            speed.after_ms if speed else None,
        )
        return Decision(str(node.target), Action.REWRITTEN, reason, macs, plan.macs_after, weight_error, details)
