"""Quantization-aware training: fine-tune a quantized module (fake quant forward, float backward).

Jacob et al.'s 8-bit scheme: the forward pass sees quantized weights and inputs, the rounding
passes gradients straight through, the optimizer updates the float weights underneath.
BatchNorms that were not folded are frozen (running statistics kept), as the paper recommends
for the end of training.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn


def qat(
    module: nn.Module, data: Iterable[tuple[Any, Any]], loss_fn: Callable[[Any, Any], torch.Tensor], *,
    epochs: int = 1, lr: float = 1e-3, progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Train ``module`` on ``(inputs, targets)`` batches; returns the mean loss of each epoch."""
    if epochs < 1:
        raise ValueError(f"qat: epochs must be at least 1, got {epochs}")
    batches = list(data)
    if not batches:
        raise ValueError("qat: no training data")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # frozen statistics
    history = []
    try:
        for epoch in range(epochs):
            total = 0.0
            for x, y in batches:
                loss = loss_fn(module(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            history.append(total / len(batches))
            if progress:
                progress(f"qat: epoch {epoch + 1}/{epochs}, loss {history[-1]:.4f}")
    finally:
        module.eval()
    return history
