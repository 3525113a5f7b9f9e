"""Weight quantization schemes as pure functions: ``(weight) -> (dequantized weight, integers, bits)``.

- ``int8`` / ``int4``: per-output-channel symmetric integers, scale = max|w| / qmax.
- ``ternary`` (TWN, Li & Liu 2016): per channel, threshold 0.7 x mean|W|; scale a = mean of the
  |W| above it; values in {-a, 0, +a}.
- ``binary`` (BNN / XNOR-style): sign(W) x per-channel mean|W|.
- ``block`` (DSConv-style): integer kernels with one float scale per block of ``block_size``
  input channels of each output channel.

Every function returns float weights that carry a straight-through gradient (the rounding is
invisible to backward), so the same layers train in QAT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from slimfx.errors import PassSpecError


class QuantizedWeight(NamedTuple):
    weight: torch.Tensor  # dequantized, with a straight-through gradient
    integers: torch.Tensor  # the stored symbols (int64), for size and entropy coding
    bits: int  # storage bits per symbol
    scale: torch.Tensor | None = None  # per output channel, when weight = integers x scale (not block)


def _straight_through(weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return weight + (quantized - weight).detach()


def _per_channel(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def symmetric(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    qmax = 2 ** (bits - 1) - 1
    flat = _per_channel(weight)
    scale = (flat.detach().abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)
    integers = torch.clamp(torch.round(flat.detach() / scale), -qmax - 1, qmax)
    return QuantizedWeight(
        _straight_through(weight, (integers * scale).reshape(weight.shape)), integers.long(), bits, scale.reshape(-1)
    )


def ternary(weight: torch.Tensor) -> QuantizedWeight:
    flat = _per_channel(weight).detach()
    delta = 0.7 * flat.abs().mean(1, keepdim=True)
    mask = flat.abs() > delta
    alpha = (flat.abs() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
    integers = torch.sign(flat) * mask
    return QuantizedWeight(
        _straight_through(weight, (integers * alpha).reshape(weight.shape)),
        integers.long(),
        2,
        alpha.reshape(-1).clamp_min(1e-12),
    )


def binary(weight: torch.Tensor) -> QuantizedWeight:
    flat = _per_channel(weight).detach()
    alpha = flat.abs().mean(1, keepdim=True)
    integers = torch.where(flat >= 0, 1.0, -1.0)
    return QuantizedWeight(
        _straight_through(weight, (integers * alpha).reshape(weight.shape)),
        integers.long(),
        1,
        alpha.reshape(-1).clamp_min(1e-12),
    )


def block(weight: torch.Tensor, block_size: int, bits: int = 8) -> QuantizedWeight:
    """One scale per (output channel, block of ``block_size`` input channels)."""
    qmax = 2 ** (bits - 1) - 1
    cout, cin, *kernel = (int(d) for d in weight.shape)  # plain ints: fixed shapes when exported
    blocks = -(-cin // block_size)
    padded = weight.detach()
    if blocks * block_size > cin:  # pad the input channels to whole blocks (concatenation exports to ONNX)
        padded = torch.cat([padded, torch.zeros(cout, blocks * block_size - cin, *kernel, dtype=weight.dtype)], 1)
    grouped = padded.reshape(cout, blocks, -1)
    scale = (grouped.abs().amax(2, keepdim=True) / qmax).clamp_min(1e-12)
    integers = torch.clamp(torch.round(grouped / scale), -qmax - 1, qmax)
    dequantized = (integers * scale).reshape(padded.shape)[:, :cin]
    return QuantizedWeight(
        _straight_through(weight, dequantized),
        integers.reshape(cout, -1)[:, : cin * (grouped.shape[2] // block_size)].long(),
        bits,
    )


@dataclass(frozen=True)
class WeightScheme:
    """A way to store weights: its bits per weight, whether it has one scale per output
    channel (an int8 grid per channel), and the function that quantizes."""

    name: str
    bits: int
    per_channel: bool
    quantize: Callable[[torch.Tensor, int], QuantizedWeight]  # (weight, block size)


SCHEMES: dict[str, WeightScheme] = {
    s.name: s
    for s in (
        WeightScheme("int8", 8, True, lambda w, _: symmetric(w, 8)),
        WeightScheme("int4", 4, True, lambda w, _: symmetric(w, 4)),
        WeightScheme("int2", 2, True, lambda w, _: symmetric(w, 2)),
        WeightScheme("ternary", 2, True, lambda w, _: ternary(w)),
        WeightScheme("binary", 1, True, lambda w, _: binary(w)),
        WeightScheme("block", 8, False, block),
    )
}
SCHEME_BITS = {name: scheme.bits for name, scheme in SCHEMES.items()}


def quantize_weight(weight: torch.Tensor, scheme: str, block_size: int = 16) -> QuantizedWeight:
    """``weight`` stored by ``scheme`` (one of ``SCHEMES``)."""
    if scheme not in SCHEMES:
        raise PassSpecError(f"unknown weight scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme].quantize(weight, block_size)


def binarize_activation(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in {-1, +1} with a straight-through gradient (BNN activations)."""
    return _straight_through(x, torch.where(x >= 0, 1.0, -1.0).to(x.dtype))
