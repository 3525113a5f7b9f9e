"""Training exit heads: self-distillation (backbone frozen) and BranchyNet joint training."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#########---------------] 9/24``: a text bar for a progress line."""
    filled = round(width * done / max(total, 1))
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def distill_heads(
    extractor: nn.Module, heads: Sequence[nn.Module], batches: Sequence[torch.Tensor], *,
    temperature: float, epochs: int, lr: float, progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Fit each head to the full model's softened outputs (KL at ``temperature``); no labels.

    ``extractor(x)`` returns the features at every exit followed by the model's output. The
    backbone stays frozen. Returns the mean loss of each epoch.
    """
    params = [p for head in heads for p in head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    history = []
    for epoch in range(epochs):
        total = 0.0
        for x in batches:
            with torch.no_grad():
                *features, teacher = extractor(x)
                target = F.softmax(teacher / temperature, dim=-1)
            loss = sum(
                F.kl_div(F.log_softmax(head(f) / temperature, dim=-1), target, reduction="batchmean")
                for head, f in zip(heads, features)
            ) * temperature**2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        history.append(total / max(len(batches), 1))
        if progress:
            progress(f"add-exits: distilling heads {progress_bar(epoch + 1, epochs)} loss {history[-1]:.4f}")
    return history


def train_branchynet(
    extractor: nn.Module, heads: Sequence[nn.Module], batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
    epochs: int, lr: float, exit_weight: float = 1.0, progress: Callable[[str], None] | None = None,
) -> list[float]:
    """BranchyNet: backbone and heads together on labels, loss = final + weight x sum of exits."""
    params = list(extractor.parameters()) + [p for head in heads for p in head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    extractor.train()
    history = []
    try:
        for epoch in range(epochs):
            total = 0.0
            for x, y in batches:
                *features, final = extractor(x)
                loss = F.cross_entropy(final, y) + exit_weight * sum(F.cross_entropy(h(f), y) for h, f in zip(heads, features))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            history.append(total / max(len(batches), 1))
            if progress:
                progress(f"add-exits: joint training {progress_bar(epoch + 1, epochs)} loss {history[-1]:.4f}")
    finally:
        extractor.eval()
    return history
