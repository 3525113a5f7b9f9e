"""Dynamic BlockDrop: the runtime skips blocks per row exactly as the models built without
them do, the gated training forward matches it, and training pulls the expected cost to the target."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from slimfx.backends.block_drop import BlockDropModel, block_stages
from slimfx.ir.blocks import residual_blocks, without_blocks
from slimfx.ir.capture import capture
from slimfx.train.block_policy import BlockPolicy, expected_cost, gated_forward, train_policy
from tests.nets import randomize_batchnorm


class _Fixed(nn.Module):
    """A policy that answers the same logits for every row."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("values", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values.expand(x.shape[0], -1)


def _resnet18():
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    graph = capture(model, (torch.randn(1, 3, 32, 32),))
    blocks = residual_blocks(graph)
    stages, indices = block_stages(graph.module, blocks)
    return model, graph, blocks, stages, indices


def test_a_policy_keeping_every_block_gives_the_original_outputs() -> None:
    model, _, blocks, stages, indices = _resnet18()
    runtime = BlockDropModel(stages, indices, _Fixed([1.0] * len(blocks))).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(runtime(x), model(x))


def test_dropped_blocks_equal_the_model_built_without_them_row_by_row() -> None:
    _, graph, blocks, stages, indices = _resnet18()
    runtime = BlockDropModel(stages, indices, _Fixed([1.0] * len(blocks))).eval()
    x = torch.randn(4, 3, 32, 32)
    keep = torch.ones(4, len(blocks), dtype=torch.bool)
    keep[:, 2] = False  # every row drops block 2
    keep[1:3, 4] = False  # rows 1 and 2 drop block 4 too
    with torch.no_grad():
        out = runtime(x, keep)
        without_2 = without_blocks(graph, [blocks[2]], "test")
        without_2_4 = without_blocks(graph, [blocks[2], blocks[4]], "test")
        assert torch.allclose(out[[0, 3]], without_2(x[[0, 3]]), atol=1e-5)
        assert torch.allclose(out[1:3], without_2_4(x[1:3]), atol=1e-5)
        gates = keep.float()
        assert torch.allclose(gated_forward(stages, indices, gates, x), out, atol=1e-5)


def test_a_policy_dropping_a_block_takes_it_out_for_every_row() -> None:
    _, graph, blocks, stages, indices = _resnet18()
    runtime = BlockDropModel(stages, indices, _Fixed([1.0, 1.0, -1.0, 1.0, 1.0])).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, keep = runtime(x, return_keep=True)
        assert keep[:, 2].sum() == 0 and keep.sum() == 12
        assert torch.allclose(out, without_blocks(graph, [blocks[2]], "test")(x), atol=1e-5)


def test_expected_cost_counts_the_kept_blocks_of_each_row() -> None:
    gates = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert float(expected_cost(gates, torch.tensor([2.0, 3.0]), 10.0)) == pytest.approx((10.0 + 8.0) / 2 / 10.0)


def test_training_the_policy_pulls_the_expected_cost_to_the_target() -> None:
    model, _, blocks, stages, indices = _resnet18()
    batches = [(torch.randn(16, 3, 32, 32), None) for _ in range(4)]
    block_ms = torch.ones(len(blocks))
    outcome = train_policy(
        stages, indices, BlockPolicy(3, len(blocks)), model, batches, block_ms, 10.0, 0.7, epochs=6, lr=3e-2
    )
    assert outcome.expected_cost < 0.85  # from 1.0: every block kept at first
    assert len(outcome.kept) == len(blocks) and len(outcome.losses) == 6
