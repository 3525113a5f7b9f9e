"""Reordering channel groups: the permutation math alone, and exactness on real models."""

from __future__ import annotations

import pytest
import torch
import torchvision

from slimfx.ir.capture import capture
from slimfx.ir.channels import analyze_channels
from slimfx.ir.rewrite import Rewriter
from slimfx.metrics import relative_error
from slimfx.passes.channel_order import group_of_outputs, reorder_channels, why_not_reorder
from slimfx.rewrites.permute import side_index, unit_permutation
from tests.nets import FlattenLinear, randomize_batchnorm


def test_side_index_maps_each_position_to_the_image_of_its_unit() -> None:
    sigma = torch.tensor([1, 0, 2])  # units 0 and 1 swap
    assert side_index(torch.tensor([0, 1, 2]), sigma).tolist() == [1, 0, 2]
    # a flatten spreads each unit over two features: the k-th feature follows the k-th
    assert side_index(torch.tensor([0, 0, 1, 1, 2, 2]), sigma).tolist() == [2, 3, 0, 1, 4, 5]


def test_side_index_refuses_units_that_appear_unequally_often() -> None:
    with pytest.raises(ValueError, match="different number of times"):
        side_index(torch.tensor([0, 0, 1]), torch.tensor([1, 0]))


def _permute_every_free_group(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    graph = capture(model.eval(), (x,))
    expected = graph.run(x)
    analysis = analyze_channels(graph)
    permuted = 0
    with Rewriter(graph, "test") as rewriter:
        for group in analysis.groups:
            if why_not_reorder(graph, analysis, group) is not None:
                continue
            layer = analysis.layers[next(n for n in group.members if analysis.layers[n].target == group.sources[0])]
            sigma = unit_permutation(analysis, layer.out_units, torch.randperm(len(layer.out_units)))
            reorder_channels(rewriter, graph, analysis, sigma)
            permuted += 1
    return permuted, relative_error(graph.run(x), expected)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_reordering_every_free_group_keeps_the_outputs(name: str) -> None:
    model = randomize_batchnorm(getattr(torchvision.models, name)(num_classes=10))
    permuted, error = _permute_every_free_group(model, torch.randn(2, 3, 64, 64))
    assert permuted > 5
    assert error < 1e-5


def test_reordering_through_a_flatten_keeps_the_outputs() -> None:
    permuted, error = _permute_every_free_group(randomize_batchnorm(FlattenLinear()), torch.randn(2, 3, 8, 8))
    assert permuted >= 1
    assert error < 1e-5


def test_a_group_reaching_the_output_cannot_be_reordered() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    graph = capture(model.eval(), (torch.randn(1, 3, 8, 8),))
    analysis = analyze_channels(graph)
    layer = next(iter(analysis.layers.values()))
    why = why_not_reorder(graph, analysis, group_of_outputs(analysis, layer))
    assert why is not None and "model output" in why


def test_unit_permutation_refuses_a_non_permutation() -> None:
    graph = capture(randomize_batchnorm(FlattenLinear()).eval(), (torch.randn(1, 3, 8, 8),))
    analysis = analyze_channels(graph)
    layer = next(iter(analysis.layers.values()))
    with pytest.raises(ValueError, match="not a permutation"):
        unit_permutation(analysis, layer.out_units, torch.zeros(len(layer.out_units), dtype=torch.long))
