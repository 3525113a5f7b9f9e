"""``slimfx.analyze`` and ``slimfx.compile``: a straight list of stages, no pass named here.

compile: resolve the pipeline (requirements inserted, order and data needs checked) ->
capture -> count -> run the passes (each verified) -> count again -> report -> measure.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimfx.backends.compare import COMPILED, ORIGINAL, RuntimeComparison, compare_runtimes
from slimfx.backends.early_exit import EarlyExitModel
from slimfx.backends.profiler import check_prediction_runtime, predict_latency
from slimfx.backends.runtimes import RuntimeChoice, choose_runtimes, get_runtime
from slimfx.backends.timing import baseline_name, module_latency_ms, node_latency_ms
from slimfx.cost_model.counts import ensure_costs
from slimfx.cost_model.latency import FUSION_RULES, LatencyPrediction
from slimfx.data import Batch, batches, check_reusable
from slimfx.errors import BackendError, DataError, InvalidArgumentError
from slimfx.fidelity import DEFAULT_WARN_BELOW, choose_eval_set
from slimfx.ir.capture import LeafSpec, capture
from slimfx.ir.graph import Graph
from slimfx.passes.base import DataNeed, Pass, PassContext
from slimfx.passes.manager import EXACT_TOLERANCE, PassManager, check_data
from slimfx.passes.registry import resolve_passes
from slimfx.report.analysis import CompileReport, Int8Timing, Latency, OnnxMeasurement, Report, build_report
from slimfx.target.plan import Plan
from slimfx.target.reach import TargetRun
from slimfx.target.request import check_target_request

Inputs = Sequence[torch.Tensor] | torch.Tensor
LATENCY_BATCHES = 8  # calibration batches an early-exit model is timed on


def _as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def analyze(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    name: str | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    capture_fallback: bool = True,
    layer_timing: int = 0,
    runtime: str | None = None,
    profile: str | Path | None = None,
    progress: Any = None,
) -> Report:
    """Capture ``model`` and report, node by node, where its MACs, params and bytes go.

    With ``capture_fallback`` (the default), submodules torch.fx cannot trace are kept whole
    (opaque, listed in the report, their cost measured), and a model whose own code branches
    on its input's shape is traced at the example's shapes (``Report.fixed_shapes``). With
    ``layer_timing > 0`` each node's latency is measured too (torch eager, node by node, the
    median of that many runs).

    With ``runtime`` (``torch``, ``torch-int8``, ``onnxruntime``, ``onnxruntime-int8``) each node
    also gets its predicted latency on that runtime (``Report.prediction``), from ``profile`` (a
    file ``slimfx profile-device`` wrote) or the cached default profile of this machine, which is
    made on first use; the kernels of this model that the profile lacks are measured and kept."""
    if runtime is not None:
        check_prediction_runtime(runtime, profile)
    graph = capture(
        model,
        _as_tuple(example_inputs),
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        fallback=capture_fallback,
    )
    ensure_costs(graph)
    prediction = None
    if runtime is not None:
        _check_runtime_kind(runtime, graph)
        prediction = predict_latency(graph, runtime, profile, progress=progress)
    return _report(graph, name or type(model).__name__, layer_timing, prediction)


def _check_runtime_kind(runtime: str, graph: Graph) -> None:
    from slimfx.backends.torch_int8 import has_quantized_layers

    quantized = has_quantized_layers(graph.module)
    if get_runtime(runtime).runs_int8 and not quantized:
        raise InvalidArgumentError(
            f"runtime {runtime} runs quantized models and this one is float: report a model compiled with "
            f"quantize, or pick {get_runtime(runtime).float_flavour}"
        )
    if quantized and not get_runtime(runtime).runs_int8:
        raise InvalidArgumentError(
            f"runtime {runtime} runs float models and this one is quantized: pick an int8 runtime"
        )


def _report(graph: Graph, name: str, layer_timing: int, prediction: LatencyPrediction | None = None) -> Report:
    """The graph's report, with each node's measured eager latency when ``layer_timing > 0``
    and its predicted latency when there is a ``prediction``."""
    if layer_timing <= 0:
        return build_report(graph, name, prediction=prediction)
    from slimfx.backends.torch_int8 import has_quantized_layers

    if has_quantized_layers(graph.module):
        return build_report(graph, name, prediction=prediction)  # a fake-quant graph's eager time is a float simulation
    node_ms = node_latency_ms(graph.module, graph.example_inputs, layer_timing)
    timing = f"{baseline_name(graph.example_inputs)}, node by node, median of {layer_timing} runs"
    return build_report(graph, name, node_ms, timing, prediction)


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
        """Write the compiled module as ONNX (QuantizeLinear/DequantizeLinear where quantized).
        An early-exit model is written as parts beside a manifest, ``PATH`` with the suffix
        ``.exits.json`` (returned; ``slimfx.OnnxEarlyExit`` runs it)."""
        if isinstance(self.module, EarlyExitModel):
            from slimfx.backends.early_exit_onnx import EarlyExitFiles, export_early_exit_onnx

            files = EarlyExitFiles.beside(path, len(self.module.heads))
            return export_early_exit_onnx(self.module, self.graph.example_inputs, files, files).manifest
        from slimfx.backends.onnx import export_onnx

        return export_onnx(self.module, self.graph.example_inputs, path)

    def measure_onnx(
        self, original: nn.Module, path: str | Path, repeats: int = 20, named: str | Path | None = None
    ) -> OnnxMeasurement:
        """Export to ``path``, then time it and the original model (exported to a temporary
        file) in onnxruntime, each session on its own; adds the figures to the report, which
        names the file ``named`` (its final place, when ``path`` is staged) or ``path``."""
        import tempfile

        from slimfx.backends import onnx as ort_tools

        self.export_onnx(path)
        inputs = self.graph.example_inputs
        with tempfile.TemporaryDirectory() as folder:
            fp32_path = ort_tools.export_onnx(original, inputs, Path(folder) / "fp32.onnx")
            fp32_ms = ort_tools.latency_ms(ort_tools.session(fp32_path), inputs, repeats)
        compiled_ms = ort_tools.latency_ms(ort_tools.session(path), inputs, repeats)
        batch = inputs[0].shape[0] if inputs[0].dim() else 1
        baseline = f"onnxruntime fp32, batch {batch}, {torch.get_num_threads()} threads"
        measurement = OnnxMeasurement(
            str(named or path),
            Latency(fp32_ms, compiled_ms, baseline),
            ort_tools.kernel_census(path),
            ort_tools.trace_warnings(path),
        )
        self.report = replace(self.report, onnx=measurement)
        return measurement

    def save_runtime_artifact(self, runtime: str, path: str | Path) -> list[Path]:
        """Write the compiled model as ``runtime`` deploys it (``.onnx`` for onnxruntime, OpenVINO
        IR ``.xml`` + ``.bin`` for openvino, the slimfx format for the torch runtimes); returns the files."""
        from slimfx.backends.runtimes import Workspace, get_runtime

        with Workspace(self.graph.example_inputs) as workspace:
            return get_runtime(runtime).session(self.module, workspace).save(path)

    def to_torch_int8(self) -> Any:
        """The quantized module lowered onto torch's int8 CPU kernels (``backends.torch_int8.Lowered``:
        the module, the kernels it calls and what still runs in float)."""
        from slimfx.backends.torch_int8 import lower_int8_model

        return lower_int8_model(self.module)

    def save(self, path: str | Path) -> None:
        """Write the module (an early-exit model too) in slimfx's safe format
        (``slimfx.load_model(PATH)`` and ``slimfx report PATH`` load it back)."""
        from slimfx.files.model_format import save_module

        save_module(self.module, path, self.graph.example_inputs, model_name=self.report.before.model)


def compile(
    model: nn.Module,
    example_inputs: Inputs,
    passes: str | Sequence[Pass | str] | None = None,
    *,
    calib_data: Iterable[Any] | torch.Tensor | None = None,
    train_data: Iterable[Any] | torch.Tensor | None = None,
    eval_data: Iterable[Any] | torch.Tensor | None = None,
    seed: int = 0,
    name: str | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    tolerance: float = EXACT_TOLERANCE,
    latency_repeats: int = 0,
    progress: Any = None,
    allow_non_finite: bool = False,
    capture_fallback: bool = True,
    runtime: str | None = None,
    layer_timing: int = 0,
    profile: str | Path | None = None,
    warn_below: float = DEFAULT_WARN_BELOW,
    target: str | None = None,
    max_drop: float | None = None,
) -> CompileResult:
    """Run the ``passes`` pipeline on a copy of ``model``; the original is left untouched.

    ``passes`` is a spec string (``"fold-bn,prune-channels:ratio=0.5"``) or pass objects
    (default ``fold-bn``). ``target`` (``latency=0.5``, ``latency=8ms``, ``macs=0.3``,
    ``size=2MB``) plans the pipeline instead: channel widths per group and, on an int8
    runtime, int8 for the whole model (latency) or a weight width per layer (size), chosen by
    measured sensitivity on ``calib_data`` and predicted cost on ``runtime`` (one runtime),
    distillation when ``train_data`` is given, a latency target checked by measuring and
    re-planned when it misses by more than 10%, and, with ``max_drop`` (points of accuracy, or
    of top-1 agreement without labels), choices given back until the loss holds
    (``CompileReport.target`` says how).
    ``calib_data`` (a list of batches, ``(inputs, labels)`` pairs, a DataLoader or one tensor)
    feeds the passes that need data; ``train_data`` (same forms, labels used when present)
    feeds ``distill``. Every pass and the whole pipeline are scored against the original on
    ``eval_data`` (same forms; with labels, accuracy too), else on the last tenth of the
    calibration batches, held out from the passes (all of them when there are too few), else on
    the example inputs (``CompileReport.fidelity``, and each ``PassRecord.fidelity``); the
    report warns when top-1 agreement falls under ``warn_below`` or the output is destroyed.
    With ``latency_repeats > 0`` the report includes measured eager latency before/after.
    Outputs that hold inf or nan cannot be verified: that is an error naming the node where they
    first appear, or, with ``allow_non_finite``, a warning in the report's notes.

    ``runtime`` (``torch``, ``torch-bf16``, ``torch-int8``, ``onnxruntime``, ``onnxruntime-int8``,
    ``openvino``, ``openvino-int8``, or ``auto`` for every installed one) measures the compiled
    model there, and the original in that runtime's float flavour, side by side, with each
    session's output agreement with the original (``CompileReport.runtimes``; ``latency_repeats``
    runs each, 20 when 0), on the same evaluation set. ``layer_timing > 0``
    measures each node's eager latency before and after (not for a quantized graph, whose
    eager time is a float simulation). Where a chosen runtime has a latency model (``torch``,
    ``torch-int8``, ``onnxruntime``, ``onnxruntime-int8``) its rows also carry the latency predicted
    from ``profile`` (a ``slimfx profile-device`` file) or this machine's cached default profile.
    """
    inputs = _as_tuple(example_inputs)
    if not 0 <= warn_below <= 1:
        raise InvalidArgumentError(f"warn_below must be a top-1 agreement between 0 and 1, not {warn_below:g}")
    goal = check_target_request(target, passes, runtime, calib_data, max_drop)
    manager = PassManager(
        resolve_passes("fold-bn" if passes is None else passes), tolerance=tolerance, allow_non_finite=allow_non_finite
    )  # requirements and order, before any work
    check_data(manager.passes, calib_data, train_data)
    quantized = any(p.quantizes for p in manager.passes) if goal is None else get_runtime(runtime or "torch").runs_int8
    runtimes = None if runtime is None else choose_runtimes(runtime, quantized)
    predicted_on = _predicted_runtimes(runtimes)
    for name_ in predicted_on:
        check_prediction_runtime(name_, profile)
    for data, what in ((calib_data, "calib_data"), (train_data, "train_data"), (eval_data, "eval_data")):
        if data is not None:
            check_reusable(data, what)
            first = next(batches(data, inputs, what), None)  # a malformed first batch fails now, not after capture
            if what == "train_data":
                _check_labels(manager.passes, first)
    graph = capture(
        copy.deepcopy(model), inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, fallback=capture_fallback
    )
    label = name or type(model).__name__
    ensure_costs(graph)
    before = _report(graph, label, layer_timing)
    predicted = {
        (flavour, ORIGINAL): predict_latency(graph, flavour, profile, progress=progress).total_ms
        for flavour in dict.fromkeys(get_runtime(r).float_flavour for r in predicted_on)
    }
    torch.manual_seed(seed)
    fixed_rows = int(inputs[0].shape[0]) if graph.fixed_shapes and inputs[0].dim() else None
    if train_data is not None:  # every batch checked before any pass runs (calibration and evaluation: below)
        for _ in batches(train_data, inputs, "train_data", fixed_rows):
            pass
    evaluation, calibration = choose_eval_set(eval_data, calib_data, inputs, fixed_rows)
    context = PassContext(calibration, inputs, seed, progress, fixed_rows, train_data)
    target_report = None
    if goal is None:
        run = manager.run(graph, context, evaluation)
    else:
        outcome = TargetRun(
            graph,
            goal,
            runtime,
            context,
            evaluation,
            max_drop=max_drop,
            profile=None if profile is None else str(profile),
            make_manager=lambda chosen: PassManager(chosen, tolerance=tolerance, allow_non_finite=allow_non_finite),
        ).reach()
        run, graph, target_report = outcome.run, outcome.graph, outcome.report
    ensure_costs(graph)
    after = _report(graph, label, layer_timing)
    module = run.module
    latency, int8, notes = None, None, tuple(f"WARNING: {w}" for w in run.warnings)
    comparison = None
    if runtimes is not None:
        if run.exit_plan is None:
            ensure_costs(graph)
            for name_ in predicted_on:
                predicted[(name_, COMPILED)] = predict_latency(graph, name_, profile, progress=progress).total_ms
        comparison = compare_runtimes(
            model,
            module,
            runtimes,
            inputs,
            eval_inputs=[b.inputs for b in evaluation.batches],
            eval_labels=evaluation.labels,
            agreement_on=evaluation.describe(),
            repeats=latency_repeats or 20,
            progress=progress,
        ).with_predictions(predicted)
        latency = _headline(comparison)
    elif latency_repeats > 0:
        exit_data = calibration if run.exit_plan else None
        latency, int8 = _measure_latency(model, module, inputs, exit_data, latency_repeats, fixed_rows)
    if run.exit_plan is not None:
        notes += (
            f"the after totals count the model without its exit heads; the heads add "
            f"{run.exit_plan.head_macs_per_sample:,} MACs per sample in all, included in the early-exit costs above",
        )
    report = CompileReport(
        before,
        after,
        run.records,
        run.fidelity,
        latency,
        notes,
        run.exit_plan,
        torch_int8=int8,
        runtimes=comparison,
        warn_below=warn_below,
        target=target_report,
    )
    return CompileResult(module, graph, report)


def plan_target(
    model: nn.Module,
    example_inputs: Inputs,
    target: str,
    *,
    calib_data: Iterable[Any] | torch.Tensor,
    runtime: str | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    profile: str | Path | None = None,
    progress: Any = None,
    seed: int = 0,
) -> Plan:
    """The plan ``compile(target=...)`` would start from, without building the model: per group
    or layer the option chosen, its predicted saving and sensitivity, the predicted total, and
    the Pareto front (additive estimate against summed sensitivity at budgets from 0.9 to 0.1).
    A latency target times the original in the runtime first (float, and all int8 on an int8
    runtime): the predictions are anchored to those measurements."""
    inputs = _as_tuple(example_inputs)
    goal = check_target_request(target, None, runtime, calib_data, None)
    assert goal is not None
    check_reusable(calib_data, "calib_data")
    graph = capture(copy.deepcopy(model), inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    ensure_costs(graph)
    fixed_rows = int(inputs[0].shape[0]) if graph.fixed_shapes and inputs[0].dim() else None
    evaluation, calibration = choose_eval_set(None, calib_data, inputs, fixed_rows)
    context = PassContext(calibration, inputs, seed, progress, fixed_rows)
    planner = TargetRun(graph, goal, runtime, context, evaluation, profile=None if profile is None else str(profile))
    return planner.plan()


def _predicted_runtimes(runtimes: RuntimeChoice | None) -> tuple[str, ...]:
    """The chosen runtimes that have a latency model (and their float flavours have one too)."""
    if runtimes is None:
        return ()
    modelled = [r.name for r in runtimes.compiled if r.name in FUSION_RULES and r.float_flavour in FUSION_RULES]
    return tuple(modelled)


def _headline(comparison: RuntimeComparison) -> Latency | None:
    """The fastest compiled row against the original in that runtime's float flavour."""
    fastest = comparison.fastest
    flavour = comparison.float_flavour.get(fastest.runtime) if fastest else None
    original = comparison.row(flavour, ORIGINAL) if flavour else None
    if fastest is None or original is None or fastest.latency_ms is None or original.latency_ms is None:
        return None
    baseline = (
        f"original in {flavour}, compiled in {fastest.runtime}, batch {comparison.batch}, {comparison.threads} threads"
    )
    return Latency(original.latency_ms, fastest.latency_ms, baseline)


def _check_labels(passes: Sequence[Pass], first: Batch | None) -> None:
    """A pass that trains from labels, on training data whose first batch has none: an error now."""
    for p in passes:
        if p.data_need() is DataNeed.TRAINING_LABELLED and first is not None and first.labels is None:
            raise DataError(f"pass '{p.spec()}' trains from labels: give train_data as (inputs, labels) batches")


def _measure_latency(
    original: nn.Module,
    compiled: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    calib_data: Iterable[Any] | None,
    repeats: int,
    fixed_rows: int | None = None,
) -> tuple[Latency, Int8Timing | None]:
    """Eager latency before and after; an early-exit model is timed on calibration batches
    (exits pay off on real data), a quantized one lowered onto torch's int8 kernels (the
    fake-quant graph is a float simulation whose speed means nothing)."""
    from slimfx.backends.torch_int8 import has_quantized_layers, lower_int8_model

    timed, int8 = compiled, None
    if has_quantized_layers(compiled):
        early_exit = isinstance(compiled, EarlyExitModel)
        try:
            lowered = lower_int8_model(compiled)
        except BackendError as exc:
            int8 = Int8Timing(None, {}, (), early_exit, str(exc))
        else:
            timed = lowered.module
            int8 = Int8Timing(lowered.engine, dict(lowered.kernels), tuple(lowered.float_ops), early_exit)
    measured = [inputs]
    if calib_data is not None:
        measured = [
            b.inputs for _, b in zip(range(LATENCY_BATCHES), batches(calib_data, inputs, fixed_rows=fixed_rows))
        ] or [inputs]
    before = sum(module_latency_ms(original, b, repeats) for b in measured) / len(measured)
    after = sum(module_latency_ms(timed, b, repeats) for b in measured) / len(measured)
    baseline = baseline_name(measured[0])
    if calib_data is not None:
        baseline += f", mean over {len(measured)} calibration batches"
    if timed is not compiled:
        baseline += "; after: torch int8 kernels"
    return Latency(before, after, baseline), int8
