"""``slimfx.analyze`` and ``slimfx.compile``: capture -> PassManager -> reports."""
from __future__ import annotations

import copy
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
    """The compiled module (a runnable fx GraphModule), its graph and the report."""

    module: fx.GraphModule
    graph: Graph
    report: CompileReport

    def save(self, path: str | Path) -> None:
        """Write the module in slimfx's safe format (``slimfx report PATH`` loads it back)."""
        from slimfx.ir.serialize import save_module

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
    error = compare_outputs(manager.outputs_before, manager.outputs_after).relative_error
    latency = None
    if latency_repeats > 0:
        latency = Latency(
            module_latency_ms(model, inputs, latency_repeats),
            module_latency_ms(graph.module, inputs, latency_repeats),
            baseline_name(inputs),
        )
    report = CompileReport(before, after, tuple(records), error, latency)
    return CompileResult(graph.module, graph, report)
