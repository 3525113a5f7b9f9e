"""slimfx int8 vs onnxruntime's quantize_static vs torch.ao FX post-training quantization.

    python benchmarks/quantize.py [--repeats 20] [--threads 2] [--calib 16]

Models: resnet18 and mobilenet_v2 (random init, 224x224; calibration and test inputs are
random) and the digits CNN of the tests (trained; accuracy on held-out digits). slimfx runs
twice: its ONNX in onnxruntime, and its graph lowered onto torch's int8 kernels (eager, like
torch.ao). For each tool: calibration/quantization time, latency of fp32 and int8 at batch 1 and 8 (each
onnxruntime session timed on its own: warm-up, then the median of repeated runs), output
SQNR against fp32, and the convs onnxruntime left in fp32. Peers come from the `bench` and
`onnx` extras; torch.ao is used while it still imports.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import slimfx
from slimfx.backends import onnx as ort_tools
from slimfx.backends.timing import module_latency_ms
from slimfx.metrics import sqnr_db

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from digits import split, trained_cnn  # noqa: E402


def calibration_reader(calib: list[torch.Tensor]):
    """onnxruntime's calibration-data interface over our input batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input_0": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.items, None)

    return Reader()


def ort_quantize_static(fp32_path: Path, out_path: Path, calib: list[torch.Tensor], method: str) -> float:
    """onnxruntime's recommended flow: its pre-processing (shape inference, graph optimization),
    then quantize_static with uint8 activations and per-channel int8 weights (QDQ)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    prepared = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(
        str(prepared),
        str(out_path),
        calibration_reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Entropy,
    )
    return time.perf_counter() - start


def ort_entropy_seconds(fp32_path: Path, calib: list[torch.Tensor], bins: int = 2048) -> float:
    """onnxruntime's entropy calibrator alone, at the same 2048 bins slimfx uses."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        create_calibrator,
    )

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        calibrator = create_calibrator(
            str(fp32_path),
            augmented_model_path=str(Path(folder) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": bins, "num_quantized_bins": 128},
        )
        calibrator.collect_data(calibration_reader(calib))
        calibrator.compute_data()
    return time.perf_counter() - start


def torch_ao(model: torch.nn.Module, example: torch.Tensor, calib: list[torch.Tensor]):
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError:
        return None, None
    start = time.perf_counter()
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        for x in calib:
            prepared(x)
    quantized = convert_fx(prepared)
    return quantized, time.perf_counter() - start


def ort_row(path: Path, test: torch.Tensor, reference: torch.Tensor, repeats: int, shape: tuple[int, ...]) -> dict:
    sess = ort_tools.session(path)
    (out,) = ort_tools.run(sess, [test])
    kernels = ort_tools.kernel_census(path)
    return {
        "b1": ort_tools.latency_ms(sess, [torch.randn(1, *shape)], repeats),
        "b8": ort_tools.latency_ms(sess, [torch.randn(8, *shape)], repeats),
        "sqnr": sqnr_db(reference, torch.from_numpy(out)),
        "out": torch.from_numpy(out),
        "fp32_convs": kernels.get("Conv", 0) + kernels.get("FusedConv", 0),
        "int8_convs": kernels.get("QLinearConv", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=16, help="calibration inputs for the torchvision models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    digits_split = split()
    cases = [
        (
            "resnet18",
            torchvision.models.resnet18(weights=None).eval(),
            (3, 224, 224),
            [torch.randn(1, 3, 224, 224) for _ in range(args.calib)],
            torch.randn(8, 3, 224, 224),
            None,
        ),
        (
            "mobilenet_v2",
            torchvision.models.mobilenet_v2(weights=None).eval(),
            (3, 224, 224),
            [torch.randn(1, 3, 224, 224) for _ in range(args.calib)],
            torch.randn(8, 3, 224, 224),
            None,
        ),
        (
            "digits CNN",
            trained_cnn(),
            (1, 8, 8),
            list(digits_split["calib"][0].split(100)),
            digits_split["test"][0],
            digits_split["test"][1],
        ),
    ]
    rows, calibration_times = [], []
    folder = Path(tempfile.mkdtemp())
    for name, model, shape, calib, test, labels in cases:
        with torch.no_grad():
            reference = model(test)
        fp32_path = ort_tools.export_onnx(model, [test[:1]], folder / f"{name}-fp32.onnx")
        base = ort_row(fp32_path, test, reference, args.repeats, shape)
        variants = {"onnxruntime fp32": (base, 0.0)}
        torch_rows: dict[str, tuple[torch.nn.Module, float]] = {}
        for calib_method in ("minmax", "entropy"):
            start = time.perf_counter()
            result = slimfx.compile(model, test[:1], f"fold-bn,quantize:calib={calib_method}", calib_data=calib)
            seconds = time.perf_counter() - start
            path = result.export_onnx(folder / f"{name}-slimfx-{calib_method}.onnx")
            variants[f"slimfx int8 ({calib_method})"] = (ort_row(path, test, reference, args.repeats, shape), seconds)
            torch_rows[calib_method] = (result.to_torch_int8().module, seconds)
            out_path = folder / f"{name}-ort-{calib_method}.onnx"
            seconds = ort_quantize_static(fp32_path, out_path, calib, calib_method)
            variants[f"ORT quantize_static ({calib_method})"] = (
                ort_row(out_path, test, reference, args.repeats, shape),
                seconds,
            )
        ao, ao_seconds = torch_ao(model, test[:1], calib)
        calibration_times.append(
            [name, f"{variants['slimfx int8 (entropy)'][1]:.2f}", f"{ort_entropy_seconds(fp32_path, calib):.2f}"]
        )
        for label, (row, seconds) in variants.items():
            accuracy = "" if labels is None else f"{float((row['out'].argmax(-1) == labels).float().mean()):.4f}"
            rows.append(
                [
                    name,
                    label,
                    f"{seconds:.2f}",
                    f"{row['b1']:.2f}",
                    f"{row['b8']:.2f}",
                    f"{base['b1'] / row['b1']:.2f}x",
                    f"{base['b8'] / row['b8']:.2f}x",
                    "-" if label.endswith("fp32") else f"{row['sqnr']:.1f}",
                    accuracy,
                    f"{row['int8_convs']} int8 / {row['fp32_convs']} fp32",
                ]
            )
        eager = {f"slimfx int8 ({method}, torch int8 kernels)": pair for method, pair in torch_rows.items()}
        if ao is not None:
            eager["torch.ao FX int8 (eager x86)"] = (ao, ao_seconds)
        for label, (module, seconds) in eager.items():
            with torch.no_grad():
                out = module(test)
            b1 = module_latency_ms(module, [torch.randn(1, *shape)], args.repeats)
            b8 = module_latency_ms(module, [torch.randn(8, *shape)], args.repeats)
            accuracy = "" if labels is None else f"{float((out.argmax(-1) == labels).float().mean()):.4f}"
            rows.append(
                [
                    name,
                    label,
                    f"{seconds:.2f}",
                    f"{b1:.2f}",
                    f"{b8:.2f}",
                    f"{base['b1'] / b1:.2f}x",
                    f"{base['b8'] / b8:.2f}x",
                    f"{sqnr_db(reference, out):.1f}",
                    accuracy,
                    "-",
                ]
            )
        print(f"done {name}", flush=True)
    print(
        f"\nlatency: median of {args.repeats} runs, {args.threads} threads, each session on its own; speedups are over "
        "onnxruntime fp32 (the fastest fp32 baseline here); SQNR of the outputs vs torch fp32 on the test inputs\n"
    )
    print(
        tabulate(
            rows,
            headers=[
                "model",
                "tool",
                "calib+quantize s",
                "batch 1 ms",
                "batch 8 ms",
                "speedup b1",
                "speedup b8",
                "SQNR dB",
                "digits accuracy",
                "convs in onnxruntime",
            ],
            tablefmt="github",
        )
    )
    print(
        "\nentropy calibration at 2048 bins, same inputs: slimfx's whole compile (fold-bn, calibration, quantization) "
        "vs onnxruntime's entropy calibrator alone\n"
    )
    print(
        tabulate(
            calibration_times, headers=["model", "slimfx compile s", "onnxruntime calibrator s"], tablefmt="github"
        )
    )


if __name__ == "__main__":
    main()
