"""The latency cost model: pure pricing on made-up profiles, fusion into kernels, profile files
(round trip, corrupt, foreign, missing), and a real profile predicting a small model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from nets import Residual

import slimfx
from slimfx.backends.profiler import default_profile, measure_layers, measure_runtime, predict_latency
from slimfx.backends.timing import module_latency_ms
from slimfx.cli import main
from slimfx.cost_model import device as device_module
from slimfx.cost_model.device import (
    DeviceProfile,
    LayerConfig,
    LayerTiming,
    Machine,
    OpClass,
    ProfileError,
    Roofline,
    RuntimeProfile,
    library_versions,
    load_profile,
    padded_work,
    save_profile,
)
from slimfx.cost_model.latency import (
    FUSION_RULES,
    find_channel_step,
    kernels,
    predict,
    roofline_ms,
    staircase_ms,
    table_ms,
)
from slimfx.ir.capture import capture
from slimfx.ir.meta import Cost

ROOFLINE = Roofline(
    dense_conv_macs_per_ms=1e6,
    depthwise_conv_macs_per_ms=1e5,
    pointwise_conv_macs_per_ms=5e5,
    linear_macs_per_ms=2e5,
    elements_per_ms=1e6,
    bytes_per_ms=1e6,
    kernel_overhead_ms=0.01,
    view_overhead_ms=0.001,
    call_overhead_ms=0.05,
)
CONV = LayerConfig("conv2d", (1, 64, 28, 28), 64, (3, 3), (1, 1), (1, 1), (1, 1))


def made_up(runtime: str = "onnxruntime", step: int = 16) -> RuntimeProfile:
    return RuntimeProfile(runtime, ROOFLINE, step)


# -- pure pricing -------------------------------------------------------------------------------------
def test_roofline_takes_the_larger_of_compute_and_memory_time() -> None:
    compute_bound = Cost(macs=2_000_000, bytes_read=1000)
    assert roofline_ms(compute_bound, OpClass.DENSE_CONV, ROOFLINE) == pytest.approx(0.01 + 2.0)
    assert roofline_ms(compute_bound, OpClass.DEPTHWISE_CONV, ROOFLINE) == pytest.approx(0.01 + 20.0)
    memory_bound = Cost(elem_ops=1000, bytes_read=3_000_000, bytes_written=1_000_000)
    assert roofline_ms(memory_bound, OpClass.ELEMENTWISE, ROOFLINE) == pytest.approx(0.01 + 4.0)
    assert roofline_ms(Cost(), OpClass.VIEW, ROOFLINE) == pytest.approx(0.001)


def test_padded_work_rounds_each_channel_count_up_to_the_step() -> None:
    assert padded_work(64, 64, 1, 16) == 64 * 64
    assert padded_work(60, 49, 1, 16) == 64 * 64  # both round up
    assert padded_work(96, 96, 96, 16) == 96  # depthwise: the channels
    assert padded_work(64, 64, 4, 8) == 16 * 64  # grouped: inputs per group


def test_staircase_interpolates_between_measured_points() -> None:
    sweep = [(1024.0, 1.0), (2048.0, 1.5), (4096.0, 3.5)]
    assert staircase_ms(sweep, 2048.0) == pytest.approx(1.5)
    assert staircase_ms(sweep, 3072.0) == pytest.approx(2.5)
    assert staircase_ms(sweep, 512.0) == pytest.approx(0.5)  # proportional below the first point
    assert staircase_ms(sweep, 8192.0) == pytest.approx(7.0)  # proportional above the last point
    falling = [(1024.0, 2.0), (2048.0, 1.0)]  # noise: the wider measured faster
    assert staircase_ms(falling, 1e6) > 0  # never extrapolated along a falling slope
    with pytest.raises(ValueError):
        staircase_ms([], 1.0)


def test_channel_step_is_found_from_plateaus() -> None:
    widths = list(range(4, 68, 4))
    step16 = [1.0 + (-(-w // 16)) * 0.5 for w in widths]  # flat within each multiple of 16
    assert find_channel_step(widths, step16) == 16
    linear = [1.0 + w * 0.1 for w in widths]  # no plateau at all
    assert find_channel_step(widths, linear) == 1
    step8 = [1.0 + (-(-w // 8)) * 0.5 for w in widths]
    assert find_channel_step(widths, step8) == 8
    noisy = list(step16)
    noisy[1] *= 1.4  # one slow run (as measured here: torch's 8-channel conv) does not hide the staircase
    assert find_channel_step(widths, noisy) == 16
    measured_ort = [0.092, 0.093, 0.092, 0.092, 0.157, 0.156, 0.153, 0.154, 0.225, 0.224, 0.224, 0.239]
    assert find_channel_step(widths[:12], measured_ort) == 16  # onnxruntime fp32 on this EPYC


def test_table_lookup_exact_then_separable_sweeps_on_the_staircase() -> None:
    profile = made_up(step=16)
    in_sweep = ((16, 0.8), (32, 1.2))  # 64 -> 2.0 is the layer itself
    out_sweep = ((16, 0.5), (32, 1.0), (48, 1.5))
    profile.tables[CONV.key()] = LayerTiming(CONV.key(), 2.0, 64, 64, 1, in_sweep, out_sweep)
    assert table_ms(CONV, profile) == (2.0, "table")
    pruned = CONV.with_widths(30, 30)  # pads to 32 and 32, measured points on both sweeps
    assert table_ms(pruned, profile) == (pytest.approx(2.0 * (1.2 / 2.0) * (1.0 / 2.0)), "sweep")
    assert table_ms(CONV.with_widths(31, 32), profile) == table_ms(pruned, profile)  # one step, one time
    between = CONV.with_widths(64, 40)  # pads to 48 outputs: a point of the output sweep
    assert table_ms(between, profile)[0] == pytest.approx(1.5)
    depthwise = LayerConfig("conv2d", (1, 64, 28, 28), 64, (3, 3), (1, 1), (1, 1), (1, 1), groups=64)
    profile.tables[depthwise.key()] = LayerTiming(depthwise.key(), 1.0, 64, 64, 64, (), ((32, 0.5),))
    assert table_ms(depthwise.with_widths(32, 32), profile)[0] == pytest.approx(0.5)
    other_kernel = replace(CONV, kernel=(5, 5), padding=(2, 2))
    assert table_ms(other_kernel, profile) is None  # no family: the roofline prices it


# -- kernels: what each runtime fuses -------------------------------------------------------------------
def test_fusion_rules_group_conv_bn_add_relu_for_onnxruntime_only() -> None:
    graph = capture(Residual().eval(), (torch.randn(1, 3, 16, 16),))
    ort = kernels(graph, FUSION_RULES["onnxruntime"])
    eager = kernels(graph, FUSION_RULES["torch"])
    fused = [k.nodes for k in ort if len(k.nodes) > 1]
    assert ("stem_0", "stem_1", "stem_2") in fused  # conv, batchnorm, relu
    assert any(len(nodes) == 4 and nodes[0] == "block_1" for nodes in fused)  # 1x1 conv, bn, add, relu
    assert all(len(k.nodes) == 1 for k in eager)  # eager runs every node on its own
    ort_config = next(k.config for k in ort if k.nodes[0] == "block_1")
    assert ort_config is not None and ort_config.fused == ("batchnorm", "add", "relu")


def test_prediction_adds_kernels_and_the_call_overhead() -> None:
    graph = capture(Residual().eval(), (torch.randn(1, 3, 16, 16),))
    prediction = predict(graph, made_up("onnxruntime"), threads=2)
    assert prediction.total_ms == pytest.approx(prediction.kernels_ms + ROOFLINE.call_overhead_ms)
    node_ms = prediction.node_ms()
    assert node_ms["stem_1"] == 0.0 and prediction.fused_into()["stem_1"] == "stem_0"
    assert sum(node_ms.values()) == pytest.approx(prediction.kernels_ms)
    assert prediction.source_counts().get("roofline", 0) > 0  # empty tables: every kernel by the roofline


# -- profile files --------------------------------------------------------------------------------------
def sample_profile() -> DeviceProfile:
    profile = DeviceProfile(Machine.here(), library_versions(), torch.get_num_threads())
    runtime = made_up("torch")
    runtime.tables[CONV.key()] = LayerTiming(CONV.key(), 1.5, 64, 64, 1, ((32, 0.9),), ((16, 0.4), (32, 0.8)))
    runtime.tables["sig"] = LayerTiming("sig", 0.2, moved_bytes=4096)
    profile.runtimes["torch"] = runtime
    return profile


def test_profile_json_round_trip(tmp_path: Path) -> None:
    profile = sample_profile()
    path = save_profile(profile, tmp_path / "p.json")
    loaded = load_profile(path)
    assert loaded.machine == profile.machine and loaded.versions == profile.versions
    assert loaded.runtimes["torch"].roofline == ROOFLINE
    assert loaded.runtimes["torch"].tables == profile.runtimes["torch"].tables
    assert loaded.to_dict() == profile.to_dict()


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "not a readable device profile"), ('{"schema": "x"}', "not a slimfx device profile")],
)
def test_corrupt_profile_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)
    data = sample_profile().to_dict()
    del data["runtimes"]["torch"]["roofline"]["bytes_per_ms"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="corrupt device profile"):
        load_profile(path)


def test_missing_and_foreign_profiles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no device profile at"):
        load_profile(tmp_path / "absent.json")
    profile = sample_profile()
    here, versions, threads = Machine.here(), library_versions(), torch.get_num_threads()
    profile.check_matches(here, versions, threads)  # its own machine: fine
    other = replace(here, cpu="Some Other CPU")
    with pytest.raises(ProfileError, match="measured on Some Other CPU"):
        DeviceProfile(other, versions, threads).check_matches(here, versions, threads)
    with pytest.raises(ProfileError, match="torch 0.0 -> "):
        DeviceProfile(here, {**versions, "torch": "0.0"}, threads).check_matches(here, versions, threads)
    with pytest.raises(ProfileError, match="threads"):
        DeviceProfile(here, versions, threads + 1).check_matches(here, versions, threads)
    with pytest.raises(ProfileError, match="no measurements for runtime onnxruntime"):
        profile.runtime("onnxruntime")


def test_a_foreign_cached_profile_is_rebuilt_not_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    path = device_module.default_profile_path(Machine.here(), library_versions(), threads)
    foreign = sample_profile()
    foreign.machine = replace(foreign.machine, cpu="Some Other CPU")
    path.parent.mkdir(parents=True)
    save_profile(foreign, path)
    said: list[str] = []
    rebuilt = default_profile(["torch"], threads, progress=said.append)
    assert rebuilt.machine == Machine.here()
    assert "rebuilding the cached device profile" in said[0] and "Some Other CPU" in said[0]
    assert load_profile(path).machine == Machine.here()  # the cache now holds this machine's


# -- a real profile -------------------------------------------------------------------------------------
class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def torch_profile() -> RuntimeProfile:
    return measure_runtime("torch", torch.get_num_threads())


def test_a_measured_profile_predicts_a_small_cnn_within_a_factor_of_two(torch_profile: RuntimeProfile) -> None:
    rates = torch_profile.roofline
    assert rates.dense_conv_macs_per_ms > rates.depthwise_conv_macs_per_ms > 0
    assert rates.bytes_per_ms > 0 and rates.call_overhead_ms >= 0
    model, x = SmallCnn().eval(), torch.randn(4, 3, 64, 64)
    graph = capture(model, (x,))
    filled = measure_layers(graph, torch_profile, torch.get_num_threads())
    assert filled.measured > 0
    again = measure_layers(graph, torch_profile, torch.get_num_threads())
    assert again.measured == 0 and again.known == filled.measured  # measured once, then looked up
    prediction = predict(graph, torch_profile, torch.get_num_threads())
    assert set(prediction.source_counts()) <= {"table", "free", "roofline"}
    measured = module_latency_ms(model, (x,), 20)
    assert 0.5 < prediction.total_ms / measured < 2.0  # a noisy machine: the benchmark measures the real error


def test_sweep_predicts_a_pruned_width_before_pruning(torch_profile: RuntimeProfile) -> None:
    model, x = SmallCnn().eval(), torch.randn(1, 3, 64, 64)
    graph = capture(model, (x,))
    measure_layers(graph, torch_profile, torch.get_num_threads(), sweep=True)
    convs = [
        k.config for k in kernels(graph, FUSION_RULES["torch"]) if k.config is not None and k.config.op == "conv2d"
    ]
    swept = torch_profile.tables[convs[-1].key()]
    assert swept.in_sweep and swept.out_sweep  # narrower widths on each side (as many as the channel step leaves)
    assert all(width < 64 and width % torch_profile.channel_step == 0 for width, _ in swept.out_sweep)
    half = convs[-1].with_widths(32, 32)
    ms, source = table_ms(half, torch_profile)
    assert source == "sweep" and 0 < ms < swept.ms * 1.2


# -- API and CLI ------------------------------------------------------------------------------------------
def test_analyze_with_a_runtime_predicts_every_node(tmp_path: Path) -> None:
    report = slimfx.analyze(SmallCnn().eval(), torch.randn(1, 3, 32, 32), runtime="torch")
    assert report.prediction is not None and report.prediction.runtime == "torch"
    assert all(row.predicted_ms is not None for row in report.nodes)
    data = report.to_dict()
    assert data["totals"]["predicted_ms"] == pytest.approx(report.prediction.total_ms)
    assert data["prediction"]["batch"] == 1 and data["prediction"]["threads"] == torch.get_num_threads()
    assert data["prediction"]["profile"].endswith(".json")
    assert sum(n["time_share"] for n in data["nodes"]) == pytest.approx(1.0)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_report_runtime_profile_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    code, out, _ = run(capsys, "profile-device", "--runtime", "torch", "-o", str(profile))
    assert code == 0 and "dense conv GMAC/s" in out and load_profile(profile).runtimes.keys() == {"torch"}
    model = ["torchvision:resnet18", "--input-shape", "1,3,32,32"]
    code, out, _ = run(capsys, "report", *model, "--runtime", "torch", "--profile", str(profile), "--top", "3")
    assert code == 0 and "predicted on torch" in out and "share of time" in out
    assert "of all predicted time" in out
    code, out, _ = run(capsys, "report", *model, "--runtime", "torch", "--profile", str(profile), "--format", "json")
    data = json.loads(out)
    assert data["prediction"]["profile"] == str(profile) and data["totals"]["predicted_ms"] > 0
    assert len(load_profile(profile).runtimes["torch"].tables) > 0  # the model's kernels were kept
    code, out, _ = run(capsys, "report", *model, "--batch", "4", "--format", "json")
    assert json.loads(out)["input_shapes"] == [[4, 3, 32, 32]]

    for argv, message in [
        (["report", *model, "--profile", str(profile)], "add --runtime"),
        (["report", *model, "--runtime", "onnxruntime", "--profile", str(profile)], "no measurements for runtime"),
        (["report", *model, "--runtime", "torch", "--profile", str(tmp_path / "nope.json")], "no device profile at"),
        (["report", *model, "--runtime", "torch-int8"], "runs quantized models and this one is float"),
        (["profile-device", "-o", str(tmp_path / "p.txt")], "name the file *.json"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in err and "Traceback" not in err
    (tmp_path / "bad.json").write_text("{")
    code, _, err = run(capsys, "report", *model, "--runtime", "torch", "--profile", str(tmp_path / "bad.json"))
    assert code == 2 and "not a readable device profile" in err


def test_compile_runtime_table_shows_predicted_beside_measured(tmp_path: Path) -> None:
    model, x = SmallCnn().eval(), torch.randn(1, 3, 32, 32)
    result = slimfx.compile(model, x, "prune-channels:ratio=0.5", runtime="torch", latency_repeats=5)
    rows = result.report.runtimes.rows
    assert all(r.predicted_ms is not None and r.predicted_ms > 0 for r in rows)
    assert {r.model for r in rows} == {"original", "compiled"}  # the original before the passes, the result after
    from slimfx.report.tables import render_compile

    assert "predicted (error)" in render_compile(result.report)


def test_predict_latency_saves_new_kernels_into_the_profile_file(tmp_path: Path) -> None:
    path = save_profile(sample_profile(), tmp_path / "p.json")
    graph = capture(SmallCnn().eval(), (torch.randn(1, 3, 16, 16),))
    prediction = predict_latency(graph, "torch", path)
    assert prediction.profile == str(path)
    assert len(load_profile(path).runtimes["torch"].tables) > 2


def test_the_runtimes_named_everywhere_are_the_ones_with_fusion_rules() -> None:
    import typing

    from slimfx.cli import PREDICTED_RUNTIMES
    from slimfx.cost_model.latency import PredictedRuntime

    assert set(typing.get_args(PredictedRuntime)) == set(FUSION_RULES) == set(PREDICTED_RUNTIMES)
