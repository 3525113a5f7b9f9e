"""group-convs: dense convs become grouped convs whose channel groups are learned from the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.latency import PredictedRuntime
from slimfx.details import Details
from slimfx.errors import PassError
from slimfx.ir.graph import Graph
from slimfx.metrics import relative_error
from slimfx.passes.base import Action, Decision
from slimfx.passes.layer_rewrite import LayerRewrite, RewritePlan, RewriteRun
from slimfx.passes.registry import register
from slimfx.passes.rewrite_speed import PredictedSpeed, predicted_speed
from slimfx.rewrites.grouping import group_order, kept_share, learned_groups, weight_magnitude


@dataclass(frozen=True)
class GroupDetails(Details):
    """A conv become grouped: the groups, which sides were free to be reordered, the share of
    the weights' L1 mass kept, the relative weight error, the layers reordered, predicted ms."""

    groups: int
    outputs_reordered: bool
    inputs_reordered: bool
    kept_share: float
    weight_error: float
    reordered: tuple[str, ...]
    predicted_ms_before: float | None
    predicted_ms_after: float | None


@dataclass(frozen=True)
class GroupPlan(RewritePlan):
    """The grouping's kept share, which sides were reordered, the predicted speed."""

    kept: float = 0.0
    speed: PredictedSpeed | None = None


@register
@dataclass(frozen=True)
class GroupConvs(LayerRewrite):
    """Replace each dense conv by a grouped conv with ``groups`` groups.

    Channels are assigned to groups by the weight they carry into each group (CondenseNet's
    condensation: inputs chosen per output group by their weights' L1 norm) and, where the
    output side can be reordered too, outputs and inputs jointly (FLGC: alternating until
    stable). The channels around are reordered so that each group's are contiguous, across
    residual adds; a side that cannot be reordered keeps contiguous blocks in its present
    order. Exact when the weight is block-diagonal under such permutations; otherwise the
    off-group weights are dropped (lossy: distill to recover).
    """

    name = "group-convs"
    summary = "learned group convolutions (CondenseNet, FLGC): channel groups chosen from the weights"
    option_help = {
        "groups": "groups per conv (must divide its input and output channels)",
        "runtime": "decline a conv whose grouped form is predicted no faster on this runtime",
        "exclude": "module-path patterns (fnmatch: layer4.*) left alone",
    }
    runs_after = {"prune-channels": "pruning sees the dense convs (and keeps widths the groups divide)"}

    groups: int = 4
    runtime: PredictedRuntime | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.groups < 2:
            raise self.invalid("groups", self.groups, "an integer >= 2")

    def why_not(self, graph: Graph, node: fx.Node, conv: nn.Module) -> str | None:
        if conv.groups != 1:
            return f"already grouped ({conv.groups} groups)"
        if conv.in_channels % self.groups or conv.out_channels % self.groups:
            return f"groups={self.groups} does not divide its {conv.in_channels} inputs and {conv.out_channels} outputs"
        return None

    def check(self, graph: Graph, eligible: list[fx.Node]) -> None:
        dense = [  # a stem reading the model's input (3 channels) says nothing about the option
            graph.submodule(n)
            for n in graph.nodes()
            if n.op == "call_module"
            and isinstance(graph.submodule(n), nn.Conv2d)
            and graph.submodule(n).groups == 1
            and n.args[0].op != "placeholder"
        ]
        if dense and not any(c.in_channels % self.groups == 0 and c.out_channels % self.groups == 0 for c in dense):
            widths = sorted({(c.in_channels, c.out_channels) for c in dense})[:6]
            raise PassError(
                f"group-convs: groups={self.groups} divides the input and output channels of no conv in the model "
                f"(inputs, outputs: {', '.join(f'{i}x{o}' for i, o in widths)}); choose a common divisor"
            )

    def plan(self, run: RewriteRun, node: fx.Node) -> GroupPlan | Decision:
        conv = run.graph.submodule(node)
        free_out = run.side_free(node, "out") is None
        free_in = run.side_free(node, "in") is None
        magnitude = weight_magnitude(conv.weight.detach())
        current_out = run.current_index(node, "out")  # the order each side will have
        current_in = run.current_index(node, "in")
        magnitude = magnitude[current_out][:, current_in]
        out_group, in_group = learned_groups(magnitude, self.groups, free_out, free_in)
        kept = kept_share(magnitude, out_group, in_group)
        speed = None
        if self.runtime is not None:
            grouped = _grouped(conv, self.groups)
            speed = predicted_speed(conv, grouped, run.in_shape(node), self.runtime, run.ctx.progress)
            if not speed.pays:
                return run.declined(node, f"the grouped conv is no faster: {speed}")
        out_order = current_out[group_order(out_group)] if free_out else None
        in_order = current_in[group_order(in_group)] if free_in else None
        return GroupPlan(out_order, input_order=in_order, kept=kept, speed=speed)

    def build(self, run: RewriteRun, node: fx.Node, plan: GroupPlan, reordered: tuple[str, ...]) -> Decision:
        conv = run.graph.submodule(node)  # its channels now in the planned order
        macs = run.macs(node)
        grouped = _grouped(conv, self.groups)
        run.rewriter.replace_module(node, grouped)
        weight_error = relative_error(conv.weight.detach(), _dense(grouped))
        speed = plan.speed
        sides = [s for s, o in (("outputs", plan.order), ("inputs", plan.input_order)) if o is not None]
        reason = (
            f"{self.groups} groups keep {plan.kept:.1%} of the weights' L1 mass "
            f"({' and '.join(sides) + ' grouped by weight' if sides else 'contiguous blocks: neither side free'}); "
            f"weight error {weight_error:.3g} (relative)"
            + (f"; {len(reordered)} layers reordered" if reordered else "")
            + (f"; {speed}" if speed is not None else "")
        )
        details = GroupDetails(
            self.groups,
            plan.order is not None,
            plan.input_order is not None,
            plan.kept,
            weight_error,
            reordered,
            speed.before_ms if speed else None,
            speed.after_ms if speed else None,
        )
        return Decision(str(node.target), Action.REWRITTEN, reason, macs, macs // self.groups, weight_error, details)


def _grouped(conv: nn.Conv2d, groups: int) -> nn.Conv2d:
    """``conv`` as a grouped conv keeping only the diagonal blocks of its weight (contiguous groups)."""
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    per_in, per_out = conv.in_channels // groups, conv.out_channels // groups
    weight = conv.weight.detach()
    blocks = [weight[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] for g in range(groups)]
    new.weight = nn.Parameter(torch.cat(blocks).clone())
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias.detach().clone())
    return new


def _dense(grouped: nn.Conv2d) -> torch.Tensor:
    """The dense weight a grouped conv stands for (zeros off its diagonal blocks)."""
    groups, weight = grouped.groups, grouped.weight.detach()
    per_in, per_out = grouped.in_channels // groups, grouped.out_channels // groups
    dense = weight.new_zeros(grouped.out_channels, grouped.in_channels, *weight.shape[2:])
    for g in range(groups):
        dense[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = weight[g * per_out : (g + 1) * per_out]
    return dense
