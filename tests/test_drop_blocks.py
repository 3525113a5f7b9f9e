"""drop-blocks: which residual blocks exist, dropping equals the model built without them,
targets met, and clear errors on bad options or targets out of reach."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import slimfx
from slimfx.errors import PassError, PassSpecError
from slimfx.ir.blocks import residual_blocks
from slimfx.ir.capture import capture
from tests.nets import randomize_batchnorm

CALIB = [torch.randn(4, 3, 32, 32) for _ in range(3)]


def _resnet18() -> nn.Module:
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


class _SkipOnly(nn.Module):
    """A BasicBlock without its branch: relu(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


@pytest.mark.parametrize("name, count", [("resnet18", 5), ("resnet50", 12), ("mobilenet_v2", 10), ("vgg11", 0)])
def test_residual_blocks_are_the_identity_skips(name: str, count: int) -> None:
    model = torchvision.models.get_model(name, num_classes=10).eval()
    blocks = residual_blocks(capture(model, (torch.randn(1, 3, 32, 32),)))
    assert len(blocks) == count
    if name == "resnet18":  # the first block of each later stage has a downsample conv: no identity skip
        assert [b.name for b in blocks] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
        assert "layer1.0.conv1" in blocks[0].modules and "layer1.0.bn2" in blocks[0].modules


def test_dropping_blocks_equals_the_model_built_without_them() -> None:
    model = _resnet18()
    result = slimfx.compile(model, CALIB[0], "drop-blocks:blocks=2", calib_data=CALIB)
    dropped = [d.target for d in result.report.passes[0].decisions if d.action == "removed"]
    assert len(dropped) == 2
    built = copy.deepcopy(model)
    for name in dropped:
        stage, index = name.split(".")
        getattr(built, stage)[int(index)] = _SkipOnly()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(result.module(x), built(x), atol=1e-5)
    modules = dict(result.module.named_modules())
    assert f"{dropped[0]}.conv1" not in modules and f"{dropped[0]}.bn2" not in modules
    assert f"{dropped[0]}.relu" in modules  # the ReLU after the add still runs, on the skip


def test_blocks_are_ranked_by_sensitivity_per_saving_and_reported() -> None:
    result = slimfx.compile(_resnet18(), CALIB[0], "drop-blocks:blocks=1", calib_data=CALIB)
    decisions = result.report.passes[0].decisions
    assert [d.target for d in decisions] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    (dropped,) = [d for d in decisions if d.action == "removed"]
    ratio = {d.target: d.details.divergence / d.details.macs_saved for d in decisions}
    assert ratio[dropped.target] == min(ratio.values())
    assert dropped.reason.startswith("dropped: saves") and "divergence" in dropped.reason
    assert all(d.reason.startswith("kept:") for d in decisions if d is not dropped)


def test_a_macs_target_is_met_and_a_latency_target_reports_its_prediction() -> None:
    result = slimfx.compile(_resnet18(), CALIB[0], "drop-blocks:target-macs=0.8", calib_data=CALIB)
    assert result.report.after.totals.macs <= 0.8 * result.report.before.totals.macs
    result = slimfx.compile(_resnet18(), CALIB[0], "drop-blocks:target-latency=0.8", calib_data=CALIB)
    summary = result.report.passes[0].decisions[-1]
    assert summary.target == "(predicted latency)" and "on torch (target" in summary.reason
    before, after = (float(v.split()[0]) for v in summary.reason.split(" on ")[0].split(" -> "))
    assert after <= 0.8 * before


def test_excluded_blocks_are_kept_and_a_model_without_blocks_says_so() -> None:
    result = slimfx.compile(_resnet18(), CALIB[0], "drop-blocks:blocks=1,exclude=layer4.*", calib_data=CALIB)
    decisions = {d.target: d for d in result.report.passes[0].decisions}
    assert decisions["layer4.1"].reason == "excluded by pattern 'layer4.*'"
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    result = slimfx.compile(vgg, CALIB[0], "drop-blocks:blocks=1", calib_data=CALIB)
    assert "no residual block with an identity skip" in result.report.passes[0].decisions[0].reason


@pytest.mark.parametrize(
    "spec, match",
    [
        ("drop-blocks", "one of blocks=N"),
        ("drop-blocks:blocks=1,target-macs=0.5", "not blocks and target-macs"),
        ("drop-blocks:blocks=0", "an integer >= 1"),
        ("drop-blocks:target-macs=1.5", "fraction of the original MACs"),
        ("drop-blocks:target-latency=fast", "N ms"),
    ],
)
def test_bad_options_are_refused(spec: str, match: str) -> None:
    with pytest.raises(PassSpecError, match=match):
        slimfx.compile(_resnet18(), CALIB[0], spec, calib_data=CALIB)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("drop-blocks:blocks=6", "blocks=6, but the model has 5 droppable residual blocks"),
        ("drop-blocks:target-macs=0.2", "target-macs=0.2 cannot be met: without all 5 droppable blocks"),
    ],
)
def test_targets_out_of_reach_are_errors(spec: str, match: str) -> None:
    with pytest.raises(PassError, match=match):
        slimfx.compile(_resnet18(), CALIB[0], spec, calib_data=CALIB)
