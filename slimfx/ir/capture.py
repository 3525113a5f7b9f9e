"""Capture: torch.fx symbolic tracing plus shape propagation into an ``ir.Graph``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from slimfx.errors import CaptureError, ShapeError
from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.ir.shapes import ensure_shapes
from slimfx.ir.source import exception_source_line

LeafSpec = type | str


class SlimfxTracer(fx.Tracer):
    """fx Tracer keeping standard ``torch.nn`` layers whole, plus user-chosen leaf modules.

    ``leaf_modules`` holds module classes or module paths (``"layer1.0"``). A subclass of a
    standard layer that keeps its parent's ``forward`` (torchvision's ``Conv3DSimple`` is a
    ``Conv3d``) stays whole too, so passes see the layer rather than a bare ``conv3d`` call.
    The tracer also remembers the innermost module being traced when tracing fails, for the
    error message.
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec] = (), record_stack_traces: bool = False):
        super().__init__()
        self.record_stack_traces = record_stack_traces
        leaves = list(leaf_modules)
        self.leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self.leaf_paths = frozenset(p for p in leaves if isinstance(p, str))
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        return (
            super().is_leaf_module(m, module_qualified_name)
            or _inherits_standard_forward(m)
            or ops.norm_activation_tail(m) is not None  # timm's BatchNormAct2d: a known layer
        )

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # innermost module: the first handler to run
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


def _inherits_standard_forward(m: torch.nn.Module) -> bool:
    """True when ``m``'s forward is a standard torch.nn layer's (not a container's)."""
    owner = next((c for c in type(m).__mro__ if "forward" in vars(c)), None)
    return (
        owner is not None
        and owner.__module__.startswith("torch.nn.modules")
        and owner is not torch.nn.Module
        and not issubclass(owner, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict))
    )


MAX_OPAQUE = 64  # submodules capture may keep whole before it gives up


class _TraceFailure(Exception):
    """Tracing failed inside ``path`` ('' for the top-level module); ``message`` explains it."""

    def __init__(self, path: str | None, message: str):
        super().__init__(message)
        self.path, self.message = path, message


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    fallback: bool = True,
) -> Graph:
    """Trace ``model`` with torch.fx and annotate every node with its output shapes.

    The model is traced in its current mode (call ``.eval()`` first for inference graphs).
    When tracing fails inside a submodule (Python control flow on tensor values), that
    submodule is kept whole and tracing retried (``fallback=False`` turns this off); such
    *opaque* modules are listed in ``Graph.opaque``, their cost is measured, and every pass
    leaves them alone. Raises ``CaptureError`` naming the module path and source line when the
    top-level module itself does not trace, and ``ShapeError`` naming the node when the example
    inputs do not fit the model.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(model, fx.GraphModule):
        graph = Graph(model, tuple(example_inputs))
        ensure_shapes(graph)
        return graph
    leaves, opaque = list(leaf_modules), []
    while True:
        try:
            module = _trace(model, leaves, concrete_args)
            break
        except _TraceFailure as failure:
            if not fallback or not failure.path or failure.path in opaque or len(opaque) >= MAX_OPAQUE:
                raise CaptureError(failure.message) from failure.__cause__
            leaves.append(failure.path)
            opaque.append(failure.path)
    graph = Graph(module, tuple(example_inputs), opaque=frozenset(opaque))
    try:
        ensure_shapes(graph)
    except ShapeError:
        # Recording source lines makes tracing ~3x slower, so it is done only to explain a failure.
        traced = _trace(model, leaves, concrete_args, record_stack_traces=True)
        ensure_shapes(Graph(traced, tuple(example_inputs)))
        raise
    return graph


def _trace(
    model: torch.nn.Module,
    leaf_modules: Iterable[LeafSpec],
    concrete_args: dict[str, Any] | None,
    record_stack_traces: bool = False,
) -> fx.GraphModule:
    tracer = SlimfxTracer(leaf_modules, record_stack_traces)
    try:
        fx_graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        path = tracer.failed_module[0] if tracer.failed_module else None
        raise _TraceFailure(path, _describe_trace_failure(model, tracer, exc)) from exc
    module = fx.GraphModule(tracer.root, fx_graph, type(model).__name__)
    # fx's tracer ends up in reference cycles (closures it patches in); drop its hold on the
    # traced model, so that what the graph no longer uses is freed at once, not at the next
    # garbage collection (a multi-GB model would otherwise stay in memory twice)
    tracer.root = tracer.submodule_paths = None
    return module


def _describe_trace_failure(model: torch.nn.Module, tracer: SlimfxTracer, exc: Exception) -> str:
    if tracer.failed_module is not None:
        path, cls = tracer.failed_module
        where = f"module '{path}' ({cls})" if path else f"the top-level module ({cls})"
    else:
        where = f"the top-level module ({type(model).__name__})"
    line = exception_source_line(exc)
    if line:
        where += f" at {line}"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    leaf_hint = (
        f"leaf_modules=['{tracer.failed_module[0]}'] (CLI: --leaf-module {tracer.failed_module[0]})"
        if tracer.failed_module and tracer.failed_module[0]
        else "leaf_modules=[...] (CLI: --leaf-module PATH)"
    )
    return (
        f"cannot trace {where}: {reason}. torch.fx traces symbolically, so Python control flow "
        f"on tensor values cannot be captured. Keep that module whole with {leaf_hint}, "
        "or fix the branch with concrete_args."
    )
