"""The one training loop slimfx's helpers share: Adam over batches, mean loss per epoch, progress."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#########---------------] 9/24``: a text bar for a progress line."""
    filled = round(width * done / max(total, 1))
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def fit(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    batches: Sequence[Any],
    batch_loss: Callable[[Any], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    label: str,
    progress: Callable[[str], None] | None = None,
    after_epoch: Callable[[int, float], None] | None = None,
    shuffle: bool = False,
) -> list[float]:
    """Minimize ``batch_loss(batch)`` with Adam for ``epochs`` (``params``: parameters, or Adam
    parameter groups with their own ``lr``); returns the mean loss of each epoch.

    ``after_epoch(epoch, mean_loss)`` runs after each epoch (held-out evaluation, keeping the
    best weights). With ``shuffle`` the batches are visited in a new order each epoch, drawn
    from torch's global generator (seeded: the same order on every process of a distributed
    run). Progress shows epoch, batch, running loss and the time left.
    """
    optimizer = torch.optim.Adam(list(params), lr=lr)
    history: list[float] = []
    start, steps, total_steps = time.perf_counter(), 0, epochs * max(len(batches), 1)
    for epoch in range(epochs):
        total = 0.0
        order = torch.randperm(len(batches)).tolist() if shuffle else range(len(batches))
        for index, batch in enumerate((batches[i] for i in order), 1):
            loss = batch_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            if progress:
                left = (time.perf_counter() - start) / steps * (total_steps - steps)
                progress(
                    f"{label} epoch {epoch + 1}/{epochs} {progress_bar(index, len(batches))} "
                    f"loss {total / index:.4f} ETA {left:.0f} s"
                )
        history.append(total / max(len(batches), 1))
        if after_epoch is not None:
            after_epoch(epoch, history[-1])
    return history
