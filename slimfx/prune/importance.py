"""Importance of each pruning unit: BatchNorm scale, filter L1 norm, ThiNet contributions.

Scores are summed over every coupled member of a unit (all BatchNorms that normalize it, all
filters that produce it). ``has_score`` marks units the criterion has something to say about.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.data import Batch
from slimfx.errors import RewriteError
from slimfx.ir.channels import ChannelAnalysis, LayerChannels, LayerKind
from slimfx.ir.graph import Graph


@dataclass(frozen=True)
class UnitScores:
    values: torch.Tensor  # one score per unit
    has_score: torch.Tensor  # bool per unit


def bn_scale_scores(graph: Graph, analysis: ChannelAnalysis) -> UnitScores:
    """Network Slimming: |gamma| of every BatchNorm over the unit's channels, summed."""
    scores = _Accumulator(analysis.num_units)
    for layer in analysis.layers.values():
        if layer.kind is LayerKind.BATCHNORM:
            bn = graph.module.get_submodule(layer.target)
            gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones(len(layer.out_units))
            scores.add(layer.out_units, gamma)
    return scores.result()


def l1_scores(graph: Graph, analysis: ChannelAnalysis) -> UnitScores:
    """Li et al.: L1 norm of each output filter of the layers that create the unit."""
    scores = _Accumulator(analysis.num_units)
    for layer in analysis.layers.values():
        if layer.kind in (LayerKind.CONV, LayerKind.LINEAR):
            weight = graph.module.get_submodule(layer.target).weight.detach()
            scores.add(layer.out_units, weight.abs().reshape(weight.shape[0], -1).sum(1))
    return scores.result()


class _Accumulator:
    def __init__(self, num_units: int):
        self.values = torch.zeros(num_units, dtype=torch.float64)
        self.has = torch.zeros(num_units, dtype=torch.bool)

    def add(self, units: torch.Tensor, values: torch.Tensor) -> None:
        self.values.index_add_(0, units, values.double())
        self.has[units] = True

    def result(self) -> UnitScores:
        return UnitScores(self.values, self.has)


# -- ThiNet ------------------------------------------------------------------------------------
THINET_SAMPLES_PER_BATCH = 128
THINET_MAX_SAMPLES = 2048


def thinet_consumers(analysis: ChannelAnalysis, units: torch.Tensor) -> list[LayerChannels] | str:
    """The layers whose output ThiNet must preserve for these units, or why it cannot."""
    wanted = set(units.tolist())
    readers = [
        layer
        for layer in analysis.layers.values()
        if not layer.per_channel and wanted.intersection(layer.in_units.tolist())
    ]
    if not readers:
        return "no conv or linear layer reads these channels"
    grouped = [r.target for r in readers if r.groups > 1]
    if grouped:
        return f"ThiNet needs dense next layers; {grouped[0]} is a grouped conv"
    return readers


def collect_contributions(
    graph: Graph, layers: Iterable[LayerChannels], batches: Iterable[Batch], seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: sampled per-input-channel contributions (samples, in) and the sampled outputs.

    Streams over ``batches``: each batch adds up to THINET_SAMPLES_PER_BATCH random output
    positions per layer, and nothing else is kept.
    """
    layers = list(layers)
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {layer.node: [] for layer in layers}
    hooks = []
    for layer in layers:
        module = graph.module.get_submodule(layer.target)

        def hook(mod: nn.Module, inputs: tuple, _out: Any, name: str = layer.node) -> None:
            if sum(len(s) for s in samples[name]) < THINET_MAX_SAMPLES:
                samples[name].append(_contributions(mod, inputs[0].detach(), generator))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                graph.module(*batch.inputs)
    finally:
        for handle in hooks:
            handle.remove()
    result = {}
    for name, parts in samples.items():
        if not parts:
            continue
        contributions = torch.cat(parts)
        result[name] = (contributions, contributions.sum(1))
    return result


def _contributions(module: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(samples, in_channels): each input channel's share of random output values."""
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        pick = torch.randint(len(rows), (THINET_SAMPLES_PER_BATCH,), generator=generator)
        out = torch.randint(weight.shape[0], (THINET_SAMPLES_PER_BATCH,), generator=generator)
        return rows[pick] * weight[out]
    if not isinstance(module, nn.Conv2d):
        raise RewriteError(f"ThiNet supports Conv2d and Linear layers, not {type(module).__name__}")
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        x = F.pad(
            x,
            module._reversed_padding_repeated_twice,
            mode="constant" if module.padding_mode == "zeros" else module.padding_mode,
        )
        padding = 0
    else:
        padding = module.padding
    patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # (N, C*k, L)
    n, _, positions = patches.shape
    batch = torch.randint(n, (THINET_SAMPLES_PER_BATCH,), generator=generator)
    where = torch.randint(positions, (THINET_SAMPLES_PER_BATCH,), generator=generator)
    out = torch.randint(weight.shape[0], (THINET_SAMPLES_PER_BATCH,), generator=generator)
    picked = patches[batch, :, where].reshape(THINET_SAMPLES_PER_BATCH, weight.shape[1], -1)
    return (picked * weight[out].reshape(THINET_SAMPLES_PER_BATCH, weight.shape[1], -1)).sum(-1)
