"""Render reports as text tables (tabulate), Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from slimfx.backends.compare import COMPILED, RuntimeComparison
from slimfx.backends.onnx import baked_branch_warning
from slimfx.backends.runtimes import get_runtime
from slimfx.cost_model.device import DeviceProfile
from slimfx.exits.plan import ExitPlan
from slimfx.ir.meta import Cost
from slimfx.passes.manager import PassRecord
from slimfx.target.plan import Plan
from slimfx.target.reach import TargetReport

if TYPE_CHECKING:  # report.analysis renders its reports with this module: type names only here
    from slimfx.report.analysis import CompileReport, Int8Timing, KindRow, NodeRow, Report

TABLE_FORMATS = {"table": "simple", "md": "github"}


def si(value: float, unit: str = "") -> str:
    """A number with an SI prefix and its unit: (4089184256, 'MACs') -> '4.089G MACs'."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            scaled = f"{value / factor:.3f}"
            return f"{scaled} {prefix}B" if unit == "B" else f"{scaled}{prefix} {unit}".rstrip()
    return f"{value:g} {unit}".rstrip()


def counts_text(counts: Mapping[str, int]) -> str:
    """``"QLinearConv 20, QLinearAdd 8, ..."``: most frequent first, ties by name."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def totals_line(cost: Cost) -> str:
    return (
        f"{si(cost.macs, 'MACs')} ({si(cost.flops, 'FLOPs')}), {si(cost.elem_ops, 'element ops')}, "
        f"{si(cost.params, 'params')}, {si(cost.bytes_read, 'B')} read, {si(cost.bytes_written, 'B')} written"
    )


_TOTAL_LABELS = {
    "macs": "MACs",
    "flops": "FLOPs",
    "elem_ops": "element ops",
    "params": "params",
    "bytes_read": "bytes read",
    "bytes_written": "bytes written",
}
_NODE_COLUMNS = [
    "node",
    "op",
    "module type / function",
    "output shape",
    "MACs",
    "share of MACs",
    "element ops",
    "params",
]
_KIND_COLUMNS = ["module type / function", "nodes", "MACs", "share of MACs", "element ops", "params"]


def _share(share: float, numeric: bool) -> Any:
    return round(share, 6) if numeric else f"{100 * share:.1f}%"


def _time_values(report: Report, predicted_ms: float | None, fused_into: str | None, numeric: bool) -> list[Any]:
    """The predicted-ms and share-of-time cells of a row (a fused node names its kernel's anchor)."""
    if fused_into is not None:
        return ["" if numeric else f"in {fused_into}", 0.0 if numeric else ""]
    share = report.time_share(predicted_ms)
    ms = round(predicted_ms or 0.0, 6) if numeric else f"{predicted_ms or 0.0:.3f}"
    return [ms, _share(share or 0.0, numeric)]


def _node_values(row: NodeRow, numeric: bool = False) -> list[Any]:
    shape = "x".join(map(str, row.out_shape)) if row.out_shape else "-"
    return [
        row.name,
        row.op,
        row.label,
        shape,
        row.cost.macs,
        _share(row.share, numeric),
        row.cost.elem_ops,
        row.cost.params,
    ]


def _kind_values(group: KindRow, numeric: bool = False) -> list[Any]:
    c = group.cost
    return [group.kind, group.count, c.macs, _share(group.share, numeric), c.elem_ops, c.params]


def render_report(report: Report, fmt: str = "table", top: int | None = None, by: str = "node") -> str:
    """The report in ``fmt`` (table, md, csv, json); ``by`` is ``node`` or ``module-type``
    (convs split into dense, grouped and depthwise). CSV shares are fractions (numbers)."""
    if fmt == "json":
        return json.dumps(report.to_dict(top, by), indent=2)
    numeric = fmt == "csv"
    timed = report.prediction is not None
    time_columns = ["predicted ms", "share of time"] if timed else []
    if by == "module-type":
        groups = report.by_kind()[:top] if top else report.by_kind()
        header = _KIND_COLUMNS + time_columns
        rows = [
            _kind_values(g, numeric) + (_time_values(report, g.predicted_ms, None, numeric) if timed else [])
            for g in groups
        ]
        if timed:
            covered = sum(report.time_share(g.predicted_ms) or 0.0 for g in groups)
        else:
            covered = sum(g.share for g in groups)
        what = f"top {len(groups)} module types by {report.ranked_by}"
    else:
        header = _NODE_COLUMNS + time_columns
        rows = [
            _node_values(r, numeric) + (_time_values(report, r.predicted_ms, r.fused_into, numeric) if timed else [])
            for r in report.top(top)
        ]
        covered, what = (report.top_share(top), f"top {top} nodes by {report.ranked_by}") if top else (1.0, "")
    if fmt == "csv":
        return _csv(header, rows)
    lines = [
        f"{report.model}: input {', '.join('x'.join(map(str, s)) for s in report.input_shapes)}",
        f"total: {totals_line(report.totals)}",
        *([report.prediction.describe()] if report.prediction else []),
        *([f"shown: {what}, {covered:.1%} of all {'predicted time' if timed else 'MACs'}"] if top else []),
        "",
        tabulate(rows, headers=header, tablefmt=TABLE_FORMATS[fmt], intfmt=",", disable_numparse=False),
        "",
        _uncounted_text(report),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _uncounted_text(report: Report) -> str:
    opaque = ""
    if report.opaque:
        opaque = (
            f"opaque modules (torch.fx cannot trace them: kept whole, cost measured, left alone by every pass): "
            f"{', '.join(report.opaque)}\n"
        )
    if report.fixed_shapes:
        shapes = ", ".join(str(s) for s in report.input_shapes)
        opaque += (
            f"traced at fixed shapes (the model branches on its input's shape): the graph holds for inputs of "
            f"shape {shapes} only\n"
        )
    if report.taken_layers:
        opaque += "taken as standard layers: " + "; ".join(report.taken_layers) + "\n"
    if not report.uncounted:
        return opaque + "uncounted ops: none (every node has a cost rule)"
    items = "\n".join(f"  {r.name} ({r.label}): {r.rule}" for r in report.uncounted)
    return opaque + f"uncounted ops ({len(report.uncounted)}; their cost is missing from the totals):\n{items}"


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def render_compile(result: CompileReport, fmt: str = "table") -> str:
    """Before/after totals, each pass's decisions, the output error and measured latency."""
    if fmt == "json":
        return result.to_json()
    tablefmt = TABLE_FORMATS.get(fmt, "simple")
    before, after = result.before.totals.totals(), result.after.totals.totals()
    rows = [[_TOTAL_LABELS[k], before[k], after[k], _ratio(after[k], before[k])] for k in before]
    parts = [
        f"{result.before.model}: {len(result.passes)} pass(es)",
        "",
        tabulate(rows, headers=["total", "before", "after", "after / before"], tablefmt=tablefmt, intfmt=","),
        "",
    ]
    for record in result.passes:
        parts.append(_pass_text(record, tablefmt))
    if result.target:
        parts.append(target_text(result.target, tablefmt))
    if result.exits:
        parts.append(_exits_text(result.exits, tablefmt))
    parts.append(f"the compiled model vs the original on {result.fidelity.on}: {result.fidelity.text()}")
    parts.extend(result.fidelity_warnings())
    if result.latency:
        lat = result.latency
        parts.append(
            f"measured latency ({lat.baseline}): before {lat.before_ms:.2f} ms, after {lat.after_ms:.2f} ms, "
            f"speedup {lat.speedup:.2f}x"
        )
    if result.onnx:
        o = result.onnx
        parts.append(
            f"onnxruntime ({o.latency.baseline}): original {o.latency.before_ms:.2f} ms, compiled "
            f"{o.latency.after_ms:.2f} ms, speedup {o.latency.speedup:.2f}x; wrote {o.path} "
            f"(what onnxruntime runs: {counts_text(o.kernels)})"
        )
        parts.extend(f"WARNING: {baked_branch_warning(o.path, w)}" for w in o.trace_warnings)
        if o.latency.speedup < 1:  # the runtime table below warns about its own rows
            parts.append(
                f"WARNING: the compiled model is slower than the original in onnxruntime ({o.latency.speedup:.2f}x)"
            )
    if result.torch_int8:
        parts.append(_int8_text(result.torch_int8))
    if result.runtimes:
        parts.append(runtimes_text(result.runtimes, tablefmt))
    parts.extend(result.notes)
    return "\n".join(parts).rstrip() + "\n"


def _figure(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f} ms"
    return si(value, "MACs" if unit == "MACs" else "B")


def plan_text(plan: Plan, tablefmt: str = "simple") -> str:
    """A plan: per item (channel group, layer's quantization) the option chosen among those
    considered, with its predicted saving and sensitivity; the predicted total against the
    budget; the Pareto front."""
    unit = plan.target.symbol
    where = f" on {plan.runtime}" + (" (int8)" if plan.quantizes else "")
    rows = [
        [
            c.chosen.item,
            c.chosen.technique,
            c.chosen.setting if c.changed else f"{c.chosen.setting} (no change)",
            ", ".join(a.setting for a in c.alternatives[1:]),
            _figure(c.chosen.saved, unit) if c.changed else "-",
            f"{c.chosen.sensitivity:.4f}" if c.changed else "-",
        ]
        for c in plan.choices
    ]
    table = tabulate(
        rows,
        headers=["group or layer", "technique", "chosen", "considered", "predicted saving (alone)", "sensitivity (KL)"],
        tablefmt=tablefmt,
    )
    if plan.met:
        status = "within the budget"
    elif plan.given_back:
        status = f"over the budget: {plan.given_back} choice(s) given back for accuracy"
    else:
        status = "the budget cannot be reached: the best reachable plan"
    front = tabulate(
        [[_figure(p.budget, unit), _figure(p.estimate, unit), f"{p.sensitivity:.4f}"] for p in plan.front],
        headers=["budget", "plan (additive estimate)", "summed sensitivity"],
        tablefmt=tablefmt,
    )
    return (
        f"plan for {plan.target}{where}: original {_figure(plan.original, unit)}, budget {_figure(plan.budget, unit)}, "
        f"predicted {_figure(plan.predicted, unit)} ({status}; summed sensitivity {plan.sensitivity:.4f})\n"
        f"{table}\n\nPareto front (savings of candidates measured alone, summed):\n{front}\n"
    )


def target_text(report: TargetReport, tablefmt: str = "simple") -> str:
    """How a target was reached: the plan, each latency measurement, each give-back, the totals."""
    unit = report.unit
    parts = [plan_text(report.plan, tablefmt)]
    if report.corrections:
        rows = [
            [i, _figure(c.budget, unit), _figure(c.predicted, unit), _figure(c.measured, unit), _figure(c.goal, unit)]
            for i, c in enumerate(report.corrections, 1)
        ]
        headers = ["build", "planned for (predicted)", "plan predicted", "measured", "goal (measured)"]
        parts.append("latency checks (each build timed in the runtime):\n" + tabulate(rows, headers, tablefmt=tablefmt))
    for g in report.give_backs:
        names = ", ".join(f"{c.chosen.item} ({c.chosen.setting} -> {c.alternatives[0].setting})" for c in g.returned)
        parts.append(
            f"given back after a loss of {g.drop:.2f} points (max-drop {report.max_drop:g}), worst sensitivity per "
            f"{unit} saved first: {names}"
        )
    runtime = report.plan.runtime
    if unit == "ms":
        original = f"the original {_figure(report.original_measured, unit)} in {get_runtime(runtime).float_flavour}"
        measured = f"measured {_figure(report.measured, unit)} in {runtime}"
    else:
        original = f"the original {_figure(report.original_measured, unit)}"
        measured = f"counted {_figure(report.measured, unit)}"
    what = "accuracy" if report.labelled else "top-1 agreement"
    if report.drop is None:
        drop = ""
    elif report.drop >= 0:
        drop = f"; {what} lost {report.drop:.2f} points"
    else:
        drop = f"; {what} gained {-report.drop:.2f} points"
    parts.append(
        f"target {report.plan.target}: goal {_figure(report.goal, unit)} ({original}), predicted "
        f"{_figure(report.plan.predicted, unit)}, {measured} ({report.measured / report.original_measured:.3f} of the "
        f"original){drop}"
    )
    parts.extend(f"WARNING: {w}" for w in report.warnings)
    return "\n".join(parts) + "\n"


def _predicted_cell(predicted_ms: float | None, measured_ms: float | None) -> str:
    if predicted_ms is None:
        return "-"
    if measured_ms is None or measured_ms <= 0:
        return f"{predicted_ms:.2f} ms"
    return f"{predicted_ms:.2f} ms ({predicted_ms / measured_ms - 1:+.0%})"


def runtimes_text(comparison: RuntimeComparison, tablefmt: str = "simple") -> str:
    """The runtime table: each model in each runtime, the fastest compiled row marked, slower
    compiled rows warned about, runtimes that were not measured listed with the reason."""
    fastest = comparison.fastest
    labelled = any(row.accuracy is not None for row in comparison.rows)
    predicted = any(row.predicted_ms is not None for row in comparison.rows)
    rows = []
    for row in comparison.rows:
        in_runtime = comparison.speedup_in_runtime(row) if row.model == COMPILED else None
        flavour = comparison.float_flavour.get(row.runtime, row.runtime)
        rows.append(
            [
                row.runtime,
                row.model,
                row.precision or f"failed: {row.failure}",
                "-" if row.latency_ms is None else f"{row.latency_ms:.2f} ms",
                *([] if not predicted else [_predicted_cell(row.predicted_ms, row.latency_ms)]),
                "-" if row.latency_ms is None else f"{comparison.baseline_ms / row.latency_ms:.2f}x",
                "" if in_runtime is None else f"{in_runtime:.2f}x (vs {flavour})",
                "-" if row.agreement is None else f"{row.agreement:.4f}",
                "-" if row.relative_error is None else f"{row.relative_error:.3g}",
                *([] if not labelled else ["-" if row.accuracy is None else f"{row.accuracy:.2%}"]),
                "fastest" if row is fastest else "",
            ]
        )
    headers = [
        "runtime",
        "model",
        "precision that ran",
        "latency",
        *(["predicted (error)"] if predicted else []),
        "vs torch eager fp32",
        "speedup in runtime",
        "top-1 agreement",
        "output error",
        *(["accuracy"] if labelled else []),
        "",
    ]
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    lines = [
        f"measured in each runtime (batch {comparison.batch}, {comparison.threads} threads, each session on its own, "
        f"median; agreement and relative output error vs the original in torch fp32 on {comparison.agreement_on}):",
        table,
    ]
    for row in comparison.rows:
        speedup = comparison.speedup_in_runtime(row) if row.model == COMPILED else None
        if speedup is not None and speedup < 1:
            lines.append(f"WARNING: the compiled model is slower than the original in {row.runtime} ({speedup:.2f}x)")
    lines.extend(f"not measured: {name}: {why}" for name, why in comparison.skipped)
    return "\n".join(lines) + "\n"


def _int8_text(int8: Int8Timing) -> str:
    if int8.failure is not None:
        return (
            f"the after latency is the fake-quant graph, a float simulation ({int8.failure}); "
            "pass --onnx OUT.onnx for int8 speed"
        )
    where = " (each stage of the early-exit model; the exit heads run in float)" if int8.early_exit else ""
    floats = f"; in float: {'; '.join(int8.float_ops)}" if int8.float_ops else ""
    return (
        f"after latency: the quantized graph lowered onto torch's int8 kernels{where} "
        f"(engine {int8.engine}: {counts_text(int8.kernels)}){floats}"
    )


def _exits_text(plan: ExitPlan, tablefmt: str) -> str:
    rows = [
        [s.exit, s.node, f"{s.threshold:.4g}", f"{s.share:.1%}", si(s.macs_to_exit_per_sample, "MACs")]
        for s in plan.stats
    ]
    rows.append(["full model", "", "", f"{plan.final_share:.1%}", si(plan.final_macs_per_sample, "MACs")])
    table = tabulate(
        rows,
        headers=["exit", "after node", "entropy threshold", "share of held-out rows", "cost to answer there"],
        tablefmt=tablefmt,
        disable_numparse=True,
    )
    latency = ""
    if plan.latency is not None:
        lat = plan.latency
        latency = (
            f"predicted on {lat.runtime}, batch {lat.batch}: expected {lat.expected_ms:.3f} ms vs {lat.full_ms:.3f} ms "
            f"for the full model ({lat.speedup:.2f}x; stages run on {', '.join(map(str, lat.stage_rows))} rows)\n"
        )
    return (
        f"early exits: expected {si(plan.expected_macs_per_sample, 'MACs')} per sample vs "
        f"{si(plan.full_macs_per_sample, 'MACs')} for the full model "
        f"({plan.expected_mac_speedup:.2f}x); agreement with the full model {plan.agreement:.4f} on held-out rows\n"
        f"{latency}{table}\n"
    )


def _pass_text(record: PassRecord, tablefmt: str) -> str:
    touched = sum(d.changed_a_layer for d in record.decisions)
    declined = sum(d.declined for d in record.decisions)
    fidelity = "graph unchanged" if record.fidelity is None else f"vs the original: {record.fidelity.text()}"
    exactness = "lossy" if not record.exact else "exact, verified" if record.verified else "exact, NOT verified"
    head = (
        f"pass {record.spec} ({exactness}): {'changed' if record.changed else 'no change'}, "
        f"{touched} layer(s) changed, {declined} declined, {record.seconds * 1000:.1f} ms; {fidelity}"
    )
    if not record.decisions:
        return head + "\n"
    headers, columns = ["layer", "decision"], [lambda d: d.target, lambda d: str(d.action)]
    if any(d.details is not None and d.details.channels() is not None for d in record.decisions):
        headers.append("channels")
        columns.append(
            lambda d: _arrow(
                *(d.details.channels() if d.details is not None and d.details.channels() else (None, None))
            )
        )
    if any(d.macs_before is not None for d in record.decisions):
        headers.append("MACs of its layers")
        columns.append(lambda d: _arrow(d.macs_before, d.macs_after, si))
    headers.append("why")
    columns.append(lambda d: d.reason)
    rows = [[column(d) for column in columns] for d in record.decisions]
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    lines = "".join(
        f"\n{line}" for d in record.decisions if d.details is not None for line in d.details.summary_lines()
    )
    warnings = "".join(f"\nwarning: {w}" for w in record.warnings)
    return f"{head}\n{table}{lines}{warnings}\n"


def _arrow(before: Any, after: Any, fmt: Any = str) -> str:
    if before is None:
        return ""
    return fmt(before) if after == before else f"{fmt(before)} -> {fmt(after)}"


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}" if before else "-"


def render_profile(profile: DeviceProfile) -> str:
    """A device profile as a table: per runtime its sustained rates, overheads and channel step."""
    rows = []
    for name, runtime in profile.runtimes.items():
        r = runtime.roofline
        rows.append(
            [
                name,
                f"{r.dense_conv_macs_per_ms / 1e6:.1f}",
                f"{r.depthwise_conv_macs_per_ms / 1e6:.1f}",
                f"{r.pointwise_conv_macs_per_ms / 1e6:.1f}",
                f"{r.linear_macs_per_ms / 1e6:.1f}",
                f"{r.bytes_per_ms / 1e6:.1f}",
                f"{1000 * r.kernel_overhead_ms:.1f}",
                f"{1000 * r.call_overhead_ms:.1f}",
                runtime.channel_step,
                len(runtime.tables),
            ]
        )
    header = [
        "runtime",
        "dense conv GMAC/s",
        "depthwise GMAC/s",
        "1x1 conv GMAC/s",
        "linear GMAC/s",
        "memory GB/s",
        "per kernel us",
        "per call us",
        "channel step",
        "measured kernels",
    ]
    versions = ", ".join(f"{k} {v}" for k, v in profile.versions.items())
    lines = [
        f"device profile: {profile.machine.describe()}; {profile.threads} threads; {versions}",
        "",
        tabulate(rows, headers=header, tablefmt="simple", disable_numparse=True),
    ]
    return "\n".join(lines) + "\n"
