"""Tracing at fixed shapes: each proxy carries its real value, so shape queries are plain ints.

Symbolic tracing cannot follow Python branches on shapes (``if H != self.img_size[0]``):
``x.shape`` is a proxy there. This tracer runs every traced op on the example inputs as it
records it, so ``x.shape``, ``x.size(1)``, ``x.dim()`` and ``x.dtype`` answer with the real
values and the branch the example takes is recorded. The graph is then specialized to the
example input shapes (sizes it read become literals); branches on tensor *values* still fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import _orig_module_call

from slimfx.ir.graph import attribute

_CONCRETE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


class _ValuedProxy(fx.Proxy):
    """A proxy that answers shape queries from the real value of its node (when known)."""

    def _value(self) -> Any:
        return self.tracer.values.get(self.node)  # type: ignore[attr-defined]

    def size(self, dim: int | None = None) -> Any:
        value = self._value()
        if isinstance(value, torch.Tensor):
            return value.size() if dim is None else value.size(dim)
        return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})

    def dim(self) -> Any:
        value = self._value()
        if isinstance(value, torch.Tensor):
            return value.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})

    def numel(self) -> Any:
        value = self._value()
        if isinstance(value, torch.Tensor):
            return value.numel()
        return self.tracer.create_proxy("call_method", "numel", (self,), {})

    def __getattr__(self, name: str) -> Any:
        if name in _CONCRETE_ATTRIBUTES:
            value = self._value()
            if isinstance(value, torch.Tensor):
                return getattr(value, name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        value = self._value()
        if isinstance(value, (torch.Tensor, tuple, list)):
            return len(value)
        return super().__len__()


def fixed_shape_tracer(base: type[fx.Tracer], inputs: Mapping[str, torch.Tensor]) -> type[fx.Tracer]:
    """A subclass of tracer class ``base`` that traces at the shapes of ``inputs`` (the example
    input of each argument of ``forward``, by name)."""

    class FixedShapeTracer(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.values: dict[fx.Node, Any] = {}
            self.evaluating = False

        def proxy(self, node: fx.Node) -> fx.Proxy:
            return _ValuedProxy(node, self)

        def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> Any:
            proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
            if isinstance(proxy, fx.Proxy):
                try:
                    self.values[proxy.node] = self._evaluate(kind, target, args, kwargs)
                except Exception:  # unknown value: shape queries on it stay symbolic (and may fail)
                    pass
            return proxy

        def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
            if kind == "placeholder":
                return inputs[str(target).lstrip("*")].clone()  # in-place ops must not touch the caller's tensor
            args, kwargs = _real(args, self.values), _real(kwargs, self.values)
            outer, self.evaluating = self.evaluating, True  # modules read real parameters; calls are not traced
            try:
                with torch.no_grad():
                    if kind == "get_attr":
                        return attribute(self.root, str(target))
                    if kind == "call_function":
                        return target(*args, **kwargs)
                    if kind == "call_method":
                        return getattr(args[0], target)(*args[1:], **kwargs)
                    if kind == "call_module":  # the module's own call, not the tracer's patched one
                        return _orig_module_call(self.root.get_submodule(str(target)), *args, **kwargs)
                return None
            finally:
                self.evaluating = outer

        def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
            if self.evaluating:  # a leaf running on real tensors calls its children: run them, record nothing
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
            if self.evaluating:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
            try:
                return super().trace(root, concrete_args)
            finally:
                self.values.clear()  # drop the real tensors: the graph must not hold them

    return FixedShapeTracer


def _real(value: Any, values: dict[fx.Node, Any]) -> Any:
    """``value`` with every proxy replaced by its node's real value (KeyError when unknown)."""
    return fx.node.map_aggregate(value, lambda item: values[item.node] if isinstance(item, fx.Proxy) else item)
