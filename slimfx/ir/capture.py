"""Capture: torch.fx symbolic tracing plus shape propagation into an ``ir.Graph``."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from slimfx.errors import CaptureError, ShapeError
from slimfx.ir import ops
from slimfx.ir.fixed_shapes import fixed_shape_tracer
from slimfx.ir.functional_layers import functional_batch_norms_as_layers
from slimfx.ir.graph import Graph
from slimfx.ir.same_padding import same_convs_as_layers
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
    When tracing fails (``fallback=False`` turns each step off):

    1. in the top-level module's own code, it is traced again *at fixed shapes*: every op runs
       on the example inputs while it is recorded, so branches on shapes follow the example
       and the graph holds for these input shapes only (``Graph.fixed_shapes``);
    2. inside a submodule, that submodule is kept whole and tracing retried; such *opaque*
       modules are listed in ``Graph.opaque``, their cost is measured, every pass leaves them alone.

    Raises ``CaptureError`` naming the module path and source line when that does not help
    (branches on tensor values in the top-level module), and ``ShapeError`` naming the node
    when the example inputs do not fit the model.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(model, fx.GraphModule):  # the caller's own graph: annotated, not rewritten
        graph = Graph(model, tuple(example_inputs))
        ensure_shapes(graph)
        return graph
    _check_leaf_paths(model, leaf_modules)
    inputs = _inputs_by_name(model, tuple(example_inputs), concrete_args)
    leaves, opaque, fixed = list(leaf_modules), [], None
    while True:
        try:
            module = _trace(model, leaves, concrete_args, fixed)
            break
        except _TraceFailure as failure:
            if not fallback:
                raise CaptureError(failure.message) from failure.__cause__
            if not failure.path and fixed is None:
                fixed, leaves, opaque = inputs, list(leaf_modules), []  # shapes may be what stopped it
                continue
            if not failure.path or failure.path in opaque or len(opaque) >= MAX_OPAQUE:
                raise CaptureError(failure.message) from failure.__cause__
            leaves.append(failure.path)
            opaque.append(failure.path)
    graph = Graph(module, tuple(example_inputs), opaque=frozenset(opaque), fixed_shapes=fixed is not None)
    try:
        ensure_shapes(graph)
    except ShapeError:
        # Recording source lines makes tracing ~3x slower, so it is done only to explain a failure.
        traced = _trace(model, leaves, concrete_args, fixed, record_stack_traces=True)
        ensure_shapes(Graph(traced, tuple(example_inputs)))
        raise
    return _with_layers_taken(graph)


def _with_layers_taken(graph: Graph) -> Graph:
    """``graph`` with opaque "same" convs and functional batch norms over constants made the
    standard layers they stand for (``Graph.taken_layers``)."""
    graph.taken_layers = same_convs_as_layers(graph)
    ensure_shapes(graph)
    graph.taken_layers += functional_batch_norms_as_layers(graph)
    ensure_shapes(graph)
    return graph


def _inputs_by_name(
    model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], concrete_args: dict[str, Any] | None
) -> dict[str, torch.Tensor]:
    """The example input of each traced argument of ``model.forward``, by parameter name."""
    names = [
        name
        for name, parameter in inspect.signature(model.forward).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        and name not in (concrete_args or {})
    ]
    return dict(zip(names, example_inputs))


def _check_leaf_paths(model: torch.nn.Module, leaf_modules: Iterable[LeafSpec]) -> None:
    """A leaf module path that names no submodule is an error, with the nearest paths."""
    import difflib

    paths = [name for name, _ in model.named_modules() if name]
    for leaf in leaf_modules:
        if isinstance(leaf, str) and leaf not in paths:
            close = difflib.get_close_matches(leaf, paths, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (module paths look like layer1.0.conv1)"
            raise CaptureError(f"leaf module {leaf!r} is not a submodule of {type(model).__name__}{hint}")


def _trace(
    model: torch.nn.Module,
    leaf_modules: Iterable[LeafSpec],
    concrete_args: dict[str, Any] | None,
    fixed_inputs: dict[str, torch.Tensor] | None = None,
    record_stack_traces: bool = False,
) -> fx.GraphModule:
    tracer_class = SlimfxTracer if fixed_inputs is None else fixed_shape_tracer(SlimfxTracer, fixed_inputs)
    tracer = tracer_class(leaf_modules, record_stack_traces)
    state = _python_state(model)
    try:
        fx_graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        path = tracer.failed_module[0] if tracer.failed_module else None
        raise _TraceFailure(path, _describe_trace_failure(model, tracer, exc)) from exc
    finally:
        _restore_python_state(model, state)
    _bind_concrete_args(fx_graph, concrete_args or {})
    module = fx.GraphModule(tracer.root, fx_graph, type(model).__name__)
    # fx's tracer ends up in reference cycles (closures it patches in); drop its hold on the
    # traced model, so that what the graph no longer uses is freed at once, not at the next
    # garbage collection (a multi-GB model would otherwise stay in memory twice)
    tracer.root = tracer.submodule_paths = None
    return module


def _bind_concrete_args(graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """fx keeps a placeholder for each concrete argument (``NAME_1``, checked against the value
    by an assert) whose default is the signature's; make the concrete value its default, so the
    graph runs on the tensor inputs alone."""
    for node in graph.nodes:
        if node.op == "placeholder":
            name, _, count = str(node.target).rpartition("_")
            if name in concrete_args and count.isdigit():
                node.args = (concrete_args[name],)


_MODULE_SLOTS = frozenset({"_modules", "_parameters", "_buffers"})


def _python_state(model: torch.nn.Module) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """Each module's plain attributes (containers shallow-copied), to be restored after tracing."""
    return [(m, {k: _copy(v) for k, v in vars(m).items() if k not in _MODULE_SLOTS}) for m in model.modules()]


def _restore_python_state(model: torch.nn.Module, state: list[tuple[torch.nn.Module, dict[str, Any]]]) -> None:
    """Take back the proxies tracing left in modules' plain attributes: a cache that stored one
    (timm's LeViT keeps its attention biases in one) would hand a node of this trace to the next.
    Attributes tracing added without a proxy (fx's tensor constants) stay."""
    for module, saved in state:
        attributes = vars(module)
        for key in [k for k, v in attributes.items() if k not in _MODULE_SLOTS and _holds_proxy(v)]:
            value, current = saved.get(key), attributes[key]
            if key not in saved:
                del attributes[key]
            elif isinstance(value, dict) and isinstance(current, dict) and current is not value:
                current.clear()
                current.update(value)
            elif isinstance(value, list) and isinstance(current, list) and current is not value:
                current[:] = value
            else:
                attributes[key] = value


def _copy(value: Any) -> Any:
    return type(value)(value) if type(value) in (dict, list) else value


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple)) and any(isinstance(v, fx.Proxy) for v in value)


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
    failure = (
        f"cannot trace {where}: {reason}. torch.fx traces symbolically, so Python control flow "
        "on tensor values cannot be captured."
    )
    if tracer.failed_module and tracer.failed_module[0]:
        path = tracer.failed_module[0]
        return (
            f"{failure} Keep that module whole with leaf_modules=['{path}'] (CLI: --leaf-module {path}), "
            "or fix the branch with concrete_args."
        )
    return (
        f"{failure} The branch is in the model's own forward, which cannot be kept whole: when it branches on "
        "an argument that is not a tensor, fix it with concrete_args={'NAME': value} (CLI: --concrete-arg "
        "NAME=VALUE); otherwise move the branch into a submodule and keep that whole (--leaf-module PATH)."
    )
