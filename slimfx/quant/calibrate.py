"""Streaming calibration: a histogram of |x| per tensor, and thresholds chosen from it.

Nothing but the histogram and running statistics is kept, however much data streams past.
Threshold rules (pure functions of the histogram, each tested alone): ``minmax`` (max |x|),
``percentile`` (of |x|), ``entropy`` (TensorRT's KL-divergence search) and ``mse`` (least
quantization mean squared error).
"""
from __future__ import annotations

import math

import torch

BINS = 2048


class AbsHistogram:
    """A fixed-bin histogram of |x| over [0, max seen]; widened (re-binned) when a larger value arrives.

    Exact zeros (most of a ReLU's output) are counted apart in ``zeros``: every grid represents
    them exactly, and left in bin 0 they would dominate the entropy search.
    """

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.zeros = 0
        self.upper = 0.0
        self.minimum = math.inf  # signed extremes, to tell non-negative tensors apart
        self.maximum = -math.inf

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration saw a non-finite activation (inf or nan)")
        self.minimum = min(self.minimum, float(x.min()))
        self.maximum = max(self.maximum, float(x.max()))
        a = x.abs()
        nonzero = a[a != 0]
        self.zeros += a.numel() - nonzero.numel()
        if nonzero.numel() == 0:
            return
        top = float(nonzero.max())
        if top > self.upper:
            self._widen(top)
        self.counts += torch.histc(nonzero, self.bins, 0.0, self.upper).double()

    def _widen(self, top: float) -> None:
        """Grow the range to cover ``top``; old counts move to the bins that hold their centres."""
        if self.upper == 0.0 or not bool(self.counts.any()):
            self.upper = top
            return
        old_width, new_width = self.upper / self.bins, top / self.bins
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * old_width
        target = (centres / new_width).long().clamp_max(self.bins - 1)
        counts = torch.zeros(self.bins, dtype=torch.float64)
        counts.index_add_(0, target, self.counts)
        self.counts, self.upper = counts, top

    @property
    def width(self) -> float:
        return self.upper / self.bins

    @property
    def non_negative(self) -> bool:
        return self.minimum >= 0.0


def minmax_threshold(hist: AbsHistogram) -> float:
    return hist.upper


def percentile_threshold(hist: AbsHistogram, percentile: float) -> float:
    """The ``percentile`` of |x| (zeros included), to within one bin (linear inside the bin)."""
    total = float(hist.counts.sum()) + hist.zeros
    goal = total * percentile / 100.0 - hist.zeros
    if total == 0 or goal <= 0:
        return 0.0
    cumulative = torch.cumsum(hist.counts, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor(goal, dtype=torch.float64)))
    index = min(index, hist.bins - 1)
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(hist.counts[index])
    fraction = (goal - before) / inside if inside else 1.0
    return (index + min(max(fraction, 0.0), 1.0)) * hist.width


def entropy_threshold(hist: AbsHistogram, levels: int = 128, start: int = 128, max_clipped: float = 1e-3,
                      chunk: int = 256) -> float:
    """TensorRT's calibration: the threshold whose ``levels``-level quantization of the
    histogram keeps the KL divergence to the original smallest.

    For each candidate bin count i from ``start`` to the number of bins, the reference P is
    the first i bins with everything above folded into bin i-1; Q merges those i bins into
    ``levels`` groups (bin j goes to group floor(j * levels / i)) and spreads each group's
    mass evenly over its non-empty bins. Candidates are evaluated ``chunk`` at a time as
    matrices, so the whole search is a few dozen vector operations.

    One guard beyond TensorRT: candidates that clip more than ``max_clipped`` of the non-zero
    values are skipped. On sparse, discrete histograms (8-bit images, say) the search otherwise
    finds a zero divergence where P and Q are the same single spike, and clips almost all data.
    """
    counts = hist.counts
    bins = hist.bins
    total_mass = float(counts.sum())
    if total_mass == 0 or hist.upper == 0:
        return hist.upper
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(counts, 0)])
    used = (counts > 0).double()
    columns = torch.arange(bins)
    best_divergence, best_i = math.inf, bins
    for first in range(start, bins + 1, chunk):
        sizes = torch.arange(first, min(first + chunk, bins + 1))  # candidate bin counts i
        inside = columns[None, :] < sizes[:, None]  # (m, bins): bin j kept by candidate i
        clipped = total_mass - prefix[sizes]
        kept = torch.where(inside, counts[None, :], torch.zeros(()))
        p = kept.clone()
        p[torch.arange(len(sizes)), sizes - 1] += clipped  # fold the outliers into the last kept bin
        group = torch.where(inside, (columns[None, :] * levels) // sizes[:, None], torch.full((), levels))
        mass = torch.zeros(len(sizes), levels + 1, dtype=torch.float64).scatter_add_(1, group, kept)
        filled = torch.zeros(len(sizes), levels + 1, dtype=torch.float64).scatter_add_(1, group, torch.where(inside, used[None, :], torch.zeros(())))
        spread = mass / filled.clamp_min(1)
        q = torch.where(inside & (counts[None, :] > 0), spread.gather(1, group), torch.zeros(()))
        p = p / p.sum(1, keepdim=True)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
        positive = p > 0
        ratio = torch.where(positive, p / q.clamp_min(1e-300), torch.ones(()))
        divergence = torch.where(positive, p * torch.log(ratio), torch.zeros(())).sum(1)
        impossible = (positive & (q == 0)).any(1) | (clipped > max_clipped * total_mass)
        divergence[impossible] = math.inf
        k = int(torch.argmin(divergence))
        if float(divergence[k]) < best_divergence:
            best_divergence, best_i = float(divergence[k]), int(sizes[k])
    return best_i * hist.width


def mse_threshold(hist: AbsHistogram, bits: int = 8, candidates: int = 256) -> float:
    """The threshold minimizing expected squared error of symmetric ``bits``-bit quantization:
    rounding error (step^2 / 12 per value inside) plus clipping error of values above."""
    if hist.upper == 0:
        return 0.0
    centres = (torch.arange(hist.bins, dtype=torch.float64) + 0.5) * hist.width
    counts = hist.counts
    steps = 2 ** (bits - 1) - 1
    best, best_t = math.inf, hist.upper
    for t in torch.linspace(hist.upper / candidates, hist.upper, candidates).tolist():
        step = t / steps
        inside = centres <= t
        error = float((counts[inside] * step**2 / 12).sum() + (counts[~inside] * (centres[~inside] - t) ** 2).sum())
        if error < best:
            best, best_t = error, t
    return best_t


def threshold(hist: AbsHistogram, method: str, percentile: float = 99.99, bits: int = 8) -> float:
    if method == "minmax":
        return minmax_threshold(hist)
    if method == "percentile":
        return percentile_threshold(hist, percentile)
    if method == "entropy":
        return entropy_threshold(hist)
    if method == "mse":
        return mse_threshold(hist, bits)
    raise ValueError(f"unknown calibration method {method!r}")
