"""The original and the compiled model measured side by side in every chosen runtime.

Each session is built, checked against the original's torch fp32 outputs, timed on its own
(warm-up, then the median of ``repeats`` runs) and released before the next one is built, so
no two runtimes compete for the cores. The fastest compiled row is marked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from slimfx.backends.runtimes import Runtime, RuntimeChoice, Workspace, first_output
from slimfx.errors import BackendError
from slimfx.metrics import relative_error, top1_accuracy, top1_agreement

Inputs = tuple[torch.Tensor, ...]
ORIGINAL, COMPILED = "original", "compiled"


@dataclass(frozen=True)
class RuntimeMeasurement:
    """One model in one runtime: latency, what ran, how close its outputs are to the original's."""

    runtime: str
    model: str  # ORIGINAL or COMPILED
    latency_ms: float | None
    precision: str = ""
    kernels: dict[str, int] = field(default_factory=dict)
    agreement: float | None = None  # top-1 agreement with the original in torch fp32 (classifier outputs)
    relative_error: float | None = None  # vs the original in torch fp32
    accuracy: float | None = None  # top-1 accuracy on the labels, when there are labels
    failure: str | None = None  # why it could not be built or run
    predicted_ms: float | None = None  # predicted from the device profile, where the runtime has a latency model

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "model": self.model,
            "latency_ms": self.latency_ms,
            "precision": self.precision,
            "kernels": dict(self.kernels),
            "agreement": self.agreement,
            "relative_error": self.relative_error,
            "accuracy": self.accuracy,
            "failure": self.failure,
            "predicted_ms": self.predicted_ms,
        }


@dataclass(frozen=True)
class RuntimeComparison:
    """Every measurement of one comparison, with what it was measured on."""

    rows: tuple[RuntimeMeasurement, ...]
    baseline_ms: float  # the original in torch eager fp32
    batch: int
    threads: int
    agreement_on: str  # the data agreement and error were measured on
    skipped: tuple[tuple[str, str], ...] = ()  # (runtime, why it was not measured)
    float_flavour: dict[str, str] = field(default_factory=dict)  # runtime -> where its original is measured

    def row(self, runtime: str, model: str) -> RuntimeMeasurement | None:
        return next((r for r in self.rows if r.runtime == runtime and r.model == model), None)

    def with_predictions(self, predicted: Mapping[tuple[str, str], float]) -> RuntimeComparison:
        """The same comparison with predicted ms on the rows ``predicted`` names by (runtime, model)."""
        rows = tuple(
            replace(r, predicted_ms=predicted[(r.runtime, r.model)]) if (r.runtime, r.model) in predicted else r
            for r in self.rows
        )
        return replace(self, rows=rows)

    def speedup_in_runtime(self, row: RuntimeMeasurement) -> float | None:
        """A compiled row's speedup over the original in its runtime's float flavour."""
        original = self.row(self.float_flavour.get(row.runtime, row.runtime), ORIGINAL)
        if row.latency_ms is None or original is None or original.latency_ms is None:
            return None
        return original.latency_ms / row.latency_ms

    @property
    def fastest(self) -> RuntimeMeasurement | None:
        """The compiled row with the lowest latency."""
        timed = [r for r in self.rows if r.model == COMPILED and r.latency_ms is not None]
        return min(timed, key=lambda r: r.latency_ms or 0.0) if timed else None

    def to_dict(self) -> dict[str, Any]:
        fastest = self.fastest
        return {
            "baseline": "original in torch eager fp32",
            "baseline_ms": self.baseline_ms,
            "batch": self.batch,
            "threads": self.threads,
            "agreement_on": self.agreement_on,
            "fastest": fastest.runtime if fastest else None,
            "rows": [
                {**r.to_dict(), "speedup_in_runtime": self.speedup_in_runtime(r) if r.model == COMPILED else None}
                for r in self.rows
            ],
            "skipped": [{"runtime": n, "reason": why} for n, why in self.skipped],
        }


def compare_runtimes(
    original: nn.Module,
    compiled: nn.Module,
    choice: RuntimeChoice,
    example_inputs: Sequence[torch.Tensor],
    *,
    eval_inputs: Sequence[Inputs] = (),
    eval_labels: torch.Tensor | None = None,
    agreement_on: str = "the example inputs",
    repeats: int = 20,
    progress: Callable[[str], None] | None = None,
) -> RuntimeComparison:
    """Time ``original`` in each chosen runtime's float flavour and ``compiled`` in each chosen
    runtime, on ``example_inputs``; check every session's outputs on ``eval_inputs`` (the
    example inputs when empty) against the original's torch fp32 outputs, and their top-1
    accuracy on ``eval_labels`` (one per row of ``eval_inputs``) when given."""
    example = tuple(example_inputs)
    checks = list(eval_inputs) or [example]
    with torch.inference_mode():
        reference = torch.cat([first_output(original.eval()(*x)).float() for x in checks])
    rows = []
    jobs = [(r, original, ORIGINAL) for r in choice.original] + [(r, compiled, COMPILED) for r in choice.compiled]
    with Workspace(example) as workspace:
        for step, (runtime, module, role) in enumerate(jobs, 1):
            if progress is not None:
                progress(f"measuring the {role} model in {runtime.name} ({step}/{len(jobs)})")
            rows.append(_measure(runtime, module, role, workspace, example, checks, reference, eval_labels, repeats))
    baseline = next((r.latency_ms for r in rows if r.runtime == "torch" and r.model == ORIGINAL), None)
    if baseline is None:
        from slimfx.backends.timing import module_latency_ms

        baseline = module_latency_ms(original, example, repeats)
    batch = int(example[0].shape[0]) if example and example[0].dim() else 1
    return RuntimeComparison(
        tuple(rows),
        baseline,
        batch,
        torch.get_num_threads(),
        agreement_on,
        choice.skipped,
        {r.name: r.float_flavour for r in choice.compiled},
    )


def _measure(
    runtime: Runtime,
    module: nn.Module,
    role: str,
    workspace: Workspace,
    example: Inputs,
    checks: list[Inputs],
    reference: torch.Tensor,
    labels: torch.Tensor | None,
    repeats: int,
) -> RuntimeMeasurement:
    try:
        session = runtime.session(module, workspace)
        outputs = torch.cat([session.run(x) for x in checks])
        latency = session.latency_ms(example, repeats)
    except BackendError as exc:
        return RuntimeMeasurement(runtime.name, role, None, failure=str(exc))
    except Exception as exc:  # a runtime's own failure is a row of the table, not the end of the run
        return RuntimeMeasurement(runtime.name, role, None, failure=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    return RuntimeMeasurement(
        runtime.name,
        role,
        latency,
        session.precision(),
        session.kernels(),
        top1_agreement(reference, outputs),
        relative_error(reference, outputs),
        None if labels is None else top1_accuracy(outputs, labels),
    )
