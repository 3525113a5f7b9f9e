"""The worked example of docs/architecture.md runs as written: the doc stays true."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.passes.registry import PASSES

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


@pytest.fixture
def example_pass() -> Iterator[type]:
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    yield namespace["RemoveDropout"]
    PASSES.pop("remove-dropout")


def test_the_worked_example_registers_runs_and_is_verified_exact(example_pass: type) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    result = slimfx.compile(model.eval(), x, "remove-dropout,fold-bn")
    record = result.report.passes[0]
    assert (record.name, record.exact, record.changed) == ("remove-dropout", True, True)
    assert record.output_error < 1e-6 and [d.action for d in record.decisions] == ["removed"]
    assert not any(isinstance(m, nn.Dropout) for m in result.module.modules())
