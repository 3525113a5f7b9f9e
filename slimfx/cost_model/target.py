"""Budgets a compile aims at: ``latency=0.5``, ``latency=8ms``, ``macs=0.3``, ``size=2MB``.

A relative target is a fraction of the original model's figure (for latency: the original on
the float flavour of the chosen runtime); an absolute one is in milliseconds or bytes. Parsing
is pure and strict: anything else is an error naming the accepted forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from slimfx.errors import InvalidArgumentError

Unit = Literal["latency", "macs", "size"]
UNITS: tuple[Unit, ...] = ("latency", "macs", "size")
_SIZE_FACTORS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}
_FORMS = "latency=F or latency=Nms, macs=F, size=F or size=N(KB|MB|GB), with F a fraction in (0, 1]"


@dataclass(frozen=True)
class Target:
    """What to reach: ``fraction`` of the original's figure, or ``absolute`` (ms or bytes)."""

    unit: Unit
    fraction: float | None = None
    absolute: float | None = None

    def budget(self, original: float) -> float:
        """The figure to reach, given the original's (ms, MACs or bytes)."""
        return self.absolute if self.absolute is not None else (self.fraction or 1.0) * original

    @property
    def symbol(self) -> str:
        """The unit of ``budget``: ``ms``, ``MACs`` or ``bytes``."""
        return {"latency": "ms", "macs": "MACs", "size": "bytes"}[self.unit]

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.unit}={self.fraction:g}"
        if self.unit == "latency":
            return f"latency={self.absolute:g}ms"
        return f"size={(self.absolute or 0) / 1e6:g}MB"


def parse_target(text: str) -> Target:
    """A ``Target`` from ``UNIT=VALUE``; an ``InvalidArgumentError`` naming the forms otherwise."""
    unit, sep, raw = text.strip().lower().partition("=")
    if not sep or unit not in UNITS:
        raise InvalidArgumentError(f"target {text!r}: expected {_FORMS}")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*([a-z]*)", raw.strip())
    if match is None:
        raise InvalidArgumentError(f"target {text!r}: {raw!r} is not a number; expected {_FORMS}")
    value, suffix = float(match.group(1)), match.group(2)
    if not suffix:
        if not 0 < value <= 1:
            raise InvalidArgumentError(f"target {text!r}: a fraction of the original must be in (0, 1]")
        return Target(unit, fraction=value)  # type: ignore[arg-type]
    if unit == "latency" and suffix == "ms" and value > 0:
        return Target("latency", absolute=value)
    if unit == "size" and suffix in _SIZE_FACTORS and value > 0:
        return Target("size", absolute=value * _SIZE_FACTORS[suffix])
    raise InvalidArgumentError(f"target {text!r}: {unit} does not take {suffix!r}; expected {_FORMS}")
