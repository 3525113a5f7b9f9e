"""What a user meets at the command line: outputs all or nothing, flags that do what they say."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimfx.cli import main

pytest.importorskip("torchvision")
SMALL = ["torchvision:resnet18", "--input-shape", "1,3,32,32"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-o", "same.pt", "--onnx", "same.onnx", "--html", "same.onnx"], "must end in .html"),
        (["-o", "m.onnx", "--onnx", "m.onnx"], "-o writes slimfx's own model format"),
        (["--onnx", "a.onnx", "--html", "b.html", "-o", "c.pt", "--openvino", "c.xml"], None),
        (["--onnx", "x/../a.onnx", "--openvino", "b.xml", "-o", "a.onnx.pt", "--html", "a.html"], None),
        (["--openvino", "w.xml", "-o", "w.bin"], "-o writes slimfx's own model format"),
        (["--onnx", "m.pt"], "must end in .onnx"),
        (["--passes", "add-exits", "--calib", "random:2", "--openvino", "e.xml"], "early-exit model"),
    ],
)
def test_outputs_are_checked_before_any_work(
    flags: list[str], message: str | None, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    if message is None:  # fine combinations: checked by running only as far as the checks (no model loaded)
        monkeypatch.setattr("slimfx.files.model_spec.resolve_model", _stop)
        code, _, err = run(capsys, "compile", *SMALL, *flags)
        assert code == 2 and "stopped after the checks" in err
        return
    code, _, err = run(capsys, "compile", *SMALL, *flags)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def _stop(*args: object, **kwargs: object) -> None:
    from slimfx.errors import ModelSpecError

    raise ModelSpecError("stopped after the checks")


def test_two_outputs_on_one_path_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    same = str(tmp_path / "r.htm")
    code, _, err = run(capsys, "compile", *SMALL, "-o", same, "--html", same)
    assert code == 2 and "--html and --output both write" in err and not Path(same).exists()
    code, _, err = run(
        capsys, "compile", *SMALL, "--openvino", str(tmp_path / "w.xml"), "--onnx", str(tmp_path / "w.onnx")
    )
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.onnx", "w.xml"]


def test_an_interrupted_compile_leaves_no_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object) -> str:
        raise KeyboardInterrupt  # after the model and the ONNX file were written to their staged paths

    monkeypatch.setattr("slimfx.report.html.compile_html", interrupted)
    outputs = ["-o", str(tmp_path / "m.pt"), "--onnx", str(tmp_path / "m.onnx"), "--html", str(tmp_path / "m.html")]
    code, _, err = run(capsys, "compile", *SMALL, "--repeats", "1", *outputs)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither the finished files nor their temporary copies


@pytest.mark.slow
def test_sigint_at_any_moment_leaves_all_outputs_or_none(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "slimfx", "compile", *SMALL, "--passes", "fold-bn,quantize", "--calib", "random:2"]
    argv += ["--repeats", "2", "-o", "m.pt", "--onnx", "m.onnx", "--html", "m.html"]
    for delay in (3.0, 6.0):
        folder = tmp_path / f"after-{delay}"
        folder.mkdir()
        proc = subprocess.Popen(argv, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        names = sorted(p.name for p in folder.iterdir())
        assert names in ([], ["m.html", "m.onnx", "m.pt"]), (names, err[-500:])
        assert proc.returncode in (0, 130) and "Traceback" not in err


def test_ctrl_c_while_the_cli_starts_is_a_clean_interrupt(tmp_path: Path) -> None:
    """SIGINT while torch and NumPy load (torch's own NumPy import would swallow it) or while the
    parser is built: status 130 and one line, never a traceback and never a run that goes on."""
    argv = [sys.executable, "-m", "slimfx", "report", *SMALL]
    for delay in (0.2, 0.4, 0.7, 1.0):
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, err, out) == (130, "slimfx: interrupted\n", ""), delay


def test_output_files_get_the_umask_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = os.umask(0o027)
    try:
        code, _, _ = run(capsys, "compile", *SMALL, "--repeats", "0", "-o", str(tmp_path / "m.pt"))
    finally:
        os.umask(old)
    assert code == 0 and (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o640


def test_by_module_type_in_json_splits_convs_and_top_says_its_share(capsys: pytest.CaptureFixture[str]) -> None:
    model = ["torchvision:mobilenet_v3_large", "--input-shape", "1,3,64,64"]
    code, out, _ = run(capsys, "report", *model, "--format", "json", "--by", "module-type")
    data = json.loads(out)
    assert code == 0 and data["by"] == "module-type"
    families = {g["family"]: g for g in data["groups"]}
    assert {"Conv2d", "Conv2d (depthwise)"} <= set(families)
    assert sum(g["macs"] for g in data["groups"]) == data["totals"]["macs"]
    code, out, _ = run(capsys, "report", *model, "--top", "5")
    assert "shown: top 5 nodes by MACs, " in out and "% of all MACs" in out
    code, out, _ = run(capsys, "report", *model, "--format", "csv", "--top", "3")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert all(0 <= float(r["share of MACs"]) <= 1 for r in rows)


def test_report_flags_that_cannot_apply_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "report", *SMALL, "--format", "dot", "--top", "3")
    assert code == 2 and "--top and --by do not apply" in err
    code, _, err = run(capsys, "report", *SMALL, "--leaf-module", "layer9")
    assert code == 2 and err.count("\n") == 1 and "did you mean layer4" in err


def test_every_pass_option_has_a_line_of_help() -> None:
    from slimfx.passes.registry import PASSES, describe_options

    for name, cls in PASSES.items():
        for option in describe_options(cls):
            assert option.help, f"{name}: option {option.name} has no help (add it to {cls.__name__}.option_help)"
        assert set(cls.option_help) <= {f.name for f in __import__("dataclasses").fields(cls)}, name


def test_passes_lists_the_passes_and_their_options(capsys: pytest.CaptureFixture[str]) -> None:
    from slimfx.passes.registry import PASSES

    code, out, _ = run(capsys, "passes")
    assert code == 0 and all(name in out for name in PASSES)
    code, out, _ = run(capsys, "passes", "prune-channels")
    assert code == 0 and "min-channels" in out and "l1|bn-scale|thinet" in out and "0.5" in out
    code, _, err = run(capsys, "passes", "quantise")
    assert code == 2 and "valid passes" in err


def test_strict_fails_an_unreachable_target_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "m.pt"
    argv = [*SMALL, "--passes", "prune-channels:target-macs=0.001", "--repeats", "0", "-o", str(out_file)]
    code, out, err = run(capsys, "compile", *argv, "--strict")
    assert code == 1 and "cannot be reached" in err and "no file was written" in err
    assert len(err.strip().splitlines()) == 1 and "pass prune-channels" in out and not out_file.exists()
    code, out, err = run(capsys, "compile", *argv)
    assert code == 0 and out_file.exists() and "cannot be reached" in out


def test_a_branch_baked_into_the_onnx_file_is_a_warning_and_torch_export_stays_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "gated.py"
    source.write_text(
        "import torch\n\nclass Gate(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lin = torch.nn.Linear(4, 4)\n\n    def forward(self, x):\n"
        "        return self.lin(x) if x.sum() > 0 else x\n\n"
        "def build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4), Gate(), torch.nn.Linear(4, 2)).eval()\n"
    )
    argv = [f"{source}:build", "--input-shape", "2,4", "--leaf-module", "1", "--passes", "fold-bn", "--repeats", "1"]
    code, out, err = run(capsys, "compile", *argv, "--onnx", str(tmp_path / "g.onnx"))
    assert code == 0 and "holds one side of a branch on a tensor value (gated.py:9" in out
    assert "def forward" not in err and "Traceback" not in err and "TracerWarning" not in err
    code, out, _ = run(capsys, "compile", *argv, "--onnx", str(tmp_path / "g.onnx"), "--format", "json")
    assert json.loads(out)["onnx"]["trace_warnings"][0].startswith("gated.py:9: Converting a tensor")
