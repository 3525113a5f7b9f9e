"""ONNX export (QuantizeLinear/DequantizeLinear for quantized graphs) and onnxruntime sessions.

Needs the optional ``onnx`` extra (``pip install -e ".[onnx]"``). Export uses torch's
TorchScript-based exporter (``dynamo=False``): it maps the core fake-quant ops onto ONNX
QuantizeLinear/DequantizeLinear pairs, which onnxruntime fuses into int8 kernels, without the
extra ``onnxscript`` dependency the newer exporter needs.
"""

from __future__ import annotations

import collections
import io
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimfx.backends.onnx_fold import fold_constant_quantization
from slimfx.backends.timing import median_ms
from slimfx.errors import BackendError
from slimfx.files.atomic import atomic_write

OPSET = 17


def _require() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise BackendError('ONNX export needs onnx and onnxruntime: pip install -e ".[onnx]"') from None
    return onnx, onnxruntime


def export_onnx(module: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | Path) -> Path:
    """Write ``module`` as ONNX (batch dimension dynamic; quantized weights stored as int8,
    see ``onnx_fold``); atomic: no partial file on failure."""
    onnx, _ = _require()
    path = Path(path)
    names = [f"input_{i}" for i in range(len(example_inputs))]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                tuple(example_inputs),
                buffer,
                opset_version=OPSET,
                dynamo=False,
                input_names=names,
                output_names=["output"],
                dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}},
            )
        model = onnx.load_from_string(buffer.getvalue())
        fold_constant_quantization(model)
    except Exception as exc:
        raise BackendError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    atomic_write(path, lambda f: f.write(model.SerializeToString()))
    return path


def session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads; torch's count by default)."""
    _, ort = _require()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no notes about hardware-specific optimized files
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, inputs: Sequence[torch.Tensor]) -> list[Any]:
    feed = {i.name: x.detach().numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)


def latency_ms(sess: Any, inputs: Sequence[torch.Tensor], repeats: int = 20) -> float:
    """Median latency of one session on its own (warm-up first, never interleaved)."""
    feed = {i.name: x.detach().numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return median_ms(lambda: sess.run(None, feed), repeats, warmup=3)


def kernel_census(path: str | Path) -> dict[str, int]:
    """Op types onnxruntime actually runs after its graph optimizations (QLinearConv, Conv, ...)."""
    onnx, _ = _require()
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        session(path, optimized_path=optimized)
        graph = onnx.load(str(optimized)).graph
    return dict(collections.Counter(node.op_type for node in graph.node))
