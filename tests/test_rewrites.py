"""Structure rewrites (mixconv, crelu, fire): exact where the weights allow it, the new
modules in place, layers rewritten side by side, and clear errors on bad options."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import slimfx
from slimfx.errors import PassError, PassSpecError
from slimfx.metrics import relative_error
from slimfx.rewrites.crelu import negated_pairs
from slimfx.rewrites.fire import fire_module, fire_order
from slimfx.rewrites.mixconv import kernel_per_channel, outer_energy


def _rewritten(result: slimfx.CompileResult, name: str) -> list:
    record = next(r for r in result.report.passes if r.spec.startswith(name))
    return [d for d in record.decisions if d.action == "rewritten"]


# -- the math alone ------------------------------------------------------------------------------
def test_kernel_per_channel_takes_the_smallest_kernel_holding_the_energy() -> None:
    weight = torch.zeros(3, 1, 5, 5)
    weight[0, 0, 2, 2] = 1.0  # centre only: 1x1
    weight[1, 0, 1:4, 1:4] = 1.0  # 3x3 block: 3x3
    weight[2] = 1.0  # full 5x5
    assert kernel_per_channel(weight, (1, 3, 5), 0.0).tolist() == [1, 3, 5]
    assert outer_energy(weight, 3)[2] == pytest.approx(16 / 25)
    assert kernel_per_channel(weight, (1, 3, 5), 0.65).tolist() == [1, 3, 3]


def test_negated_pairs_are_found_greedily_most_negated_first() -> None:
    a, b = torch.randn(2, 10)
    vectors = torch.stack([a, b, -a, -0.9 * b - 0.05 * a, a + b])
    pairs = negated_pairs(vectors, 0.9)
    assert sorted(map(sorted, pairs.tolist())) == [[0, 2], [1, 3]]
    assert negated_pairs(vectors, 1.0).tolist() == [[0, 2]]


def test_fire_split_is_exact_for_a_low_rank_weight_with_centre_only_filters() -> None:
    squeeze, ones = 4, 10
    conv = nn.Conv2d(16, 32, 3, padding=1, stride=2)
    expand = torch.randn(32, squeeze, 3, 3)
    expand[:ones] *= torch.nn.functional.pad(torch.ones(1, 1), (1, 1, 1, 1))  # centre only
    conv.weight.data = torch.einsum("oskl,sc->ockl", expand, torch.randn(squeeze, 16))
    order = fire_order(conv.weight.detach(), ones)
    assert order[:ones].tolist() == list(range(ones))
    module, error = fire_module(conv, order, ones, squeeze)
    x = torch.randn(2, 16, 15, 15)
    with torch.no_grad():
        assert relative_error(module(x), conv(x)[:, order]) < 1e-5
    assert error < 1e-5


# -- mixconv --------------------------------------------------------------------------------------
def _with_zero_rings(model: nn.Module, share: float = 0.5) -> nn.Module:
    """Zero the outer ring of ``share`` of every depthwise conv's channels."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1:
            k = module.kernel_size[0]
            ring = torch.ones(k, k)
            ring[1:-1, 1:-1] = 0
            chosen = torch.randperm(module.out_channels)[: int(share * module.out_channels)]
            module.weight.data[chosen] *= 1 - ring
    return model


def test_mixconv_is_exact_on_mobilenet_v2_with_zero_outer_rings() -> None:
    model = _with_zero_rings(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    result = slimfx.compile(model, x, "mixconv:energy=0")  # exact: the manager verifies it
    rewritten = _rewritten(result, "mixconv")
    assert len(rewritten) == 17  # every depthwise conv of mobilenet_v2
    first = rewritten[0]
    assert first.details.channels_per_kernel == ((1, 16), (3, 16))
    assert first.macs_after < first.macs_before and first.details.reordered
    modules = dict(result.module.named_modules())
    assert isinstance(modules["features.1.conv.0.0.convs.0"], nn.Conv2d)
    assert modules["features.1.conv.0.0.convs.0"].kernel_size == (1, 1)
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4
    assert result.report.after.totals.macs < result.report.before.totals.macs


class _Depthwise5x5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 24, 1)
        self.dw = nn.Conv2d(24, 24, 5, padding=2, groups=24)
        self.project = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        return self.head(y.mean((2, 3)))


def test_mixconv_splits_a_5x5_depthwise_conv_into_three_kernel_sizes() -> None:
    model = _Depthwise5x5().eval()
    weight = model.dw.weight.data
    small, ones = torch.tensor([1, 5, 9, 13, 17, 21, 22, 23]), torch.tensor([5, 13, 21, 23])
    weight[small, :, 0] = weight[small, :, 4] = weight[small, :, :, 0] = weight[small, :, :, 4] = 0  # 3x3 at most
    weight[ones, :, 1:4, 1:4] *= torch.nn.functional.pad(torch.ones(1, 1), (1, 1, 1, 1))  # 1x1
    x = torch.randn(2, 3, 12, 12)
    result = slimfx.compile(model, x, "mixconv:energy=0")
    (decision,) = _rewritten(result, "mixconv")
    assert decision.details.channels_per_kernel == ((1, 4), (3, 4), (5, 16))
    assert set(decision.details.reordered) == {"expand", "project"}
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4


def test_mixconv_takes_one_smaller_kernel_where_channels_cannot_be_reordered() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 5, padding=2, groups=8)).eval()  # output channels
    model[1].weight.data[:, :, [0, 4], :] = 0
    model[1].weight.data[:, :, :, [0, 4]] = 0
    model[1].weight.data[:4, :, 1:4, 1:4] *= torch.nn.functional.pad(torch.ones(1, 1), (1, 1, 1, 1))
    x = torch.randn(1, 3, 10, 10)
    result = slimfx.compile(model, x, "mixconv:energy=0")
    (decision,) = _rewritten(result, "mixconv")
    assert decision.details.channels_per_kernel == ((3, 8),)
    assert "model output" in decision.reason
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4


def test_mixconv_declines_channels_that_need_their_whole_kernel() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    result = slimfx.compile(model, torch.randn(1, 3, 32, 32), "mixconv:energy=0.01")
    (record,) = result.report.passes
    assert len(record.decisions) == 17 and all(d.action == "declined" for d in record.decisions)
    assert "needs its 3x3 kernel" in record.decisions[0].reason


@pytest.mark.parametrize(
    "spec, match",
    [("mixconv:kernels=2", "odd kernel sizes"), ("mixconv:energy=1", r"\[0, 1\)")],
)
def test_mixconv_refuses_bad_options(spec: str, match: str) -> None:
    with pytest.raises(PassSpecError, match=match):
        slimfx.compile(nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8), spec)


def test_mixconv_refuses_kernels_above_every_depthwise_kernel() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    with pytest.raises(PassError, match=r"includes 5, above the largest depthwise kernel in the model \(3x3\)"):
        slimfx.compile(model, torch.randn(1, 3, 32, 32), "mixconv:kernels=1,5")


# -- crelu ---------------------------------------------------------------------------------------
class _TwoPairedConvs(nn.Module):
    """Two convs in a row whose filters come in exactly negated pairs (biases too)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.head = nn.Linear(12, 4)
        for conv, pairs in ((self.a, 4), (self.b, 5)):
            conv.weight.data[pairs : 2 * pairs] = -conv.weight.data[:pairs]
            conv.bias.data[pairs : 2 * pairs] = -conv.bias.data[:pairs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_crelu_is_exact_for_negated_pairs_on_convs_side_by_side() -> None:
    model = _TwoPairedConvs().eval()
    x = torch.randn(2, 3, 10, 10)
    result = slimfx.compile(model, x, "crelu:similarity=1")  # exact: verified by the manager
    a, b = _rewritten(result, "crelu")
    assert (a.target, len(a.details.pairs), b.target, len(b.details.pairs)) == ("a", 4, "b", 5)
    assert a.macs_after == a.macs_before * 4 // 8 and b.macs_after == b.macs_before * 7 // 12
    modules = dict(result.module.named_modules())
    assert modules["a.conv"].out_channels == 4 and modules["b.conv"].in_channels == 8
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4


def test_crelu_folds_batchnorm_first_and_reorders_across_residual_adds() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    model.conv1.weight.data[32:] = -model.conv1.weight.data[:32]
    bn = model.bn1  # folded bias must negate too: scale shared, shift and mean negated
    bn.running_var[32:] = bn.running_var[:32]
    bn.weight.data[32:] = bn.weight.data[:32]
    bn.bias.data[32:] = -bn.bias.data[:32]
    bn.running_mean[32:] = -bn.running_mean[:32]
    x = torch.randn(2, 3, 64, 64)
    result = slimfx.compile(model, x, "crelu:similarity=1")
    assert [r.spec for r in result.report.passes] == ["fold-bn", "crelu:similarity=1.0"]
    (decision,) = _rewritten(result, "crelu")
    assert decision.target == "conv1" and len(decision.details.reordered) >= 5
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4


def test_crelu_on_near_negated_pairs_reports_its_error() -> None:
    model = _TwoPairedConvs().eval()
    model.a.weight.data[4:] += 0.02 * torch.randn_like(model.a.weight.data[4:])
    x = torch.randn(2, 3, 10, 10)
    result = slimfx.compile(model, x, "crelu:similarity=0.9")
    a = _rewritten(result, "crelu")[0]
    assert 0 < a.error < 0.2 and "weight error" in a.reason
    assert result.report.fidelity.output_error > 0


def test_crelu_declines_convs_without_pairs_and_refuses_bad_similarity() -> None:
    result = slimfx.compile(_TwoPairedConvs().eval(), torch.randn(1, 3, 8, 8), "crelu:similarity=1,exclude=a")
    decisions = {d.target: d for d in result.report.passes[-1].decisions}
    assert decisions["a"].reason == "excluded by pattern 'a'"
    with pytest.raises(PassSpecError, match="similarity"):
        slimfx.compile(nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8), "crelu:similarity=0")


# -- fire ----------------------------------------------------------------------------------------
class _LowRankNet(nn.Module):
    def __init__(self, squeeze: int, ones: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 1)
        self.conv = nn.Conv2d(32, 48, 3, padding=1)
        self.head = nn.Linear(48, 4)
        expand = torch.randn(48, squeeze, 3, 3)
        expand[torch.randperm(48)[:ones]] *= torch.nn.functional.pad(torch.ones(1, 1), (1, 1, 1, 1))
        self.conv.weight.data = torch.einsum("oskl,sc->ockl", expand, torch.randn(squeeze, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))


def test_fire_is_exact_on_a_low_rank_conv_and_reorders_its_consumer() -> None:
    model = _LowRankNet(squeeze=6, ones=24).eval()
    x = torch.randn(2, 3, 12, 12)
    result = slimfx.compile(model, x, "fire:squeeze=6,expand1x1=0.5")
    (decision,) = _rewritten(result, "fire")
    assert decision.target == "conv"
    assert (decision.details.squeeze, decision.details.expand1x1, decision.details.expand_kxk) == (6, 24, 24)
    assert decision.details.reordered == ("head",) and decision.error < 1e-5
    modules = dict(result.module.named_modules())
    assert modules["conv.squeeze"].out_channels == 6 and modules["conv.expand1"].kernel_size == (1, 1)
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4


def test_fire_on_resnet18_rewrites_convs_side_by_side_and_declines_with_reasons() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = slimfx.compile(model, torch.randn(1, 3, 32, 32), "fire")
    decisions = {d.target: d for d in result.report.passes[-1].decisions}
    assert decisions["layer1.0.conv1"].action == "rewritten" and decisions["layer1.0.conv2"].action == "rewritten"
    assert "not less than" in decisions["conv1"].reason  # a squeeze wider than the stem's 3 inputs
    assert "1x1" in decisions["layer2.0.downsample.0"].reason
    assert "already reordered" in decisions["layer1.1.conv2"].reason  # the residual stream has one order
    assert result.report.after.totals.macs < result.report.before.totals.macs / 2


@pytest.mark.parametrize(
    "spec, match",
    [("fire:squeeze-ratio=0", "squeeze-ratio"), ("fire:expand1x1=1", "expand1x1"), ("fire:squeeze=0", "squeeze")],
)
def test_fire_refuses_bad_options(spec: str, match: str) -> None:
    with pytest.raises(PassSpecError, match=match):
        slimfx.compile(nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8), spec)


# -- group-convs ---------------------------------------------------------------------------------
def test_learned_groups_find_a_shuffled_block_diagonal_weight() -> None:
    from slimfx.rewrites.grouping import kept_share, learned_groups

    blocks = torch.block_diag(*[torch.rand(6, 4) + 0.1 for _ in range(4)])  # (24, 16), 4 blocks
    rows, cols = torch.randperm(24), torch.randperm(16)
    magnitude = blocks[rows][:, cols]
    out_group, in_group = learned_groups(magnitude, 4, free_outputs=True, free_inputs=True)
    assert kept_share(magnitude, out_group, in_group) == pytest.approx(1.0)
    assert torch.bincount(out_group).tolist() == [6] * 4 and torch.bincount(in_group).tolist() == [4] * 4


def test_learned_groups_keep_more_than_contiguous_blocks_on_a_dense_weight() -> None:
    from slimfx.rewrites.grouping import kept_share, learned_groups

    magnitude = torch.rand(32, 32) ** 4
    contiguous = kept_share(magnitude, torch.arange(32) // 8, torch.arange(32) // 8)
    learned = kept_share(magnitude, *learned_groups(magnitude, 4, free_outputs=True, free_inputs=True))
    condensed = kept_share(magnitude, *learned_groups(magnitude, 4, free_outputs=False, free_inputs=True))
    assert learned > condensed > contiguous


class _BlockDiagonalNet(nn.Module):
    """A conv whose weight is block-diagonal (4 groups) under shuffles of both its sides."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 5)
        mask = torch.block_diag(*[torch.ones(8, 4)] * 4)[torch.randperm(32)][:, torch.randperm(16)]
        self.conv.weight.data *= mask[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))


def test_group_convs_is_exact_on_a_shuffled_block_diagonal_conv() -> None:
    model = _BlockDiagonalNet().eval()
    x = torch.randn(2, 3, 10, 10)
    result = slimfx.compile(model, x, "group-convs:groups=4")
    decisions = {d.target: d for d in result.report.passes[0].decisions}
    conv = decisions["conv"]
    assert conv.action == "rewritten" and conv.details.kept_share == pytest.approx(1.0)
    assert conv.details.outputs_reordered and conv.details.inputs_reordered
    assert set(conv.details.reordered) == {"stem", "head"}
    assert conv.macs_after == conv.macs_before // 4
    assert dict(result.module.named_modules())["conv"].groups == 4
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4


def test_group_convs_declines_widths_groups_do_not_divide_and_refuses_hopeless_groups() -> None:
    result = slimfx.compile(_BlockDiagonalNet().eval(), torch.randn(1, 3, 8, 8), "group-convs:groups=4")
    assert "does not divide its 3 inputs" in result.report.passes[0].decisions[0].reason
    with pytest.raises(PassError, match="groups=5 divides the input and output channels of no conv"):
        slimfx.compile(_BlockDiagonalNet().eval(), torch.randn(1, 3, 8, 8), "group-convs:groups=5")
    with pytest.raises(PassSpecError, match="groups"):
        slimfx.compile(_BlockDiagonalNet().eval(), torch.randn(1, 3, 8, 8), "group-convs:groups=1")


def test_group_convs_side_by_side_on_resnet18_keep_orders_consistent() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    for module in model.modules():  # make every dense conv block-diagonal in its present order
        if isinstance(module, nn.Conv2d) and module.in_channels % 4 == 0:
            mask = torch.block_diag(*[torch.ones(module.out_channels // 4, module.in_channels // 4)] * 4)
            module.weight.data *= mask[:, :, None, None]
    x = torch.randn(2, 3, 32, 32)
    result = slimfx.compile(model, x, "group-convs:groups=4")
    rewritten = _rewritten(result, "group-convs")
    assert len(rewritten) == 19 and all(d.details.kept_share == pytest.approx(1.0) for d in rewritten)
    with torch.no_grad():
        assert relative_error(result.module(x), model(x)) < 1e-4


# -- octave --------------------------------------------------------------------------------------
def test_the_half_resolution_mix_keeps_a_kernel_sum_and_constant_maps_exact() -> None:
    from slimfx.rewrites.octave import half_resolution_mix, octave_conv

    mix = half_resolution_mix(3)
    kernel = torch.randn(3, 3)
    assert (mix @ kernel @ mix.T).sum() == pytest.approx(float(kernel.sum()), rel=1e-5)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    octave = octave_conv(conv, 3, 4)
    x = torch.randn(1, 6, 1, 1).expand(1, 6, 16, 16)  # constant maps: nothing is lost at half resolution
    with torch.no_grad():
        assert relative_error(octave(x)[..., 2:-2, 2:-2], conv(x)[..., 2:-2, 2:-2]) < 1e-5


def test_octave_moves_the_smoothest_channels_to_half_resolution() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    calib = [torch.randn(4, 3, 32, 32)]
    result = slimfx.compile(model, calib[0], "octave:alpha=0.25", calib_data=calib)
    decisions = {d.target: d for d in result.report.passes[0].decisions}
    assert "stride 2x2" in decisions["conv1"].reason and "stride 2x2" in decisions["layer2.0.conv1"].reason
    first = decisions["layer1.0.conv1"]
    assert first.action == "rewritten" and (first.details.low_inputs, first.details.low_outputs) == (16, 16)
    assert first.macs_after < first.macs_before and 0 < first.details.output_error < 1
    modules = dict(result.module.named_modules())
    assert {"layer1.0.conv1.hh", "layer1.0.conv1.lh", "layer1.0.conv1.hl", "layer1.0.conv1.ll"} <= set(modules)
    assert modules["layer1.0.conv1.ll"].in_channels == 16
    with torch.no_grad():
        assert result.module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_octave_refuses_bad_alpha_and_needs_calibration_data() -> None:
    from slimfx.errors import DataError

    with pytest.raises(PassSpecError, match="alpha"):
        slimfx.compile(nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8), "octave:alpha=1")
    with pytest.raises(DataError, match="calibration"):
        slimfx.compile(nn.Conv2d(3, 3, 3, padding=1), torch.randn(1, 3, 8, 8), "octave")
