"""Deep Compression's size accounting: fp32, at the chosen bit widths, and Huffman-coded."""
from __future__ import annotations

import heapq
import itertools

import torch


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


def layer_size(integers: torch.Tensor, bits: int, scales: int, extra_params: int = 0) -> dict[str, float]:
    """Bytes of one layer's weights: fp32, at ``bits`` per weight, and Huffman-coded.

    ``scales`` float32 scales and ``extra_params`` float32 values (bias) are added to the
    quantized sizes; ``zero_share`` is the share of weights stored as exactly 0.
    """
    count = integers.numel()
    overhead = 4 * (scales + extra_params)
    return {
        "fp32_bytes": 4 * (count + extra_params),
        "quantized_bytes": count * bits / 8 + overhead,
        "huffman_bytes": huffman_bits(integers) / 8 + overhead,
        "zero_share": float((integers == 0).float().mean()) if count else 0.0,
    }
