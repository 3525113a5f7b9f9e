"""A report as one self-contained HTML page: totals, a sortable per-layer table, inline SVG plots.

The plots are drawn with matplotlib (the optional ``plot`` extra) into SVG text embedded in
the page, so the file needs nothing else to open: share of MACs against share of measured
time per layer, MACs per layer before and after, where the early exits answer, and the model
in each runtime. The one script sorts a table by the column clicked; it marks the page
``data-ready`` when it has set up, and ``data-script-error`` if anything fails (the CI's
headless browser check reads both).
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

from slimfx.backends.compare import COMPILED, ORIGINAL, RuntimeComparison
from slimfx.errors import OutputError
from slimfx.exits.plan import ExitPlan
from slimfx.passes.manager import PassRecord
from slimfx.report.analysis import CompileReport, NodeRow, Report

TOP_LAYERS = 20  # layers shown in the per-layer plots (the table has every node)
_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th.sortable { cursor: pointer; background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; } .warning { color: #a00; font-weight: bold; }
"""
_SCRIPT = """
window.addEventListener('error', function (e) {
  document.body.setAttribute('data-script-error', String(e.message));
});
function sortBy(th) {
  var table = th.closest('table'), body = table.tBodies[0];
  var col = Array.prototype.indexOf.call(th.parentNode.children, th);
  var ascending = th.getAttribute('data-order') !== 'asc';
  th.setAttribute('data-order', ascending ? 'asc' : 'desc');
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[col].getAttribute('data-value'), y = b.cells[col].getAttribute('data-value');
    var nx = parseFloat(x), ny = parseFloat(y);
    var d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
    return ascending ? d : -d;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.addEventListener('DOMContentLoaded', function () {
  document.querySelectorAll('th.sortable').forEach(function (th) {
    th.addEventListener('click', function () { sortBy(th); });
  });
  document.body.setAttribute('data-ready', 'yes');
});
"""


def require_matplotlib() -> Any:
    """matplotlib's ``Figure``, or a clear error naming the extra (checked before any work)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise OutputError('--html draws its plots with matplotlib: pip install -e ".[plot]"') from None
    return Figure


def report_html(report: Report) -> str:
    """The page for ``slimfx report``: totals, where the cost goes, every node."""
    body = [
        f"<h1>{_e(report.model)}</h1>",
        _summary(report),
        _figure("share of MACs and of measured time per layer", _share_plot(report), "plot-share"),
        "<h2>Every node</h2>",
        _node_table(report),
    ]
    return _page(f"slimfx report: {report.model}", body)


def compile_html(result: CompileReport) -> str:
    """The page for ``slimfx compile``: totals before/after, per-layer plots, the runtimes, each
    pass's decisions, and every node before and after."""
    before, after = result.before.totals.totals(), result.after.totals.totals()
    totals = _table(
        ["total", "before", "after", "after / before"],
        [[k, before[k], after[k], after[k] / before[k] if before[k] else None] for k in before],
    )
    body = [
        f"<h1>{_e(result.before.model)}: {len(result.passes)} pass(es)</h1>",
        totals,
        f"<p>the compiled model vs the original on {_e(result.fidelity.on)}: {_e(result.fidelity.text())}</p>",
        *(f'<p class="warning">{_e(line)}</p>' for line in result.fidelity_warnings()),
    ]
    if result.latency is not None:
        lat = result.latency
        body.append(
            f"<p>measured latency ({_e(lat.baseline)}): before {lat.before_ms:.3f} ms, after {lat.after_ms:.3f} ms, "
            f"speedup {lat.speedup:.2f}x</p>"
        )
    body.extend(f'<p class="warning">{_e(note)}</p>' for note in result.notes)
    if result.runtimes is not None:
        body.append("<h2>Runtimes</h2>")
        body.append(_runtime_table(result.runtimes))
        body.append(_figure("latency in each runtime", _runtime_plot(result.runtimes), "plot-runtimes"))
    body.append(_figure("MACs per layer before and after", _before_after_plot(result), "plot-before-after"))
    body.append(
        _figure("share of MACs and of measured time per layer (before)", _share_plot(result.before), "plot-share")
    )
    if result.exits is not None:
        body.append(_figure("where the early exits answer", _exits_plot(result.exits), "plot-exits"))
    body.append("<h2>Passes</h2>")
    body.extend(_pass_section(record) for record in result.passes)
    body.extend(["<h2>Every node after</h2>", _node_table(result.after)])
    body.extend(["<h2>Every node before</h2>", _node_table(result.before, "nodes-before")])
    return _page(f"slimfx compile: {result.before.model}", body)


# -- page parts ------------------------------------------------------------------------------
def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>\n"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _e(text: object) -> str:
    return html.escape(str(text))


def _summary(report: Report) -> str:
    shapes = ", ".join("x".join(map(str, s)) for s in report.input_shapes)
    rows = [[k, v] for k, v in report.totals.totals().items()]
    if report.latency_ms is not None:
        rows.append(["measured latency, ms (sum of the nodes)", report.latency_ms])
    notes = [f"<p>input {_e(shapes)}</p>", _table(["total", "value"], rows)]
    if report.timing:
        notes.append(f"<p>node latency: {_e(report.timing)}</p>")
    if report.opaque:
        notes.append(f"<p>kept whole at capture (opaque): {_e(', '.join(report.opaque))}</p>")
    return "\n".join(notes)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f'<td class="num" data-value="{value!r}">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num" data-value="{value}">{value:,}</td>'
    if value is None:
        return '<td data-value="">-</td>'
    return f'<td data-value="{_e(value)}">{_e(value)}</td>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], table_id: str | None = None) -> str:
    head = "".join(f'<th class="sortable">{_e(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _node_table(report: Report, table_id: str = "nodes") -> str:
    timed = report.timing is not None
    total_ms = report.latency_ms or 0.0
    headers = ["node", "op", "module type / function", "output shape", "MACs", "share of MACs", "params"]
    if timed:
        headers += ["measured ms", "share of time"]
    rows = []
    for row in report.nodes:
        values: list[object] = [
            row.name,
            row.op,
            row.label,
            "x".join(map(str, row.out_shape)) if row.out_shape else None,
            row.cost.macs,
            row.share,
            row.cost.params,
        ]
        if timed:
            values += [row.latency_ms, (row.latency_ms or 0.0) / total_ms if total_ms else None]
        rows.append(values)
    return _table(headers, rows, table_id)


def _runtime_table(comparison: RuntimeComparison) -> str:
    fastest = comparison.fastest
    rows = [
        [
            r.runtime,
            r.model,
            r.precision or f"failed: {r.failure}",
            r.latency_ms,
            comparison.baseline_ms / r.latency_ms if r.latency_ms else None,
            comparison.speedup_in_runtime(r) if r.model == COMPILED else None,
            r.agreement,
            r.relative_error,
            r.accuracy,
            "fastest" if r is fastest else "",
        ]
        for r in comparison.rows
    ]
    headers = [
        "runtime",
        "model",
        "precision that ran",
        "latency ms",
        "vs torch eager fp32",
        "speedup in runtime",
        "top-1 agreement",
        "output error",
        "accuracy",
        "",
    ]
    caption = (
        f"<p>batch {comparison.batch}, {comparison.threads} threads, each session on its own, median; agreement "
        f"and error vs the original in torch fp32 on {_e(comparison.agreement_on)}</p>"
    )
    skipped = "".join(f"<p>not measured: {_e(n)}: {_e(why)}</p>" for n, why in comparison.skipped)
    return caption + _table(headers, rows, "runtimes") + skipped


def _pass_section(record: PassRecord) -> str:
    rows = [[d.target, str(d.action), d.macs_before, d.macs_after, d.reason] for d in record.decisions]
    fidelity = "graph unchanged" if record.fidelity is None else f"vs the original: {record.fidelity.text()}"
    head = f"<h3>{_e(record.spec)}</h3><p>{'changed' if record.changed else 'no change'}; {_e(fidelity)}</p>"
    warnings = "".join(f'<p class="warning">warning: {_e(w)}</p>' for w in record.warnings)
    table = _table(["layer", "decision", "MACs before", "MACs after", "why"], rows) if rows else ""
    return head + table + warnings


# -- plots -------------------------------------------------------------------------------------
def _figure(caption: str, svg: str | None, figure_id: str) -> str:
    if svg is None:
        return ""
    return f'<figure id="{figure_id}">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG sits inside HTML


def _layers(report: Report) -> list[NodeRow]:
    """The layers worth plotting: the ``TOP_LAYERS`` nodes with most MACs or most time, in graph order."""
    by_macs = sorted(report.nodes, key=lambda r: r.cost.macs, reverse=True)[:TOP_LAYERS]
    by_time = sorted(report.nodes, key=lambda r: r.latency_ms or 0.0, reverse=True)[: TOP_LAYERS // 2]
    chosen = {r.name for r in by_macs if r.cost.macs} | {r.name for r in by_time if r.latency_ms}
    return [r for r in report.nodes if r.name in chosen]


def _share_plot(report: Report) -> str | None:
    layers = _layers(report)
    if not layers:
        return None
    Figure = require_matplotlib()
    fig = Figure(figsize=(9, 0.28 * len(layers) + 1.2))
    ax = fig.subplots()
    positions = range(len(layers))
    ax.barh([p + 0.2 for p in positions], [r.share for r in layers], height=0.4, label="share of MACs")
    total = report.latency_ms
    if total:
        shares = [(r.latency_ms or 0.0) / total for r in layers]
        ax.barh([p - 0.2 for p in positions], shares, height=0.4, label="share of measured time")
    ax.set_yticks(list(positions), [r.label for r in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the model's total")
    ax.legend(loc="lower right")
    return _svg(fig)


def _before_after_plot(result: CompileReport) -> str | None:
    before = {r.module or r.name: r for r in _layers(result.before)}
    after = {r.module or r.name: r for r in result.after.nodes}
    if not before:
        return None
    Figure = require_matplotlib()
    names = list(before)
    fig = Figure(figsize=(9, 0.28 * len(names) + 1.2))
    ax = fig.subplots()
    positions = range(len(names))
    ax.barh([p - 0.2 for p in positions], [before[n].cost.macs for n in names], height=0.4, label="before")
    ax.barh(
        [p + 0.2 for p in positions],
        [after[n].cost.macs if n in after else 0 for n in names],
        height=0.4,
        label="after",
    )
    ax.set_yticks(list(positions), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MACs (layers gone after the passes, or renamed, show no 'after' bar)")
    ax.legend(loc="lower right")
    return _svg(fig)


def _runtime_plot(comparison: RuntimeComparison) -> str | None:
    runtimes = list(dict.fromkeys(comparison.float_flavour.get(r.runtime, r.runtime) for r in comparison.rows))
    compiled = [r for r in comparison.rows if r.model == COMPILED and r.latency_ms]
    if not compiled:
        return None
    Figure = require_matplotlib()
    fig = Figure(figsize=(8, 0.5 * len(compiled) + 1.2))
    ax = fig.subplots()
    labels, originals, times = [], [], []
    for row in compiled:
        flavour = comparison.float_flavour.get(row.runtime, row.runtime)
        original = comparison.row(flavour, ORIGINAL)
        labels.append(row.runtime)
        originals.append(original.latency_ms if original and original.latency_ms else 0.0)
        times.append(row.latency_ms)
    positions = range(len(labels))
    ax.barh([p - 0.2 for p in positions], originals, height=0.4, label="original (in the runtime's float flavour)")
    ax.barh([p + 0.2 for p in positions], times, height=0.4, label="compiled")
    ax.set_yticks(list(positions), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per batch of {comparison.batch} (median); {len(runtimes)} runtime families")
    ax.legend(loc="lower right")
    return _svg(fig)


def _exits_plot(plan: ExitPlan) -> str | None:
    Figure = require_matplotlib()
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    labels = [f"exit {s.exit}" for s in plan.stats] + ["full model"]
    shares = [s.share for s in plan.stats] + [plan.final_share]
    ax.bar(labels, shares)
    ax.set_ylabel("share of held-out rows answered")
    return _svg(fig)
