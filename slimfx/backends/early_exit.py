"""The module that really takes early exits: stages of the graph, a head after each cut.

For a batch, each stage runs only on the rows still undecided; after it, the exit head
scores them, rows whose prediction entropy is at most the exit's threshold are answered
there, and the rest go on. Compute is really skipped: the batch shrinks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.errors import RewriteError
from slimfx.exits.plan import ExitPlan
from slimfx.exits.thresholds import prediction_entropy
from slimfx.ir.rewrite import split_at

PROVENANCE = "early-exit runtime"


class EarlyExitModel(nn.Module):
    """Stages and exit heads; ``thresholds[k]`` is exit k's entropy threshold (change freely).

    ``forward(*inputs)`` returns one output row per input, from whichever exit answered;
    ``forward(*inputs, return_exits=True)`` also returns each row's exit index (the number
    of heads for rows answered by the full model).
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module], thresholds: Sequence[float]):
        super().__init__()
        if len(stages) != len(heads) + 1 or len(thresholds) != len(heads):
            raise RewriteError("an early-exit model needs one more stage than heads and one threshold per head")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.thresholds = [float(t) for t in thresholds]

    def forward(self, *inputs: torch.Tensor, return_exits: bool = False):
        outputs, exits = take_exits(list(self.stages), list(self.heads), self.thresholds, inputs)
        return (outputs, exits) if return_exits else outputs


Part = Callable[..., torch.Tensor]


def take_exits(
    stages: Sequence[Part], heads: Sequence[Part], thresholds: Sequence[float], inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route a batch through ``stages`` and exit ``heads`` (any callables on tensors: torch
    modules, or onnxruntime sessions): each row's output from the first exit whose prediction
    entropy is at most its threshold, else from the last stage; and each row's exit index."""
    rows = inputs[0].shape[0]
    features = stages[0](*inputs)
    remaining = torch.arange(rows, device=inputs[0].device)
    exits = torch.full((rows,), len(heads), dtype=torch.long, device=inputs[0].device)
    outputs = None
    for k, head in enumerate(heads):
        logits = head(features)
        if outputs is None:
            outputs = logits.new_empty((rows, *logits.shape[1:]))
        done = prediction_entropy(logits) <= thresholds[k]
        outputs[remaining[done]] = logits[done]
        exits[remaining[done]] = k
        if bool(done.all()):
            return outputs, exits
        if bool(done.any()):
            keep = ~done
            remaining, features = remaining[keep], features[keep]
        features = stages[k + 1](features)
    if outputs is None:
        outputs = features.new_empty((rows, *features.shape[1:]))
    outputs[remaining] = features
    return outputs, exits


def build_early_exit(module: fx.GraphModule, plan: ExitPlan) -> EarlyExitModel:
    """The runtime for ``plan`` on ``module``: the graph split at the plan's cuts, its heads
    and thresholds."""
    return EarlyExitModel(split_at(module, plan.cuts, PROVENANCE), plan.heads, plan.thresholds)
