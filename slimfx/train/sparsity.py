"""Network Slimming's sparsity term: L1 on BatchNorm scales, added to the training loss.

Training with ``loss + bn_sparsity_penalty(model, 1e-4)`` drives the scales (gamma) of
unneeded channels towards zero, so ``prune-channels:criterion=bn-scale`` can remove them with
little loss of accuracy (Liu et al., "Learning Efficient Convolutional Networks through
Network Slimming", 2017)::

    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + slimfx.train.bn_sparsity_penalty(model, 1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimfx.errors import InvalidArgumentError


def bn_sparsity_penalty(model: nn.Module, weight: float) -> torch.Tensor:
    """``weight`` x the sum of |gamma| over every affine BatchNorm in ``model`` (differentiable)."""
    if weight < 0:
        raise InvalidArgumentError(f"bn_sparsity_penalty: weight must be >= 0, got {weight}")
    gammas = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    if not gammas:
        raise InvalidArgumentError("bn_sparsity_penalty: the model has no affine BatchNorm layer to regularize")
    return weight * torch.stack(gammas).sum()
