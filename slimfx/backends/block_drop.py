"""The module that really skips residual blocks per input (dynamic BlockDrop).

The graph is split at each droppable block's input and add (``ir.rewrite.split_at``); a policy
network looks at the input and decides, per row, which blocks run. For a batch, each block runs
only on the rows that keep it; the other rows pass its input on (the block's add with the
branch gone). Compute is really skipped: the rows that drop a block never enter it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.errors import RewriteError
from slimfx.ir.blocks import ResidualBlock
from slimfx.ir.rewrite import split_at

PROVENANCE = "block-drop runtime"


class BlockDropModel(nn.Module):
    """Stages of a model, the ones at ``block_stages`` droppable, and the policy that picks them.

    ``policy(x)`` returns one logit per droppable block and row; a block runs for a row when
    its logit is above 0. ``forward(x, keep=...)`` takes the decisions instead (rows, blocks),
    and ``forward(x, return_keep=True)`` also returns the decisions taken.
    """

    def __init__(self, stages: Sequence[nn.Module], block_stages: Sequence[int], policy: nn.Module):
        super().__init__()
        if len(set(block_stages)) != len(block_stages) or any(not 0 <= i < len(stages) for i in block_stages):
            raise RewriteError("block stages must be distinct indices of the stages")
        self.stages = nn.ModuleList(stages)
        self.block_stages = list(block_stages)
        self.policy = policy

    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, blocks) booleans: which blocks each row runs."""
        return self.policy(x) > 0

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, return_keep: bool = False):
        keep = self.decide(x) if keep is None else keep
        if keep.shape != (x.shape[0], len(self.block_stages)):
            raise RewriteError(f"keep must be (rows, blocks) = ({x.shape[0]}, {len(self.block_stages)})")
        block_of = {stage: k for k, stage in enumerate(self.block_stages)}
        features = x
        for index, stage in enumerate(self.stages):
            if index not in block_of:
                features = stage(features)
                continue
            rows = keep[:, block_of[index]]
            if bool(rows.all()):
                features = stage(features)
            elif bool(rows.any()):  # only the rows that keep the block enter it
                out = features.clone()
                out[rows] = stage(features[rows])
                features = out
        return (features, keep) if return_keep else features


def block_stages(module: fx.GraphModule, blocks: Sequence[ResidualBlock]) -> tuple[list[fx.GraphModule], list[int]]:
    """``module`` split at each block's input and add: the stages, and which stages are blocks."""
    order = {n.name: i for i, n in enumerate(module.graph.nodes)}
    cuts = sorted({name for b in blocks for name in (b.input, b.add)}, key=order.__getitem__)
    stages = split_at(module, cuts, PROVENANCE)
    position = {name: i for i, name in enumerate(cuts)}  # stage i + 1 starts at cut i
    indices = []
    for block in blocks:
        start, end = position[block.input], position[block.add]
        if end != start + 1:
            raise RewriteError(f"block {block.name}: another cut falls inside it")
        indices.append(end)  # the stage that computes the add from the block's input
    return stages, indices
