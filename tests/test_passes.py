"""Pipeline spec parsing, order constraints, verification and error history."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn as nn

from slimfx.errors import PassError, PassOrderError, PassSpecError
from slimfx.ir.capture import capture
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes import PASSES, PassManager, parse_pipeline
from slimfx.passes.base import Decision, Pass, PassContext, PassResult
from slimfx.passes.fold_bn import FoldBatchNorm


@dataclass(frozen=True)
class Scale(Pass):
    """Multiplies the first conv's weights by ``factor``: lossy unless factor is 1."""

    name = "test-scale"
    factor: float = 1.0
    mode: Literal["weights", "bias"] = "weights"
    at: tuple[str, ...] = ()
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise self.invalid("factor", self.factor, "a positive number")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        conv = next(n for n in graph.nodes() if n.op == "call_module")
        new = nn.Conv2d(3, 4, 1)
        new.load_state_dict(graph.submodule(conv).state_dict())
        new.weight.data *= self.factor
        with Rewriter(graph, self.name) as rewriter:
            rewriter.replace_module(conv, new)
        return PassResult(True, (Decision(str(conv.target), "scaled", f"x{self.factor}"),))


@dataclass(frozen=True)
class ClaimsExact(Scale):
    name = "test-claims-exact"
    exact = True


@dataclass(frozen=True)
class Crashes(Pass):
    name = "test-crash"
    runs_after = {"test-scale": "it reads what test-scale writes"}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom")


@pytest.fixture(autouse=True)
def registered_test_passes() -> Iterator[None]:
    added = {cls.name: cls for cls in (Scale, ClaimsExact, Crashes)}
    PASSES.update(added)
    yield
    for name in added:
        PASSES.pop(name)


def small_graph() -> Graph:
    return capture(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval(), torch.randn(1, 3, 4, 4))


def test_spec_parses_names_options_and_lists() -> None:
    passes = parse_pipeline("fold-bn,test-scale:factor=0.5,mode=bias,at=layer2,layer3,quiet=true,fold-bn")
    assert [p.name for p in passes] == ["fold-bn", "test-scale", "fold-bn"]
    scale = passes[1]
    assert (scale.factor, scale.mode, scale.at, scale.quiet) == (0.5, "bias", ("layer2", "layer3"), True)
    assert scale.spec() == "test-scale:factor=0.5,mode=bias,at=layer2,layer3,quiet=true"
    assert isinstance(passes[0], FoldBatchNorm)


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "fold-bm",
            "unknown pass 'fold-bm'; did you mean 'fold-bn'? valid passes: add-exits, crelu, distill, drop-blocks",
        ),
        ("test-scale:size=2", "unknown option 'size'; valid options: factor, mode, at, quiet"),
        ("test-scale:factor=big", "invalid value 'big' for 'factor'; expected float"),
        ("test-scale:factor=-1", "invalid value -1.0 for option 'factor': expected a positive number"),
        ("test-scale:mode=all", "choose one of: weights, bias"),
        ("test-scale:quiet=maybe", "expected true or false"),
        ("test-scale:factor=2,factor=3", "given twice"),
        ("factor=2", "comes before any pass name"),
        ("fold-bn,,test-scale", "empty item"),
        ("test-scale:factor=2,bogus", "unknown pass 'bogus'"),
    ],
)
def test_bad_specs_are_rejected_with_the_valid_choices(spec: str, message: str) -> None:
    with pytest.raises(PassSpecError) as err:
        parse_pipeline(spec)
    assert message in str(err.value)


def test_order_constraints_name_both_passes() -> None:
    with pytest.raises(PassOrderError) as err:
        PassManager(parse_pipeline("test-crash,test-scale"))
    assert "'test-scale' must run before 'test-crash'" in str(err.value)
    with pytest.raises(PassOrderError, match="'prune-channels' must run before 'fold-bn'"):
        from slimfx.passes.manager import check_order

        @dataclass(frozen=True)
        class Prune(Pass):
            name = "prune-channels"

        check_order([FoldBatchNorm(), Prune()])


def test_manager_times_and_measures_every_pass() -> None:
    graph = small_graph()
    records = PassManager(parse_pipeline("test-scale:factor=1.5,fold-bn")).run(graph).records
    assert [r.name for r in records] == ["test-scale", "fold-bn"]
    assert records[0].seconds > 0 and records[0].changed
    assert records[0].output_error > 0.05  # lossy: measured and recorded, not rejected
    assert records[1].output_error is None and not records[1].changed


def test_exact_pass_that_changes_outputs_fails_verification_with_history() -> None:
    graph = small_graph()
    with pytest.raises(PassError) as err:
        PassManager(parse_pipeline("fold-bn,test-claims-exact:factor=2")).run(graph)
    message = str(err.value)
    assert "pass 'test-claims-exact:factor=2.0' (2 of 2)" in message
    assert "claims to be exact" in message and "Passes run before it: fold-bn" in message
    graph = small_graph()
    assert PassManager(parse_pipeline("test-claims-exact:factor=1")).run(graph).records[0].output_error == 0


def test_crashing_pass_is_named_with_its_history() -> None:
    with pytest.raises(PassError) as err:
        PassManager(parse_pipeline("test-scale,fold-bn,test-crash")).run(small_graph())
    assert "pass 'test-crash' (3 of 3) failed: internal error RuntimeError: boom" in str(err.value)
    assert "Passes run before it: test-scale, fold-bn" in str(err.value)


class SharedWeight(nn.Module):
    """A layer whose weight is also read directly (as a positional embedding projection may be)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.proj.weight.sum()


def test_a_layer_whose_weights_are_read_directly_is_left_alone() -> None:
    from slimfx import compile

    x = torch.randn(4, 3, 8, 8)
    result = compile(SharedWeight().eval(), x[:1], "quantize:calib=minmax", calib_data=[x])
    (decision,) = [d for d in result.report.passes[-1].decisions if d.target == "proj"]
    assert decision.declined and "read directly, at node 'proj_weight'" in decision.reason
