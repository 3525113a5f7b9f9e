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
import torch.nn.functional as F
from conftest import randomize_batchnorm

from slimfx import compile
from slimfx.ir.capture import capture
from slimfx.ir.channels import analyze_channels
from slimfx.passes.channel_importance import bn_scale_scores
from slimfx.passes.channel_selection import (
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
        if layer.kind == "batchnorm":
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
    assert sum(d.details["channels_before"] - d.details["channels_after"] for d in pruned) == killed


# -- small hand-built models, one coupling pattern each ----------------------------------------
def conv_bn(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(3, 12), conv_bn(20, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(self.c(y).mean((2, 3)))


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.left, self.right = conv_bn(3, 16), conv_bn(8, 8), conv_bn(8, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        left, right = self.a(x).chunk(2, dim=1)
        y = torch.cat([self.left(left), self.right(right)], 1)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.c = conv_bn(3, 16), conv_bn(16, 24, groups=4), conv_bn(24, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.c(self.g(self.a(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 16)
        self.squeeze, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.b = conv_bn(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.a(x)
        scale = torch.sigmoid(self.expand(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(self.b(y * scale).mean((2, 3)))


class Shuffle(nn.Module):
    """ShuffleNet's shuffle written out: view into (groups, c/groups), transpose, flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(3, 8), conv_bn(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(self.c(y).mean((2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 8)
        self.fc1, self.bn, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.BatchNorm1d(32), nn.Linear(32, 5)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.a(x), 4).flatten(1)
        return self.fc2(F.relu(self.bn(self.fc1(y))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = conv_bn(3, 16), nn.Sequential(conv_bn(16, 8), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.stem(x)
        y = F.relu(y + self.block(y))
        return self.head(y.mean((2, 3)))


SMALL = [Concat, Split, Grouped, SqueezeExcite, Shuffle, FlattenLinear, Residual]


@pytest.mark.parametrize("model_class", SMALL, ids=[c.__name__ for c in SMALL])
def test_dead_channels_pruned_exactly_small(model_class: type[nn.Module]) -> None:
    assert_dead_channels_pruned_exactly(model_class(), torch.randn(2, 3, 16, 16))


TORCHVISION = [
    "resnet18", "resnet50", "mobilenet_v2", "densenet121", "googlenet",
    "shufflenet_v2_x1_0", "regnet_y_400mf", "efficientnet_b0",
]


@pytest.mark.corpus
@pytest.mark.parametrize("name", TORCHVISION)
def test_dead_channels_pruned_exactly_torchvision(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, weights=None)
    assert_dead_channels_pruned_exactly(model, torch.randn(1, 3, 64, 64))
