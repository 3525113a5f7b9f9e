"""fold-bn: numerical equivalence, no BatchNorm left, and reasons for what it declines."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from nets import randomize_batchnorm

from slimfx import compile
from slimfx.passes.fold_bn import fold_bn_weights
from slimfx.report.tables import render_compile


def batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def test_fold_math_alone() -> None:
    weight, bias = torch.randn(3, 2), torch.randn(3)
    mean, var, gamma, beta = torch.randn(3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3)
    w, b = fold_bn_weights(weight, bias, mean, var, gamma, beta, 1e-5)
    x = torch.randn(5, 2)
    expected = (x @ weight.T + bias - mean) / torch.sqrt(var + 1e-5) * gamma + beta
    torch.testing.assert_close(x @ w.T + b, expected)
    w0, b0 = fold_bn_weights(weight, None, mean, var, None, None, 1e-5)  # no bias, affine=False
    torch.testing.assert_close(x @ w0.T + b0, (x @ weight.T - mean) / torch.sqrt(var + 1e-5))


class Layers(nn.Module):
    """conv1d/2d/3d (grouped, with and without bias) and linear, each followed by BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, groups=2)
        self.b1 = nn.BatchNorm1d(6)
        self.c2 = nn.Conv2d(4, 8, 3, bias=False, groups=4)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv3d(2, 4, 2)
        self.b3 = nn.BatchNorm3d(4, affine=False)
        self.fc = nn.Linear(8, 5)
        self.b4 = nn.BatchNorm1d(5)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        a = self.b1(self.c1(x1)).mean((1, 2))
        b = self.b2(self.c2(x2)).mean((2, 3))
        c = self.b3(self.c3(x3)).mean((1, 2, 3, 4))
        return self.b4(self.fc(b)).sum(1) + a + c


def test_folds_every_layer_kind_exactly() -> None:
    model = randomize_batchnorm(Layers()).eval()
    inputs = (torch.randn(2, 4, 9), torch.randn(2, 4, 6, 6), torch.randn(2, 2, 4, 4, 4))
    result = compile(model, inputs, "fold-bn")
    assert batchnorms(result.module) == 0
    folded = {d.target: d for d in result.report.passes[0].decisions}
    assert set(folded) == {"b1", "b2", "b3", "b4"} and all(d.action == "folded" for d in folded.values())
    torch.testing.assert_close(result.module(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    assert batchnorms(model) == 4  # the user's model is untouched


class Declines(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn_shared(y) + y + self.bn_after_relu(torch.relu(y))


def test_declines_with_reasons() -> None:
    model = randomize_batchnorm(Declines()).eval()
    result = compile(model, torch.randn(1, 3, 4, 4), "fold-bn")
    reasons = {d.target: (d.action, d.reason) for d in result.report.passes[0].decisions}
    assert reasons["bn_shared"][0] == "declined" and "also read by" in reasons["bn_shared"][1]
    assert reasons["bn_after_relu"][0] == "declined" and "not a conv or linear" in reasons["bn_after_relu"][1]
    assert not result.report.passes[0].changed and batchnorms(result.module) == 2


def test_training_mode_batchnorm_is_declined() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # left in training mode
    model.train()
    result = compile(model, torch.randn(2, 3, 4, 4), "fold-bn")
    (decision,) = result.report.passes[0].decisions
    assert decision.declined and "training mode" in decision.reason


torchvision = pytest.importorskip("torchvision")


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_no_batchnorm_left_in_torchvision_models(name: str) -> None:
    model = randomize_batchnorm(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(2, 3, 96, 96)
    result = compile(model, x, "fold-bn")
    assert batchnorms(result.module) == 0
    reference = model(x)
    error = (result.module(x) - reference).norm() / reference.norm()
    assert error <= 1e-4
    assert result.report.passes[0].output_error <= 1e-4
    assert result.report.after.totals.macs == result.report.before.totals.macs
    assert result.report.after.totals.elem_ops < result.report.before.totals.elem_ops


class ChecksRank(nn.Module):
    """Reads the conv output's rank before its BatchNorm (timm's BatchNormAct2d asserts it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected 4D input")
        return self.bn(y)


def test_a_size_query_on_the_conv_output_does_not_stop_the_fold() -> None:
    model, x = ChecksRank().eval(), torch.randn(1, 3, 8, 8)
    randomize_batchnorm(model)
    result = compile(model, x, "fold-bn")
    (decision,) = result.report.passes[0].decisions
    assert decision.action == "folded", decision.reason
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-5)


class AmplifiesRounding(nn.Module):
    """sin of a huge value: float32 rounding of its input decides the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.bn(self.conv(x)) * 1e7)


def test_an_exact_pass_on_a_model_that_amplifies_rounding_is_not_called_verified() -> None:
    model, x = AmplifiesRounding().eval(), torch.randn(1, 3, 8, 8)
    randomize_batchnorm(model)
    result = compile(model, x, "fold-bn")
    record = result.report.passes[0]
    assert record.changed and not record.verified
    (note,) = result.report.notes
    assert "could not be verified exact" in note and "float64" in note
    assert "exact, NOT verified" in str(render_compile(result.report))
