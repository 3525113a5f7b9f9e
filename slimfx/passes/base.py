"""Pass, PassContext, PassResult and Decision: the contract every pass follows."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

from slimfx.errors import PassSpecError
from slimfx.ir.graph import Graph


@dataclass(frozen=True)
class Decision:
    """What a pass did to one layer, or why it left it alone.

    ``error`` is a measured relative error (weight reconstruction or layer output) when the
    pass measured one; ``None`` means not measured, never "zero". ``action == "summary"``
    marks a row about the whole pass (quantize's model size), not about one layer.
    """

    target: str
    action: str
    reason: str
    macs_before: int | None = None
    macs_after: int | None = None
    error: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def declined(self) -> bool:
        return self.action == "declined"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "action": self.action,
            "reason": self.reason,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "error": self.error,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class PassResult:
    """Whether the graph changed, one Decision per layer touched or declined, warnings."""

    changed: bool
    decisions: tuple[Decision, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass
class PassContext:
    """What passes need besides the graph."""

    calib_data: Iterable[Any] | None = None
    seed: int = 0
    progress: Callable[[str], None] | None = None

    def report_progress(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


@dataclass(frozen=True)
class Pass:
    """A graph transformation: options as dataclass fields, a kebab-case ``name``.

    ``runs_after`` maps pass names that must come earlier in a pipeline (when both are in
    it) to the reason; ``runs_before`` likewise for names that must come later.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    runs_after: ClassVar[Mapping[str, str]] = {}
    runs_before: ClassVar[Mapping[str, str]] = {}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

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
