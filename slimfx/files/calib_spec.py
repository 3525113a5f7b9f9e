"""Calibration data named on the command line: ``random:N`` or a file of saved batches."""

from __future__ import annotations

import re
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
    ``torch.save`` holding a tensor (split into batches of the example batch size), an
    ``(X, y)`` pair (inputs and one label per row, split likewise), a list of tensors, or a list
    of tuples of tensors (one per model input, then optionally 1-D labels); or a NumPy file:
    ``.npy`` (the inputs) or ``.npz`` (the inputs, and labels under ``y``/``labels``/``targets``).
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
        raise DataError(f"{flag} {spec}: no such file; give random:N, a file written by torch.save, or .npy/.npz")
    data = _numpy_file(path, flag) if path.suffix.lower() in (".npy", ".npz") else _torch_file(path, flag)
    if not isinstance(data, (torch.Tensor, list, tuple)):
        raise DataError(f"{flag} {spec}: expected a tensor or a list of batches, found {type(data).__name__}")
    loaded = list(batches(data, example_inputs, what=f"{flag} {spec}"))
    if not loaded:
        raise DataError(f"{flag} {spec}: the file holds no batches")
    return loaded


INPUT_KEYS = ("x", "inputs", "data", "images", "X")
LABEL_KEYS = ("y", "labels", "targets", "target", "Y")


def _torch_file(path: Path, flag: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"{flag} {path}: cannot load it with torch.load ({type(exc).__name__}: {_first_line(exc)}); "
            "give a file written by torch.save (tensors and lists or tuples of them), or .npy/.npz"
        ) from None


def _numpy_file(path: Path, flag: str) -> object:
    """A ``.npy`` array as the inputs; a ``.npz`` as inputs, with labels when it holds them."""
    try:
        import numpy as np
    except ImportError:
        raise DataError(f"{flag} {path}: reading NumPy files needs numpy: pip install numpy") from None
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(
            f"{flag} {path}: cannot read it with numpy.load ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return torch.from_numpy(loaded)
    with loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    inputs = next((arrays[k] for k in INPUT_KEYS if k in arrays), None)
    labels = next((arrays[k] for k in LABEL_KEYS if k in arrays), None)
    if inputs is None and len(arrays) == 1:
        (inputs,) = arrays.values()
    if inputs is None:
        raise DataError(
            f"{flag} {path}: the .npz holds {', '.join(arrays) or 'nothing'}; name the inputs one of "
            f"{', '.join(INPUT_KEYS)} (and the labels one of {', '.join(LABEL_KEYS)})"
        )
    if labels is None:
        return torch.from_numpy(inputs)
    return (torch.from_numpy(inputs), torch.from_numpy(labels))


def _first_line(exc: Exception) -> str:
    """An exception's first line, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
