"""``slimfx.analyze`` and ``slimfx.compile``: capture -> PassManager -> reports."""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.ir.capture import LeafSpec, capture
from slimfx.ir.graph import Graph
from slimfx.ir.verify import compare_outputs
from slimfx.passes.base import Pass, PassContext
from slimfx.passes.manager import EXACT_TOLERANCE, PassManager
from slimfx.passes.registry import resolve_passes
from slimfx.report.analysis import CompileReport, Latency, Report
from slimfx.runtime.timing import baseline_name, module_latency_ms

Inputs = Sequence[torch.Tensor] | torch.Tensor


def _as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def analyze(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    name: str | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Report:
    """Capture ``model`` and report, node by node, where its MACs, params and bytes go."""
    graph = capture(model, _as_tuple(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args)
    return Report.from_graph(graph, name or type(model).__name__)


@dataclass
class CompileResult:
    """The compiled module, its graph and the report.

    ``module`` is the graph's runnable fx GraphModule, or, when ``add-exits`` ran, the
    ``EarlyExitModel`` built from it (``graph.module`` then holds the model without exits).
    """

    module: nn.Module
    graph: Graph
    report: CompileReport

    def export_onnx(self, path: str | Path) -> Path:
        """Write the compiled module as ONNX (QuantizeLinear/DequantizeLinear where quantized)."""
        from slimfx.runtime.onnx import export_onnx

        return export_onnx(self.module, self.graph.example_inputs, path)

    def measure_onnx(self, original: nn.Module, path: str | Path, repeats: int = 20) -> dict[str, Any]:
        """Export to ``path``, then time it and the original model (exported to a temporary
        file) in onnxruntime, each session on its own; adds the figures to the report."""
        import dataclasses
        import tempfile

        from slimfx.runtime import onnx as ort_tools

        self.export_onnx(path)
        inputs = self.graph.example_inputs
        with tempfile.TemporaryDirectory() as folder:
            fp32_path = ort_tools.export_onnx(original, inputs, Path(folder) / "fp32.onnx")
            fp32_ms = ort_tools.latency_ms(ort_tools.session(fp32_path), inputs, repeats)
        compiled_ms = ort_tools.latency_ms(ort_tools.session(path), inputs, repeats)
        batch = inputs[0].shape[0] if inputs[0].dim() else 1
        info = {
            "path": str(path), "fp32_ms": fp32_ms, "compiled_ms": compiled_ms, "speedup": fp32_ms / compiled_ms,
            "baseline": f"onnxruntime fp32, batch {batch}, {torch.get_num_threads()} threads",
            "kernels": ort_tools.kernel_census(path),
        }
        self.report = dataclasses.replace(self.report, onnx=info)
        return info

    def to_torch_int8(self) -> Any:
        """The quantized module lowered onto torch's int8 CPU kernels (``runtime.torch_int8.Lowered``:
        the module, the kernels it calls and what still runs in float)."""
        from slimfx.errors import SlimfxError
        from slimfx.runtime.torch_int8 import lower_int8

        if not isinstance(self.module, fx.GraphModule):
            raise SlimfxError(f"int8 lowering needs the graph module, not a {type(self.module).__name__}")
        return lower_int8(self.module)

    def save(self, path: str | Path) -> None:
        """Write the module in slimfx's safe format (``slimfx report PATH`` loads it back)."""
        from slimfx.errors import OutputError
        from slimfx.ir.serialize import save_module

        if not isinstance(self.module, fx.GraphModule):
            raise OutputError(f"saving a {type(self.module).__name__} is not supported yet; save result.graph.module "
                              "(the model without exits) or torch.save the module if you trust the file's readers")
        save_module(self.module, path, self.graph.example_inputs, model_name=self.report.before.model)


def compile(
    model: nn.Module,
    example_inputs: Inputs,
    passes: str | Sequence[Pass | str] = "fold-bn",
    *,
    calib_data: Iterable[Any] | None = None,
    seed: int = 0,
    name: str | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    tolerance: float = EXACT_TOLERANCE,
    latency_repeats: int = 0,
    progress: Any = None,
) -> CompileResult:
    """Run the ``passes`` pipeline on a copy of ``model``; the original is left untouched.

    ``passes`` is a spec string (``"fold-bn,prune-channels:ratio=0.5"``) or pass objects.
    With ``latency_repeats > 0`` the report includes measured eager latency before/after.
    """
    pipeline = resolve_passes(passes)
    manager = PassManager(pipeline, tolerance=tolerance)  # checks the order before any work
    inputs = _as_tuple(example_inputs)
    graph = capture(copy.deepcopy(model), inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    label = name or type(model).__name__
    before = Report.from_graph(graph, label)
    torch.manual_seed(seed)
    records = manager.run(graph, PassContext(calib_data=calib_data, seed=seed, progress=progress))
    after = Report.from_graph(graph, label)
    module, exits = _with_exits(graph)
    with torch.no_grad():
        error = compare_outputs(manager.outputs_before, [module(*inputs)]).relative_error if exits else \
            compare_outputs(manager.outputs_before, manager.outputs_after).relative_error
    quantized = any(r.name == "quantize" and r.changed for r in records)
    timed: nn.Module = module
    notes: tuple[str, ...] = ()
    if quantized and latency_repeats > 0:
        timed, notes = _int8_for_timing(module)
    latency = None
    if latency_repeats > 0:
        batches = _latency_batches(inputs, calib_data) if exits else [inputs]
        latency = Latency(
            sum(module_latency_ms(model, b, latency_repeats) for b in batches) / len(batches),
            sum(module_latency_ms(timed, b, latency_repeats) for b in batches) / len(batches),
            baseline_name(batches[0]) + (f", mean over {len(batches)} calibration batches" if exits else "")
            + ("; after: torch int8 kernels" if timed is not module else ""),
        )
    if exits:
        head_macs = sum(e.get("head_macs_per_sample", 0) for e in exits["exits"])
        notes += (f"the after totals count the model without its exit heads; the heads add {head_macs:,} MACs per "
                  "sample in all, included in the early-exit costs above",)
    report = CompileReport(before, after, tuple(records), error, latency, notes=notes, exits=exits)
    return CompileResult(module, graph, report)


def _int8_for_timing(module: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """What to time for a quantized graph: its lowering onto torch's int8 kernels (the fake-quant
    graph is a float simulation whose speed means nothing), and a note saying so."""
    from slimfx.errors import SlimfxError
    from slimfx.report.tables import counts_text
    from slimfx.runtime.early_exit import EarlyExitModel
    from slimfx.runtime.torch_int8 import lower_int8

    graphs = list(module.stages) if isinstance(module, EarlyExitModel) else [module]
    try:
        lowered = [lower_int8(g) for g in graphs]
    except SlimfxError as exc:
        return module, (f"the after latency is the fake-quant graph, a float simulation ({exc}); "
                        "pass --onnx OUT.onnx for int8 speed",)
    kernels: Counter[str] = sum((low.kernels for low in lowered), Counter())
    listed = counts_text(kernels)
    float_ops = [op for low in lowered for op in low.float_ops]
    floats = f"; in float: {'; '.join(float_ops)}" if float_ops else ""
    early_exit = isinstance(module, EarlyExitModel)
    where = " (each stage of the early-exit model; the exit heads run in float)" if early_exit else ""
    note = (f"after latency: the quantized graph lowered onto torch's int8 kernels{where} "
            f"(engine {lowered[0].engine}: {listed}){floats}")
    if early_exit:
        return EarlyExitModel([low.module for low in lowered], module.heads, module.thresholds), (note,)
    return lowered[0].module, (note,)


def _with_exits(graph: Graph) -> tuple[nn.Module, dict[str, Any] | None]:
    """The early-exit runtime when ``add-exits`` ran, else the graph's module."""
    from slimfx.passes.early_exit import PLAN_KEY
    from slimfx.runtime.early_exit import EarlyExitModel, split_at

    plan = graph.attachments.get(PLAN_KEY)
    if plan is None:
        return graph.module, None
    return EarlyExitModel(split_at(graph.module, plan.cuts), plan.heads, plan.thresholds), plan.to_dict()


def _latency_batches(inputs: tuple[torch.Tensor, ...], calib_data: Iterable[Any] | None, limit: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """Early exits pay off on real data: time them on (up to ``limit``) calibration batches."""
    batches = []
    for item in calib_data or ():
        batches.append((item[0] if isinstance(item, (tuple, list)) else item,))
        if len(batches) == limit:
            break
    return batches or [inputs]
