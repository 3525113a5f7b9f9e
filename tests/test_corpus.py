"""Every torchvision classification model captures, gets shapes on every node and a report,
and prunes at ratio 0.3 (or declines each group with a reason) and still runs, and the structure
rewrites rewrite or decline each layer with a reason; one model per
family quantizes, lowers onto torch's int8 kernels and (conv families) exports to int8 ONNX.

One test per model builds it once and checks both, to keep the corpus lean in CI.
"""

from __future__ import annotations

import pytest
import torch

from slimfx import analyze, compile
from slimfx.ir.capture import capture
from slimfx.ir.meta import META_KEY, NodeInfo

torchvision = pytest.importorskip("torchvision")
CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# Shape propagation runs on meta tensors, so the input size costs nothing; only models that
# accept any size get a small one, to keep the numbers modest.
FIXED_SIZE = {"inception_v3": 299}
NEEDS_224 = ("vit_", "maxvit", "swin")


def input_for(name: str) -> torch.Tensor:
    size = FIXED_SIZE.get(name, 224 if name.startswith(NEEDS_224) else 64)
    return torch.randn(1, 3, size, size)


def test_corpus_has_80_models() -> None:
    assert len(CLASSIFIERS) == 80


@pytest.mark.corpus
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_captures_and_reports(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = input_for(name)
    graph = capture(model, (x,))
    for node in graph.nodes():
        info = node.meta[META_KEY]
        assert isinstance(info, NodeInfo), node.name
        if node.op in ("call_module", "placeholder"):
            assert info.outputs and all(d > 0 for d in info.out_shape), f"{node.name} has no shape"
    out_node = next(n for n in graph.nodes() if n.op == "output")
    assert graph.info(out_node).out_shape == (1, 1000)
    report = analyze(graph.module, x, name=name)
    assert report.totals.macs > 0
    assert report.uncounted == ()  # every op of the corpus has a cost rule
    used = {id(p) for p in graph.module.parameters()}
    assert report.totals.params == sum(p.numel() for p in model.parameters() if id(p) in used)

    check_prunes(name, model, x)


def check_prunes(name: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    result = compile(model, x, passes="prune-channels:ratio=0.3")
    with torch.no_grad():
        assert result.module(x).shape == (1, 1000)
    (record,) = result.report.passes
    assert record.decisions, f"{name}: no decision recorded"
    for decision in record.decisions:
        assert decision.action in ("pruned", "declined") and decision.reason, decision
    pruned = [d for d in record.decisions if d.action == "pruned"]
    assert all(d.details.channels_after < d.details.channels_before for d in pruned)
    if pruned:
        assert result.report.after.totals.macs < result.report.before.totals.macs


# one model per family: quantize (with attention opened, BatchNorm folded), the torch int8
# lowering and, for the conv families, the ONNX export that onnxruntime runs in int8
QUANTIZE_FAMILIES = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "googlenet",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "regnet_y_400mf",
    "mnasnet0_5",
    "convnext_tiny",
    "swin_t",
    "vit_b_32",
    "maxvit_t",
]


@pytest.mark.corpus
@pytest.mark.parametrize("name", QUANTIZE_FAMILIES)
def test_quantizes(name: str, tmp_path) -> None:
    from slimfx.metrics import sqnr_db

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = input_for(name)
    result = compile(model, x, passes="quantize:calib=minmax", calib_data=[x])
    quantized = [d for d in result.report.passes[-1].decisions if d.action == "quantized"]
    assert quantized, f"{name}: nothing quantized"
    lowered = result.to_torch_int8()
    with torch.no_grad():
        simulated, int8 = result.module(x), lowered.module(x)
    assert simulated.shape == int8.shape == (1, 1000) and bool(torch.isfinite(int8).all())
    assert sqnr_db(simulated, int8) >= 20, name  # torch's int8 kernels against the simulation
    if name in ("resnet18", "efficientnet_b0", "densenet121", "mobilenet_v3_small"):
        pytest.importorskip("onnxruntime")
        from slimfx.backends import onnx as ort_tools

        kernels = ort_tools.kernel_census(result.export_onnx(tmp_path / f"{name}.onnx"))
        assert kernels.get("QLinearConv", 0) > 0 and kernels.get("Conv", 0) == 0, kernels


# The structure rewrites on every classifier but the three largest (40, 20 and 12 s each here,
# a fifth of the whole sweep's time), with loose options so that each finds layers to rewrite.
REWRITE_SKIPPED = ("regnet_y_128gf", "vit_h_14", "wide_resnet101_2")


@pytest.mark.corpus
@pytest.mark.parametrize("name", [n for n in CLASSIFIERS if n not in REWRITE_SKIPPED])
def test_rewrites_rewrite_or_decline_with_a_reason(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = input_for(name)
    passes = "crelu:similarity=0.3,mixconv:energy=0.9,fire,group-convs:groups=2,octave"
    result = compile(model, x, passes=passes, calib_data=[x])
    with torch.no_grad():
        assert result.module(x).shape == (1, 1000)
    for record in result.report.passes[1:]:  # after the fold-bn that crelu inserts
        for decision in record.decisions:
            assert decision.action in ("rewritten", "declined", "summary") and decision.reason, decision
            if decision.action == "rewritten":
                assert decision.macs_after < decision.macs_before, decision
