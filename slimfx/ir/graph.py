"""The IR: an always-executable fx GraphModule, its example inputs and a per-version cache.

``Graph`` knows structure only. Analyses (shapes, costs, channel groups) are functions over
a Graph that keep their results in its cache (``ensure_shapes`` in ``ir.shapes``,
``ensure_costs`` in ``cost_model.counts``); the Graph imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import networkx as nx
import torch
import torch.fx as fx

from slimfx.errors import RewriteError
from slimfx.ir.meta import META_KEY, NodeInfo, TakenLayer

T = TypeVar("T")
SHAPES = "shapes"  # the cache key shape propagation stores under


def attribute(root: torch.nn.Module, path: str) -> Any:
    """The submodule, parameter or buffer at dotted ``path`` of ``root`` (AttributeError if none)."""
    value: Any = root
    for part in path.split(".") if path else ():
        value = getattr(value, part)
    return value


class Graph:
    """Owns a GraphModule, its example inputs and analyses cached per graph version.

    Only ``slimfx.ir.rewrite`` mutates the graph; it calls :meth:`invalidate`, which bumps
    the version so that every cached analysis is recomputed on next use.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        example_inputs: tuple[torch.Tensor, ...],
        opaque: frozenset[str] = frozenset(),
        fixed_shapes: bool = False,
    ):
        self.module = module
        self.example_inputs = tuple(example_inputs)
        self.opaque = opaque  # module paths capture kept whole because they do not trace
        self.fixed_shapes = fixed_shapes  # traced at the example input shapes: holds for those only
        self.taken_layers: tuple[
            TakenLayer, ...
        ] = ()  # what capture replaced by standard layers (F.batch_norm, Conv2dSame)
        self.version = 0
        self._cache: dict[str, tuple[int, Any]] = {}

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

    def output_node(self) -> fx.Node:
        return next(n for n in self.module.graph.nodes if n.op == "output")

    def submodule(self, node: fx.Node) -> torch.nn.Module:
        """The module a ``call_module`` node runs."""
        if node.op != "call_module":
            raise RewriteError(f"node '{node.name}' is a {node.op} node, not call_module: it runs no module")
        return self.module.get_submodule(str(node.target))

    def module_calls(self) -> dict[str, int]:
        """How many ``call_module`` nodes run each module path (a shared module runs more than once)."""

        def count() -> dict[str, int]:
            counts: dict[str, int] = {}
            for node in self.module.graph.nodes:
                if node.op == "call_module":
                    counts[str(node.target)] = counts.get(str(node.target), 0) + 1
            return counts

        return self.cached("module_calls", count)

    def attribute_readers(self) -> dict[str, str]:
        """Module path -> the first get_attr node that reads one of its parameters or buffers directly."""

        def find() -> dict[str, str]:
            readers: dict[str, str] = {}
            for node in self.module.graph.nodes:
                if node.op == "get_attr":
                    parts = str(node.target).split(".")
                    for depth in range(1, len(parts)):
                        readers.setdefault(".".join(parts[:depth]), node.name)
            return readers

        return self.cached("attribute_readers", find)

    def why_not_single_call(self, node: fx.Node, one_input: bool = True) -> str | None:
        """Why the layer that ``node`` calls cannot be rewritten for this call alone, or None:
        its module runs at other nodes too, or (``one_input``) the call passes more than one input."""
        if str(node.target) in self.opaque:
            return "opaque: kept whole at capture because torch.fx cannot trace it"
        reader = self.attribute_readers().get(str(node.target))
        if reader is not None:
            return f"its parameters are also read directly, at node '{reader}'"
        calls = self.module_calls().get(str(node.target), 0)
        if calls > 1:
            return f"module called {calls} times"
        if one_input and (len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node)):
            return "called with extra arguments"
        return None

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

    def is_current(self, key: str) -> bool:
        """Whether analysis ``key`` was computed for the current graph version."""
        hit = self._cache.get(key)
        return hit is not None and hit[0] == self.version

    def info(self, node: fx.Node) -> NodeInfo:
        """Typed info for ``node``: shapes (and costs, once counted) of the current version.

        Raises when the graph changed since shapes were last propagated: call
        ``ir.shapes.ensure_shapes(graph)`` (or ``cost_model.counts.ensure_costs``) first.
        """
        if not self.is_current(SHAPES):
            raise RewriteError("the graph changed since its shapes were computed; call ensure_shapes(graph) first")
        return node.meta[META_KEY]

    # -- running ---------------------------------------------------------------------------
    def run(self, *inputs: torch.Tensor) -> Any:
        """Run the module on ``inputs`` (the example inputs when none are given)."""
        with torch.no_grad():
            return self.module(*(inputs or self.example_inputs))
