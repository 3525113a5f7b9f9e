"""Residual blocks with an identity skip, y = x + f(x): where a graph can drop a branch.

A block starts at an output dominator ``x`` and ends at the next one, an add of ``x`` itself
and a branch computed from ``x`` alone (everything between two consecutive output dominators
depends on the first only). Dropping the block makes the add's users read ``x``: the model
without that branch, what BlockDrop skips. Projection skips (a downsample conv) are not
identity skips and are not blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.fx as fx

from slimfx.ir import ops
from slimfx.ir.dominators import output_dominators
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import GraphBuilder


@dataclass(frozen=True)
class ResidualBlock:
    """A block: its name, input node, add node, the branch's nodes and the modules they run."""

    name: str  # the modules' common path (``layer1.1``), with ``@add`` where that is not unique
    input: str
    add: str
    branch: tuple[str, ...]
    modules: tuple[str, ...]


def _common_path(modules: tuple[str, ...]) -> str:
    common = []
    for level in zip(*(m.split(".") for m in modules)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def residual_blocks(graph: Graph) -> list[ResidualBlock]:
    """Every identity-skip residual block of ``graph``, first to last (cached)."""
    return graph.cached("residual_blocks", lambda: _find(graph))


def _find(graph: Graph) -> list[ResidualBlock]:
    dominators = output_dominators(graph)
    order = {node: i for i, node in enumerate(graph.nodes())}
    blocks = []
    for x, add in zip(dominators, dominators[1:]):
        joined = ops.join_inputs(add)
        if joined is None or len(joined) != 2 or x not in joined or add.op == "call_function" and _is_concat(add):
            continue
        branch_end = joined[1] if joined[0] is x else joined[0]
        if not _reads(branch_end, x) or graph.info(branch_end).out_shape != graph.info(x).out_shape:
            continue  # a constant added (a position embedding), or a broadcast: not a branch of x
        branch = [n for n in graph.nodes() if order[x] < order[n] < order[add] and n.op != "get_attr"]
        modules = tuple(str(n.target) for n in branch if n.op == "call_module")
        blocks.append(ResidualBlock(_common_path(modules), x.name, add.name, tuple(n.name for n in branch), modules))
    paths = [b.name for b in blocks]
    return [
        b if b.name and paths.count(b.name) == 1 else replace(b, name=f"{b.name}@{b.add}" if b.name else b.add)
        for b in blocks
    ]


def _reads(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is computed from ``source`` (``source`` among its ancestors)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current is source and current is not node:
            return True
        for arg in current.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return False


def _is_concat(node: fx.Node) -> bool:
    return node.target in ops.CONCATS.functions


def without_blocks(graph: Graph, dropped: list[ResidualBlock], provenance: str) -> fx.GraphModule:
    """A module that skips the ``dropped`` blocks (each add's users read its input); it shares
    ``graph``'s weights, for trying drops without copying the model."""
    replaced = {b.add: b.input for b in dropped}
    builder, env = GraphBuilder(provenance), {}
    by_name = {n.name: n for n in graph.nodes()}
    for node in graph.nodes():
        if node.name in replaced:
            env[node] = env[by_name[replaced[node.name]]]
        elif node.op == "output":
            builder.output(fx.map_arg(node.args[0], lambda n: env[n]))
        else:
            env[node] = builder.copy(node, lambda n: env[n])
    return builder.build(graph.module)
