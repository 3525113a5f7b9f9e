"""add-exits and the early-exit runtime: cut points, exactness of the runtime, a trained case."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from digits import split, trained_cnn, write_model_file

import slimfx
from slimfx import compile
from slimfx.backends.early_exit import EarlyExitModel
from slimfx.errors import DataError, PassError, PassOrderError, PassSpecError
from slimfx.exits.thresholds import choose_thresholds, prediction_entropy
from slimfx.ir.capture import capture
from slimfx.ir.dominators import output_dominators
from slimfx.ir.rewrite import split_at
from slimfx.passes.registry import parse_pipeline

torchvision = pytest.importorskip("torchvision")


def calibration(rows: int = 600, labels: bool = False) -> list:
    x, y = split()["calib"]
    return [(x[i : i + 50], y[i : i + 50]) if labels else x[i : i + 50] for i in range(0, min(rows, len(x)), 50)]


# -- where exits can go ------------------------------------------------------------------------
def test_resnet18_cut_points_lie_between_residual_blocks() -> None:
    graph = capture(torchvision.models.resnet18(weights=None).eval(), (torch.randn(1, 3, 64, 64),))
    names = [n.name for n in output_dominators(graph)]
    assert "layer1_1_relu_1" in names and "layer3_0_relu_1" in names  # the end of a block
    inside = [n for n in names if n.startswith("layer") and ("conv" in n or "bn" in n or n.endswith("_relu"))]
    assert inside == [], f"cut points inside a residual block: {inside}"


def test_densenet121_cut_points_lie_at_transitions() -> None:
    graph = capture(torchvision.models.densenet121(weights=None).eval(), (torch.randn(1, 3, 64, 64),))
    names = [n.name for n in output_dominators(graph)]
    assert "features_transition2_pool" in names
    assert not [n for n in names if "denselayer" in n]


class AllBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_a_model_whose_every_path_branches_is_declined() -> None:
    x = torch.randn(32, 4)
    result = compile(AllBranches().eval(), x[:2], "add-exits", calib_data=[x])
    (record,) = result.report.passes
    assert not record.changed and "every path branches" in record.decisions[-1].reason
    assert result.report.exits is None


# -- the runtime ----------------------------------------------------------------------------------
def runtime_for(model: nn.Module, x: torch.Tensor, thresholds: list[float]) -> tuple[EarlyExitModel, list[nn.Module]]:
    graph = capture(model, (x,))
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)) for c in (32, 64)]
    return EarlyExitModel(split_at(graph.module, ["block2_3", "block3_3"], "test"), heads, thresholds), heads


@pytest.mark.slow
def test_runtime_equals_the_original_when_no_exit_fires() -> None:
    model = trained_cnn()
    x = split()["test"][0][:40]
    runtime, _ = runtime_for(model, x, [-math.inf, -math.inf])
    with torch.no_grad():
        out, exits = runtime(x, return_exits=True)
        assert torch.equal(out, model(x))
    assert exits.tolist() == [2] * 40


def test_runtime_equals_head_one_when_it_always_fires() -> None:
    model = trained_cnn()
    x = split()["test"][0][:40]
    runtime, heads = runtime_for(model, x, [math.inf, math.inf])
    with torch.no_grad():
        out, exits = runtime(x, return_exits=True)
        expected = heads[0](model.block2(model.block1(x)))
    assert torch.allclose(out, expected, atol=1e-6) and exits.tolist() == [0] * 40


def test_thresholds_can_be_changed_after_compiling() -> None:
    model = trained_cnn()
    x = split()["test"][0][:40]
    runtime, _ = runtime_for(model, x, [-math.inf, -math.inf])
    runtime.thresholds[1] = math.inf
    with torch.no_grad():
        _, exits = runtime(x, return_exits=True)
    assert exits.tolist() == [1] * 40


def test_prediction_entropy() -> None:
    assert float(prediction_entropy(torch.zeros(1, 4))) == pytest.approx(math.log(4))
    assert float(prediction_entropy(torch.tensor([[100.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_choose_thresholds_keeps_the_agreement_greedily() -> None:
    entropy = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.1, 0.1, 0.1, 0.1])]
    correct = [torch.tensor([True, True, False, True]), torch.tensor([True, True, True, False])]
    final = torch.ones(4, dtype=torch.bool)
    # exit 1 may take the two surest rows (both right); the third is wrong, so it stops there
    thresholds = choose_thresholds(entropy, correct, final, required=4)
    assert thresholds[0] == pytest.approx(0.2)
    # exit 2 would answer rows 3 and 4; row 4 is wrong there, so nothing leaves at exit 2
    assert thresholds[1] == -math.inf
    assert choose_thresholds(entropy, correct, final, required=3)[0] == pytest.approx(0.4)


# -- a trained model: the acceptance case ---------------------------------------------------------
@pytest.mark.slow
def test_digits_cnn_agrees_while_a_third_exits_early() -> None:
    model = trained_cnn()
    x_test, _ = split()["test"]
    result = compile(model, x_test[:2], "add-exits:exits=2", calib_data=calibration())
    with torch.no_grad():
        outputs, exits = result.module(x_test, return_exits=True)
        reference = model(x_test)
    agreement = float((outputs.argmax(-1) == reference.argmax(-1)).float().mean())
    early = float((exits < 2).float().mean())
    assert agreement >= 0.99, f"agreement {agreement:.4f} on held-out digits"
    assert early >= 0.3, f"only {early:.1%} left early"
    plan = result.report.exits
    assert plan.expected_macs_per_sample < plan.full_macs_per_sample
    assert sum(s.share for s in plan.stats) + plan.final_share == pytest.approx(1.0)
    assert all(s.head_macs_per_sample > 0 for s in plan.stats)


def test_joint_training_with_labels_and_named_exits() -> None:
    model = trained_cnn()
    result = compile(
        model,
        split()["test"][0][:2],
        "add-exits:at=block2,block3,joint=true,epochs=3",
        calib_data=calibration(300, labels=True),
    )
    assert [s.node for s in result.report.exits.stats] == ["block2_3", "block3_3"]
    with torch.no_grad():
        assert result.module(split()["test"][0][:8]).shape == (8, 10)


def test_an_exit_inside_a_residual_block_is_declined() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(16, 3, 32, 32)
    result = compile(model, x[:2], "add-exits:at=layer1.0.conv1,layer2,epochs=1,agreement=0.5", calib_data=[x])
    decisions = {d.target: d for d in result.report.passes[0].decisions}
    assert decisions["layer1.0.conv1"].declined and "does not dominate" in decisions["layer1.0.conv1"].reason
    assert [s.node for s in result.report.exits.stats] == ["layer2_1_relu_1"]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("add-exits:exits=0", "option 'exits'"),
        ("add-exits:agreement=0", r"option 'agreement': expected a share in \(0, 1\]"),
        ("add-exits:agreement=1.5", "option 'agreement'"),
        ("add-exits:head=mlp", "choose one of: pool-linear, conv-pool-linear"),
    ],
)
def test_bad_options_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(PassSpecError, match=message):
        parse_pipeline(spec)


def test_bad_calibration_and_names_are_clear_errors() -> None:
    model, x = trained_cnn(), split()["test"][0][:2]
    with pytest.raises(PassError, match="joint=true trains on labels"):
        compile(model, x, "add-exits:joint=true", calib_data=calibration(100))
    with pytest.raises(DataError, match="pass 'add-exits' needs calibration data"):  # before capture
        compile(model, x, "add-exits")
    with pytest.raises(DataError, match=r"needs labelled training data \(with labels"):
        compile(model, x, "add-exits:joint=true")
    with pytest.raises(PassError, match="at='block9' is not a module"):
        compile(model, x, "add-exits:at=block9", calib_data=calibration(100))
    with pytest.raises(PassOrderError, match="'fold-bn' must run before 'add-exits'"):
        compile(model, x, "add-exits,fold-bn", calib_data=calibration(100))


def test_cli_reports_exit_shares_and_expected_macs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from slimfx.cli import main

    model = write_model_file(tmp_path)
    torch.save(calibration(), tmp_path / "calib.pt")
    argv = ["compile", model, "--input-shape", "8,1,8,8", "--passes", "add-exits:exits=1"]
    argv += ["--calib", str(tmp_path / "calib.pt"), "--format", "json", "--repeats", "0"]
    code = main([*argv, "--onnx", str(tmp_path / "e.onnx")])
    out, err = capsys.readouterr()
    assert code == 0
    exits = json.loads(out)["exits"]
    assert len(exits["exits"]) == 2 and exits["exits"][1]["exit"] == "full model" and exits["exits"][0]["share"] > 0
    written = sorted(p.name for p in tmp_path.glob("e.*"))
    assert written == ["e.exits.head0.onnx", "e.exits.json", "e.exits.stage0.onnx", "e.exits.stage1.onnx"]
    assert "wrote the early-exit model as ONNX: the manifest" in err and not list(tmp_path.glob(".*tmp*"))


def test_exits_no_row_takes_are_dropped_and_too_many_exits_say_how_many_fit() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()  # random weights: no head is ever confident
    x = torch.randn(40, 3, 32, 32)
    result = compile(model, x[:8], "add-exits:exits=2,epochs=1", calib_data=list(x.split(20)))
    (record,) = result.report.passes
    assert result.report.exits is None and not isinstance(result.module, EarlyExitModel)
    reasons = [d.reason for d in record.decisions]
    assert sum("dropped: no held-out row leaves here" in r for r in reasons) == 2
    assert any(r.startswith("no exit kept") for r in reasons)
    many = compile(trained_cnn(), split()["test"][0][:2], "add-exits:exits=50", calib_data=calibration())
    (summary,) = [d for d in many.report.passes[0].decisions if "asked for" in d.reason]
    planned = len(many.report.exits.stats) + sum("dropped" in d.reason for d in many.report.passes[0].decisions)
    assert f"exits=50 asked for, but this model has {planned} place(s) to cut" in summary.reason


@pytest.mark.parametrize("passes", ["add-exits:exits=2", "fold-bn,quantize,add-exits:exits=2"])
def test_early_exit_models_save_and_load_in_the_safe_format(passes: str, tmp_path) -> None:
    from slimfx.backends.early_exit import EarlyExitModel

    x_test, _ = split()["test"]
    result = compile(trained_cnn(), x_test[:2], passes, calib_data=calibration())
    result.save(tmp_path / "exits.pt")
    loaded = slimfx.load_model(str(tmp_path / "exits.pt"))
    assert isinstance(loaded, EarlyExitModel) and loaded.thresholds == result.module.thresholds
    assert loaded.example_input_shape == (2, 1, 8, 8)
    with torch.no_grad():
        expected, expected_exits = result.module(x_test, return_exits=True)
        got, exits = loaded(x_test, return_exits=True)
    assert torch.equal(exits, expected_exits)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_exits_placed_by_predicted_latency_report_the_expected_latency() -> None:
    from slimfx.exits.plan import expected_stage_rows
    from slimfx.report.tables import render_compile

    assert expected_stage_rows(64, [0.5, 0.25]) == (64, 32, 16)
    assert expected_stage_rows(8, [1.0]) == (8, 1)  # a stage always runs on at least one row
    model = trained_cnn()
    x_test, _ = split()["test"]
    result = compile(model, x_test[:32], "add-exits:exits=2,runtime=torch,epochs=20", calib_data=calibration())
    latency = result.report.exits.latency
    assert latency is not None and latency.runtime == "torch" and latency.batch == 32
    assert latency.stage_rows[0] == 32 and list(latency.stage_rows) == sorted(latency.stage_rows, reverse=True)
    assert latency.expected_ms > 0 and latency.speedup == pytest.approx(latency.full_ms / latency.expected_ms)
    assert "predicted on torch, batch 32" in render_compile(result.report)
    assert result.report.to_dict()["exits"]["latency"]["expected_latency_speedup"] == pytest.approx(latency.speedup)


@pytest.mark.parametrize("passes", ["add-exits:exits=2", "fold-bn,quantize,add-exits:exits=2"])
def test_early_exit_models_export_to_onnx_parts_that_run_back(passes: str, tmp_path: Path) -> None:
    from slimfx import OnnxEarlyExit

    x_test, _ = split()["test"]
    result = compile(trained_cnn(), x_test[:2], passes, calib_data=calibration())
    manifest = result.export_onnx(tmp_path / "m.onnx")
    heads = len(result.module.heads)
    parts = [f"m.exits.stage{k}.onnx" for k in range(heads + 1)] + [f"m.exits.head{k}.onnx" for k in range(heads)]
    assert manifest == tmp_path / "m.exits.json" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.exits.json", *parts]
    )
    runner = OnnxEarlyExit(manifest)
    with torch.no_grad():
        expected, expected_exits = result.module(x_test, return_exits=True)
    got, exits = runner(x_test, return_exits=True)
    same = exits == expected_exits
    assert float(same.float().mean()) >= 0.97  # onnxruntime's rounding may move a row across a threshold
    assert float((exits < heads).float().mean()) > 0.2  # rows really leave early in onnxruntime
    torch.testing.assert_close(got[same], expected[same], atol=0.05, rtol=0.05)
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.97
