"""Quantized graphs exported to ONNX: onnxruntime runs them with int8 kernels and agrees with slimfx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from digits import calibration, split, trained_cnn

from slimfx import compile


@pytest.mark.slow
def test_onnx_export_runs_in_int8_and_agrees(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slimfx.backends import onnx as ort_tools

    model = trained_cnn()
    x, _ = split()["test"]
    result = compile(model, x[:2], "fold-bn,quantize:calib=entropy", calib_data=calibration())
    path = result.export_onnx(tmp_path / "digits.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    (exported,) = ort_tools.run(ort_tools.session(path), [x])
    with torch.no_grad():
        reference = result.module(x).numpy()
    # the head's output is float: one step of its quantized input moves an output by at most
    # input_scale x the largest row L1 norm of its weights
    head = result.module.get_submodule("head")
    step = head.input_scale * float(head.layer.weight.detach().abs().sum(1).max())
    close = np.abs(exported - reference) <= step
    assert close.mean() >= 0.99, f"{close.mean():.4f} of outputs within one step ({step:.4g})"
    kernels = ort_tools.kernel_census(path)
    assert kernels.get("QLinearConv", 0) == 4 and kernels.get("Conv", 0) == 0  # no conv left in fp32
    assert kernels.get("QGemm", 0) == 1 and "Gemm" not in kernels  # the float-output head too (int32 bias)


@pytest.mark.parametrize("weights", ["int4", "ternary", "binary"])
def test_low_bit_weights_export_as_int8_kernels(weights: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from slimfx.backends import onnx as ort_tools

    model = trained_cnn()
    x, _ = split()["test"]
    spec = f"fold-bn,quantize:weights={weights}" + (",act-bits=1" if weights == "binary" else "")
    result = compile(model, x[:2], spec, calib_data=calibration())
    path = result.export_onnx(tmp_path / "low.onnx")
    stored = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    symbols = {"int4": set(range(-8, 8)), "ternary": {-1, 0, 1}, "binary": {-1, 1}}[weights]
    int8 = [w for w in stored if w.dtype == np.int8 and w.ndim == 4]  # the convs' weights, stored as int8
    assert len(int8) == 4 and all(set(np.unique(w).tolist()) <= symbols for w in int8)
    assert ort_tools.kernel_census(path).get("QLinearConv", 0) == 4
    (exported,) = ort_tools.run(ort_tools.session(path), [x])
    with torch.no_grad():
        reference = result.module(x)
    assert float((torch.from_numpy(exported).argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.98


@pytest.mark.slow
def test_cli_writes_onnx_and_reports_both_latencies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from slimfx.cli import main

    out = tmp_path / "r18.onnx"
    code = main(
        [
            "compile",
            "torchvision:resnet18",
            "--input-shape",
            "1,3,64,64",
            "--passes",
            "fold-bn,quantize:calib=entropy",
            "--calib",
            "random:4",
            "--onnx",
            str(out),
            "--format",
            "json",
            "--repeats",
            "3",
        ]
    )
    text, _ = capsys.readouterr()
    assert code == 0 and out.exists()
    onnx = json.loads(text)["onnx"]
    assert onnx["fp32_ms"] > 0 and onnx["compiled_ms"] > 0 and onnx["kernels"]["QLinearConv"] == 20
