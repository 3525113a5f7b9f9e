"""How far one tensor is from another: pure functions, used by verification, passes and reports."""

from __future__ import annotations

import math

import torch


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """``||candidate - reference|| / ||reference||`` (Frobenius; absolute when the reference is 0)."""
    ref = reference.detach().double()
    diff = float((candidate.detach().double() - ref).norm())
    scale = float(ref.norm())
    return diff / scale if scale > 0 else diff


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal, -inf for a zero signal)."""
    reference, approximation = reference.detach().double(), approximation.detach().double()
    noise = float((reference - approximation).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf


def top1_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float | None:
    """Share of rows whose arg-max class is the same, for classifier outputs (rows, classes);
    None for outputs that are not (rows, classes) with at least one row and two classes."""
    if reference.dim() != 2 or reference.shape[1] < 2 or not len(reference) or candidate.shape != reference.shape:
        return None
    return float((reference.argmax(1) == candidate.argmax(1)).double().mean())


def top1_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Share of rows whose arg-max class is the label; None for outputs that are not
    (rows, classes) with one label per row."""
    if outputs.dim() != 2 or outputs.shape[1] < 2 or labels.shape != outputs.shape[:1] or not len(labels):
        return None
    return float((outputs.argmax(1) == labels).double().mean())


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(candidate)) for class scores
    (rows, classes), in nats; 0 when they are equal."""
    if reference.dim() != 2 or candidate.shape != reference.shape:
        raise ValueError(
            f"kl_divergence takes two (rows, classes) tensors of one shape, not {reference.shape} and {candidate.shape}"
        )
    log_p = torch.log_softmax(reference.detach().double(), 1)
    log_q = torch.log_softmax(candidate.detach().double(), 1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean().clamp_min(0.0))


def output_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """How far ``candidate`` drifted from ``reference``: KL for class scores, else the relative error."""
    if reference.dim() == 2 and reference.shape[1] >= 2 and candidate.shape == reference.shape:
        return kl_divergence(reference, candidate)
    return relative_error(reference, candidate)
