"""Calibration data named on the command line: ``random:N`` or a file of saved batches."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from slimfx.errors import SlimfxError


class CalibDataError(SlimfxError):
    """A ``--calib`` value names no usable calibration data."""


Batch = tuple[torch.Tensor, ...]


def calibration_batches(spec: str, example_inputs: Sequence[torch.Tensor], seed: int = 0) -> list[Batch]:
    """Batches for ``--calib SPEC``.

    ``random:N``: N batches of random normal inputs shaped like the example inputs (a stand-in
    that shows the pipeline; pass real data for real thresholds). ``PATH``: a file written by
    ``torch.save`` holding a tensor (split into batches of the example batch size), a list of
    tensors, or a list of tuples of tensors (one per model input, then optionally 1-D labels,
    which add-exits:joint=true trains on).
    """
    if spec.startswith("random:"):
        count = spec.removeprefix("random:")
        if not count.isdigit() or int(count) < 1:
            raise CalibDataError(f"--calib {spec}: N in random:N must be a whole number >= 1, e.g. random:16")
        generator = torch.Generator().manual_seed(seed)
        return [tuple(torch.randn(x.shape, generator=generator) for x in example_inputs) for _ in range(int(count))]
    path = Path(spec)
    if not path.is_file():
        raise CalibDataError(f"--calib {spec}: no such file; give random:N or a file written by torch.save")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CalibDataError(f"--calib {spec}: cannot load it with torch.load ({type(exc).__name__}: {exc})") from None
    batches = _as_batches(data, example_inputs, spec)
    if not batches:
        raise CalibDataError(f"--calib {spec}: the file holds no batches")
    return batches


def _as_batches(data: object, example_inputs: Sequence[torch.Tensor], spec: str) -> list[Batch]:
    if isinstance(data, torch.Tensor):
        data = list(data.split(max(example_inputs[0].shape[0], 1))) if data.dim() else [data]
    if not isinstance(data, (list, tuple)):
        raise CalibDataError(f"--calib {spec}: expected a tensor or a list of batches, found {type(data).__name__}")
    batches = [tuple(item) if isinstance(item, (list, tuple)) else (item,) for item in data]
    for index, batch in enumerate(batches):
        labelled = len(batch) == len(example_inputs) + 1 and isinstance(batch[-1], torch.Tensor) and batch[-1].dim() == 1
        if len(batch) != len(example_inputs) + labelled or not all(isinstance(t, torch.Tensor) for t in batch):
            raise CalibDataError(f"--calib {spec}: batch {index} is not {len(example_inputs)} tensor(s), one per model "
                                 "input (optionally followed by a 1-D tensor of labels)")
        for position, (tensor, example) in enumerate(zip(batch, example_inputs)):
            if tensor.shape[1:] != example.shape[1:]:
                raise CalibDataError(f"--calib {spec}: batch {index}, input {position} has shape {tuple(tensor.shape)}; "
                                     f"the model takes (batch, {', '.join(map(str, example.shape[1:]))})")
    return [tuple(t.float() if t.is_floating_point() else t for t in batch) for batch in batches]
