"""Quantization-aware training: fine-tune a quantized module (fake quant forward, float backward).

Jacob et al.'s 8-bit scheme: the forward pass sees quantized weights and inputs, the rounding
passes gradients straight through, the optimizer updates the float weights underneath.
BatchNorms that were not folded are frozen (running statistics kept), as the paper recommends
for the end of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from slimfx.errors import DataError, InvalidArgumentError
from slimfx.train.loop import fit


def qat(
    module: nn.Module,
    data: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Train ``module`` on ``(inputs, targets)`` batches; returns the mean loss of each epoch."""
    if epochs < 1:
        raise InvalidArgumentError(f"qat: epochs must be at least 1, got {epochs}")
    batches = list(data)
    if not batches:
        raise DataError("qat: no training data")
    params = [p for p in module.parameters() if p.requires_grad]
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # frozen statistics
    try:
        return fit(
            params,
            batches,
            lambda batch: loss_fn(module(batch[0]), batch[1]),
            epochs=epochs,
            lr=lr,
            label="qat:",
            progress=progress,
        )
    finally:
        module.eval()
