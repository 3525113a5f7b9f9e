"""Calibration data in every form users have becomes the same checked batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from slimfx.data import Batch, batches, check_reusable
from slimfx.errors import DataError

EXAMPLE = (torch.zeros(4, 3, 8, 8),)


def test_a_tensor_is_split_into_batches_of_the_example_size() -> None:
    found = list(batches(torch.randn(10, 3, 8, 8), EXAMPLE))
    assert [b.rows for b in found] == [4, 4, 2] and all(b.labels is None for b in found)


def test_pairs_and_a_dataloader_give_inputs_and_labels() -> None:
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    for data in ([(x[:3], y[:3]), (x[3:], y[3:])], DataLoader(TensorDataset(x, y), batch_size=3)):
        found = list(batches(data, EXAMPLE))
        assert len(found) == 2 and torch.equal(torch.cat([b.labels for b in found]), y)
        assert torch.equal(torch.cat([b.inputs[0] for b in found]), x)


def test_float64_inputs_take_the_models_dtype_and_batches_pass_through() -> None:
    (found,) = batches([torch.randn(2, 3, 8, 8, dtype=torch.float64)], EXAMPLE)
    assert found.inputs[0].dtype == torch.float32
    assert next(batches([found], EXAMPLE)) is found and isinstance(found, Batch)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([torch.randn(2, 3, 4, 4)], r"batch 0, input 0 has shape \(2, 3, 4, 4\); the model takes \(batch, 3, 8, 8\)"),
        ([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], "is torch.uint8 but the model takes torch.float32"),
        ([(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))], "expected 1 tensor"),
        ([(torch.randn(2, 3, 8, 8), torch.arange(3))], "3 labels for 2 rows"),
        (["not a tensor"], "holds \\(str\\)"),
    ],
)
def test_malformed_batches_are_named(data: list, message: str) -> None:
    with pytest.raises(DataError, match=message):
        list(batches(data, EXAMPLE))


def test_a_one_shot_iterator_is_refused_before_any_work() -> None:
    check_reusable([torch.randn(2, 3, 8, 8)])
    check_reusable(DataLoader(TensorDataset(torch.randn(4, 3, 8, 8)), batch_size=2))
    with pytest.raises(DataError, match="one-shot iterator"):
        check_reusable(x for x in [torch.randn(2, 3, 8, 8)])
    with pytest.raises(DataError, match="not a int"):
        check_reusable(3)


def test_a_whole_labelled_set_as_x_y_and_numpy_arrays_are_split_into_batches() -> None:
    import numpy as np

    x, y = torch.randn(10, 3, 8, 8), torch.arange(10)
    for data in ((x, y), [x, y], (x.numpy(), y.numpy())):
        found = list(batches(data, EXAMPLE))
        assert [b.rows for b in found] == [4, 4, 2] and torch.equal(torch.cat([b.labels for b in found]), y)
    assert [b.rows for b in batches(np.zeros((6, 3, 8, 8), dtype=np.float32), EXAMPLE)] == [4, 2]


def test_numpy_files_and_unreadable_files(tmp_path) -> None:
    import numpy as np

    from slimfx.files.calib_spec import calibration_batches

    x, y = np.random.rand(6, 3, 8, 8).astype(np.float32), np.arange(6)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", images=x, labels=y)
    np.savez(tmp_path / "odd.npz", a=x, b=y)
    (plain,) = [calibration_batches(str(tmp_path / "x.npy"), (torch.zeros(6, 3, 8, 8),))]
    assert len(plain) == 1 and plain[0].labels is None and torch.allclose(plain[0].inputs[0], torch.from_numpy(x))
    labelled = calibration_batches(str(tmp_path / "xy.npz"), EXAMPLE)
    assert torch.equal(torch.cat([b.labels for b in labelled]), torch.from_numpy(y))
    with pytest.raises(DataError, match="the .npz holds a, b; name the inputs one of x, inputs"):
        calibration_batches(str(tmp_path / "odd.npz"), EXAMPLE)
    np.save(tmp_path / "bytes.npy", (x * 255).astype(np.uint8))
    with pytest.raises(DataError, match="is torch.uint8 but the model takes torch.float32: convert it"):
        calibration_batches(str(tmp_path / "bytes.npy"), EXAMPLE)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError) as error:
        calibration_batches(str(tmp_path / "junk.pt"), EXAMPLE)
    assert "cannot load it with torch.load" in str(error.value) and "\n" not in str(error.value)
    assert "\x1b" not in str(error.value)
