"""Cost rules against hand-computed values, and totals against FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from slimfx import analyze
from slimfx.cost_model.counts import (
    attention_macs,
    conv_macs,
    einsum_macs,
    ensure_costs,
    matmul_macs,
    total_cost,
)
from slimfx.ir.capture import capture


def node_costs(model: nn.Module, *inputs: torch.Tensor) -> dict[str, object]:
    graph = capture(model.eval(), inputs)
    ensure_costs(graph)
    return {node.name: graph.info(node).cost for node in graph.nodes()}


class Single(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_pure_math_functions() -> None:
    assert conv_macs(10, (4, 3, 3, 3)) == 10 * 27
    assert matmul_macs((2, 5, 3), (3, 7)) == 2 * 5 * 3 * 7
    assert matmul_macs((3,), (3, 4)) == 12
    assert matmul_macs((4, 1, 2, 3), (5, 3, 6)) == 4 * 5 * 2 * 3 * 6
    assert einsum_macs("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]) == 2 * 3 * 4 * 5
    assert einsum_macs("ij,jk,kl->il", [(1, 2), (2, 3), (3, 4)]) is None
    assert attention_macs(2, 5, 7, 8, 6) == 2 * 5 * 7 * (8 + 6)


@pytest.mark.parametrize(
    "layer, shape, expected",
    [
        # out 1x8x5x5 (stride 2, pad 1 on 10x10), each output: Cin/groups * 3*3 = 4*9
        (nn.Conv2d(4, 8, 3, stride=2, padding=1), (1, 4, 10, 10), 8 * 5 * 5 * 4 * 9),
        # grouped: Cin/groups = 2; dilation 2 -> out 6x6 on 10x10 with no padding
        (nn.Conv2d(4, 8, 3, groups=2, dilation=2), (1, 4, 10, 10), 8 * 6 * 6 * 2 * 9),
        # depthwise
        (nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 6, 6), 2 * 4 * 6 * 6 * 9),
        (nn.Conv1d(3, 5, 4), (1, 3, 10), 5 * 7 * 3 * 4),
        (nn.Conv3d(2, 3, 3), (1, 2, 5, 5, 5), 3 * 27 * 2 * 27),
        # transposed: every input element scatters Cout/groups * k*k
        (nn.ConvTranspose2d(4, 6, 3, stride=2), (1, 4, 5, 5), 4 * 25 * 6 * 9),
        (nn.Linear(16, 10), (3, 16), 3 * 10 * 16),
        (nn.Linear(16, 10), (2, 7, 16), 2 * 7 * 10 * 16),
    ],
)
def test_macs_of_layers(layer: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    costs = node_costs(Single(layer), torch.randn(shape))
    cost = costs["layer"]
    assert cost.cost.macs == expected
    assert cost.cost.params == sum(p.numel() for p in layer.parameters())
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(shape))
    assert cost.cost.macs == counter.get_total_flops() // 2


@pytest.mark.parametrize(
    "layer, shape, elem_ops",
    [
        (nn.BatchNorm2d(4), (2, 4, 3, 3), 72),
        (nn.LayerNorm(8), (2, 5, 8), 80),
        (nn.GroupNorm(2, 4), (1, 4, 3, 3), 36),
        (nn.ReLU(), (2, 4, 3, 3), 72),
        (nn.GELU(), (3, 7), 21),
        (nn.MaxPool2d(3, stride=2), (1, 2, 9, 9), 2 * 4 * 4 * 9),
        (nn.AvgPool2d(2), (1, 2, 8, 8), 2 * 4 * 4 * 4),
        (nn.AdaptiveAvgPool2d(1), (1, 2, 8, 8), 128),
    ],
)
def test_element_ops_are_their_own_column(layer: nn.Module, shape: tuple[int, ...], elem_ops: int) -> None:
    cost = node_costs(Single(layer), torch.randn(shape))["layer"]
    assert cost.cost.macs == 0
    assert cost.cost.elem_ops == elem_ops
    assert cost.cost.bytes_written == layer.eval()(torch.randn(shape)).numel() * 4
    assert cost.cost.bytes_read >= torch.Size(shape).numel() * 4


class Functional(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.matmul(a, b)
        y = torch.bmm(a, b)
        z = torch.einsum("bij,bjk->bik", a, b)
        s = x + y * z
        return F.relu(s).flatten(1)


def test_matmul_einsum_elementwise_and_views() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    costs = node_costs(Functional(), a, b)
    for name in ("matmul", "bmm", "einsum"):
        assert costs[name].cost.macs == 2 * 3 * 4 * 5, name
    assert costs["add"].cost.elem_ops == 30 and costs["mul"].cost.elem_ops == 30
    assert costs["relu"].cost.elem_ops == 30
    assert costs["flatten"].cost == costs["flatten"].cost.__class__()  # views are free
    assert costs["flatten"].rule == "view"


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.mha(x, x, x, need_weights=False)
        q = x.view(2, 5, 4, 4).transpose(1, 2)
        return y + F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 5, 16)


def test_attention_counts_projections_and_matmuls() -> None:
    costs = node_costs(Attention(), torch.randn(2, 5, 16))
    batch, length, e = 2, 5, 16
    projections = batch * length * e * e * 4
    assert costs["mha"].cost.macs == projections + batch * length * length * 2 * e
    # sdpa over (batch 2, heads 4): L = S = 5, head dim 4
    assert costs["scaled_dot_product_attention"].cost.macs == 2 * 4 * 5 * 5 * (4 + 4)


class Unknown(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1) + torch.fft.rfft(x).real[:, :1]


def test_ops_without_a_rule_are_listed_not_zeroed() -> None:
    from slimfx import analyze

    report = analyze(Unknown(), torch.randn(2, 8))
    uncounted = {row.name: row.rule for row in report.uncounted}
    assert "cumsum" in uncounted and "no cost rule" in uncounted["cumsum"]
    assert "fft_rfft" in uncounted
    assert report.to_dict()["uncounted"][0]["reason"].startswith("no cost rule")


torchvision = pytest.importorskip("torchvision")


@pytest.mark.corpus
@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet50",
        "mobilenet_v2",
        "efficientnet_b0",
        "densenet121",
        "inception_v3",
        "convnext_tiny",
        "regnet_y_400mf",
    ],
)
def test_totals_agree_with_flop_counter(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
    graph = capture(model, (x,))
    total = total_cost(graph)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    reference = counter.get_total_flops() / 2
    assert abs(total.macs - reference) <= 0.01 * reference
    used = {id(p) for p in graph.module.parameters()}
    assert total.params == sum(p.numel() for p in model.parameters() if id(p) in used)
    if name != "inception_v3":  # inception's auxiliary classifier is not used in eval mode
        assert total.params == sum(p.numel() for p in model.parameters())


@pytest.mark.corpus
def test_vit_counts_attention_that_flop_counter_misses() -> None:
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    total = total_cost(capture(model, (x,)))
    with FlopCounterMode(display=False) as counter:  # gradients on: the unfused path
        model(x)
    projections_and_mlp = counter.get_total_flops() // 2  # 16.85 GMAC: conv + addmm only
    tokens, dim, layers = 197, 768, 12
    attention = layers * attention_macs(1, tokens, tokens, dim, dim)  # Q K^T and A V
    assert total.macs == projections_and_mlp + attention
    assert abs(total.macs / 1e9 - 17.56) < 0.01  # torchvision's published 17.56 GFLOPS (MACs)


def test_reshape_as_is_a_free_view() -> None:
    class ReshapeAs(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).reshape_as(x)

    report = analyze(ReshapeAs(), torch.randn(1, 3, 4, 4))
    assert report.uncounted == () and report.totals.macs == 0


class _Gate(nn.Module):
    """A module the user keeps whole: it branches on its input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale = nn.Linear(16, 16), nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale if x.abs().sum() > 0 else x


def test_a_named_leaf_module_counts_its_own_params_and_measured_macs() -> None:
    model = nn.Sequential(nn.Linear(16, 16), _Gate(), nn.Linear(16, 4)).eval()
    x = torch.ones(2, 16)
    report = analyze(model, x, leaf_modules=["1"])
    assert report.totals.params == sum(p.numel() for p in model.parameters())
    (leaf,) = [row for row in report.nodes if row.name == "_1"]
    assert leaf.cost.macs == 2 * 16 * 16 and "leaf module without a cost rule" in leaf.rule
    assert report.uncounted == ()
