"""factorize-convs: exact at full rank, error falls as rank grows, structure, rank rules, options."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx import compile
from slimfx.errors import PassOrderError, PassSpecError
from slimfx.lowrank import decompose as lowrank
from slimfx.metrics import relative_error
from slimfx.passes.registry import parse_pipeline

torchvision = pytest.importorskip("torchvision")


def output_error(result: slimfx.CompileResult, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(x)
        return float((result.module(x) - expected).norm() / expected.norm())


class Conv2dNet(nn.Module):
    """A conv with stride, padding, dilation and bias between two others."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=(1, 1, 0), dilation=(2, 1, 1), bias=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3, 4)))


FULL_RANK = [
    ("spatial-svd", Conv2dNet, (2, 4, 13, 11), ["conv.v", "conv.h"]),
    ("tucker2", Conv2dNet, (2, 4, 13, 11), ["conv.reduce", "conv.core", "conv.restore"]),
    ("separable-3d", Conv3dNet, (2, 3, 7, 9, 9), ["conv.w", "conv.h", "conv.d"]),
    ("linear-svd", Conv2dNet, (2, 4, 13, 11), ["head.reduce", "head.restore"]),
]


@pytest.mark.parametrize(("method", "model_class", "shape", "parts"), FULL_RANK, ids=[m[0] for m in FULL_RANK])
def test_full_rank_is_exact(
    method: str, model_class: type[nn.Module], shape: tuple[int, ...], parts: list[str]
) -> None:
    model, x = model_class().eval(), torch.randn(shape)
    result = compile(model, x, f"factorize-convs:method={method},rank=100000")
    assert output_error(result, model, x) <= 1e-4
    names = dict(result.module.named_modules())
    assert all(p in names for p in parts), f"expected {parts} in the module tree"
    (decision,) = [d for d in result.report.passes[0].decisions if d.action == "factorized"]
    assert decision.error <= 1e-5 and decision.details.output_error <= 1e-4
    assert decision.details.ranks == decision.details.full_ranks
    assert result.report.passes[0].warnings, "a full rank costs more MACs: the report must warn"


@pytest.mark.parametrize(("method", "model_class", "shape", "parts"), FULL_RANK, ids=[m[0] for m in FULL_RANK])
def test_full_rank_ratio_is_claimed_exact_and_verified(
    method: str, model_class: type[nn.Module], shape: tuple[int, ...], parts: list[str]
) -> None:
    model, x = model_class().eval(), torch.randn(shape)
    record = compile(model, x, f"factorize-convs:method={method},rank-ratio=1").report.passes[0]
    assert record.exact and record.changed and record.output_error <= 1e-4  # checked by the pass manager
    assert not compile(model, x, "factorize-convs:method=cp,rank-ratio=1").report.passes[0].exact  # CP: no guarantee
    assert not compile(model, x, f"factorize-convs:method={method},rank-ratio=0.5").report.passes[0].exact


def test_cp_recovers_a_kernel_of_known_rank() -> None:
    model, x = Conv2dNet().eval(), torch.randn(2, 4, 13, 11)
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(n, 3, generator=generator) for n in (6, 4, 3, 5)]
    with torch.no_grad():
        model.conv.weight.copy_(lowrank.compose_cp(*factors))
    result = compile(model, x, "factorize-convs:method=cp,rank=3,iterations=500")
    (decision,) = [d for d in result.report.passes[0].decisions if d.action == "factorized"]
    assert decision.error <= 1e-3 and output_error(result, model, x) <= 1e-3
    kinds = [type(m).__name__ for n, m in result.module.named_modules() if n.startswith("conv.")]
    assert kinds == ["Conv2d"] * 4 and result.module.get_submodule("conv.dw_v").groups == 3


def test_cp_is_deterministic_for_a_seed() -> None:
    weight = torch.randn(8, 6, 3, 3)
    a, b = lowrank.cp_als(weight, 4, iterations=20, seed=7), lowrank.cp_als(weight, 4, iterations=20, seed=7)
    assert torch.equal(a.out_factor, b.out_factor) and a.fit_error == b.fit_error


def test_error_does_not_grow_with_rank() -> None:
    generator = torch.Generator().manual_seed(1)
    w2, w3, wl = (
        torch.randn(8, 6, 3, 3, generator=generator),
        torch.randn(5, 4, 3, 3, 3, generator=generator),
        torch.randn(9, 7, generator=generator),
    )
    spatial = [relative_error(w2, lowrank.compose_spatial(*lowrank.spatial_svd(w2, r))) for r in range(1, 19)]
    tucker = [relative_error(w2, lowrank.compose_tucker2(lowrank.tucker2(w2, min(r, 6), r))) for r in range(1, 9)]
    linear = [relative_error(wl, torch.mm(*reversed(lowrank.linear_svd(wl, r)))) for r in range(1, 8)]
    full_width = len(lowrank.separable_first_svd(w3)[1])
    separable = [
        relative_error(w3, lowrank.compose_separable_3d(lowrank.separable_3d(w3, r, 3 * r)))
        for r in range(1, full_width + 1)
    ]
    for errors in (spatial, tucker, linear, separable):
        assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors
        assert errors[-1] <= 1e-5


def test_energy_rank_keeps_the_energy_asked_for() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert lowrank.energy_rank(s, 0.5) == 1  # 16 of 22
    assert lowrank.energy_rank(s, 0.9) == 2  # 20 of 22
    assert lowrank.energy_rank(s, 1.0) == 4
    assert lowrank.tail_error(s, 2) == pytest.approx((2 / 22) ** 0.5)


def test_declines_what_it_cannot_or_should_not_factorize() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.Conv2d(16, 8, 1),
        nn.Conv2d(8, 8, 3, padding="same"),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 2),
    ).eval()
    result = compile(model, torch.randn(1, 3, 8, 8), "factorize-convs:method=spatial-svd")
    reasons = {d.target: d.reason for d in result.report.passes[0].decisions}
    assert "depthwise conv" in reasons["1"] and "grouped conv (groups=4)" in reasons["2"]
    assert "1x1 kernel" in reasons["3"] and "padding='same'" in reasons["4"]
    assert "would cost" in reasons["0"]  # 3 -> 16 channels: the split costs more than it saves
    assert "6" not in reasons  # a Linear is not a spatial-svd candidate


@pytest.mark.slow
def test_target_macs_spends_the_budget_from_the_cost_model() -> None:
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)
    result = compile(model, x, "factorize-convs:method=spatial-svd,target-macs=0.6")
    before, after = result.report.before.totals.macs, result.report.after.totals.macs
    assert 0.45 * before <= after <= 0.6 * before
    record = result.report.passes[0]
    factorized = [d for d in record.decisions if d.action == "factorized"]
    assert factorized and all(d.macs_after < d.macs_before for d in factorized)
    assert sum(d.macs_before - d.macs_after for d in factorized) == before - after  # predicted = counted
    assert any("not needed" in d.reason for d in record.decisions)


@pytest.mark.slow
def test_round_to_rounds_ranks_up() -> None:
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)
    result = compile(model, x, "factorize-convs:method=spatial-svd,rank-ratio=0.3,round-to=16")
    ranks = [d.details.ranks[0] for d in result.report.passes[0].decisions if d.action == "factorized"]
    assert ranks and all(r % 16 == 0 for r in ranks)


@pytest.mark.slow
def test_factorized_model_saves_and_folds(tmp_path) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    result = compile(model, x, "factorize-convs:method=tucker2,rank-ratio=0.5,fold-bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    result.save(tmp_path / "f.pt")
    loaded = slimfx.load_model(str(tmp_path / "f.pt"))
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.module(x), atol=1e-5)
    with pytest.raises(PassOrderError):
        compile(model, x, "factorize-convs,prune-channels")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("factorize-convs:method=svd", "choose one of: spatial-svd, tucker2, cp, separable-3d, linear-svd"),
        ("factorize-convs:energy=0", r"option 'energy': expected a share of singular-value energy in \(0, 1\]"),
        ("factorize-convs:energy=1.5", "option 'energy'"),
        ("factorize-convs:rank=0", r"option 'rank': expected an integer >= 1"),
        ("factorize-convs:rank-ratio=0", "option 'rank-ratio'"),
        ("factorize-convs:target-macs=1", "option 'target-macs'"),
        ("factorize-convs:rank=4,energy=0.9", "one rank rule, not energy and rank"),
        ("factorize-convs:round-to=0", "option 'round-to'"),
    ],
)
def test_bad_options_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(PassSpecError, match=message):
        parse_pipeline(spec)


# -- corpus: every 2-D method on six torchvision models, separable-3d on Conv3d models -------------
CORPUS_2D = ["resnet18", "resnet50", "vgg16", "inception_v3", "googlenet", "densenet121"]


@pytest.mark.corpus
@pytest.mark.parametrize("name", CORPUS_2D)
def test_corpus_factorizes_with_each_2d_method(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 96 if name == "inception_v3" else 64, 96 if name == "inception_v3" else 64)
    with torch.no_grad():
        shape = model(x).shape
    for spec in (
        "method=spatial-svd,rank-ratio=0.25",
        "method=tucker2,rank-ratio=0.25",
        "method=cp,rank-ratio=0.1,iterations=2",
    ):
        result = compile(model, x, f"factorize-convs:{spec}")
        record = result.report.passes[0]
        assert any(d.action == "factorized" for d in record.decisions), f"{name} {spec}: nothing factorized"
        assert result.report.after.totals.macs < result.report.before.totals.macs
        with torch.no_grad():
            assert result.module(x).shape == shape


@pytest.mark.corpus
def test_corpus_video_model_separable_3d() -> None:
    video = pytest.importorskip("torchvision.models.video")
    model, x = video.r3d_18(weights=None).eval(), torch.randn(1, 3, 8, 32, 32)
    result = compile(model, x, "factorize-convs:method=separable-3d,rank-ratio=0.5")
    factorized = [d for d in result.report.passes[0].decisions if d.action == "factorized"]
    assert len(factorized) >= 10
    with torch.no_grad():
        assert result.module(x).shape == (1, 400)


def test_runtime_option_keeps_only_factorizations_predicted_faster() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 3, padding=1)).eval()
    result = compile(model, torch.randn(1, 64, 32, 32), "factorize-convs:rank-ratio=0.25,runtime=torch")
    decisions = [d for d in result.report.passes[0].decisions]
    assert len(decisions) == 2
    for d in decisions:  # each kept one was predicted faster, each declined one not, and says both figures
        if d.action == "factorized":
            before, after = (float(v.split()[0]) for v in d.reason.split("predicted on torch: ")[1].split(" -> "))
            assert after < before
        else:
            assert "predicted no faster on torch" in d.reason
            found = re.search(r"([\d.]+) ms factorized vs ([\d.]+) ms as it is", d.reason)
            assert found is not None and float(found.group(1)) >= float(found.group(2))
    with pytest.raises(PassSpecError, match="choose one of"):
        parse_pipeline("factorize-convs:runtime=openvino")
