"""One layer quantized alone, on the float graph: its weights by a scheme and its input on a
uint8 grid (min-max over the trial batches), every other layer left in float. The outputs are
what a quantization candidate's sensitivity is measured on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.passes.candidates import layer_candidates
from slimfx.quant.layers import ACT_QMAX, ACT_QMIN, activation_qparams
from slimfx.quant.schemes import quantize_weight


def quantizable_layers(graph: Graph) -> list[fx.Node]:
    """The conv and linear layers ``quantize`` would quantize, in graph order."""
    return layer_candidates(graph, ops.WEIGHTED_LAYERS).eligible


class QuantTrials:
    """Runs ``graph`` with one layer quantized at a time; the input ranges are observed once."""

    def __init__(self, graph: Graph, inputs: Sequence[Sequence[torch.Tensor]]):
        self.graph = graph
        self.layers = [str(n.target) for n in quantizable_layers(graph)]
        self.ranges = self._input_ranges(inputs)

    @contextmanager
    def quantized(self, layer: str, scheme: str) -> Iterator[None]:
        """``layer`` runs with its weights stored by ``scheme`` and its input on a uint8 grid."""
        module = self.graph.module.get_submodule(layer)
        low, high = self.ranges[layer]
        scale, zero_point = activation_qparams(max(abs(low), abs(high)), low >= 0)

        def on_grid(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = torch.fake_quantize_per_tensor_affine(args[0], scale, zero_point, ACT_QMIN, ACT_QMAX)
            return (x, *args[1:])

        original = module.weight.data
        module.weight.data = quantize_weight(original, scheme).weight.detach()
        handle = module.register_forward_pre_hook(on_grid)
        try:
            yield
        finally:
            handle.remove()
            module.weight.data = original

    def _input_ranges(self, inputs: Sequence[Sequence[torch.Tensor]]) -> dict[str, tuple[float, float]]:
        ranges = {layer: (float("inf"), float("-inf")) for layer in self.layers}
        handles = []
        for layer in self.layers:

            def observe(_: nn.Module, args: tuple[torch.Tensor, ...], layer: str = layer) -> None:
                low, high = ranges[layer]
                ranges[layer] = (min(low, float(args[0].min())), max(high, float(args[0].max())))

            handles.append(self.graph.module.get_submodule(layer).register_forward_pre_hook(observe))
        try:
            with torch.no_grad():
                for batch in inputs:
                    self.graph.module(*batch)
        finally:
            for handle in handles:
                handle.remove()
        return ranges
