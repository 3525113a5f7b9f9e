"""Streaming calibration: a histogram of |x| per tensor, and thresholds chosen from it.

Nothing but the histogram and running statistics is kept, however much data streams past.
Threshold rules (pure functions of the histogram, each tested alone): ``minmax`` (max |x|),
``percentile`` (of |x|), ``entropy`` (TensorRT's KL-divergence search) and ``mse`` (least
quantization mean squared error).
"""

from __future__ import annotations

import math

import torch

from slimfx import parallel
from slimfx.errors import NonFiniteError, PassSpecError

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
        x = x.detach().reshape(-1)
        if x.numel() == 0:
            return
        low, high = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(low) and math.isfinite(high)):  # an inf or nan reaches the extremes
            raise NonFiniteError("calibration saw a non-finite activation (inf or nan)")
        self.minimum, self.maximum = min(self.minimum, low), max(self.maximum, high)
        a = x.abs().float()
        zeros = int((a == 0).sum())
        self.zeros += zeros
        top = max(-low, high)
        if zeros == a.numel():
            return
        if top > self.upper:
            self._widen(top)
        counts = torch.histc(a, self.bins, 0.0, self.upper).double()
        counts[0] -= zeros  # exact zeros are counted apart
        self.counts += counts

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

    def merge_ranks(self) -> None:
        """Under ``torch.distributed``, make this the histogram of every rank's data (each
        rank widened to the largest range seen, then the counts summed); a no-op otherwise."""
        if not parallel.is_distributed():
            return
        upper, maximum, negated_minimum = parallel.all_max([self.upper, self.maximum, -self.minimum])
        if upper > self.upper:
            self._widen(upper)
        self.counts = parallel.all_sum(self.counts)
        self.zeros = int(parallel.all_sum([self.zeros])[0])
        self.maximum, self.minimum = maximum, -negated_minimum

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


def entropy_threshold(hist: AbsHistogram, levels: int = 128, start: int = 128, max_clipped: float = 1e-3) -> float:
    """TensorRT's calibration: the threshold whose ``levels``-level quantization of the
    histogram keeps the KL divergence to the original smallest.

    For each candidate bin count i from ``start`` to the number of bins, the reference P is
    the first i bins with everything above folded into bin i-1; Q merges those i bins into
    ``levels`` groups (bin j goes to group floor(j * levels / i)) and spreads each group's
    mass evenly over its non-empty bins. KL(P || Q) then only needs, per group, its mass, its
    count of non-empty bins and its sum of c log c, each a difference of prefix sums: all
    candidates are scored at once as one (candidates x levels) matrix.

    One guard beyond TensorRT: candidates that clip more than ``max_clipped`` of the non-zero
    values are skipped. On sparse, discrete histograms (8-bit images, say) the search otherwise
    finds a zero divergence where P and Q are the same single spike, and clips almost all data.
    """
    counts = hist.counts
    total = float(counts.sum())
    if total == 0 or hist.upper == 0:
        return hist.upper
    sizes = torch.arange(start, hist.bins + 1, dtype=torch.float64)  # candidate bin counts i
    c_log_c = torch.where(counts > 0, counts * torch.log(counts.clamp_min(1e-300)), torch.zeros(()))
    mass_before, used_before, clog_before = (
        torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(v, 0)])
        for v in (counts, (counts > 0).double(), c_log_c)
    )
    i = sizes.long()
    last = counts[i - 1]  # bin i-1 takes the clipped tail
    clipped = total - mass_before[i]
    folded_last = last + clipped
    # sum over bins of p log p, with p = c' / total and c' the counts after folding
    p_log_p_sum = (
        clog_before[i]
        - c_log_c[i - 1]
        + torch.where(folded_last > 0, folded_last * torch.log(folded_last.clamp_min(1e-300)), torch.zeros(()))
    )
    groups = torch.arange(levels + 1, dtype=torch.float64)
    bounds = torch.div(
        groups[None, :] * sizes[:, None] + (levels - 1), levels, rounding_mode="floor"
    ).long()  # first bin of each group
    mass = mass_before[bounds[:, 1:]] - mass_before[bounds[:, :-1]]
    filled = used_before[bounds[:, 1:]] - used_before[bounds[:, :-1]]
    reference_mass = mass.clone()
    reference_mass[:, -1] += clipped  # the last group holds bin i-1
    kept = mass_before[i]
    q_log = torch.where(mass > 0, torch.log(mass.clamp_min(1e-300)) - torch.log(filled.clamp_min(1)), torch.zeros(()))
    cross = (reference_mass * q_log).sum(1) - total * torch.log(kept.clamp_min(1e-300))
    divergence = (p_log_p_sum - cross) / total - math.log(total)
    impossible = ((last == 0) & (clipped > 0)) | (
        clipped > max_clipped * total
    )  # P > 0 where Q = 0, or too much clipped
    divergence[impossible] = math.inf
    if bool(torch.isinf(divergence).all()):
        return hist.upper
    return int(sizes[int(torch.argmin(divergence))]) * hist.width


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
    raise PassSpecError(f"unknown calibration method {method!r}; choose minmax, percentile, entropy or mse")
