"""The op taxonomy: which modules, functions and tensor methods do what, defined once.

Every analysis that asks "is this node a ReLU / a view / a pool / a residual add?" composes
the sets below (cost rules, channel coupling, shape shortcuts, quantization grids, the int8
lowering), so a new op is taught to slimfx in one place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class OpSet:
    """Module types, functions and tensor-method names that share a behaviour."""

    modules: tuple[type, ...] = ()
    functions: frozenset[Any] = field(default_factory=frozenset)
    methods: frozenset[str] = field(default_factory=frozenset)

    def __or__(self, other: OpSet) -> OpSet:
        return OpSet(
            self.modules + tuple(m for m in other.modules if m not in self.modules),
            self.functions | other.functions,
            self.methods | other.methods,
        )

    def matches(self, node: fx.Node, module_of: Callable[[fx.Node], nn.Module]) -> bool:
        """Whether ``node`` calls one of these (``module_of`` finds a call_module node's module)."""
        if node.op == "call_module":
            return isinstance(module_of(node), self.modules)
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and node.target in self.methods


def op_set(modules: tuple[type, ...] = (), functions: tuple[Any, ...] = (), methods: tuple[str, ...] = ()) -> OpSet:
    return OpSet(tuple(modules), frozenset(functions), frozenset(methods))


# -- layers ---------------------------------------------------------------------------------------
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # dense, grouped or depthwise; not transposed
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WEIGHTED_LAYERS = (*CONVS, nn.Linear)  # what folding, factorizing and quantizing rewrite
NORMALIZATIONS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
NORM_FUNCTIONS = (F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.normalize)
CROSS_CHANNEL_NORMS = op_set((nn.LayerNorm, nn.GroupNorm), (F.layer_norm, F.group_norm))


def is_per_channel_norm(module: nn.Module) -> bool:
    """InstanceNorm, or a GroupNorm with one channel per group: each channel normalized alone."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return True
    return isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels


# -- elementwise ------------------------------------------------------------------------------------
RELU = op_set((nn.ReLU, nn.ReLU6), (torch.relu, F.relu, F.relu6), ("relu", "relu_"))
ACTIVATIONS = RELU | op_set(
    (
        nn.LeakyReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.Hardtanh,
        nn.Sigmoid,
        nn.Tanh,
        nn.Softplus,
        nn.Threshold,
    ),
    (
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.sigmoid,
        F.tanh,
        F.leaky_relu,
        F.elu,
        F.softplus,
        torch.sigmoid,
        torch.tanh,
    ),
    ("sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh_"),
)
"""Elementwise activations without parameters: output shape = input shape, channels kept."""
CHANNEL_ACTIVATIONS = op_set((nn.PReLU, nn.GLU))  # per-channel weights, or halving a dim
SOFTMAX = op_set(
    (nn.Softmax, nn.LogSoftmax, nn.Softmax2d),
    (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax),
    ("softmax", "log_softmax"),
)
CLAMP = op_set((), (torch.clamp, torch.clip), ("clamp", "clamp_", "clip"))
DROPOUT = op_set((nn.modules.dropout._DropoutNd,), (F.dropout,))
IDENTITY = op_set((nn.Identity,), (), ("contiguous", "clone", "detach"))
CASTS = op_set((), (), ("float", "to", "type_as", "half"))
BINARY_ARITHMETIC = op_set(
    (),
    (
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
    ),
    ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"),
)
SCALAR_ARITHMETIC = op_set((), (operator.floordiv, operator.mod, operator.pow, operator.neg))
UNARY_MATH = op_set(
    (),
    (torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.pow, torch.where, torch.erf),
    ("exp", "sqrt", "pow", "neg", "abs", "masked_fill"),
)
COMPARISONS = op_set((), (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch._assert))

# -- joins, pools, resampling -------------------------------------------------------------------------
ADDS = op_set((), (operator.add, operator.iadd, torch.add), ("add", "add_"))
CONCATS = op_set((), (torch.cat, torch.concat))
MAX_POOLS = op_set((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), (F.max_pool1d, F.max_pool2d, F.max_pool3d))
AVG_POOLS = op_set(
    (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d),
)
WINDOW_POOLS = MAX_POOLS | AVG_POOLS
ADAPTIVE_MAX_POOLS = op_set(
    (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
    (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d),
)
ADAPTIVE_AVG_POOLS = op_set(
    (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
)
ADAPTIVE_POOLS = ADAPTIVE_MAX_POOLS | ADAPTIVE_AVG_POOLS
POOLS = WINDOW_POOLS | ADAPTIVE_POOLS
RESIZE = op_set((nn.Upsample,), (F.interpolate,))
RESAMPLE = op_set((nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle))
PADDING = op_set((nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d), (F.pad,))

# -- shape and data movement ----------------------------------------------------------------------------
RESHAPES = op_set(
    (nn.Flatten, nn.Unflatten),
    (torch.flatten, torch.reshape),
    ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"),
)
TRANSPOSES = op_set((), (torch.permute, torch.transpose, torch.swapaxes, torch.t), ("permute", "transpose", "t"))
SQUEEZES = op_set((), (torch.squeeze, torch.unsqueeze), ("squeeze", "unsqueeze"))
SPLITS = op_set((), (torch.chunk, torch.split, torch.narrow, operator.getitem), ("chunk", "split", "unbind", "narrow"))
EXPANDS = op_set((), (), ("expand", "expand_as"))
VIEWS = RESHAPES | TRANSPOSES | SQUEEZES | SPLITS | EXPANDS
"""Ops that only reinterpret a tensor's memory (free in the cost model)."""
SIZES = op_set((), (getattr,), ("size", "dim", "numel"))
COPIES = op_set(
    (),
    (torch.cat, torch.concat, torch.stack, torch.roll, F.pad, torch.gather, torch.index_select),
    ("contiguous", "clone", "to", "float", "half", "repeat", "roll"),
)
REDUCTIONS = op_set(
    (), (torch.mean, torch.sum, torch.amax, torch.amin), ("mean", "sum", "amax", "amin", "max", "min", "norm")
)
MATMULS = op_set((), (torch.matmul, operator.matmul, torch.bmm, torch.mm), ("matmul", "bmm", "mm"))

# -- what keeps a tensor's values ---------------------------------------------------------------------------
VALUE_PRESERVING = (
    op_set((nn.ReLU,), (torch.relu, F.relu), ("relu", "relu_"))
    | MAX_POOLS
    | ADAPTIVE_MAX_POOLS
    | DROPOUT
    | op_set((nn.Identity,), (), ("contiguous",))
    | RESHAPES
    | TRANSPOSES
    | SQUEEZES
    | op_set((), (operator.getitem,))
)
"""Every output value is a value of the (single tensor) input, or 0 from ReLU: a quantization
grid carries over unchanged."""


def relu_type(node: fx.Node, module_of: Callable[[fx.Node], nn.Module]) -> type[nn.Module] | None:
    """nn.ReLU or nn.ReLU6 when ``node`` applies one to its first input (and nothing else), else
    None; ``module_of`` finds a call_module node's module."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        module = module_of(node)
        return type(module) if type(module) in RELU.modules else None
    if set(node.kwargs) - {"inplace"}:
        return None
    if node.op == "call_function" and node.target in RELU.functions:
        positional = 2 if node.target in (F.relu, F.relu6) else 1  # F.relu(x, inplace)
        return (nn.ReLU6 if node.target is F.relu6 else nn.ReLU) if len(node.args) <= positional else None
    if node.op == "call_method" and node.target in RELU.methods and len(node.args) == 1:
        return nn.ReLU
    return None


def is_matmul(node: fx.Node) -> bool:
    """A two-operand matrix product (``torch.matmul``, ``@``, ``bmm`` and their methods); not ``mm``."""
    if node.op == "call_function":
        return node.target in (torch.matmul, operator.matmul, torch.bmm)
    return node.op == "call_method" and node.target in ("matmul", "bmm")


def join_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The tensors an add or concat of two or more tensors joins; None for any other node."""
    if node.op == "call_function" and node.target in CONCATS.functions:
        tensors = node.args[0]
    elif (node.op == "call_function" and node.target in ADDS.functions) or (
        node.op == "call_method" and node.target in ADDS.methods
    ):
        if "alpha" in node.kwargs:
            return None
        tensors = node.args[:2]
    else:
        return None
    if isinstance(tensors, (list, tuple)) and len(tensors) >= 2 and all(isinstance(t, fx.Node) for t in tensors):
        return list(tensors)
    return None


def is_stochastic_depth(target: Any) -> bool:
    """torchvision's ``stochastic_depth`` (an fx-wrapped function), by name so torchvision stays optional."""
    return getattr(target, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(target, "__module__", "")


def norm_activation_tail(module: nn.Module) -> list[nn.Module] | None:
    """For a BatchNorm subclass with its own ``forward`` whose children are only activations,
    dropout or identities (timm's ``BatchNormAct2d``: batch norm, then ``drop``, then ``act``),
    those children in order: the elementwise ops applied after normalizing. None otherwise.

    Such a layer is kept whole at capture, pruned as a BatchNorm, counted with its activation,
    and folded by ``fold-bn`` into the conv before it, its children staying in its place; the
    pass manager verifies that fold exactly, so the order assumed here is checked.
    """
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).forward is _BATCHNORM_FORWARD:
        return None
    children = list(module.children())
    if not children or not all(isinstance(c, _TAIL_MODULES) for c in children):
        return None
    return children


_BATCHNORM_FORWARD = nn.modules.batchnorm._BatchNorm.forward
_TAIL_MODULES = (*ACTIVATIONS.modules, *DROPOUT.modules, nn.Identity)
