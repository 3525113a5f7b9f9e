"""Graphviz DOT drawing of a report: one box per node, shaded by its share of MACs."""

from __future__ import annotations

from slimfx.report.analysis import Report
from slimfx.report.tables import si


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def to_dot(report: Report) -> str:
    """A ``digraph``; the fill goes from white (no MACs) to red (the node with most MACs)."""
    peak = max((row.cost.macs for row in report.nodes), default=0) or 1
    lines = [f"digraph {_quote(report.model)} {{", "  node [shape=box, style=filled, fontname=Helvetica];"]
    for row in report.nodes:
        shape = "x".join(map(str, row.out_shape)) if row.out_shape else ""
        label = f"{row.name}\\n{row.label}\\n{shape}"
        if row.cost.macs:
            label += f"\\n{si(row.cost.macs, 'MACs')} ({100 * row.share:.1f}%)"
        saturation = row.cost.macs / peak
        color = "0.000 0.000 0.850" if not row.counted else f"0.000 {saturation:.3f} 1.000"
        lines.append(f"  {_quote(row.name)} [label={_quote(label)}, fillcolor={_quote(color)}];")
    for row in report.nodes:
        for source in row.inputs:
            lines.append(f"  {_quote(source)} -> {_quote(row.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
