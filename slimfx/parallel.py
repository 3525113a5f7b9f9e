"""Several processes, one result: who this process is under ``torch.distributed``, and the
few collective steps slimfx takes (sharding rows and batches, summing and maximizing).

Everything here is the identity when no process group is initialized, so callers need no
branches: a single process is rank 0 of 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


def is_main() -> bool:
    """Rank 0, the one process that prints and writes files."""
    return world()[0] == 0


def mine(index: int) -> bool:
    """Whether item ``index`` of a sequence sharded round-robin belongs to this rank."""
    rank, size = world()
    return index % size == rank


def shard_rows(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of ``tensor``'s rows (equal shares when they divide)."""
    rank, size = world()
    if size == 1:
        return tensor
    return tensor.tensor_split(size)[rank]


def all_sum(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (float64)."""
    tensor = torch.as_tensor(values, dtype=torch.float64).clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_max(values: Sequence[float]) -> list[float]:
    """Element-wise maximum over ranks."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
