"""The factorization methods: per method, which layers it takes, its ranks, MACs, error estimate and layers.

Methods: ``spatial-svd`` (kxk -> kx1 + 1xk), ``tucker2`` (1x1 -> kxk -> 1x1), ``cp``
(pointwise -> depthwise kx1 -> depthwise 1xk -> pointwise), ``separable-3d`` (kxkxk ->
1x1xk + 1xkx1 + kx1x1) and ``linear-svd`` (Linear -> two thinner Linears). The tensor math
is in ``decompose``; the ``factorize-convs`` pass chooses ranks and rewrites the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.counts import conv_macs
from slimfx.lowrank import decompose as lowrank
from slimfx.metrics import relative_error

Method = Literal["spatial-svd", "tucker2", "cp", "separable-3d", "linear-svd"]
Ranks = tuple[int, ...]


# -- one class per method: eligibility, ranks, cost, error estimate, layers ----------------------
@dataclass
class LayerToFactorize:
    """A layer being considered: its module, shapes and (lazily) its spectra."""

    node: fx.Node
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    spectra: dict[str, torch.Tensor] | None = None


class Factorizer:
    method: ClassVar[str]
    layer_types: ClassVar[tuple[type, ...]] = (nn.Conv2d,)
    default_iterations: ClassVar[int] = 0  # refinement sweeps: HOOI for tucker2, ALS for cp

    def why_not(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            kind = (
                "depthwise conv: already separable"
                if module.groups == module.in_channels
                else f"grouped conv (groups={module.groups})"
            )
            return f"{kind}; {self.method} factorizes dense convs only"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: only zero padding splits exactly"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}: give numeric padding to factorize"
        if all(k == 1 for k in module.kernel_size):
            return "1x1 kernel: no spatial kernel to split (a 1x1 conv is a linear layer)"
        return None

    def spectra(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def full(self, layer: LayerToFactorize) -> Ranks:
        raise NotImplementedError

    def energy_ranks(self, layer: LayerToFactorize, energy: float) -> Ranks:
        raise NotImplementedError

    def estimated_error(self, layer: LayerToFactorize, ranks: Ranks) -> float:
        raise NotImplementedError

    def macs(self, layer: LayerToFactorize, ranks: Ranks) -> int:
        raise NotImplementedError

    def feasible(self, layer: LayerToFactorize, ranks: Ranks) -> Ranks:
        """``ranks`` lowered where one rank bounds another (only separable-3d has such a bound)."""
        return ranks

    def build(
        self, layer: LayerToFactorize, ranks: Ranks, iterations: int, seed: int
    ) -> tuple[list[tuple[str, nn.Module]], float]:
        """The replacement layers and the relative error of the reconstructed weight."""
        raise NotImplementedError


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module, **geometry: Any) -> nn.Module:
    """A conv of ``like``'s class and dtype with ``weight`` (and ``bias``) and the given geometry."""
    standard = nn.Conv3d if isinstance(like, nn.Conv3d) else nn.Conv2d  # subclasses may take other arguments
    conv = standard(
        weight.shape[1] * geometry.get("groups", 1),
        weight.shape[0],
        weight.shape[2:],
        bias=bias is not None,
        device=weight.device,
        dtype=like.weight.dtype,
        **geometry,
    )
    conv.weight = nn.Parameter(weight.to(like.weight.dtype))
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone())
    return conv


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


class _OneMatrixSvd(Factorizer):
    """Methods that cut the rank of one matrix made from the weight: one rank, exact tail errors."""

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spectra(self, weight):
        u, s, vh = lowrank.thin_svd(self.matrix(weight.float()))
        return {"s": s, "u": u, "vh": vh}

    def svd(self, layer: LayerToFactorize) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return layer.spectra["u"], layer.spectra["s"], layer.spectra["vh"]

    def full(self, layer):
        return (len(layer.spectra["s"]),)

    def energy_ranks(self, layer, energy):
        return (lowrank.energy_rank(layer.spectra["s"], energy),)

    def estimated_error(self, layer, ranks):
        return lowrank.tail_error(layer.spectra["s"], ranks[0])


class _SpatialSvd(_OneMatrixSvd):
    method = "spatial-svd"

    def matrix(self, weight):
        return lowrank.spatial_svd_matrix(weight)

    def macs(self, layer, ranks):
        (r,), m = ranks, layer.module
        n, cin, h, w = layer.in_shape
        mid = n * r * _out_size(h, m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0]) * w
        return conv_macs(mid, (r, cin, m.kernel_size[0], 1)) + conv_macs(
            math.prod(layer.out_shape), (m.out_channels, r, 1, m.kernel_size[1])
        )

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        vertical, horizontal = lowrank.spatial_svd(weight, ranks[0], self.svd(layer))
        parts = [
            (
                "v",
                _conv(
                    vertical, None, m, stride=(m.stride[0], 1), padding=(m.padding[0], 0), dilation=(m.dilation[0], 1)
                ),
            ),
            (
                "h",
                _conv(
                    horizontal,
                    _bias(m),
                    m,
                    stride=(1, m.stride[1]),
                    padding=(0, m.padding[1]),
                    dilation=(1, m.dilation[1]),
                ),
            ),
        ]
        return parts, relative_error(weight, lowrank.compose_spatial(vertical, horizontal))


class _Tucker2(Factorizer):
    method = "tucker2"
    default_iterations = 3

    def spectra(self, weight):
        return {"in": lowrank.mode_singular_values(weight, 1), "out": lowrank.mode_singular_values(weight, 0)}

    def full(self, layer):
        return (layer.module.in_channels, layer.module.out_channels)

    def energy_ranks(self, layer, energy):
        return (lowrank.energy_rank(layer.spectra["in"], energy), lowrank.energy_rank(layer.spectra["out"], energy))

    def estimated_error(self, layer, ranks):  # the HOSVD bound
        return math.hypot(
            lowrank.tail_error(layer.spectra["in"], ranks[0]), lowrank.tail_error(layer.spectra["out"], ranks[1])
        )

    def macs(self, layer, ranks):
        (r_in, r_out), m = ranks, layer.module
        n, cin, h, w = layer.in_shape
        out_hw = math.prod(layer.out_shape[2:])
        return (
            conv_macs(n * r_in * h * w, (r_in, cin, 1, 1))
            + conv_macs(n * r_out * out_hw, (r_out, r_in, *m.kernel_size))
            + conv_macs(math.prod(layer.out_shape), (m.out_channels, r_out, 1, 1))
        )

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        t = lowrank.tucker2(weight, ranks[0], ranks[1], iterations)
        parts = [
            ("reduce", _conv(t.first, None, m)),
            ("core", _conv(t.core, None, m, stride=m.stride, padding=m.padding, dilation=m.dilation)),
            ("restore", _conv(t.last, _bias(m), m)),
        ]
        return parts, relative_error(weight, lowrank.compose_tucker2(t))


class _CP(_Tucker2):
    method = "cp"
    default_iterations = 50

    def full(self, layer):
        return (min(layer.module.in_channels, layer.module.out_channels),)

    def energy_ranks(self, layer, energy):  # CP rank is at least the Tucker ranks: start there
        return (max(super().energy_ranks(layer, energy)),)

    def estimated_error(self, layer, ranks):  # proxy for budgeting; the real fit error is reported
        return super().estimated_error(
            layer, (min(ranks[0], layer.module.in_channels), min(ranks[0], layer.module.out_channels))
        )

    def macs(self, layer, ranks):
        (r,), m = ranks, layer.module
        n, cin, h, w = layer.in_shape
        kh, kw = m.kernel_size
        mid_h = _out_size(h, kh, m.stride[0], m.padding[0], m.dilation[0])
        out_hw = math.prod(layer.out_shape[2:])
        return (
            conv_macs(n * r * h * w, (r, cin, 1, 1))
            + conv_macs(n * r * mid_h * w, (r, 1, kh, 1))
            + conv_macs(n * r * out_hw, (r, 1, 1, kw))
            + conv_macs(math.prod(layer.out_shape), (m.out_channels, r, 1, 1))
        )

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        (r,) = ranks
        cp = lowrank.cp_als(weight, r, iterations=max(iterations, 1), seed=seed)
        parts = [
            ("pw_in", _conv(cp.in_factor.T[:, :, None, None], None, m)),
            (
                "dw_v",
                _conv(
                    cp.vertical.T[:, None, :, None],
                    None,
                    m,
                    groups=r,
                    stride=(m.stride[0], 1),
                    padding=(m.padding[0], 0),
                    dilation=(m.dilation[0], 1),
                ),
            ),
            (
                "dw_h",
                _conv(
                    cp.horizontal.T[:, None, None, :],
                    None,
                    m,
                    groups=r,
                    stride=(1, m.stride[1]),
                    padding=(0, m.padding[1]),
                    dilation=(1, m.dilation[1]),
                ),
            ),
            ("pw_out", _conv(cp.out_factor[:, :, None, None], _bias(m), m)),
        ]
        return parts, cp.fit_error


class _Separable3d(Factorizer):
    method = "separable-3d"
    layer_types = (nn.Conv3d,)

    def why_not(self, module):
        reason = super().why_not(module)
        return reason.replace("1x1 kernel", "1x1x1 kernel") if reason else None

    def spectra(self, weight):
        first = lowrank.separable_first_svd(weight.float())
        _, second, _ = lowrank.separable_second_svd(weight.float(), len(first[1]), first)
        return {"first": first, "width": first[1], "height": second}

    def full(self, layer):
        return (len(layer.spectra["width"]), len(layer.spectra["height"]))

    def energy_ranks(self, layer, energy):
        r1 = lowrank.energy_rank(layer.spectra["width"], energy)
        weight = layer.module.weight.detach().float()
        _, second, _ = lowrank.separable_second_svd(weight, r1, layer.spectra["first"])
        return (r1, lowrank.energy_rank(second, energy))

    def feasible(self, layer, ranks):
        m = layer.module
        return (ranks[0], min(ranks[1], ranks[0] * m.kernel_size[1], m.out_channels * m.kernel_size[0]))

    def estimated_error(self, layer, ranks):  # second split measured at full first rank
        return math.hypot(
            lowrank.tail_error(layer.spectra["width"], ranks[0]), lowrank.tail_error(layer.spectra["height"], ranks[1])
        )

    def macs(self, layer, ranks):
        (r1, r2), m = ranks, layer.module
        n, cin, d, h, w = layer.in_shape
        kd, kh, kw = m.kernel_size
        w_out = _out_size(w, kw, m.stride[2], m.padding[2], m.dilation[2])
        h_out = _out_size(h, kh, m.stride[1], m.padding[1], m.dilation[1])
        return (
            conv_macs(n * r1 * d * h * w_out, (r1, cin, 1, 1, kw))
            + conv_macs(n * r2 * d * h_out * w_out, (r2, r1, 1, kh, 1))
            + conv_macs(math.prod(layer.out_shape), (m.out_channels, r2, kd, 1, 1))
        )

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        s = lowrank.separable_3d(weight, *ranks, first=layer.spectra["first"])
        (sd, sh, sw), (pd, ph, pw), (dd, dh, dw) = m.stride, m.padding, m.dilation
        parts = [
            ("w", _conv(s.width, None, m, stride=(1, 1, sw), padding=(0, 0, pw), dilation=(1, 1, dw))),
            ("h", _conv(s.height, None, m, stride=(1, sh, 1), padding=(0, ph, 0), dilation=(1, dh, 1))),
            ("d", _conv(s.depth, _bias(m), m, stride=(sd, 1, 1), padding=(pd, 0, 0), dilation=(dd, 1, 1))),
        ]
        return parts, relative_error(weight, lowrank.compose_separable_3d(s))


class _LinearSvd(_OneMatrixSvd):
    method = "linear-svd"
    layer_types = (nn.Linear,)

    def why_not(self, module):
        return None

    def matrix(self, weight):
        return weight

    def macs(self, layer, ranks):
        rows = math.prod(layer.in_shape[:-1])
        return rows * ranks[0] * (layer.module.in_features + layer.module.out_features)

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        first, second = lowrank.linear_svd(weight, ranks[0], self.svd(layer))
        reduce, restore = (
            nn.Linear(m.in_features, ranks[0], bias=False),
            nn.Linear(ranks[0], m.out_features, bias=m.bias is not None),
        )
        reduce.weight = nn.Parameter(first)
        restore.weight = nn.Parameter(second)
        if m.bias is not None:
            restore.bias = nn.Parameter(m.bias.detach().clone())
        return [("reduce", reduce), ("restore", restore)], relative_error(weight, second @ first)


FACTORIZERS: dict[str, Factorizer] = {
    f.method: f for f in (_SpatialSvd(), _Tucker2(), _CP(), _Separable3d(), _LinearSvd())
}
