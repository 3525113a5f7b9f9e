"""Concatenated ReLU: output filters that come in near-negated pairs computed once.

Where filters ``i`` and ``j`` of a conv satisfy ``w_j = -w_i`` (and ``b_j = -b_i``), the conv
needs only filter ``i``: ``relu(y_j) = relu(-y_i)``. The conv keeps one filter per pair and the
unpaired ones, and its output is ``cat(u, -u[:, :pairs])`` ahead of the activation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ROUNDING = 1e-6  # cosine similarity of a vector and its exact negation, as floats compute it


def filter_vectors(conv: nn.Conv2d) -> torch.Tensor:
    """Each output filter as one vector: its weights, then its bias (when the conv has one)."""
    rows = conv.weight.detach().flatten(1)
    if conv.bias is not None:
        rows = torch.cat([rows, conv.bias.detach().unsqueeze(1)], 1)
    return rows


def negated_pairs(vectors: torch.Tensor, similarity: float) -> torch.Tensor:
    """(K, 2) filter pairs whose cosine similarity is at most ``-similarity`` (within float
    rounding: ``similarity=1`` finds exactly negated pairs), most negated first, each filter in
    at most one pair (greedy)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    cosine = unit @ unit.T
    rows, cols = torch.triu_indices(len(vectors), len(vectors), 1)
    values = cosine[rows, cols]
    close = values <= -similarity + ROUNDING
    candidates = sorted(zip(values[close].tolist(), rows[close].tolist(), cols[close].tolist()))
    taken: set[int] = set()
    pairs = []
    for _, i, j in candidates:
        if i not in taken and j not in taken:
            pairs.append((i, j))
            taken |= {i, j}
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def most_negated(vectors: torch.Tensor) -> float:
    """The least cosine similarity between two different filters (1 with a single filter)."""
    if len(vectors) < 2:
        return 1.0
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    cosine = unit @ unit.T
    rows, cols = torch.triu_indices(len(vectors), len(vectors), 1)
    return float(cosine[rows, cols].min())


def channel_order(pairs: torch.Tensor, channels: int) -> torch.Tensor:
    """Where each output of the rewritten layer comes from, as original channels: the first of
    each pair, then the unpaired filters, then the second of each pair."""
    paired = set(pairs.flatten().tolist())
    rest = torch.tensor([c for c in range(channels) if c not in paired], dtype=torch.long)
    return torch.cat([pairs[:, 0], rest, pairs[:, 1]])


class CReLUConv(nn.Module):
    """A conv computing one filter per pair and the unpaired ones, its paired outputs repeated
    negated: ``cat(u, -u[:, :pairs])``; the activation that followed runs on the result."""

    def __init__(self, conv: nn.Conv2d, pairs: int):
        super().__init__()
        self.conv = conv
        self.pairs = pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.conv(x)
        return torch.cat([u, -u[:, : self.pairs]], 1)


def crelu_conv(conv: nn.Conv2d, pairs: torch.Tensor) -> CReLUConv:
    """The rewritten layer: filter ``i`` of each pair (i, j) becomes ``(w_i - w_j) / 2`` (exact
    when ``w_j = -w_i``, the least-squares shared filter otherwise), then the unpaired filters."""
    order = channel_order(pairs, conv.out_channels)
    kept = order[: conv.out_channels - len(pairs)]
    weight = conv.weight.detach()
    shared = (weight[pairs[:, 0]] - weight[pairs[:, 1]]) / 2
    new = nn.Conv2d(
        conv.in_channels,
        len(kept),
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    new.weight = nn.Parameter(torch.cat([shared, weight[kept[len(pairs) :]]]).clone())
    if conv.bias is not None:
        bias = conv.bias.detach()
        shared_bias = (bias[pairs[:, 0]] - bias[pairs[:, 1]]) / 2
        new.bias = nn.Parameter(torch.cat([shared_bias, bias[kept[len(pairs) :]]]).clone())
    return CReLUConv(new, len(pairs))
