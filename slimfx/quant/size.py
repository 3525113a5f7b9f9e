"""Deep Compression's size accounting: fp32, at the chosen bit widths, and Huffman-coded."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from slimfx.details import Details


def huffman_code_lengths(frequencies: dict[int, int]) -> dict[int, int]:
    """Code length (bits) of each symbol in an optimal prefix code for these frequencies."""
    symbols = [s for s, f in frequencies.items() if f > 0]
    if len(symbols) <= 1:
        return {s: 1 for s in symbols}
    order = itertools.count()
    heap = [(frequencies[s], next(order), [s]) for s in symbols]
    heapq.heapify(heap)
    lengths = dict.fromkeys(symbols, 0)
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, next(order), a + b))
    return lengths


def huffman_bits(symbols: torch.Tensor) -> int:
    """Bits to store ``symbols`` Huffman-coded with their own frequencies (the table not counted)."""
    values, counts = torch.unique(symbols.reshape(-1), return_counts=True)
    frequencies = dict(zip(values.tolist(), counts.tolist()))
    lengths = huffman_code_lengths(frequencies)
    return sum(frequencies[s] * lengths[s] for s in frequencies)


@dataclass(frozen=True)
class WeightSize(Details):
    """Bytes of weights at fp32, at their stored width and Huffman-coded, and the share stored as 0."""

    fp32_bytes: float
    quantized_bytes: float
    huffman_bytes: float
    zero_share: float

    def __add__(self, other: WeightSize) -> WeightSize:
        weights = self.fp32_bytes + other.fp32_bytes
        zeros = (self.zero_share * self.fp32_bytes + other.zero_share * other.fp32_bytes) / weights if weights else 0.0
        return WeightSize(
            weights, self.quantized_bytes + other.quantized_bytes, self.huffman_bytes + other.huffman_bytes, zeros
        )


def layer_size(integers: torch.Tensor, bits: int, scales: int, extra_params: int = 0) -> WeightSize:
    """Bytes of one layer's weights: fp32, at ``bits`` per weight, and Huffman-coded.

    ``scales`` float32 scales and ``extra_params`` float32 values (bias) are added to the
    quantized sizes; ``zero_share`` is the share of weights stored as exactly 0.
    """
    count = integers.numel()
    overhead = 4 * (scales + extra_params)
    return WeightSize(
        4 * (count + extra_params),
        count * bits / 8 + overhead,
        huffman_bits(integers) / 8 + overhead,
        float((integers == 0).float().mean()) if count else 0.0,
    )
