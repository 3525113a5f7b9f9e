"""Fidelity: how close a compiled model stays to the original, measured on data.

Every pass and the whole pipeline are judged on one ``EvalSet``: the user's evaluation data,
else held-out calibration batches, else (no data at all) the example inputs, and the set says
which. ``Fidelity`` is what one model scored there against the original: top-1 agreement,
accuracy before and after when the set has labels, and the relative output error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from slimfx.data import Batch, batches
from slimfx.ir.verify import run_outputs
from slimfx.metrics import relative_error, top1_accuracy, top1_agreement

HOLD_OUT_MIN_ROWS = 20  # fewer calibration rows than this: nothing is held out, the passes see them all
DESTROYED_ERROR = 0.9  # a relative output error this large leaves almost nothing of the original's output
DEFAULT_WARN_BELOW = 0.95  # top-1 agreement under which compile warns


@dataclass(frozen=True)
class EvalSet:
    """The batches fidelity is measured on and where they came from."""

    batches: tuple[Batch, ...]
    source: str  # "evaluation data", "held-out calibration data", ...
    caveat: str = ""  # what the figures on it do not show

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.batches)

    @property
    def labelled(self) -> bool:
        return bool(self.batches) and all(b.labels is not None for b in self.batches)

    @property
    def labels(self) -> torch.Tensor | None:
        return torch.cat([b.labels for b in self.batches]) if self.labelled else None

    def describe(self) -> str:
        """``3 batches of evaluation data (297 rows, labelled)``."""
        count = len(self.batches)
        caveat = f"; {self.caveat}" if self.caveat else ""
        return (
            f"{count} batch{'es' if count != 1 else ''} of {self.source} "
            f"({self.rows} row{'s' if self.rows != 1 else ''}{', labelled' if self.labelled else ''}{caveat})"
        )


def choose_eval_set(
    eval_data: Iterable[Any] | torch.Tensor | None,
    calib_data: Iterable[Any] | torch.Tensor | None,
    example_inputs: Sequence[torch.Tensor],
    fixed_rows: int | None = None,
) -> tuple[EvalSet, list[Batch] | None]:
    """The evaluation set, and the calibration batches left for the passes (None: no calibration data).

    ``eval_data`` when given; else the last tenth of the calibration batches, held out from the
    passes, when there are at least two batches and ``HOLD_OUT_MIN_ROWS`` rows; else all the
    calibration batches (the passes see them too, which the source says); else the example inputs.
    """
    calibration = None if calib_data is None else list(batches(calib_data, example_inputs, "calib_data", fixed_rows))
    if eval_data is not None:
        return EvalSet(
            tuple(batches(eval_data, example_inputs, "eval_data", fixed_rows)), "evaluation data"
        ), calibration
    if calibration:
        rows = sum(b.rows for b in calibration)
        if len(calibration) >= 2 and rows >= HOLD_OUT_MIN_ROWS:
            kept = len(calibration) - math.ceil(len(calibration) / 10)
            return EvalSet(tuple(calibration[kept:]), "held-out calibration data"), calibration[:kept]
        caveat = "the passes used them too: too few to hold any out"
        return EvalSet(tuple(calibration), "calibration data", caveat), calibration
    return EvalSet((Batch(tuple(example_inputs)),), "the example inputs", "no evaluation or calibration data"), None


@dataclass(frozen=True)
class Fidelity:
    """One model against the original on an evaluation set."""

    on: str  # the set, described
    output_error: float  # relative, the worst over the outputs
    agreement: float | None = None  # top-1, of the first output; None when it is not class scores
    accuracy: float | None = None  # top-1 on the set's labels
    original_accuracy: float | None = None

    @property
    def destroyed(self) -> bool:
        """Whether the output is essentially gone (relative error near or above 1)."""
        return not self.output_error < DESTROYED_ERROR

    def below(self, threshold: float) -> bool:
        """Whether top-1 agreement fell under ``threshold``."""
        return self.agreement is not None and self.agreement < threshold

    def text(self) -> str:
        """``top-1 agreement 0.9832, accuracy 98.99% -> 98.32%, output error 0.281``."""
        parts = [] if self.agreement is None else [f"top-1 agreement {self.agreement:.4f}"]
        if self.accuracy is not None and self.original_accuracy is not None:
            parts.append(f"accuracy {self.original_accuracy:.2%} -> {self.accuracy:.2%}")
        parts.append(f"output error {self.output_error:.3g}")
        return ", ".join(parts)

    def to_dict(self, warn_below: float | None = None) -> dict[str, Any]:
        return {
            "on": self.on,
            "agreement": self.agreement,
            "accuracy": self.accuracy,
            "original_accuracy": self.original_accuracy,
            "output_error": self.output_error,
            "destroyed": self.destroyed,
            **({} if warn_below is None else {"below_threshold": self.below(warn_below)}),
        }


class Judge:
    """Scores models against the original's outputs on one evaluation set."""

    def __init__(self, original: nn.Module, evaluation: EvalSet):
        self.evaluation = evaluation
        self.reference = _outputs(original, evaluation)
        labels = evaluation.labels
        self.original_accuracy = None if labels is None else top1_accuracy(self.reference[0], labels)

    def score(self, module: nn.Module) -> Fidelity:
        """``module``'s fidelity to the original on the set."""
        outputs = _outputs(module, self.evaluation)
        error = max((relative_error(r, c) for r, c in zip(self.reference, outputs)), default=0.0)
        labels = self.evaluation.labels
        return Fidelity(
            self.evaluation.describe(),
            error,
            top1_agreement(self.reference[0], outputs[0]) if outputs else None,
            None if labels is None or not outputs else top1_accuracy(outputs[0], labels),
            self.original_accuracy,
        )


def _outputs(module: nn.Module, evaluation: EvalSet) -> list[torch.Tensor]:
    """Each output of ``module`` over the whole set, batches concatenated."""
    per_batch = [
        [t.reshape(1) if not t.dim() else t for t in run_outputs(module, b.inputs)] for b in evaluation.batches
    ]
    return [torch.cat([outs[k] for outs in per_batch]) for k in range(len(per_batch[0]))] if per_batch else []
