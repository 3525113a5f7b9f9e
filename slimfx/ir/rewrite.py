"""The one way to mutate or copy a graph.

Passes open a ``Rewriter`` on a graph; every change goes through its methods, which stamp
the pass's name as provenance on what they create or replace. Leaving the ``with`` block
cleans up (dead code, unused submodules), lints, recompiles and invalidates cached analyses.

New graphs made from an existing one (the stages of an early-exit model, a module that also
returns inner values, the int8 lowering) are built with ``GraphBuilder``: copied nodes keep
their info and provenance, new nodes are stamped with the builder's.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import torch.fx as fx
import torch.nn as nn

from slimfx.errors import RewriteError
from slimfx.ir.graph import Graph
from slimfx.ir.meta import META_KEY, NodeInfo, node_kind
from slimfx.ir.shapes import ensure_shapes
from slimfx.ir.verify import lint


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
        _require_module_call(node)
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
        _require_module_call(node)
        if len(node.args) != 1 or node.kwargs:
            raise RewriteError(f"node '{node.name}' is not a one-input call; only those can become a chain of layers")
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
        _require_module_call(node)
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
                    raise RewriteError(f"{target}: no value for argument {placeholder.target!r} of the inlined body")
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
                    raise RewriteError(f"{target}: output {user.args[1]} is {element!r} after inlining but is used")
                if isinstance(element, fx.Node):
                    user.replace_all_uses_with(element)
                self.graph.fx_graph.erase_node(user)
        if node.users:
            if not isinstance(result, fx.Node):
                raise RewriteError(
                    f"{target}: its result is used whole, but the inlined body returns {type(result).__name__}"
                )
            node.replace_all_uses_with(result)
        self.graph.fx_graph.erase_node(node)
        return result

    def replace_with_module(self, node: fx.Node, path: str, module: nn.Module, args: tuple[Any, ...]) -> fx.Node:
        """Replace ``node`` (any op) by a call of ``module``, placed at ``path`` (replacing what
        was there), on ``args``: a functional call becoming the layer it stands for."""
        if path in dict(self.graph.module.named_modules()):
            self.graph.module.set_submodule(path, module)
        else:
            self.graph.module.add_submodule(path, module)
        with self.graph.fx_graph.inserting_before(node):
            call = self.graph.fx_graph.call_module(path, args)
        call.meta.update(node.meta)
        self._stamp(call, module)
        node.replace_all_uses_with(call)
        self.graph.fx_graph.erase_node(node)
        return call

    def set_argument(self, node: fx.Node, index: int, name: str, value: Any) -> None:
        """Set argument ``index`` of ``node`` (or keyword ``name``, where it was passed by
        keyword) to a literal ``value``: a split's sizes after pruning, say."""
        if len(node.args) > index:
            node.update_arg(index, value)
        else:
            node.update_kwarg(name, value)
        self._stamp(node, self.graph.submodule(node) if node.op == "call_module" else None)

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


def _require_module_call(node: fx.Node) -> None:
    if node.op != "call_module":
        raise RewriteError(f"node '{node.name}' is a {node.op} node; only a call_module node's module can be replaced")


# -- new graphs from old ones -------------------------------------------------------------------------
class GraphBuilder:
    """Builds a new GraphModule node by node from the nodes of existing graphs.

    ``copy`` keeps a node's meta (shapes, provenance); every other method creates a node
    stamped with ``provenance``. ``modules`` collects what new call_module nodes run.
    """

    def __init__(self, provenance: str):
        self.provenance = provenance
        self.graph = fx.Graph()
        self.modules: dict[str, Any] = {}

    def copy(self, node: fx.Node, lookup: Callable[[fx.Node], Any]) -> fx.Node:
        return self.graph.node_copy(node, lookup)

    def placeholder(self, name: str) -> fx.Node:
        return self._stamped(self.graph.placeholder(name), "input")

    def get_attr(self, target: str) -> fx.Node:
        return self._stamped(self.graph.get_attr(target), "attribute")

    def call_module(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> fx.Node:
        self.modules[name] = module
        return self._stamped(self.graph.call_module(name, args), type(module).__name__)

    def call_function(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> fx.Node:
        node = self.graph.call_function(fn, args)
        return self._stamped(node, node_kind(node, None))

    def call_method(self, name: str, args: tuple[Any, ...]) -> fx.Node:
        return self._stamped(self.graph.call_method(name, args), f".{name}")

    def output(self, value: Any) -> None:
        self.graph.output(value)

    def build(self, root: nn.Module | None = None) -> fx.GraphModule:
        """The GraphModule: its modules and attributes come from ``root`` (shared), or from
        what was collected in ``modules``; dead code and unused submodules are dropped."""
        module = fx.GraphModule(root if root is not None else self.modules, self.graph)
        module.graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        module.recompile()
        return module

    def _stamped(self, node: fx.Node, kind: str) -> fx.Node:
        node.meta[META_KEY] = NodeInfo(kind=kind, provenance=self.provenance)
        return node


def snapshot(graph: Graph) -> Graph:
    """An independent copy of ``graph`` (its own weights), shapes propagated: the model as it
    was, for a pass that learns from it while the pipeline changes the original."""
    copied = Graph(copy.deepcopy(graph.module), graph.example_inputs, graph.opaque, graph.fixed_shapes)
    copied.taken_layers = graph.taken_layers
    ensure_shapes(copied)
    return copied


def with_outputs(module: fx.GraphModule, names: Sequence[str], provenance: str) -> fx.GraphModule:
    """A module that returns the values of nodes ``names`` and then the model's output; it
    shares ``module``'s weights."""
    builder, env = GraphBuilder(provenance), {}
    by_name = {n.name: n for n in module.graph.nodes}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise RewriteError(f"no node named {missing[0]!r} to return")
    result = None
    for node in module.graph.nodes:
        if node.op == "output":
            result = fx.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = builder.copy(node, lambda n: env[n])
    builder.output((*[env[by_name[name]] for name in names], result))
    return builder.build(module)


def split_at(module: fx.GraphModule, cuts: Sequence[str], provenance: str) -> list[fx.GraphModule]:
    """Stages of ``module``: stage 0 computes node ``cuts[0]`` from the inputs, stage k
    computes ``cuts[k]`` from ``cuts[k-1]``, the last computes the output.

    Each cut must dominate the output (see ``ir.dominators``), so no other value crosses it;
    attributes (parameters used as tensors) are read by every stage that needs them.
    """
    nodes = list(module.graph.nodes)
    by_name = {n.name: n for n in nodes}
    missing = [c for c in cuts if c not in by_name]
    if missing:
        raise RewriteError(f"no node named {missing[0]!r} to cut at")
    stage_of: dict[fx.Node, int] = {}
    stage = 0
    for node in nodes:
        stage_of[node] = stage
        if node.name in cuts:
            stage += 1
    output = next(n for n in nodes if n.op == "output")
    stages = []
    for k in range(len(cuts) + 1):
        builder, env = GraphBuilder(provenance), {}
        if k == 0:
            for node in nodes:
                if node.op == "placeholder":
                    env[node] = builder.copy(node, lambda n: n)
        else:
            env[by_name[cuts[k - 1]]] = builder.placeholder("features")

        def lookup(arg: fx.Node, builder: GraphBuilder = builder, env: dict = env, k: int = k) -> fx.Node:
            if arg not in env:
                if arg.op != "get_attr":
                    raise RewriteError(f"node {arg.name!r} crosses the cut into stage {k}: cut at a dominator")
                env[arg] = builder.get_attr(str(arg.target))
            return env[arg]

        for node in nodes:
            if stage_of[node] == k and node.op not in ("placeholder", "output", "get_attr"):
                env[node] = builder.copy(node, lookup)
        builder.output(fx.map_arg(output.args[0], lookup) if k == len(cuts) else env[by_name[cuts[k]]])
        stages.append(builder.build(module))
    return stages
