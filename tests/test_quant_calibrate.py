"""Calibration: |x| histograms streamed over batches and the threshold rules, on known distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimfx.errors import NonFiniteError
from slimfx.quant.calibrate import (
    AbsHistogram,
    entropy_threshold,
    minmax_threshold,
    mse_threshold,
    percentile_threshold,
)


def laplace_with_outliers() -> torch.Tensor:
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    x[:5] = torch.tensor([40.0, -35.0, 38.0, 50.0, -45.0])
    return x


def streamed(x: torch.Tensor) -> AbsHistogram:
    hist = AbsHistogram()
    for part in x.split(7_000):  # many batches: the range widens as larger values arrive
        hist.update(part)
    return hist


def test_minmax_threshold_is_max_abs() -> None:
    x = laplace_with_outliers()
    assert minmax_threshold(streamed(x)) == pytest.approx(float(x.abs().max()))


def test_percentile_matches_numpy_within_a_bin() -> None:
    x = laplace_with_outliers()
    hist = streamed(x)
    for q in (99.0, 99.9, 99.99):
        assert abs(percentile_threshold(hist, q) - np.percentile(x.abs().numpy(), q)) <= 2 * hist.width


def test_entropy_threshold_clips_outliers() -> None:
    x = laplace_with_outliers()
    t = entropy_threshold(streamed(x))
    assert np.percentile(x.abs().numpy(), 99.9) < t < 0.5 * float(x.abs().max())


def tensorrt_entropy_reference(counts: np.ndarray, width: float, levels: int = 128, max_clipped: float = 1e-3) -> float:
    """TensorRT's KL search written out candidate by candidate, as the algorithm is described."""
    best, best_i, total = np.inf, len(counts), counts.sum()
    for i in range(levels, len(counts) + 1):
        clipped = counts[i:].sum()
        if clipped > max_clipped * total:
            continue
        p = counts[:i].astype(np.float64).copy()
        p[i - 1] += clipped
        group = np.arange(i) * levels // i
        q = np.zeros(i)
        for g in range(levels):
            members = group == g
            filled = (counts[:i] > 0) & members
            if filled.any():
                q[filled] = counts[:i][members].sum() / filled.sum()
        if np.any((p > 0) & (q == 0)):
            continue
        p, q = p / p.sum(), q / q.sum()
        kl = float(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0])))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


@pytest.mark.parametrize("sample", ["laplace", "relu-squared", "outliers"])
def test_entropy_search_matches_the_algorithm_written_out(sample: str) -> None:
    torch.manual_seed(1)
    x = {
        "laplace": lambda: torch.distributions.Laplace(0.0, 1.0).sample((50_000,)),
        "relu-squared": lambda: torch.relu(torch.randn(50_000)) ** 2,
        "outliers": laplace_with_outliers,
    }[sample]()
    hist = AbsHistogram(bins=512)  # the written-out search is slow: fewer bins, same algorithm
    hist.update(x)
    reference = tensorrt_entropy_reference(hist.counts.numpy(), hist.width)
    assert entropy_threshold(hist) == pytest.approx(reference, abs=1e-9)


def test_mse_threshold_minimizes_the_error_it_models() -> None:
    x = torch.distributions.Normal(0.0, 1.0).sample((50_000,))
    hist = streamed(x)
    t = mse_threshold(hist)
    assert 2.0 < t < float(x.abs().max())  # 8-bit Gaussian: clip at a few sigma, not at the max

    def error(limit: float) -> float:
        step = limit / 127
        return float(((x.clamp(-limit, limit) / step).round() * step - x).pow(2).mean())

    assert error(t) <= error(float(x.abs().max())) and error(t) <= error(1.0)


def test_zeros_are_counted_apart_and_non_finite_values_refused() -> None:
    hist = AbsHistogram()
    x = torch.relu(torch.randn(10_000))
    hist.update(x)
    assert hist.zeros == int((x == 0).sum()) and hist.non_negative
    assert hist.counts.sum() + hist.zeros == x.numel()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match="non-finite"):
            hist.update(torch.tensor([1.0, bad]))
