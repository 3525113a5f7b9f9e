"""The slimfx command: every format, the saved model, and every bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimfx.cli import main

torchvision = pytest.importorskip("torchvision")
SMALL = ["--input-shape", "1,3,64,64"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "torchvision:resnet18", *SMALL, "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "slimfx.report/1"
    assert data["totals"]["params"] == 11689512 and data["totals"]["flops"] == 2 * data["totals"]["macs"]
    node = data["nodes"][1]
    assert {"name", "op", "macs", "params", "out_shape"} <= set(node)
    assert data["uncounted"] == []


def test_report_formats(capsys: pytest.CaptureFixture[str]) -> None:
    _, table, _ = run(capsys, "report", "torchvision:resnet18", *SMALL, "--top", "5")
    assert "MACs" in table and "uncounted ops: none" in table and table.count("call_module") == 5
    _, md, _ = run(capsys, "report", "torchvision:resnet18", *SMALL, "--format", "md", "--by", "module-type")
    assert "| Conv2d" in md
    _, text, _ = run(capsys, "report", "torchvision:resnet18", *SMALL, "--format", "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:2] == ["node", "op"] and len(rows) > 50
    _, dot, _ = run(capsys, "report", "torchvision:resnet18", *SMALL, "--format", "dot")
    assert dot.startswith("digraph") and '"conv1" -> "bn1"' in dot


def test_compile_saves_a_model_that_loads_back_without_batchnorm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "out.pt"
    code, out, _ = run(
        capsys,
        "compile",
        "torchvision:mobilenet_v2",
        *SMALL,
        "--passes",
        "fold-bn",
        "--format",
        "json",
        "-o",
        str(out_file),
        "--repeats",
        "2",
    )
    assert code == 0
    data = json.loads(out)
    assert data["before"]["totals"]["macs"] == data["after"]["totals"]["macs"]
    (record,) = data["passes"]
    assert record["name"] == "fold-bn" and record["changed"] and record["seconds"] > 0
    assert len(record["decisions"]) == 52 and data["output_error"] <= 1e-4
    assert data["latency"]["before_ms"] > 0 and "torch eager fp32" in data["latency"]["baseline"]

    from slimfx import load_model

    loaded = load_model(str(out_file))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    assert loaded.example_input_shape == (1, 3, 64, 64)
    code, out, _ = run(capsys, "report", str(out_file), "--format", "json")
    assert code == 0 and json.loads(out)["totals"]["macs"] == data["after"]["totals"]["macs"]


def test_compile_prunes_and_saves_a_smaller_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "pruned.pt"
    code, out, _ = run(
        capsys,
        "compile",
        "torchvision:resnet18",
        *SMALL,
        "--passes",
        "prune-channels:ratio=0.5,criterion=bn-scale",
        "--format",
        "json",
        "-o",
        str(out_file),
        "--repeats",
        "0",
    )
    assert code == 0
    data = json.loads(out)
    assert data["after"]["totals"]["macs"] <= 0.3 * data["before"]["totals"]["macs"]
    (record,) = data["passes"]
    pruned = [d for d in record["decisions"] if d["action"] == "pruned"]
    assert pruned and {"members", "channels_before", "channels_after", "importance", "macs_saved_alone"} <= set(
        pruned[0]["details"]
    )

    from slimfx import load_model

    loaded = load_model(str(out_file))  # convs without bias survive the round trip
    assert loaded.get_submodule("conv1").out_channels == 32
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_compile_table_shows_channels_and_thinet_calibrates_on_random_batches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys,
        "compile",
        "torchvision:resnet18",
        *SMALL,
        "--passes",
        "prune-channels:ratio=0.25,criterion=thinet",
        "--calib",
        "random:2",
        "--repeats",
        "0",
    )
    assert code == 0
    assert "64 -> 48" in out and "thinet: removed 16 of 64 channels" in out
    code, _, err = run(capsys, "compile", "torchvision:resnet18", *SMALL, "--passes", "prune-channels:criterion=thinet")
    assert code == 2 and "'prune-channels:criterion=thinet' needs calibration data" in err and "Traceback" not in err


@pytest.mark.slow
def test_calib_reads_saved_batches_and_rejects_bad_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batches = tmp_path / "calib.pt"
    torch.save(torch.randn(4, 3, 64, 64), batches)  # one tensor: split into batches of the example's size
    code, out, _ = run(
        capsys,
        "compile",
        "torchvision:resnet18",
        *SMALL,
        "--passes",
        "prune-channels:ratio=0.25,criterion=thinet",
        "--calib",
        str(batches),
        "--repeats",
        "0",
    )
    assert code == 0 and "thinet: removed 16 of 64 channels" in out
    wrong = tmp_path / "wrong.pt"
    torch.save([torch.randn(2, 3, 32, 32)], wrong)
    for spec, message in [
        ("random:0", "N in random:N must be a whole number >= 1"),
        ("random:x", "random:N"),
        (str(tmp_path / "missing.pt"), "no such file"),
        (str(wrong), "batch 0, input 0 has shape (2, 3, 32, 32); the model takes (batch, 3, 64, 64)"),
    ]:
        code, _, err = run(capsys, "compile", "torchvision:resnet18", *SMALL, "--passes", "quantize", "--calib", spec)
        assert code == 2 and message in err and "Traceback" not in err, spec


@pytest.mark.slow
def test_compile_factorizes_vgg16_to_half_the_macs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "vgg.pt"
    code, out, _ = run(
        capsys,
        "compile",
        "torchvision:vgg16",
        *SMALL,
        "--passes",
        "factorize-convs:method=spatial-svd,target-macs=0.5",
        "--format",
        "json",
        "-o",
        str(out_file),
        "--repeats",
        "0",
    )
    assert code == 0
    data = json.loads(out)
    assert data["after"]["totals"]["macs"] <= 0.55 * data["before"]["totals"]["macs"]
    factorized = [d for d in data["passes"][0]["decisions"] if d["action"] == "factorized"]
    assert factorized and all(d["details"]["layers"][0].endswith(".v") for d in factorized)

    from slimfx import load_model

    loaded = load_model(str(out_file))
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_saved_model_matches_compiled_output(tmp_path: Path) -> None:
    import slimfx

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    result = slimfx.compile(model, x, "fold-bn")
    result.save(tmp_path / "r18.pt")
    loaded = slimfx.load_model(str(tmp_path / "r18.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


BAD_INPUTS = [
    (["report", "torchvision:resnet5"], "did you mean resnet50"),
    (["report", "nosuchpkg.mod:factory"], "cannot import"),
    (["report", "torchvision:resnet18", "--input-shape", "1,3,x"], "invalid --input-shape"),
    (["report", "torchvision:resnet18", "--input-shape", "1,1,64,64"], "node 'conv1' (module 'conv1', Conv2d)"),
    (
        ["compile", "torchvision:resnet18", "--passes", "fold-bm"],
        "unknown pass 'fold-bm'; did you mean 'fold-bn'? valid",
    ),
    (
        ["compile", "torchvision:resnet18", "--passes", "prune-channels:ratoi=0.5"],
        "did you mean 'ratio'? valid options",
    ),
    (["compile", "torchvision:resnet18", "--passes", "prune-channels:criterion=tinet"], "(did you mean 'thinet'?)"),
    (["compile", "torchvision:resnet18", "--passes", "quantize:bits=4"], "for 4-bit weights give weights=int4"),
    (["compile", "torchvision:resnet18", "--passes", "quantize:help"], "'slimfx passes quantize' lists its options"),
    (["compile", "torchvision:resnet18", "--passes", "fold-bn:ratio=0.5"], "unknown option 'ratio'"),
    (["compile", "torchvision:resnet18", "--passes", "prune-channels:ratio=1.5"], "expected a number in [0, 1)"),
    (
        ["compile", "torchvision:resnet18", "--passes", "prune-channels:criterion=magic"],
        "choose one of: l1, bn-scale, thinet",
    ),
    (["report", "torchvision:resnet18", "--format", "xml"], "invalid choice"),
    (["report", "torchvision:resnet18", "--top", "0"], "--top must be at least 1"),
    (["compile", "torchvision:resnet18", "--warn-below", "95"], "a top-1 agreement between 0 and 1"),
    (["report", "torchvision:resnet18", "--leaf-module", "layer9.0"], "leaf module 'layer9.0' is not a submodule"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_invalid_option_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import dataclass

    from slimfx.passes import PASSES
    from slimfx.passes.base import Pass

    @dataclass(frozen=True)
    class Ratio(Pass):
        name = "test-ratio"
        ratio: float = 0.5

    PASSES["test-ratio"] = Ratio
    try:
        code, _, err = run(capsys, "compile", "torchvision:resnet18", "--passes", "test-ratio:ratio=half")
    finally:
        PASSES.pop("test-ratio")
    assert code == 2 and "invalid value 'half' for 'ratio'; expected float" in err


def write_untraceable(tmp_path: Path) -> Path:
    source = tmp_path / "user_model.py"
    source.write_text(
        "import torch\n"
        "class Gate(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0:\n"
        "            return x\n"
        "        return -x\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 3, 1)\n"
        "        self.gate = Gate()\n"
        "    def forward(self, x):\n"
        "        return self.gate(self.conv(x))\n"
        "def make():\n"
        "    return Net()\n"
    )
    return source


def test_untraceable_model_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"{write_untraceable(tmp_path)}:make"
    code, _, err = run(capsys, "report", spec, "--input-shape", "1,3,8,8", "--no-fallback")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "module 'gate' (Gate)" in err and "user_model.py:4: if x.mean() > 0:" in err
    code, out, _ = run(capsys, "report", spec, "--input-shape", "1,3,8,8")
    assert code == 0 and "opaque modules (torch.fx cannot trace them" in out and ": gate" in out
    code, out, _ = run(capsys, "report", spec, "--input-shape", "1,3,8,8", "--leaf-module", "gate", "--format", "json")
    assert code == 0 and any(n["name"] == "gate" for n in json.loads(out)["nodes"])
    code, _, err = run(capsys, "report", spec)
    assert code == 2 and "no default input shape" in err


def test_unwritable_output_leaves_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "out.pt"
    code, _, err = run(capsys, "compile", "torchvision:resnet18", *SMALL, "-o", str(missing), "--repeats", "0")
    assert code == 2 and "does not exist" in err and not missing.exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a directory as the target
            target = locked
        else:
            target = locked / "report.json"
        code, _, err = run(capsys, "report", "torchvision:resnet18", *SMALL, "--format", "json", "-o", str(target))
        assert code == 2 and "cannot write" in err
    finally:
        locked.chmod(0o700)
    assert [p.name for p in locked.iterdir()] == []


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    from slimfx.files.atomic import atomic_write

    target = tmp_path / "out.bin"

    def half_then_fail(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    from slimfx.errors import OutputError

    with pytest.raises(OutputError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_pickled_model_needs_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pickled.pt"
    torch.save(torchvision.models.resnet18(weights=None), path)
    code, _, err = run(capsys, "report", str(path), *SMALL)
    assert code == 2 and "can run code" in err and "--trust-model-file" in err
    code, out, _ = run(capsys, "report", str(path), *SMALL, "--trust-model-file", "--format", "json")
    assert code == 0 and json.loads(out)["totals"]["params"] == 11689512


def test_crafted_slimfx_file_cannot_call_arbitrary_functions(tmp_path: Path) -> None:
    import slimfx
    from slimfx.errors import UnsafeModelFileError

    result = slimfx.compile(torch.nn.Sequential(torch.nn.ReLU()), torch.randn(1, 2), "fold-bn")
    good = tmp_path / "good.pt"
    result.save(good)
    evil = tmp_path / "evil.pt"
    crafted = {"name": "_0", "op": "call_function", "target": "os:system", "args": ["echo pwned"], "kwargs": {}}
    for legacy in (False, True):  # the graph stored with its module, or (older files) beside the modules
        payload = torch.load(good, weights_only=True)
        modules = json.loads(payload["modules"])
        graph = modules[0]["graph"]
        graph[1] = crafted
        if legacy:
            modules[0]["graph"] = None
            payload["graph"] = json.dumps(graph)
        payload["modules"] = json.dumps(modules)
        torch.save(payload, evil)
        with pytest.raises(UnsafeModelFileError, match="os:system"):
            slimfx.load_model(str(evil))
    modules = json.loads(torch.load(good, weights_only=True)["modules"])
    modules[1]["class"] = "subprocess:Popen"
    payload = torch.load(good, weights_only=True)
    payload["modules"] = json.dumps(modules)
    torch.save(payload, evil)
    with pytest.raises(UnsafeModelFileError, match="subprocess:Popen"):
        slimfx.load_model(str(evil))


@pytest.mark.slow
def test_console_script_exit_code_and_single_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slimfx.cli", "report", "torchvision:nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_the_same_seed_gives_the_same_random_weights_and_figures(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("compile", "torchvision:resnet18", *SMALL, "--passes", "prune-channels:ratio=0.5", "--format", "json")
    runs = [json.loads(run(capsys, *args, "--repeats", "0", "--seed", seed)[1]) for seed in ("3", "3", "4")]
    errors = [r["output_error"] for r in runs]
    assert errors[0] == errors[1] != errors[2]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import slimfx

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"slimfx {slimfx.__version__}"


def test_model_spec_errors_say_what_the_file_type_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "dyn.py"
    source.write_text(
        "import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n\nclass Net(torch.nn.Module):\n    pass\n"
    )
    code, _, err = run(capsys, "report", str(source), "--input-shape", "1,4")
    assert code == 2 and f"{source} is Python source" in err and f"{source}:build" in err and "trust" not in err
    onnx_file = tmp_path / "q.onnx"
    onnx_file.write_bytes(b"not really onnx")
    code, _, err = run(capsys, "report", str(onnx_file), "--input-shape", "1,4")
    assert code == 2 and "is an ONNX file; slimfx compiles PyTorch models" in err and "trust" not in err


def test_a_model_instance_in_a_file_is_taken_as_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "inst.py"
    source.write_text("import torch\n\nnet = torch.nn.Sequential(torch.nn.Linear(4, 2))\n")
    code, out, _ = run(capsys, "report", f"{source}:net", "--input-shape", "1,4", "--format", "json")
    assert code == 0 and json.loads(out)["totals"]["params"] == 10


def test_a_top_level_branch_points_to_concrete_arg_which_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "flagged.py"
    source.write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lin = torch.nn.Linear(4, 2)\n\n    def forward(self, x, double=False):\n"
        "        y = self.lin(x)\n        if double:\n            return y * 2\n        return y\n"
    )
    argv = ["report", f"{source}:Net", "--input-shape", "1,4", "--no-fallback"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--concrete-arg NAME=VALUE" in err and "--leaf-module PATH" in err
    code, out, _ = run(capsys, *argv, "--concrete-arg", "double=True", "--format", "json")
    assert code == 0 and json.loads(out)["totals"]["params"] == 10
    code, _, err = run(capsys, *argv, "--concrete-arg", "double")
    assert code == 2 and "expected NAME=VALUE" in err
