"""OpenVINO sessions: read an ONNX file slimfx exported, compile it for the CPU, time it, list
what ran, save OpenVINO IR.

Needs the optional ``openvino`` extra (``pip install -e ".[openvino]"``). slimfx's Q/DQ ONNX
files are read as they are: OpenVINO turns each QuantizeLinear/DequantizeLinear pair into a
FakeQuantize and runs the convolutions between them on u8/i8 kernels. A float model runs at
OpenVINO's default inference precision for the CPU, which is bf16 on CPUs with bf16 kernels
(AMX, AVX-512 BF16) and f32 elsewhere; ``precision`` says which one ran.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slimfx.backends.timing import median_ms
from slimfx.errors import BackendError
from slimfx.files.atomic import atomic_write

_SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_NOT_KERNELS = frozenset({"Const", "Input", "Parameter", "Output", "Result"})


def require() -> Any:
    """The ``openvino`` package, or a clear error naming the extra that installs it."""
    try:
        import openvino
    except ImportError:
        raise BackendError('the openvino runtime is not installed: pip install -e ".[openvino]"') from None
    return openvino


class OpenVinoSession:
    """One compiled OpenVINO model on the CPU (``threads`` inference threads, latency hint)."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None, precision: str | None = None):
        ov = require()
        self._core = ov.Core()
        self.model = self._core.read_model(str(onnx_path))
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        try:
            self.compiled = self._core.compile_model(self.model, "CPU", config)
        except RuntimeError as exc:
            raise BackendError(f"OpenVINO could not compile {onnx_path}: {str(exc).splitlines()[0]}") from exc
        self._request = self.compiled.create_infer_request()

    @property
    def precision(self) -> str:
        """The inference precision OpenVINO chose for float ops (``f32``, ``bf16``, ``f16``)."""
        name = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).removeprefix("<Type: '").rstrip("'>")
        return _SHORT_NAMES.get(name, name)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        results = self._request.infer([x.detach().numpy() for x in inputs])
        return [torch.from_numpy(results[output].copy()) for output in self.compiled.outputs]

    def latency_ms(self, inputs: Sequence[torch.Tensor], repeats: int) -> float:
        feed = [x.detach().numpy() for x in inputs]
        return median_ms(lambda: self._request.infer(feed), repeats, warmup=3)

    def kernels(self) -> dict[str, int]:
        """``"Convolution u8" -> 20``: the layers OpenVINO's runtime model runs, with the precision
        each one really ran in (constants, inputs and outputs left out)."""
        counts: collections.Counter[str] = collections.Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer = info["layerType"].astype(str)
            if layer not in _NOT_KERNELS:
                counts[f"{layer} {info['runtimePrecision'].astype(str)}"] += 1
        return dict(counts)

    def save(self, path: str | Path) -> list[Path]:
        """Write OpenVINO IR: ``path`` (``.xml``) and the weights beside it (``.bin``), each all or nothing."""
        ov = require()
        xml = Path(path)
        if xml.suffix != ".xml":
            raise BackendError(f"OpenVINO IR is written as NAME.xml (and NAME.bin beside it), not {xml.name}")
        import tempfile

        with tempfile.TemporaryDirectory(dir=xml.parent) as folder:
            staged = Path(folder) / xml.name
            ov.save_model(self.model, str(staged), compress_to_fp16=False)
            binary = xml.with_suffix(".bin")
            atomic_write(binary, lambda f: f.write(staged.with_suffix(".bin").read_bytes()))
            atomic_write(xml, lambda f: f.write(staged.read_bytes()))
        return [xml, binary]
