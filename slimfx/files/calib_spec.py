"""Calibration data named on the command line: ``random:N`` or a file of saved batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from slimfx.data import Batch, batches
from slimfx.errors import DataError


def calibration_batches(
    spec: str, example_inputs: Sequence[torch.Tensor], seed: int = 0, flag: str = "--calib"
) -> list[Batch]:
    """Batches for ``--calib SPEC`` (or ``--train SPEC``, named by ``flag`` in errors).

    ``random:N``: N batches of random normal inputs shaped like the example inputs (a stand-in
    that shows the pipeline; pass real data for real thresholds). ``PATH``: a file written by
    ``torch.save`` holding a tensor (split into batches of the example batch size), a list of
    tensors, or a list of tuples of tensors (one per model input, then optionally 1-D labels,
    which add-exits:joint=true trains on).
    """
    if spec.startswith("random:"):
        count = spec.removeprefix("random:")
        if not count.isdigit() or int(count) < 1:
            raise DataError(f"{flag} {spec}: N in random:N must be a whole number >= 1, e.g. random:16")
        generator = torch.Generator().manual_seed(seed)
        return [
            Batch(tuple(torch.randn(x.shape, generator=generator) for x in example_inputs)) for _ in range(int(count))
        ]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{flag} {spec}: no such file; give random:N or a file written by torch.save")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{flag} {spec}: cannot load it with torch.load ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, (torch.Tensor, list, tuple)):
        raise DataError(f"{flag} {spec}: expected a tensor or a list of batches, found {type(data).__name__}")
    loaded = list(batches(data, example_inputs, what=f"{flag} {spec}"))
    if not loaded:
        raise DataError(f"{flag} {spec}: the file holds no batches")
    return loaded
