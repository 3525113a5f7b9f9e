"""A request to compile to a target, checked before any work: the target parses, the runtime
can be aimed at, the pipeline is not also given, calibration data is there."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slimfx.cost_model.target import Target, parse_target
from slimfx.errors import DataError, InvalidArgumentError
from slimfx.passes.base import Pass
from slimfx.target.meter import check_target_runtime


def check_target_request(
    target: str | None,
    passes: str | Sequence[Pass | str] | None,
    runtime: str | None,
    calib_data: Any,
    max_drop: float | None,
) -> Target | None:
    """The parsed target, or the reason a request cannot be planned, before any work."""
    if target is None:
        if max_drop is not None:
            raise InvalidArgumentError("max_drop bounds a compile to a target: give target (latency=0.5, ...) too")
        return None
    if passes is not None:
        raise InvalidArgumentError(
            "a target plans its own pipeline (prune-channels, distill with training data, fold-bn, quantize on an "
            "int8 runtime): give passes or a target, not both"
        )
    goal = parse_target(target)
    if runtime == "auto":
        raise InvalidArgumentError("a target aims at one runtime: name it (--runtime onnxruntime-int8), not auto")
    check_target_runtime(goal, runtime)
    if max_drop is not None and not max_drop >= 0:
        raise InvalidArgumentError(f"max_drop is the points of accuracy the compile may lose, >= 0, not {max_drop:g}")
    if calib_data is None:
        raise DataError(
            "a target needs calibration data to measure each candidate's sensitivity: pass calib_data=[batch, ...] "
            "(--calib FILE, or --calib random:16 for a model with random weights)"
        )
    return goal
