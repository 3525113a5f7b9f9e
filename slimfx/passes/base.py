"""The contract every pass follows: Pass, PassContext, PassResult, Decision and its typed details."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from slimfx.data import Batch, batches
from slimfx.details import Details
from slimfx.errors import DataError, PassSpecError
from slimfx.exits.plan import ExitPlan
from slimfx.ir.graph import Graph


class Action(enum.StrEnum):
    """What a pass did to one target (the JSON ``action`` is the value)."""

    DECLINED = "declined"
    FOLDED = "folded"
    REMOVED = "removed"
    PRUNED = "pruned"
    FACTORIZED = "factorized"
    REWRITTEN = "rewritten"  # a structure rewrite (mixconv, crelu, group-convs, fire, ...)
    QUANTIZED = "quantized"
    EXIT = "exit"
    TRAINED = "trained"  # weights trained (distillation), structure unchanged
    SUMMARY = "summary"  # a row about the whole pass (quantize's model size), not one layer


@dataclass(frozen=True)
class Decision:
    """What a pass did to one layer, or why it left it alone.

    ``error`` is a measured relative error (weight reconstruction or layer output) when the
    pass measured one; ``None`` means not measured, never "zero".
    """

    target: str
    action: Action
    reason: str
    macs_before: int | None = None
    macs_after: int | None = None
    error: float | None = None
    details: Details | None = None

    @property
    def declined(self) -> bool:
        return self.action is Action.DECLINED

    @property
    def changed_a_layer(self) -> bool:
        return self.action not in (Action.DECLINED, Action.SUMMARY, Action.TRAINED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "action": str(self.action),
            "reason": self.reason,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "error": self.error,
            "details": self.details.to_dict() if self.details is not None else {},
        }


@dataclass(frozen=True)
class PassResult:
    """Whether the graph changed, one Decision per layer touched or declined, warnings, and
    what the pass hands on beside the graph (an early-exit plan)."""

    changed: bool
    decisions: tuple[Decision, ...] = ()
    warnings: tuple[str, ...] = ()
    exit_plan: ExitPlan | None = None


class DataNeed(enum.Enum):
    """What data a configured pass needs besides the graph."""

    NONE = "none"
    CALIBRATION = "calibration data"  # inputs (labels optional)
    LABELLED = "labelled training data"  # inputs and labels
    TRAINING = "training data"  # inputs (labels optional), given as train_data
    TRAINING_LABELLED = "training data with labels"  # (inputs, labels) batches, given as train_data


@dataclass
class PassContext:
    """What passes need besides the graph: data (as ``Batch`` objects), the seed, progress."""

    calib_data: Iterable[Any] | torch.Tensor | None = None
    example_inputs: Sequence[torch.Tensor] = ()
    seed: int = 0
    progress: Callable[[str], None] | None = None
    fixed_rows: int | None = None  # the graph was traced at fixed shapes: batches of this many rows
    train_data: Iterable[Any] | torch.Tensor | None = None
    teacher: Graph | None = None  # the graph before the first pass, for passes that learn from it

    def report_progress(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def train_batches(self, pass_name: str) -> list[Batch]:
        """The training data as checked ``Batch`` objects; a clear error names the pass when
        there is none."""
        if self.train_data is None:
            raise DataError(
                f"{pass_name} needs training data: pass train_data=[batch, ...] to slimfx.compile "
                "(--train on the command line)"
            )
        loaded = list(batches(self.train_data, self.example_inputs, "train_data", self.fixed_rows))
        if not loaded:
            raise DataError(f"{pass_name}: train_data is empty")
        return loaded

    def batches(self, pass_name: str) -> Iterator[Batch]:
        """The calibration data as checked ``Batch`` objects; a clear error names the pass
        when there is none."""
        if self.calib_data is None:
            raise DataError(
                f"{pass_name} needs calibration data: pass calib_data=[batch, ...] to slimfx.compile "
                "(--calib on the command line)"
            )
        count = 0
        for batch in batches(self.calib_data, self.example_inputs, fixed_rows=self.fixed_rows):
            count += 1
            yield batch
        if count == 0:
            raise DataError(f"{pass_name}: calib_data is empty")


@dataclass(frozen=True)
class Pass:
    """A graph transformation: options as dataclass fields, a kebab-case ``name``.

    ``runs_after`` maps pass names that must come earlier in a pipeline (when both are in
    it) to the reason; ``runs_before`` likewise for names that must come later.
    ``requires()`` lists passes the pipeline builder inserts before this one when absent;
    ``data_need()`` what data it needs (checked before capture); ``is_exact()`` whether the
    configured pass must keep the outputs (the manager then verifies it).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False  # the manager then keeps the graph before the first pass
    quantizes: ClassVar[bool] = False  # leaves slimfx's int8 graph (runs on the int8 runtimes only)
    makes_early_exits: ClassVar[bool] = False  # plans early exits: the result is an EarlyExitModel
    summary: ClassVar[str] = ""
    option_help: ClassVar[Mapping[str, str]] = {}  # field name -> one line of help (slimfx passes NAME)
    value_hints: ClassVar[Mapping[tuple[str, str], str]] = {}  # (option, a wrong value) -> what to give instead
    runs_after: ClassVar[Mapping[str, str]] = {}
    runs_before: ClassVar[Mapping[str, str]] = {}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def requires(self) -> tuple[Pass, ...]:
        return ()

    def data_need(self) -> DataNeed:
        return DataNeed.NONE

    def is_exact(self) -> bool:
        return self.exact

    def options(self) -> dict[str, Any]:
        """Option values keyed by the names users type (kebab-case)."""
        return {option_name(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pipeline spec that recreates this pass, e.g. ``prune-channels:ratio=0.5``."""
        defaults = {option_name(f.name): f.default for f in dataclasses.fields(self)}
        changed = [f"{k}={_format(v)}" for k, v in self.options().items() if v != defaults[k]]
        return self.name + (":" + ",".join(changed) if changed else "")

    def invalid(self, option: str, value: Any, expected: str) -> PassSpecError:
        """The error for an option value out of range, to raise from ``__post_init__``."""
        return PassSpecError(f"{self.name}: invalid value {value!r} for option '{option}': expected {expected}")


def option_name(field_name: str) -> str:
    """The name users type for an option field: ``min_channels`` -> ``min-channels``.

    A trailing underscore lets an option be a Python keyword: field ``global_`` is ``global``.
    """
    return field_name.rstrip("_").replace("_", "-")


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)
