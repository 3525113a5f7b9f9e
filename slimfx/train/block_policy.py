"""Training the policy of dynamic BlockDrop: which residual blocks each input runs.

The policy is a small CNN on a downsampled input with one logit per droppable block. It is
trained with a straight-through Gumbel-sigmoid relaxation (the forward pass takes hard
decisions, gradients flow through the soft ones), the model's stages gated per row
(``y = x + m * (block(x) - x)``), against a loss of distillation from the original model plus a
penalty that pulls the expected cost of a row (its kept blocks' predicted milliseconds, over
the full model's) to the target. The model's own weights are fine-tuned with it (``joint``),
as BlockDrop finetunes its ResNet once the policy is learned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.train.distill import kd_loss
from slimfx.train.loop import fit

TEMPERATURE = 1.0  # of the Gumbel-sigmoid
COST_WEIGHT = 50.0  # of the squared distance of the expected cost from the target
START_BIAS = 3.0  # the policy keeps every block at first


class BlockPolicy(nn.Module):
    """A small CNN on the input downsampled to ``size`` x ``size``: one logit per block."""

    def __init__(self, in_channels: int, blocks: int, size: int = 16, width: int = 16):
        super().__init__()
        self.size = size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.logits = nn.Linear(2 * width, blocks)
        nn.init.zeros_(self.logits.weight)
        nn.init.constant_(self.logits.bias, START_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(F.adaptive_avg_pool2d(x, self.size)))


def gumbel_gates(logits: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Hard 0/1 gates in the forward pass, the gradient of the Gumbel-sigmoid in the backward one."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(uniform) - torch.log1p(-uniform)  # logistic: the difference of two Gumbels
    soft = torch.sigmoid((logits + noise) / temperature)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def expected_cost(gates: torch.Tensor, block_ms: torch.Tensor, full_ms: float) -> torch.Tensor:
    """Mean over rows of each row's predicted ms (the rest of the model, plus the blocks it
    keeps) as a share of the full model's."""
    rest = full_ms - float(block_ms.sum())
    return ((rest + gates @ block_ms) / full_ms).mean()


def gated_forward(
    stages: Sequence[nn.Module], block_stages: Sequence[int], gates: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The stages on every row, each block's output mixed per row: gate 1 keeps it, 0 passes
    its input on (what the runtime does by skipping the rows)."""
    block_of = {stage: k for k, stage in enumerate(block_stages)}
    features = x
    for index, stage in enumerate(stages):
        if index not in block_of:
            features = stage(features)
        else:
            gate = gates[:, block_of[index]].reshape(-1, *([1] * (features.dim() - 1)))
            features = features + gate * (stage(features) - features)
    return features


@dataclass(frozen=True)
class PolicyOutcome:
    """Loss per epoch and, on the training rows, the kept share of each block and the expected cost."""

    losses: tuple[float, ...]
    kept: tuple[float, ...]
    expected_cost: float


def train_policy(
    stages: Sequence[nn.Module],
    block_stages: Sequence[int],
    policy: BlockPolicy,
    teacher: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    block_ms: torch.Tensor,
    full_ms: float,
    target: float,
    *,
    epochs: int,
    lr: float = 1e-3,
    model_lr: float = 1e-4,
    progress: Callable[[str], None] | None = None,
) -> PolicyOutcome:
    """Train ``policy`` (and, at ``model_lr``, the stages) so the expected cost nears ``target``
    while the outputs stay close to ``teacher``'s (labels, when given, join the KD loss)."""
    with torch.no_grad():
        teacher_logits = [teacher(x) for x, _ in batches]
    modules = nn.ModuleList(stages)
    modules.train()
    policy.train()

    def loss_of(index: int) -> torch.Tensor:
        x, labels = batches[index]
        gates = gumbel_gates(policy(x))
        student = gated_forward(stages, block_stages, gates, x)
        cost = expected_cost(gates, block_ms, full_ms)
        return kd_loss(student, teacher_logits[index], labels) + COST_WEIGHT * (cost - target) ** 2

    groups = [{"params": list(policy.parameters()), "lr": lr}, {"params": list(modules.parameters()), "lr": model_lr}]
    losses = fit(
        groups,
        list(range(len(batches))),
        loss_of,
        epochs=epochs,
        lr=lr,
        label="block policy",
        progress=progress,
        shuffle=True,
    )
    modules.eval()
    policy.eval()
    with torch.no_grad():
        keep = torch.cat([(policy(x) > 0).float() for x, _ in batches])
    cost = float(expected_cost(keep, block_ms, full_ms))
    return PolicyOutcome(tuple(losses), tuple(keep.mean(0).tolist()), cost)
