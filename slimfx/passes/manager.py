"""PassManager: the pipeline builder (requirements, order, data needs) and a verified run of each pass."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.backends.early_exit import build_early_exit
from slimfx.errors import DataError, NonFiniteError, PassError, PassOrderError, SlimfxError
from slimfx.exits.plan import ExitPlan
from slimfx.fidelity import EvalSet, Fidelity, Judge, choose_eval_set
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import snapshot
from slimfx.ir.shapes import ensure_shapes
from slimfx.ir.verify import all_finite, compare_outputs, first_non_finite, lint, run_outputs
from slimfx.passes.base import Action, DataNeed, Decision, Pass, PassContext, PassResult

EXACT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: its spec, decisions, time, and the model's fidelity to the original
    after it (on the run's evaluation set; None when the graph did not change)."""

    name: str
    spec: str
    exact: bool
    changed: bool
    seconds: float
    fidelity: Fidelity | None
    decisions: tuple[Decision, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    exit_plan: ExitPlan | None = None
    verified: bool | None = None  # exact passes: checked (False: the model's own rounding noise is too large)

    @property
    def output_error(self) -> float | None:
        """Relative output error vs the original after this pass (None: graph unchanged)."""
        return None if self.fidelity is None else self.fidelity.output_error

    def to_dict(self, warn_below: float | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "exact": self.exact,
            "verified": self.verified,
            "changed": self.changed,
            "seconds": self.seconds,
            "output_error": self.output_error,
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(warn_below),
            "decisions": [d.to_dict() for d in self.decisions],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class PipelineResult:
    """The records of a run, the module to deploy (the early-exit runtime when a pass planned
    exits, else the graph's module) and its fidelity to the original on the evaluation set."""

    records: tuple[PassRecord, ...]
    module: nn.Module
    fidelity: Fidelity
    warnings: tuple[str, ...] = ()  # about the run as a whole (non-finite outputs let through)

    @property
    def exit_plan(self) -> ExitPlan | None:
        return next((r.exit_plan for r in reversed(self.records) if r.exit_plan is not None), None)


# -- building the pipeline ---------------------------------------------------------------------
def with_requirements(passes: Sequence[Pass]) -> list[Pass]:
    """``passes`` with what each requires inserted right before it, unless already earlier."""
    pipeline: list[Pass] = []
    for p in passes:
        for needed in p.requires():
            if not any(q.name == needed.name for q in pipeline):
                pipeline.append(needed)
        pipeline.append(p)
    return pipeline


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


def check_data(
    passes: Sequence[Pass], calib_data: Iterable[Any] | None, train_data: Iterable[Any] | None = None
) -> None:
    """Fail before any work when a pass needs data the caller did not give, naming the pass."""
    for p in passes:
        need = p.data_need()
        if need in (DataNeed.TRAINING, DataNeed.TRAINING_LABELLED) and train_data is None:
            raise DataError(
                f"pass '{p.spec()}' needs {need.value}: pass train_data=[batch, ...] (or (inputs, labels) "
                "batches) to slimfx.compile (--train on the command line)"
            )
        if need in (DataNeed.CALIBRATION, DataNeed.LABELLED) and calib_data is None:
            labels = " (with labels: (inputs, labels) batches)" if need is DataNeed.LABELLED else ""
            raise DataError(
                f"pass '{p.spec()}' needs {need.value}{labels}: pass calib_data=[batch, ...] to "
                "slimfx.compile (--calib on the command line)"
            )


# -- running it -----------------------------------------------------------------------------------
class PassManager:
    """Runs passes in order on a Graph, verifying the graph after each one.

    The pipeline is completed first (each pass's requirements inserted, in its own record)
    and its order checked. After every pass the graph must lint, run and keep its output
    shapes on the example inputs; a pass configured as exact must also keep its outputs within
    ``tolerance`` relative error of the graph before it. A pass that plans early exits has the
    runtime built from its plan checked the same way. After every pass that changed the graph
    the model is scored against the original on the evaluation set (``fidelity.EvalSet``; the
    example inputs when none is given): that fidelity is recorded, and the last is the run's.
    """

    def __init__(self, passes: Sequence[Pass], tolerance: float = EXACT_TOLERANCE, allow_non_finite: bool = False):
        self.passes = with_requirements(passes)
        self.tolerance = tolerance
        self.allow_non_finite = allow_non_finite  # go on with a warning where inf or nan make outputs unverifiable
        check_order(self.passes)

    def run(self, graph: Graph, ctx: PassContext | None = None, evaluation: EvalSet | None = None) -> PipelineResult:
        ctx = ctx or PassContext()
        if not ctx.example_inputs:  # batches are checked against the graph's example inputs
            ctx = dataclasses.replace(ctx, example_inputs=graph.example_inputs)
        if evaluation is None:
            evaluation, _ = choose_eval_set(None, None, graph.example_inputs)
        if ctx.teacher is None and any(p.uses_teacher for p in self.passes):
            ctx = dataclasses.replace(ctx, teacher=snapshot(graph))
        history: list[PassRecord] = []
        before = tuple(run_outputs(graph.module, graph.example_inputs))
        warnings: list[str] = []
        if not all_finite(before):
            where = first_non_finite(graph.module, graph.example_inputs)
            what = (
                f"the model's outputs hold inf or nan on the example inputs before any pass ran; "
                f"they first appear at {where}"
            )
            if not self.allow_non_finite:
                raise NonFiniteError(
                    f"{what}. No pass can be verified on such outputs: fix the weights or the inputs "
                    "(or pass allow_non_finite=True, CLI --allow-non-finite, to go on unverified)"
                )
            warnings.append(f"{what}; passes were not verified numerically")
        judge = Judge(graph.module, evaluation)
        state = _State(before, graph.module, judge.score(graph.module))
        for index, p in enumerate(self.passes):
            history.append(self._run_one(index, p, graph, ctx, history, state, judge))
        return PipelineResult(tuple(history), state.module, state.fidelity, tuple(warnings + state.warnings))

    def _run_one(
        self,
        index: int,
        p: Pass,
        graph: Graph,
        ctx: PassContext,
        history: list[PassRecord],
        state: _State,
        judge: Judge,
    ) -> PassRecord:
        version = graph.version
        state.reference = copy.deepcopy(graph.module) if p.is_exact() else None  # its rounding noise, if needed
        state.unverified = False
        start = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except SlimfxError as exc:
            raise self._failure(index, p, history, str(exc)) from exc
        except Exception as exc:  # a bug in the pass: still say which pass and after what
            raise self._failure(index, p, history, f"internal error {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        changed = graph.version != version or result.changed
        if changed:
            if state.planned_exits:
                raise self._failure(
                    index, p, history, "it changed the graph after early exits were planned on it; put add-exits last"
                )
            self._verify(index, p, graph, graph.module, state, history)
            state.module = graph.module
        if result.exit_plan is not None:
            runtime = self._early_exit_runtime(index, p, graph, result, history)
            self._verify(index, p, graph, runtime, state, history)
            state.module, state.planned_exits = runtime, True
        fidelity = None
        if changed or result.exit_plan is not None:
            fidelity = state.fidelity = self._score(index, p, judge, state.module, history)
        decisions = result.decisions
        if not changed and result.exit_plan is None and not decisions:  # "no change" always says why
            what = f" ({p.summary})" if p.summary else ""
            reason = f"nothing to change: nothing in this model that this pass{what} applies to"
            decisions = (Decision("(model)", Action.SUMMARY, reason),)
        return PassRecord(
            p.name,
            p.spec(),
            p.is_exact(),
            result.changed,
            seconds,
            fidelity,
            decisions,
            result.warnings,
            result.exit_plan,
            (not state.unverified) if p.is_exact() else None,
        )

    def _early_exit_runtime(
        self, index: int, p: Pass, graph: Graph, result: PassResult, history: list[PassRecord]
    ) -> nn.Module:
        try:
            return build_early_exit(graph.module, result.exit_plan)
        except SlimfxError as exc:
            raise self._failure(index, p, history, f"its early-exit plan cannot be built: {exc}") from exc

    def _score(self, index: int, p: Pass, judge: Judge, module: nn.Module, history: list[PassRecord]) -> Fidelity:
        try:
            return judge.score(module)
        except Exception as exc:  # ran on the example inputs, fails on the evaluation data
            raise self._failure(
                index,
                p,
                history,
                f"the model it produced does not run on {judge.evaluation.describe()}: {type(exc).__name__}: {exc}",
            ) from exc

    def _verify(
        self,
        index: int,
        p: Pass,
        graph: Graph,
        module: nn.Module | fx.GraphModule,
        state: _State,
        history: list[PassRecord],
    ) -> None:
        """Check ``module`` (the graph's, or a runtime built on it) against the outputs before ``p``."""
        try:
            lint(graph)
            ensure_shapes(graph)
            outputs = run_outputs(module, graph.example_inputs)
            comparison = compare_outputs(state.outputs, outputs)
        except SlimfxError as exc:
            raise self._failure(index, p, history, f"the graph it produced is broken: {exc}") from exc
        except Exception as exc:
            raise self._failure(
                index, p, history, f"the graph it produced does not run: {type(exc).__name__}: {exc}"
            ) from exc
        if not comparison.shapes_match:
            raise self._failure(
                index,
                p,
                history,
                f"output shapes changed from {comparison.reference_shapes} to {comparison.candidate_shapes}",
            )
        if p.is_exact() and comparison.relative_error > self.tolerance:
            noise = self._rounding_noise(state.reference, graph.example_inputs)
            # unverifiable only within what the model's own rounding could explain
            if noise is None or noise <= self.tolerance or comparison.relative_error > 10 * noise + self.tolerance:
                raise self._failure(
                    index,
                    p,
                    history,
                    f"it claims to be exact but changed the outputs by {comparison.relative_error:.3g} relative "
                    f"(tolerance {self.tolerance:g})",
                )
            state.unverified = True
            state.warnings.append(
                f"pass '{p.spec()}' could not be verified exact: this model's own float32 outputs differ from its "
                f"float64 outputs by {noise:.3g} relative (it amplifies rounding; common at random init), and the "
                f"pass changed them by {comparison.relative_error:.3g}"
            )
        if not all_finite(outputs) and all_finite(state.outputs):
            where = first_non_finite(module, graph.example_inputs) if isinstance(module, fx.GraphModule) else None
            what = (
                f"its outputs hold inf or nan on the example inputs{f'; they first appear at {where}' if where else ''}"
            )
            if not self.allow_non_finite:
                raise self._failure(index, p, history, what)
            state.warnings.append(f"pass '{p.spec()}': {what}")
        state.outputs = tuple(outputs)

    @staticmethod
    def _rounding_noise(reference: nn.Module | None, inputs: Sequence[torch.Tensor]) -> float | None:
        """How far the model before the pass is from itself in float64: its own rounding noise
        on the example inputs, the floor below which no change can be verified. None when it
        cannot run in float64."""
        if reference is None:
            return None
        wide = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        try:
            single = run_outputs(reference, inputs)
            double = run_outputs(copy.deepcopy(reference).double(), wide)
        except Exception:
            return None
        return compare_outputs(tuple(d.float() for d in double), tuple(single)).relative_error

    def _failure(self, index: int, p: Pass, history: list[PassRecord], what: str) -> PassError:
        before = ", ".join(r.spec for r in history) or "none"
        return PassError(
            f"pass '{p.spec()}' ({index + 1} of {len(self.passes)}) failed: {what}. Passes run before it: {before}"
        )


@dataclass
class _State:
    """What the run carries from pass to pass: the latest verified outputs and module."""

    outputs: tuple[torch.Tensor, ...]
    module: nn.Module
    fidelity: Fidelity  # of the latest module
    planned_exits: bool = False
    warnings: list[str] = field(default_factory=list)
    reference: nn.Module | None = None  # the module before an exact pass, to measure its rounding noise
    unverified: bool = False  # the last exact pass could not be verified (see its warning)
