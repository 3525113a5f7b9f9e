"""The one way to mutate a graph.

Passes open a ``Rewriter`` on a graph; every change goes through its methods, which stamp
the pass's name as provenance on what they create or replace. Leaving the ``with`` block
cleans up (dead code, unused submodules), lints, recompiles and invalidates cached analyses.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from types import TracebackType
from typing import Any, Sequence

import torch.fx as fx
import torch.nn as nn

from slimfx.ir.graph import Graph
from slimfx.ir.nodeinfo import META_KEY, NodeInfo, node_kind


class Rewriter:
    """Batches changes to ``graph`` made on behalf of the pass named ``provenance``."""

    def __init__(self, graph: Graph, provenance: str):
        self.graph = graph
        self.provenance = provenance
        self.changed = False

    def __enter__(self) -> Rewriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.changed and exc_type is None:  # a failing pass is reported as is, not linted
            self.finish()

    # -- changes ---------------------------------------------------------------------------
    def replace_module(self, node: fx.Node, new_module: nn.Module) -> None:
        """Make ``node`` (a call_module) run ``new_module`` instead of its current module."""
        assert node.op == "call_module", f"{node.name} is a {node.op} node"
        self.graph.module.set_submodule(str(node.target), new_module)
        self._stamp(node, new_module)

    def bypass(self, node: fx.Node, replacement: fx.Node | None = None) -> None:
        """Remove ``node``: its users read ``replacement`` (default: its first input)."""
        source = replacement if replacement is not None else node.all_input_nodes[0]
        node.replace_all_uses_with(source)
        self.graph.fx_graph.erase_node(node)
        self.changed = True

    def insert_module_after(self, anchor: fx.Node, name: str, module: nn.Module, args: tuple[Any, ...]) -> fx.Node:
        """Add ``module`` as submodule ``name`` and a call to it right after ``anchor``."""
        name = self._unique_module_name(name)
        self.graph.module.add_submodule(name, module)
        with self.graph.fx_graph.inserting_after(anchor):
            node = self.graph.fx_graph.call_module(name, args)
        self._stamp(node, module)
        return node

    def replace_with_sequence(self, node: fx.Node, parts: Sequence[tuple[str, nn.Module]]) -> list[fx.Node]:
        """Replace call_module ``node`` by a chain of ``parts`` run one after the other.

        The parts become submodules ``<target>.<name>`` (``layer1.0.conv1.v``), so reports
        keep showing where they came from; the old module's path holds them as a container.
        """
        assert node.op == "call_module" and len(node.args) == 1 and not node.kwargs, f"{node.name} is not a one-input call"
        target = str(node.target)
        container = nn.Module()
        for name, module in parts:
            container.add_module(name, module)
        self.graph.module.set_submodule(target, container)
        chain, previous = [], node.args[0]
        for name, module in parts:
            with self.graph.fx_graph.inserting_after(chain[-1] if chain else node):
                step = self.graph.fx_graph.call_module(f"{target}.{name}", (previous,))
            self._stamp(step, module)
            chain.append(step)
            previous = step
        node.replace_all_uses_with(chain[-1])
        self.graph.fx_graph.erase_node(node)
        return chain

    def inline_module(self, node: fx.Node, module: nn.Module) -> Any:
        """Replace call_module ``node`` by the traced body of ``module``, an equivalent module
        whose ops fx can see; its submodules live under the old path (``<target>.<name>``).

        Returns what the body returns, in the graph (a node, or a tuple of nodes and constants);
        ``getitem`` users of a tuple-returning call read the matching element directly.
        """
        assert node.op == "call_module", f"{node.name} is a {node.op} node"
        target = str(node.target)
        body = fx.symbolic_trace(module).graph
        self.graph.module.set_submodule(target, module)
        placeholders = [n for n in body.nodes if n.op == "placeholder"]
        names = [p.target for p in placeholders]
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        value_map: dict[fx.Node, Any] = {}
        with self.graph.fx_graph.inserting_before(node):
            for placeholder in placeholders:
                if placeholder.target not in bound:
                    raise ValueError(f"{target}: no value for argument {placeholder.target!r} of the inlined body")
                value_map[placeholder] = bound[placeholder.target]
            for inner in body.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    result = fx.node.map_arg(inner.args[0], lambda n: value_map[n])
                    break
                copy = self.graph.fx_graph.node_copy(inner, lambda n: value_map[n])
                if copy.op in ("call_module", "get_attr"):
                    copy.target = f"{target}.{copy.target}"
                self._stamp(copy, self.graph.module.get_submodule(copy.target) if copy.op == "call_module" else None)
                value_map[inner] = copy
        for user in list(node.users):
            if isinstance(result, tuple) and user.op == "call_function" and user.target is operator.getitem:
                element = result[user.args[1]]
                if user.users and not isinstance(element, fx.Node):
                    raise ValueError(f"{target}: output {user.args[1]} is {element!r} after inlining but is used")
                if isinstance(element, fx.Node):
                    user.replace_all_uses_with(element)
                self.graph.fx_graph.erase_node(user)
        if node.users:
            if not isinstance(result, fx.Node):
                raise ValueError(f"{target}: its result is used whole, but the inlined body returns {type(result).__name__}")
            node.replace_all_uses_with(result)
        self.graph.fx_graph.erase_node(node)
        return result

    def rewire_input(self, user: fx.Node, old: fx.Node, new: fx.Node) -> None:
        """Make ``user`` read ``new`` where it read ``old`` (other users of ``old`` unchanged)."""
        user.replace_input_with(old, new)
        self.changed = True

    def replace_uses(self, old: fx.Node, new: fx.Node) -> None:
        """Every user of ``old`` except ``new`` itself reads ``new`` instead."""
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.changed = True

    # -- bookkeeping -----------------------------------------------------------------------
    def finish(self) -> None:
        """Clean up, lint, recompile and invalidate cached analyses."""
        from slimfx.ir.verify import lint

        gm = self.graph.module
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        self.graph.invalidate()
        lint(self.graph)
        self.changed = False

    def _stamp(self, node: fx.Node, module: nn.Module | None) -> None:
        old = node.meta.get(META_KEY)
        if isinstance(old, NodeInfo):
            node.meta[META_KEY] = replace(old, kind=node_kind(node, module), provenance=self.provenance)
        else:
            node.meta[META_KEY] = NodeInfo(kind=node_kind(node, module), provenance=self.provenance)
        self.changed = True

    def _unique_module_name(self, name: str) -> str:
        existing = dict(self.graph.module.named_modules())
        candidate, i = name, 1
        while candidate in existing:
            candidate, i = f"{name}_{i}", i + 1
        return candidate
