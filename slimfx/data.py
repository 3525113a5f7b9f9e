"""Calibration and training data in one shape: batches of model inputs, with labels when given.

Users hand slimfx data in many forms: a list of tensors, a list of ``(x, y)`` pairs, a
``DataLoader`` over a ``TensorDataset``, one big tensor. ``batches`` turns each into
``Batch`` objects checked against the model's example inputs, so no pass unpacks data itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slimfx.errors import DataError


@dataclass(frozen=True)
class Batch:
    """One batch: a tensor per model input, and the labels (1-D, one per row) when given."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs and self.inputs[0].dim() else 1


def check_reusable(data: Iterable[Any], what: str = "calib_data") -> None:
    """Passes read the data more than once: a one-shot iterator (a generator) is refused."""
    if isinstance(data, torch.Tensor):
        return
    try:
        reusable = iter(data) is not data
    except TypeError:
        raise DataError(f"{what} must be a tensor or an iterable of batches, not a {type(data).__name__}") from None
    if not reusable:
        raise DataError(
            f"{what} is a one-shot iterator (a generator?); slimfx reads it more than once: "
            "pass a list of batches or a DataLoader"
        )


def batches(
    data: Iterable[Any] | torch.Tensor,
    example_inputs: Sequence[torch.Tensor],
    what: str = "calib_data",
    fixed_rows: int | None = None,
) -> Iterator[Batch]:
    """Every batch of ``data`` as a ``Batch``, checked against ``example_inputs``.

    A tensor (or NumPy array) is split into batches of the example batch size, and so is a whole
    labelled data set given as ``(X, y)``. Each item of an iterable is a tensor (the only
    input), or a tuple/list of one tensor per model input, optionally followed by a 1-D tensor
    of labels. Inputs must match the example inputs' shape past the batch
    dimension; floating inputs are cast to the example's dtype. With ``fixed_rows`` (a graph
    traced at fixed shapes runs on its example's batch size only), each batch is split into
    batches of exactly that many rows.
    """
    data = _as_tensor(data)
    size = max(int(example_inputs[0].shape[0]) if example_inputs and example_inputs[0].dim() else 1, 1)
    if isinstance(data, torch.Tensor):
        data = list(data.split(size)) if data.dim() else [data]
    elif (pair := _inputs_and_labels(data, example_inputs)) is not None:
        data = list(zip(pair[0].split(size), pair[1].split(size)))
    for index, item in enumerate(data):
        batch = as_batch(item, example_inputs, f"{what}: batch {index}")
        yield from (batch,) if fixed_rows is None else _split_rows(batch, fixed_rows, f"{what}: batch {index}")


def _as_tensor(data: Any) -> Any:
    """A NumPy array as a tensor (sharing its memory); anything else as it is."""
    if type(data).__module__ == "numpy" and hasattr(data, "dtype") and hasattr(data, "shape"):
        return torch.from_numpy(data)
    return data


def _inputs_and_labels(data: Any, example_inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(X, y)``, a whole labelled data set in two tensors (rows of model input, one label per
    row), told apart from a list of two batches by ``y`` being 1-D against inputs of 2-D or more."""
    if not isinstance(data, (tuple, list)) or len(data) != 2 or len(example_inputs) != 1:
        return None
    inputs, labels = (_as_tensor(d) for d in data)
    if not (isinstance(inputs, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return None
    if example_inputs[0].dim() < 2 or labels.dim() != 1 or inputs.dim() != example_inputs[0].dim():
        return None
    return (inputs, labels) if len(labels) == len(inputs) else None


def _split_rows(batch: Batch, rows: int, where: str) -> Iterator[Batch]:
    if batch.rows % rows:
        raise DataError(
            f"{where} has {batch.rows} rows; the model was traced at fixed shapes (it branches on its input's "
            f"shape), so it runs on batches of {rows} only: give a multiple of {rows} rows per batch"
        )
    for start in range(0, batch.rows, rows):
        labels = None if batch.labels is None else batch.labels[start : start + rows]
        yield Batch(tuple(t[start : start + rows] for t in batch.inputs), labels)


def as_batch(item: Any, example_inputs: Sequence[torch.Tensor], where: str) -> Batch:
    """One item of calibration or training data as a ``Batch`` (see ``batches``)."""
    if isinstance(item, Batch):
        return item
    count = len(example_inputs)
    parts = tuple(item) if isinstance(item, (tuple, list)) else (item,)
    labels = None
    if len(parts) == count + 1 and isinstance(parts[-1], torch.Tensor) and parts[-1].dim() == 1:
        parts, labels = parts[:-1], parts[-1]
    if len(parts) != count or not all(isinstance(t, torch.Tensor) for t in parts):
        found = ", ".join(
            type(p).__name__ if not isinstance(p, torch.Tensor) else f"tensor {tuple(p.shape)}" for p in parts
        )
        raise DataError(
            f"{where} holds ({found}); expected {count} tensor(s), one per model input, optionally "
            "followed by a 1-D tensor of labels"
        )
    inputs = tuple(
        _checked_input(t, example, position, where) for position, (t, example) in enumerate(zip(parts, example_inputs))
    )
    if labels is not None and len(labels) != inputs[0].shape[0]:
        raise DataError(f"{where} has {len(labels)} labels for {inputs[0].shape[0]} rows")
    return Batch(inputs, labels)


def _checked_input(tensor: torch.Tensor, example: torch.Tensor, position: int, where: str) -> torch.Tensor:
    if tuple(tensor.shape[1:]) != tuple(example.shape[1:]):
        expected = ", ".join(map(str, example.shape[1:]))
        raise DataError(
            f"{where}, input {position} has shape {tuple(tensor.shape)}; the model takes (batch, {expected})"
        )
    if example.is_floating_point() and not tensor.is_floating_point():
        raise DataError(
            f"{where}, input {position} is {tensor.dtype} but the model takes {example.dtype}: convert it "
            "first (images in 0..255: x.float() / 255, then the model's normalization)"
        )
    return tensor.to(example.dtype) if tensor.is_floating_point() and tensor.dtype != example.dtype else tensor
