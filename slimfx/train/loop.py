"""The one training loop slimfx's helpers share: Adam over batches, mean loss per epoch, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#########---------------] 9/24``: a text bar for a progress line."""
    filled = round(width * done / max(total, 1))
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def fit(
    params: Iterable[torch.nn.Parameter],
    batches: Sequence[Any],
    batch_loss: Callable[[Any], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    label: str,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Minimize ``batch_loss(batch)`` with Adam for ``epochs``; returns the mean loss of each epoch."""
    optimizer = torch.optim.Adam(list(params), lr=lr)
    history = []
    for epoch in range(epochs):
        total = 0.0
        for batch in batches:
            loss = batch_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        history.append(total / max(len(batches), 1))
        if progress:
            progress(f"{label} {progress_bar(epoch + 1, epochs)} loss {history[-1]:.4f}")
    return history
