"""ONNX export (QuantizeLinear/DequantizeLinear for quantized graphs) and onnxruntime sessions.

Needs the optional ``onnx`` extra (``pip install -e ".[onnx]"``). A float model is exported
with torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9).
A quantized graph is exported with the TorchScript-based exporter (``dynamo=False``), the
documented fallback: ``torch.export`` cannot trace the core fake-quant ops in torch 2.14,
while the TorchScript exporter maps them onto ONNX QuantizeLinear/DequantizeLinear pairs,
which onnxruntime fuses into int8 kernels. The fallback also takes a float model that
``torch.export`` cannot trace; the file's metadata (``slimfx.exporter``) says which one wrote it. The
fallback's deprecation notice is silenced (slimfx chose it knowingly), and so is the log dump
torch.export writes when it gives up (the fallback follows). What the tracer warns about a
value it had to take as a constant (a branch on a tensor: one side baked into the file) is
kept in the file's metadata (``slimfx.trace_warnings``, read by ``trace_warnings``) and
reported as a warning.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimfx.backends.onnx_fold import fold_constant_quantization
from slimfx.backends.timing import median_ms
from slimfx.backends.torch_int8 import has_quantized_layers
from slimfx.errors import BackendError
from slimfx.files.atomic import atomic_write

OPSET = 17  # the TorchScript exporter's
DYNAMO_OPSET = 18  # the torch.export-based exporter's lowest
DYNAMO, TORCHSCRIPT = "torch.export", "TorchScript (fallback)"
EXPORTER_KEY = "slimfx.exporter"  # metadata entry naming the exporter that wrote the file
TRACE_WARNINGS_KEY = "slimfx.trace_warnings"  # the tracer's warnings about values it took as constants
# what the TorchScript exporter says about itself; nothing else is silenced
_FALLBACK_NOTICES = (r".*legacy TorchScript-based ONNX export.*", r"The feature will be removed.*")


def _require() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise BackendError('ONNX export needs onnx and onnxruntime: pip install -e ".[onnx]"') from None
    return onnx, onnxruntime


def export_onnx(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | Path, exporter: str = DYNAMO
) -> Path:
    """Write ``module`` as ONNX (batch dimension dynamic; quantized weights stored as int8,
    see ``onnx_fold``); atomic: no partial file on failure. Float models go through the
    ``torch.export`` exporter unless ``exporter`` is ``TORCHSCRIPT`` (many times faster to
    export; the profiler's one-layer probes use it)."""
    onnx, _ = _require()
    path = Path(path)
    model = None
    if exporter == DYNAMO and not has_quantized_layers(module) and _has_onnxscript():
        with contextlib.suppress(Exception):  # not traceable by torch.export: the fallback below
            model = _export_dynamo(module, tuple(example_inputs))
    baked: list[str] = []
    try:
        if model is None:
            with _trace_warnings_kept(baked):
                model = onnx.load_from_string(_export_torchscript(module, tuple(example_inputs)))
            exporter = TORCHSCRIPT
        fold_constant_quantization(model)
        props = {p.key: p.value for p in model.metadata_props} | {EXPORTER_KEY: exporter}
        if baked:
            props[TRACE_WARNINGS_KEY] = "\n".join(baked)
        onnx.helper.set_model_props(model, props)
    except Exception as exc:
        raise BackendError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    atomic_write(path, lambda f: f.write(model.SerializeToString()))
    return path


def _names(inputs: Sequence[torch.Tensor]) -> list[str]:
    return [f"input_{i}" for i in range(len(inputs))]


def _export_dynamo(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """torch.export's ONNX, its progress lines and failure dumps held back; the Python warnings
    of an export that succeeds are given to the user afterwards."""
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} if x.dim() else {} for x in inputs)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with torch.no_grad(), quiet[0], quiet[1], _torch_logs_silenced():
            program = _dynamo_program(module, inputs, shapes)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return program.model_proto


def _dynamo_program(module: nn.Module, inputs: tuple[torch.Tensor, ...], shapes: tuple[dict, ...]) -> Any:
    return torch.onnx.export(
        module.eval(),
        inputs,
        dynamo=True,
        opset_version=DYNAMO_OPSET,
        input_names=_names(inputs),
        output_names=["output"],
        dynamic_shapes=shapes,
        verbose=False,
    )


def _export_torchscript(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    names = _names(inputs)
    buffer = io.BytesIO()
    with _fallback_notices_silenced(), torch.no_grad():
        torch.onnx.export(
            module.eval(),
            inputs,
            buffer,
            opset_version=OPSET,
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}},
        )
    return buffer.getvalue()


@contextlib.contextmanager
def _fallback_notices_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        for notice in _FALLBACK_NOTICES:
            warnings.filterwarnings("ignore", message=notice, category=DeprecationWarning)
        yield


@contextlib.contextmanager
def _torch_logs_silenced() -> Iterator[None]:
    """Below ERROR, no log record while torch.export tries: when it gives up it logs the graph
    it was tracing, page after page, and the TorchScript fallback takes over anyway."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _trace_warnings_kept(found: list[str]) -> Iterator[None]:
    """Collect (instead of printing) the tracer's warnings about values it took as constants,
    as ``file:line: what`` lines, once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        yield
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            line = f"{Path(w.filename).name}:{w.lineno}: {str(w.message).split('. ')[0]}"
            if line not in found:
                found.append(line)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def trace_warnings(path: str | Path) -> tuple[str, ...]:
    """The tracer's warnings an exported file carries (a branch baked in), one per line."""
    onnx, _ = _require()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    text = props.get(TRACE_WARNINGS_KEY, "")
    return tuple(text.splitlines()) if text else ()


def baked_branch_warning(path: str | Path, trace_warning: str) -> str:
    """What a tracer warning in an exported file means for its user."""
    return (
        f"{path} holds one side of a branch on a tensor value ({trace_warning}): the file computes what the "
        "example inputs took, for every input; keep such code out of the exported model or check it on real data"
    )


def _has_onnxscript() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxscript") is not None


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
