"""`slimfx demo`: the main job on the trained digits CNN, and the same pipeline on a user's model."""

from __future__ import annotations

import re

import pytest

from slimfx.cli import main

pytestmark = pytest.mark.slow


def test_demo_trains_compiles_to_a_latency_target_and_reports_accuracy_and_speed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["demo", "--repeats", "3"])
    out = capsys.readouterr().out
    assert code == 0
    trained = re.search(r"held-out accuracy (\d+\.\d+)% on 297 test rows", out)
    assert trained and float(trained.group(1)) > 97
    final = re.search(r"accuracy (\d+\.\d+)% \(original, torch fp32\) -> (\d+\.\d+)% \(compiled, in (\S+)\)", out)
    assert final, out[-2000:]
    before, after, runtime = float(final.group(1)), float(final.group(2)), final.group(3)
    assert runtime == "onnxruntime-int8"
    assert before - after <= 1.5  # max-drop 1 holds on the evaluation set in torch; onnxruntime's may differ by a row
    assert "plan for latency=0.5 on onnxruntime-int8" in out and "latency checks" in out
    assert re.search(r"measured \d+\.\d+ ms per batch of 32, \d+\.\d+x the original's", out)
    assert "--target latency=0.5 --runtime onnxruntime-int8 --max-drop 1" in out


def test_demo_target_errors_come_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--target", "speed=2"]) == 2
    assert "expected latency=F" in capsys.readouterr().err
    assert main(["demo", "--model", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--runtime", "torch"]) == 2
    assert "--target and --runtime aim the trained demo" in capsys.readouterr().err


def test_demo_on_a_model_runs_the_pipeline_without_training(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--model", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--repeats", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "where the cost goes" in out and "prune-channels:ratio=0.5,fold-bn,quantize" in out
    assert "measured in each runtime (batch 1" in out and "fastest" in out


def test_demo_model_without_input_shape_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    source = tmp_path / "net.py"
    source.write_text("import torch.nn as nn\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 8, 3))\n")
    code = main(["demo", "--model", f"{source}:build"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--input-shape" in err
