"""Runtimes behind one interface: choosing them, measuring side by side, what ran, artifacts."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import slimfx
from slimfx.backends.compare import COMPILED, ORIGINAL, compare_runtimes
from slimfx.backends.runtimes import RUNTIMES, Workspace, choose_runtimes, get_runtime
from slimfx.cli import main
from slimfx.errors import BackendError, InvalidArgumentError
from slimfx.files.atomic import atomic_write
from slimfx.metrics import top1_agreement
from tests.digits import calibration, split, trained_cnn

pytest.importorskip("onnxruntime")
openvino = pytest.importorskip("openvino")
INPUT = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def quantized() -> slimfx.CompileResult:
    return slimfx.compile(trained_cnn(), INPUT, "fold-bn,quantize", calib_data=calibration())


def hide_package(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


def test_top1_agreement_counts_rows_with_the_same_class() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    candidate = torch.tensor([[0.9, 0.1], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert top1_agreement(reference, candidate) == 0.75
    assert top1_agreement(torch.ones(4, 1), torch.ones(4, 1)) is None  # one column: not a classifier
    assert top1_agreement(torch.ones(2, 3, 4), torch.ones(2, 3, 4)) is None


def test_unknown_runtime_suggests_the_nearest() -> None:
    with pytest.raises(InvalidArgumentError, match="did you mean openvino-int8"):
        get_runtime("openvino-int")


def test_a_runtime_for_the_other_kind_of_graph_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="add 'quantize' to the passes"):
        choose_runtimes("onnxruntime-int8", quantized=False)
    with pytest.raises(InvalidArgumentError, match="pick onnxruntime-int8"):
        choose_runtimes("onnxruntime", quantized=True)
    with pytest.raises(InvalidArgumentError, match="pick torch-int8"):
        choose_runtimes("torch-bf16", quantized=True)


def test_auto_takes_every_installed_runtime_of_the_right_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    floats = choose_runtimes("auto", quantized=False)
    assert {r.name for r in floats.compiled} <= {"torch", "torch-bf16", "onnxruntime", "openvino"}
    assert {"torch", "onnxruntime", "openvino"} <= {r.name for r in floats.compiled}
    int8 = choose_runtimes("auto", quantized=True)
    assert [r.name for r in int8.compiled] == ["torch-int8", "onnxruntime-int8", "openvino-int8"]
    assert [r.name for r in int8.original] == ["torch", "onnxruntime", "openvino"]
    hide_package(monkeypatch, "openvino")
    without = choose_runtimes("auto", quantized=True)
    assert [r.name for r in without.compiled] == ["torch-int8", "onnxruntime-int8"]
    assert without.skipped == (("openvino-int8", 'openvino is not installed: pip install -e ".[openvino]"'),)
    with pytest.raises(BackendError, match=r"runtime openvino cannot run here: .*\.\[openvino\]"):
        choose_runtimes("openvino", quantized=False)


def test_a_missing_runtime_is_one_line_from_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    hide_package(monkeypatch, "openvino")
    code = main(["compile", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--runtime", "openvino"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'pip install -e ".[openvino]"' in err
    code = main(
        ["compile", "torchvision:resnet18", "--passes", "quantize", "--calib", "random:2", "--runtime", "onnxruntime"]
    )
    assert code == 2 and "pick onnxruntime-int8" in capsys.readouterr().err
    out = tmp_path / "m.onnx"
    code = main(["compile", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--openvino", str(out)])
    assert code == 2 and "must end in .xml" in capsys.readouterr().err and not out.exists()


def test_compare_measures_each_model_in_each_runtime(quantized: slimfx.CompileResult) -> None:
    x, _ = split()["test"]
    checks = [(b,) for b in x[:200].split(50)]
    comparison = compare_runtimes(
        trained_cnn(), quantized.module, choose_runtimes("auto", True), (x[:8],), eval_inputs=checks, repeats=3
    )
    assert [(r.runtime, r.model) for r in comparison.rows] == [
        ("torch", ORIGINAL),
        ("onnxruntime", ORIGINAL),
        ("openvino", ORIGINAL),
        ("torch-int8", COMPILED),
        ("onnxruntime-int8", COMPILED),
        ("openvino-int8", COMPILED),
    ]
    for row in comparison.rows:
        assert row.failure is None and row.latency_ms is not None and row.latency_ms > 0
        assert row.agreement is not None and row.agreement >= 0.97, row  # int8 and bf16 change numerics a little
        assert row.relative_error is not None and row.relative_error < 0.2
    torch_row = comparison.row("torch", ORIGINAL)
    assert torch_row is not None and torch_row.relative_error == 0 and torch_row.agreement == 1
    assert comparison.baseline_ms == torch_row.latency_ms
    ort = comparison.row("onnxruntime-int8", COMPILED)
    assert ort is not None and ort.precision.startswith("int8") and ort.kernels.get("QLinearConv", 0) >= 4
    ov = comparison.row("openvino-int8", COMPILED)
    assert ov is not None and ov.kernels.get("Convolution u8", 0) + ov.kernels.get("Convolution i8", 0) >= 4
    fastest = comparison.fastest
    assert fastest is not None and fastest.model == COMPILED
    assert fastest.latency_ms == min(r.latency_ms for r in comparison.rows if r.model == COMPILED)
    speedup = comparison.speedup_in_runtime(ort)
    original = comparison.row("onnxruntime", ORIGINAL)
    assert speedup == pytest.approx(original.latency_ms / ort.latency_ms)
    data = json.loads(json.dumps(comparison.to_dict()))
    assert (
        data["fastest"] == fastest.runtime and len(data["rows"]) == 6 and data["agreement_on"] == "the example inputs"
    )


def test_a_failing_session_is_a_row_not_a_crash() -> None:
    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]  # no ONNX export for svd

    comparison = compare_runtimes(Broken(), Broken(), choose_runtimes("onnxruntime", False), (INPUT,), repeats=1)
    row = comparison.row("onnxruntime", COMPILED)
    assert row is not None and row.latency_ms is None and "ONNX export failed" in (row.failure or "")
    assert comparison.fastest is None


@pytest.mark.parametrize("name", ["torch", "onnxruntime-int8", "openvino-int8"])
def test_saved_artifacts_load_and_give_the_same_outputs(
    name: str, quantized: slimfx.CompileResult, tmp_path: Path
) -> None:
    x = split()["test"][0][:16]
    module = quantized.module if RUNTIMES[name].runs_int8 else trained_cnn()
    if name == "torch":
        module = slimfx.compile(trained_cnn(), INPUT, "fold-bn").module
    with Workspace((INPUT,)) as workspace:
        session = RUNTIMES[name].session(module, workspace)
        path = tmp_path / f"model{session.artifact_suffix}"
        written = session.save(path)
        expected = session.run((x,))
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    if name == "openvino-int8":
        assert [p.suffix for p in written] == [".xml", ".bin"]
        compiled = openvino.Core().compile_model(str(path), "CPU")
        got = torch.from_numpy(compiled([x.numpy()])[0])
    elif name == "onnxruntime-int8":
        from slimfx.backends import onnx as ort_tools

        got = torch.from_numpy(ort_tools.run(ort_tools.session(path), (x,))[0])
    else:
        got = slimfx.load_model(str(path))(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_runs_in_bf16_where_the_cpu_has_it() -> None:
    runtime = get_runtime("torch-bf16")
    if runtime.unavailable() is not None:
        pytest.skip(runtime.unavailable())
    with Workspace((INPUT,)) as workspace:
        session = runtime.session(trained_cnn(), workspace)
        assert session.precision().startswith("bf16")
        x = split()["test"][0][:64]
        agreement = top1_agreement(trained_cnn()(x), session.run((x,)))
    assert agreement is not None and agreement > 0.95


def test_output_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_cli_runtime_auto_prints_the_table_and_json_carries_it(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compile", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--passes", "fold-bn,quantize"]
    code = main([*argv, "--calib", "random:2", "--runtime", "auto", "--repeats", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "measured in each runtime (batch 1" in out and "fastest" in out
    for name in ("torch-int8", "onnxruntime-int8", "openvino-int8", "onnxruntime  ", "openvino  "):
        assert name in out
    code = main([*argv, "--calib", "random:2", "--runtime", "onnxruntime-int8", "--repeats", "2", "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    rows = [(r["runtime"], r["model"]) for r in data["runtimes"]["rows"]]
    assert rows == [("onnxruntime", "original"), ("onnxruntime-int8", "compiled")]
    assert (
        data["runtimes"]["agreement_on"]
        == "2 batches of calibration data (2 rows; the passes used them too: too few to hold any out)"
    )
    assert data["latency"]["baseline"].startswith("original in onnxruntime, compiled in onnxruntime-int8")


def test_timm_specs_load_at_timms_input_size(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    loaded = slimfx.load_model("timm:resnet18")
    assert type(loaded).__name__ == "ResNet" and loaded.example_input_shape == (1, 3, 224, 224)
    code = main(["report", "timm:resnet1", "--top", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "timm has no model 'resnet1'; did you mean resnet18" in err


def test_float_models_export_with_torch_export_and_int8_graphs_with_the_fallback(
    quantized: slimfx.CompileResult, tmp_path: Path
) -> None:
    import onnx

    from slimfx.backends.onnx import DYNAMO, EXPORTER_KEY, TORCHSCRIPT, export_onnx

    pytest.importorskip("onnxscript")
    for module, exporter in ((trained_cnn(), DYNAMO), (quantized.module, TORCHSCRIPT)):
        path = export_onnx(module, (INPUT,), tmp_path / "m.onnx")
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props[EXPORTER_KEY] == exporter


def test_signed_grids_as_int8_keep_the_numbers(quantized: slimfx.CompileResult, tmp_path: Path) -> None:
    import onnx

    from slimfx.backends import onnx as ort_tools
    from slimfx.backends.onnx_fold import signed_grids_as_int8

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)).eval()  # signed input and output
    x = torch.randn(4, 3, 12, 12)
    result = slimfx.compile(net, x, "quantize", calib_data=[torch.randn(4, 3, 12, 12) for _ in range(4)])
    path = result.export_onnx(tmp_path / "u8.onnx")
    model = onnx.load(str(path))
    assert signed_grids_as_int8(model) >= 2  # the input's grid and the signed middle tensor's
    zero_points = [i for i in model.graph.initializer if i.name.endswith("_as_int8")]
    assert zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points)
    onnx.save(model, str(tmp_path / "s8.onnx"))
    before = ort_tools.run(ort_tools.session(path), (x,))[0]
    after = ort_tools.run(ort_tools.session(tmp_path / "s8.onnx"), (x,))[0]
    assert (before == after).all()
    with Workspace((x,)) as workspace:
        session = get_runtime("openvino-int8").session(result.module, workspace)
        # OpenVINO runs the file in int8: which convs take i8 rather than u8 inputs (or fall back to
        # bf16) is its choice per CPU (i8 on the Xeon with AMX; u8 and bf16 on an AVX-512 EPYC)
        assert any(k.startswith("Convolution") and k.endswith((" u8", " i8")) for k in session.kernels())
