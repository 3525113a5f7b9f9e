"""Candidates: per channel group the widths it may be pruned to and, on an int8 runtime, the
quantization: per layer its weight width for a size target, the whole model in int8 for a
latency target. Each comes with what it saves and what it costs in fidelity, both measured
with only that change applied.

Latency targets quantize the whole model or nothing: a float layer among int8 ones adds
quantize/dequantize and layout conversions at both its ends, which per-layer predictions
price poorly (on the digits CNN in onnxruntime, one float layer among int8 ones was measured
at 3x its prediction), while the whole model's int8 saving is measured: the original is timed
in float and all int8 (``Meter.anchor``).

The saving is the target's figure of the unchanged model minus that of the trial (predicted ms,
counted MACs or stored bytes); the sensitivity is the mean KL divergence of the trial's class
scores from the original's on the calibration batches (the relative output error for outputs
that are not class scores). Tables are cached for the life of the table, so re-planning and
giving back measure nothing again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from slimfx.data import Batch
from slimfx.ir.graph import Graph
from slimfx.ir.verify import run_outputs
from slimfx.metrics import output_divergence
from slimfx.passes.base import PassContext
from slimfx.passes.prune_channels import PrunableGroup, PruneChannels, PruneTrials
from slimfx.quant.schemes import SCHEME_BITS
from slimfx.target.meter import Meter, quantized_copy
from slimfx.target.quant_trials import QuantTrials
from slimfx.target.settings import FLOAT, FLOAT_BITS, Settings

KEEP_FRACTIONS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # the widths offered, as shares of the channels
SENSITIVITY_ROWS = 256  # calibration rows the sensitivity is measured on, at most
SIZE_SCHEMES = ("int8", "int4", "int2", "ternary", "binary")  # weight widths offered per layer
EVERY_LAYER = "*"  # the item of a latency target's quantization (as an exclude pattern: every layer)


@dataclass(frozen=True)
class Candidate:
    """One option for one item (a channel group or a layer), applied alone: what it saves in
    the target's unit and its sensitivity (KL to the original's outputs)."""

    item: str
    saved: float
    sensitivity: float
    technique: ClassVar[str] = ""

    @property
    def setting(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class PruneCandidate(Candidate):
    """Group ``item`` (its first source layer) pruned to ``width`` of its ``channels``."""

    width: int = 0
    channels: int = 0
    technique: ClassVar[str] = "prune"

    @property
    def setting(self) -> str:
        return f"{self.width}/{self.channels}"


@dataclass(frozen=True)
class QuantCandidate(Candidate):
    """Layer ``item`` (``*``: every layer) quantized with weights stored by ``scheme``
    (``float``: left alone)."""

    scheme: str = FLOAT
    technique: ClassVar[str] = "quantize"

    @property
    def setting(self) -> str:
        return self.scheme


@dataclass(frozen=True)
class ItemCandidates:
    """An item and its candidates; the first changes nothing."""

    item: str
    options: tuple[Candidate, ...]

    @property
    def technique(self) -> str:
        return self.options[0].technique

    @property
    def key(self) -> str:
        """A name unique across techniques (a layer can be a group's source and be quantized)."""
        return f"{self.technique} {self.item}"


def offered_widths(channels: int, step: int, min_channels: int = 1) -> list[int]:
    """The widths offered for a group of ``channels``: each ``KEEP_FRACTIONS`` share rounded
    to a multiple of ``step`` (the runtime's latency staircase), narrower than the group, at
    least ``min_channels``, each once, widest first."""
    widths = []
    for fraction in KEEP_FRACTIONS:
        width = max(round(channels * fraction / step) * step, step, min_channels)
        if width < channels and width not in widths:
            widths.append(width)
    return sorted(widths, reverse=True)


def sensitivity_batches(batches: Sequence[Batch], rows: int = SENSITIVITY_ROWS) -> list[Batch]:
    """The first batches holding at most ``rows`` rows (at least one batch)."""
    kept, count = [], 0
    for batch in batches:
        if kept and count + batch.rows > rows:
            break
        kept.append(batch)
        count += batch.rows
    return kept


class CandidateTable:
    """Measures and caches the candidates of one graph: every prunable group's widths and, when
    the meter plans quantization, int8 for the whole model (latency) or every quantizable
    layer's weight widths (size)."""

    def __init__(
        self,
        graph: Graph,
        meter: Meter,
        ctx: PassContext,
        step: int = 1,
        progress: Callable[[str], None] | None = None,
    ):
        self.graph, self.meter, self.ctx, self.step, self.progress = graph, meter, ctx, step, progress
        self.batches = sensitivity_batches(list(ctx.batches("target")))
        self.reference = self._outputs(graph)
        self.base = meter.of_float(graph)  # the unchanged float model's figure: what savings start from
        self.original = self.base  # the original's figure, what a relative target is a fraction of
        self.trials = PruneTrials(PruneChannels(), graph)
        self.groups = self.trials.groups()
        per_layer = meter.plans_quantization and meter.target.unit == "size"
        self.quant = QuantTrials(graph, [b.inputs for b in self.batches]) if per_layer else None
        self._measured: dict[tuple[str, str], Candidate] = {}

    @property
    def quantizes_whole_model(self) -> bool:
        return self.meter.plans_quantization and self.quant is None

    def build(self) -> list[ItemCandidates]:
        """Every item's candidates, measured (with progress) where not cached."""
        total = sum(len(offered_widths(g.channels, self.step)) for g in self.groups)
        total += (
            len(self.quant.layers) * len(SIZE_SCHEMES) if self.quant is not None else int(self.quantizes_whole_model)
        )
        done = 0
        found = []
        for group in self.groups:
            options: list[Candidate] = [PruneCandidate(group.source, 0.0, 0.0, group.channels, group.channels)]
            for width in offered_widths(group.channels, self.step):
                done += 1
                self._say(f"{group.source} at {width}/{group.channels}", (group.source, str(width)), done, total)
                options.append(self.pruning(group, width))
            found.append(ItemCandidates(group.source, tuple(options)))
        for layer in self.quant.layers if self.quant is not None else ():
            options = [QuantCandidate(layer, 0.0, 0.0, FLOAT)]
            for scheme in SIZE_SCHEMES:
                done += 1
                self._say(f"{layer} in {scheme}", (layer, scheme), done, total)
                options.append(self.quantization(layer, scheme))
            found.append(ItemCandidates(layer, tuple(options)))
        if self.quantizes_whole_model:
            self._say("every layer in int8", (EVERY_LAYER, "int8"), total, total)
            int8 = self.whole_model_int8()
            found.append(ItemCandidates(EVERY_LAYER, (QuantCandidate(EVERY_LAYER, 0.0, 0.0, FLOAT), int8)))
        return found

    def pruning(self, group: PrunableGroup, width: int) -> Candidate:
        """``group`` pruned to ``width`` alone, measured once."""
        key = (group.source, str(width))
        if key not in self._measured:
            trial = self.trials.pruned({group.source: width})
            saved = self.base - self.meter.of_float(trial)
            sensitivity = self._sensitivity(self._outputs(trial))
            self._measured[key] = PruneCandidate(group.source, saved, sensitivity, width, group.channels)
        return self._measured[key]

    def quantization(self, layer: str, scheme: str) -> Candidate:
        """``layer``'s weights stored by ``scheme`` alone (its input on a uint8 grid), measured
        once; it saves the weights' fp32 bytes less their bytes at the scheme's width."""
        assert self.quant is not None
        key = (layer, scheme)
        if key not in self._measured:
            with self.quant.quantized(layer, scheme):
                sensitivity = self._sensitivity(self._outputs(self.graph))
            weights = self.graph.module.get_submodule(layer).weight.numel()
            saved = weights * (FLOAT_BITS - SCHEME_BITS[scheme]) / 8
            self._measured[key] = QuantCandidate(layer, saved, sensitivity, scheme)
        return self._measured[key]

    def whole_model_int8(self) -> Candidate:
        """Every layer in int8 (calibrated by entropy on the sensitivity batches), measured once:
        it saves the float model's figure less the all-int8 model's, both anchored to measurement."""
        key = (EVERY_LAYER, "int8")
        if key not in self._measured:
            int8 = Settings(quantize=True)
            calibrated = quantized_copy(self.graph, self._sensitivity_context(), int8, calib="entropy")
            saved = self.base - self.meter.of_plan(self.graph, int8, self.ctx)
            self._measured[key] = QuantCandidate(
                EVERY_LAYER, saved, self._sensitivity(self._outputs(calibrated)), "int8"
            )
        return self._measured[key]

    def _sensitivity_context(self) -> PassContext:
        ctx = self.ctx
        return PassContext([b.inputs for b in self.batches], ctx.example_inputs, ctx.seed, None, ctx.fixed_rows)

    def pruned(self, widths: dict[str, int]) -> Graph:
        """A copy of the graph with each named group pruned to its width."""
        return self.trials.pruned(widths)

    def _say(self, what: str, key: tuple[str, str], done: int, total: int) -> None:
        if self.progress is not None and key not in self._measured:
            self.progress(f"target: sensitivity of {what} ({done}/{total})")

    def _sensitivity(self, outputs: list[torch.Tensor]) -> float:
        return sum(output_divergence(r, o) for r, o in zip(self.reference, outputs)) / len(outputs)

    def _outputs(self, graph: Graph) -> list[torch.Tensor]:
        per_batch = [run_outputs(graph.module, b.inputs) for b in self.batches]
        return [torch.cat([outs[k].float() for outs in per_batch]) for k in range(len(per_batch[0]))]
