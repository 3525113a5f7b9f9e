"""Reports as data: per-node rows, totals and uncounted ops; compile before/after.

Reports read what the analyses left on the graph (shapes and costs must be current: the API
runs ``ensure_costs`` first); they compute nothing themselves. ``to_dict`` gives the stable
JSON schema documented in docs/report-schema.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from slimfx.backends.compare import COMPILED, RuntimeComparison
from slimfx.backends.onnx import baked_branch_warning
from slimfx.cost_model.counts import sum_costs
from slimfx.cost_model.latency import LatencyPrediction
from slimfx.errors import RewriteError
from slimfx.exits.plan import ExitPlan
from slimfx.fidelity import DEFAULT_WARN_BELOW, Fidelity
from slimfx.ir.graph import Graph
from slimfx.ir.meta import Cost
from slimfx.passes.manager import PassRecord
from slimfx.target.reach import TargetReport

REPORT_SCHEMA = "slimfx.report/1"
COMPILE_SCHEMA = "slimfx.compile/1"
UNITS = {
    "macs": "multiply-accumulates (FLOPs = 2 x MACs)",
    "elem_ops": "element operations of normalization, pooling, elementwise and activation ops",
    "params": "parameter elements",
    "bytes_read": "bytes (activations and weights read)",
    "bytes_written": "bytes (activations written)",
    "latency_ms": "milliseconds, median of repeated runs",
    "predicted_ms": "milliseconds, predicted from the device profile (see prediction)",
}


@dataclass(frozen=True)
class NodeRow:
    """One node of the graph as reports show it; ``kind`` is the module type or function,
    ``module`` the module path of a call_module node."""

    name: str
    op: str
    kind: str
    module: str | None
    inputs: tuple[str, ...]
    out_shape: tuple[int, ...] | None
    cost: Cost
    share: float
    rule: str
    counted: bool
    provenance: str | None
    latency_ms: float | None = None  # measured, node by node (see Report.timing); None when not measured
    family: str = ""  # what --by module-type groups by: the kind, with convs split into dense, grouped, depthwise
    predicted_ms: float | None = None  # predicted on Report.prediction's runtime (0 when fused into another node)
    fused_into: str | None = None  # the node whose kernel this one runs inside, on that runtime

    @property
    def label(self) -> str:
        """``Conv2d (layer1.0.conv1)`` for a module call, the function or method otherwise."""
        return f"{self.kind} ({self.module})" if self.module is not None else self.kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "kind": self.label,
            "module": self.module,
            "inputs": list(self.inputs),
            "out_shape": list(self.out_shape) if self.out_shape is not None else None,
            "macs": self.cost.macs,
            "elem_ops": self.cost.elem_ops,
            "params": self.cost.params,
            "bytes_read": self.cost.bytes_read,
            "bytes_written": self.cost.bytes_written,
            "share": self.share,
            "rule": self.rule,
            "provenance": self.provenance,
            "latency_ms": self.latency_ms,
            "family": self.family or self.kind,
            "predicted_ms": self.predicted_ms,
            "fused_into": self.fused_into,
        }


@dataclass(frozen=True)
class KindRow:
    """Every node of one module type or function, added up."""

    kind: str
    count: int
    cost: Cost
    share: float
    predicted_ms: float | None = None


@dataclass(frozen=True)
class PredictionSummary:
    """Where a report's predicted milliseconds come from, and their totals."""

    runtime: str
    batch: int
    threads: int
    profile: str | None
    kernels_ms: float  # the kernels' predictions added up
    overhead_ms: float  # the runtime's measured per-call overhead
    sources: Mapping[str, int]  # kernels priced from each source: table, sweep, scaled, roofline, free

    @property
    def total_ms(self) -> float:
        return self.kernels_ms + self.overhead_ms

    @staticmethod
    def of(prediction: LatencyPrediction) -> PredictionSummary:
        return PredictionSummary(
            prediction.runtime,
            prediction.batch,
            prediction.threads,
            prediction.profile,
            prediction.kernels_ms,
            prediction.overhead_ms,
            prediction.source_counts(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "batch": self.batch,
            "threads": self.threads,
            "profile": self.profile,
            "kernels_ms": self.kernels_ms,
            "overhead_ms": self.overhead_ms,
            "total_ms": self.total_ms,
            "sources": dict(self.sources),
        }

    def describe(self) -> str:
        sources = ", ".join(f"{n} by {s}" for s, n in sorted(self.sources.items(), key=lambda kv: -kv[1]))
        profile = f", profile {self.profile}" if self.profile else ""
        return (
            f"predicted on {self.runtime}: {self.total_ms:.3f} ms (kernels {self.kernels_ms:.3f} ms + per call "
            f"{self.overhead_ms:.3f} ms), batch {self.batch}, {self.threads} threads; kernels priced {sources}{profile}"
        )


@dataclass(frozen=True)
class Report:
    """Where a graph's cost goes, node by node."""

    model: str
    input_shapes: tuple[tuple[int, ...], ...]
    nodes: tuple[NodeRow, ...]
    totals: Cost
    opaque: tuple[str, ...] = ()  # modules kept whole at capture: cost measured, left alone by every pass
    fixed_shapes: bool = False  # traced at the example input shapes (the model branches on shapes)
    taken_layers: tuple[str, ...] = ()  # functional calls capture replaced by the layers they stand for
    timing: str | None = None  # how the nodes' latency_ms was measured; None: not measured
    prediction: PredictionSummary | None = None  # the nodes' predicted_ms: runtime, batch, threads, profile

    def __str__(self) -> str:
        """The readable table ``slimfx report`` prints."""
        from slimfx.report.tables import render_report

        return render_report(self)

    def time_share(self, predicted_ms: float | None) -> float | None:
        """A predicted time's share of the kernels' predicted total."""
        if self.prediction is None or predicted_ms is None or self.prediction.kernels_ms <= 0:
            return None
        return predicted_ms / self.prediction.kernels_ms

    @property
    def latency_ms(self) -> float | None:
        """The nodes' measured latency added up (None when not measured)."""
        if self.timing is None:
            return None
        return sum(row.latency_ms or 0.0 for row in self.nodes)

    @property
    def uncounted(self) -> tuple[NodeRow, ...]:
        return tuple(row for row in self.nodes if not row.counted)

    def top(self, n: int | None) -> list[NodeRow]:
        """The ``n`` nodes with most predicted time when there is a prediction, else with most
        MACs (then element ops); every node in graph order when ``n`` is None."""
        if n is None:
            return list(self.nodes)
        if self.prediction is not None:
            return sorted(self.nodes, key=lambda r: r.predicted_ms or 0.0, reverse=True)[:n]
        ranked = sorted(self.nodes, key=lambda r: (r.cost.macs, r.cost.elem_ops, r.cost.bytes_written), reverse=True)
        return ranked[:n]

    @property
    def ranked_by(self) -> str:
        """What ``top`` and ``by_kind`` rank by."""
        return "predicted time" if self.prediction is not None else "MACs"

    def by_kind(self) -> list[KindRow]:
        """Rows aggregated by module type or function, most MACs first."""
        counts: dict[str, int] = {}
        costs: dict[str, Cost] = {}
        times: dict[str, float] = {}
        for row in self.nodes:
            family = row.family or row.kind
            counts[family] = counts.get(family, 0) + 1
            costs[family] = costs.get(family, Cost()) + row.cost
            times[family] = times.get(family, 0.0) + (row.predicted_ms or 0.0)
        predicted = self.prediction is not None
        rows = [
            KindRow(
                kind,
                counts[kind],
                cost,
                cost.macs / self.totals.macs if self.totals.macs else 0.0,
                times[kind] if predicted else None,
            )
            for kind, cost in costs.items()
        ]
        if predicted:
            return sorted(rows, key=lambda r: r.predicted_ms or 0.0, reverse=True)
        return sorted(rows, key=lambda r: (r.cost.macs, r.cost.elem_ops), reverse=True)

    def top_share(self, n: int) -> float:
        """The share of all MACs (of predicted time, when predicted) that ``top(n)`` holds."""
        if self.prediction is not None:
            return sum(self.time_share(row.predicted_ms) or 0.0 for row in self.top(n))
        return sum(row.cost.macs for row in self.top(n)) / self.totals.macs if self.totals.macs else 0.0

    def to_dict(self, top: int | None = None, by: str = "node") -> dict[str, Any]:
        groups = None
        if by == "module-type":
            kinds = self.by_kind()[:top] if top else self.by_kind()
            groups = [
                {
                    "family": g.kind,
                    "nodes": g.count,
                    "macs": g.cost.macs,
                    "elem_ops": g.cost.elem_ops,
                    "params": g.cost.params,
                    "share": g.share,
                    "predicted_ms": g.predicted_ms,
                    "time_share": self.time_share(g.predicted_ms),
                }
                for g in kinds
            ]
        return {
            "schema": REPORT_SCHEMA,
            "by": by,
            "groups": groups,
            "model": self.model,
            "input_shapes": [list(s) for s in self.input_shapes],
            "units": UNITS,
            "totals": {
                **self.totals.totals(),
                "latency_ms": self.latency_ms,
                "predicted_ms": self.prediction.total_ms if self.prediction else None,
            },
            "timing": self.timing,
            "prediction": self.prediction.to_dict() if self.prediction else None,
            "nodes": [{**row.to_dict(), "time_share": self.time_share(row.predicted_ms)} for row in self.top(top)],
            "uncounted": [{"name": r.name, "kind": r.label, "reason": r.rule} for r in self.uncounted],
            "opaque": list(self.opaque),
            "fixed_shapes": self.fixed_shapes,
            "taken_layers": list(self.taken_layers),
        }


def build_report(
    graph: Graph,
    model: str = "model",
    node_ms: Mapping[str, float] | None = None,
    timing: str | None = None,
    prediction: LatencyPrediction | None = None,
) -> Report:
    """The report of ``graph``, read from its current cost annotations; ``node_ms`` (node name
    -> measured ms, described by ``timing``) adds each node's latency, ``prediction`` each
    node's predicted latency on a runtime."""
    predicted = prediction.node_ms() if prediction is not None else {}
    fused = prediction.fused_into() if prediction is not None else {}
    if not graph.is_current("costs"):
        raise RewriteError("the graph's costs are stale; run cost_model.counts.ensure_costs(graph) before reporting")
    totals = sum_costs(graph)
    rows = []
    for node in graph.nodes():
        info = graph.info(node)
        rows.append(
            NodeRow(
                name=node.name,
                op=node.op,
                kind=info.kind,
                module=str(node.target) if node.op == "call_module" else None,
                inputs=tuple(n.name for n in node.all_input_nodes),
                out_shape=info.out_shape,
                cost=info.cost.cost,
                share=info.cost.cost.macs / totals.macs if totals.macs else 0.0,
                rule=info.cost.rule,
                counted=info.cost.counted,
                provenance=info.provenance,
                latency_ms=None if node_ms is None else node_ms.get(node.name),
                family=_family(graph, node, info.kind),
                predicted_ms=predicted.get(node.name, 0.0) if prediction is not None else None,
                fused_into=fused.get(node.name),
            )
        )
    shapes = tuple(tuple(t.shape) for t in graph.example_inputs)
    taken = tuple(str(t) for t in graph.taken_layers)
    return Report(
        model,
        shapes,
        tuple(rows),
        totals,
        tuple(sorted(graph.opaque)),
        graph.fixed_shapes,
        taken,
        timing if node_ms is not None else None,
        PredictionSummary.of(prediction) if prediction is not None else None,
    )


def _family(graph: Graph, node: Any, kind: str) -> str:
    """``Conv2d`` for a dense conv, ``Conv2d (depthwise)`` when each output channel reads one
    input channel, ``Conv2d (grouped)`` for other group counts; the kind for everything else."""
    if node.op != "call_module":
        return kind
    module = graph.submodule(node)
    groups = getattr(module, "groups", 1)
    if not isinstance(groups, int) or groups == 1 or not hasattr(module, "in_channels"):
        return kind
    return f"{kind} (depthwise)" if groups == module.in_channels else f"{kind} (grouped)"


@dataclass(frozen=True)
class Latency:
    """Measured latency of the model before and after compiling (same inputs, same run)."""

    before_ms: float
    after_ms: float
    baseline: str

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "before_ms": self.before_ms,
            "after_ms": self.after_ms,
            "speedup": self.speedup,
            "baseline": self.baseline,
        }


@dataclass(frozen=True)
class OnnxMeasurement:
    """The exported file, the original and compiled model timed in onnxruntime, and the kernels
    onnxruntime runs (op type -> count, after its graph optimizations)."""

    path: str
    latency: Latency
    kernels: dict[str, int]
    trace_warnings: tuple[str, ...] = ()  # values the exporter took as constants: a branch baked into the file

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "trace_warnings": list(self.trace_warnings),
            "fp32_ms": self.latency.before_ms,
            "compiled_ms": self.latency.after_ms,
            "speedup": self.latency.speedup,
            "baseline": self.latency.baseline,
            "kernels": dict(self.kernels),
        }


@dataclass(frozen=True)
class Int8Timing:
    """How a quantized model was timed: lowered onto torch's int8 kernels (the engine, the
    kernels it calls, what still runs in float), or, when the lowering failed, why."""

    engine: str | None
    kernels: dict[str, int]
    float_ops: tuple[str, ...]
    early_exit: bool  # every stage of an early-exit model lowered; its heads run in float
    failure: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "kernels": dict(self.kernels),
            "float_ops": list(self.float_ops),
            "early_exit": self.early_exit,
            "failure": self.failure,
        }


@dataclass(frozen=True)
class CompileReport:
    """Before/after reports, the record of each pass, the compiled model's fidelity to the
    original (on the evaluation set) and end-to-end measurements."""

    before: Report
    after: Report
    passes: tuple[PassRecord, ...]
    fidelity: Fidelity
    latency: Latency | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    exits: ExitPlan | None = None
    onnx: OnnxMeasurement | None = None
    torch_int8: Int8Timing | None = None
    runtimes: RuntimeComparison | None = None  # the original and compiled model in each runtime asked for
    warn_below: float = DEFAULT_WARN_BELOW  # top-1 agreement under which the report warns
    target: TargetReport | None = None  # how a compile to a target got there

    def __str__(self) -> str:
        """The readable tables ``slimfx compile`` prints."""
        from slimfx.report.tables import render_compile

        return render_compile(self)

    @property
    def output_error(self) -> float:
        """Relative output error of the compiled model vs the original on the evaluation set."""
        return self.fidelity.output_error

    def fidelity_warnings(self) -> tuple[str, ...]:
        """Loud lines when agreement fell under ``warn_below`` or the output is destroyed,
        naming the pass after which it first happened."""
        final, lines = self.fidelity, []
        if final.below(self.warn_below):
            first = next((r for r in self.passes if r.fidelity and r.fidelity.below(self.warn_below)), None)
            accuracy = (
                f"; accuracy fell from {final.original_accuracy:.2%} to {final.accuracy:.2%}"
                if final.accuracy is not None and final.original_accuracy is not None
                else ""
            )
            where = f"; it first fell below after pass '{first.spec}'" if first else ""
            lines.append(
                f"WARNING: top-1 agreement with the original is {final.agreement:.4f} on {final.on}, below "
                f"{self.warn_below:g}{accuracy}{where}"
            )
        if final.destroyed:
            lines.append(
                f"WARNING: the output is essentially destroyed (relative output error {final.output_error:.3g}): "
                "whatever speed the compiled model has, it does not compute what the original did"
            )
        return tuple(lines)

    def slower_runtimes(self) -> tuple[tuple[str, float], ...]:
        """Runtimes where the compiled model measured slower than the original, with the speedup."""
        found = []
        if self.runtimes is not None:
            for row in self.runtimes.rows:
                speedup = self.runtimes.speedup_in_runtime(row) if row.model == COMPILED else None
                if speedup is not None and speedup < 1:
                    found.append((row.runtime, speedup))
        if self.onnx is not None and self.onnx.latency.speedup < 1:
            found.append(("onnxruntime", self.onnx.latency.speedup))
        return tuple(found)

    def warnings(self) -> tuple[str, ...]:
        """Every warning of the run, one line each: the passes', the run's, fidelity, slower runtimes."""
        lines = [f"pass '{r.spec}': {w}" for r in self.passes for w in r.warnings]
        lines += [n.removeprefix("WARNING: ") for n in self.notes if n.startswith("WARNING")]
        lines += [w.removeprefix("WARNING: ") for w in self.fidelity_warnings()]
        lines += [
            f"the compiled model is slower than the original in {name} ({speedup:.2f}x)"
            for name, speedup in self.slower_runtimes()
        ]
        if self.onnx is not None:
            lines += [baked_branch_warning(self.onnx.path, w) for w in self.onnx.trace_warnings]
        if self.target is not None:
            lines += list(self.target.warnings)
        return tuple(lines)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        return {
            "schema": COMPILE_SCHEMA,
            "model": self.before.model,
            "before": self.before.to_dict(top),
            "after": self.after.to_dict(top),
            "passes": [p.to_dict(self.warn_below) for p in self.passes],
            "output_error": self.output_error,
            "fidelity": {**self.fidelity.to_dict(self.warn_below), "warn_below": self.warn_below},
            "latency": self.latency.to_dict() if self.latency else None,
            "notes": list(self.notes),
            "exits": self.exits.to_dict() if self.exits else None,
            "onnx": self.onnx.to_dict() if self.onnx else None,
            "torch_int8": self.torch_int8.to_dict() if self.torch_int8 else None,
            "runtimes": self.runtimes.to_dict() if self.runtimes else None,
            "target": self.target.to_dict() if self.target else None,
        }

    def to_json(self, top: int | None = None) -> str:
        return json.dumps(self.to_dict(top), indent=2)
