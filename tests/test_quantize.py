"""quantize: calibrators on known distributions, int8 accuracy, ONNX export that onnxruntime runs in int8."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from digits import split, trained_cnn

from slimfx import compile
from slimfx.errors import PassError, PassSpecError
from slimfx.passes.quantize import sqnr_db
from slimfx.passes.registry import parse_pipeline
from slimfx.quant.calibrate import (
    AbsHistogram,
    entropy_threshold,
    minmax_threshold,
    mse_threshold,
    percentile_threshold,
)
from slimfx.quant.modules import QuantizedLayer, activation_qparams


def laplace_with_outliers() -> torch.Tensor:
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    x[:5] = torch.tensor([40.0, -35.0, 38.0, 50.0, -45.0])
    return x


def streamed(x: torch.Tensor) -> AbsHistogram:
    hist = AbsHistogram()
    for part in x.split(7_000):  # many batches: the range widens as larger values arrive
        hist.update(part)
    return hist


def test_minmax_threshold_is_max_abs() -> None:
    x = laplace_with_outliers()
    assert minmax_threshold(streamed(x)) == pytest.approx(float(x.abs().max()))


def test_percentile_matches_numpy_within_a_bin() -> None:
    x = laplace_with_outliers()
    hist = streamed(x)
    for q in (99.0, 99.9, 99.99):
        assert abs(percentile_threshold(hist, q) - np.percentile(x.abs().numpy(), q)) <= 2 * hist.width


def test_entropy_threshold_clips_outliers() -> None:
    x = laplace_with_outliers()
    t = entropy_threshold(streamed(x))
    assert np.percentile(x.abs().numpy(), 99.9) < t < 0.5 * float(x.abs().max())


def tensorrt_entropy_reference(counts: np.ndarray, width: float, levels: int = 128, max_clipped: float = 1e-3) -> float:
    """TensorRT's KL search written out candidate by candidate, as the algorithm is described."""
    best, best_i, total = np.inf, len(counts), counts.sum()
    for i in range(levels, len(counts) + 1):
        clipped = counts[i:].sum()
        if clipped > max_clipped * total:
            continue
        p = counts[:i].astype(np.float64).copy()
        p[i - 1] += clipped
        group = np.arange(i) * levels // i
        q = np.zeros(i)
        for g in range(levels):
            members = group == g
            filled = (counts[:i] > 0) & members
            if filled.any():
                q[filled] = counts[:i][members].sum() / filled.sum()
        if np.any((p > 0) & (q == 0)):
            continue
        p, q = p / p.sum(), q / q.sum()
        kl = float(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0])))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


@pytest.mark.parametrize("sample", ["laplace", "relu-squared", "outliers"])
def test_entropy_search_matches_the_algorithm_written_out(sample: str) -> None:
    torch.manual_seed(1)
    x = {"laplace": lambda: torch.distributions.Laplace(0.0, 1.0).sample((50_000,)),
         "relu-squared": lambda: torch.relu(torch.randn(50_000)) ** 2,
         "outliers": laplace_with_outliers}[sample]()
    hist = AbsHistogram(bins=512)  # the written-out search is slow: fewer bins, same algorithm
    hist.update(x)
    reference = tensorrt_entropy_reference(hist.counts.numpy(), hist.width)
    assert entropy_threshold(hist) == pytest.approx(reference, abs=1e-9)


def test_mse_threshold_minimizes_the_error_it_models() -> None:
    x = torch.distributions.Normal(0.0, 1.0).sample((50_000,))
    hist = streamed(x)
    t = mse_threshold(hist)
    assert 2.0 < t < float(x.abs().max())  # 8-bit Gaussian: clip at a few sigma, not at the max

    def error(limit: float) -> float:
        step = limit / 127
        return float(((x.clamp(-limit, limit) / step).round() * step - x).pow(2).mean())

    assert error(t) <= error(float(x.abs().max())) and error(t) <= error(1.0)


def test_zeros_are_counted_apart_and_non_finite_values_refused() -> None:
    hist = AbsHistogram()
    x = torch.relu(torch.randn(10_000))
    hist.update(x)
    assert hist.zeros == int((x == 0).sum()) and hist.non_negative
    assert hist.counts.sum() + hist.zeros == x.numel()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="non-finite"):
            hist.update(torch.tensor([1.0, bad]))


def test_quantized_layer_stays_within_one_step_of_float() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.rand(2, 4, 8, 8)
    scale, zero_point = activation_qparams(1.0, non_negative=True)
    layer = QuantizedLayer(conv)
    assert torch.equal(layer(x), conv(x))  # unfrozen: float, for calibration
    layer.freeze(scale, zero_point)
    assert sqnr_db(conv(x), layer(x)) > 30
    weight = layer.quantized_weight()
    steps = weight / layer.weight_scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 128


# -- a trained model ------------------------------------------------------------------------------
def calibration() -> list[torch.Tensor]:
    return list(split()["calib"][0].split(100))


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
    layers = [d for d in decisions if "size" in d.details]
    assert len(layers) == 5 and all(d.details["fused_activation"] == "ReLU" for d in layers[:4])
    # the first layer calibrates its input; the next ones read the grid their producer set
    assert [d.details["threshold"] is None for d in layers] == [False, True, True, True, True]
    pools = {d.target: d.details["threshold"] for d in decisions if "size" not in d.details}
    assert list(pools) == ["block2.3 output", "block3.3 output", "adaptive_avg_pool2d output"]
    assert pools["block2.3 output"] is None and pools["adaptive_avg_pool2d output"] is not None  # max keeps the grid
    calibrated = [d for d in decisions if d.details["threshold"] is not None]
    assert all(d.details["threshold"] <= d.details["observed_max"] + 1e-6 for d in calibrated)


def test_onnx_export_runs_in_int8_and_agrees(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slimfx.runtime import onnx as ort_tools

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

    from slimfx.runtime import onnx as ort_tools

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


def test_cli_writes_onnx_and_reports_both_latencies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from slimfx.cli import main

    out = tmp_path / "r18.onnx"
    code = main(["compile", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--passes", "fold-bn,quantize:calib=entropy",
                 "--calib", "random:4", "--onnx", str(out), "--format", "json", "--repeats", "3"])
    text, _ = capsys.readouterr()
    assert code == 0 and out.exists()
    onnx = json.loads(text)["onnx"]
    assert onnx["fp32_ms"] > 0 and onnx["compiled_ms"] > 0 and onnx["kernels"]["QLinearConv"] == 20


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error() -> None:
    model, x = trained_cnn(), split()["test"][0][:2]
    with pytest.raises(PassError, match="quantize needs calibration data"):
        compile(model, x, "quantize")
    broken = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2)).eval()
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(PassError, match="layer '0' has non-finite weights"):
        compile(broken, torch.rand(2, 1, 8, 8), "quantize", calib_data=[torch.rand(4, 1, 8, 8)])
    with pytest.raises(PassSpecError, match="choose one of: int8, int4, ternary, binary, block"):
        parse_pipeline("quantize:weights=int3")
    with pytest.raises(PassSpecError, match="choose one of: minmax, percentile, entropy, mse"):
        parse_pipeline("quantize:calib=kl")


# -- low-bit weight schemes, QAT, size -------------------------------------------------------------
def test_ternary_weights_follow_twn() -> None:
    from slimfx.quant.schemes import ternary

    weight = torch.randn(4, 6, 3, 3)
    q = ternary(weight)
    for row, values in zip(weight.reshape(4, -1), q.weight.reshape(4, -1)):
        delta = 0.7 * row.abs().mean()
        alpha = row.abs()[row.abs() > delta].mean()
        assert set(torch.unique(values).tolist()) <= {-float(alpha), 0.0, float(alpha)} or torch.allclose(
            torch.unique(values.abs()), torch.tensor([0.0, float(alpha)]), atol=1e-6)
        assert torch.equal(values != 0, row.abs() > delta)
    assert set(q.integers.unique().tolist()) <= {-1, 0, 1} and q.bits == 2


def test_binary_weights_are_plus_minus_the_channel_mean() -> None:
    from slimfx.quant.schemes import binary

    weight = torch.randn(3, 5)
    q = binary(weight)
    alpha = weight.abs().mean(1, keepdim=True)
    assert torch.allclose(q.weight.abs(), alpha.expand_as(weight)) and torch.equal(q.weight.sign(), weight.sign())


def test_low_bit_weights_pass_gradients_straight_through() -> None:
    from slimfx.quant.schemes import SCHEME_BITS, quantize_weight

    for scheme in SCHEME_BITS:
        weight = torch.randn(4, 8, 3, 3, requires_grad=True)
        quantize_weight(weight, scheme, block_size=4).weight.sum().backward()
        assert torch.equal(weight.grad, torch.ones_like(weight)), scheme


def test_huffman_code_lengths_are_optimal_on_a_textbook_case() -> None:
    from slimfx.quant.size import huffman_bits, huffman_code_lengths

    lengths = huffman_code_lengths({0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5})
    assert lengths == {0: 1, 1: 3, 2: 3, 3: 3, 4: 4, 5: 4}
    assert huffman_bits(torch.tensor([0] * 90 + [1] * 10)) == 100


def test_size_report_and_schemes_on_digits() -> None:
    model, x = trained_cnn(), split()["test"][0]
    sizes = {}
    for scheme in ("int8", "int4", "ternary", "binary", "block"):
        result = compile(model, x[:2], f"fold-bn,quantize:weights={scheme}", calib_data=calibration())
        summary = result.report.passes[1].decisions[-1]
        assert summary.action == "summary"
        sizes[scheme] = summary.details
        assert summary.details["huffman_bytes"] <= summary.details["quantized_bytes"] < summary.details["fp32_bytes"]
    assert sizes["binary"]["quantized_bytes"] < sizes["ternary"]["quantized_bytes"] < sizes["int4"]["quantized_bytes"] < sizes["int8"]["quantized_bytes"]
    assert sizes["ternary"]["zero_share"] > 0.2


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


# -- mixed precision -------------------------------------------------------------------------------
def test_allocate_widths_spends_the_budget_on_the_least_sensitive_layers() -> None:
    from slimfx.quant.mixed import allocate_widths

    sensitivity = {"a": {8: 0.0, 4: 0.01, 2: 0.5}, "b": {8: 0.0, 4: 0.2, 2: 0.9}}
    cost = {"a": {8: 8.0, 4: 4.0, 2: 2.0}, "b": {8: 8.0, 4: 4.0, 2: 2.0}}
    assert allocate_widths(sensitivity, cost, 12.0) == ({"a": 4, "b": 8}, True)
    assert allocate_widths(sensitivity, cost, 8.0) == ({"a": 4, "b": 4}, True)
    assert allocate_widths(sensitivity, cost, 1.0) == ({"a": 2, "b": 2}, False)


def test_bits_auto_meets_a_size_budget_and_lists_the_widths() -> None:
    model, x = trained_cnn(), split()["test"][0]
    result = compile(model, x[:2], "fold-bn,quantize:bits=auto,target-size=0.1", calib_data=calibration())
    record = result.report.passes[1]
    widths = [d.details["bits"] for d in record.decisions if d.action == "quantized"]
    assert set(widths) <= {8, 4, 2} and len(set(widths)) > 1
    size = record.decisions[-1].details
    assert size["quantized_bytes"] <= 0.1 * size["fp32_bytes"] + 4 * 1000  # weights within budget (+ scales, biases)
    unreachable = compile(model, x[:2], "fold-bn,quantize:bits=auto,target-size=0.01", calib_data=calibration())
    assert "cannot be met" in unreachable.report.passes[1].warnings[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("quantize:bits=auto", "exactly one of target-size or target-macs-bits"),
     ("quantize:target-size=0.2", "a budget only with bits=auto"),
     ("quantize:bits=auto,target-size=2", "option 'target-size'")],
)
def test_mixed_precision_options_are_checked(spec: str, message: str) -> None:
    with pytest.raises(PassSpecError, match=message):
        parse_pipeline(spec)


class Attention(nn.Module):
    """Self-attention written with torch.matmul and the @ operator."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        scores = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) / 4, dim=-1)
        return self.out((scores @ self.v(x)).mean(1))


def test_matmul_inputs_get_quantize_dequantize(tmp_path: Path) -> None:
    model, x = Attention().eval(), torch.randn(8, 10, 16)
    result = compile(model, x[:2], "quantize:calib=minmax", calib_data=[x])
    targets = [d.target for d in result.report.passes[0].decisions]
    assert {"matmul input 0", "matmul input 1", "matmul_1 input 0", "matmul_1 input 1"} <= set(targets)
    assert result.report.output_error < 0.05 and result.report.after.uncounted == ()
    pytest.importorskip("onnxruntime")
    from slimfx.runtime import onnx as ort_tools

    path = result.export_onnx(tmp_path / "attention.onnx")
    kernels = ort_tools.kernel_census(path)
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= 5  # 3 linears + 2 matmuls
    assert "MatMul" not in kernels  # no float matmul left


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_parts_compute_what_multihead_attention_computes(batch_first: bool) -> None:
    from slimfx.quant.attention import AttentionParts

    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    with torch.no_grad():
        out, weights = mha(x, x, x)
        parts_out, parts_weights = AttentionParts(mha)(x, x, x)
    assert torch.allclose(out, parts_out, atol=1e-5) and torch.allclose(weights, parts_weights, atol=1e-6)


class SelfAttentionBlock(nn.Module):
    """A transformer block the way torchvision writes it: nn.MultiheadAttention called as a module."""

    def __init__(self, masked: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)
        self.register_buffer("mask", torch.zeros(12, 12, dtype=torch.bool) if masked else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        y, _ = self.attention(y, y, y, need_weights=False, attn_mask=self.mask)
        return self.head((x + y).mean(1))


def test_multihead_attention_is_opened_and_quantized(tmp_path: Path) -> None:
    model, x = SelfAttentionBlock().eval(), torch.randn(16, 12, 32)
    result = compile(model, x[:2], "quantize:calib=minmax", calib_data=list(x.split(4)))
    quantized = {d.target for d in result.report.passes[0].decisions if d.action == "quantized"}
    assert {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj", "matmul input 0", "matmul_1 input 1"} <= quantized
    assert not any(isinstance(m, nn.MultiheadAttention) for m in result.module.modules())
    with torch.no_grad():
        assert sqnr_db(model(x), result.module(x)) >= 30
    pytest.importorskip("onnxruntime")
    from slimfx.runtime import onnx as ort_tools

    kernels = ort_tools.kernel_census(result.export_onnx(tmp_path / "block.onnx"))
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= 6 and "MatMul" not in kernels


def test_masked_attention_is_declined_with_the_reason() -> None:
    model, x = SelfAttentionBlock(masked=True).eval(), torch.randn(8, 12, 32)
    result = compile(model, x[:2], "quantize:calib=minmax", calib_data=[x])
    declined = {d.target: d.reason for d in result.report.passes[0].decisions if d.action == "declined"}
    assert declined == {"attention": "attention left whole: called with a attn_mask (masks are not written out)"}


def test_quantize_folds_batchnorm_first_unless_told_not_to() -> None:
    model, x = trained_cnn(), split()["test"][0]
    folded = compile(model, x[:2], "quantize:calib=minmax", calib_data=calibration())
    kept = compile(model, x[:2], "quantize:calib=minmax,fold-bn=false", calib_data=calibration())
    def batchnorms(module: nn.Module) -> int:
        return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())

    assert batchnorms(folded.module) == 0 and batchnorms(kept.module) == 4
    reasons = [d.reason for d in folded.report.passes[0].decisions if d.action == "folded"]
    assert len(reasons) == 4 and all(r.endswith("(folded before quantizing)") for r in reasons)
    with torch.no_grad():
        assert sqnr_db(model(x), folded.module(x)) >= 30
