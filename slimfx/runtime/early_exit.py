"""The module that really takes early exits: stages of the graph, a head after each cut.

For a batch, each stage runs only on the rows still undecided; after it, the exit head
scores them, rows whose prediction entropy is at most the exit's threshold are answered
there, and the rest go on. Compute is really skipped: the batch shrinks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn


def split_at(module: fx.GraphModule, cuts: Sequence[str]) -> list[fx.GraphModule]:
    """Stages of ``module``: stage 0 computes node ``cuts[0]`` from the inputs, stage k
    computes ``cuts[k]`` from ``cuts[k-1]``, the last computes the output.

    Each cut must dominate the output (see ``ir.dominators``), so no other value crosses it;
    attributes (parameters used as tensors) are copied into every stage that reads them.
    """
    nodes = list(module.graph.nodes)
    by_name = {n.name: n for n in nodes}
    missing = [c for c in cuts if c not in by_name]
    if missing:
        raise ValueError(f"no node named {missing[0]!r} to cut at")
    stage_of: dict[fx.Node, int] = {}
    stage = 0
    for node in nodes:
        stage_of[node] = stage
        if node.name in cuts:
            stage += 1
    output = next(n for n in nodes if n.op == "output")
    stages = []
    for k in range(len(cuts) + 1):
        graph, env = fx.Graph(), {}
        if k == 0:
            for node in nodes:
                if node.op == "placeholder":
                    env[node] = graph.placeholder(node.name)
        else:
            env[by_name[cuts[k - 1]]] = graph.placeholder("features")

        def lookup(arg: fx.Node, graph: fx.Graph = graph, env: dict = env, k: int = k) -> fx.Node:
            if arg not in env:
                if arg.op != "get_attr":
                    raise ValueError(f"node {arg.name!r} crosses the cut into stage {k}: cut at a dominator")
                env[arg] = graph.get_attr(arg.target)
            return env[arg]

        for node in nodes:
            if stage_of[node] == k and node.op not in ("placeholder", "output", "get_attr"):
                env[node] = graph.node_copy(node, lookup)
        result = fx.map_arg(output.args[0], lookup) if k == len(cuts) else env[by_name[cuts[k]]]
        graph.output(result)
        stage_module = fx.GraphModule(module, graph)
        stage_module.graph.eliminate_dead_code()
        stage_module.recompile()
        stages.append(stage_module)
    return stages


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax of each row of ``logits``."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class EarlyExitModel(nn.Module):
    """Stages and exit heads; ``thresholds[k]`` is exit k's entropy threshold (change freely).

    ``forward(*inputs)`` returns one output row per input, from whichever exit answered;
    ``forward(*inputs, return_exits=True)`` also returns each row's exit index (the number
    of heads for rows answered by the full model).
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module], thresholds: Sequence[float]):
        super().__init__()
        if len(stages) != len(heads) + 1 or len(thresholds) != len(heads):
            raise ValueError("need one more stage than heads and one threshold per head")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.thresholds = [float(t) for t in thresholds]

    def forward(self, *inputs: torch.Tensor, return_exits: bool = False):
        rows = inputs[0].shape[0]
        features = self.stages[0](*inputs)
        remaining = torch.arange(rows, device=inputs[0].device)
        exits = torch.full((rows,), len(self.heads), dtype=torch.long, device=inputs[0].device)
        outputs = None
        for k, head in enumerate(self.heads):
            logits = head(features)
            if outputs is None:
                outputs = logits.new_empty((rows, *logits.shape[1:]))
            done = prediction_entropy(logits) <= self.thresholds[k]
            outputs[remaining[done]] = logits[done]
            exits[remaining[done]] = k
            if bool(done.all()):
                return (outputs, exits) if return_exits else outputs
            if bool(done.any()):
                keep = ~done
                remaining, features = remaining[keep], features[keep]
            features = self.stages[k + 1](features)
        if outputs is None:
            outputs = features.new_empty((rows, *features.shape[1:]))
        outputs[remaining] = features
        return (outputs, exits) if return_exits else outputs
