"""factorize-convs: replace expensive layers by sequences of cheaper ones, where that saves MACs.

Methods (``method=``): ``spatial-svd`` (kxk -> kx1 + 1xk), ``tucker2`` (1x1 -> kxk -> 1x1),
``cp`` (pointwise -> depthwise kx1 -> depthwise 1xk -> pointwise), ``separable-3d``
(kxkxk -> 1x1xk + 1xkx1 + kx1x1) and ``linear-svd`` (Linear -> two thinner Linears). The
math lives in ``lowrank``; this module picks ranks, builds the layers and reports.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.cost_model.counts import conv_macs, total_cost
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes import lowrank
from slimfx.passes.base import Decision, Pass, PassContext, PassResult
from slimfx.passes.registry import register

Method = Literal["spatial-svd", "tucker2", "cp", "separable-3d", "linear-svd"]
Ranks = tuple[int, ...]
TARGET_GRID = 24  # candidate ranks per layer when spending a MAC budget


# -- one class per method: eligibility, ranks, cost, error estimate, layers ----------------------
@dataclass
class _Layer:
    """A layer being considered: its module, shapes and (lazily) its spectra."""

    node: fx.Node
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    spectra: dict[str, torch.Tensor] | None = None


class _Factorizer:
    method: ClassVar[str]
    layer_types: ClassVar[tuple[type, ...]] = (nn.Conv2d,)
    default_iterations: ClassVar[int] = 0  # refinement sweeps: HOOI for tucker2, ALS for cp

    def why_not(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            kind = "depthwise conv: already separable" if module.groups == module.in_channels else f"grouped conv (groups={module.groups})"
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

    def full(self, layer: _Layer) -> Ranks:
        raise NotImplementedError

    def energy_ranks(self, layer: _Layer, energy: float) -> Ranks:
        raise NotImplementedError

    def estimated_error(self, layer: _Layer, ranks: Ranks) -> float:
        raise NotImplementedError

    def macs(self, layer: _Layer, ranks: Ranks) -> int:
        raise NotImplementedError

    def feasible(self, layer: _Layer, ranks: Ranks) -> Ranks:
        """``ranks`` lowered where one rank bounds another (only separable-3d has such a bound)."""
        return ranks

    def build(self, layer: _Layer, ranks: Ranks, iterations: int, seed: int) -> tuple[list[tuple[str, nn.Module]], float]:
        """The replacement layers and the relative error of the reconstructed weight."""
        raise NotImplementedError


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module, **geometry: Any) -> nn.Module:
    """A conv of ``like``'s class and dtype with ``weight`` (and ``bias``) and the given geometry."""
    standard = nn.Conv3d if isinstance(like, nn.Conv3d) else nn.Conv2d  # subclasses may take other arguments
    conv = standard(weight.shape[1] * geometry.get("groups", 1), weight.shape[0], weight.shape[2:],
                      bias=bias is not None, device=weight.device, dtype=like.weight.dtype, **geometry)
    conv.weight = nn.Parameter(weight.to(like.weight.dtype))
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone())
    return conv


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


class _OneMatrixSvd(_Factorizer):
    """Methods that cut the rank of one matrix made from the weight: one rank, exact tail errors."""

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spectra(self, weight):
        u, s, vh = lowrank.thin_svd(self.matrix(weight.float()))
        return {"s": s, "u": u, "vh": vh}

    def svd(self, layer: _Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        return conv_macs(mid, (r, cin, m.kernel_size[0], 1)) + conv_macs(math.prod(layer.out_shape), (m.out_channels, r, 1, m.kernel_size[1]))

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        vertical, horizontal = lowrank.spatial_svd(weight, ranks[0], self.svd(layer))
        parts = [
            ("v", _conv(vertical, None, m, stride=(m.stride[0], 1), padding=(m.padding[0], 0), dilation=(m.dilation[0], 1))),
            ("h", _conv(horizontal, _bias(m), m, stride=(1, m.stride[1]), padding=(0, m.padding[1]), dilation=(1, m.dilation[1]))),
        ]
        return parts, lowrank.relative_error(lowrank.compose_spatial(vertical, horizontal), weight)


class _Tucker2(_Factorizer):
    method = "tucker2"
    default_iterations = 3

    def spectra(self, weight):
        return {"in": lowrank.mode_singular_values(weight, 1), "out": lowrank.mode_singular_values(weight, 0)}

    def full(self, layer):
        return (layer.module.in_channels, layer.module.out_channels)

    def energy_ranks(self, layer, energy):
        return (lowrank.energy_rank(layer.spectra["in"], energy), lowrank.energy_rank(layer.spectra["out"], energy))

    def estimated_error(self, layer, ranks):  # the HOSVD bound
        return math.hypot(lowrank.tail_error(layer.spectra["in"], ranks[0]), lowrank.tail_error(layer.spectra["out"], ranks[1]))

    def macs(self, layer, ranks):
        (r_in, r_out), m = ranks, layer.module
        n, cin, h, w = layer.in_shape
        out_hw = math.prod(layer.out_shape[2:])
        return (conv_macs(n * r_in * h * w, (r_in, cin, 1, 1)) + conv_macs(n * r_out * out_hw, (r_out, r_in, *m.kernel_size))
                + conv_macs(math.prod(layer.out_shape), (m.out_channels, r_out, 1, 1)))

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        t = lowrank.tucker2(weight, ranks[0], ranks[1], iterations)
        parts = [
            ("reduce", _conv(t.first, None, m)),
            ("core", _conv(t.core, None, m, stride=m.stride, padding=m.padding, dilation=m.dilation)),
            ("restore", _conv(t.last, _bias(m), m)),
        ]
        return parts, lowrank.relative_error(lowrank.compose_tucker2(t), weight)


class _CP(_Tucker2):
    method = "cp"
    default_iterations = 50

    def full(self, layer):
        return (min(layer.module.in_channels, layer.module.out_channels),)

    def energy_ranks(self, layer, energy):  # CP rank is at least the Tucker ranks: start there
        return (max(super().energy_ranks(layer, energy)),)

    def estimated_error(self, layer, ranks):  # proxy for budgeting; the real fit error is reported
        return super().estimated_error(layer, (min(ranks[0], layer.module.in_channels), min(ranks[0], layer.module.out_channels)))

    def macs(self, layer, ranks):
        (r,), m = ranks, layer.module
        n, cin, h, w = layer.in_shape
        kh, kw = m.kernel_size
        mid_h = _out_size(h, kh, m.stride[0], m.padding[0], m.dilation[0])
        out_hw = math.prod(layer.out_shape[2:])
        return (conv_macs(n * r * h * w, (r, cin, 1, 1)) + conv_macs(n * r * mid_h * w, (r, 1, kh, 1))
                + conv_macs(n * r * out_hw, (r, 1, 1, kw)) + conv_macs(math.prod(layer.out_shape), (m.out_channels, r, 1, 1)))

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        (r,) = ranks
        cp = lowrank.cp_als(weight, r, iterations=max(iterations, 1), seed=seed)
        parts = [
            ("pw_in", _conv(cp.in_factor.T[:, :, None, None], None, m)),
            ("dw_v", _conv(cp.vertical.T[:, None, :, None], None, m, groups=r,
                           stride=(m.stride[0], 1), padding=(m.padding[0], 0), dilation=(m.dilation[0], 1))),
            ("dw_h", _conv(cp.horizontal.T[:, None, None, :], None, m, groups=r,
                           stride=(1, m.stride[1]), padding=(0, m.padding[1]), dilation=(1, m.dilation[1]))),
            ("pw_out", _conv(cp.out_factor[:, :, None, None], _bias(m), m)),
        ]
        return parts, cp.fit_error


class _Separable3d(_Factorizer):
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
        return math.hypot(lowrank.tail_error(layer.spectra["width"], ranks[0]), lowrank.tail_error(layer.spectra["height"], ranks[1]))

    def macs(self, layer, ranks):
        (r1, r2), m = ranks, layer.module
        n, cin, d, h, w = layer.in_shape
        kd, kh, kw = m.kernel_size
        w_out = _out_size(w, kw, m.stride[2], m.padding[2], m.dilation[2])
        h_out = _out_size(h, kh, m.stride[1], m.padding[1], m.dilation[1])
        return (conv_macs(n * r1 * d * h * w_out, (r1, cin, 1, 1, kw)) + conv_macs(n * r2 * d * h_out * w_out, (r2, r1, 1, kh, 1))
                + conv_macs(math.prod(layer.out_shape), (m.out_channels, r2, kd, 1, 1)))

    def build(self, layer, ranks, iterations, seed):
        m, weight = layer.module, layer.module.weight.detach()
        s = lowrank.separable_3d(weight, *ranks, first=layer.spectra["first"])
        (sd, sh, sw), (pd, ph, pw), (dd, dh, dw) = m.stride, m.padding, m.dilation
        parts = [
            ("w", _conv(s.width, None, m, stride=(1, 1, sw), padding=(0, 0, pw), dilation=(1, 1, dw))),
            ("h", _conv(s.height, None, m, stride=(1, sh, 1), padding=(0, ph, 0), dilation=(1, dh, 1))),
            ("d", _conv(s.depth, _bias(m), m, stride=(sd, 1, 1), padding=(pd, 0, 0), dilation=(dd, 1, 1))),
        ]
        return parts, lowrank.relative_error(lowrank.compose_separable_3d(s), weight)


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
        reduce, restore = nn.Linear(m.in_features, ranks[0], bias=False), nn.Linear(ranks[0], m.out_features, bias=m.bias is not None)
        reduce.weight = nn.Parameter(first)
        restore.weight = nn.Parameter(second)
        if m.bias is not None:
            restore.bias = nn.Parameter(m.bias.detach().clone())
        return [("reduce", reduce), ("restore", restore)], lowrank.relative_error(second @ first, weight)


FACTORIZERS: dict[str, _Factorizer] = {f.method: f for f in (_SpatialSvd(), _Tucker2(), _CP(), _Separable3d(), _LinearSvd())}


# -- the pass ------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class FactorizeConvs(Pass):
    """Low-rank factorization of convs (and linears) where it saves MACs.

    Ranks come from one rule: ``energy`` (share of squared singular values kept; the default,
    0.95), ``rank`` (explicit, honoured even where it costs more, with a warning),
    ``rank-ratio`` (share of each layer's full rank) or ``target-macs`` (ranks spread across
    layers, least reconstruction error per MAC saved first, until the model's MACs are at most
    that share of the original). ``round-to`` rounds ranks up to a multiple. ``iterations``
    sets the refinement sweeps: HOOI for tucker2 (default 3), ALS for cp (default 50).
    """

    name = "factorize-convs"
    exact = False
    summary = "low-rank factorization: spatial SVD, Tucker-2, CP, separable 3-D, linear SVD"
    runs_after = {"prune-channels": "factorize the layers pruning leaves (pruning needs the original layers)"}

    method: Method = "spatial-svd"
    energy: float | None = None
    rank: int | None = None
    rank_ratio: float | None = None
    target_macs: float | None = None
    round_to: int = 1
    iterations: int | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rules = [o for o in ("energy", "rank", "rank_ratio", "target_macs") if getattr(self, o) is not None]
        if len(rules) > 1:
            names = " and ".join(r.replace("_", "-") for r in rules)
            raise self.invalid(rules[1].replace("_", "-"), getattr(self, rules[1]), f"one rank rule, not {names}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise self.invalid("energy", self.energy, "a share of singular-value energy in (0, 1]")
        if self.rank is not None and self.rank < 1:
            raise self.invalid("rank", self.rank, "an integer >= 1")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise self.invalid("rank-ratio", self.rank_ratio, "a share of the full rank in (0, 1]")
        if self.target_macs is not None and not 0 < self.target_macs < 1:
            raise self.invalid("target-macs", self.target_macs, "a fraction of the original MACs in (0, 1)")
        if self.round_to < 1:
            raise self.invalid("round-to", self.round_to, "an integer >= 1")
        if self.iterations is not None and self.iterations < 0:
            raise self.invalid("iterations", self.iterations, "an integer >= 0")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.ensure_costs()
        factorizer = FACTORIZERS[self.method]
        order = [n.name for n in graph.nodes() if n.op == "call_module" and isinstance(graph.submodule(n), factorizer.layer_types)]
        layers, decisions = self._candidates(graph, factorizer)
        warnings: list[str] = []
        ranks = self._choose_ranks(graph, factorizer, layers, decisions, warnings)
        inputs = _layer_inputs(graph, [layer.node for layer in layers if layer.node.name in ranks])
        with Rewriter(graph, self.name) as rewriter:
            for layer in layers:
                if layer.node.name not in ranks:
                    continue
                chosen = ranks[layer.node.name]
                ctx.report_progress(f"factorize-convs: {layer.node.target} at rank {chosen}")
                iterations = factorizer.default_iterations if self.iterations is None else self.iterations
                parts, weight_error = factorizer.build(layer, chosen, iterations, ctx.seed)
                output_error = _output_error(layer.module, parts, inputs.get(layer.node.name))
                macs_after = factorizer.macs(layer, chosen)
                if self.rank is not None and macs_after >= layer.macs:
                    warnings.append(f"{layer.node.target}: rank={self.rank} costs {macs_after:,} MACs, more than the "
                                    f"original {layer.macs:,}; factorized anyway because the rank was given")
                rewriter.replace_with_sequence(layer.node, parts)
                decisions[layer.node.name] = Decision(
                    str(layer.node.target), "factorized",
                    f"{self.method} rank {'x'.join(map(str, chosen))}: weight error {weight_error:.3g}, "
                    f"output error {output_error:.3g} (relative)",
                    layer.macs, macs_after, weight_error,
                    details={"method": self.method, "ranks": list(chosen), "full_ranks": list(factorizer.full(layer)),
                             "weight_error": weight_error, "output_error": output_error,
                             "layers": [f"{layer.node.target}.{name}" for name, _ in parts],
                             "params_before": sum(p.numel() for p in layer.module.parameters()),
                             "params_after": sum(p.numel() for _, m in parts for p in m.parameters())},
                )
        for layer in layers:
            if layer.node.name not in decisions:  # only when spending a budget: cheaper cuts sufficed
                decisions[layer.node.name] = Decision(
                    str(layer.node.target), "declined",
                    f"not needed: cheaper cuts elsewhere met target-macs={self.target_macs:g}", layer.macs, layer.macs)
        return PassResult(changed=bool(ranks), decisions=tuple(decisions[name] for name in order), warnings=tuple(warnings))

    # -- which layers ------------------------------------------------------------------------
    def _candidates(self, graph: Graph, factorizer: _Factorizer) -> tuple[list[_Layer], dict[str, Decision]]:
        calls = graph.module_calls()
        layers, decisions = [], {}
        for node in graph.nodes():
            if node.op != "call_module" or not isinstance(graph.submodule(node), factorizer.layer_types):
                continue
            module, target = graph.submodule(node), str(node.target)
            macs = graph.info(node).cost.cost.macs
            why = factorizer.why_not(module)
            if why is None and calls[target] > 1:
                why = f"module called {calls[target]} times"
            if why is None and (len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node)):
                why = "called with extra arguments"
            pattern = next((p for p in self.exclude if fnmatch.fnmatchcase(target, p)), None)
            if why is None and pattern:
                why = f"excluded by pattern '{pattern}'"
            if why:
                decisions[node.name] = Decision(target, "declined", why, macs, macs)
                continue
            layer = _Layer(node, module, graph.info(node.args[0]).out_shape, graph.info(node).out_shape, macs)
            layer.spectra = factorizer.spectra(module.weight.detach())
            layers.append(layer)
        return layers, decisions

    # -- which ranks -------------------------------------------------------------------------
    def _choose_ranks(
        self, graph: Graph, factorizer: _Factorizer, layers: list[_Layer], decisions: dict[str, Decision], warnings: list[str]
    ) -> dict[str, Ranks]:
        if self.target_macs is not None:
            return self._ranks_for_target(graph, factorizer, layers, decisions, warnings)
        chosen = {}
        for layer in layers:
            full = factorizer.full(layer)
            if self.rank is not None:
                ranks = tuple(min(self.rank, f) for f in full)
            elif self.rank_ratio is not None:
                ranks = tuple(max(1, math.ceil(self.rank_ratio * f)) for f in full)
            else:
                ranks = factorizer.energy_ranks(layer, self.energy if self.energy is not None else 0.95)
            ranks = self._rounded(factorizer, layer, ranks)
            macs = factorizer.macs(layer, ranks)
            if self.rank is None and macs >= layer.macs:
                decisions[layer.node.name] = Decision(
                    str(layer.node.target), "declined",
                    f"{self.method} at rank {'x'.join(map(str, ranks))} would cost {macs:,} MACs, not less than {layer.macs:,}",
                    layer.macs, layer.macs)
                continue
            chosen[layer.node.name] = ranks
        return chosen

    def _ranks_for_target(
        self, graph: Graph, factorizer: _Factorizer, layers: list[_Layer], decisions: dict[str, Decision], warnings: list[str]
    ) -> dict[str, Ranks]:
        """Greedy: repeatedly take the rank cut with the least added error per MAC saved; once
        one cut reaches the goal, take the one that reaches it with the least added error."""
        total = total_cost(graph).macs
        goal = self.target_macs * total
        options: dict[str, list[tuple[Ranks, int, float]]] = {}
        for layer in layers:
            candidates = sorted({self._rounded(factorizer, layer, tuple(max(1, math.ceil(f * r)) for r in factorizer.full(layer)))
                                 for f in torch.logspace(-2, 0, TARGET_GRID).tolist()}, reverse=True)
            saving = [(r, factorizer.macs(layer, r), factorizer.estimated_error(layer, r)) for r in candidates]
            options[layer.node.name] = [o for o in saving if o[1] < layer.macs]
            if not options[layer.node.name]:
                decisions[layer.node.name] = Decision(str(layer.node.target), "declined",
                                                      f"{self.method} saves no MACs at any rank", layer.macs, layer.macs)
        state = {layer.node.name: (None, layer.macs, 0.0) for layer in layers}
        while total > goal:
            best = finishing = None
            for name, (_, macs_now, error_now) in state.items():
                for ranks, macs, error in options[name]:
                    if macs < macs_now:
                        price = (error - error_now) / (macs_now - macs)
                        if best is None or price < best[0]:
                            best = (price, name, (ranks, macs, error))
                        if total - (macs_now - macs) <= goal and (finishing is None or error - error_now < finishing[0]):
                            finishing = (error - error_now, name, (ranks, macs, error))
            best = finishing or best  # the last cut: the least added error that reaches the goal
            if best is None:
                warnings.append(f"factorize-convs: target-macs={self.target_macs:g} cannot be reached with {self.method}; "
                                f"best reachable is {int(total):,} MACs ({total / (goal / self.target_macs):.3f} of the original)")
                break
            _, name, new = best
            total -= state[name][1] - new[1]
            state[name] = new
        return {name: ranks for name, (ranks, _, _) in state.items() if ranks is not None}

    def _rounded(self, factorizer: _Factorizer, layer: _Layer, ranks: Ranks) -> Ranks:
        full = factorizer.full(layer)
        if self.round_to > 1:
            ranks = tuple(min(f, math.ceil(r / self.round_to) * self.round_to) for r, f in zip(ranks, full))
        return factorizer.feasible(layer, ranks)


def _layer_inputs(graph: Graph, nodes: Sequence[fx.Node]) -> dict[str, torch.Tensor]:
    """Each layer's input on the example inputs, recorded in one run."""
    wanted = {str(n.target): n.name for n in nodes}
    seen: dict[str, torch.Tensor] = {}
    handles = [
        graph.module.get_submodule(target).register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach()))
        for target, name in wanted.items()
    ]
    try:
        graph.run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _output_error(module: nn.Module, parts: list[tuple[str, nn.Module]], x: torch.Tensor | None) -> float | None:
    if x is None:
        return None
    with torch.no_grad():
        expected = module(x)
        actual = x
        for _, part in parts:
            actual = part(actual)
    return lowrank.relative_error(actual, expected)
