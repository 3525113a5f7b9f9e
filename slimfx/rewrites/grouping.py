"""Learned group convolutions (CondenseNet's condensation, FLGC's joint grouping): which input
and output channels of a dense conv go to each of G groups, so that a grouped conv keeps as much
of the weight as it can."""

from __future__ import annotations

import networkx as nx
import torch

ALTERNATIONS = 10  # rounds of reassigning one side given the other


def weight_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """(O, C) L1 norm of each output-input kernel of a conv weight (O, C, *k)."""
    return weight.abs().flatten(2).sum(2)


def balanced_assignment(score: torch.Tensor, groups: int) -> torch.Tensor:
    """Each row of ``score`` (items, groups) assigned to a group, ``items / groups`` per group,
    best scores first (greedy)."""
    items = score.shape[0]
    size = items // groups
    order = torch.argsort(score.flatten(), descending=True, stable=True)
    assigned = torch.full((items,), -1, dtype=torch.long)
    room = [size] * groups
    for flat in order.tolist():
        item, group = divmod(flat, groups)
        if assigned[item] < 0 and room[group] > 0:
            assigned[item] = group
            room[group] -= 1
    return assigned


def block_diagonal_assignment(magnitude: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Output and input groups that keep every nonzero weight, when the nonzero pattern falls
    into blocks that pack exactly into ``groups`` equal groups (first fit, largest first); else None."""
    outputs, inputs = magnitude.shape
    graph = nx.Graph()
    graph.add_nodes_from(range(outputs + inputs))
    rows, cols = magnitude.nonzero(as_tuple=True)
    graph.add_edges_from(zip(rows.tolist(), (cols + outputs).tolist()))
    parts = []
    for component in nx.connected_components(graph):
        outs = sorted(n for n in component if n < outputs)
        ins = sorted(n - outputs for n in component if n >= outputs)
        parts.append((outs, ins))
    parts.sort(key=lambda p: len(p[0]) + len(p[1]), reverse=True)
    out_room, in_room = [outputs // groups] * groups, [inputs // groups] * groups
    out_group = torch.full((outputs,), -1, dtype=torch.long)
    in_group = torch.full((inputs,), -1, dtype=torch.long)
    for outs, ins in parts:
        target = next((g for g in range(groups) if out_room[g] >= len(outs) and in_room[g] >= len(ins)), None)
        if target is None:
            return None
        out_room[target] -= len(outs)
        in_room[target] -= len(ins)
        out_group[outs] = target
        in_group[ins] = target
    return out_group, in_group


def learned_groups(
    magnitude: torch.Tensor, groups: int, free_outputs: bool, free_inputs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(group of each output, group of each input) for a conv whose kernel magnitudes are
    ``magnitude`` (O, C): a side that is not free keeps contiguous blocks in its present order;
    a free side is assigned by the weight its channels carry into each group (alternating
    between free sides, FLGC-style when both are free, CondenseNet's condensation when only the
    inputs are). Exact when the weight is block-diagonal under permutations of its free sides."""
    outputs, inputs = magnitude.shape
    out_group = torch.arange(outputs) // (outputs // groups)
    in_group = torch.arange(inputs) // (inputs // groups)
    if free_outputs and free_inputs:
        exact = block_diagonal_assignment(magnitude, groups)
        if exact is not None:
            return exact
    for _ in range(ALTERNATIONS if free_outputs and free_inputs else 1):
        if free_inputs:  # each input's weight into each group's outputs
            in_group = balanced_assignment(_scatter_sum(magnitude, out_group, groups, dim=0).T, groups)
        if free_outputs:
            out_group = balanced_assignment(_scatter_sum(magnitude, in_group, groups, dim=1), groups)
    return out_group, in_group


def kept_share(magnitude: torch.Tensor, out_group: torch.Tensor, in_group: torch.Tensor) -> float:
    """Share of the L1 mass of ``magnitude`` that the grouping keeps."""
    kept = magnitude[out_group.unsqueeze(1) == in_group.unsqueeze(0)].sum()
    return float(kept / magnitude.sum().clamp_min(torch.finfo(magnitude.dtype).tiny))


def group_order(assignment: torch.Tensor) -> torch.Tensor:
    """Channels sorted by group, each group in channel order: the order the grouped conv needs."""
    return torch.argsort(assignment, stable=True)


def _scatter_sum(magnitude: torch.Tensor, assignment: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """``magnitude`` summed over the channels of each group along ``dim`` (the other dim kept):
    (groups, C) for dim 0, (O, groups) for dim 1."""
    one_hot = torch.nn.functional.one_hot(assignment, groups).to(magnitude.dtype)  # (n, groups)
    return one_hot.T @ magnitude if dim == 0 else magnitude @ one_hot
