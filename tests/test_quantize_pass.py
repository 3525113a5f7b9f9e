"""The quantize pass on a trained model: accuracy, grids, sizes, mixed precision, matmuls, attention, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from digits import calibration, split, trained_cnn
from nets import MatmulAttention, SelfAttentionBlock

from slimfx import compile
from slimfx.errors import DataError, NonFiniteError, PassError, PassSpecError
from slimfx.metrics import relative_error, sqnr_db
from slimfx.passes.quantize import QuantizedLayerDetails
from slimfx.passes.registry import parse_pipeline


@pytest.mark.parametrize("calib", ["minmax", "percentile", "entropy", "mse"])
def test_digits_cnn_keeps_its_accuracy_in_int8(calib: str) -> None:
    model = trained_cnn()
    x, y = split()["test"]
    result = compile(model, x[:2], f"fold-bn,quantize:calib={calib}", calib_data=calibration())
    with torch.no_grad():
        before = float((model(x).argmax(-1) == y).float().mean())
        after = float((result.module(x).argmax(-1) == y).float().mean())
        assert sqnr_db(model(x), result.module(x)) >= 30
    assert after >= before - 0.01
    decisions = [d for d in result.report.passes[1].decisions if d.action == "quantized"]
    layers = [d for d in decisions if isinstance(d.details, QuantizedLayerDetails)]
    assert len(layers) == 5 and all(d.details.fused_activation == "ReLU" for d in layers[:4])
    # the first layer calibrates its input; the next ones read the grid their producer set
    assert [d.details.threshold is None for d in layers] == [False, True, True, True, True]
    pools = {d.target: d.details.threshold for d in decisions if not isinstance(d.details, QuantizedLayerDetails)}
    assert list(pools) == ["block2.3 output", "block3.3 output", "adaptive_avg_pool2d output"]
    assert pools["block2.3 output"] is None and pools["adaptive_avg_pool2d output"] is not None  # max keeps the grid
    calibrated = [d for d in decisions if d.details.threshold is not None]
    assert all(d.details.threshold <= d.details.observed_max + 1e-6 for d in calibrated)


def test_bad_input_is_a_clear_error() -> None:
    model, x = trained_cnn(), split()["test"][0][:2]
    with pytest.raises(DataError, match="pass 'quantize' needs calibration data"):  # before capture
        compile(model, x, "quantize")
    broken = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2)).eval()
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"first appear at node '_0' \(module '0', Conv2d\)"):
        compile(broken, torch.rand(2, 1, 8, 8), "quantize", calib_data=[torch.rand(4, 1, 8, 8)])
    with pytest.raises(PassError, match="layer '0' has non-finite weights"):  # unverified, still refused
        compile(broken, torch.rand(2, 1, 8, 8), "quantize", calib_data=[torch.rand(4, 1, 8, 8)], allow_non_finite=True)
    with pytest.raises(PassSpecError, match="choose one of: int8, int4, ternary, binary, block"):
        parse_pipeline("quantize:weights=int3")
    with pytest.raises(PassSpecError, match="choose one of: minmax, percentile, entropy, mse"):
        parse_pipeline("quantize:calib=kl")


def test_size_report_and_schemes_on_digits() -> None:
    model, x = trained_cnn(), split()["test"][0]
    sizes = {}
    for scheme in ("int8", "int4", "ternary", "binary", "block"):
        result = compile(model, x[:2], f"fold-bn,quantize:weights={scheme}", calib_data=calibration())
        summary = result.report.passes[1].decisions[-1]
        assert summary.action == "summary"
        sizes[scheme] = summary.details
        assert summary.details.huffman_bytes <= summary.details.quantized_bytes < summary.details.fp32_bytes
    stored = [sizes[scheme].quantized_bytes for scheme in ("binary", "ternary", "int4", "int8")]
    assert stored == sorted(stored) and len(set(stored)) == 4
    assert sizes["ternary"].zero_share > 0.2


def test_qat_recovers_ternary_accuracy() -> None:
    import torch.nn.functional as F

    import slimfx

    model = trained_cnn()
    x_test, y_test = split()["test"]
    x_train, y_train = split()["train"]
    quantized = compile(model, x_test[:2], "fold-bn,quantize:weights=ternary", calib_data=calibration()).module
    with torch.no_grad():
        before = float((quantized(x_test).argmax(-1) == y_test).float().mean())
    losses = slimfx.train.qat(quantized, list(zip(x_train.split(50), y_train.split(50))), F.cross_entropy, epochs=3)
    with torch.no_grad():
        after = float((quantized(x_test).argmax(-1) == y_test).float().mean())
        float_accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
    assert losses[-1] < losses[0]
    assert float_accuracy - after < float_accuracy - before  # the quantization gap shrinks
    assert after >= float_accuracy - 0.03


def test_binary_activations_need_binary_weights() -> None:
    with pytest.raises(PassSpecError, match="act-bits"):
        parse_pipeline("quantize:act-bits=1")
    with pytest.raises(PassSpecError, match="act-bits"):
        parse_pipeline("quantize:act-bits=4")
    (p,) = parse_pipeline("quantize:weights=binary,act-bits=1")
    assert p.act_bits == 1


def test_bits_auto_meets_a_size_budget_and_lists_the_widths() -> None:
    model, x = trained_cnn(), split()["test"][0]
    result = compile(model, x[:2], "fold-bn,quantize:bits=auto,target-size=0.1", calib_data=calibration())
    record = result.report.passes[1]
    widths = [d.details.bits for d in record.decisions if d.action == "quantized"]
    assert set(widths) <= {8, 4, 2} and len(set(widths)) > 1
    size = record.decisions[-1].details
    assert size.quantized_bytes <= 0.1 * size.fp32_bytes + 4 * 1000  # weights within budget (+ scales, biases)
    unreachable = compile(model, x[:2], "fold-bn,quantize:bits=auto,target-size=0.01", calib_data=calibration())
    assert "cannot be met" in unreachable.report.passes[1].warnings[0]


def test_weight_range_reduced_stores_7_bit_integers_and_auto_follows_the_cpu() -> None:
    from slimfx.cost_model.device import Machine

    model, x = trained_cnn(), split()["test"][0]
    layers = {}
    for weight_range in ("full", "reduced", "auto"):
        result = compile(model, x[:2], f"quantize:weight-range={weight_range}", calib_data=calibration())
        conv = result.module.get_submodule("block3.0")
        weight, scale = conv.weight_grid()
        layers[weight_range] = int((weight / scale.reshape(-1, 1, 1, 1)).round().abs().max())
        record = result.report.passes[-1]
        reduced = any("7-bit range" in d.reason for d in record.decisions)
        assert reduced == (layers[weight_range] == 63)
    assert layers["full"] == 127 and layers["reduced"] == 63
    assert layers["auto"] == (63 if Machine.here().int8_saturates else 127)
    assert Machine("x", 2, ("avx2", "fma")).int8_saturates
    assert not Machine("x", 2, ("avx2", "avx512f", "avx512_vnni")).int8_saturates
    assert not Machine("arm", 2, ()).int8_saturates


def test_layer_weights_set_one_layers_scheme_and_name_what_cannot_take_one() -> None:
    model, x = trained_cnn(), split()["test"][0]
    spec = "quantize:layer-weights=block3.0@ternary,exclude=head"
    result = compile(model, x[:2], spec, calib_data=calibration())
    bits = {d.target: d.details.bits for d in result.report.passes[1].decisions if d.action == "quantized"}
    assert {k: v for k, v in bits.items() if k.startswith("block") and "output" not in k} == {
        "block1.0": 8,
        "block2.0": 8,
        "block3.0": 2,
        "block4.0": 8,
    }
    with pytest.raises(PassError, match=r"'head@int4' names no quantized layer \(it is left in float: excluded"):
        compile(model, x[:2], "quantize:layer-weights=head@int4,exclude=head", calib_data=calibration())
    with pytest.raises(PassError, match=r"'block9@int4' names no quantized layer \(no such conv or linear layer"):
        compile(model, x[:2], "quantize:layer-weights=block9@int4", calib_data=calibration())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quantize:bits=auto", "exactly one of target-size or target-macs-bits"),
        ("quantize:target-size=0.2", "a budget only with bits=auto"),
        ("quantize:bits=auto,target-size=2", "option 'target-size'"),
        ("quantize:layer-weights=block1.0", "LAYER@SCHEME with a scheme among"),
        ("quantize:layer-weights=block1.0@int3", "LAYER@SCHEME with a scheme among"),
        ("quantize:layer-weights=block1.0@int4,bits=auto,target-size=0.2", "or bits=auto, not both"),
    ],
)
def test_mixed_precision_options_are_checked(spec: str, message: str) -> None:
    with pytest.raises(PassSpecError, match=message):
        parse_pipeline(spec)


def test_matmul_inputs_get_quantize_dequantize(tmp_path: Path) -> None:
    model, x = MatmulAttention().eval(), torch.randn(8, 10, 16)
    result = compile(model, x[:2], "quantize:calib=minmax", calib_data=[x])
    targets = [d.target for d in result.report.passes[-1].decisions]
    assert {"matmul input 0", "matmul input 1", "matmul_1 input 0", "matmul_1 input 1"} <= set(targets)
    assert result.report.output_error < 0.05 and result.report.after.uncounted == ()
    pytest.importorskip("onnxruntime")
    from slimfx.backends import onnx as ort_tools

    path = result.export_onnx(tmp_path / "attention.onnx")
    kernels = ort_tools.kernel_census(path)
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= 5  # 3 linears + 2 matmuls
    assert "MatMul" not in kernels  # no float matmul left


def test_multihead_attention_is_opened_and_quantized(tmp_path: Path) -> None:
    model, x = SelfAttentionBlock().eval(), torch.randn(16, 12, 32)
    result = compile(model, x[:2], "quantize:calib=minmax", calib_data=list(x.split(4)))
    quantized = {d.target for d in result.report.passes[-1].decisions if d.action == "quantized"}
    assert {
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.out_proj",
        "matmul input 0",
        "matmul_1 input 1",
    } <= quantized
    assert not any(isinstance(m, nn.MultiheadAttention) for m in result.module.modules())
    with torch.no_grad():
        assert sqnr_db(model(x), result.module(x)) >= 30
    pytest.importorskip("onnxruntime")
    from slimfx.backends import onnx as ort_tools

    kernels = ort_tools.kernel_census(result.export_onnx(tmp_path / "block.onnx"))
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= 6 and "MatMul" not in kernels


def test_masked_attention_is_declined_with_the_reason() -> None:
    model, x = SelfAttentionBlock(masked=True).eval(), torch.randn(8, 12, 32)
    result = compile(model, x[:2], "quantize:calib=minmax", calib_data=[x])
    declined = {d.target: d.reason for d in result.report.passes[-1].decisions if d.action == "declined"}
    assert declined == {"attention": "attention left whole: called with a attn_mask (masks are not written out)"}


def test_quantize_folds_batchnorm_first_unless_told_not_to() -> None:
    model, x = trained_cnn(), split()["test"][0]
    folded = compile(model, x[:2], "quantize:calib=minmax", calib_data=calibration())
    kept = compile(model, x[:2], "quantize:calib=minmax,fold-bn=false", calib_data=calibration())

    def batchnorms(module: nn.Module) -> int:
        return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())

    assert batchnorms(folded.module) == 0 and batchnorms(kept.module) == 4
    fold, quantize = folded.report.passes  # fold-bn inserted before quantize, with its own verified record
    assert (fold.name, fold.exact, quantize.name) == ("fold-bn", True, "quantize")
    assert fold.output_error < 1e-4 and sum(d.action == "folded" for d in fold.decisions) == 4
    assert [r.name for r in kept.report.passes] == ["quantize"]
    with torch.no_grad():
        assert sqnr_db(model(x), folded.module(x)) >= 30


def test_calibration_data_in_any_accepted_form_gives_the_same_result() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model, (x, y) = trained_cnn(), split()["calib"]
    test = split()["test"][0]
    forms = [list(x.split(100)), x, DataLoader(TensorDataset(x, y), batch_size=100)]
    results = [compile(model, test[:100], "quantize:calib=minmax", calib_data=data) for data in forms]
    thresholds = [
        [d.details.threshold for d in r.report.passes[-1].decisions if d.action == "quantized"] for r in results
    ]
    assert thresholds[0] == thresholds[1] == thresholds[2]
    with torch.no_grad():
        assert torch.equal(results[0].module(test), results[2].module(test))


def test_bf16_layers_by_pattern_and_by_measured_sqnr(tmp_path) -> None:
    from slimfx.backends import onnx as ort_tools
    from slimfx.quant.layers import Bf16Layer, QuantizedLayer

    x = split()["test"][0][:64]
    model = trained_cnn()
    named = compile(model, x[:2], "quantize:bf16=block1.*,head", calib_data=calibration())
    kinds = {name: type(m) for name, m in named.graph.module.named_modules()}
    assert kinds["block1.0"] is Bf16Layer and kinds["head"] is Bf16Layer and kinds["block2.0"] is QuantizedLayer
    record = named.report.passes[-1]
    bf16 = [d for d in record.decisions if d.details is not None and getattr(d.details, "bits", None) == 16]
    assert {d.target for d in bf16} == {"block1.0", "head"}
    assert all("named by bf16 pattern" in d.reason and d.details.output_sqnr_db > 40 for d in bf16)
    with torch.no_grad():
        eager = named.module(x)
    path = named.export_onnx(tmp_path / "mixed.onnx")  # the bf16 layers export as float layers
    exported = torch.from_numpy(ort_tools.run(ort_tools.session(path), (x,))[0])
    assert relative_error(eager, exported) < 1e-2  # bf16 arithmetic in eager vs fp32 in onnxruntime
    auto = compile(model, x[:2], "quantize:bf16=auto,bf16-below=100", calib_data=calibration())
    assert all(
        isinstance(m, Bf16Layer) for m in auto.graph.module.modules() if isinstance(m, (Bf16Layer, QuantizedLayer))
    )
    none = compile(model, x[:2], "quantize:bf16=auto,bf16-below=0", calib_data=calibration())
    assert not any(isinstance(m, Bf16Layer) for m in none.graph.module.modules())


@pytest.mark.parametrize(
    "spec, message",
    [("quantize:bf16=auto,layer1", "auto alone"), ("quantize:bf16-below=20", "only with bf16=auto")],
)
def test_bad_bf16_options(spec: str, message: str) -> None:
    from slimfx.errors import PassSpecError
    from slimfx.passes.registry import resolve_passes

    with pytest.raises(PassSpecError, match=message):
        resolve_passes(spec)


def test_no_change_always_says_why_and_low_bit_sizes_say_how_files_store_them() -> None:
    import dataclasses

    from slimfx.report.analysis import Latency, OnnxMeasurement
    from slimfx.report.tables import render_compile

    model, x = trained_cnn(), split()["test"][0]
    int4 = compile(model, x[:2], "quantize:weights=int4", calib_data=calibration())
    (size,) = [d for d in int4.report.passes[-1].decisions if d.target == "(model size)"]
    assert "ONNX and OpenVINO files store weights below 8 bits as int8" in size.reason
    again = compile(int4.module, x[:2], "quantize", calib_data=calibration())
    fold, quantize = again.report.passes
    assert (
        not quantize.changed and "the model is quantized already (5 quantized layers)" in quantize.decisions[-1].reason
    )
    assert not fold.changed and fold.decisions[-1].reason.startswith("nothing to change: nothing in this model")
    slower = dataclasses.replace(int4.report, onnx=OnnxMeasurement("m.onnx", Latency(1.0, 1.3, "onnxruntime"), {}))
    assert "WARNING: the compiled model is slower than the original in onnxruntime (0.77x)" in render_compile(slower)
