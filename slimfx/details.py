"""The base of typed per-decision details: a frozen dataclass whose ``to_dict`` is the JSON ``details``.

Each pass (and each technique's data that a decision carries, like an exit's statistics)
subclasses it; imports nothing of slimfx, so every layer can.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Details:
    """Per-decision details; ``to_dict`` gives the documented JSON object (docs/report-schema.md)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def channels(self) -> tuple[int, int] | None:
        """Channels before and after, for reports that show them (pruning); None otherwise."""
        return None

    def summary_lines(self) -> tuple[str, ...]:
        """Lines a report prints under the pass's table (a loss curve, say); none by default."""
        return ()


def to_plain(value: Any) -> Any:
    """Nested Details, tuples and lists as JSON-ready values."""
    if isinstance(value, Details):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return value
