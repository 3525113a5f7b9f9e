"""The IR's data: what slimfx knows about each fx node, kept in ``node.meta["slimfx"]``.

Data only: this module imports nothing of slimfx, so every layer (analyses, cost model,
passes, reports) can use these types without importing one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.fx as fx

META_KEY = "slimfx"


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor a node produces."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(int(d) for d in tensor.shape), tensor.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


@dataclass(frozen=True)
class Cost:
    """Counts that add up: over nodes, over a graph.

    MACs are multiply-accumulates (FLOPs = 2 x MACs); element ops the per-element work of
    normalization, pooling, elementwise ops and activations; bytes the activation and weight
    traffic of ops that touch memory.
    """

    macs: int = 0
    elem_ops: int = 0
    params: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def without_params(self) -> Cost:
        """The same cost with its parameters left out (a module counted once already)."""
        return Cost(self.macs, self.elem_ops, 0, self.bytes_read, self.bytes_written)

    def totals(self) -> dict[str, int]:
        """Every count by its report name, FLOPs included: ``{"macs": ..., "flops": ..., ...}``."""
        return {
            "macs": self.macs,
            "flops": self.flops,
            "elem_ops": self.elem_ops,
            "params": self.params,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }


@dataclass(frozen=True)
class NodeCost:
    """The cost of one node and the rule that computed it (``counted=False``: no rule, and
    ``rule`` says why)."""

    cost: Cost
    rule: str
    counted: bool = True


@dataclass(frozen=True)
class NodeInfo:
    """What slimfx knows about one fx node.

    ``outputs`` lists every tensor in the node's result (tuples flattened in order).
    ``kind`` names what the node runs: a module class, a function or a method.
    ``cost`` is filled by the cost model; ``provenance`` names the pass that created it.
    """

    kind: str
    outputs: tuple[TensorMeta, ...] = ()
    cost: NodeCost | None = None
    provenance: str | None = None

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        """Shape of the first tensor output, the one reports show."""
        return self.outputs[0].shape if self.outputs else None


@dataclass(frozen=True)
class TakenLayer:
    """Something capture replaced by the standard layers it stands for: what it was (``source``,
    e.g. ``F.batch_norm at node 'bn_batch_norm'``), the new layers' path and types, and any
    condition on the replacement (``note``)."""

    source: str
    path: str
    layer: str
    note: str = ""

    def __str__(self) -> str:
        return f"{self.source} -> {self.layer} '{self.path}'" + (f" ({self.note})" if self.note else "")


def node_kind(node: fx.Node, module: torch.nn.Module | None) -> str:
    """A short readable name for what a node runs."""
    if node.op == "call_module":
        return type(module).__name__ if module is not None else "?"
    if node.op == "call_function":
        return function_name(node.target)
    if node.op == "call_method":
        return f".{node.target}"
    return {"placeholder": "input", "output": "output", "get_attr": "attribute"}[node.op]


def function_name(fn: object) -> str:
    """``torch.cat``, ``operator.add``, ``F.relu``: module-qualified but short."""
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", repr(fn))
    module = module.replace("_operator", "operator").replace("torch.nn.functional", "F")
    module = module.replace("torch._C._nn", "F").replace("torch.functional", "torch")
    return f"{module}.{name}" if module else name
