"""prune-channels removes provably dead channels without changing the outputs.

A channel is made dead by zeroing gamma and beta at that channel in every BatchNorm of its
group: after each BatchNorm it is exactly zero, so every path from it to other channels
carries zero. Pruning exactly those channels (bn-scale ranks them lowest) must leave the
outputs within 1e-5 relative, and the model must really be smaller.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from nets import (
    Concat,
    FlattenLinear,
    GhostSlice,
    Grouped,
    PerChannelNorms,
    Residual,
    Shuffle,
    SizedSplit,
    Split,
    SqueezeExcite,
    randomize_batchnorm,
)

from slimfx import compile
from slimfx.ir.capture import capture
from slimfx.ir.channels import analyze_channels
from slimfx.prune.importance import bn_scale_scores
from slimfx.prune.selection import (
    choose_removed,
    common_partition,
    removal_count,
)

RATIO = 0.25


def kill_channels(model: nn.Module, x: torch.Tensor, ratio: float = RATIO) -> int:
    """Zero gamma/beta on a ``ratio`` share of each prunable group's channels; return how many."""
    randomize_batchnorm(model)
    graph = capture(model, (x,))
    analysis = analyze_channels(graph)
    normalized = bn_scale_scores(graph, analysis).has_score
    generator = torch.Generator().manual_seed(3)
    dead = torch.zeros(analysis.num_units, dtype=torch.bool)
    for group in analysis.groups:
        rows = common_partition(group.units, group.partitions)
        if group.blocked or isinstance(rows, str) or not normalized[group.units].all():
            continue  # groups the pass declines (no BatchNorm: nothing to make dead with)
        count = removal_count(len(group.units), ratio)
        scores = torch.rand(len(group.units), generator=generator)
        dead[group.units[choose_removed(scores, count, rows)]] = True
    modules = dict(model.named_modules())
    for layer in analysis.layers.values():
        if layer.kind == "batchnorm" and modules[layer.target].weight is not None:
            bn = modules[layer.target]
            mask = dead[layer.in_units]
            bn.weight.data[mask] = 0.0
            bn.bias.data[mask] = 0.0
    return int(dead.sum())


def assert_dead_channels_pruned_exactly(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    killed = kill_channels(model, x)
    assert killed > 0, "the test must kill some channels"
    with torch.no_grad():
        expected = model(x)
    result = compile(model, x, passes=f"prune-channels:ratio={RATIO},criterion=bn-scale", latency_repeats=0)
    with torch.no_grad():
        actual = result.module(x)
    assert actual.shape == expected.shape
    error = float((actual - expected).norm() / expected.norm())
    assert error <= 1e-5, f"pruning dead channels changed the outputs by {error:.3g}"
    before, after = result.report.before.totals, result.report.after.totals
    assert after.params < before.params and after.macs < before.macs
    pruned = [d for d in result.report.passes[0].decisions if d.action == "pruned"]
    assert sum(d.details.channels_before - d.details.channels_after for d in pruned) == killed


SMALL = [
    Concat,
    Split,
    SizedSplit,
    GhostSlice,
    PerChannelNorms,
    Grouped,
    SqueezeExcite,
    Shuffle,
    FlattenLinear,
    Residual,
]


@pytest.mark.parametrize("model_class", SMALL, ids=[c.__name__ for c in SMALL])
def test_dead_channels_pruned_exactly_small(model_class: type[nn.Module]) -> None:
    assert_dead_channels_pruned_exactly(model_class(), torch.randn(2, 3, 16, 16))


TORCHVISION = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "densenet121",
    "googlenet",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "efficientnet_b0",
]


@pytest.mark.corpus
@pytest.mark.parametrize("name", TORCHVISION)
def test_dead_channels_pruned_exactly_torchvision(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, weights=None)
    assert_dead_channels_pruned_exactly(model, torch.randn(1, 3, 64, 64))
