"""Norm + activation layers (timm's BatchNormAct2d) are known layers: captured whole, counted,
folded by fold-bn with their activation kept, pruned as BatchNorms."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from nets import BatchNormAct, NormActNet, randomize_batchnorm

from slimfx import analyze, compile
from slimfx.ir.capture import capture


def model() -> nn.Module:
    return randomize_batchnorm(NormActNet()).eval()


def test_captured_whole_and_counted_with_its_activation() -> None:
    x = torch.randn(2, 3, 8, 8)
    graph = capture(model(), (x,))
    assert [n.target for n in graph.nodes() if n.op == "call_module"] == ["conv1", "bn1", "conv2", "bn2", "head"]
    rows = {r.name: r for r in analyze(model(), x).nodes}
    assert rows["bn1"].cost.elem_ops == 2 * 2 * 16 * 8 * 8  # normalize, then SiLU
    assert analyze(model(), x).uncounted == ()


def test_fold_bn_folds_it_exactly_and_keeps_the_activation() -> None:
    net, x = model(), torch.randn(2, 3, 8, 8)
    result = compile(net, x, "fold-bn")
    (record,) = result.report.passes
    assert record.exact and record.output_error < 1e-5
    assert [d.reason for d in record.decisions] == [
        "folded into conv1 (Conv2d); its SiLU stays",
        "folded into conv2 (Conv2d); its ReLU stays",
    ]
    kinds = [type(m).__name__ for m in result.module.children()]
    assert kinds == ["Conv2d", "SiLU", "Conv2d", "ReLU", "Linear"] and not any(
        isinstance(m, BatchNormAct) for m in result.module.modules()
    )


def test_prunes_as_a_batchnorm_and_quantize_fuses_its_relu() -> None:
    net, x = model(), torch.randn(4, 3, 8, 8)
    pruned = compile(net, x[:1], "prune-channels:ratio=0.5")
    assert pruned.module.get_submodule("bn1").num_features == 8 and pruned.module(x).shape == (4, 10)
    quantized = compile(net, x[:1], "quantize:calib=minmax", calib_data=[x])
    fused = [d.details.fused_activation for d in quantized.report.passes[-1].decisions if d.target == "conv2"]
    assert fused == ["ReLU"]


timm = pytest.importorskip("timm")
TIMM_MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "cspdarknet53", "tf_efficientnet_b0"]


@pytest.mark.corpus
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_cnns_fold_and_prune(name: str) -> None:
    net, x = timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    folded = compile(net, x, "fold-bn")
    (record,) = folded.report.passes
    assert record.output_error < 1e-4 and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.module.modules()
    )
    pruned = compile(net, x, "prune-channels:ratio=0.3")
    assert pruned.report.after.totals.macs <= 0.8 * pruned.report.before.totals.macs
    with torch.no_grad():
        assert pruned.module(x).shape == net(x).shape


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["mobilevit_xxs"])
def test_timm_models_that_branch_on_shapes_capture_with_opaque_parts(name: str) -> None:
    net, x = timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    report = analyze(net, x)
    assert report.opaque and report.uncounted == () and report.totals.macs > 0
    result = compile(net, x, "prune-channels:ratio=0.3")
    with torch.no_grad():
        assert result.module(x).shape == net(x).shape
    opaque_layers = set(report.opaque)
    changed = {d.target for d in result.report.passes[0].decisions if d.action == "pruned"}
    assert not changed & opaque_layers


@pytest.mark.corpus
def test_timm_same_padded_convs_are_taken_as_pad_and_conv() -> None:
    net, x = timm.create_model("tf_efficientnet_b0", pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    report = analyze(net, x)
    assert not report.opaque and len(report.taken_layers) == 5
    assert all("Conv2dSame" in t and "ZeroPad2d + Conv2d" in t for t in report.taken_layers)
