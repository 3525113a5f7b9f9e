"""Fake-quantized layers and attention written out: what they compute against float."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx.metrics import sqnr_db
from slimfx.quant.layers import QuantizedLayer, activation_qparams


def test_quantized_layer_stays_within_one_step_of_float() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.rand(2, 4, 8, 8)
    scale, zero_point = activation_qparams(1.0, non_negative=True)
    layer = QuantizedLayer(conv)
    assert torch.equal(layer(x), conv(x))  # unfrozen: float, for calibration
    layer.freeze(scale, zero_point)
    assert sqnr_db(conv(x), layer(x)) > 30
    weight = layer.quantized_weight()
    steps = weight / layer.weight_scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 128


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_parts_compute_what_multihead_attention_computes(batch_first: bool) -> None:
    from slimfx.quant.attention import AttentionParts

    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    with torch.no_grad():
        out, weights = mha(x, x, x)
        parts_out, parts_weights = AttentionParts(mha)(x, x, x)
    assert torch.allclose(out, parts_out, atol=1e-5) and torch.allclose(weights, parts_weights, atol=1e-6)


def test_quantized_layers_read_their_weights_at_the_stored_width() -> None:
    from slimfx import compile

    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    before = compile(net, x, "fold-bn").report.after
    for spec, bits in (("quantize", 8), ("quantize:weights=int4", 4), ("quantize:bf16=*", 16)):
        after = compile(net, x, spec, calib_data=[x]).report.after
        weights = sum(m.weight.numel() for m in net if isinstance(m, nn.Conv2d))
        saved = weights * 4 - weights * bits // 8
        layer_bytes = lambda report: sum(r.cost.bytes_read for r in report.nodes if r.cost.macs)  # noqa: E731
        assert layer_bytes(before) - layer_bytes(after) == saved, spec
