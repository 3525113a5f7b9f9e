"""Whether a structure rewrite is predicted to pay: a layer and its replacement, each
predicted as a small graph on the runtime the user deploys to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from slimfx.backends.profiler import module_ms
from slimfx.cost_model.latency import PredictedRuntime


@dataclass(frozen=True)
class PredictedSpeed:
    """A layer's and its replacement's predicted ms on ``runtime`` (kernels only)."""

    runtime: str
    before_ms: float
    after_ms: float

    @property
    def pays(self) -> bool:
        return self.after_ms < self.before_ms

    def __str__(self) -> str:
        return f"predicted on {self.runtime}: {self.before_ms:.3f} ms -> {self.after_ms:.3f} ms"


def predicted_speed(
    before: nn.Module,
    after: nn.Module,
    in_shape: tuple[int, ...],
    runtime: PredictedRuntime | None,
    progress: Callable[[str], None] | None = None,
) -> PredictedSpeed | None:
    """Both modules predicted on ``runtime`` (None without one)."""
    if runtime is None:
        return None
    return PredictedSpeed(
        runtime, module_ms(before, in_shape, runtime, progress), module_ms(after, in_shape, runtime, progress)
    )
