"""The IR: an always-executable fx GraphModule plus typed node info and cached analyses."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, TypeVar

import networkx as nx
import torch
import torch.fx as fx

from slimfx.ir.nodeinfo import META_KEY, NodeInfo

T = TypeVar("T")


class Graph:
    """Owns a GraphModule, its example inputs and analyses cached per graph version.

    Only ``slimfx.ir.rewrite`` mutates the graph; it calls :meth:`invalidate`, which bumps
    the version so that shapes, costs and the networkx view are recomputed on next use.
    """

    def __init__(self, module: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]):
        self.module = module
        self.example_inputs = tuple(example_inputs)
        self.version = 0
        self._cache: dict[str, tuple[int, Any]] = {}
        self.attachments: dict[str, Any] = {}  # what passes hand to the API beside the graph (exit heads)

    # -- structure -------------------------------------------------------------------------
    @property
    def fx_graph(self) -> fx.Graph:
        return self.module.graph

    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.module.graph.nodes)

    def node(self, name: str) -> fx.Node:
        for node in self.module.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in the graph")

    def submodule(self, node: fx.Node) -> torch.nn.Module:
        """The module a ``call_module`` node runs."""
        assert node.op == "call_module", f"{node.name} is a {node.op} node, not call_module"
        return self.module.get_submodule(str(node.target))

    # -- cached analyses -------------------------------------------------------------------
    def invalidate(self) -> None:
        """Mark every cached analysis stale; called by ``ir.rewrite`` after a change."""
        self.version += 1

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """Return analysis ``key`` for the current graph version, computing it if stale."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self.version:
            return hit[1]
        value = compute()
        self._cache[key] = (self.version, value)
        return value

    def ensure_shapes(self) -> None:
        """Make sure every node carries current shape information."""
        from slimfx.ir.shapes import propagate_shapes

        self.cached("shapes", lambda: propagate_shapes(self))

    def ensure_costs(self) -> None:
        """Make sure every node carries current cost counts."""
        from slimfx.cost_model.counts import annotate_costs

        self.ensure_shapes()
        self.cached("costs", lambda: annotate_costs(self))

    def module_calls(self) -> dict[str, int]:
        """How many ``call_module`` nodes run each module path (a shared module runs more than once)."""

        def count() -> dict[str, int]:
            counts: dict[str, int] = {}
            for node in self.module.graph.nodes:
                if node.op == "call_module":
                    counts[str(node.target)] = counts.get(str(node.target), 0) + 1
            return counts

        return self.cached("module_calls", count)

    def info(self, node: fx.Node) -> NodeInfo:
        """Typed info for ``node`` (shapes always current; cost when costs were computed)."""
        self.ensure_shapes()
        return node.meta[META_KEY]

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph of node names with an edge for each data dependency."""

        def build() -> nx.DiGraph:
            g = nx.DiGraph()
            for node in self.module.graph.nodes:
                g.add_node(node.name, op=node.op)
                for inp in node.all_input_nodes:
                    g.add_edge(inp.name, node.name)
            return g

        return self.cached("networkx", build)

    # -- running ---------------------------------------------------------------------------
    def run(self, *inputs: torch.Tensor) -> Any:
        """Run the module on ``inputs`` (the example inputs when none are given)."""
        with torch.no_grad():
            return self.module(*(inputs or self.example_inputs))

    def clone(self) -> Graph:
        """A deep copy whose module and node info can be changed independently."""
        module = copy.deepcopy(self.module)
        return Graph(module, self.example_inputs)
