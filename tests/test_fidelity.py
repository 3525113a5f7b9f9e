"""Fidelity on real data: the evaluation set, every pass scored against the original, warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from digits import calibration, split, trained_cnn, write_model_file

import slimfx
from slimfx.cli import main
from slimfx.data import Batch
from slimfx.errors import InvalidArgumentError
from slimfx.fidelity import EvalSet, Fidelity, Judge, choose_eval_set
from slimfx.report.tables import render_compile, render_report

EXAMPLE = (torch.randn(4, 3),)


def batches_of(rows: int, count: int) -> list[torch.Tensor]:
    return [torch.randn(rows, 3) for _ in range(count)]


def test_eval_data_is_taken_as_given_and_calibration_is_left_whole() -> None:
    evaluation, calibration_left = choose_eval_set(batches_of(5, 2), batches_of(10, 4), EXAMPLE)
    assert evaluation.source == "evaluation data" and evaluation.rows == 10 and len(calibration_left) == 4


def test_the_last_tenth_of_the_calibration_batches_is_held_out_from_the_passes() -> None:
    data = batches_of(10, 12)
    evaluation, calibration_left = choose_eval_set(None, data, EXAMPLE)
    assert len(calibration_left) == 10 and len(evaluation.batches) == 2
    assert torch.equal(evaluation.batches[0].inputs[0], data[10]) and "held-out" in evaluation.describe()


def test_too_little_calibration_data_is_shared_and_says_so() -> None:
    evaluation, calibration_left = choose_eval_set(None, batches_of(1, 8), EXAMPLE)
    assert len(calibration_left) == 8 and evaluation.rows == 8 and "the passes used them too" in evaluation.describe()


def test_without_data_the_example_inputs_are_used_and_named() -> None:
    evaluation, calibration_left = choose_eval_set(None, None, EXAMPLE)
    assert calibration_left is None and evaluation.rows == 4 and "example inputs" in evaluation.describe()


def test_the_judge_scores_agreement_accuracy_and_error_against_hand_computed_figures() -> None:
    torch.manual_seed(0)
    original, other = nn.Linear(3, 4), nn.Linear(3, 4)
    x, y = torch.randn(50, 3), torch.randint(0, 4, (50,))
    evaluation = EvalSet((Batch((x[:30],), y[:30]), Batch((x[30:],), y[30:])), "evaluation data")
    score = Judge(original, evaluation).score(other)
    with torch.no_grad():
        a, b = original(x), other(x)
    assert score.agreement == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()))
    assert score.accuracy == pytest.approx(float((b.argmax(1) == y).double().mean()))
    assert score.original_accuracy == pytest.approx(float((a.argmax(1) == y).double().mean()))
    assert score.output_error == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-6)
    assert Judge(original, evaluation).score(original).agreement == 1.0


def test_fidelity_thresholds() -> None:
    assert Fidelity("x", 0.95, 0.5).destroyed and Fidelity("x", 0.95, 0.5).below(0.95)
    assert not Fidelity("x", 0.1, 0.99).destroyed and not Fidelity("x", 0.1, 0.99).below(0.95)
    assert not Fidelity("x", 0.1, None).below(0.95)  # not class scores: no agreement to judge


@pytest.fixture(scope="module")
def digits_run() -> tuple[nn.Module, slimfx.CompileResult, torch.Tensor, torch.Tensor]:
    model = trained_cnn()
    x, y = split()["test"]
    result = slimfx.compile(
        model,
        x[:1],
        "prune-channels:ratio=0.5,fold-bn,quantize",
        calib_data=calibration(),
        eval_data=list(zip(x.split(100), y.split(100))),
    )
    return model, result, x, y


def test_every_pass_reports_accuracy_on_the_evaluation_data(digits_run) -> None:
    model, result, x, y = digits_run
    with torch.no_grad():
        original = float((model(x).argmax(1) == y).double().mean())
        compiled = float((result.module(x).argmax(1) == y).double().mean())
        agreement = float((model(x).argmax(1) == result.module(x).argmax(1)).double().mean())
    final = result.report.fidelity
    assert final.original_accuracy == pytest.approx(original) and final.accuracy == pytest.approx(compiled)
    assert final.agreement == pytest.approx(agreement) and "297 rows, labelled" in final.on
    prune, fold, quantize = result.report.passes
    assert prune.fidelity.accuracy < 0.3  # pruning by half without recovery: near chance
    assert fold.verified and fold.fidelity.accuracy == pytest.approx(prune.fidelity.accuracy, abs=0.01)
    assert quantize.fidelity == final  # one figure: the footer is the last pass's


def test_a_fall_in_agreement_is_a_loud_warning_and_a_json_flag(digits_run) -> None:
    _, result, _, _ = digits_run
    text = render_compile(result.report)
    assert "accuracy 98.99% ->" in text
    assert "WARNING: top-1 agreement with the original is" in text and "first fell below after pass 'prune" in text
    data = json.loads(result.report.to_json())
    assert data["fidelity"]["below_threshold"] and data["fidelity"]["warn_below"] == 0.95
    assert data["passes"][0]["fidelity"]["accuracy"] == result.report.passes[0].fidelity.accuracy


def test_an_exact_pipeline_has_no_warning_and_no_data_means_the_example_inputs() -> None:
    model = trained_cnn()
    x = split()["test"][0]
    result = slimfx.compile(model, x[:8], "fold-bn")
    assert result.report.fidelity.agreement == 1.0 and result.report.fidelity_warnings() == ()
    assert "example inputs" in result.report.fidelity.on


def test_add_exits_row_and_footer_agree() -> None:
    model = trained_cnn()
    x, y = split()["train"]
    result = slimfx.compile(model, x[:1], "add-exits:exits=1,epochs=1", calib_data=list(x.split(100)))
    (record,) = result.report.passes
    assert record.fidelity == result.report.fidelity and record.fidelity is not None


def test_warn_below_must_be_a_share() -> None:
    with pytest.raises(InvalidArgumentError, match="between 0 and 1"):
        slimfx.compile(trained_cnn(), split()["test"][0][:1], "fold-bn", warn_below=1.5)


def test_cli_prints_accuracy_equal_to_onnxruntime_on_the_file_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimfx.backends import onnx as ort_tools

    model = write_model_file(tmp_path)
    x, y = split()["test"]
    torch.save(calibration(), tmp_path / "calib.pt")
    torch.save(list(zip(x.split(100), y.split(100))), tmp_path / "test.pt")
    argv = ["compile", model, "--input-shape", "1,1,8,8", "--repeats", "1"]
    argv += ["--passes", "prune-channels:ratio=0.5,fold-bn,quantize", "--calib", str(tmp_path / "calib.pt")]
    argv += ["--eval", str(tmp_path / "test.pt"), "--onnx", str(tmp_path / "out.onnx")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("the compiled model vs the original on"))
    printed = float(line.split("accuracy ")[1].split(" -> ")[1].split("%")[0]) / 100
    (logits,) = ort_tools.run(ort_tools.session(tmp_path / "out.onnx"), (x,))
    in_onnxruntime = float((torch.from_numpy(logits).argmax(1) == y).double().mean())
    assert abs(printed - in_onnxruntime) <= 0.005
    assert "WARNING: top-1 agreement with the original is" in out and "accuracy fell from 98.99%" in out


def test_printing_a_report_gives_the_readable_tables(digits_run) -> None:
    _, result, x, _ = digits_run
    assert str(result.report) == render_compile(result.report)
    assert str(result.report).startswith("DigitsCNN: 3 pass(es)") and "PassRecord(" not in str(result.report)
    analysis = slimfx.analyze(trained_cnn(), x[:1])
    assert str(analysis) == render_report(analysis) and "MACs" in str(analysis)
