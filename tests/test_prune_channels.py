"""prune-channels: selection math, modes, ThiNet, options, order with fold-bn, the training helper."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from nets import Residual, conv_bn, randomize_batchnorm

import slimfx
from slimfx import compile
from slimfx.errors import DataError, PassOrderError, PassSpecError
from slimfx.passes.registry import parse_pipeline
from slimfx.prune.selection import (
    choose_removed,
    common_partition,
    greedy_removal_order,
    kept_channels,
    least_squares_scales,
    removal_count,
)

torchvision = pytest.importorskip("torchvision")


# -- pure selection functions ------------------------------------------------------------------
def test_removal_count_respects_floor_and_rounding() -> None:
    assert removal_count(64, 0.5) == 32
    assert removal_count(10, 0.33) == 3
    assert removal_count(4, 0.9, min_keep=2) == 2
    assert removal_count(64, 0.3, round_to=8) == 16  # keeps 48, not 45
    assert removal_count(3, 0.9) == 2  # never removes every channel
    assert kept_channels(10, 3, round_to=8) == 8
    assert kept_channels(12, 9, round_to=8) == 12  # rounding never goes above the total


def test_choose_removed_takes_the_lowest_and_balances_rows() -> None:
    scores = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    assert choose_removed(scores, 2).tolist() == [3, 1]
    rows = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert choose_removed(scores, 2, rows).tolist() == [1, 3]  # one from each row
    assert choose_removed(scores, 3, rows).tolist() == [1, 3]  # 3 is not a multiple of 2 rows


def test_common_partition_rejects_conflicts() -> None:
    units = torch.arange(8)
    assert common_partition(units, ()) is None
    assert common_partition(units, (units.reshape(2, 4),)).shape == (2, 4)
    assert "different groups" in common_partition(units, (units.reshape(2, 4), units.reshape(4, 2)))
    assert "another group" in common_partition(units, (torch.arange(4, 12).reshape(2, 4),))


def test_greedy_order_matches_brute_force_on_small_problems() -> None:
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    for count in (1, 2):
        greedy = set(greedy_removal_order(x, count).tolist())
        if count == 1:
            best = min(range(6), key=lambda c: float(x[:, c].norm()))
            assert greedy == {best}
        else:  # greedy extends the best single channel by the best partner
            first = int(greedy_removal_order(x, 1)[0])
            partner = min((c for c in range(6) if c != first), key=lambda c: float((x[:, first] + x[:, c]).norm()))
            assert greedy == {first, partner}
    assert sorted(greedy_removal_order(x, 6).tolist()) == list(range(6))


def test_least_squares_scales_recover_known_scales() -> None:
    kept = torch.randn(100, 3)
    assert torch.allclose(
        least_squares_scales(kept, kept @ torch.tensor([2.0, -1.0, 0.5])), torch.tensor([2.0, -1.0, 0.5]), atol=1e-5
    )


# -- modes ---------------------------------------------------------------------------------------
def resnet18() -> nn.Module:
    return randomize_batchnorm(torchvision.models.resnet18(weights=None)).eval()


X = torch.randn(1, 3, 64, 64)


def pruned_decisions(result: slimfx.CompileResult) -> list:
    return [d for d in result.report.passes[0].decisions if d.action == "pruned"]


def test_ratio_mode_prunes_each_group_by_the_ratio_and_reports_why() -> None:
    result = compile(resnet18(), X, "prune-channels:ratio=0.5,criterion=bn-scale")
    decisions = result.report.passes[0].decisions
    pruned = pruned_decisions(result)
    assert len(pruned) == 12 and all(d.details.channels_after * 2 == d.details.channels_before for d in pruned)
    assert all(d.macs_after < d.macs_before and d.details.macs_saved_alone > 0 for d in pruned)
    assert all(d.details.importance.removed_max <= d.details.importance.kept_min for d in pruned)
    (declined,) = [d for d in decisions if d.declined]
    assert declined.target == "fc" and "model output" in declined.reason
    assert result.module(X).shape == (1, 1000)


def test_global_mode_prunes_unevenly_with_a_floor() -> None:
    result = compile(resnet18(), X, "prune-channels:ratio=0.5,criterion=l1,global=true,min-channels=8")
    pruned = pruned_decisions(result)
    shares = {d.details.channels_after / d.details.channels_before for d in pruned}
    assert len(shares) > 1, "global ranking should not cut every group alike"
    assert all(d.details.channels_after >= 8 for d in pruned)
    before = sum(d.details.channels_before for d in pruned)
    after = sum(d.details.channels_after for d in pruned)
    assert after == pytest.approx(before / 2, rel=0.02)


def test_round_to_keeps_widths_multiples() -> None:
    result = compile(resnet18(), X, "prune-channels:ratio=0.3,round-to=16")
    assert all(d.details.channels_after % 16 == 0 for d in pruned_decisions(result))


def test_target_macs_is_met_from_the_cost_model() -> None:
    result = compile(resnet18(), X, "prune-channels:target-macs=0.5,criterion=l1")
    before, after = result.report.before.totals.macs, result.report.after.totals.macs
    assert 0.4 * before < after <= 0.5 * before
    assert not result.report.passes[0].warnings


def test_unreachable_target_gives_the_best_result_and_a_warning() -> None:
    result = compile(resnet18(), X, "prune-channels:target-macs=0.01,min-channels=32")
    (warning,) = result.report.passes[0].warnings
    assert "cannot be reached" in warning and "best reachable" in warning
    assert result.report.after.totals.macs < result.report.before.totals.macs
    assert result.module(X).shape == (1, 1000)


def test_exclude_leaves_matching_groups_alone() -> None:
    result = compile(resnet18(), X, "prune-channels:ratio=0.5,exclude=layer4.*,layer3.0.conv1")
    decisions = {d.target: d for d in result.report.passes[0].decisions}
    assert "excluded by pattern 'layer4.*'" in decisions["layer4.0.conv1"].reason
    assert "excluded by pattern 'layer3.0.conv1'" in decisions["layer3.0.conv1"].reason
    assert decisions["layer3.1.conv1"].action == "pruned"


def test_bn_scale_declines_groups_without_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    result = compile(model.eval(), torch.randn(1, 3, 8, 8), "prune-channels:criterion=bn-scale")
    reasons = [d.reason for d in result.report.passes[0].decisions if d.declined]
    assert any("no BatchNorm normalizes" in r and "criterion=l1" in r for r in reasons)


# -- ThiNet --------------------------------------------------------------------------------------
class Redundant(nn.Module):
    """Half of ``a``'s channels barely reach ``b``: big filters (high L1) but tiny weights in b."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.a.weight[::2] *= 10.0
            self.b.weight[:, ::2] *= 1e-3

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))


def calibration(n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(8, 3, 12, 12, generator=generator) for _ in range(n)]


def test_thinet_removes_channels_that_least_change_the_next_layer() -> None:
    model = Redundant().eval()
    x, test = torch.randn(2, 3, 12, 12), torch.randn(16, 3, 12, 12)
    thinet = compile(model, x, "prune-channels:ratio=0.5,criterion=thinet", calib_data=calibration())
    l1 = compile(model, x, "prune-channels:ratio=0.5,criterion=l1")
    inflated = model.a.weight.detach()[::2].abs().sum((1, 2, 3))
    assert float(thinet.module.get_submodule("a").weight.detach().abs().sum((1, 2, 3)).max()) < float(inflated.min())
    assert torch.allclose(l1.module.get_submodule("a").weight, model.a.weight[::2])  # L1 keeps the big ones
    assert output_error(thinet, model, test) < 0.5 * output_error(l1, model, test)


def output_error(result: slimfx.CompileResult, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(x)
        return float((result.module(x) - expected).norm() / expected.norm())


def test_thinet_refit_lowers_the_next_layers_error() -> None:
    errors = {}
    for criterion in ("thinet", "l1"):
        torch.manual_seed(1)
        model = nn.Sequential(conv_bn(3, 16), nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 12 * 12, 2))
        model = randomize_batchnorm(model).eval()
        calib = calibration()
        result = compile(model, calib[0][:2], f"prune-channels:ratio=0.5,criterion={criterion}", calib_data=calib)
        assert result.module.get_submodule("1").in_channels == 8
        assert "held-out calibration data" in result.report.fidelity.on  # ThiNet fitted the other batches
        errors[criterion] = result.report.passes[0].output_error
    assert errors["thinet"] < 0.8 * errors["l1"]


def test_thinet_without_calibration_data_is_a_clear_error_before_capture() -> None:
    with pytest.raises(DataError, match="'prune-channels:criterion=thinet' needs calibration data"):
        compile(Residual().eval(), torch.randn(1, 3, 8, 8), "prune-channels:criterion=thinet")


# -- options and order --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("prune-channels:ratio=1", r"invalid value 1.0 for option 'ratio': expected a number in \[0, 1\)"),
        ("prune-channels:ratio=-0.1", "option 'ratio'"),
        ("prune-channels:criterion=taylor", "choose one of: l1, bn-scale, thinet"),
        ("prune-channels:min-channels=0", "option 'min-channels'"),
        ("prune-channels:round-to=0", "option 'round-to'"),
        ("prune-channels:target-macs=1.5", "option 'target-macs'"),
        ("prune-channels:global=maybe", "expected true or false"),
    ],
)
def test_bad_options_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(PassSpecError, match=message):
        parse_pipeline(spec)


def test_global_option_round_trips_through_the_spec() -> None:
    (p,) = parse_pipeline("prune-channels:global=true,exclude=a.*,b")
    assert p.global_ and p.exclude == ("a.*", "b")
    assert p.spec() == "prune-channels:global=true,exclude=a.*,b"


def test_fold_bn_runs_after_pruning_and_not_before() -> None:
    result = compile(resnet18(), X, "prune-channels:ratio=0.3,criterion=bn-scale,fold-bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    prune, fold = result.report.passes
    assert fold.exact and fold.verified  # to 1e-4 of the pruned graph; its error vs the original is the pruning's
    assert fold.output_error == pytest.approx(prune.output_error, rel=1e-3)
    with pytest.raises(PassOrderError, match="'prune-channels' must run before 'fold-bn'"):
        compile(resnet18(), X, "fold-bn,prune-channels")


# -- the training helper -------------------------------------------------------------------------
def test_bn_sparsity_penalty_is_l1_on_gammas() -> None:
    model = nn.Sequential(conv_bn(3, 4), conv_bn(4, 2))
    gammas = [model[0][1].weight, model[1][1].weight]
    with torch.no_grad():
        gammas[0].copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    penalty = slimfx.train.bn_sparsity_penalty(model, 0.1)
    expected = 0.1 * sum(float(g.detach().abs().sum()) for g in gammas)
    assert float(penalty.detach()) == pytest.approx(expected)
    penalty.backward()
    assert torch.allclose(gammas[0].grad, 0.1 * torch.tensor([1.0, -1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        slimfx.train.bn_sparsity_penalty(nn.Linear(2, 2), 0.1)


def test_sparsity_training_drives_gammas_down() -> None:
    model = nn.Sequential(conv_bn(3, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))
    start = float(model[0][1].weight.detach().abs().sum())
    for _ in itertools.repeat(None, 30):
        loss = nn.functional.cross_entropy(model(x), y) + slimfx.train.bn_sparsity_penalty(model, 0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(model[0][1].weight.detach().abs().sum()) < start


class SplitThenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = conv_bn(3, 16), conv_bn(8, 8), conv_bn(8, 8), conv_bn(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.a(x).split(8, dim=1)
        y = self.d(self.b(left) + self.c(right))
        return self.head(y.mean((2, 3)))


def test_a_plan_that_would_break_the_graph_is_declined_not_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimfx.ir.channels import SplitSizes

    def wrong_sizes(self: SplitSizes, removed: torch.Tensor) -> list[int] | None:  # an injected analysis bug
        return [1, 1] if removed[torch.cat(self.part_units)].any() else None

    monkeypatch.setattr(SplitSizes, "argument_after", wrong_sizes)
    model, x = SplitThenHead().eval(), torch.randn(2, 3, 16, 16)
    result = compile(model, x, "prune-channels:ratio=0.5")
    record = result.report.passes[0]
    (split_group,) = [d for d in record.decisions if d.details.sources[0] == "a.0"]
    assert split_group.action == "declined" and "the pruned graph would not run" in split_group.reason
    assert "the trial run failed at node" in split_group.reason
    pruned = {d.details.sources for d in record.decisions if d.action == "pruned"}
    assert pruned == {("b.0", "c.0"), ("d.0",)}  # the groups that run are still pruned
    assert any("would not run" in w for w in record.warnings)
    assert result.module(x).shape == (2, 4)


# -- latency targets ------------------------------------------------------------------------------
class WideCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 32), conv_bn(32, 64), conv_bn(64, 64))
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_target_latency_is_met_by_the_prediction_and_reported() -> None:
    model, x = WideCnn().eval(), torch.randn(2, 3, 32, 32)
    result = compile(model, x, "prune-channels:target-latency=0.5")
    (record,) = result.report.passes
    summary = next(d for d in record.decisions if d.target == "(predicted latency)")
    assert "predicted on torch" in summary.reason and "target" in summary.reason
    fraction = float(summary.reason.split("(")[2].split(" of the original")[0])
    # met by the pruned graph's prediction, or (a net this small is mostly fixed costs) said to be out of reach
    assert fraction <= 0.5 + 1e-6 or any("cannot be reached" in w for w in record.warnings)
    assert fraction < 1.0
    pruned = [d for d in record.decisions if d.action == "pruned"]
    assert pruned and all("per predicted ms saved" in d.reason for d in pruned)
    assert result.report.after.totals.macs < result.report.before.totals.macs


def test_target_latency_in_milliseconds_and_bad_values() -> None:
    model, x = WideCnn().eval(), torch.randn(1, 3, 16, 16)
    result = compile(model, x, "prune-channels:target-latency=1000ms")  # already met: nothing to remove
    assert result.report.after.totals.macs == result.report.before.totals.macs
    for spec, message in [
        ("prune-channels:target-latency=2", "fraction of the original's predicted latency"),
        ("prune-channels:target-latency=fast", "fraction of the original's predicted latency"),
        ("prune-channels:target-latency=0.5,target-macs=0.5", "one target"),
        ("prune-channels:round-to=many", "expected int or auto"),
        ("prune-channels:runtime=openvino", "choose one of"),
    ]:
        with pytest.raises(PassSpecError, match=message):
            parse_pipeline(spec)
    assert parse_pipeline("prune-channels:round-to=auto")[0].round_to == "auto"
    assert parse_pipeline("prune-channels:round-to=8")[0].round_to == 8
