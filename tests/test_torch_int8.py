"""Lowering a quantized graph onto torch's int8 kernels: which kernels, what stays float, how close."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from digits import calibration, split, trained_cnn

from slimfx import compile
from slimfx.backends.torch_int8 import lower_int8
from slimfx.metrics import sqnr_db
from slimfx.report.tables import render_compile

torchvision = pytest.importorskip("torchvision")


def test_digits_cnn_runs_on_int8_kernels_and_keeps_its_accuracy() -> None:
    model = trained_cnn()
    x, y = split()["test"]
    result = compile(model, x[:2], "fold-bn,quantize:calib=entropy", calib_data=calibration())
    lowered = result.to_torch_int8()
    assert lowered.kernels["quantized::conv2d_relu"] == 4
    assert [op.split(":")[0] for op in lowered.float_ops] == ["head"]  # the float-output head, and only it
    with torch.no_grad():
        simulated, int8 = result.module(x), lowered.module(x)
        accuracy = float((int8.argmax(-1) == y).float().mean())
        before = float((model(x).argmax(-1) == y).float().mean())
    assert not int8.is_quantized and sqnr_db(simulated, int8) >= 30
    assert accuracy >= before - 0.01


@pytest.mark.slow
def test_resnet_adds_and_pools_stay_in_int8() -> None:
    model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 64, 64)
    calib = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    result = compile(model, x[:1], "fold-bn,quantize:calib=minmax", calib_data=calib)
    lowered = lower_int8(result.module)
    assert lowered.kernels["quantized::add_relu"] == 8
    assert lowered.kernels["quantized::conv2d"] + lowered.kernels["quantized::conv2d_relu"] == 20
    code = lowered.module.code
    assert "operator.add" not in code and "torch.nn.functional.relu" not in code  # the float adds were replaced
    with torch.no_grad():
        assert sqnr_db(result.module(x), lowered.module(x)) >= 30


def test_what_has_no_int8_kernel_runs_in_float_and_is_listed() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Identity(),
        nn.Conv2d(8, 8, 3),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    ).eval()
    x = torch.randn(4, 3, 8, 8)
    result = compile(model, x[:1], "quantize:calib=minmax,weights=block", calib_data=[x])
    lowered = result.to_torch_int8()
    assert sum(lowered.kernels[k] for k in lowered.kernels if k.startswith("quantized::conv")) == 0
    assert any("block weights have no per-channel int8 grid" in op for op in lowered.float_ops)
    with torch.no_grad():
        assert torch.allclose(result.module(x), lowered.module(x), atol=1e-5)  # float fallback: the same numbers


def test_compile_times_the_int8_lowering_and_says_so() -> None:
    model, x = trained_cnn(), split()["test"][0][:1]
    result = compile(model, x, "fold-bn,quantize", calib_data=calibration(), latency_repeats=2)
    assert "after: torch int8 kernels" in result.report.latency.baseline
    int8 = result.report.torch_int8
    assert int8.kernels["quantized::conv2d_relu"] == 4 and int8.failure is None and not int8.early_exit
    assert "quantized::conv2d_relu 4" in render_compile(result.report)


@pytest.mark.slow
def test_early_exit_stages_are_lowered_for_timing_too() -> None:
    model, (x, _) = trained_cnn(), split()["test"]
    result = compile(model, x[:2], "fold-bn,quantize,add-exits:exits=2", calib_data=calibration(), latency_repeats=1)
    assert result.report.torch_int8.early_exit
    assert "each stage of the early-exit model" in render_compile(result.report)
    lowered = result.to_torch_int8().module
    with torch.no_grad():
        agree = float((lowered(x).argmax(-1) == result.module(x).argmax(-1)).float().mean())
    assert type(lowered) is type(result.module) and agree >= 0.98


@pytest.mark.slow
def test_engine_without_int16_saturation_is_preferred() -> None:
    from slimfx.backends.torch_int8 import choose_engine

    assert choose_engine(["qnnpack", "x86", "fbgemm", "onednn"]) == "onednn"
    assert choose_engine(["x86", "fbgemm"]) == "x86" and choose_engine([]) is None
    # efficientnet's depthwise convs read signed (zero point 128) inputs: fbgemm on CPUs without
    # VNNI saturates its int16 pair sums there (about 13 dB against the simulation); oneDNN does not
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no oneDNN int8 engine")
    model, x = torchvision.models.efficientnet_b0().eval(), torch.randn(4, 3, 64, 64)
    result = compile(model, x[:1], "quantize:calib=minmax", calib_data=[x])
    lowered = result.to_torch_int8()
    with torch.no_grad():
        assert sqnr_db(result.module(x), lowered.module(x)) >= 25
