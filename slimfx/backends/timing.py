"""Measured latency: warm-up, repeated runs, the median (noisy machines need medians)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def module_latency_ms(module: nn.Module, inputs: Sequence[torch.Tensor], repeats: int = 20) -> float:
    """Median eager latency of ``module(*inputs)`` under ``torch.inference_mode``."""
    with torch.inference_mode():
        return median_ms(lambda: module(*inputs), repeats)


def baseline_name(inputs: Sequence[torch.Tensor]) -> str:
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    return f"torch eager fp32, batch {batch}, {torch.get_num_threads()} threads"
