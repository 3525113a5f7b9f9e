"""A model file format that loads without running code hidden in it.

``torch.save(graph_module)`` pickles a GraphModule, and unpickling runs whatever code the
file names. slimfx instead writes the graph as data (nodes, argument trees, function names),
the module tree as data (class names from an allowlist and their plain attributes) and the
tensors, and loads it with ``torch.load(weights_only=True)``. On load every class and
function name is checked against the allowlist, so a crafted file cannot call ``os.system``.
"""

from __future__ import annotations

import importlib
import json
import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.errors import ModelSpecError, OutputError, UnsafeModelFileError
from slimfx.files.atomic import atomic_write

FORMAT = "slimfx.module/1"
_MODULE_INIT_ATTRS = frozenset(vars(nn.Module()))
_PLAIN = (type(None), bool, int, float, str)
# Modules whose functions a graph may call. torch's own namespace is limited to C ops.
_FUNCTION_MODULES = {
    "torch.nn.functional",
    "operator",
    "_operator",
    "math",
    "torchvision.ops.stochastic_depth",
    "torchvision.models.swin_transformer",
}
_TORCH_FUNCTION_MODULES = {"torch", "torch.functional", "torch._C._nn", "torch._C._VariableFunctions"}
_DENIED_TORCH_FUNCTIONS = {"from_file", "load", "save", "set_num_threads", "manual_seed", "set_default_device"}
_ALLOWED_PY_TORCH_FUNCTIONS = {"_assert", "einsum", "split", "chunk", "flatten"}


_RENAMED_MODULES = {"slimfx.quant.modules": "slimfx.quant.layers"}  # files written before a module moved


class UnsafeToSave(Exception):
    """The module holds something the safe format cannot represent."""


# -- encoding ---------------------------------------------------------------------------------
def _encode_arg(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"$node": value.name}
    if isinstance(value, _PLAIN):
        if isinstance(value, float) and not math.isfinite(value):
            return {"$float": repr(value)}
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode_arg(v) for v in value]}
    if isinstance(value, list):
        return [_encode_arg(v) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[_encode_arg(k), _encode_arg(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [_encode_arg(value.start), _encode_arg(value.stop), _encode_arg(value.step)]}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"$memory_format": str(value).removeprefix("torch.")}
    if value is Ellipsis:
        return {"$ellipsis": True}
    raise UnsafeToSave(f"argument of type {type(value).__name__} ({value!r})")


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__name__", None)
    if fn is getattr:
        return "builtins:getattr"
    if module is None or name is None:
        raise UnsafeToSave(f"function {fn!r} has no importable name")
    return f"{module}:{name}"


def _encode_graph(graph: fx.Graph) -> list[dict[str, Any]]:
    nodes = []
    for node in graph.nodes:
        target = _function_name(node.target) if node.op == "call_function" else str(node.target)
        nodes.append(
            {
                "name": node.name,
                "op": node.op,
                "target": target,
                "args": _encode_arg(node.args),
                "kwargs": _encode_arg(node.kwargs),
            }
        )
    return nodes


def _encode_modules(root: nn.Module) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Every module of the tree as data; a GraphModule (the root, or an early-exit model's
    stages) is stored as a plain module and its graph, and rebuilt from them."""
    modules, tensors = [], {}
    for path, module in root.named_modules():
        is_graph = isinstance(module, fx.GraphModule)
        cls = nn.Module if is_graph else type(module)
        if not _is_allowed_class(f"{cls.__module__}:{cls.__qualname__}"):
            raise UnsafeToSave(f"module '{path}' is a {cls.__module__}.{cls.__qualname__}, not a torch.nn class")
        attrs = {}
        if not is_graph:
            for key, value in vars(module).items():
                if key in _MODULE_INIT_ATTRS or key in ("_parameters", "_buffers", "_modules"):
                    continue
                attrs[key] = _encode_attr(path or "(root)", key, value)
        params = {n: p.requires_grad for n, p in module._parameters.items() if p is not None}
        buffers = [n for n, b in module._buffers.items() if b is not None]
        for n in params:
            tensors[_join(path, n)] = module._parameters[n].detach()
        for n in buffers:
            tensors[_join(path, n)] = module._buffers[n]
        modules.append(
            {
                "path": path,
                "class": f"{cls.__module__}:{cls.__qualname__}",
                "graph": _encode_graph(module.graph) if is_graph else None,
                "attrs": attrs,
                "params": params,
                "buffers": buffers,
                "empty_params": [n for n, p in module._parameters.items() if p is None],
                "empty_buffers": [n for n, b in module._buffers.items() if b is None],
                "non_persistent": sorted(module._non_persistent_buffers_set),
                "training": module.training,
            }
        )
    return modules, tensors


def _encode_attr(path: str, key: str, value: Any) -> Any:
    try:
        return _encode_arg(value)
    except UnsafeToSave as exc:
        raise UnsafeToSave(f"attribute '{key}' of module '{path}': {exc}") from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def save_module(
    module: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor], model_name: str = "model"
) -> None:
    """Write ``module`` (a GraphModule, or a tree of allowed classes holding GraphModules, such
    as an early-exit model) atomically: nothing is left at ``path`` if writing fails."""
    try:
        modules, tensors = _encode_modules(module)
    except UnsafeToSave as exc:
        raise OutputError(
            f"cannot save the compiled model in slimfx's safe format: {exc}. "
            "Save it yourself with torch.save (loading that needs trust)."
        ) from None
    payload = {
        "format": FORMAT,
        "model": model_name,
        "input_shapes": [list(t.shape) for t in example_inputs],
        "modules": json.dumps(modules),
        "tensors": tensors,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


# -- decoding ---------------------------------------------------------------------------------
def _is_allowed_class(name: str) -> bool:
    module, _, qualname = name.partition(":")
    return (
        (module.startswith("torch.nn.modules.") or module.startswith("slimfx."))
        and "." not in qualname
        or (name == "torch.nn.modules.module:Module")
    )


def _resolve_class(name: str) -> type[nn.Module]:
    if not _is_allowed_class(name):
        raise UnsafeModelFileError(
            f"model file names class {name!r}, which is not a torch.nn layer; refusing to load it"
        )
    module, _, qualname = name.partition(":")
    module = _RENAMED_MODULES.get(module, module)
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelSpecError(f"model file names class {name!r}, which this torch does not have")
    return cls


def _resolve_function(name: str) -> Any:
    module, _, qualname = name.partition(":")
    refused = UnsafeModelFileError(f"model file calls function {name!r}, which is not allowed; refusing to load it")
    if "." in qualname or qualname.startswith("__"):
        raise refused
    if name == "builtins:getattr":
        return getattr
    if module in _TORCH_FUNCTION_MODULES:
        if qualname in _DENIED_TORCH_FUNCTIONS:
            raise refused
        fn = getattr(importlib.import_module(module), qualname, None)
        if isinstance(fn, types.BuiltinFunctionType) or qualname in _ALLOWED_PY_TORCH_FUNCTIONS:
            return fn
        raise refused
    if module in _FUNCTION_MODULES:
        try:
            fn = getattr(importlib.import_module(module), qualname)
        except (ImportError, AttributeError):
            raise ModelSpecError(f"model file calls {name!r}, which is not installed here") from None
        if callable(fn) and not isinstance(fn, type):
            return fn
    raise refused


def _decode_arg(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode_arg(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, inner),) = value.items()
    if tag == "$node":
        return nodes[inner]
    if tag == "$tuple":
        return tuple(_decode_arg(v, nodes) for v in inner)
    if tag == "$dict":
        return {_decode_arg(k, nodes): _decode_arg(v, nodes) for k, v in inner}
    if tag == "$slice":
        return slice(*(_decode_arg(v, nodes) for v in inner))
    if tag == "$float":
        return float(inner)
    if tag == "$dtype":
        return _torch_constant(inner, torch.dtype)
    if tag == "$device":
        return torch.device(inner)
    if tag == "$memory_format":
        return _torch_constant(inner, torch.memory_format)
    if tag == "$ellipsis":
        return Ellipsis
    raise ModelSpecError(f"model file has an unknown value tag {tag!r}")


def _torch_constant(name: str, kind: type) -> Any:
    value = getattr(torch, name, None)
    if not isinstance(value, kind):
        raise ModelSpecError(f"model file names {name!r}, which is not a torch {kind.__name__}")
    return value


def _build_modules(specs: list[dict[str, Any]], tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    """The module tree; each module stored with a graph becomes a GraphModule, deepest first,
    so a graph's call_module targets already hold their rebuilt modules."""
    built: dict[str, nn.Module] = {}
    for spec in specs:  # parents come before their children (named_modules order)
        path = spec["path"]
        module = _build_module(spec, tensors)
        built[path] = module
        if path:
            parent_path, _, leaf = path.rpartition(".")
            built[parent_path].add_module(leaf, module)
    graphs = [spec for spec in specs if spec.get("graph") is not None]
    for spec in sorted(graphs, key=lambda s: s["path"].count(".") + bool(s["path"]), reverse=True):
        path = spec["path"]
        module = fx.GraphModule(built[path], _build_graph(spec["graph"]), class_name=name if not path else "Stage")
        module.train(spec["training"])
        built[path] = module
        if path:
            parent_path, _, leaf = path.rpartition(".")
            built[parent_path].add_module(leaf, module)
    return built[""]


def _build_module(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    cls = _resolve_class(spec["class"])
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in spec["attrs"].items():
        object.__setattr__(module, key, _decode_arg(value, {}))
    _load_state(module, spec, tensors)
    return module


def _load_state(module: nn.Module, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path = spec["path"]
    for name, requires_grad in spec["params"].items():
        module.register_parameter(name, nn.Parameter(tensors[_join(path, name)], requires_grad=requires_grad))
    for name in spec["buffers"]:
        module.register_buffer(name, tensors[_join(path, name)], persistent=name not in spec["non_persistent"])
    for name in spec.get("empty_params", ()):  # declared but None, like a conv's bias=False
        module.register_parameter(name, None)
    for name in spec.get("empty_buffers", ()):
        module.register_buffer(name, None)
    module.train(spec["training"])


def _build_graph(specs: list[dict[str, Any]]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for spec in specs:
        op, target = spec["op"], spec["target"]
        if op == "call_function":
            target = _resolve_function(target)
        elif op == "call_method" and (target.startswith("_") or not hasattr(torch.Tensor, target)):
            raise UnsafeModelFileError(f"model file calls tensor method {target!r}, which is not allowed")
        args = _decode_arg(spec["args"], nodes)
        kwargs = _decode_arg(spec["kwargs"], nodes)
        if target is getattr and (len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("_")):
            raise UnsafeModelFileError("model file reads a private attribute through getattr; refusing to load it")
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=spec["name"])
        nodes[spec["name"]] = node
    return graph


def is_slimfx_file(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def module_from_payload(payload: dict[str, Any]) -> tuple[nn.Module, list[list[int]], str]:
    """Rebuild (module, input shapes, model name) from a loaded slimfx payload."""
    name = str(payload.get("model", "model"))
    try:
        specs = json.loads(payload["modules"])
        if "graph" in payload:  # files written before graphs were stored per module: the root's graph
            specs[0]["graph"] = json.loads(payload["graph"])
        module = _build_modules(specs, payload["tensors"], name)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ModelSpecError(f"model file is damaged or from another slimfx version: {exc}") from None
    return module, payload.get("input_shapes", []), name
