"""Training exit heads: self-distillation (backbone frozen) and BranchyNet joint training."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.train.loop import fit


def distill_heads(
    extractor: nn.Module,
    heads: Sequence[nn.Module],
    batches: Sequence[torch.Tensor],
    *,
    temperature: float,
    epochs: int,
    lr: float,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Fit each head to the full model's softened outputs (KL at ``temperature``); no labels.

    ``extractor(x)`` returns the features at every exit followed by the model's output. The
    backbone stays frozen. Returns the mean loss of each epoch.
    """

    def loss(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            *features, teacher = extractor(x)
            target = F.softmax(teacher / temperature, dim=-1)
        return (
            sum(
                F.kl_div(F.log_softmax(head(f) / temperature, dim=-1), target, reduction="batchmean")
                for head, f in zip(heads, features)
            )
            * temperature**2
        )

    params = [p for head in heads for p in head.parameters()]
    return fit(params, batches, loss, epochs=epochs, lr=lr, label="add-exits: distilling heads", progress=progress)


def train_branchynet(
    extractor: nn.Module,
    heads: Sequence[nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    lr: float,
    exit_weight: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """BranchyNet: backbone and heads together on labels, loss = final + weight x sum of exits."""

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        *features, final = extractor(x)
        return F.cross_entropy(final, y) + exit_weight * sum(F.cross_entropy(h(f), y) for h, f in zip(heads, features))

    params = list(extractor.parameters()) + [p for head in heads for p in head.parameters()]
    extractor.train()
    try:
        return fit(params, batches, loss, epochs=epochs, lr=lr, label="add-exits: joint training", progress=progress)
    finally:
        extractor.eval()
