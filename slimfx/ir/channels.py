"""Channel coupling analysis: which channels must be removed together, and where they go.

Every channel a layer creates (a conv's or linear's output channel) gets an integer id. The
analysis walks the graph in order and carries, for each tensor, an *id tensor*: the tensor's
shape without the batch dimension, each element holding the id of the channel it belongs to.
Ops move ids the way they move data (``cat`` concatenates them, ``flatten`` spreads a channel
over its H*W features, a channel shuffle permutes them), so index maps come for free. Ops
that tie channels together (a residual ``add``, an SE ``mul``, a ``chunk`` whose halves must
shrink alike) record pairs of ids that must share a fate; joining those pairs with networkx's
union-find gives the *units* that pruning removes or keeps, and joining the units of each
layer gives the *groups* a ratio applies to.

Fail closed: an op whose channel behaviour is not known here, the model's inputs and
outputs, and parameters used as tensors get a *blocked* id carrying the reason; every group
that reaches one is reported unprunable with that reason.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx.ir import ops
from slimfx.ir.graph import Graph
from slimfx.ir.meta import node_kind
from slimfx.ir.shapes import ensure_shapes
from slimfx.ir.source import node_source_line

# how each op moves channels: composed from the op taxonomy
_PASS_THROUGH = (
    ops.ACTIVATIONS | ops.CLAMP | ops.DROPOUT | ops.IDENTITY | ops.CASTS | ops.op_set((), (operator.neg,), ("neg",))
)  # channel c of the output is channel c of the input
_SPATIAL = ops.POOLS | ops.RESIZE | ops.PADDING  # channel dim kept, spatial dims mixed (or padded)
_APPLY = ops.op_set(
    (),
    (torch.flatten, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, operator.getitem),
    ("flatten", "transpose", "permute", "squeeze", "unsqueeze", "t"),
)  # run on the id tensors
_REDUCTIONS = ops.op_set((), (torch.mean, torch.sum, torch.amax), ("mean", "sum", "amax"))
_MIXES_CHANNELS = "normalizes across channels, so removing one changes the others"
_INSTANCE_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")


class LayerKind(enum.StrEnum):
    """How a layer's channels map: a new set of output channels, or each channel to itself."""

    CONV = "conv"
    LINEAR = "linear"
    BATCHNORM = "batchnorm"
    DEPTHWISE = "depthwise"


@dataclass(frozen=True)
class LayerChannels:
    """How one conv, linear or BatchNorm layer's channels map to pruning units.

    ``in_units[i]`` is the unit of input channel (or feature) ``i``; ``out_units[o]`` that of
    output channel ``o``. For BatchNorm and depthwise convs both are the same.
    """

    node: str
    target: str
    kind: LayerKind
    in_units: torch.Tensor
    out_units: torch.Tensor
    groups: int = 1

    @property
    def per_channel(self) -> bool:
        """True for layers that map each channel to itself (BatchNorm, depthwise conv)."""
        return self.kind in (LayerKind.BATCHNORM, LayerKind.DEPTHWISE)


@dataclass
class ChannelGroup:
    """Units pruned under one ratio: the channels of the layers in ``sources`` and their copies.

    ``units`` holds unit indices in the first source's channel order. ``partitions`` are
    (G, m) unit matrices from grouped convs: each row must lose the same number of units.
    ``blocked`` lists why the group cannot be pruned (empty when it can).
    """

    index: int
    units: torch.Tensor
    sources: tuple[str, ...]
    members: tuple[str, ...]
    blocked: tuple[str, ...] = ()
    partitions: tuple[torch.Tensor, ...] = ()

    @property
    def name(self) -> str:
        if not self.sources:
            return f"group {self.index}"
        more = f" (+{len(self.sources) - 1} coupled)" if len(self.sources) > 1 else ""
        return self.sources[0] + more


@dataclass(frozen=True, eq=False)
class SplitSizes:
    """A split along channels with literal part sizes (``x.split(26, 1)``): after pruning, its
    sizes argument (``position``, or ``keyword`` where passed so) becomes the kept count of each part.

    ``part_units[i]`` holds the unit of each channel of part ``i``, in order.
    """

    node: str
    position: int
    keyword: str
    part_units: tuple[torch.Tensor, ...]

    def argument_after(self, removed: torch.Tensor) -> list[int] | None:
        """Part sizes once ``removed`` units are gone, or None when no part changes."""
        kept = [int((~removed[units]).sum()) for units in self.part_units]
        return None if kept == [len(units) for units in self.part_units] else kept


@dataclass(frozen=True, eq=False)
class ChannelSlice:
    """Indexing a channel dim with a literal slice (GhostNet's ``out[:, :self.out_chs]``):
    after pruning, the bounds count the kept channels before them.

    ``index`` is the original index (a tuple of entries); entry ``entry`` slices the channels,
    whose units, in order, are ``units``.
    """

    node: str
    index: tuple[Any, ...]
    entry: int
    units: torch.Tensor
    position: ClassVar[int] = 1  # getitem(x, index)
    keyword: ClassVar[str] = ""

    def argument_after(self, removed: torch.Tensor) -> tuple[Any, ...] | None:
        """The index once ``removed`` units are gone, or None when it does not change."""
        if not removed[self.units].any():
            return None  # as written (negative bounds included) it still cuts the same channels
        kept = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum((~removed[self.units]).long(), 0)])
        start, stop, _ = self.index[self.entry].indices(len(self.units))
        new = slice(int(kept[start]), int(kept[max(stop, start)]))  # non-negative: counted from the front
        return (*self.index[: self.entry], new, *self.index[self.entry + 1 :])


LiteralArgument = SplitSizes | ChannelSlice
"""A literal argument (split sizes, slice bounds) that pruning rewrites to the kept channels."""


@dataclass
class ChannelAnalysis:
    """Groups, the layers they touch, the unit of every channel id, and the literal
    arguments (split sizes, slice bounds) that pruning rewrites."""

    groups: list[ChannelGroup]
    layers: dict[str, LayerChannels]
    unit_group: torch.Tensor  # group index of each unit
    num_units: int = 0
    literals: tuple[LiteralArgument, ...] = ()

    def layers_of(self, group: ChannelGroup) -> list[LayerChannels]:
        members = set(group.members)
        return [layer for layer in self.layers.values() if layer.node in members]


def analyze_channels(graph: Graph) -> ChannelAnalysis:
    """The channel groups of ``graph`` (cached until the graph changes)."""
    return graph.cached("channels", lambda: _CouplingBuilder(graph).build())


# -- the walk ----------------------------------------------------------------------------------
@dataclass
class _Blocked:
    """A tensor (or tuple of tensors) whose channels are unknown: one blocked id stands for all."""

    id: int


@dataclass
class _RawLayer:
    node: fx.Node
    kind: LayerKind
    in_ids: torch.Tensor
    out_ids: torch.Tensor
    groups: int = 1


@dataclass
class _RawSplit:
    node: fx.Node
    index: int
    name: str
    part_ids: tuple[torch.Tensor, ...]


@dataclass
class _RawSlice:
    node: fx.Node
    index: tuple[Any, ...]
    entry: int
    ids: torch.Tensor


@dataclass
class _Source:
    target: str
    first: int
    count: int


@dataclass
class _CouplingBuilder:
    graph: Graph
    next_id: int = 0
    pairs: list[torch.Tensor] = field(default_factory=list)  # (2, n) id pairs that share a fate
    blocks: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    sources: list[_Source] = field(default_factory=list)
    layers: dict[str, _RawLayer] = field(default_factory=dict)
    literals: list[_RawSplit | _RawSlice] = field(default_factory=list)
    values: dict[fx.Node, Any] = field(default_factory=dict)

    # -- ids ---------------------------------------------------------------------------------
    def new_ids(self, count: int) -> torch.Tensor:
        ids = torch.arange(self.next_id, self.next_id + count)
        self.next_id += count
        return ids

    def blocked(self, reason: str) -> _Blocked:
        ids = self.new_ids(1)
        self.blocks.append((ids, reason))
        return _Blocked(int(ids[0]))

    def block(self, ids: torch.Tensor | _Blocked | None, reason: str) -> None:
        if isinstance(ids, torch.Tensor):
            self.blocks.append((torch.unique(ids), reason))

    def block_value(self, arg: Any, reason: str) -> None:
        """Block every channel of a node argument (a tensor or a tuple of them)."""
        value = self.values.get(arg) if isinstance(arg, fx.Node) else None
        for ids in value if isinstance(value, tuple) else (self.tensor_ids(arg),):
            self.block(ids, reason)

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Record that ``a[i]`` and ``b[i]`` (broadcast) must be removed together."""
        a, b = torch.broadcast_tensors(a, b)
        for dim in range(a.dim()):  # drop dimensions both merely broadcast along
            if a.stride(dim) == 0 and b.stride(dim) == 0:
                a, b = a.narrow(dim, 0, 1), b.narrow(dim, 0, 1)
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)])
        pairs = pairs[:, pairs[0] != pairs[1]]
        if pairs.numel():
            self.pairs.append(torch.unique(pairs, dim=1))

    def tensor_ids(self, arg: Any) -> torch.Tensor | None:
        """The id tensor (batch dim removed) of a node argument, or None for non-tensors."""
        if not isinstance(arg, fx.Node):
            return None
        value = self.values.get(arg)
        if isinstance(value, _Blocked):
            shape = self.shape(arg)
            return None if shape is None else torch.full((), value.id, dtype=torch.long).expand(shape[1:])
        return value if isinstance(value, torch.Tensor) else None

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return self.graph.info(node).out_shape

    def squash(self, ids: torch.Tensor, dim: int) -> torch.Tensor:
        """Ids along ``dim`` after coupling everything that shares an index along it."""
        moved = ids.movedim(dim, 0)
        if moved.dim() == 1:
            return moved
        if all(s == 0 for s in moved.stride()[1:]):
            return moved.reshape(moved.shape[0], -1)[:, 0]
        cols = moved.reshape(moved.shape[0], -1)
        first = cols[:, :1]
        if not torch.equal(cols, first.expand_as(cols)):
            self.couple(first, cols)
        return cols[:, 0].contiguous()

    # -- build -------------------------------------------------------------------------------
    def build(self) -> ChannelAnalysis:
        ensure_shapes(self.graph)
        for node in self.graph.nodes():
            self.values[node] = self._visit(node)
        return self._resolve()

    def _visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.blocked(f"model input '{node.name}' (its channels are never pruned)")
        if node.op == "get_attr":
            return self.blocked(f"tensor attribute '{node.target}' used at node '{node.name}' is not sliced by pruning")
        if node.op == "output":
            for arg in _flatten_args(node.args):
                self.block_value(arg, "model output (its channels are never pruned)")
            return None
        if not self.graph.info(node).outputs:
            return None  # sizes, shapes, asserts: no tensor flows here
        try:
            result = self._dispatch(node)
        except _Unsupported as why:
            return self._unknown(node, str(why))
        except (TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:  # fail closed
            return self._unknown(node, f"could not follow channels through it ({type(exc).__name__}: {exc})")
        return self._unknown(node, "channel behaviour unknown") if result is NotImplemented else result

    def _unknown(self, node: fx.Node, why: str) -> _Blocked:
        where = self._where(node)
        reason = f"{where}: {why}"
        for arg in node.all_input_nodes:
            self.block_value(arg, reason)
        return self.blocked(reason)

    def _where(self, node: fx.Node) -> str:
        module = self.graph.submodule(node) if node.op == "call_module" else None
        what = f"node '{node.name}' ({node_kind(node, module)}"
        what += f", module '{node.target}')" if node.op == "call_module" else ")"
        line = node_source_line(node)
        return what + (f" at {line}" if line else "")

    def _dispatch(self, node: fx.Node) -> Any:
        if node.op == "call_module":
            return self._module(node, self.graph.submodule(node))
        target = node.target
        if node.op == "call_method":
            return self._method(node, str(target))
        if target in _PASS_THROUGH.functions or ops.is_stochastic_depth(target):
            return self.tensor_ids(node.args[0]) if _first_is_tensor(node) else NotImplemented
        if target in ops.BINARY_ARITHMETIC.functions:
            return self._binary(node)
        if target in _SPATIAL.functions:
            return self._spatial(node)
        if target in _REDUCTIONS.functions:
            return self._reduce(node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if target in ops.SOFTMAX.functions:
            return self._softmax(node, _arg(node, 1, "dim"))
        if target in ops.CONCATS.functions:
            return self._cat(node)
        if target is torch.reshape:
            return self._reshape(node, _arg(node, 1, "shape"))
        if target in (torch.chunk, torch.split):
            name = str(getattr(target, "__name__", ""))
            sizes = "chunks" if name == "chunk" else "split_size_or_sections"
            return self._split(node, name, _arg(node, 1, sizes), _arg(node, 2, "dim", 0), sizes)
        if target in _APPLY.functions:
            return self._apply(node, target, node.args, node.kwargs)
        if target is F.instance_norm:
            if any(_arg(node, i, name) is not None for i, name in enumerate(_INSTANCE_NORM_TENSORS, 1)):
                raise _Unsupported("functional instance_norm with statistics or weights, which pruning does not slice")
            return self.tensor_ids(node.args[0])
        if target is F.group_norm:
            raise _Unsupported("group_norm normalizes groups of channels by a literal group count")
        if target in ops.CROSS_CHANNEL_NORMS.functions:
            raise _Unsupported(_MIXES_CHANNELS)
        return NotImplemented

    def _method(self, node: fx.Node, name: str) -> Any:
        if name in ops.SIZES.methods:
            return None
        if name in _PASS_THROUGH.methods:
            return self.tensor_ids(node.args[0])
        if name in ops.BINARY_ARITHMETIC.methods:
            return self._binary(node)
        if name in _REDUCTIONS.methods:
            return self._reduce(node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if name == "softmax":
            return self._softmax(node, _arg(node, 1, "dim"))
        if name in ("view", "reshape"):
            shape = (
                node.args[1:]
                if len(node.args) > 2 or not isinstance(_arg(node, 1, "shape"), (list, tuple))
                else node.args[1]
            )
            return self._reshape(node, shape)
        if name in ("chunk", "split"):
            sizes = "chunks" if name == "chunk" else "split_size"
            return self._split(node, name, _arg(node, 1, sizes), _arg(node, 2, "dim", 0), sizes)
        if name == "expand":
            ids = self.tensor_ids(node.args[0])
            return self._checked(node, ids.unsqueeze(0).expand((1, *self.shape(node)[1:])).squeeze(0))
        if name in _APPLY.methods:
            return self._apply(node, lambda t, *a, **k: getattr(t, name)(*a, **k), node.args, node.kwargs)
        return NotImplemented

    # -- modules -----------------------------------------------------------------------------
    def _module(self, node: fx.Node, module: nn.Module) -> Any:
        ids = self.tensor_ids(node.args[0]) if node.args else None
        per_channel_norm = ops.is_per_channel_norm(module)
        if isinstance(module, (*ops.WEIGHTED_LAYERS, *ops.BATCHNORMS)) or per_channel_norm:
            why = self.graph.why_not_single_call(node) or (None if ids is not None else "called with extra arguments")
            if why is not None:
                more = "; its weights cannot be sliced for one call" if why.startswith("module called") else ""
                raise _Unsupported(why + more)
        if isinstance(module, ops.CONVS):
            return self._conv(node, module, ids)
        if isinstance(module, nn.Linear):
            in_ids = self.squash(ids, ids.dim() - 1)
            out = self.new_ids(module.out_features)
            self._add_source(node, out)
            self.layers[node.name] = _RawLayer(node, LayerKind.LINEAR, in_ids, out)
            return out.expand(self.shape(node)[1:])
        if isinstance(module, ops.BATCHNORMS) or per_channel_norm:
            channel = self.squash(ids, 0)
            self.layers[node.name] = _RawLayer(node, LayerKind.BATCHNORM, channel, channel)
            return ids
        if isinstance(module, _PASS_THROUGH.modules):
            return ids
        if isinstance(module, _SPATIAL.modules):
            return self._spatial(node)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax(node, module.dim)
        if isinstance(module, ops.CROSS_CHANNEL_NORMS.modules):
            raise _Unsupported(_MIXES_CHANNELS)
        if isinstance(module, nn.MultiheadAttention):
            raise _Unsupported("attention projections mix all channels and are not sliced")
        if isinstance(module, nn.Flatten):
            return self._apply(node, lambda t: torch.flatten(t, module.start_dim, module.end_dim), node.args, {})
        return NotImplemented

    def _conv(self, node: fx.Node, conv: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        in_ids = self.squash(ids, 0)
        out_shape = self.shape(node)[1:]
        if conv.groups == conv.in_channels == conv.out_channels:  # depthwise: channel c stays c
            self.layers[node.name] = _RawLayer(node, LayerKind.DEPTHWISE, in_ids, in_ids, conv.groups)
            return in_ids.reshape(-1, *([1] * (len(out_shape) - 1))).expand(out_shape)
        out = self.new_ids(conv.out_channels)
        self._add_source(node, out)
        self.layers[node.name] = _RawLayer(node, LayerKind.CONV, in_ids, out, conv.groups)
        return out.reshape(-1, *([1] * (len(out_shape) - 1))).expand(out_shape)

    def _add_source(self, node: fx.Node, ids: torch.Tensor) -> None:
        self.sources.append(_Source(str(node.target), int(ids[0]), len(ids)))

    # -- functions ---------------------------------------------------------------------------
    def _binary(self, node: fx.Node) -> Any:
        tensors = [self.tensor_ids(a) for a in node.args[:2]]
        present = [t for t in tensors if t is not None]
        if not present:
            return NotImplemented
        out_shape = self.shape(node)[1:]
        if len(present) == 2:
            a, b = (_align(t, len(out_shape)) for t in present)
            self.couple(a, b)
        result = _align(present[0], len(out_shape))
        return result.expand(out_shape) if tuple(result.shape) != tuple(out_shape) else result

    def _spatial(self, node: fx.Node) -> torch.Tensor:
        """Pooling and resizing: channel dim 1 kept, spatial dims mixed."""
        ids = self.tensor_ids(node.args[0])
        channel = self.squash(ids, 0)
        out_shape = self.shape(node)[1:]
        if out_shape[0] != len(channel):
            raise _Unsupported("pooling that changes the channel count")
        return channel.reshape(-1, *([1] * (len(out_shape) - 1))).expand(out_shape)

    def _reduce(self, node: fx.Node, dim: Any, keepdim: bool) -> torch.Tensor:
        ids = self.tensor_ids(node.args[0])
        if dim is None:
            raise _Unsupported("reduction over all dimensions mixes channels")
        dims = sorted(d % (ids.dim() + 1) for d in (dim if isinstance(dim, (list, tuple)) else [dim]))
        if 0 in dims:
            raise _Unsupported("reduction over the batch dimension")
        for d in dims:
            if _varies(ids, d - 1):
                raise _Unsupported(f"reduction over dim {d}, which holds channels")
        index = tuple(slice(0, 1) if d + 1 in dims else slice(None) for d in range(ids.dim()))
        result = ids[index]
        if not keepdim:
            result = result.squeeze(tuple(d - 1 for d in dims))
        return self._checked(node, result)

    def _softmax(self, node: fx.Node, dim: Any) -> torch.Tensor:
        ids = self.tensor_ids(node.args[0])
        if dim is None or dim % (ids.dim() + 1) == 0 or _varies(ids, dim % (ids.dim() + 1) - 1):
            raise _Unsupported("softmax across channels")
        return ids

    def _cat(self, node: fx.Node) -> torch.Tensor:
        parts = [self.tensor_ids(a) for a in _arg(node, 0, "tensors")]
        if any(p is None for p in parts):
            return NotImplemented
        dim = _arg(node, 1, "dim", 0)
        if dim % (parts[0].dim() + 1) == 0:
            raise _Unsupported("concatenation along the batch dimension")
        return self._checked(node, torch.cat([p.unsqueeze(0) for p in parts], dim).squeeze(0))

    def _split(self, node: fx.Node, name: str, how: Any, dim: int, keyword: str) -> tuple[torch.Tensor, ...]:
        ids = self.tensor_ids(node.args[0])
        d = dim % (ids.dim() + 1)
        literal = name == "split" and (isinstance(how, int) or _all_ints(how))
        if d == 0 or not (isinstance(how, int) or literal):
            raise _Unsupported(f"{name} along the batch dimension or by sizes computed at run time")
        parts = torch.chunk(ids, how, d - 1) if name == "chunk" else torch.split(ids, how, d - 1)
        if not _varies(ids, d - 1):
            return tuple(parts)
        if literal:  # split(26): the sizes are rewritten to each part's kept channels
            if any(_varies(ids, other) for other in range(ids.dim()) if other != d - 1):
                raise _Unsupported(f"split of a tensor whose channels spread over more than dim {d}")
            along = [part.movedim(d - 1, 0).reshape(part.shape[d - 1], -1)[:, 0] for part in parts]
            self.literals.append(_RawSplit(node, 1, keyword, tuple(along)))
            return tuple(parts)
        if len({p.shape[d - 1] for p in parts}) != 1:  # chunk: halves must shrink alike
            raise _Unsupported(f"{name} into unequal parts along the channel dimension")
        for part in parts[1:]:
            self.couple(parts[0], part)
        return tuple(parts)

    def _reshape(self, node: fx.Node, sizes: Any) -> torch.Tensor:
        ids = self.tensor_ids(node.args[0])
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if in_shape[0] != out_shape[0] or not isinstance(sizes, (list, tuple)) or len(sizes) != len(out_shape):
            raise _Unsupported("reshape that does not keep the batch dimension first")
        for in_dims, out_dims in _reshape_groups(in_shape[1:], out_shape[1:]):
            if not any(_varies(ids, d) for d in in_dims):
                continue
            if len(in_dims) > 1 and len(out_dims) > 1:
                raise _Unsupported("reshape that regroups channel dimensions")
            inner = sizes[out_dims[-1] + 1]
            if isinstance(inner, int) and inner != -1:
                raise _Unsupported(f"reshape to a fixed size {inner} along channels (breaks when channels are removed)")
            reshaped = ids.reshape(out_shape[1:])
            if len(out_dims) > 1:  # one channel dim split into (outer..., inner): same inner index, same fate
                view = reshaped.movedim(out_dims[-1], 0).reshape(out_shape[out_dims[-1] + 1], -1)
                self.couple(view[:, :1], view)
        return ids.reshape(out_shape[1:])

    def _apply(self, node: fx.Node, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run the op itself on the id tensors (with a batch dim of 1)."""
        source = self.values.get(args[0]) if isinstance(args[0], fx.Node) else None
        if fn is operator.getitem and isinstance(source, (tuple, _Blocked)):
            return source[args[1]] if isinstance(source, tuple) else source  # an item of a tuple
        ids = self.tensor_ids(args[0])
        if ids is None or any(isinstance(a, fx.Node) for a in _flatten_args((args[1:], kwargs))):
            return NotImplemented
        if fn is operator.getitem:
            self._check_index(node, ids, args[1])
        result = fn(ids.unsqueeze(0), *args[1:], **kwargs)
        return self._checked(node, result.squeeze(0) if result.dim() else result)

    def _check_index(self, node: fx.Node, ids: torch.Tensor, index: Any) -> None:
        entries = index if isinstance(index, tuple) else (index,)
        if any(e is Ellipsis or e is None for e in entries):
            raise _Unsupported("indexing with ... or None")
        if entries and entries[0] != slice(None):
            raise _Unsupported("indexing the batch dimension")
        varying = [d for d in range(ids.dim()) if _varies(ids, d)]
        for d, entry in enumerate(entries[1:]):
            if entry == slice(None) or d not in varying:
                continue
            if not _literal_slice(entry) or varying != [d]:
                raise _Unsupported("indexing a channel dimension with fixed positions (only a plain slice is followed)")
            along = ids.movedim(d, 0).reshape(ids.shape[d], -1)[:, 0]
            self.literals.append(_RawSlice(node, tuple(entries), d + 1, along))

    def _checked(self, node: fx.Node, result: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.shape(node)[1:])
        if tuple(result.shape) != expected:
            raise _Unsupported(f"moves the batch dimension (id shape {tuple(result.shape)} vs {expected})")
        return result

    # -- resolve -----------------------------------------------------------------------------
    def _resolve(self) -> ChannelAnalysis:
        unit_of = _connected_labels(self.next_id, self.pairs)  # id -> unit
        num_units = int(unit_of.max()) + 1 if len(unit_of) else 0
        links = [torch.unique(unit_of[s.first : s.first + s.count]).unsqueeze(1) for s in self.sources]
        group_of_unit = _connected_labels(num_units, links)
        num_groups = int(group_of_unit.max()) + 1 if num_units else 0

        layers = {
            name: LayerChannels(
                name, str(raw.node.target), raw.kind, unit_of[raw.in_ids], unit_of[raw.out_ids], raw.groups
            )
            for name, raw in self.layers.items()
        }
        blocked: list[list[str]] = [[] for _ in range(num_groups)]
        for ids, reason in self.blocks:
            for g in torch.unique(group_of_unit[unit_of[ids]]).tolist():
                if reason not in blocked[g]:
                    blocked[g].append(reason)
        sources: list[list[str]] = [[] for _ in range(num_groups)]
        for s in self.sources:
            sources[int(group_of_unit[unit_of[s.first]])].append(s.target)
        members: list[list[str]] = [[] for _ in range(num_groups)]
        partitions: list[list[torch.Tensor]] = [[] for _ in range(num_groups)]
        for layer in layers.values():
            for units in (layer.in_units, layer.out_units):
                for g in torch.unique(group_of_unit[units]).tolist():
                    if layer.node not in members[g]:
                        members[g].append(layer.node)
                if layer.groups > 1 and not layer.per_channel:  # every group it touches is constrained
                    for g in torch.unique(group_of_unit[units]).tolist():
                        partitions[g].append(units.reshape(layer.groups, -1))
        order = torch.argsort(group_of_unit, stable=True)
        counts = torch.bincount(group_of_unit, minlength=num_groups).tolist()
        unit_lists = torch.split(order, counts)
        groups = [
            ChannelGroup(
                g, unit_lists[g], tuple(sources[g]), tuple(members[g]), tuple(blocked[g]), tuple(partitions[g])
            )
            for g in range(num_groups)
            if sources[g]  # groups made only of blocked ids (inputs, unknown ops) have no layer to prune
        ]
        literals = tuple(
            SplitSizes(raw.node.name, raw.index, raw.name, tuple(unit_of[ids] for ids in raw.part_ids))
            if isinstance(raw, _RawSplit)
            else ChannelSlice(raw.node.name, raw.index, raw.entry, unit_of[raw.ids])
            for raw in self.literals
        )
        return ChannelAnalysis(groups, layers, group_of_unit, num_units, literals)


class _Unsupported(Exception):
    """Raised inside a handler: the node's channel behaviour is not supported (with why)."""


def _connected_labels(count: int, groups: Iterable[torch.Tensor]) -> torch.Tensor:
    """Label of each of ``count`` items once the items in each row of ``groups`` are joined.

    Each element of ``groups`` is a (k, n) tensor: column j joins its k items. Labels are
    numbered in the order of each component's smallest item, so they are stable.
    """
    joined = nx.utils.UnionFind()
    for block in groups:
        for column in block.T.tolist():
            joined.union(*column)
    root = torch.arange(count)
    items = list(joined.parents)
    if items:
        root[torch.tensor(items)] = torch.tensor([joined[i] for i in items])
    smallest = torch.full((count,), count, dtype=torch.long).scatter_reduce(0, root, torch.arange(count), "amin")
    _, labels = torch.unique(smallest[root], return_inverse=True)
    return labels


def _reshape_groups(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with the runs of output dims that hold the same elements."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        in_dims, out_dims = [i], [j]
        a, b = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a, i = a * in_shape[i], i + 1
                in_dims.append(i - 1)
            else:
                b, j = b * out_shape[j], j + 1
                out_dims.append(j - 1)
        groups.append((in_dims, out_dims))
    return groups


def _varies(ids: torch.Tensor, dim: int) -> bool:
    """True when the ids change along ``dim`` (the dim holds distinct channels)."""
    if ids.shape[dim] <= 1 or ids.stride(dim) == 0:
        return False
    first = ids.narrow(dim, 0, 1)
    return not torch.equal(ids, first.expand_as(ids))


def _align(ids: torch.Tensor, ndim: int) -> torch.Tensor:
    """Left-pad with size-1 dims so broadcasting lines up as it does for the data."""
    return ids.reshape((1,) * (ndim - ids.dim()) + tuple(ids.shape)) if ids.dim() < ndim else ids


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _literal_slice(entry: Any) -> bool:
    """A slice with int (or no) bounds and step 1."""
    return (
        isinstance(entry, slice)
        and entry.step in (None, 1)
        and all(b is None or isinstance(b, int) for b in (entry.start, entry.stop))
    )


def _all_ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)


def _first_is_tensor(node: fx.Node) -> bool:
    return bool(node.args) and isinstance(node.args[0], fx.Node)


def _flatten_args(args: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(args, out.append)
    return out
