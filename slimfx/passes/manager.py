"""PassManager: order checks, a verified run of each pass, timing and history."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from slimfx.errors import PassError, PassOrderError, SlimfxError
from slimfx.ir.graph import Graph
from slimfx.ir.verify import compare_outputs, lint, run_outputs
from slimfx.passes.base import Decision, Pass, PassContext

EXACT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: its spec, decisions, time, and the measured output error."""

    name: str
    spec: str
    exact: bool
    changed: bool
    seconds: float
    output_error: float | None
    decisions: tuple[Decision, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "exact": self.exact,
            "changed": self.changed,
            "seconds": self.seconds,
            "output_error": self.output_error,
            "decisions": [d.to_dict() for d in self.decisions],
            "warnings": list(self.warnings),
        }


def check_order(passes: Sequence[Pass]) -> None:
    """Raise PassOrderError naming both passes when the pipeline breaks a declared order."""
    for i, earlier in enumerate(passes):
        for later in passes[i + 1 :]:
            reason = later.runs_before.get(earlier.name) or earlier.runs_after.get(later.name)
            if reason:
                raise PassOrderError(
                    f"'{later.name}' must run before '{earlier.name}' ({reason}); "
                    f"reorder the pipeline to put '{later.name}' first"
                )


class PassManager:
    """Runs passes in order on a Graph, verifying the graph after each one.

    After every pass the graph must lint, run and keep its output shapes; an exact pass must
    also keep its outputs within ``tolerance`` relative error of the graph before it. The
    measured error is recorded for every pass, exact or not.
    """

    def __init__(self, passes: Sequence[Pass], tolerance: float = EXACT_TOLERANCE):
        self.passes = list(passes)
        self.tolerance = tolerance
        self.outputs_before: list[torch.Tensor] = []
        self.outputs_after: list[torch.Tensor] = []
        check_order(self.passes)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> list[PassRecord]:
        """Run every pass in order; afterwards ``outputs_before`` / ``outputs_after`` hold the
        graph's outputs on its example inputs before the first pass and after the last."""
        ctx = ctx or PassContext()
        history: list[PassRecord] = []
        self.outputs_before = self.outputs_after = run_outputs(graph.module, graph.example_inputs)
        for index, p in enumerate(self.passes):
            history.append(self._run_one(index, p, graph, ctx, history))
        return history

    def _run_one(self, index: int, p: Pass, graph: Graph, ctx: PassContext, history: list[PassRecord]) -> PassRecord:
        reference = self.outputs_after  # each pass is checked against the graph just before it
        version = graph.version
        start = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except SlimfxError as exc:
            raise self._failure(index, p, history, str(exc)) from exc
        except Exception as exc:  # a bug in the pass: still say which pass and after what
            raise self._failure(index, p, history, f"internal error {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        error = None
        if graph.version != version or result.changed:
            error = self._verify(index, p, graph, reference, history)
        return PassRecord(p.name, p.spec(), p.exact, result.changed, seconds, error, result.decisions, result.warnings)

    def _verify(self, index: int, p: Pass, graph: Graph, reference: list, history: list[PassRecord]) -> float:
        try:
            lint(graph)
            graph.ensure_shapes()
            outputs = run_outputs(graph.module, graph.example_inputs)
            comparison = compare_outputs(reference, outputs)
        except SlimfxError as exc:
            raise self._failure(index, p, history, f"the graph it produced is broken: {exc}") from exc
        except Exception as exc:
            raise self._failure(index, p, history, f"the graph it produced does not run: {type(exc).__name__}: {exc}") from exc
        if not comparison.shapes_match:
            raise self._failure(
                index, p, history,
                f"output shapes changed from {comparison.reference_shapes} to {comparison.candidate_shapes}",
            )
        if p.exact and comparison.relative_error > self.tolerance:
            raise self._failure(
                index, p, history,
                f"it claims to be exact but changed the outputs by {comparison.relative_error:.3g} relative "
                f"(tolerance {self.tolerance:g})",
            )
        self.outputs_after = outputs
        return comparison.relative_error

    def _failure(self, index: int, p: Pass, history: list[PassRecord], what: str) -> PassError:
        before = ", ".join(r.spec for r in history) or "none"
        return PassError(
            f"pass '{p.spec()}' ({index + 1} of {len(self.passes)}) failed: {what}. Passes run before it: {before}"
        )
