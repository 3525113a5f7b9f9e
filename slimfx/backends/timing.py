"""Measured latency: warm-up, repeated runs, the median (noisy machines need medians)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
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


class _NodeTimer(fx.Interpreter):
    """Runs a graph node by node, adding each node's wall time to ``self.ms``."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.ms: dict[str, list[float]] = {node.name: [] for node in module.graph.nodes}

    def run_node(self, node: fx.Node) -> object:
        start = time.perf_counter()
        result = super().run_node(node)
        self.ms[node.name].append((time.perf_counter() - start) * 1000)
        return result


def node_latency_ms(module: fx.GraphModule, inputs: Sequence[torch.Tensor], repeats: int = 10) -> dict[str, float]:
    """Median eager wall time of each node of ``module`` on ``inputs`` (node name -> ms), run
    node by node after one warm-up run. The nodes' sum is a little above the whole module's
    latency: the interpreter adds a few microseconds per node."""
    timer = _NodeTimer(module)
    with torch.inference_mode():
        timer.run(*inputs)
        timer.ms = {name: [] for name in timer.ms}
        for _ in range(max(repeats, 1)):
            timer.run(*inputs)
    return {name: statistics.median(times) for name, times in timer.ms.items() if times}
