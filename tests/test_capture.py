"""Capture, shape propagation, the IR's caches and rewrite invalidation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import analyze, compile
from slimfx.errors import CaptureError, DataError, RewriteError, ShapeError, VerificationError
from slimfx.ir.capture import capture
from slimfx.ir.meta import META_KEY, NodeInfo
from slimfx.ir.rewrite import Rewriter
from slimfx.ir.shapes import ensure_shapes
from slimfx.ir.verify import compare, lint
from slimfx.metrics import relative_error
from slimfx.report.tables import render_report


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent: cannot be traced symbolically
            return y
        return -y


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        self.block = Branchy()
        self.head = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).flatten(1))


def test_every_node_gets_typed_shapes() -> None:
    graph = capture(Net().eval(), torch.randn(2, 3, 8, 8), leaf_modules=["block"])
    infos = {node.name: graph.info(node) for node in graph.nodes()}
    assert all(isinstance(info, NodeInfo) for info in infos.values())
    assert infos["block"].out_shape == (2, 4, 6, 6)
    assert infos["flatten"].out_shape == (2, 144)
    assert infos["head"].out_shape == (2, 10) and infos["head"].kind == "Linear"
    assert infos["block"].outputs[0].dtype == torch.float32


def test_untraceable_submodule_is_kept_whole_measured_and_left_alone() -> None:
    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    graph = capture(model, x)
    assert graph.opaque == {"block"}
    assert [n.target for n in graph.nodes() if n.op == "call_module"][-2:] == ["block", "head"]
    report = analyze(model, x)
    (block,) = [r for r in report.nodes if r.name == "block"]
    assert block.rule == "measured by FlopCounterMode (opaque module)" and block.cost.macs == 4 * 3 * 9 * 6 * 6
    assert report.opaque == ("block",) and report.uncounted == ()
    pruned = compile(model, x, "prune-channels:ratio=0.5").report.passes[0]
    reasons = [r for d in pruned.decisions for r in (d.reason, *(d.details.blocked or ()))]
    assert any("opaque" in r or "channel behaviour unknown" in r for r in reasons), reasons


def test_untraceable_model_names_module_and_source_line_without_fallback() -> None:
    with pytest.raises(CaptureError) as err:
        capture(Net().eval(), torch.randn(1, 3, 8, 8), fallback=False)
    message = str(err.value)
    assert "module 'block' (Branchy)" in message
    assert "test_capture.py" in message and "if y.sum() > 0" in message
    assert "leaf_modules=['block']" in message and "concrete_args" in message


def test_leaf_module_by_class_keeps_it_whole() -> None:
    graph = capture(Net().eval(), torch.randn(1, 3, 8, 8), leaf_modules=[Branchy])
    assert [n.target for n in graph.nodes() if n.op == "call_module"] == ["stem.0", "stem.1", "block", "head"]


def test_wrong_input_shape_names_the_node() -> None:
    with pytest.raises(ShapeError) as err:
        capture(Net().eval(), torch.randn(1, 5, 8, 8), leaf_modules=["block"])
    assert "node 'stem_0' (module 'stem.0', Conv2d)" in str(err.value)
    assert "(1, 5, 8, 8)" in str(err.value)


def test_networkx_view_and_cache_invalidation() -> None:
    graph = capture(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.ReLU()).eval(), torch.randn(1, 3, 4, 4))
    g1 = graph.to_networkx()
    assert list(g1.successors("_0")) == ["_1"]
    assert graph.to_networkx() is g1  # cached while the graph is unchanged
    relu = graph.node("_2")
    with Rewriter(graph, "test") as rewriter:
        rewriter.bypass(relu)
    g2 = graph.to_networkx()
    assert g2 is not g1 and "_2" not in g2
    assert graph.node("_1").meta[META_KEY].outputs  # shapes recomputed lazily, still there


def test_rewrite_stamps_provenance_and_lint_catches_dangling_modules() -> None:
    graph = capture(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).eval(), torch.randn(1, 3, 4, 4))
    conv = graph.node("_0")
    with Rewriter(graph, "my-pass") as rewriter:
        rewriter.replace_module(conv, nn.Conv2d(3, 3, 1))
    with pytest.raises(RewriteError, match="ensure_shapes"):  # shapes of the old graph are never read as current
        graph.info(conv)
    ensure_shapes(graph)
    assert graph.info(conv).provenance == "my-pass" and graph.info(conv).out_shape == (1, 3, 4, 4)
    delattr(graph.module, "1")
    with pytest.raises(VerificationError, match="_1"):
        lint(graph)


def test_compare_reports_relative_error_and_shape_changes() -> None:
    a = torch.tensor([3.0, 4.0])
    assert relative_error(a, a + torch.tensor([0.3, 0.4])) == pytest.approx(0.1)
    same = compare(nn.Identity(), nn.Identity(), [a])
    assert same.relative_error == 0 and same.shapes_match
    assert not compare(nn.Identity(), nn.Flatten(0), [torch.ones(2, 2)]).shapes_match


def test_inserted_module_takes_over_the_uses_and_is_stamped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 4, 4)
    graph = capture(model, x)
    conv = graph.node("_0")
    with Rewriter(graph, "my-pass") as rewriter:
        scale = rewriter.insert_module_after(conv, "0", nn.Identity(), (conv,))
        rewriter.replace_uses(conv, scale)
    assert scale.target == "0_1"  # a unique name next to the module it follows
    assert [u.name for u in conv.users] == [scale.name]
    ensure_shapes(graph)
    assert graph.info(scale).provenance == "my-pass" and graph.info(scale).out_shape == (1, 3, 4, 4)
    torch.testing.assert_close(graph.run(x), model(x))


class ResizesOddInputs(nn.Module):
    """Branches on its input's shape in its own forward (as timm's CrossViT does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.token = nn.Parameter(torch.randn(1, 4, 1))
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 8:
            x = nn.functional.interpolate(x, size=(8, 8))
        y = self.conv(x).flatten(2)  # (B, 4, 64)
        y = torch.cat([self.token.expand(x.size(0), -1, -1), y], dim=2)
        return self.head(y.mean(2))


def test_top_level_shape_branch_is_traced_at_fixed_shapes() -> None:
    model, x = ResizesOddInputs().eval(), torch.randn(2, 3, 6, 6)
    graph = capture(model, x)
    assert graph.fixed_shapes and not graph.opaque
    assert any(n.target is nn.functional.interpolate for n in graph.nodes())  # the branch the example takes
    torch.testing.assert_close(graph.run(x), model(x))
    report = analyze(model, x)
    assert report.fixed_shapes and report.to_dict()["fixed_shapes"] is True
    text = render_report(report)
    assert "traced at fixed shapes" in text and "(2, 3, 6, 6) only" in text
    with pytest.raises(CaptureError, match="top-level module"):
        capture(model, x, fallback=False)


def test_fixed_shape_graph_takes_calibration_data_in_its_batch_size() -> None:
    model, x = ResizesOddInputs().eval(), torch.randn(2, 3, 6, 6)
    result = compile(model, x, "quantize:calib=minmax", calib_data=[torch.randn(6, 3, 6, 6)])
    assert result.report.passes[-1].changed
    with pytest.raises(DataError, match="batches of 2 only"):
        compile(model, x, "quantize:calib=minmax", calib_data=[torch.randn(3, 3, 6, 6)])


class ValueBranchAtTop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_top_level_value_branch_is_still_a_clear_error() -> None:
    with pytest.raises(CaptureError) as err:
        capture(ValueBranchAtTop().eval(), torch.randn(1, 3, 8, 8))
    assert "top-level module (ValueBranchAtTop)" in str(err.value) and "y.sum() > 0" in str(err.value)


class CachesInEval(nn.Module):
    """Keeps a derived tensor in a plain dict in eval mode, as timm's LeViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 1, 1))
        self.conv = nn.Conv2d(3, 4, 1)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias * 2
        return self.conv(x) + self.cache["bias"]


def test_tracing_leaves_no_proxy_in_the_model() -> None:
    model, x = CachesInEval().eval(), torch.randn(1, 3, 4, 4)
    first = capture(model, x)
    assert model.cache == {}  # the proxy the trace stored is taken back
    second = capture(model, x)  # would read a node of the first trace otherwise
    torch.testing.assert_close(second.run(x), first.run(x))
    torch.testing.assert_close(second.run(x), model(x))


def test_fixed_shape_tracing_runs_a_leaf_with_children_without_recording_them() -> None:
    class WithBlock(ResizesOddInputs):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())  # a leaf that calls children

    model, x = WithBlock().eval(), torch.randn(2, 3, 6, 6)
    graph = capture(model, x, leaf_modules=["conv"])
    assert graph.fixed_shapes
    assert [str(n.target) for n in graph.nodes() if n.op == "call_module"] == ["conv", "head"]
    assert not [name for name, _ in graph.module.named_buffers() if name.startswith("_tensor_constant")]
    torch.testing.assert_close(graph.run(x), model(x))
