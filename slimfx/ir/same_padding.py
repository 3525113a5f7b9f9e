"""TensorFlow-style "same" convolutions taken as a zero pad and a plain conv.

timm's ``Conv2dSame`` (the ``tf_*`` EfficientNets and others) computes its padding from the
input's height and width in Python, so symbolic tracing keeps it opaque and no pass can touch
it or the BatchNorm after it. For the example input's spatial size the padding is a constant:
capture replaces each such opaque conv by ``ZeroPad2d`` and an ``nn.Conv2d`` sharing its
weights, after checking on the real input that both give the same output. Where the stride is
1 the padding does not depend on the input size; otherwise the graph holds for that height
and width (said in the note).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.ir.graph import Graph
from slimfx.ir.meta import TakenLayer
from slimfx.ir.rewrite import Rewriter


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TensorFlow's "same" mode adds along one dim of ``size``."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def same_convs_as_layers(graph: Graph) -> tuple[TakenLayer, ...]:
    """Replace every opaque "same"-padded Conv2d whose output a zero pad and a plain conv
    reproduce exactly on the example inputs; returns what was replaced."""
    candidates = [
        n
        for n in graph.nodes()
        if n.op == "call_module"
        and str(n.target) in graph.opaque
        and isinstance(graph.submodule(n), nn.Conv2d)
        and graph.submodule(n).padding == (0, 0)
        and len(n.args) == 1
        and not n.kwargs
        and graph.module_calls().get(str(n.target)) == 1
    ]
    if not candidates:
        return ()
    inputs = _inputs_of(graph, candidates)
    taken, replaced = [], set()
    with Rewriter(graph, "capture") as rewriter:
        for node in candidates:
            conv = graph.submodule(node)
            x = inputs[node.name]
            pad, plain = _as_pad_and_conv(conv, x.shape[-2:])
            with torch.no_grad():
                if not torch.allclose(plain(pad(x)), conv(x), rtol=1e-5, atol=1e-6):
                    continue  # not the "same" rule: it stays opaque
            rewriter.replace_with_sequence(node, [("pad", pad), ("conv", plain)])
            fixed = "" if conv.stride == (1, 1) else f"padding computed for its {x.shape[-2]}x{x.shape[-1]} input"
            taken.append(
                TakenLayer(f"{type(conv).__name__} '{node.target}'", str(node.target), "ZeroPad2d + Conv2d", fixed)
            )
            replaced.add(str(node.target))
    graph.opaque = graph.opaque - replaced
    return tuple(taken)


def _as_pad_and_conv(conv: nn.Conv2d, size: torch.Size) -> tuple[nn.ZeroPad2d, nn.Conv2d]:
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pad_h, pad_w = same_padding(size[0], kh, sh, dh), same_padding(size[1], kw, sw, dw)
    pad = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        0,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        padding_mode="zeros",
    )
    plain.weight = conv.weight  # shared, not copied
    plain.bias = conv.bias
    plain.train(conv.training)
    return pad, plain


def _inputs_of(graph: Graph, nodes: list[fx.Node]) -> dict[str, torch.Tensor]:
    """The real input of each of ``nodes`` on the example inputs (one run of the graph)."""
    wanted = {n.name for n in nodes}
    seen: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            if node.name in wanted:
                seen[node.name] = self.env[node.args[0]]
            return super().run_node(node)

    with torch.no_grad():
        Recorder(graph.module).run(*graph.example_inputs)
    return seen
