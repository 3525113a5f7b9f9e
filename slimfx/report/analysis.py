"""Reports as data: per-node rows, totals and uncounted ops; compile before/after.

``to_dict`` gives the stable JSON schema documented in docs/report-schema.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from slimfx.cost_model.counts import Cost, total_cost
from slimfx.ir.graph import Graph
from slimfx.passes.manager import PassRecord

REPORT_SCHEMA = "slimfx.report/1"
COMPILE_SCHEMA = "slimfx.compile/1"
UNITS = {
    "macs": "multiply-accumulates (FLOPs = 2 x MACs)",
    "elem_ops": "element operations of normalization, pooling, elementwise and activation ops",
    "params": "parameter elements",
    "bytes_read": "bytes (activations and weights read)",
    "bytes_written": "bytes (activations written)",
    "latency_ms": "milliseconds, median of repeated runs",
}


@dataclass(frozen=True)
class NodeRow:
    """One node of the graph as reports show it."""

    name: str
    op: str
    kind: str
    inputs: tuple[str, ...]
    out_shape: tuple[int, ...] | None
    cost: Cost
    share: float
    rule: str
    counted: bool
    provenance: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "kind": self.kind,
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
        }


@dataclass(frozen=True)
class Report:
    """Where a graph's cost goes, node by node."""

    model: str
    input_shapes: tuple[tuple[int, ...], ...]
    nodes: tuple[NodeRow, ...]
    totals: Cost

    @property
    def uncounted(self) -> tuple[NodeRow, ...]:
        return tuple(row for row in self.nodes if not row.counted)

    @classmethod
    def from_graph(cls, graph: Graph, model: str = "model") -> Report:
        totals = total_cost(graph)
        rows = []
        for node in graph.nodes():
            info = graph.info(node)
            assert info.cost is not None
            rows.append(
                NodeRow(
                    name=node.name,
                    op=node.op,
                    kind=info.kind if node.op != "call_module" else f"{info.kind} ({node.target})",
                    inputs=tuple(n.name for n in node.all_input_nodes),
                    out_shape=info.out_shape,
                    cost=info.cost.cost,
                    share=info.cost.cost.macs / totals.macs if totals.macs else 0.0,
                    rule=info.cost.rule,
                    counted=info.cost.counted,
                    provenance=info.provenance,
                )
            )
        shapes = tuple(tuple(t.shape) for t in graph.example_inputs)
        return cls(model, shapes, tuple(rows), totals)

    def top(self, n: int | None) -> list[NodeRow]:
        """The ``n`` nodes with most MACs (then element ops), or every node in graph order."""
        if n is None:
            return list(self.nodes)
        ranked = sorted(self.nodes, key=lambda r: (r.cost.macs, r.cost.elem_ops, r.cost.bytes_written), reverse=True)
        return ranked[:n]

    def by_kind(self) -> list[dict[str, Any]]:
        """Rows aggregated by module type or function, most MACs first."""
        groups: dict[str, dict[str, Any]] = {}
        for row in self.nodes:
            kind = row.kind.split(" (")[0]
            g = groups.setdefault(kind, {"kind": kind, "count": 0, "cost": Cost()})
            g["count"] += 1
            g["cost"] = g["cost"] + row.cost
        result = sorted(groups.values(), key=lambda g: (g["cost"].macs, g["cost"].elem_ops), reverse=True)
        for g in result:
            g["share"] = g["cost"].macs / self.totals.macs if self.totals.macs else 0.0
        return result

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "model": self.model,
            "input_shapes": [list(s) for s in self.input_shapes],
            "units": UNITS,
            "totals": totals_dict(self.totals),
            "nodes": [row.to_dict() for row in self.top(top)],
            "uncounted": [{"name": r.name, "kind": r.kind, "reason": r.rule} for r in self.uncounted],
        }


def totals_dict(cost: Cost) -> dict[str, int]:
    return {
        "macs": cost.macs,
        "flops": cost.flops,
        "elem_ops": cost.elem_ops,
        "params": cost.params,
        "bytes_read": cost.bytes_read,
        "bytes_written": cost.bytes_written,
    }


@dataclass(frozen=True)
class Latency:
    """Measured latency of the model before and after compiling (same inputs, same run)."""

    before_ms: float
    after_ms: float
    baseline: str

    def to_dict(self) -> dict[str, Any]:
        return {"before_ms": self.before_ms, "after_ms": self.after_ms, "speedup": self.before_ms / self.after_ms,
                "baseline": self.baseline}


@dataclass(frozen=True)
class CompileReport:
    """Before/after reports, the record of each pass, and end-to-end measurements."""

    before: Report
    after: Report
    passes: tuple[PassRecord, ...]
    output_error: float
    latency: Latency | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    exits: dict[str, Any] | None = None  # early exits: per-exit share and threshold, expected MACs
    onnx: dict[str, Any] | None = None  # exported file, onnxruntime latency fp32 vs compiled, kernels

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        return {
            "schema": COMPILE_SCHEMA,
            "model": self.before.model,
            "before": self.before.to_dict(top),
            "after": self.after.to_dict(top),
            "passes": [p.to_dict() for p in self.passes],
            "output_error": self.output_error,
            "latency": self.latency.to_dict() if self.latency else None,
            "notes": list(self.notes),
            "exits": self.exits,
            "onnx": self.onnx,
        }

    def to_json(self, top: int | None = None) -> str:
        return json.dumps(self.to_dict(top), indent=2)
