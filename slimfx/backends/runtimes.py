"""The runtimes a compiled model deploys to, behind one interface.

A ``Runtime`` says whether it can run here (``unavailable``), which kind of graph it runs
(float, or slimfx's int8 graph) and where the original model is measured for comparison
(``float_flavour``); ``session`` builds a ``Session`` that runs the model, times it (warm-up,
then the median, the session on its own), says what it really ran, and saves a deployable
artifact. The ONNX-based runtimes share one export per model through a ``Workspace``.

| runtime | runs | artifact |
|---|---|---|
| ``torch`` | eager fp32 | slimfx model file |
| ``torch-bf16`` | eager, bf16 weights and activations (CPUs with bf16 kernels) | slimfx model file |
| ``torch-int8`` | slimfx's int8 graph on torch's int8 kernels | slimfx model file |
| ``onnxruntime`` | the ONNX export, fp32 | ``.onnx`` |
| ``onnxruntime-int8`` | the Q/DQ ONNX export on onnxruntime's int8 kernels | ``.onnx`` |
| ``openvino`` | the ONNX export at OpenVINO's default CPU precision (bf16 where the CPU has it) | ``.xml`` + ``.bin`` |
| ``openvino-int8`` | the Q/DQ ONNX export (signed grids as int8) on OpenVINO's u8/i8 kernels | ``.xml`` + ``.bin`` |
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from slimfx.backends.timing import module_latency_ms
from slimfx.errors import BackendError, InvalidArgumentError


class Workspace:
    """A temporary folder for one comparison, holding each model's ONNX export once."""

    def __init__(self, example_inputs: Sequence[torch.Tensor]):
        self.example_inputs = tuple(example_inputs)
        self._folder = tempfile.TemporaryDirectory(prefix="slimfx-runtimes-")
        self._exports: dict[int, tuple[nn.Module, Path]] = {}  # the module is kept: its id stays its own

    def onnx_file(self, module: nn.Module) -> Path:
        """``module`` exported to ONNX (batch dimension dynamic), once per module."""
        from slimfx.backends.onnx import export_onnx

        key = id(module)
        if key not in self._exports:
            path = Path(self._folder.name) / f"model-{len(self._exports)}.onnx"
            self._exports[key] = (module, export_onnx(module, self.example_inputs, path))
        return self._exports[key][1]

    def signed_int8_file(self, module: nn.Module) -> Path:
        """The ONNX export with its signed uint8 grids stored as int8 (``onnx_fold.signed_grids_as_int8``:
        the same numbers), the form OpenVINO runs fastest; once per module."""
        import onnx

        from slimfx.backends.onnx_fold import signed_grids_as_int8

        source = self.onnx_file(module)
        path = source.with_name(f"{source.stem}-signed-int8.onnx")
        if not path.exists():
            model = onnx.load(str(source))
            signed_grids_as_int8(model)
            onnx.save(model, str(path))
        return path

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session(ABC):
    """A model built for one runtime."""

    runtime: str

    @abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's (first) output on ``inputs``, as a float32 tensor."""

    @abstractmethod
    def latency_ms(self, inputs: Sequence[torch.Tensor], repeats: int) -> float:
        """Median latency on ``inputs`` over ``repeats`` runs after a warm-up."""

    @abstractmethod
    def precision(self) -> str:
        """The precision it ran in, said plainly: ``fp32``, ``bf16``, ``int8 (onednn)``, ..."""

    def kernels(self) -> dict[str, int]:
        """What the runtime really ran (kernel or layer type -> count), where it can say."""
        return {}

    @property
    @abstractmethod
    def artifact_suffix(self) -> str:
        """The file suffix ``save`` writes: ``.pt`` (slimfx format), ``.onnx`` or ``.xml``."""

    @abstractmethod
    def save(self, path: str | Path) -> list[Path]:
        """Write the deployable artifact; returns the files written."""


class Runtime(ABC):
    """One place a model can run; stateless, see ``RUNTIMES``."""

    name: ClassVar[str]
    float_flavour: ClassVar[str]  # the runtime the original (float) model is measured in
    runs_int8: ClassVar[bool]  # runs slimfx's quantized graph (True) or a float graph (False)
    summary: ClassVar[str]

    def unavailable(self) -> str | None:
        """Why this runtime cannot run on this machine (a missing package names its extra)."""
        return None

    @abstractmethod
    def session(self, module: nn.Module, workspace: Workspace) -> Session:
        """``module`` built for this runtime."""


# -- torch -------------------------------------------------------------------------------------
def _save_slimfx(module: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor]) -> list[Path]:
    from slimfx.files.model_format import save_module

    save_module(module, path, example_inputs)
    return [Path(path)]


class _TorchSession(Session):
    artifact_suffix = ".pt"

    def __init__(self, runtime: str, module: nn.Module, saved: nn.Module, example_inputs: Sequence[torch.Tensor]):
        self.runtime, self.module, self._saved, self._example = runtime, module.eval(), saved, tuple(example_inputs)

    def _prepare(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(inputs)

    def run(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return first_output(self.module(*self._prepare(inputs))).float()

    def latency_ms(self, inputs: Sequence[torch.Tensor], repeats: int) -> float:
        return module_latency_ms(self.module, self._prepare(inputs), repeats)

    def precision(self) -> str:
        return "fp32"

    def save(self, path: str | Path) -> list[Path]:
        return _save_slimfx(self._saved, path, self._example)


class _Bf16Session(_TorchSession):
    def _prepare(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs)

    def precision(self) -> str:
        return "bf16 (weights and activations)"


class _Int8Session(_TorchSession):
    def __init__(self, lowered: Any, saved: nn.Module, example_inputs: Sequence[torch.Tensor]):
        super().__init__("torch-int8", lowered.module, saved, example_inputs)
        self._lowered = lowered

    def precision(self) -> str:
        floats = f"; in float: {len(self._lowered.float_ops)} op(s)" if self._lowered.float_ops else ""
        layers = sum(
            v for k, v in self._lowered.kernels.items() if k.startswith(("quantized::conv", "quantized::linear"))
        )
        if not layers:
            return f"float: no int8 layers{floats}"
        return f"int8 ({layers} int8 layers, {self._lowered.engine}){floats}"

    def kernels(self) -> dict[str, int]:
        return dict(self._lowered.kernels)


class TorchEager(Runtime):
    name, float_flavour, runs_int8 = "torch", "torch", False
    summary = "torch eager, fp32"

    def session(self, module: nn.Module, workspace: Workspace) -> Session:
        return _TorchSession(self.name, module, module, workspace.example_inputs)


class TorchBf16(Runtime):
    name, float_flavour, runs_int8 = "torch-bf16", "torch", False
    summary = "torch eager with bf16 weights and activations"

    def unavailable(self) -> str | None:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "this CPU has no bf16 kernels for torch (oneDNN needs AVX-512 BF16 or AMX)"
        return None

    def session(self, module: nn.Module, workspace: Workspace) -> Session:
        return _Bf16Session(self.name, copy.deepcopy(module).to(torch.bfloat16), module, workspace.example_inputs)


class TorchInt8(Runtime):
    name, float_flavour, runs_int8 = "torch-int8", "torch", True
    summary = "slimfx's int8 graph lowered onto torch's int8 kernels"

    def unavailable(self) -> str | None:
        from slimfx.backends.torch_int8 import choose_engine

        if choose_engine(list(torch.backends.quantized.supported_engines)) is None:
            return "this torch build has no int8 CPU engine"
        return None

    def session(self, module: nn.Module, workspace: Workspace) -> Session:
        from slimfx.backends.torch_int8 import lower_int8_model

        return _Int8Session(lower_int8_model(module), module, workspace.example_inputs)


# -- ONNX files: onnxruntime and OpenVINO -------------------------------------------------------
def _missing(package: str, extra: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return f'{package} is not installed: pip install -e ".[{extra}]"'
    return None


class _OnnxRuntimeSession(Session):
    artifact_suffix = ".onnx"

    def __init__(self, runtime: str, path: Path):
        from slimfx.backends import onnx as ort_tools

        self.runtime, self._path, self._tools = runtime, path, ort_tools
        self._session = ort_tools.session(path)
        self._kernels: dict[str, int] | None = None  # onnxruntime's optimized graph, read once when asked

    def run(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(self._tools.run(self._session, inputs)[0]).float()

    def latency_ms(self, inputs: Sequence[torch.Tensor], repeats: int) -> float:
        return self._tools.latency_ms(self._session, inputs, repeats)

    def precision(self) -> str:
        kernels = self.kernels()
        int8 = sum(v for k, v in kernels.items() if k.startswith("QLinear") or k.endswith("Integer"))
        return f"int8 ({int8} int8 kernels)" if int8 else "fp32"

    def kernels(self) -> dict[str, int]:
        if self._kernels is None:
            self._kernels = self._tools.kernel_census(self._path)
        return dict(self._kernels)

    def save(self, path: str | Path) -> list[Path]:
        from slimfx.files.atomic import atomic_write

        data = self._path.read_bytes()
        atomic_write(path, lambda f: f.write(data))
        return [Path(path)]


class OnnxRuntime(Runtime):
    name, float_flavour, runs_int8 = "onnxruntime", "onnxruntime", False
    summary = "onnxruntime on the ONNX export, fp32"

    def unavailable(self) -> str | None:
        return _missing("onnxruntime", "onnx") or _missing("onnx", "onnx")

    def session(self, module: nn.Module, workspace: Workspace) -> Session:
        return _OnnxRuntimeSession(self.name, workspace.onnx_file(module))


class OnnxRuntimeInt8(OnnxRuntime):
    name, float_flavour, runs_int8 = "onnxruntime-int8", "onnxruntime", True
    summary = "onnxruntime on slimfx's Q/DQ ONNX export (int8 kernels)"


class _OpenVinoSession(Session):
    artifact_suffix = ".xml"

    def __init__(self, runtime: str, path: Path):
        from slimfx.backends.openvino import OpenVinoSession

        self.runtime, self._session = runtime, OpenVinoSession(path)

    def run(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self._session.run(inputs)[0].float()

    def latency_ms(self, inputs: Sequence[torch.Tensor], repeats: int) -> float:
        return self._session.latency_ms(inputs, repeats)

    def precision(self) -> str:
        kernels = self._session.kernels()
        low = sum(v for k, v in kernels.items() if k.endswith((" u8", " i8")))
        float_precision = self._session.precision
        if low:
            return f"int8 ({low} u8/i8 layers; the rest {float_precision})"
        return f"{float_precision} (OpenVINO's default for this CPU)"

    def kernels(self) -> dict[str, int]:
        return self._session.kernels()

    def save(self, path: str | Path) -> list[Path]:
        return self._session.save(path)


class OpenVino(Runtime):
    name, float_flavour, runs_int8 = "openvino", "openvino", False
    summary = "OpenVINO on the ONNX export, at its default CPU precision (bf16 where the CPU has it)"

    def unavailable(self) -> str | None:
        return _missing("openvino", "openvino") or _missing("onnx", "onnx")

    def session(self, module: nn.Module, workspace: Workspace) -> Session:
        return _OpenVinoSession(self.name, workspace.onnx_file(module))


class OpenVinoInt8(OpenVino):
    name, float_flavour, runs_int8 = "openvino-int8", "openvino", True
    summary = "OpenVINO on slimfx's Q/DQ ONNX export, signed grids as int8 (u8/i8 kernels)"

    def session(self, module: nn.Module, workspace: Workspace) -> Session:
        return _OpenVinoSession(self.name, workspace.signed_int8_file(module))


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (TorchEager(), TorchBf16(), TorchInt8(), OnnxRuntime(), OnnxRuntimeInt8(), OpenVino(), OpenVinoInt8())
}
AUTO = "auto"


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``, or an error listing the known ones."""
    if name not in RUNTIMES:
        import difflib

        close = difflib.get_close_matches(name, list(RUNTIMES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise InvalidArgumentError(
            f"unknown runtime {name!r}{hint} (known: {', '.join(RUNTIMES)}, or {AUTO} for every installed one)"
        )
    return RUNTIMES[name]


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtimes a comparison measures: the compiled model's, and the float ones the original runs in."""

    compiled: tuple[Runtime, ...]
    skipped: tuple[tuple[str, str], ...]  # (runtime, why it was not measured)

    @property
    def original(self) -> tuple[Runtime, ...]:
        names = dict.fromkeys(r.float_flavour for r in self.compiled)
        return tuple(RUNTIMES[n] for n in names)


def choose_runtimes(spec: str, quantized: bool) -> RuntimeChoice:
    """``spec`` (a runtime name or ``auto``) for a compiled model that is ``quantized`` or not.

    A named runtime that cannot run here, or that runs the other kind of graph, is an error
    (raised before any work when the caller checks first); ``auto`` takes every installed
    runtime of the right kind and lists the others with the reason."""
    if spec != AUTO:
        runtime = get_runtime(spec)
        _check_kind(runtime, quantized)
        why = runtime.unavailable()
        if why is not None:
            raise BackendError(f"runtime {runtime.name} cannot run here: {why}")
        return RuntimeChoice((runtime,), ())
    chosen, skipped = [], []
    for runtime in RUNTIMES.values():
        if runtime.runs_int8 != quantized:
            continue
        why = runtime.unavailable()
        if why is None:
            chosen.append(runtime)
        else:
            skipped.append((runtime.name, why))
    return RuntimeChoice(tuple(chosen), tuple(skipped))


def _check_kind(runtime: Runtime, quantized: bool) -> None:
    if runtime.runs_int8 and not quantized:
        raise InvalidArgumentError(
            f"runtime {runtime.name} runs quantized models: add 'quantize' to the passes, "
            f"or pick {runtime.float_flavour}"
        )
    if quantized and not runtime.runs_int8:
        int8 = next(r.name for r in RUNTIMES.values() if r.runs_int8 and r.float_flavour == runtime.float_flavour)
        raise InvalidArgumentError(
            f"runtime {runtime.name} runs float models and the passes quantize: pick {int8} "
            f"(or {AUTO}) to run the quantized model"
        )


def first_output(output: Any) -> torch.Tensor:
    """The first tensor of a model's output (models may return tuples)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output
