"""octave: convs whose smoothest channels move to half resolution (octave convolution)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.latency import PredictedRuntime
from slimfx.details import Details
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import with_outputs
from slimfx.metrics import relative_error
from slimfx.passes.base import Action, DataNeed, Decision
from slimfx.passes.layer_rewrite import LayerRewrite, RewritePlan, RewriteRun
from slimfx.passes.registry import register
from slimfx.passes.rewrite_speed import PredictedSpeed, predicted_speed
from slimfx.rewrites.octave import octave_conv, octave_macs, octave_order, smoothness_loss

SAMPLE_BATCHES = 4  # calibration batches the activations are measured on


@dataclass(frozen=True)
class OctaveDetails(Details):
    """A conv become an octave conv: low-frequency channels per side, the energy those lose at
    half resolution, the output error on calibration data, the layers reordered, predicted ms."""

    alpha: float
    low_inputs: int
    low_outputs: int
    input_loss: float
    output_loss: float
    output_error: float
    reordered: tuple[str, ...]
    predicted_ms_before: float | None
    predicted_ms_after: float | None


@dataclass(frozen=True)
class OctavePlan(RewritePlan):
    low_in: int = 0
    low_out: int = 0
    input_loss: float = 0.0
    output_loss: float = 0.0
    macs_after: int = 0
    speed: PredictedSpeed | None = None


@dataclass(frozen=True)
class _Activations:
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@register
@dataclass(frozen=True)
class OctaveConvs(LayerRewrite):
    """Replace each stride-1 "same" conv by an octave conv: the ``alpha`` share of its input
    and output channels that lose least at half resolution (measured on calibration data) runs
    at half resolution, the four paths initialized from the original weight's blocks (those at
    half resolution through a 2x2-block mix of the kernel); the low outputs are upsampled
    (nearest) and concatenated after the high ones, the channels around reordered. The low
    part's MACs fall 4x. Lossy: distill to recover."""

    name = "octave"
    summary = "octave convolution: the smoothest channels of a conv at half resolution"
    option_help = {
        "alpha": "share of input and output channels at half resolution, in (0, 1) (default 0.5)",
        "runtime": "decline a conv whose octave form is predicted no faster on this runtime",
        "exclude": "module-path patterns (fnmatch: layer4.*) left alone",
    }
    runs_after = {"prune-channels": "pruning sees the original convs"}

    alpha: float = 0.5
    runtime: PredictedRuntime | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise self.invalid("alpha", self.alpha, "a share of the channels in (0, 1)")

    def data_need(self) -> DataNeed:
        return DataNeed.CALIBRATION

    def why_not(self, graph: Graph, node: fx.Node, conv: nn.Module) -> str | None:
        k = conv.kernel_size
        if conv.groups != 1:
            return f"a grouped conv ({conv.groups} groups)"
        if conv.stride != (1, 1):
            return f"stride {conv.stride[0]}x{conv.stride[1]}: only stride-1 convs keep their resolution"
        if conv.padding_mode != "zeros" or conv.padding != tuple(d * (s - 1) // 2 for d, s in zip(conv.dilation, k)):
            return f"padding {conv.padding} is not the 'same' zero padding"
        shape = graph.info(node.args[0]).out_shape
        if shape is None or len(shape) != 4 or shape[2] % 2 or shape[3] % 2:
            return f"its input ({shape}) is not an even-sized 2-d map a 2x2 pool halves"
        low_in, low_out = round(self.alpha * conv.in_channels), round(self.alpha * conv.out_channels)
        if not (0 < low_in < conv.in_channels and 0 < low_out < conv.out_channels):
            sides = f"{conv.in_channels} in, {conv.out_channels} out"
            return f"alpha={self.alpha:g} leaves no channel on one side ({sides})"
        return None

    def prepare(self, run: RewriteRun, eligible: list[fx.Node]) -> _Activations:
        """Each candidate's input and output on a few calibration batches."""
        names = [n for node in eligible for n in (node.args[0].name, node.name)]
        probe = with_outputs(run.graph.module, list(dict.fromkeys(names)), f"{self.name} (probe)")
        taken: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        with torch.no_grad():
            for _, batch in zip(range(SAMPLE_BATCHES), run.ctx.batches(self.name)):
                values = probe(*batch.inputs)
                for name, value in zip(dict.fromkeys(names), values):
                    taken[name].append(value)
        joined = {name: torch.cat(parts) for name, parts in taken.items()}
        return _Activations(
            {n.name: joined[n.args[0].name] for n in eligible}, {n.name: joined[n.name] for n in eligible}
        )

    def plan(self, run: RewriteRun, node: fx.Node) -> OctavePlan | Decision:
        conv = run.graph.submodule(node)
        low_in, low_out = round(self.alpha * conv.in_channels), round(self.alpha * conv.out_channels)
        in_loss = smoothness_loss(run.prepared.inputs[node.name])
        out_loss = smoothness_loss(run.prepared.outputs[node.name])
        out_order = octave_order(out_loss, low_out) if run.side_free(node, "out") is None else None
        in_order = octave_order(in_loss, low_in) if run.side_free(node, "in") is None else None
        low_inputs = (in_order if in_order is not None else run.current_index(node, "in"))[-low_in:]
        low_outputs = (out_order if out_order is not None else run.current_index(node, "out"))[-low_out:]
        in_shape = run.in_shape(node)
        after = octave_macs(conv, in_shape[2:], low_in, low_out) * in_shape[0]
        speed = None
        if self.runtime is not None:
            speed = predicted_speed(conv, octave_conv(conv, low_in, low_out), in_shape, self.runtime, run.ctx.progress)
            if not speed.pays:
                return run.declined(node, f"the octave conv is no faster: {speed}")
        return OctavePlan(
            out_order,
            input_order=in_order,
            low_in=low_in,
            low_out=low_out,
            input_loss=float(in_loss[low_inputs].mean()),
            output_loss=float(out_loss[low_outputs].mean()),
            macs_after=after,
            speed=speed,
        )

    def build(self, run: RewriteRun, node: fx.Node, plan: OctavePlan, reordered: tuple[str, ...]) -> Decision:
        conv = run.graph.submodule(node)  # its channels now in the planned order
        macs = run.macs(node)
        module = octave_conv(conv, plan.low_in, plan.low_out)
        x = run.prepared.inputs[node.name][:, run.current_index(node, "in")]
        with torch.no_grad():
            output_error = relative_error(conv(x), module(x))
        run.rewriter.inline_module(node, module)
        speed = plan.speed
        reason = (
            f"{plan.low_in} of {conv.in_channels} inputs and {plan.low_out} of {conv.out_channels} outputs at half "
            f"resolution (they lose {plan.input_loss:.1%} and {plan.output_loss:.1%} of their energy there); "
            f"output error {output_error:.3g} (relative, on calibration data)"
            + (f"; {len(reordered)} layers reordered" if reordered else "")
            + (f"; {speed}" if speed is not None else "")
        )
        details = OctaveDetails(
            self.alpha,
            plan.low_in,
            plan.low_out,
            plan.input_loss,
            plan.output_loss,
            output_error,
            reordered,
            speed.before_ms if speed else None,
            speed.after_ms if speed else None,
        )
        return Decision(str(node.target), Action.REWRITTEN, reason, macs, plan.macs_after, output_error, details)
