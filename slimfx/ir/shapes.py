"""Shape propagation on meta tensors: every node gets a NodeInfo with its output shapes.

Running on the meta device computes shapes without touching data, so it costs a fraction of
a real forward pass. Parameters are swapped for meta copies per module call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from slimfx.errors import ShapeError
from slimfx.ir import ops
from slimfx.ir.graph import SHAPES, Graph
from slimfx.ir.meta import META_KEY, NodeInfo, TensorMeta, node_kind
from slimfx.ir.source import node_source_line

# Modules whose output has exactly their input's shape and dtype: computed without running
# them, because several (hardtanh, hardswish, ...) have slow Python meta implementations.
_SHAPE_PRESERVING = (
    *ops.ACTIVATIONS.modules,
    *ops.SOFTMAX.modules,
    *ops.DROPOUT.modules,
    nn.Identity,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class _RealShapeProp(fx.Interpreter):
    """An fx Interpreter that records a NodeInfo for every node it runs."""

    current: fx.Node | None = None

    def run_node(self, node: fx.Node) -> Any:
        self.current = node
        result = super().run_node(node)
        module = self.module.get_submodule(str(node.target)) if node.op == "call_module" else None
        old = node.meta.get(META_KEY)
        tensors = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        node.meta[META_KEY] = NodeInfo(
            kind=node_kind(node, module),
            outputs=tuple(TensorMeta.of(t) for t in tensors),
            provenance=old.provenance if isinstance(old, NodeInfo) else None,
        )
        return result


class _MetaShapeProp(_RealShapeProp):
    """Runs every node on meta tensors, swapping module state for meta copies."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, _SHAPE_PRESERVING) and len(args) == 1 and not kwargs:
            return torch.empty_like(args[0])
        state = {k: _to_meta(v) for k, v in module.state_dict(keep_vars=True).items()}
        if not state:
            return module(*args, **kwargs)
        return functional_call(module, state, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return _to_meta(super().get_attr(target, args, kwargs))


def ensure_shapes(graph: Graph) -> None:
    """Make sure every node carries shape information of the current graph version."""
    graph.cached(SHAPES, lambda: propagate_shapes(graph))


def propagate_shapes(graph: Graph) -> None:
    """Annotate every node of ``graph`` with its output shapes (``NodeInfo.outputs``).

    Meta tensors first (fast); if a node cannot run on meta tensors (data-dependent code in
    a leaf module, say), the graph is run again on the real example inputs.
    """
    try:
        _run(_MetaShapeProp(graph.module), tree_map(_to_meta, graph.example_inputs))
    except Exception:
        interpreter = _RealShapeProp(graph.module)
        try:
            _run(interpreter, graph.example_inputs)
        except Exception as exc:  # any failure of a node: report which one and where
            raise ShapeError(_describe_failure(graph, interpreter.current, exc)) from exc


class _TrialRun(fx.Interpreter):
    """Runs the graph with some modules and node arguments substituted, recording nothing."""

    def __init__(self, module: fx.GraphModule, modules: dict[str, nn.Module], arguments: dict[str, tuple]):
        super().__init__(module)
        self.modules, self.arguments = modules, arguments
        self.current: fx.Node | None = None

    def run_node(self, node: fx.Node) -> Any:
        self.current = node
        return super().run_node(node)

    def fetch_args_kwargs_from_env(self, node: fx.Node) -> tuple[tuple, dict]:
        if node.name not in self.arguments:
            return super().fetch_args_kwargs_from_env(node)
        args, kwargs = self.arguments[node.name]
        return fx.node.map_arg(args, lambda n: self.env[n]), fx.node.map_arg(kwargs, lambda n: self.env[n])

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.modules.get(str(target)) or self.fetch_attr(target)
        return module(*args, **kwargs)


def trial_run(graph: Graph, modules: dict[str, nn.Module], arguments: dict[str, tuple[tuple, dict]]) -> str | None:
    """Why ``graph`` would fail to run on its example inputs with ``modules`` (path -> module)
    and ``arguments`` (node name -> (args, kwargs)) in place, or None when it runs. Nothing is
    changed: a pass checks its edits with this before making them."""
    interpreter = _TrialRun(graph.module, modules, arguments)
    modes = {m: m.training for m in (*graph.module.modules(), *modules.values())}
    for m in modes:  # eval: no BatchNorm statistics move
        m.training = False
    try:
        _run(interpreter, graph.example_inputs)
    except Exception as exc:
        return _describe_failure(graph, interpreter.current, exc, hint="", what="the trial run")
    finally:
        for m, training in modes.items():
            m.training = training
    return None


def _run(interpreter: fx.Interpreter, inputs: Any) -> None:
    with torch.no_grad():
        interpreter.run(*inputs)


_INPUT_HINT = ". Check that the input shape matches what the model expects (--input-shape)."


def _describe_failure(
    graph: Graph, node: fx.Node | None, exc: Exception, hint: str = _INPUT_HINT, what: str = "shape propagation"
) -> str:
    shapes = ", ".join(str(tuple(t.shape)) for t in graph.example_inputs if isinstance(t, torch.Tensor))
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if node is None:
        return f"{what} failed for inputs of shape {shapes}: {first_line}"
    where = f"node '{node.name}'"
    if node.op == "call_module":
        module = graph.module.get_submodule(str(node.target))
        where += f" (module '{node.target}', {type(module).__name__})"
    else:
        where += f" ({node_kind(node, None)})"
    source = node_source_line(node)
    if source:
        where += f" at {source}"
    return f"{what} failed at {where} for inputs of shape {shapes}: {first_line}{hint}"
