"""Compile to a target: parsing, the allocator against brute force, plans, accuracy control, errors."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from digits import calibration, split, trained_cnn, write_model_file

import slimfx
from slimfx import plan_target
from slimfx.cli import main
from slimfx.cost_model.planner import Item, Option, allocate
from slimfx.cost_model.target import Target, parse_target
from slimfx.errors import DataError, InvalidArgumentError
from slimfx.passes.prune_channels import PrunableGroup
from slimfx.target.candidates import Candidate, GroupCandidates, offered_widths
from slimfx.target.plan import given_back, make_plan


# -- targets -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("latency=0.5", Target("latency", fraction=0.5)),
        ("latency=8ms", Target("latency", absolute=8.0)),
        ("macs=0.3", Target("macs", fraction=0.3)),
        ("size=2MB", Target("size", absolute=2e6)),
        ("size=0.25", Target("size", fraction=0.25)),
        (" Size=500kb ", Target("size", absolute=5e5)),
    ],
)
def test_targets_parse(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("speed=2", "expected latency=F"),
        ("latency", "expected latency=F"),
        ("latency=1.5", "must be in (0, 1]"),
        ("macs=8ms", "macs does not take 'ms'"),
        ("latency=fast", "is not a number"),
        ("size=0MB", "size does not take 'mb'"),
    ],
)
def test_bad_targets_name_the_forms(text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_target(text)


def test_a_budget_is_a_fraction_of_the_original_or_absolute() -> None:
    assert parse_target("latency=0.25").budget(8.0) == 2.0
    assert parse_target("latency=3ms").budget(8.0) == 3.0


# -- the allocator against brute force ---------------------------------------------------------
def _convex_item(name: str, rng: random.Random, options: int) -> Item:
    """Options that save less and less for more and more penalty (a convex trade)."""
    cost, penalty, made = 10.0, 0.0, [Option(10.0, 0.0)]
    price = rng.uniform(0.1, 1.0)
    for _ in range(options - 1):
        saved = rng.uniform(0.5, 2.0)
        price *= rng.uniform(1.1, 2.0)
        cost, penalty = cost - saved, penalty + saved * price
        made.append(Option(cost, penalty))
    return Item(name, tuple(made))


def _brute_force(items: list[Item], budget: float) -> float:
    best = float("inf")
    for pick in itertools.product(*(range(len(i.options)) for i in items)):
        cost = sum(i.options[k].cost for i, k in zip(items, pick))
        if cost <= budget + 1e-9:
            best = min(best, sum(i.options[k].penalty for i, k in zip(items, pick)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_meets_the_budget_close_to_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    items = [_convex_item(f"layer{i}", rng, 4) for i in range(4)]
    full = sum(i.options[0].cost for i in items)
    least = sum(i.options[-1].cost for i in items)
    budget = rng.uniform(least, full)
    allocation = allocate(items, budget)
    penalty = sum(i.options[allocation.chosen[i.name]].penalty for i in items)
    assert allocation.met and allocation.total <= budget + 1e-9
    optimum = _brute_force(items, budget)
    # greedy on a convex trade is optimal up to the last move it takes: within one option's penalty step
    steps = [b.penalty - a.penalty for i in items for a, b in zip(i.options, i.options[1:])]
    assert optimum <= penalty <= optimum + max(steps)


def test_an_unreachable_budget_ends_every_item_at_its_cheapest_and_says_so() -> None:
    items = [Item("a", (Option(5, 0), Option(3, 1))), Item("b", (Option(5, 0), Option(4, 1)))]
    allocation = allocate(items, 2)
    assert not allocation.met and dict(allocation.chosen) == {"a": 1, "b": 1} and allocation.total == 7


# -- plans -------------------------------------------------------------------------------------
def test_widths_follow_the_runtime_step_and_stay_narrower() -> None:
    assert offered_widths(64, 8) == [56, 48, 40, 32, 24, 16]
    assert offered_widths(16, 16) == []
    assert offered_widths(10, 1) == [9, 8, 6, 5, 4, 2]


def _table() -> list[GroupCandidates]:
    def group(name: str, channels: int, savings: list[float], sensitivities: list[float]) -> GroupCandidates:
        options = [Candidate(name, channels, channels, 0.0, 0.0)]
        options += [
            Candidate(name, channels - 8 * (k + 1), channels, s, p)
            for k, (s, p) in enumerate(zip(savings, sensitivities))
        ]
        return GroupCandidates(PrunableGroup(name, name, channels), tuple(options))

    return [group("a", 32, [2.0, 4.0, 5.0], [0.1, 0.5, 2.0]), group("b", 32, [1.0, 3.0, 6.0], [0.01, 0.3, 3.0])]


def _additive(table: list[GroupCandidates], base: float):
    saved = {(c.source, c.width): c.saved for g in table for c in g.options}
    return lambda widths: base - sum(saved[(s, w)] for s, w in widths.items())


def test_a_plans_predicted_total_is_the_sum_of_its_choices() -> None:
    table = _table()
    plan = make_plan(table, parse_target("macs=0.6"), "torch", False, 20.0, 20.0, 12.0, _additive(table, 20.0))
    assert plan.met and plan.predicted <= 12.0
    assert plan.predicted == pytest.approx(20.0 - sum(c.chosen.saved for c in plan.choices))
    assert plan.sensitivity == pytest.approx(sum(c.chosen.sensitivity for c in plan.choices))
    assert set(plan.keep) == {f"{c.chosen.source}@{c.chosen.width}" for c in plan.choices if c.pruned}


def test_giving_back_returns_the_worst_sensitivity_per_unit_saved_first() -> None:
    table = _table()
    plan = make_plan(table, parse_target("macs=0.45"), "torch", False, 20.0, 20.0, 9.0, _additive(table, 20.0))
    prices = sorted(((c.price, c.chosen.source) for c in plan.choices if c.pruned), reverse=True)
    smaller, returned = given_back(plan, 1, _additive(table, 20.0))
    assert [c.chosen.source for c in returned] == [prices[0][1]]
    assert not next(c for c in smaller.choices if c.chosen.source == prices[0][1]).pruned
    assert smaller.predicted > plan.predicted


# -- end to end on the trained digits CNN ------------------------------------------------------
@pytest.fixture(scope="module")
def digits_eval() -> list:
    x, y = split()["test"]
    return list(zip(x.split(100), y.split(100)))


def test_a_macs_target_builds_a_model_with_the_plans_counted_macs(digits_eval: list) -> None:
    x = split()["test"][0][:1]
    result = slimfx.compile(trained_cnn(), x, target="macs=0.5", calib_data=calibration(), eval_data=digits_eval)
    target = result.report.target
    assert target is not None and target.plan.met
    assert target.measured == target.plan.predicted == result.report.after.totals.macs
    assert target.measured <= 0.5 * result.report.before.totals.macs
    assert [r.spec.split(":")[0] for r in result.report.passes] == ["prune-channels", "fold-bn"]


def test_accuracy_control_gives_back_until_the_drop_holds(digits_eval: list) -> None:
    x = split()["test"][0][:1]
    result = slimfx.compile(
        trained_cnn(), x, target="macs=0.5", calib_data=calibration(), eval_data=digits_eval, max_drop=1.0
    )
    target = result.report.target
    assert target.give_backs and all(g.drop > 1.0 for g in target.give_backs)
    assert target.drop <= 1.0
    fidelity = result.report.fidelity
    assert target.drop == pytest.approx(100 * (fidelity.original_accuracy - fidelity.accuracy))
    assert any("given back to keep the loss within max-drop 1" in w for w in result.report.warnings())


def test_an_unreachable_target_builds_the_best_plan_and_warns(digits_eval: list) -> None:
    x = split()["test"][0][:1]
    result = slimfx.compile(trained_cnn(), x, target="macs=0.01", calib_data=calibration(), eval_data=digits_eval)
    target = result.report.target
    assert not target.plan.met and target.measured > target.goal
    assert any("cannot be reached" in w for w in result.report.warnings())


def test_plan_only_builds_nothing_and_lists_the_front() -> None:
    x = split()["test"][0][:1]
    plan = plan_target(trained_cnn(), x, "macs=0.5", calib_data=calibration())
    assert plan.met and len(plan.front) == 10
    assert [p.budget for p in plan.front] == sorted((p.budget for p in plan.front), reverse=True)


# -- bad input, before any work ----------------------------------------------------------------
@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"target": "speed=2"}, InvalidArgumentError, "expected latency=F"),
        ({"target": "macs=0.5", "calib_data": None}, DataError, "needs calibration data"),
        ({"max_drop": 1.0}, InvalidArgumentError, "max_drop bounds a compile to a target"),
        ({"target": "latency=0.5"}, InvalidArgumentError, "needs one runtime to aim at"),
        ({"target": "latency=0.5", "runtime": "openvino"}, InvalidArgumentError, "has no latency model"),
        ({"target": "latency=0.5", "runtime": "auto"}, InvalidArgumentError, "not auto"),
        ({"target": "macs=0.5", "passes": "fold-bn"}, InvalidArgumentError, "not both"),
        ({"target": "macs=0.5", "max_drop": -1.0}, InvalidArgumentError, ">= 0"),
    ],
)
def test_bad_target_requests_fail_before_any_work(options: dict, error: type, message: str) -> None:
    class Untraceable(torch.nn.Module):  # capture would fail: the error must come first
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    kwargs = {"calib_data": [torch.randn(2, 4)], **options}
    with pytest.raises(error, match=message):
        slimfx.compile(Untraceable(), torch.randn(2, 4), **kwargs)


def test_cli_plan_only_prints_the_plan_and_writes_nothing(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_model_file(tmp_path)
    torch.save(calibration(), tmp_path / "calib.pt")
    argv = ["compile", model, "--input-shape", "1,1,8,8", "--target", "macs=0.5", "--calib", str(tmp_path / "calib.pt")]
    assert main([*argv, "--plan-only", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["met"] and plan["predicted"] <= plan["budget"] and len(plan["front"]) == 10
    assert main(["compile", model, "--input-shape", "1,1,8,8", "--plan-only"]) == 2
    assert "--plan-only prints the plan for a --target" in capsys.readouterr().err


def test_keep_names_only_groups_that_can_be_pruned_at_widths_they_have() -> None:
    from slimfx.errors import PassError, PassSpecError

    x = split()["test"][0][:1]
    with pytest.raises(PassSpecError, match="SOURCE@WIDTH"):
        slimfx.compile(trained_cnn(), x, "prune-channels:keep=block1.0")
    with pytest.raises(PassError, match=r"head: unprunable: model output"):
        slimfx.compile(trained_cnn(), x, "prune-channels:keep=head@5")
    with pytest.raises(PassError, match="the group has 16 channels"):
        slimfx.compile(trained_cnn(), x, "prune-channels:keep=block1.0@20")
    result = slimfx.compile(trained_cnn(), x, "prune-channels:keep=block1.0@8,block3.0@40")
    kept = {d.target: d.details.channels_after for d in result.report.passes[0].decisions if d.details is not None}
    assert kept["block1.0"] == 8 and kept["block3.0"] == 40 and kept["block2.0"] == 32
