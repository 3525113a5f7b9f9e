"""Capture takes what stands for a standard layer as that layer: functional batch norms over the
model's own constants, and opaque "same"-padded convs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx import analyze, compile
from slimfx.ir.capture import capture
from slimfx.ir.same_padding import same_padding
from slimfx.report.tables import render_report


class FrozenBatchNorm(nn.Module):
    """A batch norm with fixed statistics, written functionally (as detection code does)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(channels) + 0.5)
        self.register_buffer("bias", torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5)


class BatchStatistics(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, training=True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = FrozenBatchNorm(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.batch_stats = BatchStatistics()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(self.batch_stats(self.conv2(y)).mean((2, 3)))


def test_functional_batch_norm_over_constants_becomes_a_layer_at_its_owners_path() -> None:
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    graph = capture(model, x)
    bn = graph.module.get_submodule("bn")
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training
    assert [str(t) for t in graph.taken_layers] == ["F.batch_norm at node 'batch_norm' -> BatchNorm2d 'bn'"]
    torch.testing.assert_close(graph.run(x), model(x))
    still_functional = [n for n in graph.nodes() if n.target is F.batch_norm]
    assert len(still_functional) == 1  # batch statistics: not a constant layer, left as it is
    report = analyze(model, x)
    assert "taken as standard layers: F.batch_norm at node 'batch_norm'" in render_report(report)
    assert report.to_dict()["taken_layers"] == [str(graph.taken_layers[0])]


def test_fold_bn_folds_it_exactly_and_prune_slices_it() -> None:
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    folded = compile(model, x, "fold-bn")
    (decision,) = folded.report.passes[0].decisions
    assert decision.action == "folded" and decision.reason == "folded into conv (Conv2d)"
    torch.testing.assert_close(folded.module(x), model(x), rtol=1e-5, atol=1e-5)
    pruned = compile(model, x, "prune-channels:ratio=0.5,criterion=bn-scale")
    (group,) = [d for d in pruned.report.passes[0].decisions if d.details.sources == ("conv",)]
    assert group.action == "pruned" and "bn" in group.details.members
    assert pruned.module.get_submodule("bn").num_features == 4


class SameConv(nn.Conv2d):
    """TensorFlow "same" padding computed from the input's size, as timm's Conv2dSame does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        pad_h = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SameConv(3, 8, 3, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_same_padding_is_tensorflows_rule() -> None:
    assert same_padding(9, 3, 2, 1) == 2 and same_padding(8, 3, 2, 1) == 1 and same_padding(8, 3, 1, 1) == 2
    assert same_padding(8, 1, 2, 1) == 0


def test_an_opaque_same_padded_conv_becomes_a_pad_and_a_conv_that_fold_bn_reaches() -> None:
    model, x = SameNet().eval(), torch.randn(2, 3, 9, 9)
    graph = capture(model, x)
    assert not graph.opaque  # it did not trace symbolically (padding from x.size()), so it was opaque
    (taken,) = graph.taken_layers
    assert str(taken) == "SameConv 'conv' -> ZeroPad2d + Conv2d 'conv' (padding computed for its 9x9 input)"
    assert [type(graph.submodule(n)).__name__ for n in graph.nodes() if n.op == "call_module"][:2] == [
        "ZeroPad2d",
        "Conv2d",
    ]
    torch.testing.assert_close(graph.run(x), model(x))
    folded = compile(model, x, "fold-bn")
    assert folded.report.passes[0].decisions[0].action == "folded"
    pruned = compile(model, x, "prune-channels:ratio=0.5")
    assert pruned.report.passes[0].changed and pruned.module(x).shape == (2, 4)
