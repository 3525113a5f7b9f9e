"""Outputs that hold inf or nan cannot be verified: an error naming the node, or a loud warning."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from slimfx import compile
from slimfx.cli import main
from slimfx.errors import NonFiniteError, PassError
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import Rewriter
from slimfx.passes.base import Pass, PassContext, PassResult
from slimfx.passes.registry import PASSES, register


def nan_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    return model.eval()


def test_non_finite_outputs_before_any_pass_name_the_first_node() -> None:
    with pytest.raises(NonFiniteError, match=r"first appear at node '_0' \(module '0', Conv2d\)"):
        compile(nan_model(), torch.randn(2, 3, 8, 8), "fold-bn")


def test_allow_non_finite_goes_on_with_a_warning() -> None:
    result = compile(nan_model(), torch.randn(2, 3, 8, 8), "fold-bn", allow_non_finite=True)
    (warning,) = [n for n in result.report.notes if n.startswith("WARNING:")]
    assert "node '_0'" in warning and "not verified" in warning


def test_cli_exits_2_naming_the_node_and_writes_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file = tmp_path / "nan_model.py"
    model_file.write_text(
        "import torch, torch.nn as nn\n"
        "def make():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))\n"
        "    with torch.no_grad():\n"
        "        m[0].weight.fill_(float('nan'))\n"
        "    return m\n"
    )
    out = tmp_path / "out.pt"
    code = main(["compile", f"{model_file}:make", "--input-shape", "1,3,8,8", "--passes", "fold-bn", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "node '_0'" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [model_file]


@pytest.fixture
def breaking_pass() -> Iterator[None]:
    @register
    @dataclass(frozen=True)
    class ScaleToInfinity(Pass):
        name = "test-scale-to-inf"
        summary = "multiplies the first conv's weights by inf (a broken pass)"

        def run(self, graph: Graph, ctx: PassContext) -> PassResult:
            conv = next(n for n in graph.nodes() if n.op == "call_module")
            broken = nn.Conv2d(3, 4, 3)
            with torch.no_grad():
                broken.weight.fill_(float("inf"))
            with Rewriter(graph, self.name) as rewriter:
                rewriter.replace_module(conv, broken)
            return PassResult(changed=True)

    yield
    PASSES.pop("test-scale-to-inf")


def test_a_pass_that_makes_outputs_non_finite_fails_naming_the_node(breaking_pass: None) -> None:
    model = nan_model()
    with torch.no_grad():
        model[0].weight.fill_(0.1)
    with pytest.raises(PassError, match=r"'test-scale-to-inf' .*inf or nan.*node '_0'"):
        compile(model, torch.randn(2, 3, 8, 8), "test-scale-to-inf")
    result = compile(model, torch.randn(2, 3, 8, 8), "test-scale-to-inf", allow_non_finite=True)
    assert any("test-scale-to-inf" in n and n.startswith("WARNING:") for n in result.report.notes)
