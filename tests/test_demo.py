"""`slimfx demo`: the main job on the trained digits CNN, and the same pipeline on a user's model."""

from __future__ import annotations

import re

import pytest

from slimfx.cli import main

pytestmark = pytest.mark.slow


def test_demo_trains_compiles_and_reports_held_out_accuracy_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--repeats", "3"])
    out = capsys.readouterr().out
    assert code == 0
    trained = re.search(r"held-out accuracy (\d+\.\d+)% on 297 test rows", out)
    assert trained and float(trained.group(1)) > 97
    final = re.search(r"accuracy (\d+\.\d+)% \(original, torch fp32\) -> (\d+\.\d+)% \(compiled, in (\S+),", out)
    assert final, out[-2000:]
    before, after, fastest = float(final.group(1)), float(final.group(2)), final.group(3)
    assert before - after < 2.5  # prune half the channels + distill + int8 costs at most ~1 point (measured: 0.7)
    assert fastest.endswith("-int8")
    assert "MACs 0.2" in out and "measured in each runtime (batch 32" in out
    for runtime in ("torch-int8", "onnxruntime-int8", "openvino-int8"):
        assert runtime in out
    assert "slimfx compile my_model.py:build" in out


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
