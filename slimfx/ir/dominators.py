"""Nodes every input-to-output path passes through: where a graph can be cut in two."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from slimfx.ir.graph import Graph

_SOURCE = "__slimfx_inputs__"


def output_dominators(graph: Graph) -> list[fx.Node]:
    """Nodes that dominate the output, first to last (inputs and the output node excluded).

    Cutting the graph right after such a node splits it into a part that computes it and a
    part that needs nothing else from the first (constants aside): no residual branch or
    concat is cut in half. Uses networkx's dominator algorithm on the data-flow graph.
    Attributes (parameters read as tensors: a layer scale, a class token) are left out: they
    are constants every part can read (``ir.rewrite.split_at`` does), not values crossing a cut.
    """
    g = nx.DiGraph()
    g.add_node(_SOURCE)
    for node in graph.nodes():
        if node.op == "get_attr":
            continue
        g.add_node(node.name)
        if node.op == "placeholder":
            g.add_edge(_SOURCE, node.name)  # every input hangs off one source
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                g.add_edge(arg.name, node.name)
    output = next(n for n in graph.nodes() if n.op == "output")
    idom = nx.immediate_dominators(g, _SOURCE)
    chain, current = [], output.name
    while current != _SOURCE:
        current = idom[current]
        chain.append(current)
    by_name = {n.name: n for n in graph.nodes()}
    return [
        by_name[name]
        for name in reversed(chain)
        if name in by_name and by_name[name].op not in ("placeholder", "get_attr")
    ]
