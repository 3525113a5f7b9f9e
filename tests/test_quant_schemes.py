"""Low-bit weight schemes, Huffman sizes and the width allocation of mixed precision (pure functions)."""

from __future__ import annotations

import torch


def test_ternary_weights_follow_twn() -> None:
    from slimfx.quant.schemes import ternary

    weight = torch.randn(4, 6, 3, 3)
    q = ternary(weight)
    for row, values in zip(weight.reshape(4, -1), q.weight.reshape(4, -1)):
        delta = 0.7 * row.abs().mean()
        alpha = row.abs()[row.abs() > delta].mean()
        assert set(torch.unique(values).tolist()) <= {-float(alpha), 0.0, float(alpha)} or torch.allclose(
            torch.unique(values.abs()), torch.tensor([0.0, float(alpha)]), atol=1e-6
        )
        assert torch.equal(values != 0, row.abs() > delta)
    assert set(q.integers.unique().tolist()) <= {-1, 0, 1} and q.bits == 2


def test_binary_weights_are_plus_minus_the_channel_mean() -> None:
    from slimfx.quant.schemes import binary

    weight = torch.randn(3, 5)
    q = binary(weight)
    alpha = weight.abs().mean(1, keepdim=True)
    assert torch.allclose(q.weight.abs(), alpha.expand_as(weight)) and torch.equal(q.weight.sign(), weight.sign())


def test_low_bit_weights_pass_gradients_straight_through() -> None:
    from slimfx.quant.schemes import SCHEME_BITS, quantize_weight

    for scheme in SCHEME_BITS:
        weight = torch.randn(4, 8, 3, 3, requires_grad=True)
        quantize_weight(weight, scheme, block_size=4).weight.sum().backward()
        assert torch.equal(weight.grad, torch.ones_like(weight)), scheme


def test_huffman_code_lengths_are_optimal_on_a_textbook_case() -> None:
    from slimfx.quant.size import huffman_bits, huffman_code_lengths

    lengths = huffman_code_lengths({0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5})
    assert lengths == {0: 1, 1: 3, 2: 3, 3: 3, 4: 4, 5: 4}
    assert huffman_bits(torch.tensor([0] * 90 + [1] * 10)) == 100


def test_allocate_widths_spends_the_budget_on_the_least_sensitive_layers() -> None:
    from slimfx.quant.mixed import allocate_widths

    sensitivity = {"a": {8: 0.0, 4: 0.01, 2: 0.5}, "b": {8: 0.0, 4: 0.2, 2: 0.9}}
    cost = {"a": {8: 8.0, 4: 4.0, 2: 2.0}, "b": {8: 8.0, 4: 4.0, 2: 2.0}}
    assert allocate_widths(sensitivity, cost, 12.0) == ({"a": 4, "b": 8}, True)
    assert allocate_widths(sensitivity, cost, 8.0) == ({"a": 4, "b": 4}, True)
    assert allocate_widths(sensitivity, cost, 1.0) == ({"a": 2, "b": 2}, False)
