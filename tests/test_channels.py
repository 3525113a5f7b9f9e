"""Channel coupling analysis: which channels share a fate, index maps, and failing closed."""

from __future__ import annotations

import torch
import torch.nn as nn
from nets import Concat, GhostSlice, Grouped, PerChannelNorms, Residual, Shuffle, Split, SqueezeExcite, conv_bn

from slimfx import compile
from slimfx.ir.capture import capture
from slimfx.ir.channels import ChannelAnalysis, analyze_channels


def analyze(model: nn.Module, shape: tuple[int, ...] = (2, 3, 16, 16)) -> ChannelAnalysis:
    return analyze_channels(capture(model.eval(), (torch.randn(shape),)))


def group_of(analysis: ChannelAnalysis, source: str):
    (group,) = [g for g in analysis.groups if source in g.sources]
    return group


def test_residual_add_couples_every_addend() -> None:
    analysis = analyze(Residual())
    group = group_of(analysis, "stem.0")
    assert group.sources == ("stem.0", "block.1") and len(group.units) == 16 and not group.blocked
    stem, last = analysis.layers["stem_0"], analysis.layers["block_1"]
    assert torch.equal(stem.out_units, last.out_units)  # channel i of both is one unit
    assert len(group_of(analysis, "block.0.0").units) == 8  # the bottleneck is its own group


def test_concat_maps_each_part_to_its_offset() -> None:
    analysis = analyze(Concat())
    reader = analysis.layers["c_0"]
    a, b = analysis.layers["a_0"], analysis.layers["b_0"]
    assert torch.equal(reader.in_units, torch.cat([a.out_units, b.out_units]))
    assert group_of(analysis, "a.0") is not group_of(analysis, "b.0")  # a concat does not couple


def test_chunk_couples_its_halves_position_by_position() -> None:
    analysis = analyze(Split())
    group = group_of(analysis, "a.0")
    assert len(group.units) == 8  # 16 channels, pairs (i, i + 8) share a fate
    units = analysis.layers["a_0"].out_units
    assert torch.equal(units[:8], units[8:])


def test_channel_shuffle_couples_the_shuffled_pairs() -> None:
    analysis = analyze(Shuffle())
    group = group_of(analysis, "a.0")
    assert set(group.sources) == {"a.0", "b.0"} and len(group.units) == 8
    a, b, reader = analysis.layers["a_0"], analysis.layers["b_0"], analysis.layers["c_0"]
    assert torch.equal(a.out_units, b.out_units)
    # after the shuffle, channel 2j comes from a's j and 2j+1 from b's j
    assert torch.equal(reader.in_units[0::2], a.out_units) and torch.equal(reader.in_units[1::2], b.out_units)


def test_grouped_conv_imposes_equal_removal_per_group() -> None:
    analysis = analyze(Grouped())
    (partition,) = group_of(analysis, "a.0").partitions
    assert partition.shape == (4, 4)
    (out_partition,) = group_of(analysis, "g.0").partitions
    assert out_partition.shape == (4, 6)


def test_squeeze_excite_multiplication_couples_the_scale_with_the_features() -> None:
    analysis = analyze(SqueezeExcite())
    group = group_of(analysis, "a.0")
    assert set(group.sources) == {"a.0", "expand"} and len(group.units) == 16
    assert not group_of(analysis, "squeeze").blocked


def test_flatten_maps_each_channel_to_its_features() -> None:
    class FlattenLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = conv_bn(3, 4), nn.Linear(4 * 2 * 2, 5)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.a(x), 2), 1))

    analysis = analyze(FlattenLinear())
    a_units, fc_in = analysis.layers["a_0"].out_units, analysis.layers["fc"].in_units
    assert torch.equal(fc_in, a_units.repeat_interleave(4))


def test_model_output_is_never_pruned() -> None:
    analysis = analyze(Concat())
    (reason,) = group_of(analysis, "head").blocked
    assert "model output" in reason


def test_unknown_op_blocks_every_group_that_reaches_it() -> None:
    class Cumsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = conv_bn(3, 8), conv_bn(8, 8)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1)).mean((2, 3))

    analysis = analyze(Cumsum())
    (reason,) = group_of(analysis, "a.0").blocked
    assert "node 'cumsum' (torch.cumsum)" in reason and "unknown" in reason


def test_layer_norm_and_fixed_size_reshape_fail_closed_with_reasons() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.norm = conv_bn(3, 8), conv_bn(3, 8), nn.LayerNorm(8)

        def forward(self, x):
            y = self.norm(self.a(x).mean((2, 3)))
            z = self.b(x).reshape(x.shape[0], 8, -1).mean(2)
            return y + z.sum(1, keepdim=True)

    analysis = analyze(Mixed())
    assert any("LayerNorm" in r and "normalizes across channels" in r for r in group_of(analysis, "a.0").blocked)
    assert any("fixed size 8" in r for r in group_of(analysis, "b.0").blocked)


def test_module_called_twice_is_not_sliced() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.shared = conv_bn(3, 8), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.shared(self.shared(self.a(x))).mean((2, 3))

    analysis = analyze(Shared())
    assert any("called 2 times" in r for r in group_of(analysis, "a.0").blocked)


def test_depthwise_conv_keeps_channel_identity() -> None:
    class Depthwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.dw, self.b = conv_bn(3, 8), conv_bn(8, 8, groups=8), conv_bn(8, 4)

        def forward(self, x):
            return self.b(self.dw(self.a(x))).mean((2, 3))

    analysis = analyze(Depthwise())
    dw = analysis.layers["dw_0"]
    assert dw.kind == "depthwise" and torch.equal(dw.in_units, analysis.layers["a_0"].out_units)
    assert {"dw_0", "dw_1", "b_0"} <= set(group_of(analysis, "a.0").members)


class FixedSizeSplit(nn.Module):
    """``x.split(8, dim=1)``: parts of 8 channels, however many there are (CSPNet, Res2Net)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 16), conv_bn(8, 8), conv_bn(8, 8)

    def forward(self, x):
        left, right = self.a(x).split(8, dim=1)
        return self.b(left) + self.c(right)


def test_split_into_fixed_sizes_is_followed_and_its_sizes_rewritten() -> None:
    analysis = analyze(FixedSizeSplit())
    assert not group_of(analysis, "a.0").blocked
    (split,) = analysis.literals
    assert [len(units) for units in split.part_units] == [8, 8]
    removed = torch.zeros(analysis.num_units, dtype=torch.bool)
    assert split.argument_after(removed) is None  # nothing removed: the literal stays
    removed[split.part_units[0][:3]] = True
    assert split.argument_after(removed) == [5, 8]


def test_pruned_split_sizes_are_rewritten_and_the_model_runs() -> None:
    model, x = FixedSizeSplit().eval(), torch.randn(2, 3, 16, 16)
    result = compile(model, x, "prune-channels:ratio=0.5")
    (split,) = [n for n in result.graph.nodes() if n.target == "split"]
    assert split.args[1] == [4, 4] and result.module(x).shape == (2, 8, 16, 16)
    assert result.report.passes[0].changed


class DynamicSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 16), conv_bn(8, 8)

    def forward(self, x):
        left, _ = self.a(x).split(x.shape[1] + 5, dim=1)  # 8, but computed from a shape at run time
        return self.b(left)


def test_split_by_sizes_computed_at_run_time_blocks_its_group() -> None:
    (reason,) = [r for r in group_of(analyze(DynamicSplit()), "a.0").blocked if "split" in r]
    assert "sizes computed at run time" in reason


def test_a_literal_channel_slice_is_followed_and_its_bounds_rewritten() -> None:
    analysis = analyze(GhostSlice())
    assert not group_of(analysis, "primary.0").blocked
    (cut,) = analysis.literals
    assert cut.index[cut.entry] == slice(None, 8) and len(cut.units) == 12
    removed = torch.zeros(analysis.num_units, dtype=torch.bool)
    removed[cut.units[[0, 9]]] = True  # channels 0 and 3 go, from both halves (the depthwise copies them)
    assert cut.argument_after(removed) == (slice(None), slice(0, 5))  # of the first 8, 0, 3 and 6 went


class StridedSlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(4, 4)

    def forward(self, x):
        return self.b(self.a(x)[:, ::2])


def test_a_strided_channel_slice_blocks_its_group() -> None:
    (reason,) = [r for r in group_of(analyze(StridedSlice()), "a.0").blocked if "indexing" in r]
    assert "only a plain slice is followed" in reason


def test_per_channel_norms_keep_channels_and_are_sliced() -> None:
    analysis = analyze(PerChannelNorms())
    for source in ("a.0", "b.0", "c.0"):
        assert not group_of(analysis, source).blocked
    kinds = {layer.target: layer.kind for layer in analysis.layers.values()}
    assert kinds["a.1"] == kinds["b.1"] == kinds["c.2"] == "batchnorm"  # InstanceNorms, GroupNorm(8, 8)


class CrossChannelGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.a(x))


def test_group_norm_over_several_channels_blocks_its_group() -> None:
    (reason,) = group_of(analyze(CrossChannelGroupNorm()), "a.0").blocked
    assert "normalizes across channels" in reason


class NegativeSlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 10), conv_bn(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.b(self.a(x)[:, :-2]).mean((2, 3)))


def test_a_slice_with_a_negative_bound_is_rewritten_from_the_front() -> None:
    analysis = analyze(NegativeSlice())
    (cut,) = analysis.literals
    removed = torch.zeros(analysis.num_units, dtype=torch.bool)
    removed[cut.units[9]] = True  # a channel the slice drops anyway: :-2 would now keep one too few
    assert cut.argument_after(removed) == (slice(None), slice(0, 8))
    removed[:] = False
    assert cut.argument_after(removed) is None
