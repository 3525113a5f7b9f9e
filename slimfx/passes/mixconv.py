"""mixconv: depthwise convs whose channels take the smallest kernel that holds their energy (MixNet)."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
from slimfx.rewrites.mixconv import MixedDepthwise, cropped_depthwise, kernel_per_channel, outer_energy


@dataclass(frozen=True)
class MixConvDetails(Details):
    """A depthwise conv split by kernel size: channels per kernel, the weight energy cropped,
    the layers reordered so each kernel's channels are contiguous, and the predicted ms."""

    kernel: int
    channels_per_kernel: tuple[tuple[int, int], ...]  # (kernel size, channels)
    weight_error: float
    reordered: tuple[str, ...]
    predicted_ms_before: float | None
    predicted_ms_after: float | None


def is_depthwise(conv: nn.Module) -> bool:
    """A 2-d conv with one filter per channel (groups = in = out channels)."""
    return isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels > 1


def why_not_split(_node: fx.Node, conv: nn.Module) -> str | None:
    """Why depthwise ``conv`` cannot be split by kernel size, or None."""
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"kernel {k[0]}x{k[1]} is not square and odd"
    if conv.padding_mode != "zeros" or conv.padding != tuple(d * (k[0] - 1) // 2 for d in conv.dilation):
        return f"padding {conv.padding} ({conv.padding_mode}) is not the 'same' zero padding a smaller kernel can keep"
    if k[0] == 1:
        return "already 1x1"
    return None


@dataclass(frozen=True)
class MixPlan(RewritePlan):
    """Channel parts (kernel size, count) in the planned order, a note, the predicted speed."""

    parts: tuple[tuple[int, int], ...] = ()
    note: str = ""
    speed: PredictedSpeed | None = None


@register
@dataclass(frozen=True)
class MixConv(LayerRewrite):
    """Split each depthwise k x k conv into channel groups with their own kernel sizes.

    Each channel takes the smallest size in ``kernels`` (default: every odd size up to the
    layer's own, 1 included) whose cropped-away outer ring holds at most ``energy`` of its
    squared weights; channels are reordered so that each size's are contiguous (the layers
    around are reordered alike, across residual adds), and the layer becomes a split, one
    depthwise conv per size, and a concat. Where the channels cannot be reordered, all take
    the largest size any needs. Exact with ``energy=0`` (only all-zero rings are cropped).
    """

    name = "mixconv"
    summary = "MixConv: depthwise channels take the smallest kernel that holds their weight energy"
    option_help = {
        "kernels": "kernel sizes channels may take (odd; default: every odd size up to the layer's, 1 included)",
        "energy": "largest share of a channel's squared weights its cropped outer ring may hold (default 0.05)",
        "runtime": "decline a layer whose split is predicted no faster on this runtime (torch, onnxruntime, ...)",
        "exclude": "module-path patterns (fnmatch: features.1*) left alone",
    }
    runs_after = {"prune-channels": "pruning sees the original depthwise layers"}

    kernels: tuple[int, ...] = ()
    energy: float = 0.05
    runtime: PredictedRuntime | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [k for k in self.kernels if k < 1 or k % 2 == 0]
        if bad:
            raise self.invalid("kernels", ",".join(map(str, self.kernels)), "odd kernel sizes >= 1 (1,3,5)")
        if not 0 <= self.energy < 1:
            raise self.invalid("energy", self.energy, "a share of weight energy in [0, 1)")

    def is_exact(self) -> bool:
        return self.energy == 0

    def considers(self, module: nn.Module) -> bool:
        return is_depthwise(module)

    def why_not(self, graph: Graph, node: fx.Node, conv: nn.Module) -> str | None:
        return why_not_split(node, conv)

    def check(self, graph: Graph, eligible: list[fx.Node]) -> None:
        if not self.kernels or not eligible:
            return
        largest = max(graph.submodule(n).kernel_size[0] for n in eligible)
        above = [k for k in self.kernels if k > largest]
        if above:
            raise PassError(
                f"mixconv: kernels={','.join(map(str, self.kernels))} includes {above[0]}, above the largest "
                f"depthwise kernel in the model ({largest}x{largest}); give sizes up to {largest}"
            )

    def plan(self, run: RewriteRun, node: fx.Node) -> MixPlan | Decision:
        conv = run.graph.submodule(node)
        k = conv.kernel_size[0]
        kernels = self.kernels or tuple(range(1, k + 1, 2))
        chosen = kernel_per_channel(conv.weight.detach(), kernels, self.energy)
        if bool((chosen == k).all()):
            smaller = max(s for s in kernels if s < k and s % 2 == k % 2)
            share = float(outer_energy(conv.weight.detach(), smaller).min())
            return run.declined(
                node,
                f"every channel needs its {k}x{k} kernel (the least outer-ring share is {share:.1%}, "
                f"energy={self.energy:g})",
            )
        order = torch.argsort(chosen, stable=True)
        sizes, counts = torch.unique_consecutive(chosen[order], return_counts=True)
        parts = tuple((int(s), int(c)) for s, c in zip(sizes, counts))
        return self._priced(run, node, MixPlan(order if len(parts) > 1 else None, parts))

    def without_reorder(self, run: RewriteRun, node: fx.Node, plan: MixPlan, why: str) -> MixPlan | Decision:
        """Every channel at the largest size any needs, when that is smaller than the layer's."""
        largest = max(size for size, _ in plan.parts)
        conv = run.graph.submodule(node)
        if largest == conv.kernel_size[0]:
            return run.declined(node, f"mixed kernels need reordering, and {why}")
        single = MixPlan(None, ((largest, conv.out_channels),), f"all channels at {largest}x{largest} ({why})")
        return self._priced(run, node, single)

    def _priced(self, run: RewriteRun, node: fx.Node, plan: MixPlan) -> MixPlan | Decision:
        """The plan with its predicted speed on ``runtime``, or declined where it does not pay."""
        if self.runtime is None:
            return plan
        conv = run.graph.submodule(node)
        replacement = _replacement(conv, plan.parts)
        speed = predicted_speed(conv, replacement, run.in_shape(node), self.runtime, run.ctx.progress)
        if not speed.pays:
            return run.declined(node, f"the split is no faster: {speed}")
        return replace(plan, speed=speed)

    def build(self, run: RewriteRun, node: fx.Node, plan: MixPlan, reordered: tuple[str, ...]) -> Decision:
        conv = run.graph.submodule(node)
        k = conv.kernel_size[0]
        macs = run.macs(node)
        replacement = _replacement(conv, plan.parts)
        if isinstance(replacement, MixedDepthwise):
            run.rewriter.inline_module(node, replacement)
        else:
            run.rewriter.replace_module(node, replacement)
        convs = list(replacement.convs) if isinstance(replacement, MixedDepthwise) else [replacement]
        weight = conv.weight.detach()
        padded = torch.cat([nn.functional.pad(c.weight.detach(), [(k - c.kernel_size[0]) // 2] * 4) for c in convs])
        weight_error = relative_error(padded, weight)
        after_macs = int(sum(macs * c * s * s / (conv.out_channels * k * k) for s, c in plan.parts))
        speed = plan.speed
        reason = (
            ", ".join(f"{s}x{s}: {c}" for s, c in plan.parts)
            + f" of {conv.out_channels} channels (outer ring at most {self.energy:g} of each channel's energy)"
            + (f"; {plan.note}" if plan.note else "")
            + (f"; {len(reordered)} layers reordered" if reordered else "")
            + (f"; {speed}" if speed is not None else "")
        )
        details = MixConvDetails(
            k,
            plan.parts,
            weight_error,
            reordered,
            speed.before_ms if speed else None,
            speed.after_ms if speed else None,
        )
        return Decision(str(node.target), Action.REWRITTEN, reason, macs, after_macs, weight_error, details)


def _replacement(conv: nn.Conv2d, parts: tuple[tuple[int, int], ...]) -> nn.Module:
    """The depthwise layers for channel ``parts`` (kernel size, count), taken in channel order."""
    splits = torch.split(torch.arange(conv.out_channels), [count for _, count in parts])
    convs = [cropped_depthwise(conv, channels, size) for (size, _), channels in zip(parts, splits)]
    return convs[0] if len(convs) == 1 else MixedDepthwise([count for _, count in parts], convs)
